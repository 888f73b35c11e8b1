"""The paper's experiments: batched editing with evaluation (``lmedit eval``) and grids over
methods and batch sizes (``lmedit sweep``).

Example: ``out = run_eval(model, tok, requests, method="emmet", batch_size=16)``
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from lmedit._runtime import peak_memory
from lmedit._version import __version__
from lmedit.distributed import from_main, gather_indexed, is_main, mine, rank_world
from lmedit.editor import Editor
from lmedit.errors import HyperparameterError
from lmedit.evaluate.metrics import aggregate, harmonic_mean
from lmedit.methods import EditHParams
from lmedit.presets import resolve_hparams
from lmedit.evaluate.runner import EVAL_DTYPE, EasyEditMetrics, evaluate_requests
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "embedded:smollm2-135m-instruct"  # how results name the embedded default model
METRIC_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
               "paraphrase_magnitude", "neighborhood_magnitude")


def run_eval(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    method: str = "emmet",
    batch_size: int = 16,
    sequential: bool = False,
    kind: str = "counterfact",
    generation: bool = False,
    chat: bool = False,
    easyedit: bool = False,
    model_name: str = DEFAULT_MODEL_NAME,
    progress: bool = True,
    pre: dict[str, Any] | None = None,
    preset: str | None = None,
    hparams: EditHParams | None = None,
    stats_dir: str | None = None,
    eval_dtype: str = EVAL_DTYPE,
    **overrides: Any,
) -> dict[str, Any]:
    """Edit ``requests`` in batches of ``batch_size`` and report metrics before and after
    (measured in ``eval_dtype``, see :data:`lmedit.evaluate.runner.EVAL_DTYPE`).

    Without ``sequential`` every batch starts from the unedited model (undone after its
    evaluation); with it the batches accumulate and the post-edit metrics are measured once,
    after the last batch, over all records. ``pre``: the unedited model's metrics on these
    requests (from an earlier run_eval's ``"pre"``), to skip measuring them again. One Editor
    serves every batch, so statistics are loaded and context templates generated (from the
    unedited model, as the reference does) once.

    Metrics are measured per batch and averaged weighted by batch size. Under torch.distributed
    (``torchrun ... -m lmedit eval``) batch ``j`` goes to rank ``j mod world``, every rank
    returns the gathered result, identical to one process's; with ``sequential`` every rank
    applies every batch (each depends on the last) and only the evaluation is split. Timings are
    summed over ranks (``world_size`` says how many).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HyperparameterError(f"batch_size must be an int >= 1, got {batch_size!r}")
    t_all = time.perf_counter()
    editor = Editor(model, tokenizer, method, preset=preset, hparams=hparams, stats_dir=stats_dir, **overrides)
    ee = EasyEditMetrics(model, tokenizer, requests, dtype=eval_dtype) if easyedit else None  # reference: unedited
    evaluate = partial(evaluate_requests, kind=kind, generation=generation, chat=chat, easyedit=ee, dtype=eval_dtype)
    batches = [list(requests[i:i + batch_size]) for i in range(0, len(requests), batch_size)]
    timings = dict.fromkeys(("stats_s", "targets_s", "keys_s", "residual_s", "solve_s", "eval_s", "target_steps"), 0.0)
    pre = _gathered(evaluate, model, tokenizer, batches, timings) if pre is None else \
        {k: v for k, v in pre.items() if k != "eval_s"}
    editor.context()
    post = _edit_batches(editor, batches, sequential, evaluate, timings, progress)
    if kind == "counterfact":
        _set_scores(pre)
        _set_scores(post)
    timings["total_s"] = time.perf_counter() - t_all
    timings = _per_request(_summed_over_ranks(timings), len(requests))
    return {
        "method": editor.method, "model": model_name, "n": len(requests), "batch_size": batch_size, "sequential": sequential,
        "kind": kind, "chat": chat, "easyedit": easyedit, "pre": dict(pre), "post": post, "timings": timings,
        "world_size": rank_world()[1], "eval_dtype": eval_dtype, "memory": peak_memory(),
        "hparams": {"preset": editor.preset, **editor.hparams.to_dict()}, "lmedit_version": __version__,
    }


def _per_request(timings: dict[str, float], n: int) -> dict[str, float]:
    """The timings with the editing cost per request and the mean optimisation steps per request
    (in place of the summed steps)."""
    out = {k: v for k, v in timings.items() if k != "target_steps"}
    out["edit_s_per_request"] = sum(timings[k] for k in ("targets_s", "keys_s", "residual_s", "solve_s")) / max(n, 1)
    out["target_steps_per_request"] = timings["target_steps"] / max(n, 1)
    return out


def _set_scores(metrics: dict[str, float]) -> None:
    """The Score of the averaged parts (an average of per-batch Scores is not one), plain and chat form."""
    for p in ("", "chat_"):
        parts = [f"{p}efficacy_score", f"{p}paraphrase_score", f"{p}neighborhood_score"]
        if all(k in metrics for k in parts):
            metrics[f"{p}score"] = harmonic_mean([metrics[k] for k in parts])


def _gathered(evaluate: Callable[..., dict[str, Any]], model, tok, batches: list[list[EditRequest]],
              timings: dict[str, float]) -> dict[str, float]:
    """Metrics over every batch (this rank's share evaluated here), weighted by batch size."""
    got = []
    for j, batch in mine(batches):
        m = evaluate(model, tok, batch)
        timings["eval_s"] += m.pop("eval_s")
        got.append((j, m))
    parts = gather_indexed(got, len(batches))
    return aggregate(parts, weights=[len(b) for b in batches])


def _edit_batches(editor: Editor, batches: list[list[EditRequest]], sequential: bool,
                  evaluate: Callable[..., dict[str, Any]], timings: dict[str, float], progress: bool) -> dict[str, float]:
    """Edit and evaluate each of this rank's batches (undone after it), or all batches then all
    records; the model is left as it was found. Returns the post-edit metrics over every batch."""
    from tqdm.auto import tqdm

    model, tok = editor.model, editor.tokenizer
    todo = list(enumerate(batches)) if sequential else mine(batches)
    size = len(batches[0]) if batches else 0
    got = []
    try:
        for j, batch in tqdm(todo, desc=f"{editor.method} batches of {size}", unit="batch", disable=not progress):
            res = editor.edit(batch)
            for k in ("stats_s", "targets_s", "keys_s", "residual_s", "solve_s"):
                timings[k] += res.timings.get(k, 0.0)
            if res.targets is not None:
                timings["target_steps"] += float(res.targets.steps.sum())
            if not sequential:
                m = evaluate(model, tok, batch)
                timings["eval_s"] += m.pop("eval_s")
                got.append((j, m))
                editor.undo()
        if sequential:
            return _gathered(evaluate, model, tok, batches, timings)
    finally:
        while editor.history:  # leave the model as we found it
            editor.undo()
    return aggregate(gather_indexed(got, len(batches)), weights=[len(b) for b in batches])


def _summed_over_ranks(timings: dict[str, float]) -> dict[str, float]:
    rank, world = rank_world()
    if world == 1:
        return timings
    parts = gather_indexed([(rank, timings)], world)
    return {k: sum(p[k] for p in parts) for k in timings}


def format_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) over ``keys``."""
    def fmt(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_sweep(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    out_dir: str | Path,
    kind: str = "counterfact",
    model_name: str = DEFAULT_MODEL_NAME,
    method_overrides: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    stats_dir: str | None = None,
    eval_dtype: str = EVAL_DTYPE,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Every (method, batch size) cell: one JSON each (a finished cell with the same settings is
    skipped on re-runs; one with other settings runs again), then ``table.csv``, ``table.md`` and
    one PNG per metric against batch size. Cells of other grids already in ``out_dir`` with the
    same number of records join the table (e.g. ROME at batch 1 beside MEMIT/EMMET). Under
    torch.distributed each cell's batches are split over the ranks (see :func:`run_eval`) and
    rank 0 writes the files."""
    out = Path(out_dir)
    main = is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    pre = None  # the unedited metrics, measured once for the whole grid
    for method in methods:
        kw = {**overrides, **(method_overrides or {}).get(method, {})}
        preset, hp = resolve_hparams(model, method, kw.get("preset"), **{k: v for k, v in kw.items() if k != "preset"})
        want = {"preset": preset, **hp.to_dict()}
        for bs in batch_sizes:
            cell = out / f"{method}_b{bs}.json"
            result = from_main(_finished_cell(cell, want, len(requests), kind) if main else None)
            if result is None:
                result = run_eval(model, tokenizer, requests, method=method, batch_size=bs, kind=kind,
                                  model_name=model_name, progress=progress and main, pre=pre, stats_dir=stats_dir,
                                  eval_dtype=eval_dtype, **kw)
                pre = pre or result["pre"]
                if main:
                    from lmedit._fs import atomic_path

                    with atomic_path(cell) as tmp:
                        tmp.write_text(json.dumps(result, indent=1))
            rows.append(_table_row(result))
    rows += _earlier_cells(out, {(m, b) for m in methods for b in batch_sizes}, len(requests), kind)
    if main:
        _write_tables(out, rows)
    return rows


def _earlier_cells(out: Path, grid: set[tuple[str, int]], n: int, kind: str) -> list[dict[str, Any]]:
    """Rows of cells of earlier grids in the same folder (same n and kind), e.g. ROME at batch 1
    beside a MEMIT/EMMET grid: they join the table."""
    rows = []
    for cell in sorted(out.glob("*_b*.json")):
        try:
            result = json.loads(cell.read_text())
            key = (result["method"], result["batch_size"])
            if key not in grid and result["n"] == n and result.get("kind", "counterfact") == kind:
                rows.append(_table_row(result))
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def _write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    """table.csv, table.md and one PNG per metric against batch size."""
    keys = ["method", "batch_size"] + [k for k in (*METRIC_KEYS, "rewrite_accuracy", "efficacy_accuracy", "paraphrase_accuracy",
                                                     "specificity", "edit_s_per_request") if any(k in r for r in rows)]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "table.md").write_text(format_table(rows, keys) + "\n")
    plot_sweep(rows, keys[2:], out)


def _table_row(result: dict[str, Any]) -> dict[str, Any]:
    return {"method": result["method"], "batch_size": result["batch_size"], **result["post"],
            "edit_s_per_request": result["timings"]["edit_s_per_request"]}


def _finished_cell(cell: Path, hparams: dict[str, Any], n: int, kind: str) -> dict[str, Any] | None:
    """The stored result of a sweep cell if it was run with these settings, else None (run it again)."""
    if not cell.exists():
        return None
    try:
        result = json.loads(cell.read_text())
        same = (result["hparams"] == json.loads(json.dumps(hparams)) and result["n"] == n
                and result.get("kind", "counterfact") == kind)
    except (ValueError, KeyError, TypeError):
        log.warning("cell %s is corrupt; running it again", cell.name)
        return None
    if not same:
        log.warning("cell %s was run with other settings (hyperparameters, n or kind); running it again", cell.name)
        return None
    log.info("skipping finished cell %s", cell.name)
    return result


def plot_sweep(rows: Sequence[dict[str, Any]], metrics: Sequence[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["batch_size"], r[metric]) for r in rows if r["method"] == method and metric in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out / f"{metric}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
