"""Second-moment statistics: one pass equals per-layer passes, the cache is checked (metadata,
checksum) and a corrupt file is recomputed, an interrupted run resumes from its checkpoint."""

from __future__ import annotations

import logging

import pytest
import torch

from lmedit.core import stats as stats_mod
from lmedit.core.stats import second_moments
from lmedit.hooks import Trace, count_hooks
from lmedit.models.adapters import get_adapter

CORPUS_KW = dict(corpus="wikipedia-excerpt", n_samples=12, max_length=48, max_tokens=128, progress=False)


def _manual_C(model, tok, layer, texts, max_length):
    adapter = get_adapter(model)
    total, count = None, 0
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        with Trace({"k": adapter.edit_module(model, layer)}, capture="input", stop=True) as tr:
            model(input_ids=ids)
        k = tr.inputs["k"][0].double()  # (T, d_in)
        kk = k.T @ k
        total = kk if total is None else total + kk
        count += k.shape[0]
    return total / count


def test_one_pass_equals_unpadded_per_layer_computation(make_tiny, tokenizer, tmp_path):
    from lmedit.core.corpus import load_corpus

    model = make_tiny("llama")
    C = second_moments(model, tokenizer, get_adapter(model), [1, 2], cache_dir=tmp_path, **CORPUS_KW)
    texts = load_corpus("wikipedia-excerpt", 12)
    for layer in (1, 2):
        ref = _manual_C(model, tokenizer, layer, texts, 48)
        assert C[layer].dtype == torch.float64
        torch.testing.assert_close(C[layer], ref, rtol=1e-5, atol=1e-8)
    assert count_hooks(model) == 0


def test_cache_is_used_and_corruption_is_detected(make_tiny, tokenizer, tmp_path, caplog, monkeypatch):
    model = make_tiny("gpt2")
    adapter = get_adapter(model)
    C1 = second_moments(model, tokenizer, adapter, [1], cache_dir=tmp_path, **CORPUS_KW)[1]
    files = list(tmp_path.rglob("layer1-*.safetensors"))
    assert len(files) == 1

    calls = []
    real = stats_mod.accumulate
    monkeypatch.setattr(stats_mod, "accumulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    C2 = second_moments(model, tokenizer, adapter, [1], cache_dir=tmp_path, **CORPUS_KW)[1]
    assert calls == [] and torch.equal(C1, C2)  # read from the cache, no pass

    data = bytearray(files[0].read_bytes())
    data[-200:] = bytes(200)  # corrupt the tensor bytes (the checksum must catch it)
    files[0].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        C3 = second_moments(model, tokenizer, adapter, [1], cache_dir=tmp_path, **CORPUS_KW)[1]
    assert calls == [1] and "checksum" in caplog.text
    assert torch.equal(C1, C3)

    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        C4 = second_moments(model, tokenizer, adapter, [1], cache_dir=tmp_path, **CORPUS_KW)[1]
    assert calls == [1, 1] and "unreadable" in caplog.text and torch.equal(C1, C4)

    # a different sample count is a different cache entry, never the old file
    second_moments(model, tokenizer, adapter, [1], cache_dir=tmp_path, **{**CORPUS_KW, "n_samples": 6})
    assert calls == [1, 1, 1]


def test_interrupted_statistics_resume_from_checkpoint(make_tiny, tokenizer, tmp_path, caplog):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    full = second_moments(model, tokenizer, adapter, [1, 2], cache_dir=tmp_path / "ref", **CORPUS_KW)

    block = adapter.block(model, 0)
    seen = {"n": 0}

    def interrupt(module, args):
        seen["n"] += 1
        if seen["n"] == 4:
            raise KeyboardInterrupt

    handle = block.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            second_moments(model, tokenizer, adapter, [1, 2], cache_dir=tmp_path / "run",
                           checkpoint_seconds=1e-9, **CORPUS_KW)
    finally:
        handle.remove()
    assert list((tmp_path / "run").rglob("checkpoint-*.safetensors")), "no checkpoint was written"
    assert not list((tmp_path / "run").rglob("layer*.safetensors"))  # no half-finished result file

    with caplog.at_level(logging.INFO, logger="lmedit.core.stats"):
        resumed = second_moments(model, tokenizer, adapter, [1, 2], cache_dir=tmp_path / "run", **CORPUS_KW)
    assert "resuming statistics from checkpoint" in caplog.text
    for layer in (1, 2):
        torch.testing.assert_close(resumed[layer], full[layer], rtol=1e-10, atol=1e-12)
    assert not list((tmp_path / "run").rglob("checkpoint-*.safetensors"))  # removed when done


def test_checkpoint_saves_per_layer_and_a_save_cut_short_leaves_the_previous_one(make_tiny, tmp_path, monkeypatch):
    """One file per layer and save; a save killed after its first layer keeps the previous complete
    save readable (never a mix of two saves); a whole-pass file of the earlier layout is still read."""
    from safetensors.torch import save_file

    model = make_tiny("llama")
    plan = stats_mod.make_plan(model, [1, 2], n_samples=12, max_length=48, max_tokens=128)
    ck = stats_mod._Checkpoint(tmp_path, plan, (0, 1))
    first = {"1": torch.ones(3, 3, dtype=torch.float64), "2": 2 * torch.ones(3, 3, dtype=torch.float64)}
    ck.save(first, 10, 1)
    assert sorted(f.name.rsplit("-", 2)[1:] for f in (tmp_path / plan.model).iterdir()) == [
        ["1", "1.safetensors"], ["2", "1.safetensors"]]

    real = stats_mod.save_file
    calls = {"n": 0}

    def dies_on_the_second_layer(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(stats_mod, "save_file", dies_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        ck.save({k: 5 * v for k, v in first.items()}, 20, 2)
    monkeypatch.setattr(stats_mod, "save_file", real)
    sums, count, group = ck.load()
    assert (count, group) == (10, 1) and all(torch.equal(sums[k], first[k]) for k in first)

    ck.save({k: 7 * v for k, v in first.items()}, 30, 3)  # completes: older saves are removed
    assert {f.name.rsplit("-", 1)[1] for f in (tmp_path / plan.model).iterdir()} == {"3.safetensors"}
    ck.remove()
    assert not list((tmp_path / plan.model).iterdir())

    save_file({k: v for k, v in first.items()}, str(ck.path), metadata=dict(ck.meta, next_group="4", count="40"))
    sums, count, group = ck.load()
    assert (count, group) == (40, 4) and torch.equal(sums["2"], first["2"])
