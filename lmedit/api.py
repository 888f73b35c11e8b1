"""The editing entry points: ``edit``, ``EditResult.undo``, ``save_deltas`` / ``apply_deltas``.

Example::

    model, tok = lmedit.load_model()
    result = lmedit.edit(model, tok, [EditRequest("The mother tongue of {} is", "Danielle Darrieux",
                                                  "English", "French")], method="emmet")
    result.undo()          # the exact original weights again
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmedit import __version__
from lmedit._fs import atomic_path
from lmedit._runtime import release_freed_memory
from lmedit.core.context import context_templates
from lmedit.core.distribute import spread_over_layers
from lmedit.core.stats import second_moments
from lmedit.core.targets import TargetResult, compute_targets, target_provenance
from lmedit.core.weights import AppliedEdit, WeightTransaction, restore
from lmedit.errors import CacheError, HyperparameterError, LmeditError, RequestError
from lmedit.methods import EditHParams, get_method
from lmedit.models.adapters import ModelAdapter, get_adapter
from lmedit.models.loading import fingerprint
from lmedit.presets import preset_values
from lmedit.requests import EditRequest, validate_batch

log = logging.getLogger(__name__)
_HISTORY_ATTR = "_lmedit_history"


def history(model: nn.Module) -> list["EditResult"]:
    """The stack of edits applied to ``model`` through lmedit (oldest first)."""
    if not hasattr(model, _HISTORY_ATTR):
        object.__setattr__(model, _HISTORY_ATTR, [])
    return getattr(model, _HISTORY_ATTR)


@dataclass
class EditResult:
    """What one call of :func:`edit` (or :func:`apply_deltas`) changed, and how to take it back."""

    model: nn.Module
    adapter: ModelAdapter
    method: str
    hparams: dict[str, Any]
    requests: list[EditRequest]
    applied: AppliedEdit
    base_fingerprint: str
    timings: dict[str, float] = field(default_factory=dict)
    targets: TargetResult | None = None
    layer_info: dict[int, dict[str, float]] = field(default_factory=dict)
    undone: bool = False
    undoable: bool = True
    not_undoable_why: str = ""

    @property
    def layers(self) -> list[int]:
        return sorted(self.applied.deltas)

    @property
    def deltas(self) -> dict[int, torch.Tensor]:
        """Per layer, the applied update (d_out, d_in), float32."""
        return self.applied.deltas

    def undo(self) -> None:
        """Restore the weights this edit changed, bit-exactly. Later edits must be undone first."""
        if self.undone:
            raise LmeditError("this edit was already undone")
        if not self.undoable:
            raise LmeditError(f"this edit cannot be undone: {self.not_undoable_why}")
        stack = history(self.model)
        if stack and stack[-1] is not self:
            raise LmeditError(f"undo the {len(stack) - 1 - stack.index(self)} later edit(s) first "
                              "(edits are undone in reverse order)" if self in stack else "this edit is not on the model's history")
        restore(self.model, self.adapter, self.applied.originals, self.applied.version_before)
        if stack:
            stack.pop()
        self.undone = True

    def save_deltas(self, path: str | Path) -> Path:
        """Write the updates as safetensors (with method, layers, requests and base fingerprint)."""
        path = Path(path)
        meta = {
            "format": "lmedit-deltas", "lmedit_version": __version__, "method": self.method,
            "layers": json.dumps(self.layers), "base_model": self.base_fingerprint,
            "model_type": self.adapter.model_type, "hparams": json.dumps(self.hparams),
            "requests": json.dumps([r.to_dict() for r in self.requests]),
            "params": json.dumps({str(l): self.adapter.edit_param_name(l) for l in self.layers}),
        }
        tensors = {f"layer.{l}": d.contiguous() for l, d in self.applied.deltas.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


def _as_requests(requests: Sequence[EditRequest | Mapping[str, Any]] | EditRequest) -> list[EditRequest]:
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]  # type: ignore[list-item]
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, EditRequest):
            out.append(r)
        elif isinstance(r, Mapping):
            out.append(EditRequest.from_dict(dict(r), index=i))
        else:
            raise RequestError(f"request {i}: expected an EditRequest or a dict, got {type(r).__name__}")
    validate_batch(out)
    return out


def resolve_hparams(model: nn.Module, method: str, preset: str | None = None, **overrides: Any) -> tuple[str, EditHParams]:
    """The method's hyperparameters for ``model``: preset values, then ``overrides``."""
    m = get_method(method)
    name, values = preset_values(model, m.name, preset)
    values.update(overrides)
    unknown = sorted(set(values) - set(m.hparams_cls.field_names()))
    if unknown:
        raise HyperparameterError(f"unknown hyperparameter(s) {', '.join(unknown)} for method {m.name!r}; "
                                  f"known: {', '.join(m.hparams_cls.field_names())}")
    _check_types(m.hparams_cls, values)
    try:
        hp = m.hparams_cls.from_dict(values)
    except (TypeError, ValueError) as e:  # e.g. layers=["a"]; HyperparameterError passes through
        if isinstance(e, HyperparameterError):
            raise
        raise HyperparameterError(f"bad hyperparameter value for method {m.name!r}: {e}") from None
    n = get_adapter(model).n_layers(model)
    bad = [l for l in hp.layers if l >= n]
    if bad:
        raise HyperparameterError(f"layers {bad} are out of range: the model has layers 0..{n - 1}")
    return name, hp


def _check_types(cls: type[EditHParams], values: Mapping[str, Any]) -> None:
    """Reject a value whose type cannot be the field's (``v_lr="abc"``, ``mom2_adjustment=3``) by name,
    before the dataclass's range checks compare it with numbers and raise a bare TypeError."""
    defaults = {f.name: f.default for f in fields(cls)}
    for name, value in values.items():
        d = defaults.get(name)
        if isinstance(d, bool):
            ok = not isinstance(value, (str, bytes)) and value in (True, False)
        elif isinstance(d, (int, float)):  # numpy scalars and 0-d tensors pass too
            ok = not isinstance(value, (bool, str, bytes)) and hasattr(value, "__float__")
        elif isinstance(d, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise HyperparameterError(f"{cls.__name__}.{name} = {value!r}: must be a {type(d).__name__} "
                                      f"(like the default {d!r}), got {type(value).__name__}")


def edit(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest | Mapping[str, Any]] | EditRequest,
    method: str = "emmet",
    *,
    preset: str | None = None,
    covariances: Mapping[int, torch.Tensor] | None = None,
    context: Sequence[Sequence[str]] | None = None,
    progress: bool = False,
    keep_history: bool = True,
    targets: TargetResult | None = None,
    **overrides: Any,
) -> EditResult:
    """Edit ``model`` in place so that each request's prompt continues with its ``target_new``.

    Example: ``res = edit(model, tok, reqs, method="memit", layers=[4, 5, 6, 7, 8], mom2_update_weight=1500)``

    ``overrides`` set hyperparameters (see ``lmedit.methods``); ``preset`` picks a per-model
    preset (default: matched from the model's architecture). ``covariances`` supplies C per
    layer instead of computing or loading statistics; ``context`` supplies the context-template
    groups (from :func:`lmedit.core.context.context_templates`) instead of generating them, so a
    series of edits can share one set, as the reference code does. The edit is atomic: if anything fails
    (a bad request, a singular solve, NaN, KeyboardInterrupt), no weight is left changed.

    ``targets`` reuses the target vectors of an earlier edit of the same requests (``result.targets``,
    after that edit was undone), for sweeping the preservation weight or ridge without re-optimising:
    they are refused unless layer, target settings, templates, requests and the model's weights match.

    ``keep_history=False`` is for long runs of sequential edits: the edit is still atomic while it
    is applied, but the original weights are not kept afterwards and the edit is not put on the
    model's history, so memory stays flat; it cannot be undone, and neither can the earlier edits
    beneath it (undoing them would silently drop this one), so they are taken off the history too.
    The returned result still holds the applied deltas (``save_deltas`` works).
    """
    t_start = time.perf_counter()
    reqs = _as_requests(requests)
    m = get_method(method)
    preset_name, hp = resolve_hparams(model, m.name, preset, **overrides)
    adapter = get_adapter(model)
    adapter.check(model)
    base_fp = fingerprint(model, adapter)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    C = _covariances(model, tokenizer, adapter, hp, covariances, base_fp, progress)
    timings["stats_s"] = time.perf_counter() - t0
    groups = [list(g) for g in context] if context is not None else \
        context_templates(model, tokenizer, hp.context_templates, seed=hp.seed)
    flat = [t for g in groups for t in g]
    solve = hp.solver()
    z_layer = hp.layers[-1]
    layer_info: dict[int, dict[str, float]] = {}
    target_parts: list[TargetResult] = []
    if targets is not None:
        _check_reusable(targets, model, m.sequential, reqs, flat, z_layer, hp)
    with WeightTransaction(model, adapter) as tx:
        batches = [[r] for r in reqs] if m.sequential else [reqs]
        for batch in batches:
            t0 = time.perf_counter()
            tr = targets if targets is not None else compute_targets(
                model, tokenizer, adapter, batch, flat, z_layer, hp.target_config(), progress=progress and len(batches) == 1)
            timings["targets_s"] = timings.get("targets_s", 0.0) + time.perf_counter() - t0
            target_parts.append(tr)
            layer_info = spread_over_layers(model, tokenizer, adapter, tx, batch, groups, hp.layers, tr.targets,
                                            C, solve, timings)
    targets = TargetResult.concat(target_parts)
    timings["total_s"] = time.perf_counter() - t_start
    result = EditResult(model=model, adapter=adapter, method=m.name, hparams={"preset": preset_name, **hp.to_dict()},
                        requests=reqs, applied=tx.record, base_fingerprint=base_fp, timings=timings,
                        targets=targets, layer_info=layer_info)
    if keep_history:
        history(model).append(result)
    else:
        _seal_history(model)
        result.applied.originals.clear()
        result.undoable = False
        result.not_undoable_why = "it was made with keep_history=False, so no copy of the original weights was kept"
    release_freed_memory()  # the edit's large temporaries are freed; give their pages back
    return result


def _check_reusable(targets: TargetResult, model: nn.Module, sequential: bool, reqs: list[EditRequest],
                    templates: list[str], layer: int, hp: EditHParams) -> None:
    """Refuse target vectors that were computed for other requests, settings or model weights."""
    if sequential:
        raise HyperparameterError("targets= cannot be reused with a sequential method (ROME computes each request's "
                                  "target after the previous request's edit)")
    if not isinstance(targets, TargetResult) or not targets.provenance:
        raise HyperparameterError("targets= takes the .targets of an earlier EditResult")
    want = target_provenance(model, reqs, templates, layer, hp.target_config())
    for key, what in (("model_id", "another model object"), ("weights_version", "the model's weights as they were "
                      "then (undo the edit that produced them, and nothing else, before reusing them)"),
                      ("requests", "other requests"), ("layer", "another target layer"),
                      ("config", "other target-optimisation settings"), ("templates", "other context templates")):
        if targets.provenance.get(key) != want[key]:
            raise HyperparameterError(f"targets= were computed for {what}; compute them afresh")


def _seal_history(model: nn.Module) -> None:
    """Make every edit on ``model``'s history un-undoable (a later edit was applied without a record)."""
    stack = history(model)
    if stack:
        log.warning("edit applied with keep_history=False: the %d earlier edit(s) on this model's history "
                    "can no longer be undone", len(stack))
    for r in stack:
        r.undoable = False
        r.not_undoable_why = "a later edit was made with keep_history=False on top of it"
    stack.clear()


def _covariances(model, tokenizer, adapter, hp: EditHParams, given, base_fp, progress) -> dict[int, torch.Tensor]:
    if given is not None:
        out = {}
        for layer in hp.layers:
            if layer not in given:
                raise HyperparameterError(f"covariances: no matrix for layer {layer} (given: {sorted(given)})")
            C = torch.as_tensor(given[layer])
            d_in = adapter.weight(model, layer).shape[1]
            if C.shape != (d_in, d_in):
                raise HyperparameterError(f"covariances[{layer}] has shape {tuple(C.shape)}, expected ({d_in}, {d_in})")
            if not torch.isfinite(C).all():
                raise HyperparameterError(f"covariances[{layer}] contains NaN or inf")
            out[layer] = C
        return out
    if not hp.mom2_adjustment:
        return {l: torch.eye(adapter.weight(model, l).shape[1], dtype=torch.float64) for l in hp.layers}
    return second_moments(model, tokenizer, adapter, hp.layers, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples,
                          max_length=hp.mom2_max_length, dtype=hp.mom2_dtype, forward_dtype=hp.mom2_forward_dtype,
                          model_fingerprint=base_fp, progress=progress)


def apply_deltas(model: nn.Module, path: str | Path, *, allow_other_model: bool = False) -> EditResult:
    """Apply a delta file written by :meth:`EditResult.save_deltas` (refuses another base model).

    Example: ``lmedit.apply_deltas(model, "edits.safetensors").undo()``
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"delta file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CacheError(f"delta file {path} is unreadable or corrupt ({e})") from e
    if meta.get("format") != "lmedit-deltas":
        raise CacheError(f"{path} is not an lmedit delta file (no 'format: lmedit-deltas' metadata)")
    adapter = get_adapter(model)
    fp = fingerprint(model, adapter)
    if meta.get("base_model") != fp and not allow_other_model:
        raise CacheError(f"delta file {path} was made for model {meta.get('base_model')}, this model is {fp}; "
                         "refusing to apply it (pass allow_other_model=True to force)")
    n_layers = adapter.n_layers(model)
    deltas: dict[int, torch.Tensor] = {}
    for key, delta in tensors.items():  # check everything before changing any weight
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
    with WeightTransaction(model, adapter) as tx:
        for layer, delta in sorted(deltas.items()):
            tx.add(layer, delta)
    reqs = [EditRequest.from_dict(d) for d in json.loads(meta.get("requests", "[]"))]
    result = EditResult(model=model, adapter=adapter, method=meta.get("method", "?"),
                        hparams=json.loads(meta.get("hparams", "{}")), requests=reqs, applied=tx.record,
                        base_fingerprint=fp)
    history(model).append(result)
    return result
