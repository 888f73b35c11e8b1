"""How close evaluation and the target optimisation run to this machine's matmul peak.

Usage::

    python benchmarks/floors.py [--n 128] [--requests 3] [--out benchmarks/results/floors.json]

Issue 17 asks for >= 150 scored (prompt, target) pairs per second in float32 and < 3 s of editing for
one fact. Whether that is a question of code or of hardware is a matter of arithmetic, measured
here in one run on the embedded model:

1. **peak**: the matmul throughput (GFLOP/s) of float32 and bfloat16 products of the model's own
   shapes (2,048 rows x 576 x 1,536 and the like) with the configured threads;
2. **evaluation**: ``score_continuations`` on the pairs CounterFact scoring reads for ``--n`` records
   of counterfact_500.json (two targets per prompt), float32: pairs/s, the padded tokens that went
   through the blocks and the positions read through the head, the matmul work they imply
   (2 x block parameters per token + 2 x vocabulary x width per read position) and the share of the
   float32 peak achieved; from that, the pairs/s the same work would give at 100 % of the peak;
3. **targets, one request**: the preset's target optimisation (bfloat16 compute, the preset's
   context templates and chat rows) for each of ``--requests`` single requests: steps, seconds per
   step, the tokens resumed per step and their matmul work (forward plus the input gradient of the
   backward pass: 2 x 2 x the parameters of the blocks after the edited layer per token, the head at
   the read positions twice) against the bfloat16 peak; from that, the fewest seconds the same
   steps could take;
4. **targets, a batch** (``--batch``, 64): the matmul work of one step of the batch (counted, not
   timed) times the mean steps per request measured for such batches (``--batch-steps``), at the
   bfloat16 peak: the fewest seconds per edit the target optimisation of a batch can take here.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import write_json
from lmedit._runtime import configure_threads
from lmedit.core import targets as T
from lmedit.core.tokens import encode_continuations
from lmedit.evaluate import scoring

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_500.json"


def peak(shapes, dtype, reps: int = 20) -> float:
    """Best GFLOP/s over the given (m, k, n) products."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def block_params(model, first: int = 0) -> int:
    """Matrix parameters of blocks ``first``.. (what a token's forward pass multiplies by)."""
    blocks = lmedit.get_adapter(model).block_list(model)
    return sum(p.numel() for b in list(blocks)[first:] for p in b.parameters() if p.dim() == 2)


def evaluation(model, tok, reqs) -> dict:
    prefixes, conts = [], []
    for r in reqs:
        for group, prompts in (("rw", [r.text, *r.paraphrase_prompts]), ("nb", r.neighborhood_prompts)):
            for p in prompts:
                prefixes += [p, p]
                conts += [r.target_new, r.target_true if group == "rw" else r.neighborhood_target]
    pairs = encode_continuations(tok, prefixes, conts)
    reads = sum(len(c) for _, c in pairs)
    padded = [0]
    pad = scoring.pad

    def counting_pad(seqs, *a, **k):
        ids, mask = pad(seqs, *a, **k)
        padded[0] += ids.numel()
        return ids, mask

    scoring.score_continuations(model, tok, prefixes[:32], conts[:32])  # warm-up
    scoring.pad = counting_pad
    try:
        t = time.perf_counter()
        scoring.score_continuations(model, tok, prefixes, conts)
        dt = time.perf_counter() - t
    finally:
        scoring.pad = pad
    V, d = lmedit.get_adapter(model).unembed_module(model).weight.shape
    flop = 2 * block_params(model) * padded[0] + 2 * V * d * reads
    return {"pairs": len(pairs), "seconds": dt, "pairs_per_s": len(pairs) / dt, "padded_tokens": padded[0],
            "read_positions": reads, "gflop": flop / 1e9, "gflop_per_s": flop / dt / 1e9}


@contextlib.contextmanager
def counted_steps():
    """Counts what each target-optimisation step resumes: yields a dict that collects the tokens per
    step (``tokens``), the layer resumed after and the positions read through the head."""
    seen: dict = {"tokens": []}
    orig = T._Resumed.step

    def step(self, *a, **k):
        before = self.tokens
        out = orig(self, *a, **k)
        seen["tokens"].append(self.tokens - before)
        seen["layer"], seen["reads"] = self.layer, int(self.lay.loss_rows.numel() + self.lay.is_kl.sum())
        return out

    T._Resumed.step = step
    try:
        yield seen
    finally:
        T._Resumed.step = orig


def step_flop(model, seen: dict, tokens: int, steps: int) -> float:
    """Matmul work of ``tokens`` resumed tokens over ``steps`` steps: forward and input gradient
    through the blocks after the edited layer, the head at the read positions twice."""
    V, d = lmedit.get_adapter(model).unembed_module(model).weight.shape
    return tokens * 2 * 2 * block_params(model, seen["layer"] + 1) + steps * 2 * 2 * V * d * seen["reads"]


def targets(model, tok, reqs) -> list[dict]:
    """One request per edit with the preset's settings; the resumed tokens counted per step."""
    rows = []
    for r in reqs:
        with counted_steps() as seen:
            res = lmedit.edit(model, tok, [r], method="emmet")
        res.undo()
        tr = res.timings["targets_s"]
        n_steps = len(seen["tokens"])
        flop = step_flop(model, seen, sum(seen["tokens"]), n_steps)
        rows.append({"case_id": r.case_id, "steps": n_steps, "targets_s": tr, "s_per_step": tr / n_steps,
                     "tokens_per_step": sum(seen["tokens"]) / n_steps, "gflop": flop / 1e9,
                     "gflop_per_s": flop / tr / 1e9, "edit_s": res.timings["total_s"]})
    return rows


def batch_floor(model, tok, reqs, steps: float) -> dict:
    """The matmul work of one optimisation step of a batch of requests with the preset's settings
    (counted on one forward-only step: every request is still active at the first step), and the
    fewest seconds per edit ``steps`` such steps per request could take at the bf16 peak."""
    with counted_steps() as seen:
        lmedit.Editor(model, tok, "emmet").compute_targets(reqs, v_num_grad_steps=1)
    tokens = sum(seen["tokens"])
    flop = step_flop(model, seen, tokens, 1)
    return {"requests": len(reqs), "tokens_per_step": tokens, "gflop_per_request_step": flop / len(reqs) / 1e9,
            "steps_per_request": steps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="batch whose per-step work is counted")
    ap.add_argument("--batch-steps", type=float, default=17.05,
                    help="mean optimisation steps per request at that batch (results/target_lr: EMMET, batches "
                         "of 64, 256 records, the preset)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "floors.json"))
    args = ap.parse_args()
    threads = configure_threads()
    model, tok = lmedit.load_model()
    reqs = lmedit.load_requests(str(DATA))
    shapes = ((2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576))
    res = {"threads": threads, "torch": torch.__version__,
           "peak_gflop_per_s": {"float32": peak(shapes, torch.float32), "bfloat16": peak(shapes, torch.bfloat16)}}
    res["evaluation"] = ev = evaluation(model, tok, reqs[:args.n])
    res["targets"] = tg = targets(model, tok, reqs[:args.requests])
    p32, p16 = res["peak_gflop_per_s"]["float32"], res["peak_gflop_per_s"]["bfloat16"]
    res["batch"] = bt = batch_floor(model, tok, reqs[:args.batch], args.batch_steps)
    bt["floor_s_per_edit"] = bt["gflop_per_request_step"] * bt["steps_per_request"] / p16
    print(f"lmedit {lmedit.__version__}, torch {torch.__version__}, {threads} threads")
    print(f"matmul peak: float32 {p32:.0f} GFLOP/s, bfloat16 {p16:.0f} GFLOP/s")
    print(f"evaluation (float32): {ev['pairs_per_s']:.0f} pairs/s, {ev['gflop_per_s']:.0f} GFLOP/s = "
          f"{100 * ev['gflop_per_s'] / p32:.0f} % of peak; at 100 %: {ev['pairs_per_s'] * p32 / ev['gflop_per_s']:.0f} pairs/s")
    for t in tg:
        print(f"targets, one request ({t['case_id']}): {t['steps']} steps, {t['s_per_step']:.3f} s/step, "
              f"{t['tokens_per_step']:.0f} tokens/step, {t['gflop_per_s']:.0f} GFLOP/s = {100 * t['gflop_per_s'] / p16:.0f} % "
              f"of the bf16 peak; at 100 %: {t['gflop'] / p16:.1f} s for these steps (took {t['targets_s']:.1f} s; "
              f"edit {t['edit_s']:.1f} s)")
    print(f"targets, a batch of {bt['requests']}: {bt['tokens_per_step']} tokens per step, "
          f"{bt['gflop_per_request_step']:.1f} GFLOP per request and step; at {bt['steps_per_request']} steps per "
          f"request and 100 % of the bf16 peak: {bt['floor_s_per_edit']:.2f} s per edit for the targets alone")
    print(f"wrote {write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
