"""Hooks on every tiny architecture: ``Trace`` captures what a hook of our own sees (and stops the
pass where asked), ``AddAtPositions`` adds only at the chosen positions and passes gradients, and
no hook outlives its ``with`` block, even on an exception.
"""

from __future__ import annotations

import pytest
import torch

from lmedit.hooks import AddAtPositions, Trace, count_hooks
from lmedit.models.adapters import get_adapter


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


class _Recorder:
    """A forward hook of our own: records (input, output) of a module."""

    def __init__(self, module):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.calls.append((args[0].detach().clone() if args else None, out.detach().clone()))

    def remove(self):
        self.handle.remove()


def test_trace_captures_the_modules_actual_input_and_output(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = _ids(tok, "The capital of Xanadu is Paris")
    mods = {"k1": adapter.edit_module(model, 1), "b2": adapter.block(model, 2)}
    mine = {k: _Recorder(m) for k, m in mods.items()}
    try:
        with torch.no_grad(), Trace(mods, capture="both") as tr:
            full = model(ids).logits
    finally:
        for r in mine.values():
            r.remove()
    for k in mods:
        (x, y), = mine[k].calls
        torch.testing.assert_close(tr.inputs[k], x, rtol=0, atol=0)
        torch.testing.assert_close(tr.outputs[k], y, rtol=0, atol=0)
    # the captured key through W gives the captured value
    W, b = adapter.weight(model, 1), getattr(mods["k1"], "bias", None)
    torch.testing.assert_close(tr.outputs["k1"], tr.inputs["k1"] @ W.T + (0 if b is None else b), rtol=1e-5, atol=1e-5)
    # positions keep one token per row
    pos = torch.tensor([3])
    with torch.no_grad(), Trace(mods, capture="both", positions=pos) as tr2:
        model(ids)
    torch.testing.assert_close(tr2.inputs["k1"], tr.inputs["k1"][:, 3])
    torch.testing.assert_close(tr2.outputs["b2"], tr.outputs["b2"][:, 3])
    assert count_hooks(model) == 0
    # the traced pass is the plain pass: same logits, and block 2's captured output is the model's
    # own hidden state after block 2 (hidden_states[0] is the embedding output)
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
    torch.testing.assert_close(full, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(tr.outputs["b2"], plain.hidden_states[3], rtol=0, atol=0)


def test_trace_stop_gives_the_same_activations_and_stops(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = _ids(tok, "Some text about the weather in Xanadu")
    mods = {"k0": adapter.edit_module(model, 0), "z1": adapter.block(model, 1)}
    with torch.no_grad(), Trace(mods, capture="both") as full:
        model(ids)
    later = _Recorder(adapter.block(model, 2))
    head = _Recorder(model.get_output_embeddings())
    try:
        ret = "not reached"
        with torch.no_grad(), Trace(mods, capture="both", stop=True) as stopped:
            ret = model(ids)
        assert ret == "not reached"  # the pass ended inside the with block
    finally:
        later.remove()
        head.remove()
    assert later.calls == [] and head.calls == []  # nothing after block 1 ran
    for k in mods:
        torch.testing.assert_close(stopped.inputs[k], full.inputs[k], rtol=0, atol=0)
        torch.testing.assert_close(stopped.outputs[k], full.outputs[k], rtol=0, atol=0)
    assert count_hooks(model) == 0


def test_no_hooks_left_after_an_exception(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = _ids(tok, "Hello there")
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with Trace({"z": adapter.block(model, 1)}, capture="both"):
            assert count_hooks(model) == 2
            model(ids)
            raise RuntimeError("boom")
    assert count_hooks(model) == 0
    delta = torch.ones(1, 64)
    with pytest.raises(KeyboardInterrupt):
        with AddAtPositions(adapter.block(model, 1), delta, torch.tensor([0])):
            assert count_hooks(model) == 1
            raise KeyboardInterrupt
    assert count_hooks(model) == 0
    # an exception raised by the model inside a traced pass (wrong input) also leaves nothing
    with pytest.raises(Exception):
        with Trace({"z": adapter.block(model, 1)}, stop=True):
            model(torch.tensor([[10**9]]))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("layer", [1, 3])
def test_add_at_positions_changes_only_the_chosen_position_and_later(tiny_model, layer):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = torch.cat([_ids(tok, "The capital of Xanadu is a lovely city")[:, :8],
                     _ids(tok, "I like to eat apples in the sun")[:, :8]])
    pos = torch.tensor([3, 5])
    g = torch.Generator().manual_seed(1)
    delta = 5 * torch.randn(2, 64, generator=g)
    with torch.no_grad():
        base = model(ids).logits
        with Trace({"z": adapter.block(model, layer)}) as t0:
            model(ids)
        with AddAtPositions(adapter.block(model, layer), delta, pos):
            with Trace({"z": adapter.block(model, layer)}) as t1:
                edited = model(ids).logits
    assert count_hooks(model) == 0
    # the traced block output (a hook registered after AddAtPositions sees the edited output) moved by delta at pos
    moved = t1.outputs["z"] - t0.outputs["z"]
    for i in range(2):
        p = int(pos[i])
        torch.testing.assert_close(moved[i, p], delta[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moved[i, :p], torch.zeros(p, 64), rtol=0, atol=0)
        # logits: before p exactly the same, at p different
        torch.testing.assert_close(edited[i, :p], base[i, :p], rtol=0, atol=0)
        assert (edited[i, p] - base[i, p]).abs().max() > 1e-3
        if layer < 3:  # later blocks' attention carries the change forward
            assert (edited[i, p + 1:] - base[i, p + 1:]).abs().max() > 1e-6


def test_add_at_positions_passes_gradients_to_delta(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    ids = _ids(tokenizer, "The capital of Xanadu is")
    delta = torch.zeros(1, 64, requires_grad=True)
    with AddAtPositions(adapter.block(model, 1), delta, torch.tensor([2])):
        model(ids).logits[0, -1, 100].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
