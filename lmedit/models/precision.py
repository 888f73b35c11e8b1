"""Precision policy: the one list of dtype names, and the working copy a phase runs in.

Example::

    with working_copy(model, "auto") as work:     # the model itself, or a bfloat16 copy of it
        work(input_ids)

Math (statistics sums, solves, target deltas) is float32/float64 whatever the model's dtype; a
phase's forward passes may run in a cheaper dtype: "model" (the model's own), "float32",
"bfloat16", "float16", or "auto" (bfloat16 where its matmuls are native, else the model's). A
model already in the compute dtype is never copied; a copy is made once per phase and carries no
lmedit state (lmedit stores nothing on the model object).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

# Names a user may write for a model dtype (``lmedit.load_model(dtype=...)``, ``--dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
}
# Dtypes a forward phase may run in (hyperparameters ``compute_dtype`` and ``mom2_forward_dtype``).
COMPUTE_DTYPES: tuple[str, ...] = ("model", "auto", "float32", "bfloat16", "float16")
# Dtypes the statistics are accumulated in (``mom2_dtype``).
ACCUMULATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a clear error for an unknown name."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def bf16_fast(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are native here (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The dtype a phase runs in (None: the model's own dtype)."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if bf16_fast(device) else None
    return None if name == "model" else DTYPES[name]


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device for a dispatched or offloaded
    module (its weights may be on "meta" until its forward runs), else its first parameter's."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device(torch.accelerator.current_accelerator().type, dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return next(module.parameters()).device


def solve_device(module: nn.Module) -> torch.device:
    """Where the float64 closed-form solve for ``module``'s weight runs: the GPU the module computes
    on (CUDA has float64 Cholesky; a 8,960-wide system factors in milliseconds there against
    about a second on 16 CPU cores), else the CPU (also for MPS, which has no float64)."""
    dev = module_device(module)
    return dev if dev.type == "cuda" else torch.device("cpu")


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread ``model`` over devices or offloaded part of it (``device_map``)."""
    return bool(getattr(model, "hf_device_map", None)) or any(hasattr(m, "_hf_hook") for m in model.modules())


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device the input embeddings compute on."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return module_device(emb if emb is not None else model)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@contextmanager
def working_copy(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """The model itself, or (inside the block only) a copy cast to the compute dtype ``name``."""
    dtype = compute_dtype(name, model_device(model))
    if dtype is None or dtype == model_dtype(model):
        yield model
        return
    if is_dispatched(model):  # a copy would defeat the device map (and accelerate's hooks do not copy)
        log.info("model is dispatched over devices; running in its own dtype %s, not %s", model_dtype(model), dtype)
        yield model
        return
    work = copy.deepcopy(model).to(dtype)
    try:
        yield work
    finally:
        del work


def sync_weights(work: nn.Module, model: nn.Module, params: Sequence[str]) -> None:
    """Copy the named parameters of ``model`` into the working copy ``work`` (after an edit of ``model``)."""
    if work is model:
        return
    src, dst = dict(model.named_parameters()), dict(work.named_parameters())
    with torch.no_grad():
        for name in params:
            dst[name].copy_(src[name].to(dst[name].dtype))
