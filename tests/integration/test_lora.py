"""LoRA export: a peft adapter that peft loads onto a fresh base model and that reproduces the
edited weights (to float32 rounding when the rank is at most the batch size), truncation whose
reported error is the real one, ledgers exported whole, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from helpers import ARCHS, OTHER, REQUESTS, edit_kwargs, spd_covariances
from lmedit.errors import HyperparameterError, LmeditError
from lmedit.lora import factorize

peft = pytest.importorskip("peft")


def _edit(model, tok, method="memit", batches=(REQUESTS,), **kw):
    args = edit_kwargs(method)
    ed = lmedit.Editor(model, tok, method, covariances=spd_covariances(model, args["layers"]), **args, **kw)
    return ed, [ed.edit(list(b)) for b in batches]


def _merged(base, path):
    """The weights peft gives when the adapter at ``path`` is loaded onto ``base`` and merged."""
    return peft.PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_round_trip_reproduces_the_edited_weights(arch, fresh, tokenizer, tmp_path):
    model = fresh(arch)
    ed, (res,) = _edit(model, tokenizer)
    report = res.save_lora(tmp_path / "lora")
    assert all(l.rank <= len(REQUESTS) and l.rel_error < 1e-6 for l in report.layers)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(l.module for l in report.layers)
    assert all(cfg["alpha_pattern"][m] == r for m, r in cfg["rank_pattern"].items())  # scale 1 everywhere
    merged = _merged(fresh(arch), tmp_path / "lora")
    adapter = lmedit.get_adapter(model)
    for layer in res.layers:
        want, got = adapter.weight(model, layer), adapter.weight(merged, layer)
        assert _close(got - adapter.weight(fresh(arch), layer), res.deltas[layer]) < 1e-5
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    untouched = adapter.weight(merged, 0), adapter.weight(fresh(arch), 0)
    assert torch.equal(*untouched)


def test_unmerged_adapter_gives_the_edited_model_outputs(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    _, (res,) = _edit(model, tokenizer)
    res.save_lora(tmp_path / "lora")
    served = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "lora"))
    ids = tokenizer([r.text for r in REQUESTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**ids).logits
        b = served(**ids).logits
        base = fresh("llama")(**ids).logits
    assert (a - base).abs().max() > 1e-2  # the edit shows in the outputs ...
    assert torch.allclose(a, b, atol=1e-4)  # ... and the adapter reproduces it


def test_accumulated_edits_truncate_with_the_reported_error(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    ed, results = _edit(model, tokenizer, batches=(REQUESTS[:1], REQUESTS[1:], OTHER))
    total = ed.total_deltas()
    full = ed.save_lora(tmp_path / "full")
    assert all(l.rank == l.full_rank <= len(REQUESTS) + len(OTHER) for l in full.layers)
    cut = ed.save_lora(tmp_path / "cut", rank=1)
    assert all(l.rank == 1 and l.full_rank > 1 for l in cut.layers)
    merged = _merged(fresh("llama"), tmp_path / "cut")
    adapter = lmedit.get_adapter(model)
    base = fresh("llama")
    for l in cut.layers:
        err = _close(adapter.weight(merged, l.layer) - adapter.weight(base, l.layer), total[l.layer])
        assert err == pytest.approx(l.rel_error, rel=1e-3, abs=1e-6) and 0.0 < err < 1.0
    budget = ed.save_lora(tmp_path / "budget", max_error=0.2)
    assert all(l.rel_error <= 0.2 for l in budget.layers)
    assert sum(l.rank for l in budget.layers) <= sum(l.rank for l in full.layers)


def test_ledger_exports_every_batch(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    ed, _ = _edit(model, tokenizer, "encore", batches=(REQUESTS, OTHER), ledger=tmp_path / "ledger", keep_history=False)
    reopened = lmedit.Editor.load(fresh("llama"), tokenizer, tmp_path / "ledger",
                                  covariances=spd_covariances(model, [1, 2]))
    reopened.save_lora(tmp_path / "lora")
    merged = _merged(fresh("llama"), tmp_path / "lora")
    adapter = lmedit.get_adapter(model)
    for layer in (1, 2):
        want = adapter.weight(model, layer)
        assert torch.allclose(adapter.weight(merged, layer), want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_refusals(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    ed, _ = _edit(model, tokenizer, keep_history=False)
    with pytest.raises(LmeditError, match="keep_history=False"):
        ed.save_lora(tmp_path / "x")
    with pytest.raises(LmeditError, match="no edit"):
        lmedit.Editor(fresh("llama"), tokenizer, "memit", covariances=spd_covariances(model, [1, 2]),
                      **edit_kwargs("memit")).save_lora(tmp_path / "y")
    with pytest.raises(HyperparameterError, match="rank"):
        factorize(torch.ones(3, 4), rank=0)
    with pytest.raises(HyperparameterError, match="max_error"):
        factorize(torch.ones(3, 4), max_error=1.5)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_factorize_is_exact_for_low_rank_and_balanced():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 3, generator=g) @ torch.randn(3, 70, generator=g)
    B, A, full, err = factorize(d)
    assert full == 3 and B.shape == (40, 3) and A.shape == (3, 70) and err < 1e-7
    assert torch.allclose(B @ A, d, atol=1e-5)
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-4)  # U sqrt(S) and sqrt(S) V^T
    B, A, full, err = factorize(torch.zeros(5, 6))
    assert full == 0 and B.shape == (5, 0)
