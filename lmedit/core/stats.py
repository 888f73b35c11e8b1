"""Second-moment statistics C = E[k k^T] of the edited projections' inputs over a corpus.

Example: ``C = second_moments(model, tok, adapter, layers=[4, 5, 6, 7, 8])[4]  # (d_in, d_in)``

One forward pass over the corpus serves every requested layer: it reads all edited projections'
inputs and stops after the deepest one (the reference runs one pass per layer). C is the mean of
k k^T over all non-padding tokens (as the reference's ``layer_stats``). The corpus is cut into
chunks of at most ``max_tokens`` padded tokens (a fixed plan: the same chunks whoever computes
them); each chunk's sum is a float32 matmul, the chunks are summed in the accumulation dtype
(float64 by default, where adding float32 chunk sums is exact for all practical corpora, so the
result does not depend on the order of the chunks).

That makes the pass divisible: shard ``i`` of ``n`` takes chunks ``i, i+n, i+2n, ...``. Under
``torchrun`` (``torch.distributed`` initialised) each rank computes its shard and the float64
sums and token counts are all-reduced (gloo on CPU, NCCL on GPUs); rank 0 writes the cache. For
schedulers, :func:`accumulate` writes one shard's :class:`PartialSums` (checksummed, with the
plan they belong to) and :func:`merge_partials` combines them, refusing partials of another plan
and duplicate or missing shards.

Results are cached as safetensors, one file per layer, keyed by the model fingerprint, layer,
corpus, sample count, maximum length, forward dtype and accumulation dtype, with a checksum of the
tensor; a corrupt or mismatched file is recomputed with a warning. Long runs write a checkpoint
(per shard) and resume from it after an interruption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmedit._fs import atomic_path, cache_root, read_safetensors
from lmedit._version import __version__
from lmedit.core.corpus import corpus_id, load_corpus
from lmedit.core.tokens import pad, pad_id, token_chunks
from lmedit.distributed import from_main, local_device, rank_world
from lmedit.errors import CacheError
from lmedit.hooks import Trace
from lmedit.models.adapters import ModelAdapter
from lmedit.models.loading import fingerprint
from lmedit.models.precision import ACCUMULATE_DTYPES, model_device, working_copy

log = logging.getLogger(__name__)


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.contiguous().cpu().numpy())).hexdigest()  # the bytes, hashed in place


@dataclass(frozen=True)
class StatsPlan:
    """Everything the sums depend on: model, layers, corpus, sample plan and dtypes."""

    model: str
    layers: tuple[int, ...]
    corpus: str  # corpus_id(): a name, or a file's name, size and mtime
    n_samples: int
    max_length: int
    dtype: str
    forward_dtype: str
    max_tokens: int

    def meta(self) -> dict[str, str]:
        return {"model": self.model, "layers": ",".join(map(str, self.layers)), "corpus": self.corpus,
                "n_samples": str(self.n_samples), "max_length": str(self.max_length), "dtype": self.dtype,
                "forward_dtype": self.forward_dtype, "max_tokens": str(self.max_tokens)}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> "StatsPlan":
        return cls(meta["model"], tuple(int(x) for x in meta["layers"].split(",")), meta["corpus"],
                   int(meta["n_samples"]), int(meta["max_length"]), meta["dtype"], meta["forward_dtype"],
                   int(meta["max_tokens"]))

    def layer_meta(self, layer: int) -> dict[str, str]:
        """The metadata of one layer's cache file (chunking does not change C, so it is not in it)."""
        return {"model": self.model, "layer": str(layer), "corpus": self.corpus, "n_samples": str(self.n_samples),
                "max_length": str(self.max_length), "dtype": self.dtype, "forward_dtype": self.forward_dtype}

    def key(self, *extra: str) -> str:
        return hashlib.sha256(json.dumps([self.meta(), *extra], sort_keys=True).encode()).hexdigest()[:16]


def stat_path(directory: str | Path, meta: dict[str, str]) -> Path:
    """Where the cache file of one layer's C lives under ``directory``."""
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory) / meta["model"] / f"layer{meta['layer']}-{key}.safetensors"


def read_stat_file(path: Path, expect: dict[str, str]) -> torch.Tensor:
    """Read a cached C and check its metadata and checksum; raise CacheError if anything is off."""
    meta, tensors = read_safetensors(path, "statistics file")
    if "mom2" not in tensors:
        raise CacheError(f"statistics file {path} holds no 'mom2' tensor (corrupt, or not a statistics file)")
    C = tensors["mom2"]
    for k, v in expect.items():
        if meta.get(k) != v:
            raise CacheError(f"statistics file {path}: {k} is {meta.get(k)!r}, expected {v!r}")
    if meta.get("sha256") != _checksum(C):
        raise CacheError(f"statistics file {path}: checksum mismatch (corrupt file)")
    if not torch.isfinite(C).all():
        raise CacheError(f"statistics file {path} contains NaN or inf")
    return C


def write_moments(directory: str | Path, plan: StatsPlan, moments: dict[int, torch.Tensor]) -> list[Path]:
    """Write each layer's C as a checked cache file (atomically); returns the paths."""
    paths = []
    for layer, C in moments.items():
        meta = plan.layer_meta(layer)
        path = stat_path(directory, meta)
        meta.update(sha256=_checksum(C), lmedit_version=__version__)
        with atomic_path(path) as tmp:
            save_file({"mom2": C.contiguous().cpu()}, str(tmp), metadata=meta)
        paths.append(path)
    return paths


@dataclass
class PartialSums:
    """Sums of k k^T (accumulation dtype) and the token count of shard ``shard = (i, n)`` of a plan."""

    plan: StatsPlan
    shard: tuple[int, int]
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def moments(self) -> dict[int, torch.Tensor]:
        """C per layer (the plan's accumulation dtype, on CPU); only meaningful for a whole plan.

        Divides float64 CPU sums in place (this object holds the moments afterwards), so a large
        model's C costs no second copy of its sums (five 8,960-wide layers: 3.2 GB)."""
        if self.count == 0:
            raise CacheError(f"corpus {self.plan.corpus!r} produced no tokens")
        out_dtype = ACCUMULATE_DTYPES[self.plan.dtype]
        for l in self.plan.layers:
            self.sums[l] = self.sums[l].to("cpu", torch.float64).div_(self.count).to(out_dtype)
        self.count = 1
        return {l: self.sums[l] for l in self.plan.layers}

    def filename(self) -> str:
        i, n = self.shard
        return f"partial-{self.plan.key()}-{i:04d}-of-{n:04d}.safetensors"

    def save(self, directory: str | Path) -> Path:
        """Write the partial sums with their plan, shard and a checksum (atomically)."""
        tensors = {f"sum.{l}": self.sums[l].contiguous().cpu() for l in self.plan.layers}
        meta = dict(self.plan.meta(), shard=f"{self.shard[0]}/{self.shard[1]}", count=str(self.count),
                    lmedit_version=__version__,
                    sha256=json.dumps({k: _checksum(v) for k, v in tensors.items()}, sort_keys=True))
        path = Path(directory) / self.filename()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PartialSums":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            plan = StatsPlan.from_meta(meta)
            i, n = (int(x) for x in meta["shard"].split("/"))
            sums = json.loads(meta["sha256"])
            count = int(meta["count"])
        except Exception as e:  # unreadable, truncated, or not a partial-sums file
            raise CacheError(f"{path} is not a readable statistics partial ({type(e).__name__}: {e})") from e
        for k, v in tensors.items():
            if sums.get(k) != _checksum(v):
                raise CacheError(f"{path}: checksum mismatch in {k} (corrupt file)")
        if set(tensors) != {f"sum.{l}" for l in plan.layers}:
            raise CacheError(f"{path}: holds {sorted(tensors)}, expected sums for layers {list(plan.layers)}")
        return cls(plan, (i, n), {l: tensors[f"sum.{l}"] for l in plan.layers}, count)


def merge_partials(parts: Sequence[PartialSums]) -> PartialSums:
    """The whole plan from its shards; refuses another plan, duplicate or missing shards."""
    if not parts:
        raise CacheError("no statistics partials to merge")
    first = parts[0]
    for p in parts[1:]:
        a, b = first.plan.meta(), p.plan.meta()
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            raise CacheError(f"statistics partials of different plans: {', '.join(f'{k} {a[k]!r} vs {b[k]!r}' for k in diff)}")
        if p.shard[1] != first.shard[1]:
            raise CacheError(f"statistics partials cut into {first.shard[1]} and {p.shard[1]} shards")
    n = first.shard[1]
    seen = [p.shard[0] for p in parts]
    dup = sorted({i for i in seen if seen.count(i) > 1})
    if dup:
        raise CacheError(f"duplicate statistics shard(s) {dup} of {n}")
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise CacheError(f"missing statistics shard(s) {missing} of {n}")
    ordered = sorted(parts, key=lambda p: p.shard[0])
    sums = {l: sum((p.sums[l].to(torch.float64) for p in ordered[1:]), ordered[0].sums[l].to(torch.float64))
            for l in first.plan.layers}
    dtype = ACCUMULATE_DTYPES[first.plan.dtype]
    return PartialSums(first.plan, (0, 1), {l: s.to(dtype) for l, s in sums.items()}, sum(p.count for p in parts))


def load_partials(directories: Sequence[str | Path]) -> list[PartialSums]:
    """Every ``partial-*.safetensors`` file in the given directories."""
    files = [f for d in directories for f in sorted(Path(d).glob("partial-*.safetensors"))]
    if not files:
        raise CacheError(f"no statistics partials (partial-*.safetensors) in {', '.join(map(str, directories))}")
    return [PartialSums.load(f) for f in files]


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8), with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"shard must be i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def make_plan(model: nn.Module, layers: Sequence[int], *, corpus: str = "wikipedia-excerpt", n_samples: int = 2000,
              max_length: int = 1024, dtype: str = "float64", forward_dtype: str = "model", max_tokens: int = 8192,
              model_fingerprint: str | None = None) -> StatsPlan:
    if dtype not in ACCUMULATE_DTYPES:
        raise ValueError(f"statistics dtype must be one of {list(ACCUMULATE_DTYPES)}, got {dtype!r}")
    if n_samples < 1 or max_length < 1 or max_tokens < 1:
        raise ValueError(f"n_samples, max_length and max_tokens must be >= 1 (got {n_samples}, {max_length}, {max_tokens})")
    return StatsPlan(model_fingerprint or fingerprint(model), tuple(layers), corpus_id(corpus), n_samples, max_length,
                     dtype, forward_dtype, max_tokens)


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
    """C per layer (float64 or float32, (d_in, d_in), on CPU), from the cache or one pass over the corpus.

    ``forward_dtype="bfloat16"`` runs the pass on a bfloat16 copy of the model (about 4x faster
    matmuls on CPUs with AVX512-BF16 and on GPUs); the accumulation stays in ``dtype``.
    ``cache_dir`` is the cache directory (``None``: the lmedit cache; a fresh directory recomputes).
    Under torch.distributed every rank calls this; each computes its shard of the corpus.
    """
    for layer in layers:
        adapter.block(model, layer)  # range check with a clear message
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    plan = make_plan(model, layers, corpus=corpus, n_samples=n_samples, max_length=max_length, dtype=dtype,
                     forward_dtype=forward_dtype, max_tokens=max_tokens, model_fingerprint=model_fingerprint)
    rank, world = rank_world()
    import torch.distributed as tdist

    dist = tdist if world > 1 else None
    result: dict[int, torch.Tensor] = {}
    for layer in layers:
        path = stat_path(directory, plan.layer_meta(layer))
        if path.exists():
            try:
                result[layer] = read_stat_file(path, plan.layer_meta(layer))
            except CacheError as e:
                log.warning("%s; recomputing", e)
    missing = [l for l in layers if l not in result]
    missing = from_main(missing)  # every rank computes the same layers (rank 0's view of the cache decides)
    if missing:
        sub = dataclasses.replace(plan, layers=tuple(missing))
        shard = (rank, world)
        part = accumulate(model, tokenizer, adapter, sub, corpus=corpus, shard=shard, checkpoint_dir=directory,
                          checkpoint_seconds=checkpoint_seconds, progress=progress and shard[0] == 0)
        if dist is not None:
            _all_reduce(part)
        computed = part.moments()
        if shard[0] == 0:
            write_moments(directory, sub, computed)
        if dist is not None:
            dist.barrier()
        remove_checkpoint(directory, sub, shard)  # only once the result is on disk
        result.update(computed)
    return {layer: result[layer] for layer in layers}


def _all_reduce(part: PartialSums) -> None:
    """Sum every rank's partial sums and token count in place (float64; on this rank's accelerator
    under NCCL, else on CPU with gloo)."""
    import torch.distributed as dist

    on = local_device() or torch.device("cpu")
    for l in part.plan.layers:
        t = part.sums[l].to(on, torch.float64)
        dist.all_reduce(t)
        part.sums[l] = t.to("cpu", ACCUMULATE_DTYPES[part.plan.dtype])
    n = torch.tensor([part.count], dtype=torch.float64, device=on)
    dist.all_reduce(n)
    part.count = int(n.item())
    part.shard = (0, 1)


def gram(k: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """k^T k (d, d) from k (n, d), computing only the column blocks on and above the diagonal.

    The result is symmetric by construction and costs (1 + 1/b) / 2 of the full product for
    ``b`` blocks (6 by default for d >= 768: 58 %; measured 0.24 s instead of 0.39 s for 8,192 x
    1,536 in float32 on one CPU thread). Same float32 rounding as a full product, other order.
    """
    d = k.shape[1]
    blocks = blocks if blocks is not None else (6 if d >= 768 else 1)
    if blocks <= 1:
        return k.T @ k
    edge = [round(i * d / blocks) for i in range(blocks + 1)]
    out = torch.empty(d, d, dtype=k.dtype, device=k.device)
    for i in range(blocks):
        a, b = edge[i], edge[i + 1]
        part = k[:, a:b].T @ k[:, a:]  # (b - a, d - a): row block i against itself and every later column
        out[a:b, a:] = part
        out[a:, a:b] = part.T
    return out


class _Checkpoint:
    """Partial sums of an interrupted pass over one shard, keyed by its plan and shard: one file per
    layer and save (``checkpoint-<key>-<layer>-<next chunk>.safetensors``), so a save holds one
    layer's serialised copy at a time (a 1.5B model's five 8,960-wide float64 sums are 3.2 GB); a
    save is complete once every layer's file of it is written, and only then are older ones removed."""

    def __init__(self, directory: Path, plan: StatsPlan, shard: tuple[int, int]) -> None:
        self.meta = dict(plan.meta(), shard=f"{shard[0]}/{shard[1]}")
        self.dir = directory / plan.model
        self.stem = f"checkpoint-{plan.key(self.meta['shard'])}"
        self.names = [str(l) for l in plan.layers]
        self.path = self.dir / f"{self.stem}.safetensors"  # the one-file layout of earlier versions, still read

    def _files(self) -> dict[int, dict[str, Path]]:
        """{next chunk: {layer name: file}} of the saves on disk."""
        out: dict[int, dict[str, Path]] = {}
        for f in self.dir.glob(f"{self.stem}-*-*.safetensors"):
            name, _, group = f.name[len(self.stem) + 1:-len(".safetensors")].rpartition("-")
            if name in self.names and group.isdigit():
                out.setdefault(int(group), {})[name] = f
        return out

    def _read(self, files: dict[str, Path]) -> tuple[dict[str, torch.Tensor], int, int] | None:
        sums, seen = {}, set()
        for name, f in files.items():
            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata() or {}
                if not all(meta.get(k) == v for k, v in self.meta.items()):
                    return None
                seen.add((meta["count"], meta["next_group"]))
                sums.update({k: fh.get_tensor(k) for k in fh.keys()})
        if len(seen) != 1:
            return None
        count, group = seen.pop()
        return sums, int(count), int(group)

    def load(self) -> tuple[dict[str, torch.Tensor], int, int]:
        """(sums per layer, token count, next chunk of this shard) of the latest complete save; empty when
        there is no usable checkpoint."""
        saves = [files for _, files in sorted(self._files().items(), reverse=True) if set(files) == set(self.names)]
        if self.path.exists():
            saves.append({"*": self.path})
        for files in saves:
            try:
                got = self._read(files)
            except Exception as e:  # safetensors raises several types on truncated/corrupt files
                log.warning("ignoring unreadable statistics checkpoint %s (%s)", sorted(files.values())[0], e)
                continue
            if got is not None:
                return got
        return {}, 0, 0

    def save(self, sums: dict[str, torch.Tensor], count: int, next_group: int) -> None:
        meta = dict(self.meta, next_group=str(next_group), count=str(count))
        for name, v in sums.items():
            with atomic_path(self.dir / f"{self.stem}-{name}-{next_group}.safetensors") as tmp:
                save_file({name: v.contiguous().cpu()}, str(tmp), metadata=meta)
        for group, files in self._files().items():
            if group != next_group:
                for f in files.values():
                    f.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    def remove(self) -> None:
        for files in self._files().values():
            for f in files.values():
                f.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def remove_checkpoint(directory: str | Path | None, plan: StatsPlan, shard: tuple[int, int] = (0, 1)) -> None:
    """Remove the checkpoint of ``plan``'s shard; call it once what :func:`accumulate` returned is saved
    (a process killed while writing the result resumes from the checkpoint instead of starting over)."""
    _Checkpoint(Path(directory) if directory is not None else cache_root() / "stats", plan, shard).remove()


def accumulate(model: nn.Module, tokenizer, adapter: ModelAdapter, plan: StatsPlan, *, corpus: str,
               shard: tuple[int, int] = (0, 1), checkpoint_dir: str | Path | None = None,
               checkpoint_seconds: float = 60.0, progress: bool = True) -> PartialSums:
    """The sums of shard ``shard`` of ``plan``: chunks ``i, i+n, ...`` of the corpus (``corpus`` is
    the name or path the plan's corpus id was made from). The last checkpoint stays until the caller
    has saved the result (:func:`remove_checkpoint`)."""
    from tqdm.auto import tqdm

    if corpus_id(corpus) != plan.corpus:
        raise CacheError(f"corpus {corpus!r} is {corpus_id(corpus)!r} now, the plan was made for {plan.corpus!r}")
    i, n = shard
    texts = load_corpus(corpus, plan.n_samples)
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=plan.max_length)["input_ids"]
    groups = token_chunks([len(x) for x in enc], plan.max_tokens)[i::n]
    ck = _Checkpoint(Path(checkpoint_dir) if checkpoint_dir is not None else cache_root() / "stats", plan, shard)
    sums, count, start = ck.load()
    if start:
        log.info("resuming statistics from checkpoint %s at chunk %d/%d", ck.dir / ck.stem, start, len(groups))
    acc = ACCUMULATE_DTYPES[plan.dtype]
    label = f"statistics L{plan.layers[0]}-{plan.layers[-1]}" + (f" shard {i}/{n}" if n > 1 else "")
    bar = tqdm(total=sum(len(enc[j]) for g in groups for j in g), desc=label, unit="tok", unit_scale=True,
               disable=not progress, initial=sum(len(enc[j]) for g in groups[:start] for j in g))
    last_ck, wait = time.monotonic(), checkpoint_seconds
    with bar, working_copy(model, plan.forward_dtype) as work, torch.no_grad():
        mods = {str(layer): adapter.edit_module(work, layer) for layer in plan.layers}
        device = model_device(work)
        for gi in range(start, len(groups)):
            ids, mask = pad([enc[j] for j in groups[gi]], pad_id(tokenizer), side="right")
            with Trace(mods, capture="input", stop=True) as tr:
                work(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            keep = mask.bool()
            for name, x in tr.inputs.items():
                k = x[keep.to(x.device)].float()  # (n_tok, d_in), on the edited module's device
                kk = gram(k)  # one chunk's sum in float32; chunks summed in the accumulation dtype, in place
                if name in sums:
                    sums[name].add_(kk.to(sums[name].device))
                else:
                    sums[name] = kk.to(acc)
            count += int(keep.sum())
            bar.update(int(keep.sum()))
            if checkpoint_seconds and time.monotonic() - last_ck > wait and gi + 1 < len(groups):
                t_save = time.monotonic()
                ck.save(sums, count, gi + 1)
                last_ck = time.monotonic()
                wait = max(checkpoint_seconds, 20 * (last_ck - t_save))  # saves take at most about 5 % of the pass
    d_in = {str(l): adapter.weight(model, l).shape[1] for l in plan.layers}
    return PartialSums(plan, shard, {l: sums.get(str(l), torch.zeros(d_in[str(l)], d_in[str(l)], dtype=acc))
                                     for l in plan.layers}, count)
