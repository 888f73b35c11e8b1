"""What compacting a long ledger buys: its size and the time to load it, and that it is the same model.

Usage::

    python benchmarks/ledger_compact.py LEDGER [--keep-last 0] [--repeats 3] [--model NAME]
        [--work /tmp/ledger_compact] [--out results/ledger_compact]

Copies LEDGER (left as it is) to ``--work``, times ``Editor.load`` of the copy onto the base model
(checksums, replay, the Editor; the least of ``--repeats``, the base weights restored between), then
``Ledger.compact`` (``lmedit ledger compact``), then the load of the compacted copy, and checks that
both loads give the same edited weights and the same sum of earlier keys, bit for bit. Prints a
table and writes OUT/<ledger name>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._runtime import configure_threads
from lmedit.core.weights import restore
from lmedit.ledger import Ledger
from lmedit.models.loading import fingerprint

ROOT = Path(__file__).resolve().parents[1]


def timed_load(model, tok, path: Path, base: dict, repeats: int) -> tuple[float, dict, dict]:
    """The least of ``repeats`` Editor.load times, and the edited weights and earlier keys of the last."""
    adapter, times = lmedit.get_adapter(model), []
    for _ in range(repeats):
        restore(model, adapter, base)
        t0 = time.perf_counter()
        editor = lmedit.Editor.load(model, tok, path)
        times.append(time.perf_counter() - t0)
    weights = {l: adapter.stored(model, l).detach().clone() for l in base}
    return min(times), weights, {l: e.clone() for l, e in editor.earlier.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ledger")
    ap.add_argument("--keep-last", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default="/tmp/ledger_compact")
    ap.add_argument("--out", default=str(ROOT / "results" / "ledger_compact"))
    args = ap.parse_args()
    threads = configure_threads()
    source = Path(args.ledger)
    copy = Path(args.work) / source.name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(source, copy)
    model, tok = lmedit.load_model(args.model)
    adapter = lmedit.get_adapter(model)
    ledger = Ledger.open(copy)
    layers = sorted({l for b in ledger.edited_batches() for l in b["layers"]})
    base = {l: adapter.stored(model, l).detach().to("cpu", copy=True) for l in layers}
    row = {"ledger": str(source), "batches": ledger.n_batches, "requests": ledger.n_requests,
           "threads": threads, "repeats": args.repeats, "keep_last": args.keep_last}
    row["bytes_before"] = ledger.size_bytes()
    row["load_s_before"], w_before, e_before = timed_load(model, tok, copy, base, args.repeats)
    restore(model, adapter, base)
    t0 = time.perf_counter()
    report = Ledger.open(copy).compact(model, adapter, fingerprint(model, adapter), keep_last=args.keep_last)
    row["compact_s"] = time.perf_counter() - t0
    row["bytes_after"] = report["bytes_after"]
    row["load_s_after"], w_after, e_after = timed_load(model, tok, copy, base, args.repeats)
    row["same_weights"] = all(torch.equal(w_before[l], w_after[l]) for l in layers)
    row["same_earlier_keys"] = set(e_before) == set(e_after) and all(torch.equal(e_before[l], e_after[l])
                                                                    for l in e_before)
    shutil.rmtree(copy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{source.name}.json").write_text(json.dumps(row, indent=1))
    mib = 2 ** 20
    print("| ledger | batches | requests | MiB before | MiB after | load s before | load s after | compact s | "
          "same weights | same earlier keys |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {source.name} | {row['batches']} | {row['requests']} | {row['bytes_before'] / mib:.1f} | "
          f"{row['bytes_after'] / mib:.1f} | {row['load_s_before']:.2f} | {row['load_s_after']:.2f} | "
          f"{row['compact_s']:.2f} | {row['same_weights']} | {row['same_earlier_keys']} |")
    return 0 if row["same_weights"] and row["same_earlier_keys"] else 1


if __name__ == "__main__":
    sys.exit(main())
