"""Tests of lmedit.requests: EditRequest validation, the four loaders on real data, error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmedit.errors import RequestError
from lmedit.requests import FORMATS, EditRequest, drop_conflicts, load_requests, requests_from_dicts, validate_batch

from helpers import COUNTERFACT_500 as CF_500
from helpers import COUNTERFACT_TRAIN as CF_TRAIN
from helpers import MQUAKE_HARD as MQUAKE
from helpers import ZSRE_EVAL as ZSRE
from helpers import needs_data


def _raw(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cf_train() -> list[EditRequest]:
    """The 10,000-record EasyEdit file, loaded once for the module (its tests carry needs_data)."""
    return load_requests(CF_TRAIN)


# --------------------------------------------------------------------------------------------
# EditRequest
# --------------------------------------------------------------------------------------------


def test_edit_request_normalises_and_derives() -> None:
    req = EditRequest(
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "  English ",
        target_true=" French",
        paraphrase_prompts=["Danielle Darrieux spoke"],  # type: ignore[arg-type]  # list -> tuple
        case_id=7,
    )
    assert req.target_new == "English"
    assert req.target_true == "French"
    assert req.paraphrase_prompts == ("Danielle Darrieux spoke",)
    assert req.text == "The mother tongue of Danielle Darrieux is"
    assert req.text == req.prompt.format(req.subject)
    assert req.neighborhood_target == "French"  # CounterFact: neighbours keep the true answer
    assert EditRequest("{} is", "X", "Y", target_true="Z", neighborhood_answer="W").neighborhood_target == "W"
    assert EditRequest("{} is", "X", "Y").neighborhood_target is None
    assert hash(req) == hash(EditRequest.from_dict(req.to_dict()))  # frozen, tuples: usable as a key


def test_literal_braces_are_kept_in_text() -> None:
    req = EditRequest("In JSON {a} means {}. It", "a map", "dict")
    assert req.text == "In JSON {a} means a map. It"


def test_from_dict_and_to_dict_are_inverse() -> None:
    d = {
        "prompt": "{} plays the",
        "subject": "Toko Yasuda",
        "target_new": "piano",
        "target_true": "guitar",
        "paraphrase_prompts": ["Toko Yasuda is incredible at"],
        "neighborhood_prompts": ["John Lennon performs on the"],
        "neighborhood_answer": "guitar",
        "generation_prompts": [],
        "case_id": "cf-2",
    }
    req = EditRequest.from_dict(d)
    assert req.to_dict() == d
    assert EditRequest.from_dict(req.to_dict()) == req


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("fmt", [None, "counterfact"])
def test_load_counterfact_500(fmt: str | None) -> None:
    reqs = load_requests(CF_500, format=fmt)
    assert len(reqs) == 500
    first = reqs[0]
    assert first.case_id == 20952
    assert first.prompt == "{} is located in"
    assert first.subject == "Angola"
    assert first.target_new == "Antarctica"
    assert first.target_true == "Africa"
    assert first.neighborhood_target == "Africa"
    assert len(first.paraphrase_prompts) == 2
    assert first.paraphrase_prompts[1] == "Last updated on 4 February 2017. Angola is a part of the continent of"
    assert len(first.neighborhood_prompts) == 10 and first.neighborhood_prompts[1] == "Ghana is in"
    assert len(first.generation_prompts) == 10
    assert reqs[-1].case_id == 13382
    raw = _raw(CF_500)
    for req, rec in zip(reqs, raw, strict=True):
        assert req.prompt.count("{}") == 1
        rw = rec["requested_rewrite"]
        assert req.text == rw["prompt"].format(rw["subject"])
        assert req.target_new == rw["target_new"]["str"]
    validate_batch(reqs)  # no subject asked for two targets in this sample


@needs_data
def test_load_easyedit_train(cf_train: list[EditRequest]) -> None:
    assert len(cf_train) == 10_000
    first = cf_train[0]
    assert first.case_id == 2
    assert first.prompt == "{}, the"
    assert first.subject == "Toko Yasuda"
    assert (first.target_new, first.target_true) == ("piano", "guitar")
    assert first.paraphrase_prompts == ("Toko Yasuda is incredible at",)
    assert first.neighborhood_prompts == ("John Lennon performs on the",)
    assert first.neighborhood_answer == "guitar"
    assert cf_train[99].case_id == 196
    assert cf_train[-1].case_id == 21912
    raw = _raw(CF_TRAIN)
    for req, rec in zip(cf_train, raw, strict=True):
        assert req.prompt.count("{}") == 1
        assert req.prompt.format(req.subject) == rec["prompt"]
        assert req.text == rec["prompt"]


@needs_data
def test_load_easyedit_with_limit_and_explicit_format(cf_train: list[EditRequest]) -> None:
    head = load_requests(CF_TRAIN, format="easyedit", limit=50)
    assert head == cf_train[:50]
    assert load_requests(CF_TRAIN, limit=3) == cf_train[:3]


@needs_data
def test_whole_easyedit_file_is_not_one_batch(cf_train: list[EditRequest]) -> None:
    # Istanbul is asked to twin with Berlin (case 1809) and with Warsaw (case 2580).
    with pytest.raises(RequestError) as exc:
        validate_batch(cf_train)
    assert "case_id=1809" in str(exc.value) and "case_id=2580" in str(exc.value)
    assert "'Berlin'" in str(exc.value) and "'Warsaw'" in str(exc.value)
    kept, dropped = drop_conflicts(cf_train)
    validate_batch(kept)  # one batch now
    assert len(dropped) == 74 and len(kept) + len(dropped) == len(cf_train)
    assert [r.case_id for r in kept + dropped] != [r.case_id for r in cf_train]  # some were dropped mid-file
    assert sorted(map(id, kept + dropped)) == sorted(map(id, cf_train))
    kept_ids = set(map(id, kept))
    assert [r for r in cf_train if id(r) in kept_ids] == kept  # file order kept
    assert any(r.case_id == 1809 for r in kept) and all(r.case_id != 2580 for r in kept)  # the first asked wins
    # the same through load_requests, the limit taken after the drop
    assert load_requests(CF_TRAIN, limit=4096, drop_conflicts=True) == kept[:4096]
    assert load_requests(CF_TRAIN, drop_conflicts=True) == kept


@needs_data
@pytest.mark.parametrize("fmt", [None, "zsre"])
def test_load_zsre(fmt: str | None) -> None:
    reqs = load_requests(ZSRE, format=fmt)
    assert len(reqs) == 1037
    first = reqs[0]
    assert first.case_id == 0  # zsRE records carry no id: the record index stands in
    assert first.prompt == "When was the inception of {}?"
    assert first.subject == "IAAF Combined Events Challenge"
    assert (first.target_new, first.target_true) == ("2006", "1998")
    assert first.paraphrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    assert first.neighborhood_prompts == ("nq question: what is the name of the last episode of spongebob",)
    assert first.neighborhood_target == "The String"
    assert reqs[-1].case_id == 1036
    # record 112 has alt "male" and answers ["male"]: no distinct old answer
    assert (reqs[112].target_new, reqs[112].target_true) == ("male", None)
    assert reqs[326].target_new == "Delaware River"  # source has " Delaware River"
    assert sum(r.target_true is None for r in reqs) == 29
    raw = _raw(ZSRE)
    for req, rec in zip(reqs, raw, strict=True):
        assert req.prompt.count("{}") == 1
        assert req.prompt.format(req.subject) == rec["src"]
    validate_batch(reqs)


@needs_data
def test_mquake_multi_rewrite_records_are_refused_clearly() -> None:
    with pytest.raises(RequestError, match=r"record 0 .*MQuAKE-style"):
        load_requests(MQUAKE)


# --------------------------------------------------------------------------------------------
# Schema details
# --------------------------------------------------------------------------------------------


def test_easyedit_subject_matching_rules() -> None:
    records = [
        {"prompt": "Paris, capital of Paris, is", "subject": "Paris", "target_new": "Rome", "ground_truth": "Paris"},
        {
            "prompt": "The mother tongue of Danielle Darrieux is",
            "subject": "danielle darrieux",
            "target_new": "English",
            "ground_truth": ["French", "Occitan"],
        },
    ]
    first, second = requests_from_dicts(records, "easyedit")
    assert first.prompt == "{}, capital of Paris, is"  # first occurrence only
    assert first.case_id == 0
    assert second.subject == "Danielle Darrieux"  # spelled as in the prompt
    assert second.text == records[1]["prompt"]
    assert second.target_true == "French"  # list ground_truth: first element
    assert second.neighborhood_prompts == ()


def test_counterfact_jsonl_is_detected(tmp_path: Path) -> None:
    rec = {
        "case_id": 5,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "subject": "Angola",
            "target_new": {"str": "Antarctica"},
            "target_true": {"str": "Africa"},
        },
        "paraphrase_prompts": ["Angola is in"],
    }
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(rec) + "\n\n", encoding="utf-8")
    (req,) = load_requests(path)
    assert (req.case_id, req.target_new, req.target_true, req.paraphrase_prompts) == (
        5, "Antarctica", "Africa", ("Angola is in",),
    )


def _plain_requests() -> list[EditRequest]:
    return [
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=1),
        EditRequest(
            "{} plays the",
            "Toko Yasuda",
            "piano",
            paraphrase_prompts=("Toko Yasuda is incredible at",),
            neighborhood_prompts=("John Lennon performs on the",),
            neighborhood_answer="guitar",
            generation_prompts=("Toko Yasuda is known for",),
        ),
        EditRequest("Café {} sells", "Ünïcødé", "tea", case_id="s-3"),
    ]


def test_plain_json_round_trip(tmp_path: Path) -> None:
    reqs = _plain_requests()
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps([r.to_dict() for r in reqs], ensure_ascii=False), encoding="utf-8")
    assert load_requests(path) == reqs
    assert load_requests(path, format="plain", limit=2) == reqs[:2]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"requests": [r.to_dict() for r in reqs]}), encoding="utf-8")
    assert load_requests(wrapped) == reqs


def test_plain_jsonl_round_trip(tmp_path: Path) -> None:
    reqs = _plain_requests()
    path = tmp_path / "reqs.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs), encoding="utf-8")
    assert load_requests(path) == reqs
    # JSON Lines saved as .json are recognised too
    misnamed = tmp_path / "reqs_lines.json"
    misnamed.write_bytes(path.read_bytes())
    assert load_requests(misnamed) == reqs


# --------------------------------------------------------------------------------------------
# Malformed input: every case must raise RequestError with a message naming what was wrong
# --------------------------------------------------------------------------------------------

OK = {"prompt": "{} is located in", "subject": "Angola", "target_new": "Antarctica"}


def _js(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


MALFORMED: list[tuple[str, str, bytes | None, str | None, str]] = [
    # (id, file name, content or None for "no file", format, expected substring of the message)
    ("missing-file", "nope.json", None, None, "no such file"),
    ("empty-file", "empty.json", b"  \n", None, "file is empty"),
    ("not-utf8", "latin1.json", b'[{"prompt": "Caf\xe9 {} is"}]', None, "not valid UTF-8 (byte 0xe9 at offset 16)"),
    ("invalid-json", "bad.json", b'[\n{"prompt": "{} is",\n "subject": }]', None, "invalid JSON at line 3, column 13"),
    ("invalid-jsonl", "bad.jsonl", _js(OK) + b"\n{oops\n", None, "invalid JSON on line 2"),
    ("dict-without-requests", "d.json", _js({"data": [OK]}), None, "top level is a JSON object with keys ['data']"),
    ("top-level-number", "n.json", b"42", None, "top level is a JSON int"),
    ("empty-list", "l.json", b"[]", None, "contains no records"),
    ("record-not-dict", "r.json", _js([OK, ["x"]]), None, "record 1 is a list, not an object"),
    ("missing-target-new", "m.json", _js([{"prompt": "{} is", "subject": "X", "case_id": 9}]), None,
     "record 0 (case_id=9) [plain]: missing required field(s) ['target_new']"),
    ("prompt-without-slot", "p.json", _js([{**OK, "prompt": "Angola is located in"}]), None, 'has no "{}"'),
    ("prompt-two-slots", "p2.json", _js([{**OK, "prompt": "{} and {} are in"}]), None, 'has 2 "{}" placeholders'),
    ("subject-absent-easyedit", "e.json",
     _js([{"case_id": 77, "prompt": "Angola is in", "subject": "Zanzibar", "target_new": "Asia", "ground_truth": "Africa"}]),
     None, "record 0 (case_id=77) [easyedit]: subject 'Zanzibar' does not occur in prompt 'Angola is in'"),
    ("subject-absent-zsre", "z.json",
     _js([{"subject": "Nile", "src": "How long is it?", "alt": "5 km", "answers": ["6650 km"]}]),
     None, "subject 'Nile' does not occur in src"),
    ("whitespace-target", "w.json", _js([{**OK, "target_new": "   "}]), None, "target_new is empty or whitespace"),
    ("whitespace-subject", "ws.json", _js([{**OK, "subject": " "}]), None, "subject is empty or whitespace"),
    ("target-new-equals-true", "t.json", _js([{**OK, "target_new": "Africa ", "target_true": "Africa"}]), None,
     "target_new and target_true are both 'Africa'"),
    ("list-instead-of-str", "li.json", _js([{**OK, "subject": ["Angola"]}]), None, "subject must be a str, got list"),
    ("str-instead-of-list", "sl.json", _js([{**OK, "paraphrase_prompts": "Angola is in"}]), None,
     "paraphrase_prompts must be a list or tuple of str, got str"),
    ("non-str-prompt-item", "ni.json", _js([{**OK, "neighborhood_prompts": ["Ghana is in", 3]}]), None,
     "neighborhood_prompts[1] must be a str, got int"),
    ("unknown-key-plain", "u.json", _js([{**OK, "colour": "red"}]), None, "unknown key(s) ['colour']"),
    ("bool-case-id", "b.json", _js([{**OK, "case_id": True}]), None, "case_id must be an int, a str or None"),
    ("counterfact-missing-subject", "cf.json",
     _js([{"case_id": 3, "requested_rewrite": {"prompt": "{} is in", "target_new": {"str": "Asia"}}}]), None,
     "record 0 (case_id=3) [counterfact]: missing field 'subject'"),
    ("zsre-missing-alt", "zm.json", _js([{"subject": "Nile", "src": "How long is the Nile?"}]), "zsre",
     "missing field 'alt'"),
    ("wrong-type-in-source", "wt.json", _js([{"subject": "Nile", "src": "Nile?", "alt": 5}]), "zsre",
     "field 'alt' must be str, got int 5"),
    ("undetectable-format", "x.json", _js([{"question": "q", "answer": "a"}]), None,
     "cannot tell the format from the first record's keys ['answer', 'question']"),
    ("unknown-format-name", "ok.json", _js([OK]), "rome", "unknown request format 'rome'; supported formats are"),
]


@pytest.mark.parametrize(("name", "content", "fmt", "expected"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_input_raises_named_error(
    tmp_path: Path, name: str, content: bytes | None, fmt: str | None, expected: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RequestError) as exc:
        load_requests(path, format=fmt)
    message = str(exc.value)
    assert expected in message
    if fmt not in FORMATS and fmt is not None:
        assert all(f in message for f in FORMATS)
    else:
        assert name in message  # the file is named


def test_bad_limit_and_unknown_format_in_memory() -> None:
    with pytest.raises(RequestError, match="limit must be a positive int"):
        load_requests("whatever.json", limit=0)
    with pytest.raises(RequestError, match="unknown request format 'mend'"):
        requests_from_dicts([OK], "mend")


def test_direct_construction_errors_name_the_request() -> None:
    with pytest.raises(RequestError, match=r"request case_id=4: prompt must be a str, got int 3"):
        EditRequest(3, "X", "Y", case_id=4)  # type: ignore[arg-type]
    with pytest.raises(RequestError, match=r"request for subject 'Angola': target_true is empty"):
        EditRequest("{} is in", "Angola", "Asia", target_true=" ")
    with pytest.raises(RequestError, match=r"record 5 \(case_id=8\): unknown key"):
        EditRequest.from_dict({**OK, "case_id": 8, "target": "x"}, index=5)


# --------------------------------------------------------------------------------------------
# validate_batch
# --------------------------------------------------------------------------------------------


def test_validate_batch_conflicting_targets_names_both_ids() -> None:
    batch = [
        EditRequest("{} is located in", "Angola", "Antarctica", case_id="a1"),
        EditRequest("{} speaks", "Angola", "French", case_id="a2"),
        EditRequest("{} is located in", "Angola", "Europe", case_id="a3"),
    ]
    with pytest.raises(RequestError) as exc:
        validate_batch(batch)
    message = str(exc.value)
    assert "case_id='a1'" in message and "case_id='a3'" in message
    assert "'Antarctica'" in message and "'Europe'" in message
    assert "a2" not in message


def test_drop_conflicts_keeps_the_first_target_asked() -> None:
    batch = [
        EditRequest("{} is located in", "Angola", "Antarctica", case_id="a1"),
        EditRequest("{} speaks", "Angola", "French", case_id="a2"),
        EditRequest("{} is located in", "Angola", "Europe", case_id="a3"),
        EditRequest("{} is located in", "Angola", "Antarctica", case_id="a4"),  # a repeat, not a conflict
        EditRequest("{} is located in", "Angola", "Asia", case_id="a5"),
    ]
    kept, dropped = drop_conflicts(batch)
    assert [r.case_id for r in kept] == ["a1", "a2", "a4"] and [r.case_id for r in dropped] == ["a3", "a5"]
    validate_batch(kept)
    assert drop_conflicts(kept) == (kept, [])
    with pytest.raises(RequestError, match="batch item 1 is a dict, not an EditRequest"):
        drop_conflicts([batch[0], dict(OK)])  # type: ignore[list-item]


def test_validate_batch_allows_repeats_and_other_prompts() -> None:
    same = EditRequest("{} is located in", "Angola", "Antarctica", case_id=1)
    validate_batch([same, EditRequest("{} is located in", "Angola", " Antarctica", case_id=2)])
    validate_batch([same, EditRequest("{} borders", "Angola", "Chile", case_id=3)])


def test_validate_batch_rejects_empty_and_foreign_items() -> None:
    with pytest.raises(RequestError, match="empty batch"):
        validate_batch([])
    with pytest.raises(RequestError, match="batch item 1 is a dict, not an EditRequest"):
        validate_batch([EditRequest("{} is", "X", "Y"), dict(OK)])  # type: ignore[list-item]
