"""Malformed input, table-driven: every case must fail with lmedit's specific exception (or, on the
command line, one ``lmedit: error: ...`` line and exit code 2) naming the problem, and must leave
the model's weights and its hooks exactly as they were (no Editor history exists outside an Editor).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lmedit
from lmedit import (
    CacheError, EditRequest, HyperparameterError, ModelLoadError, RequestError, SolveError,
    UnsupportedArchitectureError,
)
from lmedit.cli import main
from lmedit.hooks import count_hooks
from lmedit.models import fingerprint

from helpers import changed, snapshot, spd_covariances

LAYERS = [1, 2]
FAST = dict(v_num_grad_steps=2, context_templates=[[5, 1]])  # a quick target optimisation
GOOD = {"prompt": "The capital of {} is", "subject": "Xanadu", "target_new": "Paris", "target_true": "Rome"}
REQ = EditRequest(**GOOD)


def _assert_untouched(model, before) -> None:
    diff = changed(model, before)
    assert not diff, f"weights changed by a failing call: {sorted(diff)}"
    assert count_hooks(model) == 0


@pytest.fixture(scope="module")
def tiny(make_tiny, tokenizer):
    """(model, tokenizer, snapshot of the state dict, {layer: SPD C}) for a tiny llama."""
    model = make_tiny("llama", seed=5)
    return model, tokenizer, snapshot(model), spd_covariances(model, LAYERS)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny, make_tiny):
    """On disk: the tiny llama, a tiny Bloom (no adapter), a delta file made on ANOTHER llama,
    a plain safetensors file without lmedit's metadata, and a statistics cache folder."""
    from transformers import AutoModelForCausalLM, BloomConfig

    model, tok, _, C = tiny
    root = tmp_path_factory.mktemp("bad")
    model.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4))
    bloom.save_pretrained(root / "bloom")
    tok.save_pretrained(root / "bloom")
    other = make_tiny("llama", seed=6)
    lmedit.edit(other, tok, [REQ], method="emmet", layers=LAYERS, covariances=C, **FAST).save_deltas(root / "other.safetensors")
    save_file({"layer.1": torch.zeros(2, 2)}, str(root / "plain.safetensors"))
    (root / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).numpy().tobytes())
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    return root


# --- lmedit.edit ----------------------------------------------------------------------------------

def _with(**changes):
    return {**GOOD, **changes}


def _drop(key):
    return {k: v for k, v in GOOD.items() if k != key}


def _cov(C, **per_layer):
    """C with some layers replaced: ``_cov(C, l2="zeros")``."""
    out = dict(C)
    for name, how in per_layer.items():
        l = int(name[1:])
        d = C[l].shape[0]
        out[l] = {"zeros": torch.zeros(d, d, dtype=torch.float64),
                  "nan": C[l].clone().fill_diagonal_(float("nan")),
                  "inf": C[l].clone().fill_diagonal_(float("inf")),
                  "shape": torch.eye(d + 1, dtype=torch.float64),
                  "missing": None}[how]
        if out[l] is None:
            del out[l]
    return out


# (id, requests, method, overrides (C = the fixture's covariances), exception, substring)
EDIT_CASES = [
    ("missing-target_new", [_drop("target_new")], "emmet", {}, RequestError, "missing required field(s) ['target_new']"),
    ("missing-subject", [_drop("subject")], "emmet", {}, RequestError, "missing required field(s) ['subject']"),
    ("unknown-key", [_with(target="Paris")], "emmet", {}, RequestError, "unknown key(s) ['target']"),
    ("subject-not-str", [_with(subject=42)], "emmet", {}, RequestError, "subject must be a str, got int 42"),
    ("target-not-str", [_with(target_new=["Paris"])], "emmet", {}, RequestError, "target_new must be a str"),
    ("no-placeholder", [_with(prompt="The capital is")], "emmet", {}, RequestError, 'has no "{}" placeholder'),
    ("two-placeholders", [_with(prompt="{} and {} are")], "emmet", {}, RequestError, 'has 2 "{}" placeholders'),
    ("empty-target", [_with(target_new="")], "emmet", {}, RequestError, "target_new is empty or whitespace"),
    ("blank-target", [_with(target_new="  \t ")], "emmet", {}, RequestError, "target_new is empty or whitespace"),
    ("blank-subject", [_with(subject=" ")], "emmet", {}, RequestError, "subject is empty or whitespace"),
    ("new-equals-true", [_with(target_true=" Paris ")], "emmet", {}, RequestError, "would change nothing"),
    ("conflicting-targets", [GOOD, _with(target_new="Oslo", target_true=None)], "emmet", {}, RequestError,
     "conflicting edits in one batch"),
    ("empty-batch", [], "emmet", {}, RequestError, "empty batch"),
    ("not-a-request", ["The capital of Xanadu is Paris"], "emmet", {}, RequestError, "expected an EditRequest or a dict, got str"),
    ("unknown-method", [GOOD], "frobnicate", {}, HyperparameterError, "unknown method 'frobnicate'"),
    ("unknown-hparam", [GOOD], "emmet", {"foo": 1}, HyperparameterError, "unknown hyperparameter(s) foo"),
    ("negative-lr", [GOOD], "emmet", {"v_lr": -1}, HyperparameterError, "v_lr = -1: must be > 0"),
    ("string-lr", [GOOD], "memit", {"v_lr": "fast"}, HyperparameterError, "v_lr = 'fast'"),
    ("bad-layer-entry", [GOOD], "memit", {"layers": ["one"]}, HyperparameterError, "layers[0] = 'one': must be an int"),
    ("layer-out-of-range", [GOOD], "emmet", {"layers": [1, 99]}, HyperparameterError, "layers [99] are out of range"),
    ("layers-unsorted", [GOOD], "memit", {"layers": [2, 1]}, HyperparameterError, "strictly increasing"),
    ("rome-two-layers", [GOOD], "rome", {"layers": [1, 2]}, HyperparameterError, "must be one layer (ROME edits one"),
    ("zero-lambda", [GOOD], "memit", {"mom2_update_weight": 0}, HyperparameterError, "mom2_update_weight"),
    ("cov-nan", [GOOD], "emmet", {"C": {"l2": "nan"}}, HyperparameterError, "covariances[2] contains NaN or inf"),
    ("cov-inf", [GOOD], "memit", {"C": {"l1": "inf"}}, HyperparameterError, "covariances[1] contains NaN or inf"),
    ("cov-shape", [GOOD], "emmet", {"C": {"l1": "shape"}}, HyperparameterError, "covariances[1] has shape"),
    ("cov-missing-layer", [GOOD], "emmet", {"C": {"l2": "missing"}}, HyperparameterError, "no matrix for layer(s) [2]"),
    # layer 1 is solved and written before layer 2's zero C fails: the transaction must undo it
    ("cov-singular-last-layer", [GOOD], "emmet", {"C": {"l2": "zeros"}}, SolveError, "not positive definite"),
    ("cov-singular-all", [GOOD], "emmet", {"C": {"l1": "zeros", "l2": "zeros"}}, SolveError, "not positive definite"),
    ("rome-cov-singular", [GOOD], "rome", {"layers": [2], "C": {"l2": "zeros"}}, SolveError, "not positive definite"),
]


@pytest.mark.parametrize("reqs,method,overrides,exc,text", [c[1:] for c in EDIT_CASES], ids=[c[0] for c in EDIT_CASES])
def test_edit_rejects(tiny, reqs, method, overrides, exc, text):
    model, tok, before, C = tiny
    overrides = dict(overrides)
    cov = _cov(C, **overrides.pop("C", {}))
    kw = {"layers": LAYERS, **FAST, **overrides}
    with pytest.raises(exc) as err:
        lmedit.edit(model, tok, reqs, method=method, covariances=cov, **kw)
    assert text in str(err.value)
    assert isinstance(err.value, lmedit.LmeditError)
    _assert_untouched(model, before)


def test_singular_covariance_rolls_back_the_layer_already_written(tiny, monkeypatch):
    """EMMET writes layer 1, then layer 2's zero C fails: the transaction must restore layer 1."""
    from lmedit.core.weights import WeightTransaction

    model, tok, before, C = tiny
    written = []
    real_add = WeightTransaction.add
    monkeypatch.setattr(WeightTransaction, "add", lambda self, l, d: written.append(l) or real_add(self, l, d))
    with pytest.raises(SolveError, match=r"lambda \* C \+ mu I \+ P_e is not positive definite"):
        lmedit.edit(model, tok, [REQ], method="emmet", covariances=_cov(C, l2="zeros"), layers=LAYERS, **FAST)
    assert written == [1]
    _assert_untouched(model, before)


@pytest.mark.parametrize("how", ["config", "bloom"])
def test_edit_unknown_architecture(tiny, dirs, monkeypatch, how):
    model, tok, before, C = tiny
    if how == "config":
        monkeypatch.setattr(model.config, "model_type", "frobnet")
        target, name = model, "frobnet"
    else:
        target, _ = lmedit.load_model(str(dirs / "bloom"))
        name, before = "bloom", snapshot(target)
    with pytest.raises(UnsupportedArchitectureError) as err:
        lmedit.edit(target, tok, [REQ], method="emmet", layers=LAYERS, covariances=C, **FAST)
    msg = str(err.value)
    assert f"unknown architecture {name!r}" in msg and "register_adapter" in msg and "llama" in msg
    monkeypatch.undo()
    _assert_untouched(target, before)


# --- lmedit.load_requests -------------------------------------------------------------------------

CF = {"case_id": 7, "requested_rewrite": {"prompt": "{} is located in", "subject": "Angola",
                                          "target_new": {"str": "Antarctica"}, "target_true": {"str": "Africa"}}}


def _cf(**rewrite):
    return [{**CF, "requested_rewrite": {**CF["requested_rewrite"], **rewrite}}]


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


# (id, file name, bytes, load_requests kwargs, substring)
FILE_CASES = [
    ("empty-file", "r.json", b"", {}, "file is empty"),
    ("blank-file", "r.json", b"  \n\t\n", {}, "file is empty"),
    ("non-utf8", "r.json", b'[{"prompt": "{} is", "subject": "Caf\xe9", "target_new": "x"}]', {},
     "not valid UTF-8 (byte 0xe9 at offset"),
    ("invalid-json", "r.json", b'[{"prompt": "{} is",', {}, "invalid JSON at line 1"),
    ("invalid-jsonl-line", "r.jsonl", _json(GOOD) + b"\n{oops}\n", {}, "invalid JSON on line 2"),
    ("top-level-number", "r.json", b"3", {}, "top level is a JSON int"),
    ("object-without-requests", "r.json", _json({"edits": [GOOD]}), {}, "top level is a JSON object with keys ['edits']"),
    ("no-records", "r.json", b"[]", {}, "contains no records"),
    ("record-not-object", "r.json", b"[1, 2]", {}, "record 0 is a int"),
    ("undetectable-format", "r.json", _json([{"question": "q"}]), {}, "cannot tell the format"),
    ("unknown-format", "r.json", _json([GOOD]), {"format": "xml"}, "unknown request format 'xml'"),
    ("limit-zero", "r.json", _json([GOOD]), {"limit": 0}, "limit must be a positive int or None, got 0"),
    ("plain-missing-field", "r.json", _json([GOOD, _drop("target_new")]), {}, "record 1 [plain]: missing required field(s) ['target_new']"),
    ("plain-wrong-type", "r.json", _json([_with(subject=["Xanadu"])]), {}, "subject must be a str, got list"),
    ("plain-missing-placeholder", "r.json", _json([_with(prompt="Xanadu's capital is")]), {}, 'has no "{}" placeholder'),
    ("plain-blank-target", "r.json", _json([_with(target_new="   ")]), {}, "target_new is empty or whitespace"),
    ("plain-same-targets", "r.json", _json([_with(target_true="Paris")]), {}, "would change nothing"),
    ("counterfact-missing-target", "r.json", _json([{**CF, "requested_rewrite": {
        k: v for k, v in CF["requested_rewrite"].items() if k != "target_new"}}]), {}, "missing field 'target_new'"),
    ("counterfact-target-no-str", "r.json", _json(_cf(target_new={"id": "Q51"})), {}, "requested_rewrite.target_new has no 'str' key"),
    ("counterfact-prompt-no-placeholder", "r.json", _json(_cf(prompt="Angola is located in")), {}, "case_id=7"),
    ("counterfact-empty-target", "r.json", _json(_cf(target_new={"str": ""})), {}, "target_new is empty"),
    ("counterfact-rewrite-list", "r.json", _json([{**CF, "requested_rewrite": [CF["requested_rewrite"]] * 2}]), {},
     "MQuAKE-style"),
    ("easyedit-subject-absent", "r.json", _json([{"prompt": "Who wrote Hamlet?", "subject": "Macbeth", "target_new": "Marlowe",
                                                  "ground_truth": "Shakespeare"}]), {}, "subject 'Macbeth' does not occur in prompt"),
    ("easyedit-empty-target-list", "r.json", _json([{"prompt": "Who wrote Hamlet?", "subject": "Hamlet", "target_new": [],
                                                     "ground_truth": "Shakespeare"}]), {}, "field 'target_new' is an empty list"),
    ("zsre-alt-not-str", "r.json", _json([{"subject": "Hamlet", "src": "Who wrote Hamlet?", "alt": 3, "answers": ["x"],
                                           "loc": "q", "loc_ans": "a"}]), {}, "field 'alt' must be str, got int 3"),
    ("zsre-subject-absent", "r.json", _json([{"subject": "Macbeth", "src": "Who wrote Hamlet?", "alt": "Marlowe",
                                              "answers": ["x"]}]), {}, "does not occur in src"),
]


@pytest.mark.parametrize("name,content,kwargs,text", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_load_requests_rejects(tmp_path, name, content, kwargs, text):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RequestError) as err:
        lmedit.load_requests(path, **kwargs)
    assert text in str(err.value)
    if "limit" not in kwargs and "format" not in kwargs:
        assert str(path) in str(err.value)  # the message names the file


def test_load_requests_missing_and_directory(tmp_path):
    with pytest.raises(RequestError, match="no such file"):
        lmedit.load_requests(tmp_path / "nope.json")
    with pytest.raises(RequestError, match="cannot read"):
        lmedit.load_requests(tmp_path)


# --- lmedit.apply_deltas and lmedit.load_model ----------------------------------------------------

def _crafted(path: Path, model, tensors: dict[str, torch.Tensor]) -> Path:
    """A delta file with lmedit's metadata for ``model`` but the given tensors."""
    save_file(tensors, str(path), metadata={"format": "lmedit-deltas", "base_model": fingerprint(model),
                                            "method": "emmet", "requests": "[]"})
    return path


DELTA_CASES = [
    ("other-model", lambda d, m, t: d / "other.safetensors", "was made for model llama-4L-64d-"),
    ("random-bytes", lambda d, m, t: d / "random.safetensors", "unreadable or corrupt"),
    ("truncated", lambda d, m, t: (t / "cut.safetensors").write_bytes((d / "other.safetensors").read_bytes()[:300])
     and t / "cut.safetensors", "unreadable or corrupt"),
    ("missing-file", lambda d, m, t: d / "absent.safetensors", "does not exist"),
    ("a-directory", lambda d, m, t: d, "does not exist"),
    ("no-lmedit-metadata", lambda d, m, t: d / "plain.safetensors", "not an lmedit delta file"),
    ("wrong-shape", lambda d, m, t: _crafted(t / "s.safetensors", m, {"layer.1": torch.zeros(64, 64)}), "layer.1 has shape (64, 64)"),
    ("layer-out-of-range", lambda d, m, t: _crafted(t / "r.safetensors", m, {"layer.9": torch.zeros(64, 128)}),
     "'layer.9' does not name a layer 0..3"),
    ("bad-key", lambda d, m, t: _crafted(t / "k.safetensors", m, {"mlp": torch.zeros(64, 128)}), "'mlp' does not name a layer"),
]


@pytest.mark.parametrize("make,text", [c[1:] for c in DELTA_CASES], ids=[c[0] for c in DELTA_CASES])
def test_apply_deltas_rejects(tiny, dirs, tmp_path, make, text):
    model, _, before, _ = tiny
    with pytest.raises(CacheError) as err:
        lmedit.apply_deltas(model, make(dirs, model, tmp_path))
    assert text in str(err.value)
    _assert_untouched(model, before)


def test_apply_deltas_nan_update_changes_nothing(tiny, tmp_path):
    """Layer 1 is fine, layer 2 holds a NaN: layer 1 must not stay applied."""
    model, _, before, _ = tiny
    bad = torch.zeros(64, 128)
    bad[3, 5] = float("nan")
    path = _crafted(tmp_path / "nan.safetensors", model, {"layer.1": torch.ones(64, 128), "layer.2": bad})
    with pytest.raises(SolveError, match="layer 2: the update contains NaN"):
        lmedit.apply_deltas(model, path)
    _assert_untouched(model, before)


@pytest.mark.parametrize("where,text", [("absent", "could not load model"), ("bad_config", "could not load model")])
def test_load_model_rejects(dirs, where, text):
    with pytest.raises(ModelLoadError) as err:
        lmedit.load_model(str(dirs / where))
    assert text in str(err.value) and where in str(err.value)


# --- the command line -----------------------------------------------------------------------------

CLI_FILES = {
    "good.json": _json([GOOD]),
    "empty.json": b"",
    "invalid.json": b"[{",
    "latin1.json": '[{"prompt": "{} is", "subject": "Café", "target_new": "x"}]'.encode("latin-1"),
    "missing.json": _json([_drop("target_new")]),
    "same.json": _json([_with(target_true="Paris")]),
    "conflict.json": _json([GOOD, _with(target_new="Oslo")]),
    "easyedit.json": _json([{"prompt": "Who wrote Hamlet?", "subject": "Macbeth", "target_new": "Marlowe",
                             "ground_truth": "Shakespeare"}]),
}

# (id, argv with {d} = the module folder and {f} = the request files' folder, substring of the error line)
CLI_CASES = [
    ("requests-missing", "edit --model {d}/llama --requests {f}/nope.json", "no such file"),
    ("requests-empty", "edit --model {d}/llama --requests {f}/empty.json", "file is empty"),
    ("requests-invalid-json", "edit --model {d}/llama --requests {f}/invalid.json", "invalid JSON"),
    ("requests-non-utf8", "edit --model {d}/llama --requests {f}/latin1.json", "not valid UTF-8"),
    ("requests-missing-field", "edit --model {d}/llama --requests {f}/missing.json", "missing required field(s) ['target_new']"),
    ("requests-same-targets", "edit --model {d}/llama --requests {f}/same.json", "would change nothing"),
    ("requests-conflict", "edit --model {d}/llama --requests {f}/conflict.json", "conflicting edits in one batch"),
    ("easyedit-subject-absent", "edit --model {d}/llama --requests {f}/easyedit.json", "does not occur in prompt"),
    ("unknown-format", "edit --model {d}/llama --requests {f}/good.json --format xml", "unknown request format 'xml'"),
    ("n-zero", "edit --model {d}/llama --requests {f}/good.json --n 0", "limit must be a positive int"),
    ("no-requests-option", "edit --model {d}/llama", "the following arguments are required: --requests"),
    ("unknown-command", "frobnicate", "invalid choice: 'frobnicate'"),
    ("layers-syntax", "edit --model {d}/llama --requests {f}/good.json --layers a,b", "--layers must look like 4,5,6 or 4-8"),
    ("layers-out-of-range", "edit --model {d}/llama --requests {f}/good.json --layers 99", "layers [99] are out of range"),
    ("unknown-method", "edit --model {d}/llama --requests {f}/good.json --method frobnicate", "unknown method 'frobnicate'"),
    ("unknown-hparam", "edit --model {d}/llama --requests {f}/good.json --layers 1,2 --set foo=1", "unknown hyperparameter(s) foo"),
    ("negative-lr", "edit --model {d}/llama --requests {f}/good.json --layers 1,2 --set v_lr=-1", "v_lr = -1: must be > 0"),
    ("string-lr", "edit --model {d}/llama --requests {f}/good.json --layers 1,2 --set v_lr=abc", "v_lr = 'abc'"),
    ("set-syntax", "edit --model {d}/llama --requests {f}/good.json --set v_lr", "--set expects key=value, got 'v_lr'"),
    ("rome-two-layers", "edit --model {d}/llama --requests {f}/good.json --method rome --layers 1,2", "must be one layer (ROME edits one"),
    ("model-missing", "edit --model {d}/absent --requests {f}/good.json", "could not load model"),
    ("model-unknown-architecture", "edit --model {d}/bloom --requests {f}/good.json --layers 1", "unknown architecture 'bloom'"),
    ("dtype-unknown", "edit --model {d}/llama --requests {f}/good.json --dtype float7", "unknown dtype 'float7'"),
    ("eval-batch-size-zero", "eval --model {d}/llama --data {f}/good.json --layers 1,2 --batch-size 0", "batch_size must be an int >= 1, got 0"),
    ("eval-data-missing", "eval --model {d}/llama --data {f}/nope.json", "no such file"),
    ("eval-layers-out-of-range", "eval --model {d}/llama --data {f}/good.json --layers 4", "layers [4] are out of range"),
    ("sweep-batch-sizes", "sweep --model {d}/llama --data {f}/good.json --batch-sizes 1,x --out {f}/sw", "--batch-sizes must look like"),
    ("sweep-unknown-method", "sweep --model {d}/llama --data {f}/good.json --methods memit,frob --out {f}/sw", "unknown method 'frob'"),
]


@pytest.mark.parametrize("argv,text", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_rejects(dirs, tiny, tmp_path, monkeypatch, capsys, argv, text):
    for name, content in CLI_FILES.items():
        (tmp_path / name).write_bytes(content)
    monkeypatch.setenv("LMEDIT_CACHE", str(dirs / "cache"))
    monkeypatch.delenv("LMEDIT_DEBUG", raising=False)
    monkeypatch.setenv("LMEDIT_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    loaded = []
    real_load = lmedit.load_model
    monkeypatch.setattr(lmedit, "load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    try:
        rc = main([*argv.format(d=dirs, f=tmp_path).split(), "--quiet"] if argv != "frobnicate" else [argv])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmedit: error: "), err
    assert text in lines[0]
    assert not (tmp_path / "sw").exists()  # a rejected sweep wrote nothing
    _, _, before, _ = tiny
    for model, _ in loaded:  # whatever the CLI loaded and then refused to edit is unchanged
        if model.config.model_type == "llama":
            _assert_untouched(model, before)
