"""EasyEdit inputs: its request fields and its hyperparameter YAML files, mapped to lmedit's.

Example::

    reqs = lmedit.easyedit.requests(prompts=["Who was the designer of Lahti Town Hall?"],
                                    target_new=["Alfred Lahti"], subject=["Lahti Town Hall"],
                                    ground_truth=["Eliel Saarinen"])
    hp = lmedit.easyedit.load_hparams("hparams/MEMIT/llama-7b.yaml")      # a MemitHParams
    editor = lmedit.Editor(model, tok, hparams=hp)

EasyEdit's prompts are full texts (the subject written out), as its ``BaseEditor.edit`` takes them;
the subject's first occurrence becomes lmedit's ``{}``. ``locality_inputs`` is EasyEdit's
``{kind: {"prompt": [...], "ground_truth": [...]}}`` (one entry per request in each list); the
prompts of every kind become the request's neighbourhood prompts, which must then share one answer.

In a YAML file, fields of the same meaning map by name (``layers``, ``v_lr``, ``mom2_update_weight``,
``emmet_lambda``, ...) or are renamed (``context_template_length_params`` -> ``context_templates``,
``L2`` -> ``alphaedit_l2``); model paths, devices, module-name templates (lmedit's adapter knows
the architecture) and where statistics come from are ignored with a warning; a field lmedit does
not know is refused by name. See ``docs/easyedit.md`` for the table and for the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmedit.errors import HyperparameterError, RequestError
from lmedit.methods import EditHParams, get_method
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)

METHODS = {"ROME": "rome", "MEMIT": "memit", "EMMET": "emmet", "ALPHAEDIT": "alphaedit"}
RENAMED = {"context_template_length_params": "context_templates", "L2": "alphaedit_l2"}
SAME = ("layers", "clamp_norm_factor", "v_num_grad_steps", "v_lr", "v_weight_decay", "kl_factor", "mom2_adjustment",
        "mom2_update_weight", "mom2_dtype", "emmet_lambda", "update_norm_lambda")
# what lmedit decides itself: where the model and statistics live, devices, module names (the adapter)
IGNORED = {
    "model_name": "load the model with lmedit.load_model / --model",
    "device": "lmedit uses the model's own device(s)", "model_parallel": "lmedit uses the model's own device(s)",
    "stats_dir": "statistics are cached by lmedit (LMEDIT_CACHE)",
    "mom2_dataset": "statistics come from lmedit's mom2_corpus (default: the offline Wikipedia excerpt)",
    "mom2_n_samples": "lmedit's mom2_n_samples is counted on its own corpus; set it with --set if needed",
    "P_loc": "lmedit computes AlphaEdit's projection from its own statistics",
    "nullspace_threshold": "an absolute eigenvalue threshold does not transfer between models; lmedit's "
                           "nullspace_energy (share of trace C) is used instead",
    "rewrite_module_tmp": "the architecture adapter names the modules", "layer_module_tmp": "the adapter names the modules",
    "mlp_module_tmp": "the adapter names the modules", "attn_module_tmp": "the adapter names the modules",
    "ln_f_module": "the adapter names the modules", "lm_head_module": "the adapter names the modules",
    "v_loss_layer": "the loss is always read at the model's output", "batch_size": "batches are what each edit call gets",
    "max_length": "prompts are refused only when longer than the model's context", "fp16": "use --dtype / compute_dtype",
}
FIXED = {"fact_token": ("subject_last",), "layer_selection": ("all",)}  # the only values lmedit implements


def load_hparams(path: str | Path) -> EditHParams:
    """The method's hyperparameters from an EasyEdit YAML file (``alg_name`` names the method)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HyperparameterError(f"EasyEdit hyperparameter file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise HyperparameterError(f"EasyEdit hyperparameter file {path} is not readable YAML ({e})") from e
    if not isinstance(data, dict):
        raise HyperparameterError(f"EasyEdit hyperparameter file {path}: expected a mapping of fields, got "
                                  f"{type(data).__name__}")
    return hparams_from_dict(data, source=str(path))


def hparams_from_dict(data: Mapping[str, Any], *, source: str = "<EasyEdit hparams>") -> EditHParams:
    """:func:`load_hparams` for an already parsed mapping."""
    alg = data.get("alg_name")
    if not isinstance(alg, str) or alg.upper() not in METHODS:
        raise HyperparameterError(f"{source}: alg_name {alg!r} is not one lmedit maps (one of {sorted(METHODS)})")
    method = get_method(METHODS[alg.upper()])
    known = set(method.hparams_cls.field_names())
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "alg_name":
            continue
        if key in IGNORED:
            log.warning("%s: %s ignored (%s)", source, key, IGNORED[key])
        elif key in FIXED:
            if value not in FIXED[key]:
                raise HyperparameterError(f"{source}: {key}={value!r} is not supported (lmedit implements "
                                          f"{' / '.join(map(repr, FIXED[key]))})")
        elif RENAMED.get(key, key) in known and (key in SAME or key in RENAMED):
            values[RENAMED.get(key, key)] = _number(value) if key != "mom2_dtype" else value
        else:
            raise HyperparameterError(f"{source}: unknown field {key!r} for {alg} (lmedit maps "
                                      f"{', '.join(sorted((set(SAME) | set(RENAMED)) & (known | set(RENAMED))))}; "
                                      "ignores " + ", ".join(sorted(IGNORED)) + ")")
    try:
        return method.hparams_cls.from_dict(values)
    except HyperparameterError as e:
        raise HyperparameterError(f"{source}: {e}") from e


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``5e-1`` (no dot) as a string; EasyEdit's files are full of them."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def requests(prompts: str | Sequence[str], target_new: str | Sequence[str], *,
             subject: str | Sequence[str] | None = None, ground_truth: str | Sequence[str] | None = None,
             rephrase_prompts: str | Sequence[str | Sequence[str]] | None = None,
             locality_inputs: Mapping[str, Mapping[str, Sequence[Any]]] | None = None) -> list[EditRequest]:
    """EditRequests from EasyEdit's ``BaseEditor.edit`` arguments (lists, one entry per request)."""
    prompts = _listed(prompts, "prompts")
    n = len(prompts)
    target_new = _aligned(target_new, n, "target_new")
    if subject is None:
        raise RequestError("EasyEdit requests: subject is required (ROME, MEMIT, EMMET and AlphaEdit edit at the "
                           "subject's last token)")
    subject = _aligned(subject, n, "subject")
    truth = _aligned(ground_truth, n, "ground_truth") if ground_truth is not None else [None] * n
    rephrase = [_listed(p, "rephrase_prompts") if p is not None else []
                for p in (_aligned(rephrase_prompts, n, "rephrase_prompts") if rephrase_prompts is not None else [None] * n)]
    loc_prompts: list[list[str]] = [[] for _ in range(n)]
    loc_answers: list[set[str]] = [set() for _ in range(n)]
    for kind, entry in (locality_inputs or {}).items():
        if not isinstance(entry, Mapping) or {"prompt", "ground_truth"} - set(entry):
            raise RequestError(f"locality_inputs[{kind!r}] must be {{'prompt': [...], 'ground_truth': [...]}}")
        for i, (p, a) in enumerate(zip(_aligned(entry["prompt"], n, f"locality_inputs[{kind!r}]['prompt']"),
                                       _aligned(entry["ground_truth"], n, f"locality_inputs[{kind!r}]['ground_truth']"))):
            loc_prompts[i] += _listed(p, "locality prompt")
            loc_answers[i] |= {_answer(x) for x in (a if isinstance(a, (list, tuple)) else [a])}
    out = []
    for i in range(n):
        if len(loc_answers[i]) > 1:
            raise RequestError(f"request {i}: its locality prompts have different answers {sorted(loc_answers[i])}; "
                               "lmedit keeps one neighbourhood answer per request (edit them as separate requests)")
        text, subj = prompts[i], subject[i]
        if subj not in text:
            raise RequestError(f"request {i}: subject {subj!r} does not occur in prompt {text!r}")
        if "{}" in text:
            raise RequestError(f"request {i}: prompt {text!r} contains '{{}}'; EasyEdit prompts are full texts")
        at = text.index(subj)
        template = text[:at] + "{}" + text[at + len(subj):]
        out.append(EditRequest(template, subj, _answer(target_new[i]), _answer(truth[i]) if truth[i] is not None else None,
                               paraphrase_prompts=tuple(rephrase[i]), neighborhood_prompts=tuple(loc_prompts[i]),
                               neighborhood_answer=next(iter(loc_answers[i]), None), case_id=i))
    return out


def _listed(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"EasyEdit requests: {what} must be a string or a list of strings, got {value!r:.80}")
    return list(value)


def _aligned(value: Any, n: int, what: str) -> list[Any]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    if items is None or len(items) != n:
        raise RequestError(f"EasyEdit requests: {what} must have one entry per prompt ({n}), got "
                           f"{'a ' + type(value).__name__ if items is None else len(items)}")
    return items


def _answer(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"EasyEdit requests: an answer must be a non-empty string, got {value!r:.80}")
    return value
