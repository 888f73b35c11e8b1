"""Sequential batched editing: batches accumulate in the same weights; after every batch, the
efficacy of the newest batch, the neighborhood score of the FIRST batch's neighbours, the norm
of each edited matrix and its growth, finiteness and memory are recorded.

Usage: ``python benchmarks/sequential.py --method emmet --batch-size 100 --batches 20
        --data ../shared/data/counterfact/counterfact_train_10000.json --out results/sequential``

Writes ``<out>/<method>.json``, ``<out>/<method>.md`` (table) and ``<out>/<method>.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import lmedit
from lmedit._runtime import configure_threads
from lmedit.core.context import context_templates
from lmedit.evaluate.scoring import score_continuations


def prefer_share(model, tok, prompts, wins, loses) -> float:
    """Share (x100) of prompts where ``wins`` has a lower mean per-token NLL than ``loses``."""
    s = score_continuations(model, tok, [p for p in prompts for _ in (0, 1)], [t for w, l in zip(wins, loses) for t in (w, l)])
    ok = [float(s[2 * i][0].mean()) > float(s[2 * i + 1][0].mean()) for i in range(len(prompts))]
    return 100.0 * sum(ok) / max(1, len(ok))


def batches_without_conflicts(requests, size, count):
    """Consecutive batches of ``size`` requests, skipping a request whose subject already occurs in
    the batch (one subject may not take two objects in one batch) or whose target_true is missing."""
    out, cur, seen = [], [], set()
    for r in requests:
        if r.target_true is None or r.subject in seen:
            continue
        cur.append(r)
        seen.add(r.subject)
        if len(cur) == size:
            out.append(cur)
            cur, seen = [], set()
            if len(out) == count:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="emmet")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_500.json")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--neighbors-per-record", type=int, default=3)
    ap.add_argument("--out", default="results/sequential")
    args = ap.parse_args()
    configure_threads()
    model, tok = lmedit.load_model()
    adapter = lmedit.get_adapter(model)
    reqs = lmedit.load_requests(args.data)
    batches = batches_without_conflicts(reqs, args.batch_size, args.batches)
    _, hp = lmedit.resolve_hparams(model, args.method)
    context = context_templates(model, tok, hp.context_templates, seed=hp.seed)
    W0 = {l: adapter.weight(model, l).detach().float().clone() for l in hp.layers}
    first = batches[0]
    nb = [(p, r.neighborhood_target, r.target_new) for r in first for p in r.neighborhood_prompts[: args.neighbors_per_record]
          if r.neighborhood_target]
    ns0 = prefer_share(model, tok, [x[0] for x in nb], [x[1] for x in nb], [x[2] for x in nb])
    rows = []
    t_start = time.perf_counter()
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        lmedit.edit(model, tok, batch, method=args.method, context=context)
        t_edit = time.perf_counter() - t0
        es = prefer_share(model, tok, [r.text for r in batch], [r.target_new for r in batch], [r.target_true for r in batch])
        ns = prefer_share(model, tok, [x[0] for x in nb], [x[1] for x in nb], [x[2] for x in nb])
        norms = {l: float(adapter.weight(model, l).detach().float().norm()) for l in hp.layers}
        growth = {l: float((adapter.weight(model, l).detach().float() - W0[l]).norm() / W0[l].norm()) for l in hp.layers}
        finite = all(bool(torch.isfinite(adapter.weight(model, l)).all()) for l in hp.layers)
        row = {"batch": i + 1, "edits": (i + 1) * args.batch_size, "es_newest": es, "ns_first": ns, "edit_s": t_edit,
               "rel_change_max": max(growth.values()), "weight_norm": norms, "rel_change": growth, "finite": finite,
               "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        rows.append(row)
        print(f"batch {i + 1:3d}  edits {row['edits']:5d}  ES(newest) {es:5.1f}  NS(first) {ns:5.1f}  "
              f"max |dW|/|W0| {row['rel_change_max']:.3f}  edit {t_edit:.0f} s  RSS {row['rss_mb']:.0f} MB", flush=True)
        if not finite:
            print("non-finite weights: stopping")
            break
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"method": args.method, "data": args.data, "batch_size": args.batch_size, "ns_first_before": ns0,
              "hparams": hp.to_dict(), "rows": rows, "total_s": time.perf_counter() - t_start,
              "command": "python benchmarks/sequential.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    (out / f"{args.method}.json").write_text(json.dumps(result, indent=1))
    lines = ["| edits | ES newest batch | NS first batch | max rel. change of W | edit s |", "|---|---|---|---|---|",
             f"| 0 | | {ns0:.1f} | 0 | |"]
    lines += [f"| {r['edits']} | {r['es_newest']:.1f} | {r['ns_first']:.1f} | {r['rel_change_max']:.3f} | {r['edit_s']:.0f} |" for r in rows]
    (out / f"{args.method}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    x = [r["edits"] for r in rows]
    ax[0].plot(x, [r["es_newest"] for r in rows], marker="o", label="ES newest batch")
    ax[0].plot([0] + x, [ns0] + [r["ns_first"] for r in rows], marker="o", label="NS first batch")
    ax[0].set_xlabel("edits")
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    ax[1].plot(x, [r["rel_change_max"] for r in rows], marker="o")
    ax[1].set_xlabel("edits")
    ax[1].set_ylabel("max_l |W_l - W_l0| / |W_l0|")
    ax[1].grid(alpha=0.3)
    fig.suptitle(f"{args.method}: sequential batches of {args.batch_size}")
    fig.tight_layout()
    fig.savefig(out / f"{args.method}.png", dpi=110)


if __name__ == "__main__":
    main()
