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

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from lmedit.errors import SolveError
from lmedit.models.adapters import ModelAdapter


_VERSION_ATTR = "_lmedit_weights_version"
_NEXT_VERSION = itertools.count(1)


def weights_version(model: nn.Module) -> int:
    """An id of the state of the model's weights as lmedit wrote them: 0 for a model lmedit never
    edited, a fresh id after each write, and the earlier id again after an exact undo or rollback.
    Results computed from one state (e.g. target vectors) use it to tell whether the model changed."""
    return getattr(model, _VERSION_ATTR, 0)


def _set_version(model: nn.Module, version: int | None = None) -> None:
    object.__setattr__(model, _VERSION_ATTR, next(_NEXT_VERSION) if version is None else version)


@dataclass
class AppliedEdit:
    """What a committed transaction changed: originals (storage layout) and deltas ((d_out, d_in) float32)."""

    originals: dict[int, torch.Tensor] = field(default_factory=dict)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)
    version_before: int = 0  # weights_version() before the edit, restored by an exact undo


class WeightTransaction:
    """Collect weight updates; on any exception (KeyboardInterrupt included) restore them all."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.model, self.adapter = model, adapter
        self.record = AppliedEdit(version_before=weights_version(model))

    def add(self, layer: int, delta: torch.Tensor) -> None:
        """W_layer += delta, with delta in the paper's (d_out, d_in) orientation."""
        param = self.adapter.edit_module(self.model, layer).weight
        W = self.adapter.weight(self.model, layer)
        if tuple(delta.shape) != tuple(W.shape):
            raise ValueError(f"layer {layer}: update has shape {tuple(delta.shape)}, weight is {tuple(W.shape)} (d_out, d_in)")
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
            total = (d64 if prev is None else prev.to(torch.float64) + d64).to(torch.float32)  # (d_out, d_in)
            orig = self.record.originals[layer]
            W0 = orig if self.adapter.layout == "out_in" else orig.T  # (d_out, d_in)
            new = (W0.to(W.device, torch.float64) + total.to(W.device, torch.float64)).to(param.dtype)
            if not torch.isfinite(new).all():
                raise SolveError(f"layer {layer}: the updated weight overflows {param.dtype}")
            W.copy_(new)
        _set_version(self.model)
        self.record.deltas[layer] = total

    def rollback(self) -> None:
        restore(self.model, self.adapter, self.record.originals, self.record.version_before)
        self.record = AppliedEdit(version_before=self.record.version_before)

    def __enter__(self) -> "WeightTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()


def restore(model: nn.Module, adapter: ModelAdapter, originals: dict[int, torch.Tensor], version: int | None = None) -> None:
    """Copy stored original tensors back into the edited weights (bit-exact); ``version`` is the
    weights_version() of the state they restore (a fresh id when not given)."""
    with torch.no_grad():
        for layer, orig in originals.items():
            param = adapter.edit_module(model, layer).weight
            param.copy_(orig.to(param.device))
    if originals:
        _set_version(model, version)
