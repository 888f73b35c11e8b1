"""Sequential batched editing: batches accumulate in the same weights; after every batch, the
efficacy of the newest batch, the retention (efficacy) and neighborhood score of the FIRST batch,
the fluency of greedy continuations, the norm of each edited matrix and its growth, finiteness
and memory are recorded. Edits are made with ``keep_history=False`` (no undo copies), so memory
stays flat; ``--keep-history`` keeps them, to compare. Resident memory is read after glibc's
malloc_trim, so freed-but-cached heap pages do not count as growth (the figure before the trim
is recorded too).

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
from lmedit._runtime import configure_threads, release_freed_memory
from lmedit.evaluate.generation import generation_entropy
from lmedit.evaluate.scoring import generate_texts, score_continuations


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux), else the peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    ap.add_argument("--fluency-prompts", type=int, default=16,
                    help="greedy continuations (of the first batch's neighbourhood prompts) scored for n-gram entropy")
    ap.add_argument("--fluency-tokens", type=int, default=50)
    ap.add_argument("--keep-history", action="store_true", help="keep undo copies of every batch (memory grows)")
    ap.add_argument("--out", default="results/sequential")
    args = ap.parse_args()
    configure_threads()
    model, tok = lmedit.load_model()
    adapter = lmedit.get_adapter(model)
    reqs = lmedit.load_requests(args.data)
    batches = batches_without_conflicts(reqs, args.batch_size, args.batches)
    editor = lmedit.Editor(model, tok, args.method, keep_history=args.keep_history)
    hp = editor.hparams
    editor.context()  # context templates from the unedited model, shared by every batch
    W0 = {l: adapter.weight(model, l).detach().float().clone() for l in hp.layers}
    first = batches[0]
    nb = [(p, r.neighborhood_target, r.target_new) for r in first for p in r.neighborhood_prompts[: args.neighbors_per_record]
          if r.neighborhood_target]
    ns0 = prefer_share(model, tok, [x[0] for x in nb], [x[1] for x in nb], [x[2] for x in nb])
    flu_prompts = [x[0] for x in nb][: args.fluency_prompts]

    def fluency() -> float:
        return generation_entropy(generate_texts(model, tok, flu_prompts, max_new_tokens=args.fluency_tokens))

    ge0 = fluency()
    release_freed_memory()
    rss0 = rss_mb()
    print(f"before: NS(first) {ns0:.1f}  fluency {ge0:.3f} bits  RSS {rss0:.0f} MB", flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    command = "python benchmarks/sequential.py " + " ".join(
        (f"--{k.replace('_', '-')}" if v else "") if isinstance(v, bool) else f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()).replace("  ", " ").strip()

    def result(error: str | None) -> dict:
        return {"method": args.method, "data": args.data, "batch_size": args.batch_size, "ns_first_before": ns0,
                "fluency_before": ge0, "rss_mb_before": rss0, "weight_norm_before": {l: float(W0[l].norm()) for l in hp.layers},
                "hparams": hp.to_dict(), "rows": rows, "total_s": time.perf_counter() - t_start, "error": error,
                "command": command, "lmedit_version": lmedit.__version__, "threads": torch.get_num_threads()}

    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        try:
            editor.edit(batch)
        except lmedit.LmeditError as e:  # e.g. a solve that is no longer positive definite: record where and stop
            print(f"batch {i + 1}: edit failed: {e}")
            write_outputs(args, hp, result(f"batch {i + 1}: {type(e).__name__}: {e}"), rows)
            return
        t_edit = time.perf_counter() - t0
        es = prefer_share(model, tok, [r.text for r in batch], [r.target_new for r in batch], [r.target_true for r in batch])
        es_first = es if i == 0 else prefer_share(model, tok, [r.text for r in first], [r.target_new for r in first],
                                                  [r.target_true for r in first])
        ge = fluency()
        ns = prefer_share(model, tok, [x[0] for x in nb], [x[1] for x in nb], [x[2] for x in nb])
        norms = {l: float(adapter.weight(model, l).detach().float().norm()) for l in hp.layers}
        growth = {l: float((adapter.weight(model, l).detach().float() - W0[l]).norm() / W0[l].norm()) for l in hp.layers}
        finite = all(bool(torch.isfinite(adapter.weight(model, l)).all()) for l in hp.layers)
        rss_untrimmed = rss_mb()
        release_freed_memory()
        row = {"batch": i + 1, "edits": (i + 1) * args.batch_size, "es_newest": es, "es_first": es_first, "ns_first": ns,
               "fluency": ge, "edit_s": t_edit, "rel_change_max": max(growth.values()), "weight_norm": norms,
               "rel_change": growth, "finite": finite, "rss_mb": rss_mb(), "rss_before_trim_mb": rss_untrimmed,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        rows.append(row)
        print(f"batch {i + 1:3d}  edits {row['edits']:5d}  ES(newest) {es:5.1f}  ES(first) {es_first:5.1f}  "
              f"NS(first) {ns:5.1f}  fluency {ge:.3f}  max |dW|/|W0| {row['rel_change_max']:.3f}  "
              f"edit {t_edit:.0f} s  RSS {row['rss_mb']:.0f} MB (before malloc_trim {rss_untrimmed:.0f})", flush=True)
        if not finite:
            print("non-finite weights: stopping")
            write_outputs(args, hp, result(f"batch {i + 1}: non-finite weights"), rows)
            return
        write_outputs(args, hp, result(None), rows)


def write_outputs(args, hp, result: dict, rows: list[dict]) -> None:
    """JSON, markdown table and plot, rewritten after every batch (so an interrupted run keeps its rows)."""
    ns0, ge0, rss0 = result["ns_first_before"], result["fluency_before"], result["rss_mb_before"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.method}.json").write_text(json.dumps(result, indent=1))
    lines = ["| edits | ES newest batch | ES first batch | NS first batch | fluency (bits) | max rel. change of W | edit s | RSS MB |",
             "|---|---|---|---|---|---|---|---|",
             f"| 0 | | | {ns0:.1f} | {ge0:.3f} | 0 | | {rss0:.0f} |"]
    lines += [f"| {r['edits']} | {r['es_newest']:.1f} | {r['es_first']:.1f} | {r['ns_first']:.1f} | {r['fluency']:.3f} | "
              f"{r['rel_change_max']:.3f} | {r['edit_s']:.0f} | {r['rss_mb']:.0f} |" for r in rows]
    (out / f"{args.method}.md").write_text("\n".join(lines) + "\n")
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    x = [r["edits"] for r in rows]
    ax[0].plot(x, [r["es_newest"] for r in rows], marker="o", label="ES newest batch")
    ax[0].plot(x, [r["es_first"] for r in rows], marker="o", label="ES first batch")
    ax[0].plot([0] + x, [ns0] + [r["ns_first"] for r in rows], marker="o", label="NS first batch")
    ax[0].set_xlabel("edits")
    ax[0].set_ylim(0, 102)
    ax[0].legend(fontsize=8)
    ax[0].grid(alpha=0.3)
    for l in hp.layers:
        ax[1].plot(x, [r["rel_change"][l] for r in rows], marker=".", label=f"layer {l}")
    ax[1].set_xlabel("edits")
    ax[1].set_ylabel("|W_l - W_l0| / |W_l0|")
    ax[1].legend(fontsize=8)
    ax[1].grid(alpha=0.3)
    ax[2].plot([0] + x, [ge0] + [r["fluency"] for r in rows], marker="o")
    ax[2].set_xlabel("edits")
    ax[2].set_ylabel("fluency: n-gram entropy (bits)")
    ax[2].grid(alpha=0.3)
    fig.suptitle(f"{args.method}: sequential batches of {args.batch_size}")
    fig.tight_layout()
    fig.savefig(out / f"{args.method}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
