"""Does an edit of a half-precision model reach the quality of a float32 one? (issue 6)

Usage: ``python benchmarks/dtypes.py [--method emmet] [--n 64] [--dtypes float32,bfloat16]
        [--out results/dtypes]``

For each dtype the embedded model is loaded in that dtype and edited end to end with the method's
preset (its own statistics, keys and targets; the solves run in float64 and the delta is cast
once into the weights), the first ``n`` CounterFact records as one batch. Every edited model is
then scored the same way: its weights, as stored, upcast to float32 (exact, so the score measures
the edited half-precision weights themselves). float16 works (``--dtypes float32,float16``) but
belongs on a GPU: CPUs without float16 matmuls (this one: 30x slower than float32) run the key
collection of a float16 model very slowly. Writes ``<out>/<method>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.experiment import METRIC_KEYS
from lmedit.evaluate.runner import evaluate_requests

DATA = "../shared/data/counterfact/counterfact_500.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="emmet")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="results/dtypes")
    args = ap.parse_args()
    configure_threads()
    reqs = lmedit.load_requests(args.data)[: args.n]
    rows = {}
    pre = None
    for name in args.dtypes.split(","):
        model, tok = lmedit.load_model(dtype=name)
        if pre is None:  # the unedited model, in the first dtype (float32 by default)
            pre = evaluate_requests(copy.deepcopy(model).float(), tok, reqs)
        t0 = time.perf_counter()
        res = lmedit.edit(model, tok, reqs, method=args.method)
        t_edit = time.perf_counter() - t0
        post = evaluate_requests(model.float(), tok, reqs)  # exact upcast of the edited weights
        rows[name] = {"post": {k: post[k] for k in METRIC_KEYS}, "edit_s": t_edit, "timings": res.timings,
                      "finite": all(bool(torch.isfinite(d).all()) for d in res.deltas.values())}
        print(f"{name:9s} ES {post['efficacy_score']:5.1f} PS {post['paraphrase_score']:5.1f} "
              f"NS {post['neighborhood_score']:5.1f} Score {post['score']:5.1f}  edit {t_edit:.0f} s", flush=True)
        del model, res
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"method": args.method, "n": args.n, "data": args.data, "pre": {k: pre[k] for k in METRIC_KEYS}, "rows": rows,
              "scoring": "weights as stored, upcast to float32", "lmedit_version": lmedit.__version__,
              "command": f"python benchmarks/dtypes.py --method {args.method} --n {args.n} --dtypes {args.dtypes} "
                         f"--out {args.out}"}
    (out / f"{args.method}.json").write_text(json.dumps(result, indent=1))
    lines = ["| model dtype | ES | PS | NS | Score | EM | PM | NM | edit s |", "|---|---|---|---|---|---|---|---|---|",
             f"| unedited ({args.dtypes.split(',')[0]}) | " + " | ".join(f"{pre[k]:.1f}" for k in METRIC_KEYS) + " | |"]
    lines += [f"| {n} | " + " | ".join(f"{r['post'][k]:.1f}" for k in METRIC_KEYS) + f" | {r['edit_s']:.0f} |" for n, r in rows.items()]
    (out / f"{args.method}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
