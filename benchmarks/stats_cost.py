"""Cost of the statistics pass against its floor (issue 14): one run, three timings.

Usage: ``python benchmarks/stats_cost.py [--samples 2000] [--threads N]``

On the embedded model, layers 4-8, bf16 forward: the statistics pass with the blocked symmetric
k^T k (``lmedit.core.stats.gram``), the same pass with the full product, and a plain forward
through the same layers (the floor), each over the same texts; prints the ratios to the floor.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmedit  # noqa: E402
from lmedit.core import stats as st  # noqa: E402
from lmedit.models.adapters import get_adapter  # noqa: E402
from run import bench_statistics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from lmedit._runtime import configure_threads

        configure_threads()
    model, tok = lmedit.load_model()
    adapter = get_adapter(model)
    opts = types.SimpleNamespace(stats_samples=args.samples, stats_dtype="bfloat16")
    rows: list = []
    blocked = bench_statistics(model, tok, adapter, opts, [4, 5, 6, 7, 8], rows)
    real = st.gram
    st.gram = lambda k, blocks=None: real(k, 1)
    try:
        full = bench_statistics(model, tok, adapter, opts, [4, 5, 6, 7, 8], rows)
    finally:
        st.gram = real
    print(f"threads {torch.get_num_threads()}, {blocked['tokens']:,} tokens, layers 4-8, bf16 forward")
    for name, r in (("blocked k^T k", blocked), ("full k^T k", full)):
        print(f"{name:14s} {r['seconds']:6.1f} s, plain forward {r['floor_forward_s']:6.1f} s: "
              f"{r['seconds'] / r['floor_forward_s']:.2f}x the floor")


if __name__ == "__main__":
    main()
