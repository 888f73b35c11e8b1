"""Where one batch's target optimisation spends its time: torch.profiler over one edit.

Usage::

    python benchmarks/target_profile.py [--model M] [--device-map cuda] [--method encore] [--n 100]
        [--data FILE] [--set KEY=VALUE ...] [--pass-tokens N] [--out DIR]

Loads the model, makes and undoes one warm-up edit of 4 other records (statistics, context templates
and kernels are then ready), and profiles an edit of the first ``--n`` records of ``--data`` on a fresh
Editor: prints the phases' times, the top operators by self time on the CPU (Python-side launch and
bookkeeping) and on the GPU, and how many GPU kernels the edit ran. On the lent H200 a batch of
100 ENCORE edits of the embedded model took 22-35 s, 93 % of it target vectors
(results/lifelong2000/gpu), before the target layout followed the device: this measured where that
went (results/gpu/target_layout). Writes OUT/target_profile.json and the
two tables as text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import lmedit
from lmedit._runtime import configure_threads

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_train_10000.json"


def batch_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a one-batch measurement (also ``benchmarks/target_layout.py``'s)."""
    ap.add_argument("--model", default=None)
    ap.add_argument("--device-map", default=None)
    ap.add_argument("--method", default="encore")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")


def warmed_up(args) -> tuple:
    """(model, tokenizer, the first --n + 4 requests, the --set overrides, whether on CUDA), after one
    warm-up edit of the last 4 requests, undone bit for bit (statistics, context templates and
    kernels are then ready, and the measured edit starts from the unedited model)."""
    from lmedit.cli import parse_value

    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.sets)}
    model, tok = lmedit.load_model(args.model, device_map=args.device_map)
    requests = lmedit.load_requests(args.data, limit=args.n + 4)
    cuda = next(model.parameters()).device.type == "cuda"
    lmedit.Editor(model, tok, args.method, progress=False, **overrides).edit(requests[args.n:]).undo()
    return model, tok, requests, overrides, cuda


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    batch_arguments(ap)
    ap.add_argument("--pass-tokens", type=int, default=None,
                    help="what one suffix pass costs in tokens when buckets are merged, on any device (default "
                         "lmedit.core.layout.PASS_TOKENS: 32 on a CPU, 100,000 on CUDA, i.e. one pass a step)")
    ap.add_argument("--out", default="results/target_profile")
    args = ap.parse_args()
    configure_threads()
    if args.pass_tokens is not None:
        from lmedit.core import layout

        layout.PASS_TOKENS = {kind: args.pass_tokens for kind in layout.PASS_TOKENS}
    model, tok, requests, overrides, cuda = warmed_up(args)
    editor = lmedit.Editor(model, tok, args.method, keep_history=False, progress=False, **overrides)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        res = editor.edit(requests[: args.n])
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    avg = prof.key_averages()
    by_cpu = avg.table(sort_by="self_cpu_time_total", row_limit=30)
    by_gpu = avg.table(sort_by="self_cuda_time_total", row_limit=30) if cuda else ""
    kernels = sum(e.count for e in avg if cuda and e.device_type.name == "CUDA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model or "embedded", "method": args.method, "n": args.n, "wall_s": wall,
               "pass_tokens": args.pass_tokens, "overrides": overrides,
               "timings": res.timings, "cuda_kernels": kernels,
               "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "self_cpu_s": sum(e.self_cpu_time_total for e in avg) / 1e6,
               "self_cuda_s": sum(getattr(e, "self_device_time_total", 0) for e in avg
                                  if e.device_type.name == "CUDA") / 1e6 if cuda else 0.0,  # kernels, counted once
               "command": " ".join(sys.argv)}
    (out / "target_profile.json").write_text(json.dumps(summary, indent=1))
    (out / "target_profile.txt").write_text(by_cpu + "\n" + by_gpu)
    print(json.dumps({k: v for k, v in summary.items() if k != "timings"}, indent=1))
    print(json.dumps(res.timings, indent=1))
    print(by_cpu)
    print(by_gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
