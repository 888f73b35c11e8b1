"""The Editor: one model, one method, and everything a series of edits needs, held explicitly.

Example::

    editor = lmedit.Editor(model, tok, method="emmet")        # preset matched from the architecture
    result = editor.edit([lmedit.EditRequest("The mother tongue of {} is", "Danielle Darrieux",
                                             "English", "French")])
    editor.undo()                                              # the exact original weights again

An Editor owns the model's adapter, the resolved hyperparameters, the statistics C it loaded, the
context templates it generated (once, then shared by every edit, as the reference code does) and
the history of its edits (the undo stack). Nothing is stored on the model object: two Editors of
one model are independent, and each refuses to undo an edit whose weights were written again
after it (by the other Editor, or by anything else).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmedit._fs import cache_root
from lmedit._runtime import memory_budget, parse_bytes, release_freed_memory
from lmedit.chat import chat_groups, has_chat_template
from lmedit.core.context import cached_context_templates
from lmedit.core.distribute import LayerSystem, Pieces, distribute
from lmedit.core.keys import collect_keys, state_bytes
from lmedit.core.solvers import null_space_basis
from lmedit.core.stats import second_moments
from lmedit.core.targets import (TargetResult, anchor_norms, compute_targets, key_order, passes_device, plan_chunks,
                                 read_targets, reference_norm, shared_key_groups, shared_keys, write_targets)
from lmedit.core.weights import AppliedEdit, WeightTransaction, restore
from lmedit.deltas import read_deltas, write_deltas
from lmedit.errors import CacheError, HyperparameterError, LmeditError, RequestError
from lmedit.ledger import BatchRecord, Ledger, replay, weighted_gram
from lmedit.methods import EditHParams, get_method
from lmedit.models.adapters import ModelAdapter, get_adapter
from lmedit.models.loading import fingerprint
from lmedit.models.precision import compute_dtype, model_device, model_dtype, solve_device, sync_weights, working_copy
from lmedit.presets import resolve_hparams
from lmedit.requests import EditRequest, as_requests

log = logging.getLogger(__name__)
_STATE_IDS = itertools.count(1)  # ids of weight states, unique in the process


class EditState(str, Enum):
    APPLIED = "applied"  # on its Editor's history; undo() restores the weights before it
    UNDONE = "undone"
    SEALED = "sealed"  # applied, but it can no longer be undone (see EditResult.why)


@dataclass
class EditResult:
    """What one :meth:`Editor.edit` (or :meth:`Editor.apply_deltas`) changed, and how to take it back."""

    editor: "Editor" = field(repr=False)
    method: str
    preset: str
    hparams: EditHParams | None  # None for a delta file of an unknown method
    requests: list[EditRequest]
    applied: AppliedEdit = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    targets: TargetResult | None = field(default=None, repr=False)
    layer_info: list[dict[int, dict[str, float]]] = field(default_factory=list)  # per batch (per request for ROME)
    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # layer -> (B, d_in) keys the solves used
    state: EditState = EditState.APPLIED
    why: str = ""  # why a SEALED edit cannot be undone
    state_before: int = field(default=0, repr=False)  # the Editor's weights state before this edit
    ledger_batch: dict | None = field(default=None, repr=False)  # the ledger's entry of this edit's batch, if any
    # supersede_edits: the earlier facts this edit took out of the preserved set (their places in
    # Editor.earlier_facts) and, per layer, their stored keys (R, d_in) and weights (R,) it subtracted
    superseded: list[tuple[int, "_Fact"]] = field(default_factory=list, repr=False)
    released: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    batch_id: int = field(default=0, repr=False)  # names this edit's keys for later supersede_edits lookups
    # share_key_targets with supersede_edits: earlier edited facts that share a key with a request of this
    # edit, edited again with it (the last requests of ``requests``) so that their key's one value serves them too
    carried: list[EditRequest] = field(default_factory=list, repr=False)

    @property
    def model(self) -> nn.Module:
        return self.editor.model

    @property
    def adapter(self) -> ModelAdapter:
        return self.editor.adapter

    @property
    def base_fingerprint(self) -> str:
        return self.editor.base_fingerprint

    @property
    def layers(self) -> list[int]:
        return sorted(self.applied.deltas)

    @property
    def deltas(self) -> dict[int, torch.Tensor]:
        """Per layer, the applied update (d_out, d_in), float32."""
        return self.applied.deltas

    def hparams_record(self) -> dict[str, Any]:
        """``{"preset": ..., **hyperparameters}`` as plain JSON values."""
        return {"preset": self.preset, **(self.hparams.to_dict() if self.hparams is not None else {})}

    def undo(self) -> None:
        """Restore the weights this edit changed, bit-exactly. Later edits must be undone first."""
        self.editor.undo(self)

    def save_lora(self, path: str | Path, *, rank: int | None = None, max_error: float | None = None):
        """Write this edit's updates as a peft LoRA adapter directory (see :mod:`lmedit.lora`)."""
        from lmedit.lora import save_lora

        return save_lora(path, self.deltas, self.model, self.adapter, rank=rank, max_error=max_error,
                         meta={"method": self.method, "hparams": self.hparams_record(),
                               "requests": [r.to_dict() for r in self.requests], "base_fingerprint": self.base_fingerprint})

    def save_deltas(self, path: str | Path) -> Path:
        """Write the updates as safetensors (with method, layers, requests and base fingerprint)."""
        return write_deltas(path, self.deltas, self.adapter, method=self.method, hparams=self.hparams_record(),
                            requests=[r.to_dict() for r in self.requests], base_fingerprint=self.base_fingerprint)


class Editor:
    """Edits ``model`` in place with one method; see the module docstring.

    ``hparams`` (an instance of the method's dataclass) or the preset matched from the architecture
    (``preset`` names another; ``"none"``: generic layers) gives the hyperparameters, ``overrides``
    change single values. ``covariances`` supplies C per layer instead of statistics; ``context``
    supplies the context-template groups (``[["{}"], [...], ...]``). ``keep_history=False`` is for long
    sequential runs: no copy of the original weights is kept, so memory stays flat, and edits
    cannot be undone. ``ledger`` names a new ledger directory (``lmedit.ledger``) that every edit
    is appended to before it commits; reopen it with :meth:`Editor.load`. ``stats_dir``: where
    statistics are cached and looked for (default: lmedit's cache; ``lmedit stats --out DIR`` writes
    such a directory). ``progress`` shows progress bars. ``memory_budget`` (bytes, or e.g. ``"8GB"``;
    default ``LMEDIT_MEMORY_BUDGET``, else the memory available when an edit starts) bounds the
    target optimisation: requests are optimised in smaller chunks where a chunk would need more, and
    a request that alone needs more is refused before any work. Three quarters of it may hold the
    hidden states a multi-layer distribution keeps between its key passes.
    """

    def __init__(self, model: nn.Module, tokenizer, method: str | None = None, *, hparams: EditHParams | None = None,
                 preset: str | None = None, covariances: Mapping[int, torch.Tensor] | None = None,
                 context: Sequence[Sequence[str]] | None = None, keep_history: bool = True, progress: bool = False,
                 ledger: str | Path | None = None, stats_dir: str | Path | None = None,
                 memory_budget: str | int | None = None, **overrides: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.memory_budget = memory_budget
        if memory_budget is not None:
            parse_bytes(memory_budget)  # a bad value fails here, not at the first edit
        self.stats_dir = Path(stats_dir) if stats_dir is not None else None
        self.adapter = get_adapter(model)
        self.adapter.check(model)
        method = method or (_method_of(hparams) if hparams is not None else "emmet")
        self.method = get_method(method).name
        self.preset, self.hparams = resolve_hparams(model, self.method, preset, hparams, **overrides)
        self.base_fingerprint = fingerprint(model, self.adapter)
        self.keep_history, self.progress = keep_history, progress
        self.history: list[EditResult] = []
        self._given_C = None if covariances is None else self._checked_covariances(covariances)
        self._C: dict[tuple, torch.Tensor] = {}  # statistics loaded so far, by (layer, statistics settings)
        self._context: dict[tuple, list[list[str]]] = {}
        self._null: dict[tuple, torch.Tensor] = {}  # AlphaEdit's null-space bases, by (layer, energy)
        self._on_device: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # C copied to a GPU solve device
        # Lifelong state: per layer, the float64 sum K_p K_p^T of the keys of this Editor's edits made
        # with preserve_edits (what later edits preserve), and how many edits it holds.
        self.earlier: dict[int, torch.Tensor] = {}
        self.n_protected = 0  # facts whose keys protect() added to that sum
        # the facts behind that sum, for refresh_earlier_keys: (prompt, subject) of each preserved edit, and
        # each protected fact with its weight (None: protected in a ledger, which keeps only their keys' sum)
        self.earlier_facts: list[_Fact] = []
        self.protected_facts: list[tuple[_Fact, float]] | None = []
        self._n_sealed = 0  # edits applied with keep_history=False (their deltas are not kept)
        if context is not None:
            self._context[(self.hparams.context_templates, self.hparams.seed)] = _checked_context(context)
        self._id = next(_STATE_IDS)  # names this Editor in target provenance (unlike id(), never reused)
        self._state = 0  # id of the weights state as this Editor last saw it (0: as given)
        self._seen = self._param_versions()
        self._digest: tuple[int, str] = (-1, "")  # (weights state, its digest), see _weights_digest
        self._ledger_path = Path(ledger) if ledger is not None else None
        if self._ledger_path is not None and (self._ledger_path / "manifest.json").exists():
            raise CacheError(f"{self._ledger_path} holds a ledger already; open it with Editor.load to append to it")
        self.ledger: Ledger | None = None  # created at the first edit (from the weights as they are then)

    @property
    def n_earlier(self) -> int:
        """How many edited facts the preserved sum holds (superseded ones left it)."""
        return len(self.earlier_facts)

    # --- what edits are built from ------------------------------------------------------------
    def covariances(self, hp: EditHParams | None = None) -> dict[int, torch.Tensor]:
        """C per edited layer: given, or loaded (computed once, then cached on disk and here)."""
        hp = hp or self.hparams
        if self._given_C is not None:
            missing = [l for l in hp.layers if l not in self._given_C]
            if missing:
                raise HyperparameterError(f"covariances: no matrix for layer(s) {missing} (given: {sorted(self._given_C)})")
            return {l: self._given_C[l] for l in hp.layers}
        if not hp.mom2_adjustment:
            return {l: torch.eye(self.adapter.weight(self.model, l).shape[1], dtype=torch.float64) for l in hp.layers}
        key = (hp.mom2_corpus, hp.mom2_n_samples, hp.mom2_max_length, hp.mom2_dtype, hp.mom2_forward_dtype)
        missing = [l for l in hp.layers if (l, key) not in self._C]
        if missing:
            got = second_moments(self.model, self.tokenizer, self.adapter, missing, corpus=hp.mom2_corpus,
                                 n_samples=hp.mom2_n_samples, max_length=hp.mom2_max_length, dtype=hp.mom2_dtype,
                                 forward_dtype=hp.mom2_forward_dtype, model_fingerprint=self.base_fingerprint,
                                 cache_dir=self.stats_dir, progress=self.progress)
            self._C.update({(l, key): C for l, C in got.items()})
        return {l: self._C[(l, key)] for l in hp.layers}

    def context(self, hp: EditHParams | None = None) -> list[list[str]]:
        """The context-template groups, generated from the model on first use and then shared."""
        hp = hp or self.hparams
        key = (hp.context_templates, hp.seed)
        if key not in self._context:  # generated once per model and settings, then read from the cache
            self._context[key] = cached_context_templates(
                self.model, self.tokenizer, hp.context_templates, seed=hp.seed, fingerprint=self.base_fingerprint,
                directory=(self.stats_dir or cache_root()) / "context")
        return self._context[key]

    def template_groups(self, hp: EditHParams | None = None) -> list[list[str]]:
        """The groups targets are optimised and keys read with: :meth:`context`, and with
        ``chat_prompts`` the same groups inside the user turn of the tokenizer's chat template."""
        hp = hp or self.hparams
        groups = self.context(hp)
        if hp.chat_prompts == "on" or (hp.chat_prompts == "auto" and has_chat_template(self.tokenizer)):
            groups = groups + chat_groups(self.tokenizer, groups)
        elif hp.chat_prompts == "bare":
            groups = groups + chat_groups(self.tokenizer, groups[:1])
        return groups

    def systems(self, hp: EditHParams, C: dict[int, torch.Tensor],
                earlier: dict[int, torch.Tensor] | None = None) -> dict[int, LayerSystem]:
        """Per edited layer, what the closed form reads besides R and K (``earlier``: the sum of
        earlier keys to preserve, default this Editor's; read only with ``preserve_edits``)."""
        earlier = self.earlier if earlier is None else earlier
        out = {}
        for layer in hp.layers:
            dev = solve_device(self.adapter.edit_module(self.model, layer))
            Cl = self._placed(layer, C[layer], dev)
            basis = None
            if hp.needs_null_space:
                key = (layer, hp.nullspace_energy, id(Cl))
                if key not in self._null:
                    self._null[key] = null_space_basis(Cl, hp.nullspace_energy)
                basis = self._null[key]
            prev = earlier.get(layer) if hp.preserve_edits else None
            out[layer] = LayerSystem(Cl, None if prev is None else prev.to(dev), basis)
        return out

    def _placed(self, layer: int, C: torch.Tensor, dev: torch.device) -> torch.Tensor:
        """C on the device its layer's solve runs on (``solve_device``), copied there once per
        statistics tensor and kept (the CPU tensor itself where the solve runs on the CPU)."""
        if C.device == dev:
            return C
        key = (layer, id(C), str(dev))  # the entry keeps C alive, so its id is not reused meanwhile
        if key not in self._on_device:
            self._on_device[key] = (C, C.to(dev))
        return self._on_device[key][1]

    def protect(self, facts: Sequence[Any], *, weight: float = 1.0) -> int:
        """Add the keys of ``facts`` to the preserved set, so later edits keep what the model now says
        about them (with ``preserve_edits``: ENCORE, AlphaEdit, or MEMIT / EMMET with the option).

        ``facts``: :class:`EditRequest`, tracing ``Fact`` or anything with a ``prompt`` template (one
        "{}" for the subject) and a ``subject`` (objects or mappings). Each fact's key at every edited
        layer is read as an edit's key is (the subject's last token, averaged over the context
        templates) from the weights as they are now, and ``weight * k k^T`` joins the sum of earlier
        keys: in the closed form a protected fact counts like an earlier edit. A ledger records the
        sum with the next batch. Returns how many facts are protected in all.
        """
        if not self.hparams.preserve_edits:
            raise HyperparameterError(f"protect() adds keys to the preserved set, which {self.method} reads only with "
                                      "preserve_edits=True (on by default for encore and alphaedit)")
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
            raise HyperparameterError(f"protect: weight must be a positive finite number, got {weight!r}")
        checked = [_protected_fact(f, i) for i, f in enumerate(facts)]
        if not checked:
            return self.n_protected
        hp = self.hparams
        groups = self.template_groups(hp)
        K = collect_keys(self.model, self.tokenizer, self.adapter, checked, groups, hp.layers)
        earlier = dict(self.earlier)  # committed only once every layer is computed
        for l, k in K.items():
            k64 = k.to(torch.float64)
            earlier[l] = weight * (k64.T @ k64) + (earlier[l] if l in earlier else 0)
        self.earlier, self.n_protected = earlier, self.n_protected + len(checked)
        if self.protected_facts is not None:
            self.protected_facts.extend((f, float(weight)) for f in checked)
        return self.n_protected

    def _checked_covariances(self, given: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        out = {}
        for layer, C in given.items():
            C = torch.as_tensor(C)
            d_in = self.adapter.weight(self.model, layer).shape[1]
            if C.shape != (d_in, d_in):
                raise HyperparameterError(f"covariances[{layer}] has shape {tuple(C.shape)}, expected ({d_in}, {d_in})")
            if not torch.isfinite(C).all():
                raise HyperparameterError(f"covariances[{layer}] contains NaN or inf")
            out[layer] = C
        return out

    # --- editing -------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest | Mapping[str, Any]] | EditRequest, *,
             targets: TargetResult | None = None, **overrides: Any) -> EditResult:
        """Edit the model so that each request's prompt continues with its ``target_new``; atomic.

        ``overrides`` change hyperparameters for this edit only. ``targets`` reuses the target
        vectors of an earlier edit of the same requests by this Editor (``result.targets``, after
        that edit was undone), e.g. to sweep lambda without re-optimising; they are refused unless
        layer, target settings, templates, requests and the weights state match.
        """
        t_start = time.perf_counter()
        reqs = as_requests(requests)
        hp = resolve_hparams(self.model, self.method, hparams=self.hparams, **overrides)[1] if overrides else self.hparams
        carried = self._carried(reqs, hp, targets)
        reqs = reqs + carried  # supersede_edits takes their earlier keys out: the new one holds them all
        timings: dict[str, float] = {}
        groups = self.template_groups(hp)
        self._check_edit(reqs, hp, groups, targets)
        measured = hp.norm_anchor and not hp.norm_reference  # the first batch measures the reference
        t0 = time.perf_counter()
        C = self.covariances(hp)
        timings["stats_s"] = time.perf_counter() - t0
        state_before = self.weights_state()
        if self._ledger_path is not None and self.ledger is None:
            self.ledger = Ledger.create(self._ledger_path, self.model, self.adapter, self.base_fingerprint,
                                        self.context(hp))
        superseded, released = self._superseded(reqs, hp, targets)
        with WeightTransaction(self.model, self.adapter) as tx:
            parts, infos, keys, earlier, hp = self._apply(tx, reqs, hp, groups, C, targets, timings,
                                                          [i for i, _ in superseded], released)
            if self.ledger is not None:  # the manifest write commits the batch; a failure rolls the edit back
                self.ledger.append(BatchRecord(self.method, {"preset": self.preset, **hp.to_dict()},
                                               [r.to_dict() for r in reqs], tx.record.deltas, keys,
                                               superseded=[[f.batch, f.row] for _, f in superseded],
                                               carried=len(carried)),
                                   earlier if hp.preserve_edits else self.earlier, self.n_protected)
        timings["total_s"] = time.perf_counter() - t_start
        batch_id = self.ledger.batches[-1]["index"] if self.ledger is not None else next(_STATE_IDS)
        result = EditResult(self, self.method, self.preset, hp, reqs, tx.record, timings, TargetResult.concat(parts),
                            infos, keys, state_before=state_before,
                            ledger_batch=dict(self.ledger.batches[-1]) if self.ledger is not None else None,
                            superseded=superseded, released=released, batch_id=batch_id, carried=carried)
        if hp.preserve_edits:
            gone = {i for i, _ in superseded}
            self.earlier = earlier
            self.earlier_facts = [f for i, f in enumerate(self.earlier_facts) if i not in gone] + [
                _Fact(r.prompt, r.subject, hp.preserve_weight, batch_id, row, r) for row, r in enumerate(reqs)]
        if measured and (hp.layers[-1], hp.site) == (self.hparams.layers[-1], self.hparams.site):
            # a property of the unedited model at this target layer and site: kept for later edits
            self.hparams = self.hparams.replace(norm_reference=hp.norm_reference)
        self._record(result)
        # An edit frees gigabytes of temporaries that glibc would keep in the process (resident memory
        # growing edit after edit); costs milliseconds. It does not stop a long editing process from
        # slowing down (benchmarks/heap_trim.py, results/README.md): that cause is not found yet.
        release_freed_memory()
        return result

    def _check_edit(self, reqs: list[EditRequest], hp: EditHParams, groups: list[list[str]],
                    targets: TargetResult | None) -> None:
        """Everything ``edit`` refuses before any work: prompts too long, targets= that do not fit, a
        request beyond the memory budget, anchoring and refresh settings it cannot honour, a ledger
        another writer changed (the append checks that again)."""
        self._check_lengths(reqs, groups)
        if targets is not None:
            self._check_reusable(targets, reqs, groups, hp)
        else:  # refuses a request that cannot fit the memory budget, before any work
            self._target_chunks(reqs, [t for g in groups for t in g], hp)
        if hp.norm_anchor:
            self._check_anchoring(hp, targets)
        if hp.preserve_edits and hp.refresh_earlier_keys and self.protected_facts is None:
            raise HyperparameterError(f"refresh_earlier_keys: the {self.n_protected} protected fact(s) of this "
                                      "Editor's ledger cannot be read again (a ledger keeps only their keys' sum); "
                                      "edit without refresh_earlier_keys, or start from the base model and protect "
                                      "them again")
        if self.ledger is not None:
            self.ledger.check_unchanged()

    def _check_anchoring(self, hp: EditHParams, targets: TargetResult | None) -> None:
        if self.adapter.post_mlp_norm is not None:
            raise HyperparameterError(f"norm_anchor: {self.adapter.model_type} normalises the MLP output before the "
                                      "residual add, so a value vector's norm is not what reaches the residual "
                                      "stream; norm anchoring is defined for blocks without that norm")
        if not hp.norm_reference and self.weights_state() != 0:  # edits, a ledger replay or an outside write
            raise HyperparameterError("norm_anchor needs norm_reference, the value vectors' norm on the unedited "
                                      "model: the weights have changed since this Editor was made, so it cannot be "
                                      "measured now; set norm_reference, or begin anchoring with the first edit")
        if targets is not None and targets.value is None:
            raise HyperparameterError("norm_anchor: the given target vectors carry no value vectors (a file written "
                                      "by an older lmedit); compute them afresh")

    @staticmethod
    def _anchored(tr: TargetResult, hp: EditHParams) -> tuple[TargetResult, EditHParams]:
        """Norm-Anchor Scaling of one batch's targets (the first batch measures the reference); the
        result's provenance records the reference, so that it is not reused unanchored."""
        if not hp.norm_reference:
            hp = hp.replace(norm_reference=reference_norm(tr.value))
        out = anchor_norms(tr, hp.norm_reference)
        out.provenance = {**tr.provenance, "norm_reference": hp.norm_reference}
        return out, hp

    def _apply(self, tx: WeightTransaction, reqs: list[EditRequest], hp: EditHParams, groups: list[list[str]],
               C: dict[int, torch.Tensor], given: TargetResult | None, timings: dict[str, float],
               superseded: list[int], released: dict[int, tuple[torch.Tensor, torch.Tensor]],
               ) -> tuple[list[TargetResult], list[dict], dict, dict, EditHParams]:
        """Targets, then the distribution over layers, per batch (one batch, or one per request for ROME).

        Returns the target parts, per-batch diagnostics, the new sum of earlier keys (with
        preserve_edits; committed by the caller only if the whole edit succeeds) and the
        hyperparameters (with the norm reference, where the first batch measured it). ``superseded``
        (places in ``earlier_facts``) and ``released`` (their stored keys and weights) leave the preserved
        set first, on every layer (with ``refresh_earlier_keys`` the edited layers are then read again)."""
        from tqdm.auto import tqdm

        if self.adapter.post_mlp_norm is not None and len(hp.layers) > 1 and hp.distribution != "single":
            log.warning("%s normalises each MLP output before the residual add (%s): edits shared over layers %s "
                        "land weakly or blow the weights up there (results/gemma_postnorm); one layer with "
                        "distribution='single' and target_site='mlp' lands (the gemma-3-270m preset)",
                        self.adapter.model_type, self.adapter.post_mlp_norm, list(hp.layers))
        batches = [[r] for r in reqs] if hp.sequential else [reqs]
        flat = [t for g in groups for t in g]
        parts, infos, keys = [], [], {}
        earlier = {l: e - weighted_gram(*released[l]) if l in released else e for l, e in self.earlier.items()}
        gone = set(superseded)
        facts = [f for i, f in enumerate(self.earlier_facts) if i not in gone]
        if hp.preserve_edits and hp.refresh_earlier_keys and (self.earlier_facts or self.protected_facts):
            # once, before this edit's first write (a sequential method's later requests add their keys as
            # read; the layer it edits cannot move them); layers this edit does not touch keep their sums
            t0 = time.perf_counter()
            read = self._read_earlier(hp, groups, facts) if facts or self.protected_facts else {}
            for l in hp.layers:  # every fact superseded and none protected: nothing is left to preserve there
                earlier.pop(l, None)
            earlier.update(read)
            timings["refresh_s"] = time.perf_counter() - t0
        edited = [self.adapter.edit_param_name(l) for l in hp.layers]
        with self._work_model(hp, given is None and hp.sequential) as shared, \
                tqdm(batches, desc=f"{self.method} requests", unit="req", disable=not (self.progress and hp.sequential)) as bar:
            for batch in bar:
                t0 = time.perf_counter()
                tr = given if given is not None else self._targets(shared, batch, flat, hp, len(batches) == 1)
                if hp.norm_anchor:
                    tr, hp = self._anchored(tr, hp)
                timings["targets_s"] = timings.get("targets_s", 0.0) + time.perf_counter() - t0
                systems = self.systems(hp, C, earlier)
                info, t, K = distribute(hp.distribution, Pieces(
                    self.model, self.tokenizer, self.adapter, tx, batch, groups, hp.layers, tr.targets, systems,
                    hp.solver(), hp.joint_form, hp,
                    state_bytes(memory_budget(model_device(self.model), self.memory_budget))))
                for l, k in K.items():
                    keys[l] = torch.cat([keys[l], k]) if l in keys else k
                    if hp.preserve_edits:  # a new tensor: self.earlier is untouched until the edit commits
                        k64 = k.to(torch.float64)
                        earlier[l] = hp.preserve_weight * (k64.T @ k64) + (earlier[l] if l in earlier else 0)
                for k, v in t.items():
                    timings[k] = timings.get(k, 0.0) + v
                if shared is not None:
                    sync_weights(shared, self.model, edited)  # the next request's targets see this edit
                parts.append(tr)
                infos.append(info)
        return parts, infos, keys, earlier, hp

    def _carried(self, reqs: list[EditRequest], hp: EditHParams, targets: TargetResult | None) -> list[EditRequest]:
        """``share_key_targets`` with ``supersede_edits``: the earlier edited facts that share a key with a
        request of this edit but are not asked again by it (another relation of a subject, read from the
        same tokens). They are edited again with it: one target vector for the key serves them all, and
        their earlier keys leave the preserved set (which would hold the key's output where it was).
        Without them, the new fact and the earlier one pull one key two ways (results/README.md, "Two
        facts read from one key"). Not with ``targets=`` (computed without them; a warning), nor for a
        sequential method (one request at a time)."""
        if not (hp.preserve_edits and hp.supersede_edits and hp.share_key_targets) or hp.sequential:
            return []
        asked = {(r.prompt, r.subject) for r in reqs}
        subjects = {r.subject for r in reqs}
        earlier = {(f.prompt, f.subject): f.request for f in self.earlier_facts
                   if f.request is not None and f.subject in subjects and (f.prompt, f.subject) not in asked}
        if not earlier:
            return []
        candidates = list(earlier.values())
        groups = shared_key_groups(self.tokenizer, list(reqs) + candidates)
        mine = set(groups[:len(reqs)])
        found = [r for r, g in zip(candidates, groups[len(reqs):]) if g in mine]
        if found and targets is not None:
            if targets.provenance.get("requests") == [(r.prompt, r.subject, r.target_new) for r in [*reqs, *found]]:
                return found  # the vectors of an edit that carried them (result.targets, reused after undo)
            log.warning("share_key_targets: %d earlier edited fact(s) share a key with these requests, but the given "
                        "targets were computed without them; their keys stay preserved", len(found))
            return []
        return found

    def _superseded(self, reqs: list[EditRequest], hp: EditHParams, targets: TargetResult | None = None,
                    ) -> tuple[list[tuple[int, "_Fact"]], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """``supersede_edits``: the earlier edited facts (place in ``earlier_facts``, fact) that a request of
        this edit asks again (the same subject and prompt), and per layer their stored keys (R, d_in) and
        weights (R,), whose w k k^T leaves the preserved sum. Other facts that share a key (the same
        subject after the same text) stay, unless :meth:`_carried` appended them to ``reqs`` (then they
        are asked again); kept by an edit without them, the earlier one holds better (results/README.md,
        "Two facts read from one key"). A fact whose key is not kept stays, with a warning (with
        ``refresh_earlier_keys`` it leaves the facts read again, and the sums of the layers this edit
        does not touch keep it)."""
        if not (hp.preserve_edits and hp.supersede_edits and self.earlier_facts):
            return [], {}
        new = {(r.prompt, r.subject) for r in reqs}  # the same fact: its subject and prompt (as a batch's conflicts)
        hits = [(i, f) for i, f in enumerate(self.earlier_facts) if (f.prompt, f.subject) in new]
        stored: dict[int, dict[int, torch.Tensor] | None] = {}
        rows: dict[int, list[tuple[torch.Tensor, float]]] = {}  # per layer: (stored key, its weight)
        found = []
        for i, f in hits:
            if f.batch not in stored:
                stored[f.batch] = self._stored_keys(f.batch)
            if stored[f.batch] is None:
                if not hp.refresh_earlier_keys:
                    log.warning("supersede_edits: the key of the earlier edit of %r (%r) is not kept (no ledger, "
                                "keep_history=False); it stays in the preserved set", f.subject, f.prompt)
                    continue
            else:
                for l, K in stored[f.batch].items():
                    rows.setdefault(l, []).append((K[f.row], f.weight))
            found.append((i, f))
        if found and targets is not None and "other_weights" in targets.provenance:
            log.warning("supersede_edits: these targets were computed on other weights and know nothing of the "
                        "earlier edit(s) of %d fact(s) they replace; edit with supersede_edits=False to keep those",
                        len(found))
        return found, {l: (torch.stack([k for k, _ in r]), torch.tensor([w for _, w in r], dtype=torch.float64))
                       for l, r in rows.items()}

    def _stored_keys(self, batch: int) -> dict[int, torch.Tensor] | None:
        """The keys (layer -> (B, d_in)) an earlier batch of this Editor stored, or None where none are kept."""
        if self.ledger is not None and batch:
            return self.ledger.read_keys(batch) or None
        return next((r.keys for r in self.history if r.batch_id == batch and batch), None)

    def _read_earlier(self, hp: EditHParams, groups: list[list[str]], facts: list["_Fact"]) -> dict[int, torch.Tensor]:
        """The sum of earlier keys (``refresh_earlier_keys``) read again on the weights as they are before
        this edit writes: this edit's ``preserve_weight`` * k k^T of each earlier edited fact plus
        weight * k k^T of each protected fact, per layer of ``hp.layers`` (float64). Read a chunk of
        facts at a time, sized so that their activations fit the memory budget's share for kept states."""
        weighted = [(f, hp.preserve_weight) for f in facts] + list(self.protected_facts or [])
        d_in = max(int(self.adapter.weight(self.model, l).shape[1]) for l in hp.layers)
        per_fact = 4 * d_in * len(hp.layers) * sum(len(g) for g in groups)  # float32 activations read per fact
        step = max(1, state_bytes(memory_budget(model_device(self.model), self.memory_budget)) // per_fact)
        out: dict[int, torch.Tensor] = {}
        for start in range(0, len(weighted), step):
            part = weighted[start:start + step]
            K = collect_keys(self.model, self.tokenizer, self.adapter, [f for f, _ in part], groups, hp.layers)
            w = torch.tensor([x for _, x in part], dtype=torch.float64)[:, None]
            for l, k in K.items():
                k64 = k.to(torch.float64)
                out[l] = (w * k64).T @ k64 + (out[l] if l in out else 0)
        return out

    @contextmanager
    def _work_model(self, hp: EditHParams, needed: bool) -> Iterator[nn.Module | None]:
        """A working copy in the compute dtype kept for the whole edit (sequential methods), or None."""
        if not needed:
            yield None
            return
        with working_copy(self.model, hp.compute_dtype) as work:
            yield work

    def _targets(self, shared: nn.Module | None, batch: list[EditRequest], templates: list[str], hp: EditHParams,
                 progress: bool) -> TargetResult:
        def run(work: nn.Module) -> TargetResult:
            tr = compute_targets(work, self.tokenizer, self.adapter, batch, templates, hp.layers[-1], hp,
                                 anchor=hp.site, progress=self.progress and progress,
                                 budget=memory_budget(model_device(work), self.memory_budget))
            tr.provenance = self._provenance(batch, templates, hp)
            return tr
        if shared is not None:
            return run(shared)
        with working_copy(self.model, hp.compute_dtype) as work:  # freed before the keys are read
            return run(work)

    # --- target vectors on their own ----------------------------------------------------------
    def compute_targets(self, requests: Sequence[EditRequest | Mapping[str, Any]] | EditRequest,
                        **overrides: Any) -> TargetResult:
        """The target vectors an edit of ``requests`` would optimise now, without editing anything.

        Example: ``tr = editor.compute_targets(reqs); editor.edit(reqs, targets=tr, mom2_update_weight=1e4)``

        Pass them to :meth:`edit` (``targets=``), or write them with :meth:`save_targets` and read them
        back in another process, or into another Editor whose method shares the target layer, site,
        settings and templates (MEMIT and EMMET with the embedded preset), with :meth:`load_targets`.
        Target vectors do not depend on how requests are chunked, so a large batch can be computed
        piece by piece and joined with ``TargetResult.concat`` (benchmarks/distributions.py resumes so),
        as long as no two requests that share a key (``share_key_targets``) fall in different pieces:
        their one vector is optimised for both, and an edit refuses pieces computed apart.
        """
        reqs = as_requests(requests)
        hp = resolve_hparams(self.model, self.method, hparams=self.hparams, **overrides)[1] if overrides else self.hparams
        if hp.sequential:
            raise HyperparameterError(f"{self.method} computes each request's target after the previous request's "
                                      "edit; its targets cannot be computed ahead of the edit")
        groups = self.template_groups(hp)
        self._check_lengths(reqs, groups)
        flat = [t for g in groups for t in g]
        self._target_chunks(reqs, flat, hp)  # refuses a request that cannot fit the memory budget
        return self._targets(None, reqs, flat, hp, True)

    def save_targets(self, targets: TargetResult, path: str | Path) -> Path:
        """Write target vectors computed by this Editor on its current weights to ``path`` (safetensors,
        atomically), with what they were computed from and a digest of the weights."""
        prov = targets.provenance if isinstance(targets, TargetResult) else None
        if not prov or prov.get("editor") != self._id:
            raise HyperparameterError("save_targets takes target vectors computed by this Editor "
                                      "(compute_targets, or the .targets of one of its edits)")
        if prov.get("weights_state") != self.weights_state():
            raise HyperparameterError("the weights changed since these target vectors were computed; they no longer "
                                      "describe this model (undo back to that state, or compute them afresh)")
        keep = {k: v for k, v in prov.items() if k not in ("editor", "weights_state", "other_weights")}
        if "other_weights" in prov:  # loaded with allow_other_weights: they keep the weights they came from
            if prov["other_weights"] is None:
                raise HyperparameterError("these target vectors came from a file that did not say which weights they "
                                          "were computed on; they cannot be written as if they described any")
            keep["weights"] = prov["other_weights"]  # (no "base": which one is not kept; the digest covers it)
        else:
            keep.update(weights=self._weights_digest(), base=self.base_fingerprint)
        write_targets(path, targets, keep)
        return Path(path)

    def load_targets(self, path: str | Path, *, allow_other_weights: bool = False) -> TargetResult:
        """Target vectors written by :meth:`save_targets`, for :meth:`edit` (``targets=``).

        Refused (CacheError, nothing changes) unless they were computed on exactly these weights: the
        same base model with the same edits applied. ``allow_other_weights=True`` takes them from other
        weights of this architecture, e.g. vectors precomputed on the unedited model and applied after
        other edits (the frozen-targets protocol of ``benchmarks/lifelong.py``): the edit then moves the
        current outputs to those targets, which the current model may no longer need or reach; the
        result's provenance keeps ``other_weights`` (the digest they came from). ``edit`` then checks
        requests, layer, site, settings and templates as for any reused targets."""
        result, prov = read_targets(path)
        digest = self._weights_digest()
        if prov.get("weights") != digest:
            if not allow_other_weights:
                raise CacheError(f"targets file {path} was computed on other weights (another base model, or this "
                                 "one with other edits applied); compute the targets afresh")
            base = prov.get("base")  # files written before it was recorded lack it: the width check remains
            if base is not None and base != self.base_fingerprint:
                raise CacheError(f"targets file {path} was computed on another base model; compute the targets "
                                 "afresh")
            layer = prov.get("layer")
            ok = isinstance(layer, int) and 0 <= layer < self.adapter.n_layers(self.model)
            width = int(self.adapter.weight(self.model, layer).shape[0]) if ok else None
            if width is None or tuple(result.targets.shape[1:]) != (width,):
                raise CacheError(f"targets file {path} holds vectors of shape {tuple(result.targets.shape[1:])} "
                                 f"for layer {layer}; this model's are ({width},)")
        result.provenance = {**{k: v for k, v in prov.items() if k not in ("weights", "base")}, "editor": self._id,
                             "weights_state": self.weights_state()}  # checked above; files with and without join
        if prov.get("weights") != digest:
            result.provenance["other_weights"] = prov.get("weights")
        return result

    def _weights_digest(self) -> str:
        """sha256 of the base fingerprint and every editable weight, bit for bit (cached per weights state)."""
        state = self.weights_state()
        if self._digest[0] != state:
            h = hashlib.sha256(self.base_fingerprint.encode())
            with torch.no_grad():
                for l in range(self.adapter.n_layers(self.model)):
                    w = self.adapter.stored(self.model, l).detach().contiguous()  # offloaded ones too
                    h.update(w.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
            self._digest = (state, h.hexdigest())
        return self._digest[1]

    def _target_chunks(self, reqs: list[EditRequest], templates: list[str], hp: EditHParams) -> list[tuple[int, int]]:
        """The chunks the target optimisation of ``reqs`` will run in under the memory budget (see
        :func:`lmedit.core.targets.plan_chunks`); estimated for the compute dtype it will run in."""
        device = model_device(self.model)
        budget = memory_budget(passes_device(self.model, self.adapter, hp.layers[-1]), self.memory_budget)
        dtype = compute_dtype(hp.compute_dtype, device)
        scale = 1.0 if dtype is None else torch.finfo(dtype).bits / torch.finfo(model_dtype(self.model)).bits
        order, groups = key_order(self.tokenizer, reqs, hp.share_key_targets and not hp.sequential)
        return plan_chunks(self.model, self.tokenizer, self.adapter, [reqs[i] for i in order], templates, hp.layers[-1],
                           1 if hp.sequential else hp.chunk_requests, None if budget is None else int(budget / scale),
                           groups=groups)

    def _check_lengths(self, reqs: list[EditRequest], groups: list[list[str]]) -> None:
        """Refuse, before any work, a request that with its longest context template and its target
        is longer than the model's context."""
        cfg = self.model.config
        n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if not n_ctx:
            return
        longest = max(len(self.tokenizer(t.replace("{}", ""))["input_ids"]) for g in groups for t in g)
        for i, r in enumerate(reqs):
            n = len(self.tokenizer(r.text + " " + r.target_new)["input_ids"]) + longest
            if n > n_ctx:
                raise RequestError(f"request {r.case_id if r.case_id is not None else i}: prompt, target and the longest "
                                   f"context template take {n} tokens, more than the model's context of {n_ctx}")

    def _provenance(self, reqs: Sequence[EditRequest], templates: Sequence[str], hp: EditHParams) -> dict:
        """What target vectors depend on, compared before they are reused (``shared_keys`` only where
        requests of the batch share a target vector)."""
        prov = {"editor": self._id, "weights_state": self.weights_state(), "layer": hp.layers[-1],
                "anchor": hp.site, "config": hp.target_settings(), "templates": list(templates),
                "requests": [(r.prompt, r.subject, r.target_new) for r in reqs]}
        shared = shared_keys(self.tokenizer, reqs) if hp.share_key_targets and not hp.sequential else []
        if shared:
            prov["shared_keys"] = shared
        return prov

    def _check_reusable(self, targets: TargetResult, reqs: list[EditRequest], groups: list[list[str]],
                        hp: EditHParams) -> None:
        """Refuse target vectors that were computed for other requests, settings or weights."""
        if hp.sequential:
            raise HyperparameterError("targets= cannot be reused with a sequential method (ROME computes each "
                                      "request's target after the previous request's edit)")
        if not isinstance(targets, TargetResult) or not targets.provenance:
            raise HyperparameterError("targets= takes the .targets of an earlier EditResult of this Editor")
        want = self._provenance(reqs, [t for g in groups for t in g], hp)
        for key, what in (("editor", "another Editor (reuse targets within one Editor)"),
                          ("weights_state", "the model's weights as they were then (undo the edit that produced "
                           "them, and nothing else, before reusing them)"), ("requests", "other requests"),
                          ("layer", "another target layer"), ("anchor", "another target site (method or target_site)"),
                          ("config", "other target-optimisation settings"), ("templates", "other context templates"),
                          ("shared_keys", "other groups of requests sharing a key (share_key_targets, or a selection "
                           "that splits such a group)")):
            if targets.provenance.get(key) != want.get(key):
                raise HyperparameterError(f"targets= were computed for {what}; compute them afresh")
        if targets.provenance.get("norm_reference") and not hp.norm_anchor:
            raise HyperparameterError("targets= were rescaled by norm_anchor; reuse them with norm_anchor=True (any "
                                      "reference: the rescaling keeps their direction) or compute them afresh")

    # --- history -------------------------------------------------------------------------------
    def _record(self, result: EditResult) -> None:
        self._state = next(_STATE_IDS)
        self._seen = self._param_versions()
        if self.keep_history:
            self.history.append(result)
            return
        if self.history:
            log.warning("edit applied with keep_history=False: the %d earlier edit(s) of this Editor can no "
                        "longer be undone", len(self.history))
        for r in self.history:
            r.state, r.why = EditState.SEALED, "a later edit was made with keep_history=False on top of it"
        self._n_sealed += len(self.history) + 1
        self.history.clear()
        result.applied.originals.clear()
        result.state = EditState.SEALED
        result.why = "it was made with keep_history=False, so no copy of the original weights was kept"

    def undo(self, result: EditResult | None = None) -> EditResult:
        """Undo ``result`` (default: the latest edit), bit-exactly; edits are undone newest first. With a
        ledger, the edit's batch is dropped from it first (``Ledger.truncate``)."""
        if result is None:
            if not self.history:
                raise LmeditError("nothing to undo: this Editor's history is empty")
            result = self.history[-1]
        if result.state is EditState.UNDONE:
            raise LmeditError("this edit was already undone")
        if result.state is EditState.SEALED:
            raise LmeditError(f"this edit cannot be undone: {result.why}")
        if result not in self.history:
            raise LmeditError("this edit is not on this Editor's history")
        later = len(self.history) - 1 - self.history.index(result)
        if later:
            raise LmeditError(f"undo the {later} later edit(s) first (edits are undone in reverse order)")
        changed = result.applied.changed_since(self.model, self.adapter)
        if changed:
            raise LmeditError(f"the weights of layer(s) {changed} were changed after this edit (by another Editor, "
                              "an lmedit.edit call or a write outside lmedit); undo that change first")
        if self.ledger is not None:  # the edit's batch leaves the ledger first (the ledger is never ahead)
            if result.ledger_batch is None:
                raise LmeditError(f"this edit is not in the ledger {self.ledger.path} (apply_deltas writes none), so "
                                  "undoing it would leave the ledger behind the weights")
            on_disk = Ledger.open(self.ledger.path) if (self.ledger.path / "manifest.json").exists() else None
            last = on_disk.batches[-1] if on_disk is not None and on_disk.batches else None  # as it is now
            if last is None or (last["index"], last["tensors_sha256"]) != (result.ledger_batch["index"],
                                                                            result.ledger_batch["tensors_sha256"]):
                raise LmeditError(f"the ledger {self.ledger.path} does not end with this edit's batch (was it changed "
                                  "by another process or by Ledger.truncate?); reload the base model and the ledger")
            on_disk.truncate(len(on_disk.batches) - 1)
            self.ledger = on_disk
        restore(self.model, self.adapter, result.applied.originals)
        if result.hparams is not None and result.hparams.preserve_edits:
            for l, k in result.keys.items():  # take the edit's keys out of the preserved set again
                k64 = k.to(torch.float64)
                self.earlier[l] = self.earlier[l] - result.hparams.preserve_weight * (k64.T @ k64)
            for l, (K, w) in result.released.items():  # and the facts it superseded back in
                self.earlier[l] = self.earlier[l] + weighted_gram(K, w)
            del self.earlier_facts[len(self.earlier_facts) - len(result.requests):]
            for i, f in result.superseded:  # ascending places: each goes back where it was
                self.earlier_facts.insert(i, f)
        if self.ledger is not None and self.n_protected == self.ledger.manifest.get("protected", 0):
            self.earlier = self.ledger.read_state()  # so that this Editor and a reload agree bit for bit
            # (unless facts were protected since the last batch: the ledger has not recorded them yet)
        self.history.pop()
        result.state = EditState.UNDONE
        self._state, self._seen = result.state_before, self._param_versions()
        return result

    def total_deltas(self) -> dict[int, torch.Tensor]:
        """Per layer, the sum (float64) of every update this Editor applied on top of its base model:
        its ledger's batches when it has a ledger, else the edits on its history."""
        if self.ledger is not None:
            return self.ledger.total_deltas()
        if self._n_sealed:
            raise LmeditError(f"{self._n_sealed} edit(s) of this Editor were made with keep_history=False and without "
                              "a ledger, so their updates were not kept; use a ledger (ledger=DIR) to export them")
        total: dict[int, torch.Tensor] = {}
        for r in self.history:
            for l, d in r.deltas.items():
                total[l] = total[l] + d.double() if l in total else d.double()
        if not total:
            raise LmeditError("nothing to export: this Editor has applied no edit")
        return total

    def save_lora(self, path: str | Path, *, rank: int | None = None, max_error: float | None = None):
        """Write everything this Editor applied (:meth:`total_deltas`) as a peft LoRA adapter directory;
        ``rank`` / ``max_error`` truncate an accumulated update (see :mod:`lmedit.lora`)."""
        from lmedit.lora import save_lora

        n = self.ledger.n_requests if self.ledger is not None else sum(len(r.requests) for r in self.history)
        return save_lora(path, self.total_deltas(), self.model, self.adapter, rank=rank, max_error=max_error,
                         meta={"method": self.method, "base_fingerprint": self.base_fingerprint, "n_requests": n})

    def weights_state(self) -> int:
        """An id of the edited weights' state: a fresh id after each edit, the earlier one again after an
        exact undo, and a fresh one when a write outside this Editor is detected (torch's version counters)."""
        if self._param_versions() != self._seen:
            self._state, self._seen = next(_STATE_IDS), self._param_versions()
        return self._state

    def _param_versions(self) -> list[int]:
        """torch's in-place write counters of every editable weight (any write bumps them)."""
        n = self.adapter.n_layers(self.model)
        return [self.adapter.edit_module(self.model, l).weight._version for l in range(n)]

    @classmethod
    def load(cls, model: nn.Module, tokenizer, path: str | Path, method: str | None = None, *,
             keep_history: bool = False, progress: bool = False, stats_dir: str | Path | None = None,
             **overrides: Any) -> "Editor":
        """An Editor of ``model`` (the ledger's base model, freshly loaded) with every batch of the
        ledger at ``path`` applied bit for bit, its lifelong state restored, and later edits appended.

        The method and hyperparameters default to the last batch's. Everything is checked (base
        model, format version, every file's checksum) before any weight changes; the replayed
        batches are not on the new Editor's undo stack.
        """
        ledger = Ledger.open(path)
        if not ledger.batches:
            raise CacheError(f"ledger {ledger.path} holds no batch yet")
        last = ledger.batches[-1]
        method = method or last["method"]
        hp = batch_hparams(last) if method == last["method"] else None
        preset = None if hp is not None else last["hparams"].get("preset")
        editor = cls(model, tokenizer, method, hparams=hp, preset=preset, keep_history=keep_history, progress=progress,
                     stats_dir=stats_dir, **overrides)
        ledger.check_base(model, editor.adapter, editor.base_fingerprint)
        records = [ledger.read_batch(i) for i in range(len(ledger.batches))]  # all checksums before any write
        earlier = ledger.read_state()
        replay(editor.model, editor.adapter, records)
        editor._state, editor._seen = next(_STATE_IDS), editor._param_versions()
        editor.ledger, editor._ledger_path = ledger, ledger.path
        editor._context[(editor.hparams.context_templates, editor.hparams.seed)] = ledger.manifest["context"]
        editor.earlier = earlier
        gone = {tuple(x) for b in ledger.edited_batches() for x in b.get("superseded", ())}
        editor.earlier_facts = [_Fact(r["prompt"], r["subject"], float(b["hparams"].get("preserve_weight", 1.0)),
                                      b["index"], row, EditRequest.from_dict(r))
                                for b, reqs in ledger.edited_requests(records) if b["hparams"].get("preserve_edits")
                                for row, r in enumerate(reqs) if (b["index"], row) not in gone]
        editor.n_protected = ledger.manifest.get("protected", 0)
        editor.protected_facts = None if editor.n_protected else []
        return editor

    def apply_deltas(self, path: str | Path, *, allow_other_model: bool = False) -> EditResult:
        """Apply a delta file written by :meth:`EditResult.save_deltas` (refuses another base model)."""
        import json

        meta, deltas = read_deltas(path, self.model, self.adapter, self.base_fingerprint,
                                   allow_other_model=allow_other_model)
        state_before = self.weights_state()
        with WeightTransaction(self.model, self.adapter) as tx:
            for layer, delta in sorted(deltas.items()):
                tx.add(layer, delta)
        saved = json.loads(meta.get("hparams", "{}"))
        method = meta.get("method", "?")
        result = EditResult(self, method, str(saved.pop("preset", "file")), _hparams_or_none(method, saved),
                            [EditRequest.from_dict(d) for d in json.loads(meta.get("requests", "[]"))], tx.record,
                            state_before=state_before)
        self._record(result)
        return result


def batch_hparams(batch: Mapping[str, Any]) -> EditHParams:
    """The hyperparameters a ledger batch (an entry of ``Ledger.batches``) was edited with; its chunk size
    is left to this machine (the vectors do not depend on it), keys added since take their defaults, except
    ``supersede_edits`` and ``share_key_targets``: a batch written before they existed did neither, so they
    are False there."""
    values = {k: v for k, v in batch["hparams"].items() if k not in ("preset", "chunk_requests")}
    values.setdefault("supersede_edits", False)  # a ledger from before it goes on as it was written
    values.setdefault("share_key_targets", False)
    return get_method(batch["method"]).hparams_cls.from_dict(values)


def _method_of(hparams: EditHParams) -> str:
    from lmedit.methods.base import method_names

    for name in method_names():
        if type(hparams) is get_method(name).hparams_cls:
            return name
    raise HyperparameterError(f"{type(hparams).__name__} is not a registered method's hyperparameters")


def _hparams_or_none(method: str, values: dict[str, Any]) -> EditHParams | None:
    try:
        return get_method(method).hparams_cls.from_dict(values)
    except (LmeditError, TypeError, ValueError):
        return None


def _checked_context(context: Sequence[Sequence[str]]) -> list[list[str]]:
    groups = [list(g) for g in context]
    if not groups or groups[0] != ["{}"]:
        raise HyperparameterError(f"context: the first group must be ['{{}}'] (the bare prompt), got {groups[:1]}")
    bad = [t for g in groups for t in g if t.count("{}") != 1]
    if bad:
        raise HyperparameterError(f"context: every template needs exactly one '{{}}', not {bad[0]!r}")
    return groups


@dataclass(frozen=True)
class _Fact:
    prompt: str
    subject: str
    weight: float = 1.0  # an edited fact: the preserve_weight its key joined the preserved sum with,
    batch: int = 0  # the batch that stored its key (ledger index, or EditResult.batch_id; 0: none),
    row: int = 0  # and its row there
    request: EditRequest | None = field(default=None, compare=False)  # an edited fact's request (for carrying)


def _protected_fact(fact: Any, i: int) -> _Fact:
    """(prompt, subject) of a fact given to :meth:`Editor.protect`, checked."""
    get = fact.get if isinstance(fact, Mapping) else lambda k: getattr(fact, k, None)
    prompt, subject = get("prompt"), get("subject")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise RequestError(f"protect: fact {i} needs a 'prompt' template with exactly one '{{}}' for the subject, "
                           f"got {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise RequestError(f"protect: fact {i} needs a non-empty 'subject', got {subject!r}")
    return _Fact(prompt, subject)
