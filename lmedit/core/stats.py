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

from lmedit import __version__
from lmedit._fs import atomic_path, cache_root
from lmedit.core.corpus import corpus_id, load_corpus
from lmedit.core.tokens import pad, pad_id, token_chunks
from lmedit.errors import CacheError
from lmedit.hooks import Trace
from lmedit.models.adapters import ModelAdapter
from lmedit.models.loading import fingerprint

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    ``cache_dir=False``-like behaviour: pass a fresh directory; ``None`` uses the lmedit cache.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"statistics dtype must be one of {list(_DTYPES)}, got {dtype!r}")
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


def _accumulate(model, tokenizer, adapter, layers, corpus, n_samples, max_length, dtype, forward_dtype,
                directory: Path, fp: str, max_tokens: int, checkpoint_seconds: float, progress: bool):
    from lmedit.core.targets import _work_model

    acc_dtype = _DTYPES[dtype]
    work = _work_model(model, forward_dtype)
    device = next(work.parameters()).device
    texts = load_corpus(corpus, n_samples)
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    groups = token_chunks([len(x) for x in enc], max_tokens)
    mods = {str(layer): adapter.edit_module(work, layer) for layer in layers}
    ck_meta = {"model": fp, "layers": ",".join(map(str, layers)), "corpus": corpus_id(corpus),
               "n_samples": str(n_samples), "max_length": str(max_length), "dtype": dtype,
               "forward_dtype": forward_dtype, "max_tokens": str(max_tokens)}
    ck_path = directory / fp / ("checkpoint-" + hashlib.sha256(json.dumps(ck_meta, sort_keys=True).encode()).hexdigest()[:16]
                                + ".safetensors")
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    start_group = 0
    if ck_path.exists():
        try:
            with safe_open(str(ck_path), framework="pt") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in ck_meta.items()):
                    sums = {k: f.get_tensor(k) for k in f.keys() if k != "count"}
                    count = f.get_tensor("count")
                    start_group = int(meta["next_group"])
                    log.info("resuming statistics from checkpoint %s at chunk %d/%d", ck_path, start_group, len(groups))
        except Exception as e:
            log.warning("ignoring unreadable statistics checkpoint %s (%s)", ck_path, e)
            sums, start_group = {}, 0
    pid = pad_id(tokenizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(enc[i]) for g in groups for i in g), desc=f"statistics L{layers[0]}-{layers[-1]}",
                   unit="tok", unit_scale=True)
        bar.update(sum(len(enc[i]) for g in groups[:start_group] for i in g))
    last_ck = time.monotonic()
    with torch.no_grad():
        for gi in range(start_group, len(groups)):
            group = groups[gi]
            ids, mask = pad([enc[i] for i in group], pid, side="right")
            ids, mask = ids.to(device), mask.to(device)
            with Trace(mods, capture="input", stop=True) as tr:
                work(input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.bool()
            for name, x in tr.inputs.items():
                k = x[keep].float()  # (n_tok, d_in); one chunk's sum in float32, chunks summed in acc_dtype
                kk = (k.T @ k).to(acc_dtype).cpu()
                sums[name] = sums[name] + kk if name in sums else kk
            count += float(keep.sum())
            if bar is not None:
                bar.update(int(keep.sum()))
            if checkpoint_seconds and time.monotonic() - last_ck > checkpoint_seconds and gi + 1 < len(groups):
                meta = dict(ck_meta, next_group=str(gi + 1))
                with atomic_path(ck_path) as tmp:
                    save_file({**{k: v.contiguous() for k, v in sums.items()}, "count": count}, str(tmp), metadata=meta)
                last_ck = time.monotonic()
    if bar is not None:
        bar.close()
    if count == 0:
        raise CacheError(f"corpus {corpus!r} produced no tokens")
    ck_path.unlink(missing_ok=True)
    return {layer: (sums[str(layer)].to(torch.float64) / count).to(acc_dtype) for layer in layers}
