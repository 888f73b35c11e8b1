"""The Editor: state held explicitly (nothing on the model), independent Editors of one model,
weights states for target reuse, context checks, MPES and the lifelong state on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

import lmedit
from helpers import REQUESTS, OTHER, assert_same, edit_kwargs, snapshot, target_logprob
from lmedit.errors import HyperparameterError, LmeditError


def _editor(model, tok, covariances, method="emmet", **kw):
    args = {**edit_kwargs(method), **kw}
    return lmedit.Editor(model, tok, method, covariances=covariances(model, args["layers"]), **args)


def test_nothing_is_stored_on_the_model(fresh, tokenizer, covariances):
    model = fresh("llama")
    attrs = set(vars(model))
    ed = _editor(model, tokenizer, covariances)
    ed.edit(REQUESTS)
    assert set(vars(model)) == attrs
    twin = copy.deepcopy(model)  # a copy carries no lmedit state: a new Editor of it starts empty
    assert lmedit.Editor(twin, tokenizer, "emmet", covariances=covariances(twin, [1, 2]), layers=[1, 2]).history == []
    assert len(ed.history) == 1 and ed.history[0].state is lmedit.EditState.APPLIED


def test_undo_refused_after_another_editor_wrote_the_same_layers(fresh, tokenizer, covariances):
    model = fresh("llama")
    before = snapshot(model)
    a, b = _editor(model, tokenizer, covariances), _editor(model, tokenizer, covariances)
    ra = a.edit(REQUESTS)
    rb = b.edit(OTHER)
    with pytest.raises(LmeditError, match=r"layer\(s\) \[1, 2\] were changed after this edit"):
        ra.undo()
    rb.undo()  # newest first works, and then the older edit can go too
    ra.undo()
    assert_same(model, before)
    assert ra.state is rb.state is lmedit.EditState.UNDONE
    with pytest.raises(LmeditError, match="already undone"):
        ra.undo()


def test_weights_state_follows_edits_undos_and_outside_writes(fresh, tokenizer, covariances):
    model = fresh("llama")
    ed = _editor(model, tokenizer, covariances)
    s0 = ed.weights_state()
    res = ed.edit(REQUESTS)
    s1 = ed.weights_state()
    assert s1 != s0
    ed.undo()
    assert ed.weights_state() == s0  # an exact undo returns to the earlier state
    with torch.no_grad():
        lmedit.get_adapter(model).edit_module(model, 3).weight.mul_(1.0)  # a write outside the Editor
    assert ed.weights_state() not in (s0, s1)
    with pytest.raises(HyperparameterError, match="weights as they were then"):
        ed.edit(REQUESTS, targets=res.targets)


def test_targets_reused_within_an_editor_give_the_same_edit(fresh, tokenizer, covariances, monkeypatch):
    model = fresh("llama")
    ed = _editor(model, tokenizer, covariances, method="memit")
    first = ed.edit(REQUESTS)
    ed.undo()
    import lmedit.editor as editor_module

    monkeypatch.setattr(editor_module, "compute_targets", lambda *a, **k: pytest.fail("targets optimised again"))
    again = ed.edit(REQUESTS, targets=first.targets)
    for l in first.layers:
        assert torch.allclose(again.deltas[l], first.deltas[l], atol=1e-6)
    other = _editor(model, tokenizer, covariances, method="memit")
    ed.undo()
    with pytest.raises(HyperparameterError, match="another Editor"):
        other.edit(REQUESTS, targets=first.targets)


@pytest.mark.parametrize("context,match", [
    ([["The {}"]], "first group must be"),
    ([["{}"], ["no placeholder"]], "exactly one"),
])
def test_context_must_start_with_the_bare_prompt(fresh, tokenizer, covariances, context, match):
    model = fresh("llama")
    with pytest.raises(HyperparameterError, match=match):
        _editor(model, tokenizer, covariances, context=context)


def test_most_probable_stop_is_no_later_and_only_at_the_argmax(fresh, tokenizer, covariances):
    """MPES stops each request no later than the loss stop, and only once target_new is the argmax."""
    model = fresh("llama")
    kw = dict(v_num_grad_steps=25, early_stop_loss=1e-4)  # a loss stop that is hard to reach
    loss_stop = _editor(model, tokenizer, covariances, **kw).edit(REQUESTS)
    loss_stop.undo()
    ed = _editor(model, tokenizer, covariances, early_stop="most_probable", mpes_extra_steps=1, **kw)
    mpes = ed.edit(REQUESTS)
    assert (mpes.targets.steps <= loss_stop.targets.steps).all()
    assert (mpes.targets.steps < loss_stop.targets.steps).any()  # it can stop earlier
    for r in REQUESTS:  # target_new is now the greedy continuation of every rewrite prompt
        ids = tokenizer(r.text)["input_ids"]
        with torch.no_grad():
            nxt = model(torch.tensor([ids])).logits[0, -1].argmax()
        assert int(nxt) == tokenizer(" " + r.target_new)["input_ids"][0]


@pytest.mark.parametrize("method", ["encore", "alphaedit", "memit"])
def test_lifelong_state_accumulates_and_undoes(fresh, tokenizer, covariances, method):
    model = fresh("llama")
    extra = {"preserve_edits": True} if method == "memit" else {}
    if method == "encore":
        # MEMIT's small lambda of the battery, and a small mu: the reference's values are for a real model's C
        extra.update(mom2_update_weight=1.0, update_norm_lambda=0.1)
    if method == "alphaedit":
        extra["nullspace_energy"] = 0.3  # random SPD C: a wide null space so edits can land
    ed = _editor(model, tokenizer, covariances, method=method, **extra)
    lp0 = target_logprob(model, tokenizer, OTHER[0])
    r1 = ed.edit(REQUESTS)
    assert ed.n_earlier == 2 and set(ed.earlier) == {1, 2}
    for l in (1, 2):
        K = r1.keys[l].double()
        assert torch.allclose(ed.earlier[l], K.T @ K)
    ed.edit(OTHER)
    assert ed.n_earlier == 3
    assert target_logprob(model, tokenizer, OTHER[0]) > lp0 + 1.0
    ed.undo()
    assert ed.n_earlier == 2
    assert torch.allclose(ed.earlier[1], r1.keys[1].double().T @ r1.keys[1].double(), atol=1e-9)


@pytest.mark.parametrize("refresh", [False, True])
def test_a_failed_edit_leaves_the_lifelong_state(fresh, tokenizer, covariances, monkeypatch, refresh):
    model = fresh("llama")
    ed = _editor(model, tokenizer, covariances, method="encore", refresh_earlier_keys=refresh)
    ed.edit(REQUESTS)
    state = {l: e.clone() for l, e in ed.earlier.items()}
    import lmedit.core.distribute as distribute

    calls = {"n": 0}
    real = distribute.collect_keys

    def fail_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distribute, "collect_keys", fail_second)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(OTHER)
    assert ed.n_earlier == 2 and all(torch.equal(ed.earlier[l], state[l]) for l in state)
    assert [f.subject for f in ed.earlier_facts] == [r.subject for r in REQUESTS]


def _encore(fresh, tokenizer, covariances):
    model = fresh("llama")
    return model, _editor(model, tokenizer, covariances, method="encore", mom2_update_weight=1.0, update_norm_lambda=0.1)


def _protected_change(result, fact) -> dict[int, float]:
    """Per layer ||dW k|| / (||dW|| ||k||) for the key of ``fact`` (read on the unedited model)."""
    return {l: float((dW.double() @ k.double()).norm() / (dW.double().norm() * k.double().norm()))
            for l, dW in result.applied.deltas.items()
            for k in [fact[l][0]]}


def test_protected_facts_are_kept_by_later_edits(fresh, tokenizer, covariances):
    """A protected fact's key joins the preserved sum (weight * k k^T) and a later edit hardly moves
    its output any more, where the same edit without protection does."""
    from lmedit.core.keys import collect_keys

    model, ed = _encore(fresh, tokenizer, covariances)
    keys = collect_keys(model, tokenizer, ed.adapter, OTHER, ed.template_groups(), ed.hparams.layers)
    plain = ed.edit(REQUESTS)
    free = _protected_change(plain, keys)
    ed.undo()
    assert not any(e.abs().max() > 1e-6 for e in ed.earlier.values())
    assert ed.protect([{"prompt": OTHER[0].prompt, "subject": OTHER[0].subject}], weight=1e4) == 1
    for l in ed.hparams.layers:
        k = keys[l].double()
        assert torch.allclose(ed.earlier[l], 1e4 * k.T @ k)
    kept = _protected_change(ed.edit(REQUESTS), keys)
    for l in ed.hparams.layers:
        assert kept[l] < free[l] / 10, (l, kept[l], free[l])


def test_protect_refuses_bad_facts_and_methods_without_preserved_keys(fresh, tokenizer, covariances):
    from lmedit.errors import RequestError

    model, ed = _encore(fresh, tokenizer, covariances)
    with pytest.raises(RequestError, match="fact 1 needs a 'prompt' template"):
        ed.protect([OTHER[0], {"prompt": "no slot", "subject": "x"}])
    with pytest.raises(RequestError, match="fact 0 needs a non-empty 'subject'"):
        ed.protect([{"prompt": "{} is", "subject": " "}])
    with pytest.raises(HyperparameterError, match="weight must be a positive"):
        ed.protect(OTHER, weight=0)
    with pytest.raises(HyperparameterError, match="weight must be a positive"):
        ed.protect(OTHER, weight=float("nan"))
    assert ed.n_protected == 0 and not ed.earlier
    with pytest.raises(HyperparameterError, match="preserve_edits=True"):
        _editor(model, tokenizer, covariances, method="emmet").protect(OTHER)


def test_refreshed_earlier_keys_are_read_on_the_current_weights(fresh, tokenizer, covariances):
    """With refresh_earlier_keys the preserved sum is rebuilt before each batch from the earlier facts'
    keys read on the weights as they are then. At the lowest edited layer those keys cannot move (no
    edited weight lies before them); one layer up, a later batch's write below has moved them away
    from the keys stored when they were edited, and the sum follows the moved keys."""
    from lmedit.core.keys import collect_keys

    def three_batches(refresh):
        model = fresh("llama")
        ed = _editor(model, tokenizer, covariances, method="encore", mom2_update_weight=1.0, update_norm_lambda=0.1,
                     refresh_earlier_keys=refresh)
        ed.protect(OTHER, weight=3.0)
        r1 = ed.edit(REQUESTS[:1])
        ed.edit(REQUESTS[1:])
        now = collect_keys(model, tokenizer, ed.adapter, REQUESTS + OTHER, ed.template_groups(), [1, 2])
        before = {l: e.clone() for l, e in ed.earlier.items()}
        return ed, r1, now, before, ed.edit(OTHER)

    ed, r1, now, before, r3 = three_batches(True)
    assert ed.n_earlier == 3 and [f.subject for f in ed.earlier_facts] == [r.subject for r in REQUESTS + OTHER]
    w = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)[:, None]  # the two edits, then the protected fact
    for l in (1, 2):
        k, k3 = now[l].double(), r3.keys[l].double()
        assert torch.allclose(ed.earlier[l], (w * k).T @ k + k3.T @ k3, rtol=1e-5, atol=1e-8)
    assert torch.allclose(now[1][0], r1.keys[1][0], rtol=1e-5, atol=1e-6)
    moved = float((now[2][0] - r1.keys[2][0]).norm() / r1.keys[2][0].norm())
    assert moved > 1e-3, moved
    stale = three_batches(False)[4]  # the same edits preserving the keys as stored: another update
    assert not torch.allclose(stale.deltas[2], r3.deltas[2], rtol=1e-3, atol=1e-6)
    ed.undo()  # the edit's own keys leave the sum; the earlier facts' stay as refreshed before it
    assert [f.subject for f in ed.earlier_facts] == [r.subject for r in REQUESTS]
    for l in (1, 2):
        k = now[l].double()
        assert torch.allclose(ed.earlier[l], (w * k).T @ k, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(ed.earlier[2], before[2], rtol=1e-4)  # not the sum before the edit: it was refreshed


@pytest.mark.parametrize("setting,match", [
    ({"method": "memit", "refresh_earlier_keys": True}, "refresh_earlier_keys.*preserve_edits=True"),
    ({"method": "memit", "preserve_weight": 2.0}, "preserve_weight.*preserve_edits=True"),
    ({"method": "encore", "preserve_weight": float("inf")}, "preserve_weight.*finite"),
])
def test_refresh_and_weight_need_preserved_keys(fresh, tokenizer, covariances, setting, match):
    with pytest.raises(HyperparameterError, match=match):
        _editor(fresh("llama"), tokenizer, covariances, **setting)


def test_preserve_weight_scales_earlier_keys_and_keeps_their_outputs_closer(fresh, tokenizer, covariances):
    """preserve_weight w puts w k k^T of each edit into the preserved sum (undo takes it out again),
    and a later batch then moves the earlier edit's outputs less than with w = 1."""
    def run(w):
        model = fresh("llama")
        ed = _editor(model, tokenizer, covariances, method="encore", mom2_update_weight=1.0, update_norm_lambda=0.1,
                     preserve_weight=w)
        r1 = ed.edit(REQUESTS)
        return ed, r1, ed.edit(OTHER)

    ed, r1, r2 = run(4.0)
    for l in (1, 2):
        k1, k2 = r1.keys[l].double(), r2.keys[l].double()
        assert torch.allclose(ed.earlier[l], 4.0 * (k1.T @ k1 + k2.T @ k2))
    moved = {w: float(sum((r.deltas[l].double() @ first.keys[l].double().T).norm() for l in (1, 2)))
             for w, (_, first, r) in {1.0: run(1.0), 4.0: (ed, r1, r2)}.items()}
    assert moved[4.0] < 0.8 * moved[1.0], moved
    ed.undo()
    for l in (1, 2):
        k1 = r1.keys[l].double()
        assert torch.allclose(ed.earlier[l], 4.0 * (k1.T @ k1), atol=1e-8)
