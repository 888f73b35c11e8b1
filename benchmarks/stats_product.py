"""Could the statistics' k^T k run as a bfloat16 matmul? Its error and speed against float32.

Usage::

    python benchmarks/stats_product.py [--paragraphs 60] [--block 1024] [--out benchmarks/results/stats_product.json]

The statistics pass of a bf16 forward gives keys that are exact in bfloat16, so a bf16 x bf16
product with float32 output would be exact and about twice as fast; torch on CPU has no such
product (``torch.mm(..., out_dtype=torch.float32)`` is not implemented there), and a bf16 matmul
rounds its output to bfloat16. This measures what that rounding costs when the products are taken
over blocks of ``--block`` tokens and summed in float64: relative Frobenius error of C against a
float64 product of the same keys (the float32 product's error beside it), the median relative
change of the smallest 10 % of eigenvalues, and the time of both products (float32: lmedit's
``gram``; bf16: ``gram`` per block plus the float64 sum), embedded model, layers 4 and 8.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import write_json
from lmedit._runtime import configure_threads
from lmedit.core import stats as st
from lmedit.core.corpus import load_corpus
from lmedit.core.tokens import pad, pad_id
from lmedit.hooks import Trace
from lmedit.models.precision import working_copy

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paragraphs", type=int, default=60)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stats_product.json"))
    args = ap.parse_args()
    threads = configure_threads()
    model, tok = lmedit.load_model()
    adapter = lmedit.get_adapter(model)
    enc = tok(load_corpus("wikipedia-excerpt", args.paragraphs), truncation=True, max_length=1024)["input_ids"]
    layers = [4, 8]
    sums = {name: {l: 0 for l in layers} for name in ("f32", "bf16", "f64")}
    secs = {"f32": 0.0, "bf16": 0.0}
    tokens = 0

    def bf16_product(k):
        out = None
        for s in range(0, k.shape[0], args.block):
            p = st.gram(k[s:s + args.block]).double()
            out = p if out is None else out + p
        return out

    with working_copy(model, "bfloat16") as work, torch.no_grad():
        mods = {str(l): adapter.edit_module(work, l) for l in layers}
        for group in st.token_chunks([len(x) for x in enc], 8192):
            ids, mask = pad([enc[j] for j in group], pad_id(tok))
            with Trace(mods, capture="input", stop=True) as tr:
                work(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += int(mask.sum())
            for name, x in tr.inputs.items():
                k = x[mask.bool()]
                t = time.perf_counter()
                a = st.gram(k.float()).double()
                secs["f32"] += time.perf_counter() - t
                t = time.perf_counter()
                b = bf16_product(k)
                secs["bf16"] += time.perf_counter() - t
                l = int(name)
                sums["f32"][l] = sums["f32"][l] + a
                sums["bf16"][l] = sums["bf16"][l] + b
                sums["f64"][l] = sums["f64"][l] + k.double().T @ k.double()
    res = {"threads": threads, "tokens": tokens, "block": args.block, "seconds": secs,
           "speedup": secs["f32"] / secs["bf16"], "layers": {}}
    for l in layers:
        ref = sums["f64"][l]
        ev = torch.linalg.eigvalsh(ref)
        evb = torch.linalg.eigvalsh(sums["bf16"][l])
        m = max(1, len(ev) // 10)
        res["layers"][l] = {"rel_err_f32": float((sums["f32"][l] - ref).norm() / ref.norm()),
                            "rel_err_bf16": float((sums["bf16"][l] - ref).norm() / ref.norm()),
                            "small_eig_change_bf16": float(((evb[:m] - ev[:m]).abs() / ev[:m]).median())}
        r = res["layers"][l]
        print(f"layer {l}: relative error of C, float32 product {r['rel_err_f32']:.1e}, bf16 product "
              f"{r['rel_err_bf16']:.1e}; smallest eigenvalues move {r['small_eig_change_bf16']:.1e} (median)")
    print(f"{tokens} tokens, {threads} threads: float32 product {secs['f32']:.2f} s, bf16 in blocks of {args.block} "
          f"{secs['bf16']:.2f} s (x{res['speedup']:.2f})")
    print(f"wrote {write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
