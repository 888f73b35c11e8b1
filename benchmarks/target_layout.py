"""One batch's target vectors in the CPU's pass layout and in one pass a step and one chunk, timed in one process.

Usage::

    python benchmarks/target_layout.py [--model M] [--device-map cuda] [--method encore] [--n 100]
        [--data FILE] [--set KEY=VALUE ...] [--repeats 2] [--out DIR]

The target optimisation groups its sequences into passes by the columns their loss needs
(``lmedit.core.layout.buckets``) and its requests into chunks (``chunk_requests``). Its defaults
depend on the device the passes run on: on a CPU a pass costs about 32 tokens beyond its rows and
chunks hold 64 requests; on CUDA every bucket goes into one pass a step and all requests (up to 256)
into one chunk (both split further only to fit the memory budget). This edits the first ``--n``
records of ``--data`` with each layout in turn, alternating, ``--repeats`` times each (after one
warm-up edit of 4 other records, undone), and prints each edit's phase times, the target vectors'
difference between the layouts (padding changes float rounding only, which Adam and the
stopping rule can amplify), and writes
OUT/target_layout.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._runtime import configure_threads
from target_profile import batch_arguments, warmed_up  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

LAYOUTS = {"cpu": 32, "one pass": 100_000}  # what a pass costs beyond its rows, on every device type


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    batch_arguments(ap)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results/target_layout")
    args = ap.parse_args()
    configure_threads()
    from lmedit.core import layout

    if any(s.startswith("chunk_requests=") for s in args.sets):
        raise SystemExit("--set chunk_requests: each layout sets its own chunk (64 and --n)")
    model, tok, requests, overrides, cuda = warmed_up(args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs, targets = [], {}
    for _ in range(args.repeats):
        for name, pass_tokens in LAYOUTS.items():
            layout.PASS_TOKENS = {kind: pass_tokens for kind in layout.PASS_TOKENS}
            chunk = 64 if name == "cpu" else args.n
            sync()
            t0 = time.perf_counter()
            res = lmedit.Editor(model, tok, args.method, progress=False,
                                **{**overrides, "chunk_requests": chunk}).edit(requests[: args.n])
            sync()
            runs.append({"layout": name, "wall_s": time.perf_counter() - t0, "timings": res.timings})
            targets.setdefault(name, (res.targets.delta.float().cpu(), res.targets.steps.cpu()))
            res.undo()
            print(f"{name:9s} {runs[-1]['wall_s']:7.2f} s  " +
                  "  ".join(f"{k} {v:.2f}" for k, v in res.timings.items()), flush=True)
    (a, steps_a), (b, steps_b) = targets["cpu"], targets["one pass"]
    diff = float(((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).median())
    same_steps = int((steps_a == steps_b).sum())
    print(f"target deltas, the layouts' difference / the delta's norm: median {diff:.2e}; "
          f"{same_steps} of {len(steps_a)} requests stopped at the same step")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model or "embedded", "method": args.method, "n": args.n, "overrides": overrides,
               "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "runs": runs, "delta_rel_diff_median": diff, "same_steps": same_steps, "command": " ".join(sys.argv)}
    (out / "target_layout.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
