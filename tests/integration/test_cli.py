"""The command line, in-process (``lmedit.cli.main``) on a tiny llama saved to disk.

Each test checks what the CLI printed or wrote against the library itself: the JSON report's
probabilities against ``score_continuations``, the delta file and the saved model against an
in-process ``lmedit.edit`` with the same settings, eval's metrics against ``evaluate_requests``
and a hand replay of the batches, the sweep's tables against its cell files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lmedit
from lmedit.core.context import context_templates
from lmedit.cli import main
from lmedit.evaluate.experiment import METRIC_KEYS
from lmedit.evaluate.runner import evaluate_requests
from lmedit.evaluate.scoring import score_continuations
from lmedit.models.adapters import get_adapter

from helpers import COUNTERFACT_500 as COUNTERFACT
from helpers import needs_data, snapshot

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


@contextlib.contextmanager
def _cli_env(work: Path):
    """Statistics go to the module's cache (after the session tokenizer found the embedded model);
    main() sets torch's thread count: it is put back afterwards."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(work / "cache"))
        mp.setenv("LMEDIT_NUM_THREADS", "1")  # main() sets torch's threads; the CPU is shared
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _env(work, tokenizer):
    with _cli_env(work):
        yield


def _fresh(work: Path):
    return lmedit.load_model(str(work / "model"))


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


def test_edit_drop_conflicts_leaves_out_the_later_target(work, tmp_path, capsys):
    clash = {**REQUESTS[0], "target_new": "Oslo", "case_id": "later"}
    path = tmp_path / "clash.json"
    path.write_text(json.dumps([REQUESTS[0], clash, REQUESTS[1]]))
    args = ["edit", "--model", str(work / "model"), "--requests", str(path), "--json", "--method", "emmet", *SMALL_ARGS]
    assert main(args) == 2  # refused as one batch, nothing edited
    assert "conflicting edits in one batch" in capsys.readouterr().err
    assert main([*args, "--drop-conflicts", "--n", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the clash is left out before --n: the first two of the rest are both original requests
    assert [(r["subject"], r["target_new"]) for r in report["requests"]] == \
        [(r["subject"], r["target_new"]) for r in REQUESTS]


def test_edit_refuses_a_request_over_the_memory_budget(work, tmp_path, capsys):
    out = tmp_path / "deltas.safetensors"
    rc = main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"),
               "--memory-budget", "1KB", "--save-deltas", str(out), *SMALL_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "memory budget of 0.00 GiB" in err and "Xanadu" in err, err
    assert not out.exists()
    rc = main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"),
               "--memory-budget", "lots", *SMALL_ARGS])
    assert rc == 2 and "memory size 'lots'" in capsys.readouterr().err
    import os

    assert "LMEDIT_MEMORY_BUDGET" not in os.environ  # main() put the environment back


def test_edit_save_deltas_and_model_reproduce_the_edit(work, tmp_path, capsys):
    deltas, saved = tmp_path / "edit.safetensors", tmp_path / "edited"
    rc = main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"), "--json",
               "--method", "memit", "--save-deltas", str(deltas), "--save-model", str(saved), *SMALL_ARGS])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deltas"] == str(deltas) and report["model_dir"] == str(saved)

    (saved / "keep.txt").write_text("mine")  # an existing non-empty directory is never replaced
    assert main(["edit", "--model", str(work / "model"), "--requests", str(work / "requests.json"),
                 "--method", "memit", "--save-model", str(saved), *SMALL_ARGS]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (saved / "keep.txt").read_text() == "mine"

    base, tok = _fresh(work)
    base_sd = snapshot(base)
    edited, _ = lmedit.load_model(str(saved))  # a loadable model directory
    edited_sd = snapshot(edited)
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


@needs_data
@pytest.mark.parametrize("sequential", [False, True])
def test_eval_json(work, shared_model, tmp_path, capsys, sequential):
    model, tok = shared_model
    before = snapshot(model)
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
    import resource  # the process's own peak, in MiB (Linux reports KiB)
    assert out["memory"]["peak_rss_mb"] == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                                         rel=0.05)
    assert out["hparams"]["layers"] == LAYERS
    for phase in ("pre", "post"):
        m = out[phase]
        assert set(METRIC_KEYS) <= set(m), (phase, sorted(m))
        # the score is the harmonic mean of the printed parts: 3 / (1/ES + 1/PS + 1/NS), 0 if one is 0
        es, ps, ns = m["efficacy_score"], m["paraphrase_score"], m["neighborhood_score"]
        assert m["score"] == pytest.approx(0.0 if 0.0 in (es, ps, ns) else 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns))

    # run_eval undid every batch: the model is exactly as loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # "pre" is the unedited model's metrics; "post" equals a replay of the batches by hand
    reqs = lmedit.load_requests(COUNTERFACT, limit=4)
    # (measured per batch, averaged weighted by batch size: the unit that processes split under torchrun)
    pre_parts = [evaluate_requests(model, tok, b) for b in (reqs[:2], reqs[2:])]
    for k, v in out["pre"].items():
        if k != "score":
            assert v == pytest.approx(sum(p[k] for p in pre_parts) / 2, rel=1e-12, abs=1e-12), k
    whole = evaluate_requests(model, tok, reqs)  # and that is all records at once, up to rounding
    assert out["pre"] == pytest.approx({k: v for k, v in whole.items() if k != "eval_s"}, rel=1e-9, abs=1e-9)
    parts = []
    # run_eval generates the context templates once, from the unedited model (as the reference does)
    _, hp = lmedit.resolve_hparams(model, "emmet", layers=LAYERS, **SMALL)
    context = context_templates(model, tok, hp.context_templates, seed=hp.seed)
    results = []
    for batch in (reqs[:2], reqs[2:]):
        res = lmedit.edit(model, tok, batch, method="emmet", layers=LAYERS, context=context, **SMALL)
        results.append(res)
        if not sequential:
            parts.append(evaluate_requests(model, tok, batch))
            res.undo()
    if sequential:
        parts = [evaluate_requests(model, tok, reqs)]
        for res in reversed(results):
            res.undo()
    for k in ("efficacy_score", "paraphrase_score", "neighborhood_magnitude", "efficacy_magnitude"):
        expect = sum(p[k] for p in parts) / len(parts)
        # float32 scores depend on how prompts were batched (padding) at about 1e-7 relative; the
        # magnitudes are differences of probabilities, so their absolute tolerance is what counts
        assert out["post"][k] == pytest.approx(expect, rel=1e-6, abs=1e-8), k


@needs_data
def test_eval_table_output(work, shared_model, capsys):
    args = [a for a in _eval_args(work) if a != "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("emmet on 4 records, batch size 2")
    assert "| pre |" in out and "| post |" in out and "efficacy_score" in out


# --- sweep ----------------------------------------------------------------------------------------

GRID = [(m, b) for m in ("memit", "emmet") for b in (1, 2)]  # the cells, in the order of the table


def _sweep_args(work: Path, out_dir: Path, methods: str = "memit,emmet", batch_sizes: str = "1,2") -> list[str]:
    return ["sweep", "--model", str(work / "model"), "--data", str(COUNTERFACT), "--methods", methods,
            "--batch-sizes", batch_sizes, "--n", "2", "--out", str(out_dir), *SMALL_ARGS]


def _cell(out_dir: Path, method: str, batch_size: int) -> Path:
    return out_dir / f"{method}_b{batch_size}.json"


def _files(out_dir: Path, cells) -> dict[tuple[str, int], tuple[int, str]]:
    """{(method, batch size): (mtime in ns, content)} of the cell files."""
    return {c: (_cell(out_dir, *c).stat().st_mtime_ns, _cell(out_dir, *c).read_text()) for c in cells}


@pytest.fixture(scope="module")
def first_sweep(work, tokenizer):
    """The memit,emmet x 1,2 grid on 2 records, run once for the module: its folder and what it printed."""
    out_dir = work / "sweep"
    printed = io.StringIO()
    with _cli_env(work), contextlib.redirect_stdout(printed):
        rc = main(_sweep_args(work, out_dir))
    return SimpleNamespace(rc=rc, out_dir=out_dir, printed=printed.getvalue())


@pytest.fixture
def sweep_dir(first_sweep, tmp_path) -> Path:
    """A copy of the first sweep's folder (file times kept) for one scenario to change and re-run."""
    out_dir = tmp_path / "sweep"
    shutil.copytree(first_sweep.out_dir, out_dir)
    return out_dir


@needs_data
def test_sweep_first_run_writes_a_cell_per_grid_point_and_the_tables(first_sweep):
    out_dir = first_sweep.out_dir
    assert first_sweep.rc == 0
    for m, b in GRID:
        cell = json.loads(_cell(out_dir, m, b).read_text())
        assert (cell["method"], cell["batch_size"], cell["n"]) == (m, b, 2)
    with open(out_dir / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["batch_size"])) for r in rows] == GRID
    for r in rows:
        post = json.loads(_cell(out_dir, r["method"], int(r["batch_size"])).read_text())["post"]
        for k in METRIC_KEYS:
            assert float(r[k]) == pytest.approx(post[k], rel=1e-9, abs=1e-12)
    md = (out_dir / "table.md").read_text()
    assert md.startswith("| method | batch_size |") and md.count("\n") == 2 + len(GRID)
    assert md.strip() in first_sweep.printed


@needs_data
def test_sweep_cells_share_the_unedited_metrics(first_sweep, work):
    """Every cell's "pre" is the unedited model's metrics on the 2 records (measured once for the grid)."""
    model, tok = _fresh(work)
    want = evaluate_requests(model, tok, lmedit.load_requests(COUNTERFACT, limit=2))
    want.pop("eval_s")
    pres = [json.loads(_cell(first_sweep.out_dir, m, b).read_text())["pre"] for m, b in GRID]
    assert all(p == pres[0] for p in pres[1:])
    assert pres[0] == pytest.approx(want, rel=1e-9, abs=1e-8)  # batching moves float32 scores (see test_eval_json)


@needs_data
def test_sweep_plots_one_image_per_metric(first_sweep):
    import matplotlib.image

    for k in METRIC_KEYS:
        img = matplotlib.image.imread(first_sweep.out_dir / f"{k}.png")  # (H, W, RGBA)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (k, img.shape)
        assert len({tuple(px) for px in img.reshape(-1, img.shape[-1])[::97].tolist()}) > 2, k  # not blank


@needs_data
def test_sweep_skips_finished_cells(work, sweep_dir):
    """A second run finds every cell finished: no cell file is rewritten, and the table is the same."""
    before = _files(sweep_dir, GRID)
    table = (sweep_dir / "table.csv").read_text()
    assert main(_sweep_args(work, sweep_dir)) == 0
    assert _files(sweep_dir, GRID) == before
    assert (sweep_dir / "table.csv").read_text() == table


@needs_data
def test_sweep_reruns_a_corrupt_cell_and_only_that_one(work, first_sweep, sweep_dir):
    kept = [c for c in GRID if c != ("emmet", 2)]
    before = _files(sweep_dir, kept)
    _cell(sweep_dir, "emmet", 2).write_text("{not json")
    assert main(_sweep_args(work, sweep_dir)) == 0
    assert _files(sweep_dir, kept) == before
    cell = json.loads(_cell(sweep_dir, "emmet", 2).read_text())
    first = json.loads(_cell(first_sweep.out_dir, "emmet", 2).read_text())
    assert (cell["method"], cell["batch_size"]) == ("emmet", 2)
    assert cell["post"] == pytest.approx(first["post"], rel=1e-6, abs=1e-9)  # the same edit, run again


@needs_data
def test_sweep_reruns_a_stale_cell_and_only_that_one(work, sweep_dir):
    """A cell run with other settings (here: the ridge) is stale and runs again; the others are kept."""
    kept = [c for c in GRID if c != ("emmet", 1)]
    before = _files(sweep_dir, kept)
    stale = json.loads(_cell(sweep_dir, "emmet", 1).read_text())
    right_lambda = stale["hparams"]["emmet_lambda"]
    stale["hparams"]["emmet_lambda"] = 123.0
    _cell(sweep_dir, "emmet", 1).write_text(json.dumps(stale))
    assert main(_sweep_args(work, sweep_dir)) == 0
    assert _files(sweep_dir, kept) == before
    assert json.loads(_cell(sweep_dir, "emmet", 1).read_text())["hparams"]["emmet_lambda"] == right_lambda != 123.0


@needs_data
def test_sweep_cells_of_another_grid_join_the_table(work, sweep_dir):
    """A ROME grid in the same folder adds its cell to the table beside the earlier ones, which are kept."""
    before = _files(sweep_dir, GRID)
    rome_args = _sweep_args(work, sweep_dir, methods="rome", batch_sizes="1")
    rome_args[rome_args.index("--layers") + 1] = str(LAYERS[-1])  # ROME edits one layer
    assert main(rome_args) == 0
    assert _files(sweep_dir, GRID) == before
    assert json.loads(_cell(sweep_dir, "rome", 1).read_text())["method"] == "rome"
    with open(sweep_dir / "table.csv", newline="") as f:
        rows = [(r["method"], int(r["batch_size"])) for r in csv.DictReader(f)]
    assert rows[0] == ("rome", 1) and sorted(rows[1:]) == sorted(GRID), rows
