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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@contextmanager
def working_copy(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """The model itself, or (inside the block only) a copy cast to the compute dtype ``name``."""
    dtype = compute_dtype(name, model_device(model))
    if dtype is None or dtype == model_dtype(model):
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
