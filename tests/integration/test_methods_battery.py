"""The common battery: every method x every tiny architecture.

For each pair: the target probability rises, only the edited weights change, no hook is left,
undo is bit-exact, deltas round-trip through a file bit-exactly and refuse another model, a
failure half-way leaves every weight untouched, and edits undo in reverse order only.

Prompts end with the subject, so the target token is predicted at the position where the edit
acts: in a random 4-block model, information moved from an earlier token through one or two
random attention layers is too weak to show an edit reliably.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lmedit
from lmedit.core import solvers
from lmedit.errors import CacheError, LmeditError, SolveError
from lmedit.hooks import count_hooks

METHODS = ("rome", "memit", "emmet")
ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")
REQUESTS = [
    lmedit.EditRequest("The capital city of the country is {}", "Xanadu", "Paris", "Rome"),
    lmedit.EditRequest("The sport played best by {}", "Lionel Messi", "piano", "football"),
]
OTHER = [lmedit.EditRequest("The most famous painter is {}", "Leonardo", "Berlin", "Vinci")]


def layers_for(method: str) -> list[int]:
    return [2] if method == "rome" else [1, 2]


def edit_kwargs(method: str) -> dict:
    """A strong edit for a random model: 12 Adam steps, ||delta|| up to 4 ||init||, small lambda for MEMIT."""
    kw = dict(layers=layers_for(method), v_num_grad_steps=12, v_lr=0.5, clamp_norm_factor=4.0,
              context_templates=[[5, 2]])
    if method == "memit":
        kw["mom2_update_weight"] = 1.0  # MEMIT's GPT-J lambda (15000) barely moves a random model
    return kw


@pytest.fixture(scope="module")
def pristine(tokenizer):
    """Built models by (arch, seed, dtype), filled on first use; tests edit deep copies."""
    return {}


def fresh(make_tiny, arch: str, cache: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    key = (arch, seed, dtype)
    if key not in cache:
        cache[key] = make_tiny(arch, seed=seed, dtype=dtype)
    return copy.deepcopy(cache[key])


def target_logprob(model, tok, req: lmedit.EditRequest) -> float:
    """log P(target_new tokens | prompt) from one plain forward pass."""
    prompt = tok(req.text)["input_ids"]
    full = tok(req.text + " " + req.target_new)["input_ids"]
    assert full[: len(prompt)] == prompt
    target = torch.tensor(full[len(prompt):])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
    cols = torch.arange(len(prompt) - 1, len(full) - 1)
    return float(lp[cols, target].sum())


def rose(before: float, after: float) -> bool:
    """A substantial rise of log P(target): 100x, or to above 0.5 (when it started above 0.005)."""
    return after > before + 1.0 and (after > before + math.log(100) or after > math.log(0.5))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    diff = changed(model, before)
    assert not diff, f"parameters changed: {sorted(diff)}"


def edited_names(model, method: str) -> set[str]:
    adapter = lmedit.get_adapter(model)
    return {adapter.edit_param_name(l) for l in layers_for(method)}


# --- the battery -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_edit_undo_and_deltas(method, arch, make_tiny, tokenizer, covariances, pristine, tmp_path):
    model = fresh(make_tiny, arch, pristine)
    C = covariances(model, layers_for(method))
    before = snapshot(model)
    lp0 = [target_logprob(model, tokenizer, r) for r in REQUESTS]

    res = lmedit.edit(model, tokenizer, REQUESTS, method=method, covariances=C, **edit_kwargs(method))

    assert count_hooks(model) == 0
    assert res.method == method and res.layers == layers_for(method)
    assert lmedit.history(model) == [res]
    # the target probability rises: by 100x or to > 0.5 for each request, to > 0.3 on average
    lp1 = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    for r, a, b in zip(REQUESTS, lp0, lp1):
        assert rose(a, b), f"{r.subject}: log P(target) {a:.2f} -> {b:.2f}"
    assert sum(math.exp(b) for b in lp1) / len(lp1) > 0.3, lp1
    # ... and the optimised targets were reached by the target optimisation itself
    assert (res.targets.target_prob > 0.5).all(), res.targets.target_prob

    # only the edited projections changed, and by the recorded deltas
    assert changed(model, before) == edited_names(model, method)
    adapter = lmedit.get_adapter(model)
    for l in res.layers:
        stored = before[adapter.edit_param_name(l)]
        W0 = stored if adapter.layout == "out_in" else stored.T  # (d_out, d_in)
        dW = adapter.weight(model, l).detach() - W0
        assert float(dW.norm()) > 0
        torch.testing.assert_close(dW, res.deltas[l], rtol=1e-4, atol=1e-5)
    edited = snapshot(model)

    # deltas round-trip through a file onto an identical fresh model, bit-exactly
    path = res.save_deltas(tmp_path / "edit.safetensors")
    twin = fresh(make_tiny, arch, pristine)
    applied = lmedit.apply_deltas(twin, path)
    assert applied.layers == res.layers and applied.method == method
    assert [r.to_dict() for r in applied.requests] == [r.to_dict() for r in REQUESTS]
    for name in edited_names(model, method):
        assert torch.equal(twin.state_dict()[name], edited[name]), f"{name} differs after apply_deltas"
    assert changed(twin, edited) == set()
    applied.undo()
    assert_same(twin, before)
    # ... and refuse a model with other weights
    other = fresh(make_tiny, arch, pristine, seed=1)
    other_before = snapshot(other)
    with pytest.raises(CacheError, match="refusing"):
        lmedit.apply_deltas(other, path)
    assert_same(other, other_before)

    # undo restores every parameter bit-exactly
    res.undo()
    assert_same(model, before)
    assert lmedit.history(model) == []
    assert [target_logprob(model, tokenizer, r) for r in REQUESTS] == lp0
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
def test_failure_half_way_changes_nothing(method, arch, exc, make_tiny, tokenizer, covariances, pristine, monkeypatch):
    """The 2nd solve fails (2nd layer for MEMIT/EMMET, 2nd request for ROME) after the 1st was written."""
    model = fresh(make_tiny, arch, pristine)
    C = covariances(model, layers_for(method))
    before = snapshot(model)
    name = "memit" if method == "memit" else "emmet"  # ROME is EMMET with one key
    spy = _FailOnCall(getattr(solvers, name), 2, exc)
    monkeypatch.setattr(solvers, name, spy)
    kw = edit_kwargs(method) | dict(v_num_grad_steps=2)
    with pytest.raises(type(exc)):
        lmedit.edit(model, tokenizer, REQUESTS, method=method, covariances=C, **kw)
    assert spy.calls == 2  # the first update had been applied when the failure came
    assert_same(model, before)
    assert count_hooks(model) == 0
    assert lmedit.history(model) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_interrupt_inside_a_traced_forward_pass_changes_nothing(arch, make_tiny, tokenizer, covariances, pristine,
                                                                 monkeypatch):
    """KeyboardInterrupt raised by the model while lmedit's hooks are on it, after layer 1 was written."""
    import lmedit.core.distribute as distribute

    model = fresh(make_tiny, arch, pristine)
    C = covariances(model, [1, 2])
    before = snapshot(model)
    real = distribute.collect_keys
    calls = []

    def collect_keys(model_, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real(model_, *args, **kwargs)
        block0 = lmedit.get_adapter(model_).block(model_, 0)

        def boom(*_):
            assert count_hooks(model_) > 1  # lmedit's Trace is on the model now
            raise KeyboardInterrupt

        h = block0.register_forward_hook(boom)
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
def test_singular_covariance_on_the_second_layer_changes_nothing(method, make_tiny, tokenizer, covariances, pristine):
    """A real (not injected) failure: C = 0 at layer 2 makes the layer-2 system singular."""
    model = fresh(make_tiny, "llama", pristine)
    C = covariances(model, [1, 2])
    C[2] = torch.zeros_like(C[2])
    before = snapshot(model)
    with pytest.raises(SolveError, match="not positive definite"):
        lmedit.edit(model, tokenizer, REQUESTS, method=method, covariances=C, **edit_kwargs(method))
    assert_same(model, before)
    assert count_hooks(model) == 0 and lmedit.history(model) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_edits_undo_in_reverse_order_only(method, arch, make_tiny, tokenizer, covariances, pristine):
    model = fresh(make_tiny, arch, pristine)
    C = covariances(model, layers_for(method))
    before = snapshot(model)
    kw = edit_kwargs(method) | dict(v_num_grad_steps=4)
    first = lmedit.edit(model, tokenizer, REQUESTS, method=method, covariances=C, **kw)
    after_first = snapshot(model)
    second = lmedit.edit(model, tokenizer, OTHER, method=method, covariances=C, **kw)
    assert lmedit.history(model) == [first, second]
    assert changed(model, after_first) == edited_names(model, method)
    with pytest.raises(LmeditError, match="later edit"):
        first.undo()
    assert lmedit.history(model) == [first, second]  # the refused undo changed nothing
    second.undo()
    assert_same(model, after_first)
    first.undo()
    assert_same(model, before)
    assert lmedit.history(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emmet_in_each_dtype(dtype, make_tiny, tokenizer, covariances, pristine, tmp_path):
    model = fresh(make_tiny, "llama", pristine, dtype=dtype)
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
    twin = fresh(make_tiny, "llama", pristine, dtype=dtype)
    lmedit.apply_deltas(twin, path)
    assert_same(twin, edited)
