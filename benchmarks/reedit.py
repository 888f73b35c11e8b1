"""Editing facts again: does a new answer replace the old one, and what happens to the other facts?

Usage::

    python benchmarks/reedit.py [--n 32] [--method encore] [--arms "supersede_edits=true;supersede_edits=false"]
        [--out results/reedit] [--name reedit.json]

Keeping a deployed model current means editing some facts again when they change. On the embedded
model, per arm (settings of ``--method``, ';' between arms, ',' between KEY=VALUE overrides): batch 1
edits ``--n`` CounterFact records (counterfact_train_10000.json) to their target_new; batch 2 gives
the first half of them a new answer (another record's target_new) and adds ``--n``/2 new records.
After batch 2, per group: efficacy (the answer asked for is more probable than the one it replaces:
for the re-edited facts their batch-1 answer, else the true one) and how often it is the argmax answer
(every token, teacher forced). Arms run one after another from the unedited model. Writes
OUT/NAME and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lmedit
from lmedit._runtime import configure_threads
from lmedit.cli import parse_value
from lmedit.evaluate.retention import answer_scores

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_train_10000.json"


def scores(model, tok, reqs: list[lmedit.EditRequest]) -> dict[str, float]:
    """Efficacy (target_new over target_true, mean log-probability per token) and argmax rate, in %."""
    prompts = [r.prompt.format(r.subject) for r in reqs]
    hit, new = answer_scores(model, tok, prompts, [r.target_new for r in reqs])
    _, old = answer_scores(model, tok, prompts, [r.target_true for r in reqs])
    return {"efficacy": 100 * sum(a > b for a, b in zip(new, old)) / len(reqs), "argmax": 100 * sum(hit) / len(reqs)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--method", default="encore")
    ap.add_argument("--arms", default="supersede_edits=true;supersede_edits=false")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(ROOT / "results" / "reedit"))
    ap.add_argument("--name", default="reedit.json")
    args = ap.parse_args()
    if args.n < 2 or args.n % 2:
        ap.error("--n must be an even number >= 2")
    threads = configure_threads()
    records = lmedit.load_requests(args.data, limit=args.n + args.n // 2, drop_conflicts=True)
    first, fresh = records[:args.n], records[args.n:]
    half = args.n // 2
    answers = [r.target_new for r in first]
    again = []
    for i, r in enumerate(first[:half]):  # a new answer: the next record's target_new that differs from both
        new = next(a for a in answers[i + 1:] + answers[:i] if a not in (r.target_new, r.target_true))
        again.append(lmedit.EditRequest(r.prompt, r.subject, new, r.target_new))
    groups = {"edited again": again, "edited once, kept": first[half:], "new in batch 2": fresh}
    rows = []
    for arm in args.arms.split(";"):
        sets = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in arm.split(",") if kv)}
        model, tok = lmedit.load_model()
        editor = lmedit.Editor(model, tok, args.method, keep_history=True, **sets)
        t0 = time.perf_counter()
        editor.edit(first)
        after_first = scores(model, tok, first)
        res = editor.edit(again + fresh)
        row = {"arm": arm, "superseded": len(res.superseded), "seconds": time.perf_counter() - t0,
               "batch 1 after batch 1": after_first, **{g: scores(model, tok, reqs) for g, reqs in groups.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.name).write_text(json.dumps({"n": args.n, "method": args.method, "threads": threads,
                                                  "data": str(args.data), "rows": rows}, indent=1))
    print(f"\n{args.method}, {args.n} facts in batch 1; batch 2: {half} of them again with a new answer, {half} new "
          "(efficacy / argmax, %)")
    print("| arm | superseded | batch 1 after batch 1 | edited again | edited once, kept | new in batch 2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda g: f"{r[g]['efficacy']:.1f} / {r[g]['argmax']:.1f}"  # noqa: E731
        print(f"| {r['arm']} | {r['superseded']} | {cell('batch 1 after batch 1')} | {cell('edited again')} | "
              f"{cell('edited once, kept')} | {cell('new in batch 2')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
