"""Work bounded before it starts: the target optimisation's memory estimate, chunking under a
budget (same vectors), refusal of a request that cannot fit (before any statistics or weights are
touched), and the budget's parsing."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit import RequestError
from lmedit._runtime import memory_budget, parse_bytes, peak_memory, resident_mb
from lmedit.core.layout import build_layout
from lmedit.core.targets import TargetConfig, compute_targets, estimate_bytes, plan_chunks
from lmedit.hooks import count_hooks

from helpers import REQUESTS, VARIED_REQUESTS, changed, edit_kwargs, snapshot, spd_covariances

TEMPLATES = ["{}", "Some context. {}"]


def test_estimate_grows_with_the_chunk(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = lmedit.get_adapter(model)
    one, three = (estimate_bytes(model, adapter, build_layout(tokenizer, VARIED_REQUESTS[:n], TEMPLATES), 1)
                  for n in (1, 3))
    assert 0 < one < three
    # a later target layer leaves fewer blocks to run forward and backward
    assert estimate_bytes(model, adapter, build_layout(tokenizer, VARIED_REQUESTS, TEMPLATES), 3) < three


def test_chunks_are_halved_under_the_budget_and_give_the_same_vectors(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = lmedit.get_adapter(model)
    reqs = VARIED_REQUESTS
    sizes = [estimate_bytes(model, adapter, build_layout(tokenizer, reqs[a:b], TEMPLATES), 1)
             for a, b in ((0, 3), (0, 1), (1, 2), (2, 3), (1, 3))]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 64, None) == [(0, 3)]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 64, sizes[0]) == [(0, 3)]
    budget = max(sizes[1:4])  # any one request fits, two do not: 3 -> (0, 1) + (1, 3) -> (1, 2) + (2, 3)
    assert sizes[4] > budget
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 64, budget) == [(0, 1), (1, 2), (2, 3)]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 2, sizes[0]) == [(0, 2), (2, 3)]
    config = TargetConfig(v_num_grad_steps=4)
    whole = compute_targets(model, tokenizer, adapter, reqs, TEMPLATES, 1, config)
    split = compute_targets(model, tokenizer, adapter, reqs, TEMPLATES, 1, config, budget=budget)
    torch.testing.assert_close(split.targets, whole.targets, rtol=1e-4, atol=1e-5)


def test_the_default_chunk_follows_the_device_the_passes_run_on(make_tiny, tokenizer, monkeypatch):
    """chunk_requests=0 (the default): 64 requests a chunk on a CPU (and unmeasured device types),
    all of them up to 256 on CUDA, either halved under the budget like an explicit size."""
    from lmedit.core import targets

    assert TargetConfig().chunk_requests == 0
    assert targets.default_chunk("cpu", 1000) == targets.default_chunk(None, 1000) == targets.default_chunk("mps", 9) == 64
    assert targets.default_chunk("cuda", 100) == targets.default_chunk(torch.device("cuda", 1), 100) == 100
    assert targets.default_chunk("cuda", 1000) == targets.CUDA_CHUNK == 256
    assert targets.default_chunk("cuda", 0) == 1
    with pytest.raises(ValueError, match="chunk_requests"):
        TargetConfig(chunk_requests=-1)
    model = make_tiny("llama")
    adapter = lmedit.get_adapter(model)
    reqs = VARIED_REQUESTS * 30  # 90 requests
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 0, None) == [(0, 64), (64, 90)]
    seen = []
    monkeypatch.setattr(targets, "default_chunk", lambda device, n: seen.append(str(device)) or n)
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 0, None) == [(0, 90)]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 40, None) == [(0, 40), (40, 80), (80, 90)]
    assert seen == ["cpu"]  # asked for the device of the blocks the passes resume at, and only when 0
    sizes = [estimate_bytes(model, adapter, build_layout(tokenizer, reqs[a:b], TEMPLATES), 1) for a, b in ((0, 90), (0, 45))]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 0, sizes[1]) == [(0, 45), (45, 90)]


def test_a_request_that_cannot_fit_is_refused_before_any_work(make_tiny, tokenizer, monkeypatch):
    model = make_tiny("llama")
    before = snapshot(model)
    import lmedit.editor as editor_module

    def no_statistics(*a, **k):
        raise AssertionError("statistics were computed before the memory check")

    monkeypatch.setattr(editor_module, "second_moments", no_statistics)
    ed = lmedit.Editor(model, tokenizer, "emmet", memory_budget="1KB", **edit_kwargs("emmet"))
    with pytest.raises(RequestError, match=r"request .*Xanadu.* GiB .*memory budget of 0\.00 GiB"):
        ed.edit(REQUESTS)
    assert not changed(model, before) and count_hooks(model) == 0 and ed.history == []
    # the environment variable sets it too; with enough budget the same edit goes through
    monkeypatch.setenv("LMEDIT_MEMORY_BUDGET", "1KB")
    with pytest.raises(RequestError, match="memory budget"):
        lmedit.Editor(model, tokenizer, "emmet", covariances=spd_covariances(model, [1, 2]),
                      **edit_kwargs("emmet")).edit(REQUESTS)
    monkeypatch.setenv("LMEDIT_MEMORY_BUDGET", "64GB")
    res = lmedit.Editor(model, tokenizer, "emmet", covariances=spd_covariances(model, edit_kwargs("emmet")["layers"]),
                        **edit_kwargs("emmet")).edit(REQUESTS)
    assert res.layers


@pytest.mark.parametrize("text,want", [("8GB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)),
                                       (2e9, 2_000_000_000), ("100", 100)])
def test_sizes_parse(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["", "x", "-1GB", "8 parsecs", 0, "0GB"])
def test_bad_sizes_are_refused(bad, make_tiny, tokenizer):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(bad)
    with pytest.raises(ValueError, match="memory size"):
        lmedit.Editor(make_tiny("llama"), tokenizer, "emmet", memory_budget=bad)


def test_budget_defaults_to_available_memory(monkeypatch):
    monkeypatch.delenv("LMEDIT_MEMORY_BUDGET", raising=False)
    got = memory_budget()
    assert got is None or got > 0
    monkeypatch.setenv("LMEDIT_MEMORY_BUDGET", "nonsense")
    with pytest.raises(ValueError, match="LMEDIT_MEMORY_BUDGET"):
        memory_budget()


@pytest.mark.skipif(resident_mb() is None, reason="no /proc/self/statm here")
def test_resident_memory_follows_an_allocation_and_the_peak_keeps_it():
    """What benchmarks/lifelong.py records per batch to show that a long run's memory stays flat."""
    before = resident_mb()
    block = torch.ones(64 * 2**20)  # 64 Mi float32: 256 MiB, written, so resident
    held = resident_mb()
    assert held - before > 200
    assert peak_memory()["peak_rss_mb"] >= held - 1
    del block
    assert resident_mb() < held - 200  # returned: a large block is its own mapping


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_longer_than_the_context_is_refused_before_any_work(arch, make_tiny, tokenizer, monkeypatch):
    model = make_tiny(arch)  # a context of 256 positions
    before = snapshot(model)
    import lmedit.editor as editor_module

    def no_statistics(*a, **k):
        raise AssertionError("statistics were computed before the length check")

    monkeypatch.setattr(editor_module, "second_moments", no_statistics)
    long = lmedit.EditRequest("word " * 300 + "and {} speaks", "Xanadu", "French", case_id=7)
    with pytest.raises(RequestError, match=r"request 7: .* take \d+ tokens, more than the model's context of 256"):
        lmedit.Editor(model, tokenizer, "emmet", **edit_kwargs("emmet")).edit([REQUESTS[0], long])
    assert not changed(model, before) and count_hooks(model) == 0
