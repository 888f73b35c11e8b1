"""Hooks as context managers: read activations, add vectors at token positions, stop early.

Example::

    with Trace({"k5": adapter.edit_module(model, 5)}, capture="input", stop=True) as tr:
        model(input_ids)
    keys = tr.inputs["k5"]                      # (B, T, d_in)

Hooks are global state on the modules, so they only live inside a ``with`` block and are
removed on exit, also when the forward pass raises (``stop=True`` raises :class:`StopForward`
after the last traced module, which ends the pass early; the ``with`` block swallows it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a forward pass to end it after the last module a :class:`Trace` needs."""


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError("could not find the module's input tensor in its arguments")


def _gather(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, d) -> (B, d) at positions (B,), or (B, P, d) at positions (B, P)."""
    if positions is None:
        return x
    rows = torch.arange(x.shape[0], device=x.device)
    if positions.dim() == 1:
        return x[rows, positions.to(x.device)]
    return x[rows[:, None], positions.to(x.device)]


class Trace:
    """Capture inputs and/or outputs of several modules in one forward pass.

    ``positions`` (B,) or (B, P) keeps only those token positions (saves memory on long
    corpora); ``stop=True`` ends the forward pass after the last of the traced modules runs
    (the one deepest in execution order: it stops when every traced module has fired).
    ``detach=False`` keeps the autograd graph.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        capture: Literal["input", "output", "both"] = "output",
        positions: torch.Tensor | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.modules = dict(modules)
        self.capture = capture
        self.positions = positions
        self.stop = stop
        self.detach = detach
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fired: set[str] = set()

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        x = _gather(x, self.positions)
        return x.detach() if self.detach else x

    def __enter__(self) -> "Trace":
        try:
            for name, mod in self.modules.items():
                if self.capture in ("input", "both"):
                    self._handles.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self.inputs[name] = self._keep(_hidden_from_args(args, kwargs))
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            if self.capture in ("output", "both"):
                self.outputs[name] = self._keep(_first_tensor(output))
            self._fired.add(name)
            if self.stop and len(self._fired) == len(self.modules):
                raise StopForward()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return exc_type is StopForward


class _OutputHook:
    """A forward hook on one module that rewrites its output, alive inside a ``with`` block."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _rewrite(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hook(self, module, args, output):
        hidden = self._rewrite(_first_tensor(output))
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class AddAtPositions(_OutputHook):
    """Add ``delta`` (B, d) to a module's output at token ``positions`` (B,) of each row.

    Example: ``with AddAtPositions(block, delta, pos): logits = model(ids).logits``

    The addition is out of place, so gradients flow to ``delta``.
    """

    def __init__(self, module: nn.Module, delta: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__(module)
        self.delta, self.positions = delta, positions

    def _rewrite(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        update = torch.zeros_like(hidden)
        update[rows, self.positions.to(hidden.device)] = self.delta.to(hidden.dtype)
        return hidden + update


class SetAtPositions(_OutputHook):
    """Overwrite a module's output at token ``positions`` (B,) of each row with ``values`` (B, d).

    Example: ``with SetAtPositions(mlp, clean_out, pos): model(ids)  # causal tracing's restoration``
    """

    def __init__(self, module: nn.Module, values: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__(module)
        self.values, self.positions = values, positions

    def _rewrite(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden[rows, self.positions.to(hidden.device)] = self.values.to(hidden.device, hidden.dtype)
        return hidden


class ReplaceInput:
    """Replace the hidden-state input of ``module`` with ``hidden`` (same shape).

    Example: ``with ReplaceInput(blocks[L + 1], h): model(ids)  # blocks 0..L are cut out``

    Used to resume a forward pass from cached activations of earlier blocks.
    """

    def __init__(self, module: nn.Module, hidden: torch.Tensor) -> None:
        self.module, self.hidden = module, hidden
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module, args, kwargs):
        if args:
            return (self.hidden, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self.hidden
        return args, kwargs

    def __enter__(self) -> "ReplaceInput":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on any submodule: 0 outside lmedit's ``with`` blocks."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
