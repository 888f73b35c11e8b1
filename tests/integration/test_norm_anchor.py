"""Norm-Anchor Scaling (``norm_anchor``): value vectors rescaled to a norm of the unedited model,
measured once on the first batch, kept for later batches and across a ledger; refused where it
cannot be measured or is not defined."""

from __future__ import annotations

import pytest
import torch

import lmedit
from helpers import OTHER, REQUESTS, assert_same, edit_kwargs, snapshot, spd_covariances, target_logprob
from lmedit.core.targets import anchor_norms, reference_norm
from lmedit.errors import HyperparameterError


def _editor(model, tok, method="encore", **kw):
    args = {**edit_kwargs("memit"), "mom2_update_weight": 1.0, "update_norm_lambda": 0.1, **kw}
    return lmedit.Editor(model, tok, method, covariances=spd_covariances(model, args["layers"]), **args)


def test_reference_norm_drops_the_largest_five_percent():
    values = torch.zeros(20, 3)
    values[:, 0] = torch.arange(1, 21, dtype=torch.float32)  # norms 1..20: the largest one (5 % of 20) dropped
    assert reference_norm(values) == pytest.approx(sum(range(1, 20)) / 19)
    assert reference_norm(values[:3]) == pytest.approx(2.0)  # too few rows to drop any


def test_value_is_the_mlp_output_asked_for_and_anchoring_moves_the_target_by_its_change(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    ed = _editor(model, tokenizer, method="memit")
    tr = ed.compute_targets(REQUESTS)
    # block anchor: z* = z0 + delta and v* = v0 + delta, so z* - v* = z0 - v0 (the residual before the MLP)
    assert tr.value is not None and tr.value.shape == tr.targets.shape
    assert not torch.allclose(tr.value, tr.targets)
    out = anchor_norms(tr, 2.5)
    assert torch.allclose(out.value.norm(dim=1), torch.full((len(REQUESTS),), 2.5), atol=1e-5)
    assert torch.allclose(out.targets - out.value, tr.targets - tr.value, atol=1e-5)
    again = anchor_norms(out, 2.5)  # idempotent
    assert torch.allclose(again.targets, out.targets, atol=1e-5)
    ed.save_targets(tr, tmp_path / "t.safetensors")  # value vectors travel with the targets file
    back = ed.load_targets(tmp_path / "t.safetensors")
    assert torch.equal(back.value, tr.value) and torch.equal(back.part(1, 2).value, tr.value[1:2])


def test_first_batch_measures_the_reference_and_later_batches_keep_it(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    ed = _editor(model, tokenizer, norm_anchor=True, ledger=tmp_path / "ledger", keep_history=False)
    raw = ed.compute_targets(REQUESTS)  # what the first edit optimises (the model is still unedited)
    lp0 = target_logprob(model, tokenizer, OTHER[0])
    r1 = ed.edit(REQUESTS)
    ref = reference_norm(raw.value)
    assert ed.hparams.norm_reference == pytest.approx(ref) and r1.hparams.norm_reference == pytest.approx(ref)
    assert torch.allclose(r1.targets.value.norm(dim=1), torch.full((len(REQUESTS),), ref), rtol=1e-4)
    r2 = ed.edit(OTHER)
    assert r2.hparams.norm_reference == pytest.approx(ref)
    assert torch.allclose(r2.targets.value.norm(dim=1), torch.full((1,), ref), rtol=1e-4)
    assert target_logprob(model, tokenizer, OTHER[0]) > lp0 + 1.0  # anchored edits still land
    weights = snapshot(model)
    again = fresh("llama")  # a restart: the ledger restores the reference with the weights
    loaded = lmedit.Editor.load(again, tokenizer, tmp_path / "ledger", covariances=spd_covariances(again, [1, 2]))
    assert_same(again, weights)
    assert loaded.hparams.norm_anchor and loaded.hparams.norm_reference == pytest.approx(ref)


def test_anchoring_cannot_begin_on_an_edited_model_without_a_reference(fresh, tokenizer):
    model = fresh("llama")
    ed = _editor(model, tokenizer)
    ed.edit(REQUESTS)
    before = snapshot(model)
    with pytest.raises(HyperparameterError, match="norm_reference"):
        ed.edit(OTHER, norm_anchor=True)
    assert_same(model, before)
    ed.edit(OTHER, norm_anchor=True, norm_reference=3.0)  # a reference given explicitly is used as is
    assert ed.history[-1].targets.value.norm(dim=1).sub(3.0).abs().max() < 1e-4
    assert ed.hparams.norm_reference == 0.0  # an override is for that edit only


def test_rome_measures_on_its_first_request_and_lands(fresh, tokenizer):
    model = fresh("llama")
    args = edit_kwargs("rome")
    ed = lmedit.Editor(model, tokenizer, "rome", covariances=spd_covariances(model, args["layers"]), **args,
                       norm_anchor=True)
    lp0 = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    r = ed.edit(REQUESTS)  # one request after another: the first, on the unedited model, sets the reference
    ref = ed.hparams.norm_reference
    assert ref > 0 and torch.allclose(r.targets.value.norm(dim=1), torch.full((len(REQUESTS),), ref), rtol=1e-4)
    assert all(target_logprob(model, tokenizer, q) > lp + 1.0 for q, lp in zip(REQUESTS, lp0))


def test_anchored_targets_are_not_reused_unanchored_and_old_files_are_refused(fresh, tokenizer, tmp_path):
    model = fresh("llama")
    ed = _editor(model, tokenizer, method="memit", keep_history=True)
    r = ed.edit(REQUESTS, norm_anchor=True)
    ed.undo()
    before = snapshot(model)
    with pytest.raises(HyperparameterError, match="rescaled by norm_anchor"):
        ed.edit(REQUESTS, targets=r.targets)
    assert_same(model, before)
    again = ed.edit(REQUESTS, targets=r.targets, norm_anchor=True, norm_reference=r.hparams.norm_reference)
    assert torch.allclose(again.targets.targets, r.targets.targets, atol=1e-5)
    ed.undo()
    tr = ed.compute_targets(REQUESTS)
    tr.value = None  # as a file written before value vectors were kept
    ed.save_targets(tr, tmp_path / "old.safetensors")
    old = ed.load_targets(tmp_path / "old.safetensors")
    assert old.value is None
    with pytest.raises(HyperparameterError, match="carry no value vectors"):
        ed.edit(REQUESTS, targets=old, norm_anchor=True, norm_reference=2.0)
    assert_same(model, before)


def test_blocks_with_a_post_mlp_norm_refuse_anchoring(fresh, tokenizer):
    model = fresh("gemma3_text")
    args = edit_kwargs("memit")
    ed = lmedit.Editor(model, tokenizer, "memit", covariances=spd_covariances(model, args["layers"]), **args)
    before = snapshot(model)
    with pytest.raises(HyperparameterError, match="normalises the MLP output"):
        ed.edit(REQUESTS, norm_anchor=True)
    assert_same(model, before)
