"""Does a process that goes on editing get slower, and does returning freed heap memory fix it?

Usage::

    python benchmarks/heap_trim.py [--batches 10] [--batch-size 25] [--steps 4] [--out results/heap_trim]

Two arms, each in a fresh process (the heap is per process): ``kept`` edits with the freed memory
left in the heap (``Editor.edit``'s ``release_freed_memory()`` call switched off), ``trimmed`` as
lmedit ships it. Each arm times one fixed forward + backward pass of the embedded model (16 rows of
~80 tokens; the least of 3 passes) when fresh, after ``--batches`` MEMIT edits of ``--batch-size``
CounterFact records (with the earlier edits' keys, ``--steps`` target steps: a long-running
lifelong process in miniature), and, in the ``kept`` arm, once more after
``release_freed_memory()``. Ratios within an arm are what to read; the machine is shared.
Writes OUT/heap_trim.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_train_10000.json"


def fwd_bwd(model, batch) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(**batch).logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return min(times)


def arm(name: str, args) -> dict:
    import lmedit
    import lmedit.editor
    from lmedit._runtime import configure_threads, release_freed_memory

    configure_threads()
    if name == "kept":
        lmedit.editor.release_freed_memory = lambda: False
    model, tok = lmedit.load_model()
    reqs = lmedit.load_requests(args.data, limit=args.batches * args.batch_size)
    editor = lmedit.Editor(model, tok, "memit", keep_history=False, progress=False, preserve_edits=True,
                           v_num_grad_steps=args.steps, early_stop="loss")
    batch = tok(["The quick brown fox jumps over the lazy dog and then " * 6] * 16, return_tensors="pt")
    out = {"fresh_s": fwd_bwd(model, batch), "edit_s": []}
    for i in range(0, len(reqs), args.batch_size):
        t0 = time.perf_counter()
        editor.edit(reqs[i:i + args.batch_size])
        out["edit_s"].append(time.perf_counter() - t0)
    out["after_edits_s"] = fwd_bwd(model, batch)
    if name == "kept":
        release_freed_memory()
        out["after_trim_s"] = fwd_bwd(model, batch)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--steps", type=int, default=4, help="target optimisation steps per request")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="results/heap_trim")
    ap.add_argument("--arm", choices=("kept", "trimmed"), help=argparse.SUPPRESS)  # one arm, in a child process
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args)))
        return 0
    res = {"command": " ".join(sys.argv), "arms": {}}
    for name in ("kept", "trimmed"):
        child = [sys.executable, __file__, "--arm", name, "--batches", str(args.batches), "--batch-size",
                 str(args.batch_size), "--steps", str(args.steps), "--data", args.data]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        res["arms"][name] = r
        extra = f", after release_freed_memory {r['after_trim_s']:.2f} s" if "after_trim_s" in r else ""
        print(f"{name}: forward + backward {r['fresh_s']:.2f} s fresh, {r['after_edits_s']:.2f} s after "
              f"{args.batches} edits ({r['after_edits_s'] / r['fresh_s']:.2f}x){extra}; edits {sum(r['edit_s']):.0f} s",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heap_trim.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
