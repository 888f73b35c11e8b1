"""Applying weight updates atomically, and undoing them bit-exactly.

Example::

    with WeightTransaction(model, adapter) as tx:   # any exception restores every weight
        tx.add(5, dW5)
        tx.add(6, dW6)
    record = tx.record                               # originals + applied deltas, for undo

The update is applied as ``W <- cast(W_orig.float64 + D)`` with D the layer's float32 total update
(the recorded delta), so a half-precision weight is rounded once and a saved delta file re-applies
bit-exactly; the original tensor is kept (on CPU) so undo restores the exact bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmedit.errors import SolveError
from lmedit.models.adapters import ModelAdapter


def rebuilt(adapter: ModelAdapter, orig: torch.Tensor, total: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """cast(W_orig + total) in the storage layout, dtype and device of ``like`` (the parameter)."""
    W0 = adapter.as_out_in(orig)  # (d_out, d_in)
    new = W0.to(like.device, torch.float64) + total.to(like.device, torch.float64)
    return adapter.as_out_in(new.to(like.dtype))


@dataclass
class AppliedEdit:
    """What a committed transaction changed: originals (storage layout) and deltas ((d_out, d_in) float32)."""

    originals: dict[int, torch.Tensor] = field(default_factory=dict)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)

    def changed_since(self, model: nn.Module, adapter: ModelAdapter) -> list[int]:
        """Layers whose weight is no longer exactly what this edit left (another write came after it)."""
        out = []
        with torch.no_grad():
            for layer, orig in self.originals.items():
                param = adapter.stored(model, layer)
                if not torch.equal(param, rebuilt(adapter, orig, self.deltas[layer], param)):
                    out.append(layer)
        return out


class WeightTransaction:
    """Collect weight updates; on any exception (KeyboardInterrupt included) restore them all."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.model, self.adapter = model, adapter
        self.record = AppliedEdit()

    def add(self, layer: int, delta: torch.Tensor, *, exact: bool = False) -> None:
        """W_layer += delta, with delta in the paper's (d_out, d_in) orientation. ``exact``: keep the
        total in float64 (a compacted ledger's total, which rebuilds the weights it was measured from)."""
        param = self.adapter.stored(self.model, layer)
        shape = tuple(self.adapter.as_out_in(param).shape)
        if tuple(delta.shape) != shape:
            raise ValueError(f"layer {layer}: update has shape {tuple(delta.shape)}, weight is {shape} (d_out, d_in)")
        if not torch.isfinite(delta).all():
            raise SolveError(f"layer {layer}: the update contains NaN or inf; no weight was changed by it")
        with torch.no_grad():
            if layer not in self.record.originals:
                self.record.originals[layer] = param.detach().to("cpu", copy=True)
            # The recorded (and saved) delta is float32, so the weight is rebuilt from the original as
            # cast(W_orig + total) with exactly that float32 total: apply_deltas() of a saved file then
            # reproduces the edited weights bit for bit, and repeated updates of a layer round once.
            prev = self.record.deltas.get(layer)
            d64 = delta.detach().to("cpu", torch.float64)
            total = d64 if prev is None else prev.to(torch.float64) + d64  # (d_out, d_in)
            total = total if exact else total.to(torch.float32)
            new = rebuilt(self.adapter, self.record.originals[layer], total, param)
            if not torch.isfinite(new).all():
                raise SolveError(f"layer {layer}: the updated weight overflows {param.dtype}")
            self.adapter.store(self.model, layer, new)
        self.record.deltas[layer] = total

    def rollback(self) -> None:
        restore(self.model, self.adapter, self.record.originals)
        self.record = AppliedEdit()

    def checkpoint(self) -> dict[int, torch.Tensor]:
        """The updates so far, for :meth:`back_to` (``add`` replaces a layer's total, never mutates it)."""
        return dict(self.record.deltas)

    def back_to(self, checkpoint: dict[int, torch.Tensor]) -> list[int]:
        """Undo every update made since ``checkpoint``, bit for bit; returns the layers that changed."""
        changed = []
        with torch.no_grad():
            for layer in [l for l in self.record.deltas if self.record.deltas[l] is not checkpoint.get(l)]:
                if layer in checkpoint:
                    param = self.adapter.stored(self.model, layer)
                    self.adapter.store(self.model, layer, rebuilt(self.adapter, self.record.originals[layer],
                                                                   checkpoint[layer], param))
                    self.record.deltas[layer] = checkpoint[layer]
                else:
                    self.adapter.store(self.model, layer, self.record.originals.pop(layer))
                    del self.record.deltas[layer]
                changed.append(layer)
        return changed

    def __enter__(self) -> "WeightTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()


def restore(model: nn.Module, adapter: ModelAdapter, originals: dict[int, torch.Tensor]) -> None:
    """Copy stored original tensors back into the edited weights (bit-exact)."""
    with torch.no_grad():
        for layer, orig in originals.items():
            adapter.store(model, layer, orig)
