"""Which of a long run's edits the final model still holds: the scores of every k-th batch of a ledger.

Usage::

    python benchmarks/ledger_cohorts.py LEDGER [--every 10] [--model NAME] [--out results/lifelong_10k]

A lifelong run's "ES all" mixes every batch; whether its fall comes from early edits being lost or
late ones never landing is not in it. This scores the requests of batches 1, 1 + k, 1 + 2k, ... and
the last batch (the newest edit: what an edit still writes after all the others) on the unedited
model and on the model with the whole ledger applied (``Editor.load``), and prints efficacy,
paraphrase and neighbourhood scores per batch. Writes OUT/cohorts_<ledger name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lmedit
from lmedit._fs import write_json
from lmedit._runtime import configure_threads
from lmedit.evaluate.runner import evaluate_requests
from lmedit.ledger import Ledger
from lmedit.requests import as_requests

METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def cohorts(ledger: Ledger, every: int) -> list[int]:
    """Batch indices (0-based) of every ``every``-th edited batch and the last one."""
    if every < 1:
        raise SystemExit(f"--every {every}: must be 1 or more")
    n = ledger.n_batches
    if ledger.n_compacted:
        raise SystemExit(f"{ledger.path} is compacted: its first batches' requests are no longer apart; run this "
                         "on the ledger before compacting")
    return sorted(set(range(0, n, every)) | {n - 1})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ledger")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--model", default=None, help="the ledger's base model (default: the embedded one)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default: the ledger's grandparent)")
    args = ap.parse_args()
    configure_threads()
    ledger = Ledger.open(args.ledger)
    picked = cohorts(ledger, args.every)
    requests = {i: as_requests(ledger.read_batch(i).requests) for i in picked}
    model, tok = lmedit.load_model(args.model)
    sizes = [b["n_requests"] for b in ledger.edited_batches()]
    rows = {i: {"batch": i + 1, "edits_before": sum(sizes[:i]), "n": len(requests[i])} for i in picked}
    t0 = time.perf_counter()
    for i in picked:
        rows[i].update({f"unedited_{m}": v for m, v in evaluate_requests(model, tok, requests[i]).items() if m in METRICS})
    lmedit.Editor.load(model, tok, ledger.path)
    for i in picked:
        rows[i].update({m: v for m, v in evaluate_requests(model, tok, requests[i]).items() if m in METRICS})
    out = Path(args.out) if args.out else Path(args.ledger).resolve().parents[1]
    result = {"ledger": str(args.ledger), "batches": ledger.n_batches, "edits": ledger.n_requests,
              "command": " ".join(sys.argv), "seconds": time.perf_counter() - t0, "rows": list(rows.values())}
    write_json(out / f"cohorts_{Path(args.ledger).name}.json", result)
    print(f"{args.ledger}: {ledger.n_requests} edits in {ledger.n_batches} batches; scores now (unedited)")
    print("| batch | ES | PS | NS |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['batch']} | " + " | ".join(f"{r[m]:.0f} ({r['unedited_' + m]:.0f})" if m in r else "-"
                                               for m in METRICS) + " |")  # a metric its requests lack: -
    return 0


if __name__ == "__main__":
    sys.exit(main())
