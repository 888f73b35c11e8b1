"""The common battery: every method x every tiny architecture.

For each pair: the target probability rises, only the edited weights change, no hook is left,
undo is bit-exact, deltas round-trip through a file bit-exactly and refuse another model, a
failure half-way leaves every weight untouched, and edits undo in reverse order only.

Prompts end with the subject, so the target token is predicted at the position where the edit
acts: in a random 4-block model, information moved from an earlier token through one or two
random attention layers is too weak to show an edit reliably.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lmedit
from lmedit.core import solvers
from lmedit.errors import CacheError, LmeditError, SolveError
from lmedit.hooks import count_hooks

from helpers import (
    ARCHS, METHODS, OTHER, REQUESTS, assert_same, changed, edit_kwargs, edited_names, layers_for, rose, snapshot,
    spd_covariances, target_logprob,
)


# --- the battery: one edit per (method, arch), one test per property -------------------------------

@pytest.fixture(scope="module", params=[(m, a) for m in METHODS for a in ARCHS], ids=lambda p: f"{p[0]}-{p[1]}")
def edited(request, fresh, tokenizer, tmp_path_factory):
    """One edit per (method, arch) for the property tests below, with what they need recorded at
    edit time (so the tests do not depend on one another's order; only the undo test changes the
    model, and no other test reads its live weights)."""
    method, arch = request.param
    model = fresh(arch)
    before = snapshot(model)
    lp0 = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    editor = lmedit.Editor(model, tokenizer, method, covariances=spd_covariances(model, layers_for(method)),
                           **edit_kwargs(method))
    res = editor.edit(REQUESTS)
    hooks_after_edit = count_hooks(model)
    lp1 = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    path = res.save_deltas(tmp_path_factory.mktemp(f"{method}-{arch}") / "edit.safetensors")
    return SimpleNamespace(method=method, arch=arch, model=model, tok=tokenizer, res=res, editor=editor, before=before,
                           edited=snapshot(model), history=list(editor.history), hooks=hooks_after_edit,
                           lp0=lp0, lp1=lp1, path=path)


def test_target_probability_rises(edited):
    # by 100x or to > 0.5 for each request, to > 0.3 on average
    for r, a, b in zip(REQUESTS, edited.lp0, edited.lp1):
        assert rose(a, b), f"{r.subject}: log P(target) {a:.2f} -> {b:.2f}"
    if edited.arch == "gemma3_text":
        # A norm after each MLP bounds what one layer's output can add to the residual stream; in a
        # random 4-block model 12 steps do not reach the thresholds below (the edit must still raise
        # the target 100x, above). Real Gemma 3 numbers: results/gemma_postnorm (ROME ES 100).
        return
    assert sum(math.exp(b) for b in edited.lp1) / len(edited.lp1) > 0.3, edited.lp1
    # ... and the optimised targets were reached by the target optimisation itself
    assert (edited.res.targets.target_prob > 0.5).all(), edited.res.targets.target_prob


def test_only_the_edited_weights_change_by_the_recorded_deltas(edited):
    res, model = edited.res, edited.model
    assert res.method == edited.method and res.layers == layers_for(edited.method)
    assert edited.history == [res]
    assert {k for k, v in edited.edited.items() if not torch.equal(v, edited.before[k])} == \
        edited_names(model, edited.method)
    adapter = lmedit.get_adapter(model)
    for l in res.layers:
        name = adapter.edit_param_name(l)
        W0, W1 = edited.before[name], edited.edited[name]
        if adapter.layout != "out_in":
            W0, W1 = W0.T, W1.T  # (d_out, d_in)
        dW = W1 - W0
        assert float(dW.norm()) > 0
        torch.testing.assert_close(dW, res.deltas[l], rtol=1e-4, atol=1e-5)


def test_no_hook_is_left(edited):
    assert edited.hooks == 0


def test_deltas_round_trip_bit_exactly(edited, fresh):
    """The delta file applied onto an identical fresh model gives the edited weights bit for bit."""
    twin = fresh(edited.arch)
    applied = lmedit.apply_deltas(twin, edited.path)
    assert applied.layers == edited.res.layers and applied.method == edited.method
    assert [r.to_dict() for r in applied.requests] == [r.to_dict() for r in REQUESTS]
    for name in edited_names(twin, edited.method):
        assert torch.equal(twin.state_dict()[name], edited.edited[name]), f"{name} differs after apply_deltas"
    assert changed(twin, edited.edited) == set()
    applied.undo()
    assert_same(twin, edited.before)


def test_deltas_refuse_another_model(edited, fresh):
    other = fresh(edited.arch, seed=1)
    other_before = snapshot(other)
    with pytest.raises(CacheError, match="refusing"):
        lmedit.apply_deltas(other, edited.path)
    assert_same(other, other_before)


def test_undo_is_bit_exact(edited):
    model, res = edited.model, edited.res
    res.undo()
    assert_same(model, edited.before)
    assert edited.editor.history == []
    assert [target_logprob(model, edited.tok, r) for r in REQUESTS] == edited.lp0
    with pytest.raises(LmeditError, match="already undone"):
        res.undo()
    assert count_hooks(model) == 0


class _FailOnCall:
    """Wraps a function; raises ``exc`` on call number ``n`` (1-based), passes through otherwise."""

    def __init__(self, fn, n: int, exc: BaseException):
        self.fn, self.n, self.exc, self.calls = fn, n, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise self.exc
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("exc", [SolveError("injected"), KeyboardInterrupt()], ids=["SolveError", "KeyboardInterrupt"])
def test_failure_half_way_changes_nothing(method, arch, exc, fresh, tokenizer, covariances, monkeypatch):
    """The 2nd solve fails (2nd layer for MEMIT/EMMET, 2nd request for ROME) after the 1st was written."""
    model = fresh(arch)
    C = covariances(model, layers_for(method))
    before = snapshot(model)
    name = "memit" if method == "memit" else "emmet"  # ROME is EMMET with one key
    spy = _FailOnCall(getattr(solvers, name), 2, exc)
    monkeypatch.setattr(solvers, name, spy)
    editor = lmedit.Editor(model, tokenizer, method, covariances=C, **edit_kwargs(method) | dict(v_num_grad_steps=2))
    with pytest.raises(type(exc)):
        editor.edit(REQUESTS)
    assert spy.calls == 2  # the first update had been applied when the failure came
    assert_same(model, before)
    assert count_hooks(model) == 0
    assert editor.history == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_interrupt_inside_a_traced_forward_pass_changes_nothing(arch, fresh, tokenizer, covariances,
                                                                 monkeypatch):
    """KeyboardInterrupt raised by the model while lmedit's hooks are on it, after layer 1 was written."""
    import lmedit.core.distribute as distribute

    model = fresh(arch)
    C = covariances(model, [1, 2])
    before = snapshot(model)
    real = distribute.collect_keys
    calls = []

    def collect_keys(model_, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real(model_, *args, **kwargs)
        # the second pass starts at the state kept below layer 2 (PromptStates): block 2 is entered
        block2 = lmedit.get_adapter(model_).block(model_, 2)

        def boom(*_):
            assert count_hooks(model_) > 1  # lmedit's Trace is on the model now
            raise KeyboardInterrupt

        h = block2.register_forward_pre_hook(boom)
        try:
            return real(model_, *args, **kwargs)
        finally:
            h.remove()

    monkeypatch.setattr(distribute, "collect_keys", collect_keys)
    with pytest.raises(KeyboardInterrupt):
        lmedit.edit(model, tokenizer, REQUESTS, method="emmet", covariances=C, **edit_kwargs("emmet"))
    assert len(calls) == 2
    assert_same(model, before)
    assert count_hooks(model) == 0


@pytest.mark.parametrize("method", ["emmet", "memit"])
def test_singular_covariance_on_the_second_layer_changes_nothing(method, fresh, tokenizer, covariances):
    """A real (not injected) failure: C = 0 at layer 2 makes the layer-2 system singular."""
    model = fresh("llama")
    C = covariances(model, [1, 2])
    C[2] = torch.zeros_like(C[2])
    before = snapshot(model)
    editor = lmedit.Editor(model, tokenizer, method, covariances=C, **edit_kwargs(method))
    with pytest.raises(SolveError, match="not positive definite"):
        editor.edit(REQUESTS)
    assert_same(model, before)
    assert count_hooks(model) == 0 and editor.history == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_edits_undo_in_reverse_order_only(method, arch, fresh, tokenizer, covariances):
    model = fresh(arch)
    C = covariances(model, layers_for(method))
    before = snapshot(model)
    editor = lmedit.Editor(model, tokenizer, method, covariances=C, **edit_kwargs(method) | dict(v_num_grad_steps=4))
    first = editor.edit(REQUESTS)
    after_first = snapshot(model)
    second = editor.edit(OTHER)
    assert editor.history == [first, second]
    assert changed(model, after_first) == edited_names(model, method)
    with pytest.raises(LmeditError, match="later edit"):
        first.undo()
    assert editor.history == [first, second]  # the refused undo changed nothing
    second.undo()
    assert_same(model, after_first)
    first.undo()
    assert_same(model, before)
    assert editor.history == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emmet_in_each_dtype(dtype, fresh, tokenizer, covariances, tmp_path):
    model = fresh("llama", dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    C = covariances(model, [1, 2])
    before = snapshot(model)
    lp0 = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    res = lmedit.edit(model, tokenizer, REQUESTS, method="emmet", covariances=C, **edit_kwargs("emmet"))
    lp1 = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    for a, b in zip(lp0, lp1):
        assert rose(a, b), (dtype, lp0, lp1)
    assert changed(model, before) == edited_names(model, "emmet")
    for name in edited_names(model, "emmet"):
        assert model.state_dict()[name].dtype == dtype
    assert all(d.dtype == torch.float32 for d in res.deltas.values())
    path = res.save_deltas(tmp_path / "d.safetensors")
    edited = snapshot(model)
    res.undo()
    assert_same(model, before)
    twin = fresh("llama", dtype=dtype)
    lmedit.apply_deltas(twin, path)
    assert_same(twin, edited)
