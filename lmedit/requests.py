"""Edit requests: the (subject, relation prompt, new object) triples an editor writes into a model.

Example: ``reqs = load_requests("counterfact_500.json", limit=10)``

An :class:`EditRequest` holds a prompt template with exactly one ``"{}"`` where the subject goes
(``"The mother tongue of {} is"``), the subject (``"Danielle Darrieux"``) and the new object
``target_new`` (``"English"``). Targets never keep a leading space: the model is shown
``" " + target`` after the filled-in prompt. The optional fields carry what the CounterFact / zsRE
evaluations need: the old object, paraphrases, neighbourhood prompts and their answer.

Loaders read four on-disk schemas (see :data:`FORMATS`) from any path:

* ``"counterfact"``: ROME's CounterFact (``requested_rewrite`` with a ``"{}"`` prompt);
* ``"easyedit"``: EasyEdit/MEND flat records (``prompt`` already contains the subject);
* ``"zsre"``: MEND zsRE questions (``src``/``alt``/``answers``/``loc``/``loc_ans``);
* ``"plain"``: a JSON list, JSONL, or ``{"requests": [...]}`` of :meth:`EditRequest.to_dict` records.

Every problem raises :class:`lmedit.errors.RequestError` naming the file, the record and the field,
with the offending value.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lmedit.errors import RequestError

__all__ = [
    "FORMATS",
    "EditRequest",
    "load_requests",
    "requests_from_dicts",
    "validate_batch",
    "drop_conflicts",
]

logger = logging.getLogger(__name__)

#: Names accepted by ``load_requests(format=...)`` and ``requests_from_dicts``.
FORMATS: tuple[str, ...] = ("counterfact", "easyedit", "zsre", "plain")

_PROMPT_TUPLES = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")
_SHOWN = 80  # characters of an offending value quoted in an error message


def _short(value: Any) -> str:
    """repr() of a value, cut to a readable length for error messages."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _error(where: str, problem: str) -> RequestError:
    """A RequestError "<where>: <problem>" that remembers the bare problem for re-labelling."""
    err = RequestError(f"{where}: {problem}" if where else problem)
    err.problem = problem  # type: ignore[attr-defined]  # read by requests_from_dicts
    return err


def _type_name(value: Any) -> str:
    return type(value).__name__


def _got(value: Any) -> str:
    """"str 'abc'": the type and the (shortened) value, for "must be X, got ..." messages."""
    return f"{_type_name(value)} {_short(value)}"


# --------------------------------------------------------------------------------------------
# EditRequest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")``.

    ``prompt`` is a template: the only special sequence is ``"{}"`` (exactly once), every other
    brace is literal, so :attr:`text` equals ``prompt.format(subject)`` whenever the latter works.
    Targets are stripped of surrounding whitespace on construction. Lists given for the prompt
    tuples are turned into tuples, so requests are hashable and can be batch keys.
    """

    prompt: str  # template with exactly one "{}" where the subject goes
    subject: str  # the entity whose fact is edited, e.g. "Danielle Darrieux"
    target_new: str  # new object without leading space; the model sees " " + target_new
    target_true: str | None = None  # old object (CounterFact "target_true"), if known
    paraphrase_prompts: tuple[str, ...] = ()  # full strings (subject included), completed by the targets
    neighborhood_prompts: tuple[str, ...] = ()  # full strings whose answer must not change
    neighborhood_answer: str | None = None  # answer of neighborhood_prompts; None -> target_true
    generation_prompts: tuple[str, ...] = ()  # prompts for free generation (fluency, consistency)
    case_id: int | str | None = None  # identifier from the source data set, used in messages

    def __post_init__(self) -> None:
        where = self._label()

        if self.case_id is not None and (
            isinstance(self.case_id, bool) or not isinstance(self.case_id, (int, str))
        ):
            raise _error(where, f"case_id must be an int, a str or None, got {_got(self.case_id)}")

        if not isinstance(self.prompt, str):
            raise _error(where, f"prompt must be a str, got {_got(self.prompt)}")
        n_slots = self.prompt.count("{}")
        if n_slots == 0:
            raise _error(
                where,
                f'prompt {_short(self.prompt)} has no "{{}}" placeholder; write "{{}}" where the subject goes',
            )
        if n_slots > 1:
            raise _error(
                where, f'prompt {_short(self.prompt)} has {n_slots} "{{}}" placeholders; it must have exactly one'
            )

        if not isinstance(self.subject, str):
            raise _error(where, f"subject must be a str, got {_got(self.subject)}")
        if not self.subject.strip():
            raise _error(where, f"subject is empty or whitespace ({self.subject!r})")

        target_new = self._clean_target("target_new", self.target_new, where, required=True)
        target_true = self._clean_target("target_true", self.target_true, where, required=False)
        answer = self._clean_target("neighborhood_answer", self.neighborhood_answer, where, required=False)
        if target_true is not None and target_true == target_new:
            raise _error(
                where,
                f"target_new and target_true are both {target_new!r}: the edit would change nothing; "
                "drop target_true or pick a different target_new",
            )
        object.__setattr__(self, "target_new", target_new)
        object.__setattr__(self, "target_true", target_true)
        object.__setattr__(self, "neighborhood_answer", answer)

        for name in _PROMPT_TUPLES:
            object.__setattr__(self, name, self._clean_prompts(name, getattr(self, name), where))

    def _label(self) -> str:
        if self.case_id is not None:
            return f"request case_id={self.case_id!r}"
        if isinstance(self.subject, str) and self.subject.strip():
            return f"request for subject {_short(self.subject)}"
        return "request"

    @staticmethod
    def _clean_target(name: str, value: Any, where: str, *, required: bool) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str):
            expected = "a str" if required else "a str or None"
            raise _error(where, f"{name} must be {expected}, got {_got(value)}")
        stripped = value.strip()
        if not stripped:
            hint = "" if required else "; use None when it is unknown"
            raise _error(where, f"{name} is empty or whitespace ({value!r}){hint}")
        return stripped

    @staticmethod
    def _clean_prompts(name: str, value: Any, where: str) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise _error(where, f"{name} must be a list or tuple of str, got {_got(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _error(where, f"{name}[{i}] must be a str, got {_got(item)}")
            if not item.strip():
                raise _error(where, f"{name}[{i}] is empty or whitespace ({item!r})")
        return tuple(value)

    @property
    def text(self) -> str:
        """The filled-in prompt: ``EditRequest("{} is in", "Angola", "Asia").text == "Angola is in"``."""
        return self.prompt.replace("{}", self.subject)

    @property
    def neighborhood_target(self) -> str | None:
        """Answer expected on neighborhood prompts: ``req.neighborhood_target`` (answer, else target_true)."""
        return self.neighborhood_answer if self.neighborhood_answer is not None else self.target_true

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], index: int | None = None) -> EditRequest:
        """Build from field names: ``EditRequest.from_dict({"prompt": "{} is", "subject": "X", "target_new": "Y"})``.

        ``index`` (the record's position in its file) only labels error messages. Lists become
        tuples; unknown keys and missing required keys raise :class:`RequestError`.
        """
        label = f"record {index}" if index is not None else "request"
        if not isinstance(d, Mapping):
            raise _error(label, f"must be a JSON object / mapping, got {_got(d)}")
        if d.get("case_id") is not None:
            label += f" (case_id={d['case_id']!r})"
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise _error(label, f"unknown key(s) {unknown}; allowed keys are {names}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise _error(label, f"missing required field(s) {missing}")
        kwargs = {k: (tuple(v) if k in _PROMPT_TUPLES and isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field: ``json.dumps(req.to_dict())``; inverse of :meth:`from_dict`."""
        return {
            f.name: (list(getattr(self, f.name)) if f.name in _PROMPT_TUPLES else getattr(self, f.name))
            for f in fields(self)
        }


# --------------------------------------------------------------------------------------------
# Batch validation
# --------------------------------------------------------------------------------------------


def validate_batch(requests: Sequence[EditRequest]) -> None:
    """Check a batch before editing: ``validate_batch(reqs)`` raises RequestError or returns None.

    Rejects an empty batch, items that are not EditRequest, and one (subject, prompt) pair asked to
    take two different ``target_new`` values (the solver cannot satisfy both; the message names
    both requests). The same fact repeated with the same target is allowed.
    """
    items = list(requests)
    if not items:
        raise RequestError("empty batch: pass at least one EditRequest")
    for j, other, i, req in _conflicts(items):
        raise RequestError(
            f"conflicting edits in one batch: item {j} (case_id={other.case_id!r}) and item {i} "
            f"(case_id={req.case_id!r}) ask {req.prompt!r} with subject {req.subject!r} to give "
            f"{other.target_new!r} and {req.target_new!r}; keep one of them (lmedit.requests.drop_conflicts, "
            "or --drop-conflicts on the command line, keeps the first) or edit them in separate batches"
        )


def _conflicts(items: Sequence[EditRequest]):
    """(j, items[j], i, items[i]) for each item i that asks the (subject, prompt) of an earlier item j,
    the first to ask it, for a different ``target_new`` (RequestError first for an item that is not
    an EditRequest)."""
    for i, req in enumerate(items):
        if not isinstance(req, EditRequest):
            raise RequestError(
                f"batch item {i} is a {_type_name(req)}, not an EditRequest; build it with EditRequest(...) "
                "or EditRequest.from_dict(...)"
            )
    first: dict[tuple[str, str], int] = {}
    for i, req in enumerate(items):
        j = first.setdefault((req.subject, req.prompt), i)
        if items[j].target_new != req.target_new:
            yield j, items[j], i, req


def drop_conflicts(requests: Sequence[EditRequest]) -> tuple[list[EditRequest], list[EditRequest]]:
    """``kept, dropped = drop_conflicts(reqs)``: the requests in order without those that ask the
    (subject, prompt) of an earlier request for another ``target_new`` (the first one asked wins), so
    that ``kept`` passes :func:`validate_batch` as one batch; ``dropped`` lists the others. Datasets
    have such pairs (CounterFact's 10,000 flat records: 74, the first at index 1,171), which one batch
    cannot hold."""
    items = list(requests)
    drop = {i for _, _, i, _ in _conflicts(items)}
    return [r for i, r in enumerate(items) if i not in drop], [items[i] for i in sorted(drop)]


_drop_conflicts = drop_conflicts  # for load_requests, whose keyword of the same name shadows it


# --------------------------------------------------------------------------------------------
# Record converters, one per format
# --------------------------------------------------------------------------------------------


def _get(rec: Mapping[str, Any], key: str, types: type | tuple[type, ...], *, required: bool = True) -> Any:
    """rec[key] checked against ``types``; None when optional and absent (or null)."""
    if key not in rec or (rec[key] is None and not required):
        if required:
            raise _error("", f"missing field {key!r} (record keys: {sorted(map(str, rec))})")
        return None
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _error("", f"field {key!r} must be {names}, got {_got(value)}")
    return value


def _str_list(rec: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """An optional field holding a str or a list of str, as a tuple (empty strings dropped)."""
    value = _get(rec, key, (str, list), required=False)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _error("", f"field {key!r}[{i}] must be str, got {_got(item)}")
    return tuple(value)


def _first_str(rec: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    """A str field that some files store as a list of str: take the first element."""
    value = _get(rec, key, (str, list), required=required)
    if isinstance(value, list):
        if not value:
            if required:
                raise _error("", f"field {key!r} is an empty list")
            return None
        if not isinstance(value[0], str):
            raise _error("", f"field {key!r}[0] must be str, got {_got(value[0])}")
        return value[0]
    return value


def _template(text: str, subject: str, text_key: str) -> tuple[str, str]:
    """Turn a full prompt into (template, subject) by putting "{}" at the subject's first occurrence.

    An exact match wins; otherwise a case-insensitive one is used, and the subject is returned as
    spelled in the prompt, so that ``template.format(subject)`` reproduces ``text`` exactly.
    """
    if not subject.strip():
        raise _error("", f"subject is empty or whitespace ({subject!r})")
    start = text.find(subject)
    if start >= 0:
        return text[:start] + "{}" + text[start + len(subject) :], subject
    match = re.search(re.escape(subject), text, flags=re.IGNORECASE)
    if match is None:
        raise _error(
            "",
            f"subject {subject!r} does not occur in {text_key} {text!r} (not even ignoring case); "
            "fix the record or give the prompt with '{}' in the plain format",
        )
    logger.debug("subject %r matched %r only ignoring case", subject, match.group(0))
    return text[: match.start()] + "{}" + text[match.end() :], match.group(0)


def _case_id(rec: Mapping[str, Any], index: int) -> int | str:
    value = _get(rec, "case_id", (int, str), required=False)
    return index if value is None else value


def _from_counterfact(rec: Mapping[str, Any], index: int) -> EditRequest:
    rewrite = _get(rec, "requested_rewrite", (dict, list))
    if isinstance(rewrite, list):
        raise _error(
            "",
            f"requested_rewrite is a list of {len(rewrite)} rewrites (MQuAKE-style); this loader takes one "
            "rewrite per record: split the record or convert it to the plain format",
        )

    def target(key: str, required: bool) -> str | None:
        value = _get(rewrite, key, (dict, str), required=required)
        if isinstance(value, dict):
            if "str" not in value:
                raise _error("", f"requested_rewrite.{key} has no 'str' key (keys: {sorted(value)})")
            return value["str"]
        return value

    return EditRequest(
        prompt=_get(rewrite, "prompt", str),
        subject=_get(rewrite, "subject", str),
        target_new=target("target_new", True),  # type: ignore[arg-type]  # required -> str
        target_true=target("target_true", False),
        paraphrase_prompts=_str_list(rec, "paraphrase_prompts"),
        neighborhood_prompts=_str_list(rec, "neighborhood_prompts"),
        generation_prompts=_str_list(rec, "generation_prompts"),
        case_id=_case_id(rec, index),
    )


def _from_easyedit(rec: Mapping[str, Any], index: int) -> EditRequest:
    prompt, subject = _template(_get(rec, "prompt", str), _get(rec, "subject", str), "prompt")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_first_str(rec, "target_new", required=True),  # type: ignore[arg-type]
        target_true=_first_str(rec, "ground_truth", required=False),
        paraphrase_prompts=_str_list(rec, "rephrase_prompt"),
        neighborhood_prompts=_str_list(rec, "locality_prompt"),
        neighborhood_answer=_first_str(rec, "locality_ground_truth", required=False),
        case_id=_case_id(rec, index),
    )


def _from_zsre(rec: Mapping[str, Any], index: int) -> EditRequest:
    prompt, subject = _template(_get(rec, "src", str), _get(rec, "subject", str), "src")
    target_new = _get(rec, "alt", str)
    answers = _str_list(rec, "answers")
    # zsRE's "alt" sometimes equals a true answer (29 of the 1,037 MEND eval records): the old
    # object is then the first answer that differs, or unknown.
    differing = [a for a in answers if a.strip() != target_new.strip()]
    if answers and len(differing) < len(answers):
        logger.debug("zsre record %d: alt %r is among the true answers %r", index, target_new, answers)
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=differing[0] if differing else None,
        paraphrase_prompts=_str_list(rec, "rephrase"),
        neighborhood_prompts=_str_list(rec, "loc"),
        neighborhood_answer=_first_str(rec, "loc_ans", required=False),
        case_id=_case_id(rec, index),
    )


def _from_plain(rec: Mapping[str, Any], index: int) -> EditRequest:
    return EditRequest.from_dict(rec, index)


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], int], EditRequest]] = {
    "counterfact": _from_counterfact,
    "easyedit": _from_easyedit,
    "zsre": _from_zsre,
    "plain": _from_plain,
}
assert tuple(_CONVERTERS) == FORMATS


def _detect_format(record: Mapping[str, Any], source: str) -> str:
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if keys & {"rephrase_prompt", "ground_truth", "locality_prompt"}:
        return "easyedit"
    if "prompt" in keys and keys & {"target_new", "subject"}:
        return "plain"  # a missing target_new is then reported by the plain loader
    raise RequestError(
        f"{source}: cannot tell the format from the first record's keys {sorted(map(str, keys))}; "
        f"supported formats are {list(FORMATS)}: pass format=... or fix the keys"
    )


def _check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise RequestError(f"unknown request format {format!r}; supported formats are {list(FORMATS)}")


def requests_from_dicts(
    records: Iterable[Mapping[str, Any]], format: str | None = None, *, source: str = "<records>"
) -> list[EditRequest]:
    """Convert in-memory records: ``requests_from_dicts(json.load(f), "counterfact")``.

    ``format`` is one of :data:`FORMATS`, or None to detect it from the first record's keys.
    ``source`` names the data in error messages (``load_requests`` passes the file path).
    """
    _check_format(format)
    if isinstance(records, (str, bytes, Mapping)):
        raise RequestError(f"{source}: records must be a list of objects, got {_type_name(records)}")
    items = list(records)
    if not items:
        raise RequestError(f"{source}: no records")
    if not isinstance(items[0], Mapping):
        raise RequestError(f"{source}: record 0 is a {_type_name(items[0])}, not an object: {_short(items[0])}")
    fmt = format or _detect_format(items[0], source)
    convert = _CONVERTERS[fmt]

    out: list[EditRequest] = []
    for i, rec in enumerate(items):
        where = f"{source}: record {i}"
        if not isinstance(rec, Mapping):
            raise RequestError(f"{where} is a {_type_name(rec)}, not an object: {_short(rec)}")
        if isinstance(rec.get("case_id"), (int, str)):
            where += f" (case_id={rec['case_id']!r})"
        try:
            out.append(convert(rec, i))
        except RequestError as err:
            problem = getattr(err, "problem", str(err))
            raise RequestError(f"{where} [{fmt}]: {problem}") from None
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RequestError(f"{path}: no such file; check the path (cwd is {os.getcwd()})") from None
    except OSError as err:
        raise RequestError(f"{path}: cannot read: {err.strerror or err}") from None
    if not raw.strip():
        raise RequestError(f"{path}: file is empty; expected JSON or JSONL edit requests")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1]
        raise RequestError(
            f"{path}: not valid UTF-8 (byte 0x{bad.hex()} at offset {err.start}); re-save the file as UTF-8"
        ) from None


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RequestError(
                f"{path}: invalid JSON on line {lineno}, column {err.colno}: {err.msg} (JSONL: one object per line)"
            ) from None
    return records


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(text, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved under another suffix?
            try:
                return _parse_jsonl(text, path)
            except RequestError:
                pass
        raise RequestError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def load_requests(
    path: str | os.PathLike, format: str | None = None, limit: int | None = None, *, drop_conflicts: bool = False
) -> list[EditRequest]:
    """Read edit requests from a file: ``load_requests("zsre_eval_1037.json", limit=100)``.

    ``format``: one of :data:`FORMATS`, or None to detect it (``.jsonl`` files and
    ``{"requests": [...]}`` objects are read as records too; the schema is then told from the first
    record's keys). ``limit`` keeps the first N records. ``drop_conflicts`` first leaves out each
    record that asks an earlier one's subject and prompt for another target (see
    :func:`drop_conflicts`; logged), so the first N of the rest make one valid batch; every record of
    the file is then read and checked, not only the first N. Raises
    :class:`RequestError` naming the file and the record for anything malformed.
    """
    _check_format(format)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RequestError(f"limit must be a positive int or None, got {_short(limit)}")
    p = Path(path)
    data = _parse(_read_text(p), p)

    if isinstance(data, dict):
        if not isinstance(data.get("requests"), list):
            raise RequestError(
                f"{p}: top level is a JSON object with keys {sorted(data)[:10]}; expected a list of records "
                'or an object {"requests": [...]}'
            )
        data = data["requests"]
        format = format or "plain"
    elif not isinstance(data, list):
        raise RequestError(f"{p}: top level is a JSON {_type_name(data)}, expected a list of records")
    if not data:
        raise RequestError(f"{p}: contains no records")

    if limit is not None and not drop_conflicts:
        data = data[:limit]
    requests = requests_from_dicts(data, format, source=str(p))
    if drop_conflicts:
        requests, dropped = _drop_conflicts(requests)
        if dropped:
            logger.warning("%s: left out %d record(s) asking an earlier record's subject and prompt for another "
                           "target (case_ids %s)", p, len(dropped),
                           ", ".join(str(r.case_id) for r in dropped[:5]) + (", ..." if len(dropped) > 5 else ""))
        requests = requests[:limit] if limit is not None else requests
    logger.info("loaded %d edit requests from %s", len(requests), p)
    return requests


def as_requests(requests: "Sequence[EditRequest | Mapping[str, Any]] | EditRequest | Mapping[str, Any]") -> list[EditRequest]:
    """A validated list of EditRequests from one request, or a list of requests or dicts."""
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


def file_format(path: str | os.PathLike) -> str:
    """The format :func:`load_requests` detects for a request file (one of :data:`FORMATS`)."""
    p = Path(path)
    data = _parse(_read_text(p), p)
    if isinstance(data, dict):
        return "plain"
    if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
        raise RequestError(f"{p}: expected a non-empty list of records")
    return _detect_format(data[0], str(p))
