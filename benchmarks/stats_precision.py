"""How much a bfloat16 statistics pass changes C: relative Frobenius difference against float32.

Usage: ``python benchmarks/stats_precision.py [--samples 200] [--layers 4,8]``
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import lmedit
from lmedit._runtime import configure_threads
from lmedit.core.stats import second_moments


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--layers", default="4,8")
    args = ap.parse_args()
    configure_threads()
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = lmedit.load_model(args.model)
    adapter = lmedit.get_adapter(model)
    with tempfile.TemporaryDirectory() as d:
        c32 = second_moments(model, tok, adapter, layers, n_samples=args.samples, forward_dtype="float32",
                             cache_dir=d, progress=False)
        c16 = second_moments(model, tok, adapter, layers, n_samples=args.samples, forward_dtype="bfloat16",
                             cache_dir=d, progress=False)
    for layer in layers:
        rel = float((c16[layer] - c32[layer]).norm() / c32[layer].norm())
        ev32 = torch.linalg.eigvalsh(c32[layer])
        ev16 = torch.linalg.eigvalsh(c16[layer])
        print(f"layer {layer}: |C_bf16 - C_fp32| / |C_fp32| = {100 * rel:.2f} %; smallest eigenvalue "
              f"{float(ev32[0]):.3e} (fp32) vs {float(ev16[0]):.3e} (bf16); largest {float(ev32[-1]):.3f} vs {float(ev16[-1]):.3f}")


if __name__ == "__main__":
    main()
