"""Two facts read from one key: edited in one batch, or one batch after the other.

Usage::

    python benchmarks/same_key.py [--pairs 16] [--method encore] [--out results/reedit] [--name same_key_shared.json]
        [--arms "together;apart"] [--set v_num_grad_steps=50,...]
    python benchmarks/same_key.py --census [--batch-size 100 --first 2000]

A key is the MLP input at the subject's last token, so two CounterFact records with the same subject
after the same text (e.g. "{} was founded in" and "{}, that originated in") share it, whatever
follows. On the embedded model, the first ``--pairs`` such pairs of counterfact_train_10000.json
(conflicts left out, different target_new) are edited with ``--method``'s preset, each arm from the
unedited model:

* ``together``: both facts of every pair in one batch, with one target vector per pair optimised for
  both facts (``share_key_targets``, the default);
* ``together, own vectors``: the same with ``share_key_targets=False`` (each fact its own vector, and
  the edit writes a compromise at the shared key);
* ``apart``: every pair's first fact in batch 1, its second in batch 2, where (``share_key_targets``
  with ``supersede_edits``, the defaults) batch 2 carries the first facts: they are edited again with
  the second ones, one target vector per key, their earlier keys superseded;
* ``apart, keep``: the same with ``share_key_targets=False``: the first facts' keys stay preserved
  and batch 2 optimises and writes the second facts alone.

results/reedit/same_key.json was measured before ``share_key_targets`` existed, with an ``apart`` arm
that superseded by key (commit 451d7d4; the reason it no longer does). Per fact group: efficacy
(target_new beats target_true, mean log-probability per token) and the argmax rate (every token of
target_new, teacher forced), in %, and the mean target-optimisation steps of the facts' vectors
(those of batch 2 where there are two). ``--set`` applies KEY=VALUE overrides to every arm. Writes
OUT/NAME and prints a table. ``--census`` only counts (tokenizer only, no edit): the records of the
file (conflicts left out) that share a key with another, and those in a batch of ``--batch-size``
among the first ``--first`` that share a key with another record of their batch or of an earlier
one.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reedit import DATA, ROOT, scores  # noqa: E402


ARMS = ("together", "together, own vectors", "apart", "apart, keep")


def census(args) -> int:
    from lmedit.core.targets import shared_key_groups

    reqs = lmedit.load_requests(args.data, drop_conflicts=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lmedit.models.embedded_model_dir())
    groups = shared_key_groups(tok, reqs)
    sizes: dict[int, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    shared = sum(1 for g in groups if sizes[g] > 1)
    first = groups[:args.first]
    in_batch = sum(1 for i, g in enumerate(first)
                   if first[i - i % args.batch_size:i - i % args.batch_size + args.batch_size].count(g) > 1)
    earlier = sum(1 for i, g in enumerate(first) if g in first[:i - i % args.batch_size])
    print(f"{args.data}: {len(reqs)} records (conflicts left out), {shared} share a key with another "
          f"({sum(1 for n in sizes.values() if n > 1)} keys); among the first {len(first)} in batches of "
          f"{args.batch_size}: {in_batch} share a key within their batch, {earlier} with an earlier batch")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--method", default="encore")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(ROOT / "results" / "reedit"))
    ap.add_argument("--name", default="same_key_shared.json")
    ap.add_argument("--arms", default="together;together, own vectors;apart;apart, keep")
    ap.add_argument("--set", default="", help="KEY=VALUE overrides for every arm, comma-separated")
    ap.add_argument("--census", action="store_true", help="only count the records that share a key")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--first", type=int, default=2000)
    args = ap.parse_args()
    if args.census:
        return census(args)
    threads = configure_threads()
    groups: dict[tuple[str, str], list] = {}
    for r in lmedit.load_requests(args.data, drop_conflicts=True):
        groups.setdefault((r.prompt.split("{}")[0], r.subject), []).append(r)
    pairs = [g[:2] for g in groups.values() if len(g) >= 2 and g[0].target_new != g[1].target_new][:args.pairs]
    first, second = [p[0] for p in pairs], [p[1] for p in pairs]
    rows = []
    sets = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.set.split(",") if kv)}
    for arm in args.arms.split(";"):
        if arm not in ARMS:
            ap.error(f"--arms: unknown arm {arm!r}; choose from {ARMS}")
        model, tok = lmedit.load_model()
        editor = lmedit.Editor(model, tok, args.method,
                               **{**sets, **({"share_key_targets": False} if "own" in arm or "keep" in arm else {})})
        t0 = time.perf_counter()
        batches = [first + second] if arm.startswith("together") else [first, second]
        for b in batches:
            res = editor.edit(b)
        rows.append({"arm": arm, "seconds": time.perf_counter() - t0, "first": scores(model, tok, first),
                     "second": scores(model, tok, second), "steps": float(res.targets.steps.float().mean()),
                     "carried": len(res.carried)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.name).write_text(json.dumps({
        "pairs": [[r.to_dict() for r in p] for p in pairs], "method": args.method, "set": sets, "threads": threads,
        "rows": rows},
        indent=1))
    print(f"\n{args.method}, {len(pairs)} pairs of facts sharing a key (efficacy / argmax, %)")
    print("| arm | first facts | second facts | steps |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['first']['efficacy']:.1f} / {r['first']['argmax']:.1f} | "
              f"{r['second']['efficacy']:.1f} / {r['second']['argmax']:.1f} | {r['steps']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
