"""The target optimisation's memory estimate against measured peak memory.

Usage::

    python benchmarks/memory.py [--sizes 4,16,32] [--dtypes bfloat16,float32] [--out results/memory]

For each (chunk size, compute dtype), a fresh process optimises the target vectors of that many
CounterFact records (counterfact_500.json) in one chunk with the embedded model's EMMET templates
(3 steps: the peak is reached at the first backward pass) and reports the peak resident memory
above what the process held before, beside ``lmedit.core.targets.estimate_bytes`` for the same
layout. The memory budget (``--memory-budget``) chunks by the estimate, so it should not be below
the measurement. Writes OUT/memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_500.json"

CHILD = r"""
import gc, json, sys
import lmedit
from lmedit._runtime import configure_threads, peak_memory, resident_mb
from lmedit.core.layout import build_layout
from lmedit.core.targets import TargetConfig, compute_targets, estimate_bytes
from lmedit.models.precision import working_copy
configure_threads()
n, dtype, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model, tok = lmedit.load_model()
ed = lmedit.Editor(model, tok, "emmet")
flat = [t for g in ed.template_groups() for t in g]
reqs = lmedit.load_requests(data)[:n]
layer = ed.hparams.layers[-1]
with working_copy(model, dtype) as work:
    gc.collect()
    before = resident_mb() * 2**20
    est = estimate_bytes(work, ed.adapter, build_layout(tok, reqs, flat), layer)
    compute_targets(work, tok, ed.adapter, reqs, flat, layer, TargetConfig(v_num_grad_steps=3, chunk_requests=n))
    peak = peak_memory()["peak_rss_mb"] * 2**20
print(json.dumps({"requests": n, "dtype": dtype, "templates": len(flat), "estimate_gib": est / 2**30,
                  "measured_gib": (peak - before) / 2**30}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,16,32")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(ROOT / "results" / "memory"))
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            got = subprocess.run([sys.executable, "-c", CHILD, str(n), dtype, args.data], capture_output=True,
                                 text=True, check=True)
            row = json.loads(got.stdout.strip().splitlines()[-1])
            row["estimate_over_measured"] = row["estimate_gib"] / row["measured_gib"]
            rows.append(row)
            print(f"{dtype:>9} {n:>3} requests x {row['templates']} templates: estimate {row['estimate_gib']:.2f} GiB, "
                  f"measured {row['measured_gib']:.2f} GiB (x{row['estimate_over_measured']:.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"wrote {out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
