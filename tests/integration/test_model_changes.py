"""The target optimisation's temporary changes to a model are undone: requires_grad flags, the
attention implementation and the block list are as before, after success and after an exception."""

from __future__ import annotations

import pytest

import lmedit
from helpers import REQUESTS
from lmedit.core.targets import TargetConfig, compute_targets


def _state(model):
    return ([p.requires_grad for p in model.parameters()], model.config._attn_implementation,
            list(lmedit.get_adapter(model).block_list(model)))


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "interrupted"])
def test_compute_targets_restores_the_model(fresh, tokenizer, monkeypatch, fail):
    model = fresh("llama")
    model.set_attn_implementation("sdpa")
    for p in list(model.parameters())[::3]:
        p.requires_grad_(False)  # a mix of flags, to see each restored as it was
    before = _state(model)
    adapter = lmedit.get_adapter(model)
    if fail:
        import lmedit.core.targets as targets

        def boom(*a, **k):
            assert model.config._attn_implementation == "eager"  # switched while the optimisation runs
            raise KeyboardInterrupt

        monkeypatch.setattr(targets._RowAdam, "step", boom)
    templates = ["{}", "The weather is nice. {}"]
    if fail:
        with pytest.raises(KeyboardInterrupt):
            compute_targets(model, tokenizer, adapter, REQUESTS, templates, 2, TargetConfig(v_num_grad_steps=3))
    else:
        compute_targets(model, tokenizer, adapter, REQUESTS, templates, 2, TargetConfig(v_num_grad_steps=3))
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1] == "sdpa"
    assert len(after[2]) == len(before[2]) and all(a is b for a, b in zip(after[2], before[2]))
    assert all(p.grad is None for p in model.parameters())  # the optimisation's graph touched no parameter
