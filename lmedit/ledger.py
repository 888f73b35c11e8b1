"""The edit ledger: every batch an Editor applied, on disk, so the base model plus the ledger is
the edited model, across restarts.

Example::

    editor = lmedit.Editor(model, tok, "encore", ledger="facts.ledger")   # appends each batch
    editor.edit(batch)
    ...                                                                     # later, in a new process:
    editor = lmedit.Editor.load(model, tok, "facts.ledger")                 # replays, bit for bit

Layout of a ledger directory::

    manifest.json             format, version, base model fingerprint, a sha256 of the base model's
                              edited weights, the context templates, and per batch: method,
                              hyperparameters, request count, files and their sha256, the
                              count of protected facts in the state after it, and the earlier
                              facts it superseded (supersede_edits: [batch, row] pairs)
    batch-00001.safetensors   delta.<layer> (d_out, d_in) float32, keys.<layer> (B, d_in) float32
    batch-00001.json          the batch's requests
    state-00001.safetensors   earlier.<layer>: the Editor's sum of earlier keys after that batch
                              (edited and protected facts; the manifest says how many are protected)
    compact-00040.safetensors after ``Ledger.compact`` (``lmedit ledger compact``): delta.<layer> float64,
    compact-00040.json        the exact total change of batches 1-40, which it replaces, and their keys
                              (keys.<batch>.<layer>); their requests stay, in one list; the manifest
                              entry lists the batches it holds

A batch is in the ledger exactly when the manifest lists it: its files are written (atomically)
first, then the manifest is replaced atomically, so a process killed at any moment leaves the
previous complete ledger. Reading checks the format version, the base model, and every file's
checksum before any weight changes. ``Ledger.truncate`` (``Editor.undo``, ``lmedit ledger undo``)
drops the last batches the same way: the manifest write (or, dropping all, its removal) commits it.

A long-lived ledger grows by a batch's deltas and keys (20.8 MB for 100 edits on the
embedded model) and replays every batch when loaded. ``Ledger.compact`` folds the first batches into
one exact total (measured on the base model, checked to rebuild the edited weights bit for bit): the
same edited model, one replay step, and of each folded batch only its keys (for ``supersede_edits``;
a seventh of a batch's size); those batches can then no longer be undone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmedit._fs import atomic_path, read_safetensors, sha256_file
from lmedit._version import __version__
from lmedit.core.weights import WeightTransaction, rebuilt, restore
from lmedit.errors import CacheError
from lmedit.models.adapters import ModelAdapter

log = logging.getLogger(__name__)
FORMAT = "lmedit-ledger"
VERSION = 2  # bump when the layout changes; a ledger of a version not in READS is refused
READS = (1, 2)  # 2: compacted entries and superseded facts; a version-1 ledger is appended to as version 2
MANIFEST = "manifest.json"


def base_weights_digest(model: nn.Module, adapter: ModelAdapter) -> str:
    """sha256 over every editable weight (the base model's, before any edit of the ledger)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for layer in range(adapter.n_layers(model)):
            w = adapter.stored(model, layer).detach()
            h.update(w.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class BatchRecord:
    """One batch as the ledger holds it."""

    method: str
    hparams: dict[str, Any]
    requests: list[dict[str, Any]]
    deltas: dict[int, torch.Tensor]  # layer -> (d_out, d_in) float32, as applied
    keys: dict[int, torch.Tensor]  # layer -> (B, d_in) float32 keys the solves used
    compacted: bool = False  # a compacted entry: deltas are the float64 total of the batches it holds
    superseded: list[list[int]] = field(default_factory=list)  # [batch index, row] of earlier facts it superseded
    carried: int = 0  # its last requests: earlier facts of its keys, edited again with it (share_key_targets)


def weighted_gram(keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i k_i k_i^T in float64, of keys (R, d_in) and weights (R,): superseded facts' share of the
    preserved sum."""
    k64 = keys.to(torch.float64)
    return (weights.to(torch.float64)[:, None] * k64).T @ k64


def replay(model: nn.Module, adapter: ModelAdapter, records: list[BatchRecord]) -> None:
    """Apply each batch's deltas in its own transaction, as they were applied (bit for bit; a compacted
    entry, always the first, as its exact float64 total); on any failure every weight is restored."""
    layers = sorted({l for r in records for l in r.deltas})
    originals = {l: adapter.stored(model, l).detach().to("cpu", copy=True) for l in layers}
    try:
        for record in records:
            with WeightTransaction(model, adapter) as tx:
                for layer, delta in sorted(record.deltas.items()):
                    tx.add(layer, delta, exact=record.compacted)
    except BaseException:
        restore(model, adapter, originals)
        raise


class Ledger:
    """A ledger directory (see the module docstring); ``Ledger.create`` or ``Ledger.open``."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self._checked: set[tuple[str, str]] = set()  # compacted files read_keys has checked (name, sha256)

    @property
    def batches(self) -> list[dict[str, Any]]:
        return self.manifest["batches"]

    @property
    def n_requests(self) -> int:
        """Requests edited, earlier facts carried again with a batch (``share_key_targets``) included."""
        return sum(b["n_requests"] for b in self.batches)

    @property
    def n_asked(self) -> int:
        """Requests the batches were given: :attr:`n_requests` without the earlier facts carried again."""
        return self.n_requests - sum(b.get("carried", 0) for b in self.edited_batches())

    @property
    def n_batches(self) -> int:
        """How many batches were edited into the ledger (a compacted entry counts the batches it holds)."""
        return len(self.edited_batches())

    @property
    def n_compacted(self) -> int:
        """How many of them are folded into the compacted first entry (0: none); they cannot be dropped."""
        return len(self.batches[0].get("compacted", ())) if self.batches else 0

    def edited_batches(self) -> list[dict[str, Any]]:
        """The manifest entries of the batches as they were edited, a compacted entry unfolded."""
        return _unfolded(self.batches)

    def edited_requests(self, records: list[BatchRecord]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(entry, requests) of each batch as edited, from ``records`` (every entry's ``read_batch``)."""
        out = []
        for b, record in zip(self.batches, records):
            start = 0
            for e in b.get("compacted") or [b]:
                out.append((e, record.requests[start:start + e["n_requests"]]))
                start += e["n_requests"]
        return out

    @classmethod
    def create(cls, path: str | Path, model: nn.Module, adapter: ModelAdapter, fingerprint: str,
               context: list[list[str]]) -> "Ledger":
        path = Path(path)
        if (path / MANIFEST).exists():
            raise CacheError(f"{path} holds a ledger already; open it with Editor.load to append")
        manifest = {"format": FORMAT, "version": VERSION, "lmedit_version": __version__, "base_model": fingerprint,
                    "model_type": adapter.model_type, "base_weights_sha256": base_weights_digest(model, adapter),
                    "context": context, "batches": [], "state": None}
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, manifest)  # the manifest is first written with the first batch

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        """Read and check the manifest (format, version); file checksums are checked when read."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CacheError(f"{path} is not a ledger: no {MANIFEST}") from None
        except (OSError, ValueError) as e:
            raise CacheError(f"ledger {path}: {MANIFEST} is unreadable or corrupt ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CacheError(f"{path} is not an lmedit ledger (no 'format: {FORMAT}' in {MANIFEST})")
        if manifest.get("version") not in READS:
            raise CacheError(f"ledger {path} has layout version {manifest.get('version')!r} (written by lmedit "
                             f"{manifest.get('lmedit_version')}); this lmedit {__version__} reads versions "
                             f"{', '.join(map(str, READS))}")
        return cls(path, manifest)

    def check_base(self, model: nn.Module, adapter: ModelAdapter, fingerprint: str) -> None:
        """Refuse a model that is not the ledger's base model (or is already edited)."""
        if self.manifest["base_model"] != fingerprint:
            raise CacheError(f"ledger {self.path} was written for model {self.manifest['base_model']}, this model is "
                             f"{fingerprint}; refusing to apply it")
        if base_weights_digest(model, adapter) != self.manifest["base_weights_sha256"]:
            raise CacheError(f"ledger {self.path}: this model's edited weights differ from the ledger's base model "
                             "(is it edited already? load the ledger onto a freshly loaded base model)")

    def append(self, record: BatchRecord, earlier: dict[int, torch.Tensor], protected: int = 0) -> None:
        """Write one batch (and the Editor's state after it: the sum of earlier keys, and how many
        protected facts it holds), then commit it in the manifest. Refused, with nothing written, when
        the ledger on disk is no longer the one this object read (another process appended, dropped or
        compacted batches since)."""
        self.check_unchanged()
        n = (self.batches[-1]["index"] if self.batches else 0) + 1
        tensors = {f"delta.{l}": d.contiguous() for l, d in record.deltas.items()}
        tensors.update({f"keys.{l}": k.contiguous() for l, k in record.keys.items()})
        files = {"tensors": f"batch-{n:05d}.safetensors", "requests": f"batch-{n:05d}.json"}
        with atomic_path(self.path / files["tensors"]) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "batch": str(n)})
        with atomic_path(self.path / files["requests"]) as tmp:
            tmp.write_text(json.dumps(record.requests))
        state = self._write_state(n, earlier) if earlier else None
        old_state, old_protected = self.manifest.get("state"), self.manifest.get("protected", 0)
        last_had = bool(self.batches) and "protected" in self.batches[-1]
        if self.batches:  # a ledger written before batches recorded it: the count after its last batch
            self.batches[-1].setdefault("protected", old_protected)
        self.batches.append({"index": n, "method": record.method, "hparams": record.hparams,
                             "n_requests": len(record.requests), "layers": sorted(record.deltas),
                             "protected": protected,  # protected facts in the state after this batch
                             **({"superseded": record.superseded} if record.superseded else {}),
                             **({"carried": record.carried} if record.carried else {}),
                             **{f"{k}_file": v for k, v in files.items()},
                             **{f"{k}_sha256": sha256_file(self.path / v) for k, v in files.items()}})
        self.manifest["state"] = state
        self.manifest["protected"] = protected
        self.manifest["lmedit_version"] = __version__
        try:
            self._write_manifest()
        except BaseException:
            self.batches.pop()
            if self.batches and not last_had:
                del self.batches[-1]["protected"]
            self.manifest["state"], self.manifest["protected"] = old_state, old_protected
            raise
        if old_state and (state is None or old_state["file"] != state["file"]):
            (self.path / old_state["file"]).unlink(missing_ok=True)

    def truncate(self, keep: int) -> list[dict[str, Any]]:
        """Drop every batch after the first ``keep``, so the base model plus the ledger is the model as it
        was after batch ``keep``; returns the dropped batches' manifest entries.

        The sum of earlier keys loses the dropped batches' keys (subtracted in float64, as
        ``Editor.undo`` does; with ``refresh_earlier_keys`` the next edit reads the sum again anyway).
        Protected facts stay protected (they are no edit; ``Editor.undo`` keeps them too), so dropping
        every batch of a ledger that holds some is refused: their keys' sum needs a batch to travel
        with. Refused, with nothing changed, when a dropped batch's files fail their checksums. The
        manifest write commits the truncation; with ``keep=0`` its removal does, and the directory is
        then no ledger until the next edit into it starts one. Files of dropped batches that a kill
        leaves behind are unlisted, and removed by the next truncation or compaction. The earlier facts a
        dropped batch superseded (``supersede_edits``) get their stored keys back in the sum. Compacted
        batches cannot be dropped; refused, too, when the ledger changed on disk since it was opened here.
        """
        self.check_unchanged()
        n = len(self.batches)
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < n:
            raise CacheError(f"ledger {self.path} holds {n} batch(es): keep must be 0..{n - 1} to drop any, got {keep!r}")
        if keep == 0 and self.n_compacted:
            raise CacheError(f"ledger {self.path}: its first {self.n_compacted} batches are compacted into one total and "
                             "can no longer be dropped; keep at least that entry")
        protected = self.manifest.get("protected", 0)
        if keep == 0 and protected:
            raise CacheError(f"ledger {self.path}: its {protected} protected facts travel with a batch (a ledger keeps "
                             "only their keys' sum); keep at least one batch, or start a new ledger and protect "
                             "them again")
        dropped = [self.read_batch(i) for i in range(keep, n)]  # every checksum before anything changes
        earlier = self.read_state()
        for record in reversed(dropped):
            if record.hparams.get("preserve_edits"):
                w = float(record.hparams.get("preserve_weight", 1.0))
                for l, k in record.keys.items():
                    k64 = k.to(torch.float64)
                    earlier[l] = earlier[l] - w * (k64.T @ k64)
                for l, g in self.superseded_gram(record.superseded).items():  # the facts it took out come back
                    earlier[l] = earlier[l] + g
        old_state, entries = self.manifest.get("state"), self.batches[keep:]
        if keep == 0:
            (self.path / MANIFEST).unlink()  # commits: no batch is listed any more
            self.manifest = {**self.manifest, "batches": [], "state": None}
        else:
            needed = protected or any(b["hparams"].get("preserve_edits") for b in _unfolded(self.batches[:keep]))
            state = self._write_state(self.batches[keep - 1]["index"], earlier) if needed else None
            batches = [*self.batches[:keep - 1], {**self.batches[keep - 1], "protected": protected}]
            before, self.manifest = self.manifest, {**self.manifest, "batches": batches, "state": state}
            try:
                self._write_manifest()
            except BaseException:
                self.manifest = before
                raise
        self._remove_unlisted()
        return entries

    def superseded_gram(self, pairs: list[list[int]]) -> dict[int, torch.Tensor]:
        """Per layer, sum w k k^T of the stored keys of the earlier facts ``pairs`` ([batch index, row]),
        each with its batch's preserve_weight: what superseding them took out of the preserved sum."""
        weights = {b["index"]: float(b["hparams"].get("preserve_weight", 1.0)) for b in self.edited_batches()}
        rows: dict[int, list[int]] = {}
        for batch, row in pairs:
            rows.setdefault(batch, []).append(row)
        out: dict[int, torch.Tensor] = {}
        for batch, rs in rows.items():
            keys = self.read_keys(batch)
            if not keys:  # a ledger compacted before folded keys were kept
                log.warning("ledger %s: batch %d's keys are not kept; %d fact(s) it superseded stay out of the "
                            "preserved sum", self.path, batch, len(rs))
                continue
            w = torch.full((len(rs),), weights[batch], dtype=torch.float64)
            for l, K in keys.items():
                g = weighted_gram(K[rs], w)
                out[l] = out[l] + g if l in out else g
        return out

    def _remove_unlisted(self) -> None:
        """Remove the ledger's own files (batch-, compact-, state-NNNNN.*) that the manifest no longer lists:
        those of dropped or folded batches, and any a killed process left behind."""
        listed = {b[f"{kind}_file"] for b in self.batches for kind in ("tensors", "requests")}
        listed |= {self.manifest["state"]["file"]} if self.manifest.get("state") else set()
        for f in self.path.iterdir():
            if _OWN_FILE.fullmatch(f.name) and f.name not in listed:
                f.unlink(missing_ok=True)

    def _write_state(self, n: int, earlier: dict[int, torch.Tensor]) -> dict[str, str]:
        """The sum of earlier keys after batch ``n``, as the file the manifest lists (written atomically)."""
        state = {"file": f"state-{n:05d}.safetensors"}
        with atomic_path(self.path / state["file"]) as tmp:
            save_file({f"earlier.{l}": e.contiguous() for l, e in earlier.items()}, str(tmp))
        state["sha256"] = sha256_file(self.path / state["file"])
        return state

    def read_batch(self, i: int) -> BatchRecord:
        """Batch ``i`` (0-based), its files checked against the manifest's checksums."""
        b = self.batches[i]
        for kind in ("tensors", "requests"):
            self._check_file(b[f"{kind}_file"], b[f"{kind}_sha256"])
        tensors = _read_tensors(self.path / b["tensors_file"])
        deltas = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("delta.")}
        keys = {} if "compacted" in b else {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("keys.")}
        requests = json.loads((self.path / b["requests_file"]).read_text())
        return BatchRecord(b["method"], b["hparams"], requests, deltas, keys, compacted="compacted" in b,
                           superseded=b.get("superseded", []), carried=b.get("carried", 0))

    def read_keys(self, batch: int) -> dict[int, torch.Tensor]:
        """The keys (layer -> (B, d_in) float32) batch number ``batch`` (its ``index``) stored, folded or not."""
        for b in self.batches:
            if b["index"] == batch and "compacted" not in b:
                return self.read_batch(self.batches.index(b)).keys
            if any(e["index"] == batch for e in b.get("compacted", ())):  # checked once, then only its keys read
                if (b["tensors_file"], b["tensors_sha256"]) not in self._checked:
                    self._check_file(b["tensors_file"], b["tensors_sha256"])
                    self._checked.add((b["tensors_file"], b["tensors_sha256"]))
                prefix = f"keys.{batch}."
                return {int(k[len(prefix):]): v for k, v in _read_tensors(self.path / b["tensors_file"], prefix).items()}
        raise CacheError(f"ledger {self.path} holds no batch {batch}")

    def compact(self, model: nn.Module, adapter: ModelAdapter, fingerprint: str, *, keep_last: int = 0) -> dict[str, Any]:
        """Fold every batch but the last ``keep_last`` into one entry: the exact float64 total change of
        each edited layer, measured by replaying them onto ``model`` (the ledger's base model, as for
        ``Editor.load``; it is left as it was). The edited model the ledger describes is unchanged bit for
        bit, and so are the lifelong state (the sum of earlier keys), every request and every key; what
        goes is the folded batches' own deltas, so they can no longer be dropped (``truncate``).

        Checked before anything is written: the base model, every folded file's checksum, and that
        base + total rebuilds every edited weight exactly. The manifest write commits the compaction
        (a kill before it leaves the ledger as it was); the folded batches' files are removed after it.
        Returns what was done: the batches folded, requests, and the ledger's bytes before and after.
        """
        n = len(self.batches)
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise CacheError(f"ledger {self.path}: keep_last must be a count of batches >= 0, got {keep_last!r}")
        k = n - keep_last
        if k < 2:
            raise CacheError(f"ledger {self.path}: nothing to compact (it holds {n} entr{'y' if n == 1 else 'ies'}, "
                             f"{keep_last} to keep as they are; compacting folds at least two)")
        self.check_unchanged()
        self.check_base(model, adapter, fingerprint)
        records = [self.read_batch(i) for i in range(k)]  # every checksum before anything runs
        total = self._exact_total(model, adapter, records)
        layers = sorted(total)
        before = self.size_bytes()
        last, folded = self.batches[k - 1], self.batches[:k]
        files = {"tensors": f"compact-{last['index']:05d}.safetensors", "requests": f"compact-{last['index']:05d}.json"}
        tensors = {f"delta.{l}": d.contiguous() for l, d in total.items()}
        for b, record in zip(folded, records):  # each folded batch's keys stay, for supersede_edits
            if "compacted" in b:  # (checked by read_batch above)
                tensors.update(_read_tensors(self.path / b["tensors_file"], "keys."))
            else:
                tensors.update({f"keys.{b['index']}.{l}": K.contiguous() for l, K in record.keys.items()})
        with atomic_path(self.path / files["tensors"]) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "compacted": str(k)})
        with atomic_path(self.path / files["requests"]) as tmp:
            tmp.write_text(json.dumps([q for r in records for q in r.requests]))
        held = [{f: v for f, v in e.items() if not f.endswith(("_file", "_sha256"))} for e in _unfolded(folded)]
        entry = {"index": last["index"], "method": last["method"], "hparams": last["hparams"],
                 "n_requests": sum(b["n_requests"] for b in folded), "layers": layers,
                 "protected": last.get("protected", self.manifest.get("protected", 0)), "compacted": held,
                 **{f"{kind}_file": v for kind, v in files.items()},
                 **{f"{kind}_sha256": sha256_file(self.path / v) for kind, v in files.items()}}
        old = self.manifest
        self.manifest = {**old, "batches": [entry, *self.batches[k:]], "lmedit_version": __version__}
        try:
            self._write_manifest()
        except BaseException:
            self.manifest = old
            for v in files.values():
                (self.path / v).unlink(missing_ok=True)
            raise
        self._remove_unlisted()
        return {"path": str(self.path), "compacted": len(held), "requests": entry["n_requests"],
                "kept": n - k, "bytes_before": before, "bytes_after": self.size_bytes()}

    def _exact_total(self, model: nn.Module, adapter: ModelAdapter, records: list[BatchRecord]) -> dict[int, torch.Tensor]:
        """Per layer, W_after - W_base in float64 for ``records`` replayed onto ``model`` (restored after),
        checked to rebuild every edited weight exactly."""
        layers = sorted({l for r in records for l in r.deltas})
        base = {l: adapter.stored(model, l).detach().to("cpu", copy=True) for l in layers}
        try:
            replay(model, adapter, records)
            edited = {l: adapter.stored(model, l).detach().to("cpu", copy=True) for l in layers}
        finally:
            restore(model, adapter, base)
        total = {}
        for l in layers:
            total[l] = adapter.as_out_in(edited[l]).double() - adapter.as_out_in(base[l]).double()
            if not torch.equal(rebuilt(adapter, base[l], total[l], edited[l]), edited[l]):
                raise CacheError(f"ledger {self.path}: layer {l}'s total change does not rebuild its edited weight "
                                 "exactly in float64; not compacted")
        return total

    def size_bytes(self) -> int:
        """The bytes of every file the manifest lists (and of the manifest)."""
        names = [MANIFEST, *(b[f"{kind}_file"] for b in self.batches for kind in ("tensors", "requests"))]
        if self.manifest.get("state"):
            names.append(self.manifest["state"]["file"])
        return sum((self.path / f).stat().st_size for f in names if (self.path / f).exists())

    def check_unchanged(self) -> None:
        """Refuse to write when the ledger on disk is not the one this object read (another writer)."""
        try:
            on_disk = json.loads((self.path / MANIFEST).read_text())["batches"]
        except FileNotFoundError:
            on_disk = []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"ledger {self.path}: {MANIFEST} is unreadable or corrupt ({e})") from e
        if on_disk != self.batches:
            raise CacheError(f"ledger {self.path} was changed by another writer since it was opened here "
                             f"({len(on_disk)} entries on disk, {len(self.batches)} here); nothing written: open it "
                             "again (Editor.load onto a fresh base model)")

    def total_deltas(self) -> dict[int, torch.Tensor]:
        """Per layer, the sum (float64) of every batch's delta: the base model plus these is the ledger's model."""
        total: dict[int, torch.Tensor] = {}
        for i in range(len(self.batches)):
            for l, d in self.read_batch(i).deltas.items():
                total[l] = total[l] + d.double() if l in total else d.double()
        return total

    def read_state(self) -> dict[int, torch.Tensor]:
        state = self.manifest.get("state")
        if not state:
            return {}
        self._check_file(state["file"], state["sha256"])
        return {int(k.split(".")[1]): v for k, v in _read_tensors(self.path / state["file"]).items()}

    def _check_file(self, name: str, sha256: str) -> None:
        f = self.path / name
        if not f.is_file():
            raise CacheError(f"ledger {self.path}: {name} is missing")
        if sha256_file(f) != sha256:
            raise CacheError(f"ledger {self.path}: {name} fails its sha256 checksum (corrupt or truncated)")

    def _write_manifest(self) -> None:
        self.manifest["version"] = VERSION  # an older lmedit refuses it rather than misreading new entries
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1))

    def summary(self, model_norms: dict[int, float] | None = None) -> dict[str, Any]:
        """Batches, request count, methods, protected and superseded facts, and per layer the Frobenius
        norm of the summed deltas."""
        norms = {l: float(t.norm()) for l, t in sorted(self.total_deltas().items())}
        out = {"path": str(self.path), "base_model": self.manifest["base_model"], "batches": self.n_batches,
               "compacted": self.n_compacted, "requests": self.n_requests,
               "methods": sorted({b["method"] for b in self.edited_batches()}),
               "protected": self.manifest.get("protected", 0),
               "superseded": sum(len(b.get("superseded", ())) for b in self.edited_batches()),
               "carried": sum(b.get("carried", 0) for b in self.edited_batches()),
               "lmedit_version": self.manifest.get("lmedit_version"), "update_norm": norms}
        if model_norms:
            out["relative_change"] = {l: norms[l] / model_norms[l] for l in norms if l in model_norms}
        return out


_OWN_FILE = re.compile(r"(batch-\d{5}\.(safetensors|json)|compact-\d{5}\.(safetensors|json)|state-\d{5}\.safetensors)")


def _unfolded(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifest entries with each compacted entry replaced by the entries of the batches it holds."""
    return [e for b in entries for e in (b.get("compacted") or [b])]


def _read_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    return read_safetensors(path, "ledger file", prefix)[1]
