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
                              hyperparameters, request count, files and their sha256, and the
                              count of protected facts in the state after it
    batch-00001.safetensors   delta.<layer> (d_out, d_in) float32, keys.<layer> (B, d_in) float32
    batch-00001.json          the batch's requests
    state-00001.safetensors   earlier.<layer>: the Editor's sum of earlier keys after that batch
                              (edited and protected facts; the manifest says how many are protected)

A batch is in the ledger exactly when the manifest lists it: its files are written (atomically)
first, then the manifest is replaced atomically, so a process killed at any moment leaves the
previous complete ledger. Reading checks the format version, the base model, and every file's
checksum before any weight changes. ``Ledger.truncate`` (``Editor.undo``, ``lmedit ledger undo``)
drops the last batches the same way: the manifest write (or, dropping all, its removal) commits it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmedit._fs import atomic_path, read_safetensors, sha256_file
from lmedit._version import __version__
from lmedit.errors import CacheError
from lmedit.models.adapters import ModelAdapter

log = logging.getLogger(__name__)
FORMAT = "lmedit-ledger"
VERSION = 1  # bump when the layout changes; a ledger of another version is refused
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


class Ledger:
    """A ledger directory (see the module docstring); ``Ledger.create`` or ``Ledger.open``."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest

    @property
    def batches(self) -> list[dict[str, Any]]:
        return self.manifest["batches"]

    @property
    def n_requests(self) -> int:
        return sum(b["n_requests"] for b in self.batches)

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
        if manifest.get("version") != VERSION:
            raise CacheError(f"ledger {path} has layout version {manifest.get('version')!r} (written by lmedit "
                             f"{manifest.get('lmedit_version')}); this lmedit {__version__} reads version {VERSION}")
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
        protected facts it holds), then commit it in the manifest."""
        n = len(self.batches) + 1
        tensors = {f"delta.{l}": d.contiguous() for l, d in record.deltas.items()}
        tensors.update({f"keys.{l}": k.contiguous() for l, k in record.keys.items()})
        files = {"tensors": f"batch-{n:05d}.safetensors", "requests": f"batch-{n:05d}.json"}
        with atomic_path(self.path / files["tensors"]) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "batch": str(n)})
        with atomic_path(self.path / files["requests"]) as tmp:
            tmp.write_text(json.dumps(record.requests))
        state = self._write_state(n, earlier) if earlier else None
        old_state, old_protected = self.manifest.get("state"), self.manifest.get("protected", 0)
        if self.batches:  # a ledger written before batches recorded it: the count after its last batch
            self.batches[-1].setdefault("protected", old_protected)
        self.batches.append({"index": n, "method": record.method, "hparams": record.hparams,
                             "n_requests": len(record.requests), "layers": sorted(record.deltas),
                             "protected": protected,  # protected facts in the state after this batch
                             **{f"{k}_file": v for k, v in files.items()},
                             **{f"{k}_sha256": sha256_file(self.path / v) for k, v in files.items()}})
        self.manifest["state"] = state
        self.manifest["protected"] = protected
        self.manifest["lmedit_version"] = __version__
        try:
            self._write_manifest()
        except BaseException:
            self.batches.pop()
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
        leaves behind are unlisted, and overwritten as the ledger grows back.
        """
        n = len(self.batches)
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < n:
            raise CacheError(f"ledger {self.path} holds {n} batch(es): keep must be 0..{n - 1} to drop any, got {keep!r}")
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
        old_state, entries = self.manifest.get("state"), self.batches[keep:]
        if keep == 0:
            (self.path / MANIFEST).unlink()  # commits: no batch is listed any more
            self.manifest = {**self.manifest, "batches": [], "state": None}
        else:
            needed = protected or any(b["hparams"].get("preserve_edits") for b in self.batches[:keep])
            state = self._write_state(keep, earlier) if needed else None
            batches = [*self.batches[:keep - 1], {**self.batches[keep - 1], "protected": protected}]
            before, self.manifest = self.manifest, {**self.manifest, "batches": batches, "state": state}
            try:
                self._write_manifest()
            except BaseException:
                self.manifest = before
                raise
        for b in entries:
            for kind in ("tensors", "requests"):
                (self.path / b[f"{kind}_file"]).unlink(missing_ok=True)
        if old_state and old_state["file"] != (self.manifest["state"] or {}).get("file"):
            (self.path / old_state["file"]).unlink(missing_ok=True)
        return entries

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
        keys = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("keys.")}
        requests = json.loads((self.path / b["requests_file"]).read_text())
        return BatchRecord(b["method"], b["hparams"], requests, deltas, keys)

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
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1))

    def summary(self, model_norms: dict[int, float] | None = None) -> dict[str, Any]:
        """Batches, request count, methods, and per layer the Frobenius norm of the summed deltas."""
        norms = {l: float(t.norm()) for l, t in sorted(self.total_deltas().items())}
        out = {"path": str(self.path), "base_model": self.manifest["base_model"], "batches": len(self.batches),
               "requests": self.n_requests, "methods": sorted({b["method"] for b in self.batches}),
               "protected": self.manifest.get("protected", 0), "lmedit_version": self.manifest.get("lmedit_version"),
               "update_norm": norms}
        if model_norms:
            out["relative_change"] = {l: norms[l] / model_norms[l] for l in norms if l in model_norms}
        return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "ledger file")[1]
