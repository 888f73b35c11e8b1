"""Every edit distribution with each objective, at one or more batch sizes, on the embedded model.

Usage::

    python benchmarks/distributions.py --batch-sizes 1,16,64,256,1024 --methods emmet,memit \
        --distributions single,spread,joint,cascade,refit --out results/distributions [--layers 1,2,3,4,5,6,7,8]

Records come from ``counterfact_train_10000.json`` (EasyEdit's flat CounterFact split: one rewrite,
one paraphrase and one neighbourhood prompt per record), without the 74 that ask an earlier
record's subject and prompt for another target (``load_requests(..., drop_conflicts=True)``: one
batch cannot hold both; the first is at index 1,171, so the batches up to 1,024 are the file's
first records). A cell of batch size B edits the first max(B, ``--records``) of them in batches of B,
every batch from the unedited model (undone after its evaluation); metrics are averaged over
batches weighted by size, i.e. over all records.
Hyperparameters: the embedded model's preset (lambda / ridge tuned on held-out records, see
results/tuning).

Target vectors depend only on the request, the (unedited) weights, the target layer, site, settings
and templates: not on the batch a request is edited in, the method's objective or the distribution.
So they are optimised once, for the first N records in chunks of 64, each chunk written to
``<out>/targets/<data>/`` as it finishes (``Editor.save_targets``), and every cell of every batch
size and method (MEMIT and EMMET share the preset's target settings) reads the same vectors: the
cells differ only in what the comparison is about, and a killed run resumes at the chunk it was in.
``--targets-only --records N`` computes (or completes) the vectors of the first N records and stops:
``python benchmarks/distributions.py --targets-only --records 9999 --methods emmet`` prepares the
frozen-target protocol of ``benchmarks/lifelong.py`` for all of counterfact_train_10000.

Per cell (one JSON each under ``<out>/b<B>/``; a finished cell is skipped when run again):
ES / PS / NS / Score and magnitudes, the residual still missing at the last layer after the edit
(relative to before: what the linear view of the distribution missed), per-layer update norms,
the condition number and numerical rank of each layer's G_l = K_l^T M_l^-1 K_l (the B x B system
EMMET inverts), the time of keys, residual passes and solves (per-batch values: means over batches;
condition: the largest; rank: the smallest), and the process's peak memory so far.
``<out>/table.md`` and one PNG per metric against batch size (a line per method x distribution)
summarise every cell found. ``--layers`` edits another set of layers ending at the preset's
last one (so the cells share its target vectors): which layers take part is part of a distribution too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import atomic_path
from lmedit._runtime import configure_threads, peak_memory
from lmedit.core.keys import residual_stream
from lmedit.evaluate.experiment import METRIC_KEYS, format_table
from lmedit.evaluate.metrics import harmonic_mean
from lmedit.evaluate.runner import evaluate_requests

DATA = "../shared/data/counterfact/counterfact_train_10000.json"
# every cell shares one vector per request, computed in chunks that know nothing of the cells' batches
# (and reused by benchmarks/lifelong.py --frozen-targets), so requests sharing a key are not joined
OWN_VECTORS = {"share_key_targets": False}


def conditioning(editor, result) -> tuple[dict[int, float], dict[int, int]]:
    """cond(K_l^T M_l^-1 K_l) and its numerical rank per layer, with the keys the solves used
    (float64; rank: eigenvalues above 1e-10 of the largest). A batch larger than the layer's input
    width has rank at most that width: the B x B system is singular but for EMMET's ridge."""
    hp = editor.hparams
    form = hp.joint_form()
    systems = editor.systems(hp, editor.covariances())
    cond, rank = {}, {}
    for layer, K in result.keys.items():
        K64 = K.T.to(systems[layer].C.device, torch.float64)  # the layer's solve device
        G = K64.T @ form.metric_solve(K64, systems[layer])
        ev = torch.linalg.eigvalsh(0.5 * (G + G.T))
        cond[layer] = float(ev[-1] / ev[0].clamp_min(1e-300))
        rank[layer] = int((ev > 1e-10 * ev[-1]).sum())
    return cond, rank


def shared_targets(editor, reqs, directory: Path, chunk: int = 64):
    """The target vectors of ``reqs`` for ``editor``, chunk by chunk, each chunk read from
    ``directory`` if an earlier run wrote it, else optimised and written there."""
    hp = editor.hparams
    key = hashlib.sha256(json.dumps([hp.layers[-1], hp.site, hp.target_settings(), editor.context(hp)],
                                    sort_keys=True).encode()).hexdigest()[:12]
    parts = []
    for start in range(0, len(reqs), chunk):
        stop = min(start + chunk, len(reqs))
        path = directory / f"{key}_{start:05d}-{stop:05d}.safetensors"
        if path.exists():
            part = editor.load_targets(path)
            if part.provenance.get("requests") == [(r.prompt, r.subject, r.target_new) for r in reqs[start:stop]]:
                parts.append(part)
                continue
            print(f"{path} holds other requests (the record selection changed): computing it afresh", flush=True)
        t0 = time.perf_counter()
        tr = editor.compute_targets(reqs[start:stop])
        editor.save_targets(tr, path)
        print(f"targets {start}-{stop} of {len(reqs)}: {time.perf_counter() - t0:.0f} s, "
              f"{float(tr.steps.float().mean()):.1f} steps per request", flush=True)
        parts.append(tr)
    return lmedit.TargetResult.concat(parts)


def run_batch(editor, reqs, distribution, targets):
    """Edit one batch with the given target vectors, measure it, undo it."""
    model, tok = editor.model, editor.tokenizer
    last = editor.hparams.layers[-1]
    t0 = time.perf_counter()
    res = editor.edit(reqs, targets=targets, distribution=distribution)
    edit_s = time.perf_counter() - t0
    z_star = res.targets.targets
    with torch.no_grad():
        left = float((z_star - residual_stream(model, tok, editor.adapter, reqs, last)).norm(dim=1).mean())
    metrics = evaluate_requests(model, tok, reqs)
    cond, rank = conditioning(editor, res)
    editor.undo()
    with torch.no_grad():
        before = float((z_star - residual_stream(model, tok, editor.adapter, reqs, last)).norm(dim=1).mean())
    info = res.layer_info[0]
    return {
        **{k: metrics[k] for k in METRIC_KEYS if k in metrics}, "residual_left": left / before, "edit_s": edit_s,
        "timings": {k: res.timings.get(k, 0.0) for k in ("keys_s", "residual_s", "solve_s")},
        "update_norm": {l: i["update_norm"] for l, i in info.items()},
        "relative_update": {l: i["update_norm"] / i["weight_norm"] for l, i in info.items()},
        "passes": max((i.get("passes", 1) for i in info.values()), default=1),
        "condition": cond, "rank": rank,
    }


def run_cell(editor, reqs, distribution, targets, batch_size):
    """Every batch of ``reqs`` from the unedited model; per-record metrics averaged over all records."""
    rows, sizes = [], []
    for start in range(0, len(reqs), batch_size):
        stop = min(start + batch_size, len(reqs))
        rows.append(run_batch(editor, reqs[start:stop], distribution, targets.part(start, stop)))
        sizes.append(stop - start)
    w = [n / sum(sizes) for n in sizes]
    layers = list(rows[0]["update_norm"])
    out = {k: sum(wi * r[k] for wi, r in zip(w, rows)) for k in (*METRIC_KEYS, "residual_left")
           if k in rows[0] and k != "score"}
    # the score of the averaged parts (as lmedit eval reports it), not an average of per-batch scores
    out["score"] = harmonic_mean([out["efficacy_score"], out["paraphrase_score"], out["neighborhood_score"]])
    out.update(
        batches=len(rows), edit_s=sum(r["edit_s"] for r in rows),
        timings={k: sum(r["timings"][k] for r in rows) for k in rows[0]["timings"]},
        update_norm={l: sum(wi * r["update_norm"][l] for wi, r in zip(w, rows)) for l in layers},
        relative_update={l: sum(wi * r["relative_update"][l] for wi, r in zip(w, rows)) for l in layers},
        passes=max(r["passes"] for r in rows),
        condition={l: max(r["condition"][l] for r in rows) for l in layers},
        rank={l: min(r["rank"][l] for r in rows) for l in layers},
    )
    return out


def summarise(out: Path) -> None:
    rows = []
    for cell in sorted(out.glob("b*/*.json")):
        if cell.name == "pre.json":
            continue
        r = json.loads(cell.read_text())
        rows.append({"batch": r["batch_size"], "method": r["method"], "distribution": r["distribution"],
                     **{k: r[k] for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score",
                                          "residual_left")},
                     "max_rel_update": max(r["relative_update"].values()),
                     "max_cond": max(r["condition"].values()),
                     "min_rank": f"{min(r['rank'].values())} / {r['batch_size']}" if "rank" in r else "",
                     "keys_s": r["timings"]["keys_s"]})
    rows.sort(key=lambda r: (r["batch"], r["method"], r["distribution"]))
    # a rank below the batch: G is singular and its "condition number" is rounding noise over ~0
    table_rows = [{**r, "residual_left": f"{r['residual_left']:.3f}", "max_rel_update": f"{r['max_rel_update']:.3f}",
                   "max_cond": "singular" if r["min_rank"] and int(r["min_rank"].split(" / ")[0]) < r["batch"]
                   else f"{r['max_cond']:.1f}"} for r in rows]
    keys = list(rows[0]) if rows else []
    table = format_table(table_rows, keys).replace("| max_cond |", "| max cond(G) |")
    lines = [table, "", "residual_left: mean ||z* - z|| at the last layer after the edit over before it; "
             "max_rel_update: largest ||dW_l|| / ||W_l||; max cond(G): largest condition number of K^T M^-1 K; min_rank: its smallest numerical rank (cells "
             "written before it was recorded leave it empty)."]
    for pre in sorted(out.glob("b*/pre.json")):
        p = json.loads(pre.read_text())
        lines.append(f"unedited, {pre.parent.name}: ES {p['efficacy_score']:.1f} PS {p['paraphrase_score']:.1f} "
                     f"NS {p['neighborhood_score']:.1f}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = sorted({r["distribution"] for r in rows})
    colour = {d: plt.get_cmap("tab20")(i % 20) for i, d in enumerate(dists)}  # one colour per distribution
    for metric in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "residual_left"):
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for method in sorted({r["method"] for r in rows}):
            for dist in dists:
                pts = sorted((r["batch"], r[metric]) for r in rows if r["method"] == method and r["distribution"] == dist)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if method == "emmet" else "s",
                            label=f"{method} {dist}", color=colour[dist], linestyle="-" if method == "emmet" else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=110)
        plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--batch-sizes", default="256")
    ap.add_argument("--records", type=int, default=256, help="records per cell at least (batch sizes below it "
                    "edit this many records in several batches)")
    ap.add_argument("--methods", default="emmet,memit")
    ap.add_argument("--distributions", default="single,spread,joint,cascade,refit")
    ap.add_argument("--layers", default=None, help="edited layers instead of the preset's, e.g. 1,2,3,4,5,6,7,8 "
                    "(cells are labelled DIST@FIRST-LAST; the last layer, and so the target vectors, must stay "
                    "the preset's for the cells to share them)")
    ap.add_argument("--set", default=None, help="hyperparameters for every method that has them, e.g. "
                    "emmet_lambda=1.0 (cells are labelled DIST+KEY=VALUE; the target settings must stay the "
                    "preset's for the cells to share the target vectors)")
    ap.add_argument("--out", default="results/distributions")
    ap.add_argument("--targets-only", action="store_true",
                    help="only compute (or complete) the shared target vectors of the first --records records of "
                         "--data into OUT/targets/DATA, chunk by chunk (resumable; what --frozen-targets of "
                         "benchmarks/lifelong.py reads), and edit nothing")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    overrides = dict(kv.split("=", 1) for kv in args.set.split(",")) if args.set else {}
    configure_threads()
    out = Path(args.out)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    model, tok = lmedit.load_model()
    # one batch cannot ask one (subject, prompt) for two targets: the first record that asks it wins
    everything = lmedit.load_requests(args.data, drop_conflicts=True)
    targets_dir = out / "targets" / Path(args.data).stem
    if args.targets_only:
        if overrides:
            raise SystemExit("--targets-only computes the preset's target vectors (what every cell shares); "
                             "drop --set")
        method = args.methods.split(",")[0]
        editor = lmedit.Editor(model, tok, method, **({"layers": layers} if layers else {}), **OWN_VECTORS)
        shared_targets(editor, everything[:args.records], targets_dir)
        return
    for bs in sizes:
        reqs = everything[:max(bs, args.records)]
        cell_dir = out / f"b{bs}"
        cell_dir.mkdir(parents=True, exist_ok=True)
        if not (cell_dir / "pre.json").exists():
            pre = evaluate_requests(model, tok, reqs)
            (cell_dir / "pre.json").write_text(json.dumps({k: pre[k] for k in METRIC_KEYS}, indent=1))
        for method in args.methods.split(","):
            fields = lmedit.Editor(model, tok, method).hparams.to_dict()
            given = {k: type(fields[k])(v) for k, v in overrides.items() if k in fields}  # typed as the field
            if overrides and not given:
                print(f"skip {method}: it has none of {sorted(overrides)}", flush=True)
                continue
            editor = lmedit.Editor(model, tok, method, **({"layers": layers} if layers else {}), **{**OWN_VECTORS, **given})
            where = (f"@{layers[0]}-{layers[-1]}" if layers else "") + "".join(f"+{k}={v}" for k, v in given.items())
            cached = None
            for dist in args.distributions.split(","):
                cell = cell_dir / f"{method}_{dist}{where}.json"
                if cell.exists():
                    print(f"skip {cell}", flush=True)
                    continue
                if cached is None:
                    cached = shared_targets(editor, reqs, targets_dir)
                row = run_cell(editor, reqs, dist, cached, bs)
                row.update(peak_memory())  # of the process so far: model, target chunks, every cell before
                row.update(method=method, distribution=dist + where, batch_size=bs, n=len(reqs), data=args.data,
                           hparams={"preset": editor.preset, **editor.hparams.to_dict()},
                           lmedit_version=lmedit.__version__,
                           command=f"python benchmarks/distributions.py --batch-sizes {args.batch_sizes} "
                                   f"--records {args.records} --methods {args.methods} "
                                   f"--distributions {args.distributions} --out {args.out}"
                                   + (f" --layers {args.layers}" if layers else "")
                                   + (f" --set {args.set}" if args.set else ""))
                with atomic_path(cell) as tmp:
                    tmp.write_text(json.dumps(row, indent=1))
                print(f"b{bs} {method:6s} {dist:8s} ES {row['efficacy_score']:5.1f} PS {row['paraphrase_score']:5.1f} "
                      f"NS {row['neighborhood_score']:5.1f} S {row['score']:5.1f} left {row['residual_left']:.3f} "
                      f"edit {row['edit_s']:.0f} s", flush=True)
    summarise(out)


if __name__ == "__main__":
    main()
