"""Delta files: an edit's per-layer updates as safetensors, with what made them.

Example::

    result.save_deltas("edits.safetensors")              # after editor.edit(...)
    lmedit.apply_deltas(model, "edits.safetensors")      # the same weights again, bit for bit

The file holds one float32 (d_out, d_in) tensor per layer (``layer.<index>``) and metadata: the
method, its hyperparameters, the requests, the edited parameter names and the base model's
fingerprint, so that applying it to another model is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmedit._fs import atomic_path, read_safetensors
from lmedit._version import __version__
from lmedit.errors import CacheError
from lmedit.models.adapters import ModelAdapter

FORMAT = "lmedit-deltas"


def write_deltas(path: str | Path, deltas: dict[int, torch.Tensor], adapter: ModelAdapter, *, method: str,
                 hparams: dict[str, Any], requests: list[dict[str, Any]], base_fingerprint: str) -> Path:
    """Write ``deltas`` ({layer: (d_out, d_in) float32}) atomically with their metadata."""
    path = Path(path)
    layers = sorted(deltas)
    meta = {
        "format": FORMAT, "lmedit_version": __version__, "method": method, "layers": json.dumps(layers),
        "base_model": base_fingerprint, "model_type": adapter.model_type, "hparams": json.dumps(hparams),
        "requests": json.dumps(requests), "params": json.dumps({str(l): adapter.edit_param_name(l) for l in layers}),
    }
    with atomic_path(path) as tmp:
        save_file({f"layer.{l}": deltas[l].contiguous() for l in layers}, str(tmp), metadata=meta)
    return path


def read_deltas(path: str | Path, model: nn.Module, adapter: ModelAdapter, fingerprint: str, *,
                allow_other_model: bool = False) -> tuple[dict[str, str], dict[int, torch.Tensor]]:
    """(metadata, {layer: delta}) of a delta file, every tensor checked against ``model``; CacheError if not."""
    path = Path(path)
    meta, tensors = read_safetensors(path, "delta file")
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path} is not an lmedit delta file (no 'format: {FORMAT}' metadata)")
    if meta.get("base_model") != fingerprint and not allow_other_model:
        raise CacheError(f"delta file {path} was made for model {meta.get('base_model')}, this model is {fingerprint}; "
                         "refusing to apply it (pass allow_other_model=True to force)")
    n_layers = adapter.n_layers(model)
    deltas: dict[int, torch.Tensor] = {}
    for key, delta in tensors.items():
        head, _, num = key.partition(".")
        if head != "layer" or not num.isdigit() or int(num) >= n_layers:
            raise CacheError(f"delta file {path}: tensor {key!r} does not name a layer 0..{n_layers - 1} "
                             "(expected keys 'layer.<index>'); the file is corrupt or for another model")
        shape = tuple(adapter.weight(model, int(num)).shape)
        if tuple(delta.shape) != shape:
            raise CacheError(f"delta file {path}: {key} has shape {tuple(delta.shape)}, the weight is {shape}; "
                             "the file is corrupt or for another model")
        deltas[int(num)] = delta
    if not deltas:
        raise CacheError(f"delta file {path} holds no updates")
    return meta, deltas
