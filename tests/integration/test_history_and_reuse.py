"""Edits without undo history (flat memory for long sequential runs) and reuse of target vectors
(sweeping the preservation weight or ridge without re-optimising), on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.core import targets as targets_mod
from lmedit.core.weights import weights_version
from lmedit.errors import HyperparameterError, LmeditError

from helpers import OTHER, REQUESTS, assert_same, changed, edit_kwargs, edited_names, snapshot


def test_keep_history_false_gives_the_same_weights_and_keeps_no_copies(fresh, tokenizer, covariances, tmp_path):
    a = fresh("llama")
    b = fresh("llama")
    C = covariances(a, [1, 2])
    before = snapshot(a)
    ra = lmedit.edit(a, tokenizer, REQUESTS, method="emmet", covariances=C, **edit_kwargs("emmet"))
    rb = lmedit.edit(b, tokenizer, REQUESTS, method="emmet", covariances=C, keep_history=False, **edit_kwargs("emmet"))
    for name in edited_names(a, "emmet"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert lmedit.history(a) == [ra] and lmedit.history(b) == []
    assert rb.applied.originals == {} and set(rb.deltas) == {1, 2}
    with pytest.raises(LmeditError, match="keep_history=False"):
        rb.undo()
    # the deltas are still there to save, and re-apply bit-exactly onto an unedited model
    twin = fresh("llama")
    lmedit.apply_deltas(twin, rb.save_deltas(tmp_path / "d.safetensors"))
    assert changed(twin, snapshot(b)) == set()
    # the ordinary edit still undoes exactly
    ra.undo()
    assert_same(a, before)


def test_history_less_edit_seals_the_edits_beneath_it(fresh, tokenizer, covariances, caplog):
    m = fresh("llama")
    C = covariances(m, [1, 2])
    first = lmedit.edit(m, tokenizer, REQUESTS, method="memit", covariances=C, **edit_kwargs("memit"))
    after_first = snapshot(m)
    with caplog.at_level("WARNING"):
        lmedit.edit(m, tokenizer, OTHER, method="memit", covariances=C, keep_history=False, **edit_kwargs("memit"))
    assert "can no longer be undone" in caplog.text
    assert lmedit.history(m) == []
    with pytest.raises(LmeditError, match="later edit was made with keep_history=False"):
        first.undo()  # it would silently drop the later edit too
    assert changed(m, after_first) == edited_names(m, "memit")  # nothing was restored by the refused undo


def test_weights_version_returns_after_exact_undo(fresh, tokenizer, covariances):
    m = fresh("llama")
    C = covariances(m, [1, 2])
    v0 = weights_version(m)
    r1 = lmedit.edit(m, tokenizer, REQUESTS, method="emmet", covariances=C, **edit_kwargs("emmet"))
    v1 = weights_version(m)
    r2 = lmedit.edit(m, tokenizer, OTHER, method="emmet", covariances=C, **edit_kwargs("emmet"))
    assert len({v0, v1, weights_version(m)}) == 3
    r2.undo()
    assert weights_version(m) == v1
    r1.undo()
    assert weights_version(m) == v0


def test_reused_targets_give_the_edit_of_fresh_targets(fresh, tokenizer, covariances, monkeypatch):
    m = fresh("llama")
    twin = fresh("llama")
    C = covariances(m, [1, 2])
    kw = edit_kwargs("memit")
    res = lmedit.edit(m, tokenizer, REQUESTS, method="memit", covariances=C, **kw)
    res.undo()
    # a different preservation weight with the same targets: no optimisation runs ...
    monkeypatch.setattr(targets_mod, "_optimise_chunk", lambda *a, **k: pytest.fail("targets were recomputed"))
    reused = lmedit.edit(m, tokenizer, REQUESTS, method="memit", covariances=C, targets=res.targets,
                         **dict(kw, mom2_update_weight=5.0))
    monkeypatch.undo()
    # ... and the weights equal those of an edit that optimised its own targets
    direct = lmedit.edit(twin, tokenizer, REQUESTS, method="memit", covariances=C, **dict(kw, mom2_update_weight=5.0))
    torch.testing.assert_close(reused.targets.targets, direct.targets.targets)
    for l in reused.layers:
        torch.testing.assert_close(reused.deltas[l], direct.deltas[l], rtol=1e-5, atol=1e-6)
    # the same targets also serve EMMET (same target layer and settings): the edit equals an EMMET
    # edit that optimised its own targets
    reused.undo()
    direct.undo()
    emmet_reused = lmedit.edit(m, tokenizer, REQUESTS, method="emmet", covariances=C, targets=res.targets,
                               **edit_kwargs("emmet"))
    emmet_direct = lmedit.edit(twin, tokenizer, REQUESTS, method="emmet", covariances=C, **edit_kwargs("emmet"))
    assert emmet_reused.layers == emmet_direct.layers == [1, 2]
    for l in emmet_reused.layers:
        assert float(emmet_reused.deltas[l].norm()) > 0
        torch.testing.assert_close(emmet_reused.deltas[l], emmet_direct.deltas[l], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("other_requests", "other requests"),
    ("model_changed", "weights as they were"),
    ("other_settings", "other target-optimisation settings"),
    ("other_layer", "another target layer"),
    ("other_model", "another model object"),
    ("rome", "sequential method"),
    ("not_targets", "earlier EditResult"),
])
def test_reused_targets_are_refused_when_they_do_not_fit(case, match, fresh, tokenizer, covariances):
    m = fresh("llama")
    C = covariances(m, [1, 2, 3])
    kw = edit_kwargs("memit")
    res = lmedit.edit(m, tokenizer, REQUESTS, method="memit", covariances=C, **kw)
    tr = res.targets
    reqs, model, method = REQUESTS, m, "memit"
    if case != "model_changed":
        res.undo()
    if case == "other_requests":
        reqs = REQUESTS[:1]
    elif case == "other_settings":
        kw = dict(kw, v_lr=0.1)
    elif case == "other_layer":
        kw = dict(kw, layers=[1, 3])
    elif case == "other_model":
        model = fresh("llama")
    elif case == "rome":
        method, kw = "rome", edit_kwargs("rome")
    elif case == "not_targets":
        tr = tr.targets
    before = snapshot(model)
    with pytest.raises(HyperparameterError, match=match):
        lmedit.edit(model, tokenizer, reqs, method=method, covariances=C, targets=tr, **kw)
    assert_same(model, before)
