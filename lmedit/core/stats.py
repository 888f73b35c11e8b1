"""Second-moment statistics C = E[k k^T] of the edited projections' inputs over a corpus.

Example: ``C = second_moments(model, tok, adapter, layers=[4, 5, 6, 7, 8])[4]  # (d_in, d_in)``

One forward pass over the corpus serves every requested layer: it reads all edited projections'
inputs and stops after the deepest one (the reference runs one pass per layer). C is the mean of
k k^T over all non-padding tokens (as the reference's ``layer_stats``): each chunk of at most
``max_tokens`` tokens is summed in float32, the chunks in float64 (by default). Results are cached as safetensors, one file per layer, keyed by the model fingerprint,
layer, corpus, sample count, maximum length, forward dtype and accumulation dtype, with a
checksum of the tensor; a corrupt or mismatched file is recomputed with a warning. Long runs
write a checkpoint and resume from it after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmedit._version import __version__
from lmedit._fs import atomic_path, cache_root
from lmedit.core.corpus import corpus_id, load_corpus
from lmedit.core.tokens import pad, pad_id, token_chunks
from lmedit.errors import CacheError
from lmedit.hooks import Trace
from lmedit.models.adapters import ModelAdapter
from lmedit.models.loading import fingerprint
from lmedit.models.precision import ACCUMULATE_DTYPES, model_device, working_copy

log = logging.getLogger(__name__)


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _meta(fp: str, layer: int, corpus: str, n_samples: int, max_length: int, dtype: str, forward_dtype: str) -> dict[str, str]:
    return {"model": fp, "layer": str(layer), "corpus": corpus_id(corpus), "n_samples": str(n_samples),
            "max_length": str(max_length), "dtype": dtype, "forward_dtype": forward_dtype}


def _path(directory: Path, meta: dict[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return directory / meta["model"] / f"layer{meta['layer']}-{key}.safetensors"


def read_stat_file(path: Path, expect: dict[str, str]) -> torch.Tensor:
    """Read a cached C and check its metadata and checksum; raise CacheError if anything is off."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            C = f.get_tensor("mom2")
    except Exception as e:  # safetensors raises several types on truncated/corrupt files
        raise CacheError(f"statistics file {path} is unreadable ({e})") from e
    for k, v in expect.items():
        if meta.get(k) != v:
            raise CacheError(f"statistics file {path}: {k} is {meta.get(k)!r}, expected {v!r}")
    if meta.get("sha256") != _checksum(C):
        raise CacheError(f"statistics file {path}: checksum mismatch (corrupt file)")
    if not torch.isfinite(C).all():
        raise CacheError(f"statistics file {path} contains NaN or inf")
    return C


def second_moments(
    model: nn.Module,
    tokenizer,
    adapter: ModelAdapter,
    layers: Sequence[int],
    *,
    corpus: str = "wikipedia-excerpt",
    n_samples: int = 2000,
    max_length: int = 1024,
    dtype: str = "float64",
    forward_dtype: str = "model",
    cache_dir: str | Path | None = None,
    model_fingerprint: str | None = None,
    max_tokens: int = 8192,
    checkpoint_seconds: float = 60.0,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """C per layer (float64 or float32, (d_in, d_in)), from the cache or one pass over the corpus.

    ``forward_dtype="bfloat16"`` runs the pass on a bfloat16 copy of the model (about 4x faster
    matmuls on CPUs with AVX512-BF16 and on GPUs); the accumulation stays in ``dtype``.
    ``cache_dir`` is the cache directory (``None``: the lmedit cache; a fresh directory recomputes).
    """
    if dtype not in ACCUMULATE_DTYPES:
        raise ValueError(f"statistics dtype must be one of {list(ACCUMULATE_DTYPES)}, got {dtype!r}")
    for layer in layers:
        adapter.block(model, layer)  # range check with a clear message
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    fp = model_fingerprint or fingerprint(model)
    result: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        meta = _meta(fp, layer, corpus, n_samples, max_length, dtype, forward_dtype)
        path = _path(directory, meta)
        if path.exists():
            try:
                result[layer] = read_stat_file(path, meta)
                continue
            except CacheError as e:
                log.warning("%s; recomputing", e)
        missing.append(layer)
    if missing:
        computed = _accumulate(model, tokenizer, adapter, missing, corpus, n_samples, max_length, dtype,
                               forward_dtype, directory, fp, max_tokens, checkpoint_seconds, progress)
        for layer, C in computed.items():
            meta = _meta(fp, layer, corpus, n_samples, max_length, dtype, forward_dtype)
            path = _path(directory, meta)
            meta.update(sha256=_checksum(C), lmedit_version=__version__)
            with atomic_path(path) as tmp:
                save_file({"mom2": C.contiguous()}, str(tmp), metadata=meta)
            result[layer] = C
    return {layer: result[layer] for layer in layers}


class _Checkpoint:
    """Partial sums of an interrupted statistics pass, keyed by everything the sums depend on."""

    def __init__(self, directory: Path, meta: dict[str, str]) -> None:
        self.meta = meta
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        self.path = directory / meta["model"] / f"checkpoint-{key}.safetensors"

    def load(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """(sums per module, token count, next chunk); empty when there is no usable checkpoint."""
        empty = ({}, torch.zeros((), dtype=torch.float64), 0)
        if not self.path.exists():
            return empty
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if not all(meta.get(k) == v for k, v in self.meta.items()):
                    return empty
                sums = {k: f.get_tensor(k) for k in f.keys() if k != "count"}
                return sums, f.get_tensor("count"), int(meta["next_group"])
        except Exception as e:  # safetensors raises several types on truncated/corrupt files
            log.warning("ignoring unreadable statistics checkpoint %s (%s)", self.path, e)
            return empty

    def save(self, sums: dict[str, torch.Tensor], count: torch.Tensor, next_group: int) -> None:
        with atomic_path(self.path) as tmp:
            save_file({**{k: v.contiguous() for k, v in sums.items()}, "count": count}, str(tmp),
                      metadata=dict(self.meta, next_group=str(next_group)))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _accumulate(model, tokenizer, adapter, layers, corpus, n_samples, max_length, dtype, forward_dtype,
                directory: Path, fp: str, max_tokens: int, checkpoint_seconds: float, progress: bool):
    from tqdm.auto import tqdm

    texts = load_corpus(corpus, n_samples)
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    groups = token_chunks([len(x) for x in enc], max_tokens)
    ck = _Checkpoint(directory, {"model": fp, "layers": ",".join(map(str, layers)), "corpus": corpus_id(corpus),
                                 "n_samples": str(n_samples), "max_length": str(max_length), "dtype": dtype,
                                 "forward_dtype": forward_dtype, "max_tokens": str(max_tokens)})
    sums, count, start = ck.load()
    if start:
        log.info("resuming statistics from checkpoint %s at chunk %d/%d", ck.path, start, len(groups))
    bar = tqdm(total=sum(len(x) for x in enc), desc=f"statistics L{layers[0]}-{layers[-1]}", unit="tok",
               unit_scale=True, disable=not progress, initial=sum(len(enc[i]) for g in groups[:start] for i in g))
    last_ck = time.monotonic()
    with bar, working_copy(model, forward_dtype) as work, torch.no_grad():
        mods = {str(layer): adapter.edit_module(work, layer) for layer in layers}
        device = model_device(work)
        for gi in range(start, len(groups)):
            ids, mask = pad([enc[i] for i in groups[gi]], pad_id(tokenizer), side="right")
            with Trace(mods, capture="input", stop=True) as tr:
                work(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            keep = mask.to(device).bool()
            for name, x in tr.inputs.items():
                k = x[keep].float()  # (n_tok, d_in); one chunk's sum in float32, chunks summed in the accumulation dtype
                kk = (k.T @ k).to(ACCUMULATE_DTYPES[dtype]).cpu()
                sums[name] = sums[name] + kk if name in sums else kk
            count += float(keep.sum())
            bar.update(int(keep.sum()))
            if checkpoint_seconds and time.monotonic() - last_ck > checkpoint_seconds and gi + 1 < len(groups):
                ck.save(sums, count, gi + 1)
                last_ck = time.monotonic()
    if count == 0:
        raise CacheError(f"corpus {corpus!r} produced no tokens")
    ck.remove()
    return {layer: (sums[str(layer)].to(torch.float64) / count).to(ACCUMULATE_DTYPES[dtype]) for layer in layers}
