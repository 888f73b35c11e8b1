"""Reading and writing weights of models that accelerate dispatched with offloading.

Example::

    W = read_param(down_proj, "weight")          # the real tensor, even when the module sits on "meta"
    write_param(down_proj, "weight", W + dW)     # persists: the offload store is written, not the meta stub

A module offloaded by accelerate (``device_map`` with ``"cpu"``/``"disk"`` under ``offload``, or
``cpu_offload``) keeps its parameters on the meta device; an ``AlignDevicesHook`` loads them from
its ``weights_map`` for each forward pass and drops them after. Writing the parameter would change
nothing, so the edit goes to the store the hook reads: the tensor held in memory (CPU offload), or
the offload folder's file, rewritten with accelerate's own ``offload_weight`` (disk offload; the
model's original safetensors files, which an offload index may point to, are never written).
Every other module reads and writes its parameter in place.
"""

from __future__ import annotations

import torch
from torch import nn

from lmedit.errors import ModelLoadError


def _offload_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        if h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def _store(module: nn.Module, name: str):
    """(mapping the hook reads, key in it) for an offloaded parameter."""
    hook = _offload_hook(module)
    if hook is None:
        raise ModelLoadError(f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook "
                             "holds its value (load the model fully, or dispatch it with accelerate)")
    wm = hook.weights_map
    if hasattr(wm, "dataset") and hasattr(wm, "prefix"):  # accelerate's PrefixedDataset
        return wm.dataset, wm.prefix + name
    return wm, name


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    return getattr(module, name).device.type == "meta" and _offload_hook(module) is not None


def read_param(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The parameter's value (through accelerate's offload store when it sits on the meta device)."""
    t = getattr(module, name)
    if t.device.type != "meta":
        return t
    store, key = _store(module, name)
    return store[key]


def write_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set the parameter to ``value`` (cast to its dtype) where the model will read it."""
    t = getattr(module, name)
    with torch.no_grad():
        if t.device.type != "meta":
            t.copy_(value.to(t.device, t.dtype))
            return
        store, key = _store(module, name)
        held = getattr(store, "state_dict", store)  # OffloadedWeightsLoader keeps in-memory tensors here
        if key in held and isinstance(held, dict):
            held[key].copy_(value.to(held[key].device, held[key].dtype))
            return
        old = store[key]
        folder = getattr(store, "save_folder", None)
        if folder is None:  # no offload folder to write: keep the edited tensor in memory instead
            held[key] = value.to("cpu", old.dtype).clone()
            return
        from accelerate.utils import offload_weight

        offload_weight(value.to("cpu", old.dtype).contiguous(), key, folder, index=store.index)


def state_items(model: nn.Module):
    """(name, tensor) for every entry of the state dict, offloaded ones read from their store."""
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            t = read_param(model.get_submodule(owner), leaf)
        yield name, t
