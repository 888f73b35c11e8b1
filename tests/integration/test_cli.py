"""The command line, in-process (``lmedit.cli.main``) on a tiny llama saved to disk.

Each test checks what the CLI printed or wrote against the library itself: the JSON report's
probabilities against ``score_continuations``, the delta file and the saved model against an
in-process ``lmedit.edit`` with the same settings, eval's metrics against ``evaluate_requests``
and a hand replay of the batches, the sweep's tables against its cell files.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import lmedit
from lmedit.core.context import context_templates
from lmedit.cli import main
from lmedit.evaluate import experiment
from lmedit.evaluate.experiment import METRIC_KEYS
from lmedit.evaluate.metrics import harmonic_mean
from lmedit.evaluate.runner import evaluate_requests
from lmedit.evaluate.scoring import score_continuations
from lmedit.models.adapters import get_adapter

COUNTERFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact" / "counterfact_500.json"

LAYERS = [1, 2]
# small settings: 5 Adam steps, one group of 1 context template, statistics over 20 short texts
SMALL = {"v_num_grad_steps": 5, "context_templates": [[5, 1]], "mom2_n_samples": 20, "mom2_max_length": 64}
SMALL_ARGS = ["--quiet", "--layers", ",".join(map(str, LAYERS))] + [
    a for k, v in SMALL.items() for a in ("--set", f"{k}={json.dumps(v).replace(' ', '')}")
]

REQUESTS = [
    {"prompt": "The capital of {} is", "subject": "Xanadu", "target_new": "Paris", "target_true": "Rome"},
    {"prompt": "{} plays the", "subject": "Lionel Messi", "target_new": "piano", "target_true": "football"},
]


@pytest.fixture(scope="module")
def work(tmp_path_factory, make_tiny, tokenizer) -> Path:
    """A module-wide folder: the tiny llama (``model/``), a request file and a statistics cache."""
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny("llama", seed=3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "requests.json").write_text(json.dumps(REQUESTS))
    return root


@pytest.fixture(autouse=True)
def _env(monkeypatch, work, tokenizer):
    """Statistics go to the module's cache (after the session tokenizer found the embedded model);
    main() sets TQDM_DISABLE under --quiet and torch's thread count: both are put back afterwards."""
    monkeypatch.setenv("LMEDIT_CACHE", str(work / "cache"))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("LMEDIT_NUM_THREADS", "1")  # main() sets torch's threads; the CPU is shared
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _fresh(work: Path):
    return lmedit.load_model(str(work / "model"))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _edited_names(model) -> set[str]:
    adapter = get_adapter(model)
    return {adapter.edit_param_name(l) for l in LAYERS}


# --- edit -----------------------------------------------------------------------------------------

def test_edit_json_report(work, capsys):
    rc = main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"), "--json",
               "--method", "emmet", *SMALL_ARGS])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out)  # the whole of stdout is ONE JSON object
    assert isinstance(report, dict)
    assert report["method"] == "emmet"
    assert report["layers"] == LAYERS
    assert report["hparams"]["v_num_grad_steps"] == 5 and report["hparams"]["layers"] == LAYERS
    assert {"stats_s", "targets_s", "solve_s", "total_s"} <= set(report["timings"])
    t = report["timings"]
    assert all(v >= 0 for v in t.values())
    assert t["total_s"] + 1e-3 >= t["stats_s"] + t["targets_s"] + t["solve_s"] - 3e-3  # rounded to 1 ms

    model, tok = _fresh(work)  # the unedited model: the "pre" numbers must be its probabilities
    assert len(report["requests"]) == len(REQUESTS)
    for r, src in zip(report["requests"], REQUESTS):
        assert {k: r[k] for k in ("subject", "target_new", "target_true")} == \
            {k: src[k] for k in ("subject", "target_new", "target_true")}
        text = src["prompt"].replace("{}", src["subject"])
        (lp_new, _), (lp_true, _) = score_continuations(model, tok, [text, text], [src["target_new"], src["target_true"]])
        assert r["pre"]["p_new"] == pytest.approx(math.exp(float(lp_new.sum())), rel=1e-4)
        assert r["pre"]["p_true"] == pytest.approx(math.exp(float(lp_true.sum())), rel=1e-4)
        for phase in ("pre", "post"):
            assert 0.0 < r[phase]["p_new"] <= 1.0 and 0.0 < r[phase]["p_true"] <= 1.0
        # the edit raised the new target's probability by a clear factor
        assert r["post"]["p_new"] > 3 * r["pre"]["p_new"], r


def test_edit_save_deltas_and_model_reproduce_the_edit(work, tmp_path, capsys):
    deltas, saved = tmp_path / "edit.safetensors", tmp_path / "edited"
    rc = main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"), "--json",
               "--method", "memit", "--save-deltas", str(deltas), "--save-model", str(saved), *SMALL_ARGS])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deltas"] == str(deltas) and report["model_dir"] == str(saved)

    base, tok = _fresh(work)
    base_sd = _state(base)
    edited, _ = lmedit.load_model(str(saved))  # a loadable model directory
    edited_sd = _state(edited)
    names = _edited_names(base)
    assert set(edited_sd) == set(base_sd)
    for k in base_sd:  # only the edited projections differ, and they do
        assert torch.equal(edited_sd[k], base_sd[k]) == (k not in names), k

    # the delta file on a fresh load reproduces the saved weights bit for bit
    res = lmedit.apply_deltas(base, deltas)
    assert res.method == "memit" and res.layers == LAYERS
    assert [r.subject for r in res.requests] == [r["subject"] for r in REQUESTS]
    for k, v in base.state_dict().items():
        assert torch.equal(v, edited_sd[k]), k
    res.undo()
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_sd[k]), k

    # the same edit in-process gives the same weights
    reqs = lmedit.load_requests(work / "requests.json")
    mine = lmedit.edit(base, tok, reqs, method="memit", layers=LAYERS, **SMALL)
    for k in names:
        torch.testing.assert_close(base.state_dict()[k], edited_sd[k], rtol=0, atol=1e-6)
    assert max(d.abs().max().item() for d in mine.deltas.values()) > 1e-4  # not a no-op


def test_edit_table_output(work, capsys):
    rc = main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"),
               "--method", "rome", "--quiet", "--layers", "2", "--set", "v_num_grad_steps=3",
               "--set", "context_templates=[[5,1]]", "--set", "mom2_n_samples=20", "--set", "mom2_max_length=64"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("method rome, layers [2]")
    assert out.count("before  P(new)") == 2 and out.count("after   P(new)") == 2
    assert "'Rome' -> 'Paris'" in out and "timings: statistics" in out


# --- eval -----------------------------------------------------------------------------------------

def _eval_args(work, *extra):
    return ["eval", "--model", str(work / "model"), "--data", str(COUNTERFACT), "--n", "4", "--batch-size", "2",
            "--method", "emmet", "--json", *SMALL_ARGS, *extra]


@pytest.fixture
def shared_model(work, monkeypatch):
    """The CLI's model loader hands out this one in-memory model, so the test can inspect it after."""
    model, tok = _fresh(work)
    monkeypatch.setattr(lmedit, "load_model", lambda *a, **k: (model, tok))
    return model, tok


@pytest.mark.parametrize("sequential", [False, True])
def test_eval_json(work, shared_model, tmp_path, capsys, sequential):
    model, tok = shared_model
    before = _state(model)
    out_file = tmp_path / "eval.json"
    rc = main(_eval_args(work, "--out", str(out_file), *(["--sequential"] if sequential else [])))
    printed = capsys.readouterr().out
    assert rc == 0
    out = json.loads(printed)
    assert json.loads(out_file.read_text()) == out
    assert {"method", "model", "n", "batch_size", "sequential", "pre", "post", "timings", "hparams",
            "lmedit_version"} <= set(out)
    assert (out["method"], out["model"], out["n"], out["batch_size"], out["sequential"]) == \
        ("emmet", str(work / "model"), 4, 2, sequential)
    assert out["lmedit_version"] == lmedit.__version__
    assert {"stats_s", "targets_s", "solve_s", "eval_s", "total_s"} <= set(out["timings"])
    assert out["hparams"]["layers"] == LAYERS
    for phase in ("pre", "post"):
        m = out[phase]
        assert set(METRIC_KEYS) <= set(m), (phase, sorted(m))
        for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score"):
            assert 0.0 <= m[k] <= 100.0, (phase, k, m[k])
        for k in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            assert -100.0 <= m[k] <= 100.0
        parts = [m["efficacy_score"], m["paraphrase_score"], m["neighborhood_score"]]
        assert m["score"] == pytest.approx(harmonic_mean(parts))

    # run_eval undid every batch: the model is exactly as loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert lmedit.history(model) == []

    # "pre" is the unedited model's metrics; "post" equals a replay of the batches by hand
    reqs = lmedit.load_requests(COUNTERFACT, limit=4)
    pre = evaluate_requests(model, tok, reqs)
    pre.pop("eval_s")
    assert out["pre"] == pytest.approx(pre, rel=1e-9, abs=1e-12)
    parts = []
    # run_eval generates the context templates once, from the unedited model (as the reference does)
    _, hp = lmedit.resolve_hparams(model, "emmet", layers=LAYERS, **SMALL)
    context = context_templates(model, tok, hp.context_templates, seed=hp.seed)
    for batch in (reqs[:2], reqs[2:]):
        res = lmedit.edit(model, tok, batch, method="emmet", layers=LAYERS, context=context, **SMALL)
        if not sequential:
            parts.append(evaluate_requests(model, tok, batch))
            res.undo()
    if sequential:
        parts = [evaluate_requests(model, tok, reqs)]
        for res in reversed(list(lmedit.history(model))):
            res.undo()
    for k in ("efficacy_score", "paraphrase_score", "neighborhood_magnitude", "efficacy_magnitude"):
        expect = sum(p[k] for p in parts) / len(parts)
        assert out["post"][k] == pytest.approx(expect, rel=1e-6, abs=1e-9), k


def test_eval_table_output(work, shared_model, capsys):
    args = [a for a in _eval_args(work) if a != "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("emmet on 4 records, batch size 2")
    assert "| pre |" in out and "| post |" in out and "efficacy_score" in out


# --- sweep ----------------------------------------------------------------------------------------

def test_sweep_writes_cells_tables_plots_and_skips_finished_cells(work, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "sweep"
    args = ["sweep", "--model", str(work / "model"), "--data", str(COUNTERFACT), "--methods", "memit,emmet",
            "--batch-sizes", "1,2", "--n", "2", "--out", str(out_dir), *SMALL_ARGS]
    evals = []
    real_eval = experiment.evaluate_requests
    monkeypatch.setattr(experiment, "evaluate_requests", lambda m, t, reqs, **k: evals.append(len(reqs)) or real_eval(m, t, reqs, **k))
    assert main(args) == 0
    # the unedited metrics are measured once for the grid: 1 x 2 records, then per method
    # batch size 1 -> two evaluations of 1 record, batch size 2 -> one of 2 records
    assert sorted(evals) == sorted([2] + [1, 1, 2] * 2), evals
    monkeypatch.setattr(experiment, "evaluate_requests", real_eval)
    printed = capsys.readouterr().out
    cells = {(m, b): out_dir / f"{m}_b{b}.json" for m in ("memit", "emmet") for b in (1, 2)}
    for (m, b), path in cells.items():
        cell = json.loads(path.read_text())
        assert (cell["method"], cell["batch_size"], cell["n"]) == (m, b, 2)
    with open(out_dir / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["batch_size"])) for r in rows] == list(cells)
    for r in rows:
        post = json.loads(cells[(r["method"], int(r["batch_size"]))].read_text())["post"]
        for k in METRIC_KEYS:
            assert float(r[k]) == pytest.approx(post[k], rel=1e-9, abs=1e-12)
    md = (out_dir / "table.md").read_text()
    assert md.startswith("| method | batch_size |") and md.count("\n") == 2 + len(cells)
    assert md.strip() in printed
    for k in METRIC_KEYS:
        png = out_dir / f"{k}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # a second run finds every cell finished and never evaluates
    mtimes = {p: p.stat().st_mtime_ns for p in cells.values()}
    calls = []

    def refuse(*a, **k):
        calls.append(k.get("method"))
        raise AssertionError("run_eval called for a finished cell")

    real = experiment.run_eval
    monkeypatch.setattr(experiment, "run_eval", refuse)
    assert main(args) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in cells.values()} == mtimes

    # a corrupt cell is run again, and only that one
    cells[("emmet", 2)].write_text("{not json")
    monkeypatch.setattr(experiment, "run_eval", lambda *a, **k: calls.append((k["method"], k["batch_size"])) or real(*a, **k))
    assert main(args) == 0
    assert calls == [("emmet", 2)]
    assert json.loads(cells[("emmet", 2)].read_text())["batch_size"] == 2

    # a cell run with other settings (here: the ridge) is stale and runs again, the others are kept
    stale = json.loads(cells[("emmet", 1)].read_text())
    stale["hparams"]["emmet_lambda"] = 123.0
    cells[("emmet", 1)].write_text(json.dumps(stale))
    calls.clear()
    assert main(args) == 0
    assert calls == [("emmet", 1)]
    assert json.loads(cells[("emmet", 1)].read_text())["hparams"]["emmet_lambda"] != 123.0

    # a grid of another method in the same folder adds its cells to the table beside the earlier ones
    rome_args = ["sweep", "--model", str(work / "model"), "--data", str(COUNTERFACT), "--methods", "rome",
                 "--batch-sizes", "1", "--n", "2", "--out", str(out_dir), *SMALL_ARGS]
    rome_args[rome_args.index("--layers") + 1] = str(LAYERS[-1])  # ROME edits one layer
    assert main(rome_args) == 0
    with open(out_dir / "table.csv", newline="") as f:
        rows = [(r["method"], int(r["batch_size"])) for r in csv.DictReader(f)]
    assert rows[0] == ("rome", 1) and sorted(rows[1:]) == sorted(cells), rows
