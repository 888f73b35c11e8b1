"""LoRA export: an edit's weight updates as a standard peft adapter that serving engines load.

Example::

    result = editor.edit(requests)
    report = result.save_lora("facts-lora")                  # adapter_config.json + adapter_model.safetensors
    model = peft.PeftModel.from_pretrained(fresh_base, "facts-lora")   # the edited model again

A ROME / MEMIT / EMMET update of one batch is ``dW = R K^T (...)^-1``, of rank at most the batch
size, so it factors exactly as ``dW = B A`` with ``B`` (d_out, r) and ``A`` (r, d_in): a LoRA
adapter of rank r per edited projection with scale ``lora_alpha / r = 1``. The factors come from
the SVD of dW (float64) split evenly, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, with r the
numerical rank at float32 precision (singular values above ``S_1 * max(d_out, d_in) * eps32``).
Accumulated updates (a ledger of many batches) may have a large rank: ``rank=`` caps it and
``max_error=`` picks the smallest rank whose relative Frobenius error stays within it; the error
of each layer is reported. The configuration is peft's own ``LoraConfig`` (peft is the optional
``lmedit[lora]`` extra), so the directory is what ``PeftModel.from_pretrained``, vLLM and
llama.cpp's converter read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmedit._fs import atomic_path
from lmedit._version import __version__
from lmedit.errors import HyperparameterError, LmeditError
from lmedit.models.adapters import ModelAdapter

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class LoraLayer:
    """One edited projection in the adapter: its module, the rank kept and what it costs."""

    layer: int
    module: str  # the projection's module name, e.g. "model.layers.4.mlp.down_proj"
    rank: int  # rank written
    full_rank: int  # numerical rank of the update (float32 precision)
    rel_error: float  # ||dW - B A||_F / ||dW||_F


@dataclass
class LoraReport:
    """What :func:`save_lora` wrote."""

    path: str
    layers: list[LoraLayer]
    adapter_bytes: int  # size of adapter_model.safetensors
    edited_bytes: int  # size of the edited weights in the model's dtype (what a full copy would ship)

    @property
    def max_rel_error(self) -> float:
        return max((l.rel_error for l in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "layers": [asdict(l) for l in self.layers], "adapter_bytes": self.adapter_bytes,
                "edited_bytes": self.edited_bytes, "max_rel_error": self.max_rel_error}

    def describe(self) -> str:
        ranks = ", ".join(f"{l.layer}:{l.rank}" + (f"/{l.full_rank}" if l.rank < l.full_rank else "") for l in self.layers)
        return (f"LoRA adapter {self.path}: rank per layer {ranks}; max relative error {self.max_rel_error:.2e}; "
                f"{self.adapter_bytes / 2**20:.1f} MiB ({self.edited_bytes / max(self.adapter_bytes, 1):.0f}x smaller "
                "than the edited weights)")


def factorize(delta: torch.Tensor, *, rank: int | None = None,
              max_error: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(B (d_out, r), A (r, d_in), numerical rank, relative Frobenius error) with ``B @ A ~ delta``.

    Without ``rank`` / ``max_error`` the numerical rank is kept (exact up to float32 rounding).
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise HyperparameterError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if max_error is not None and not (0.0 <= max_error < 1.0):
        raise HyperparameterError(f"LoRA max_error must be a relative error in [0, 1), got {max_error!r}")
    d = delta.detach().to("cpu", torch.float64)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    total = float(S.square().sum())
    if total == 0.0:
        return d.new_zeros(d.shape[0], 0), d.new_zeros(0, d.shape[1]), 0, 0.0
    full = int((S > S[0] * max(d.shape) * torch.finfo(torch.float32).eps).sum())
    r = full
    if max_error is not None:
        tail = S.square().flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} S_j^2
        ok = torch.nonzero(tail <= (max_error ** 2) * total).flatten()
        r = min(r, int(ok[0]) if len(ok) else full)
    if rank is not None:
        r = min(r, rank)
    r = max(r, 1)
    err = math.sqrt(max(float(S[r:].square().sum()), 0.0) / total)
    root = S[:r].sqrt()
    return (U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float(), full, err


def save_lora(path: str | Path, deltas: dict[int, torch.Tensor], model: nn.Module, adapter: ModelAdapter, *,
              rank: int | None = None, max_error: float | None = None, base_model: str | None = None,
              meta: dict[str, Any] | None = None) -> LoraReport:
    """Write ``deltas`` ({layer: (d_out, d_in)}) as a peft LoRA adapter directory at ``path`` (atomically).

    ``base_model`` goes into ``base_model_name_or_path`` (default: the model's ``name_or_path``);
    ``meta`` (method, requests, ...) is kept in ``lmedit_lora.json`` beside the adapter.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise LmeditError("LoRA export needs peft: pip install 'lmedit[lora]' (or pip install peft)") from None
    if not deltas:
        raise LmeditError("nothing to export: no edited layer")
    tensors: dict[str, torch.Tensor] = {}
    layers: list[LoraLayer] = []
    edited_bytes = 0
    for layer in sorted(deltas):
        module = adapter.edit_param_name(layer).removesuffix(".weight")
        B, A, full, err = factorize(deltas[layer], rank=rank, max_error=max_error)
        edited_bytes += adapter.weight(model, layer).numel() * adapter.weight(model, layer).element_size()
        if full == 0:
            continue  # an unchanged layer needs no adapter
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
        layers.append(LoraLayer(layer, module, A.shape[0], full, err))
    if not layers:
        raise LmeditError("nothing to export: every update is zero")
    r_max = max(l.rank for l in layers)
    config = LoraConfig(
        r=r_max, lora_alpha=r_max, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=[l.module for l in layers],
        # scale alpha / r = 1 for every module: the factors are the update itself
        rank_pattern={l.module: l.rank for l in layers}, alpha_pattern={l.module: l.rank for l in layers},
        fan_in_fan_out=adapter.layout == "in_out",  # GPT-2's Conv1D stores W as (d_in, d_out)
        base_model_name_or_path=base_model or getattr(model, "name_or_path", None) or None,
    )
    path = Path(path)
    with atomic_path(path, directory=True) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        report = LoraReport(str(path), layers, (tmp / ADAPTER_FILE).stat().st_size, edited_bytes)
        info = {"lmedit_version": __version__, "model_type": adapter.model_type, **report.to_dict(), **(meta or {})}
        (tmp / "lmedit_lora.json").write_text(json.dumps(info, indent=1))
    return report
