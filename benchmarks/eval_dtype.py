"""Evaluation speed and precision: float32 against bfloat16, and today's scoring against the old one.

Usage::

    python benchmarks/eval_dtype.py [--n 256] [--edit 64] [--ledger DIR] [--out results/eval_dtype]

On the embedded model: CounterFact metrics of ``--n`` records of counterfact_500.json before
editing, and of the edited records after one EMMET batch of the first ``--edit`` of them (or, with
``--ledger``, after replaying a lifelong ledger, on up to --n of its requests), each measured in
float32 and in bfloat16 (``evaluate_requests(dtype=...)``). Also times, on the unedited model and
the same records, the scoring lmedit had before prefix sharing (every (prompt, target) pair as its own
sequence, the continuation's last token included, batches of up to 8,192 padded tokens without a
padding bound, float32), so the speed-up is a ratio from one run. Writes OUT/eval_dtype.json and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import atomic_path
from lmedit._runtime import configure_threads
from lmedit.core.tokens import encode_continuations, pad, pad_id, token_chunks
from lmedit.evaluate.runner import evaluate_requests
from lmedit.models.adapters import get_adapter
from lmedit.requests import EditRequest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_500.json"
KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude", "paraphrase_magnitude",
        "neighborhood_magnitude", "score")


def n_prompts(reqs: list[EditRequest]) -> int:
    """(prompt, target) pairs CounterFact scoring reads: two targets per prompt."""
    return sum(2 * (1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts)) for r in reqs)


@torch.no_grad()
def old_scoring(model, tok, reqs: list[EditRequest]) -> float:
    """Seconds of the scoring pass as lmedit ran it before prefix sharing (forward and logits only)."""
    prefixes, conts = [], []
    for r in reqs:
        for p in (r.text, *r.paraphrase_prompts, *r.neighborhood_prompts):
            prefixes += [p, p]
            conts += [r.target_new, r.target_true]
    pairs = encode_continuations(tok, prefixes, conts)
    seqs = [p + c for p, c in pairs]
    adapter = get_adapter(model)
    base, unembed = adapter.decoder(model), adapter.unembed_module(model)
    t = time.perf_counter()
    for group in token_chunks([len(s) for s in seqs], 8192):
        ids, mask = pad([seqs[i] for i in group], pad_id(tok))
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = [r for r, i in enumerate(group) for _ in pairs[i][1]]
        cols = [len(pairs[i][0]) - 1 + k for i in group for k in range(len(pairs[i][1]))]
        torch.log_softmax(unembed(hidden[torch.tensor(rows), torch.tensor(cols)]).float(), -1)
    return time.perf_counter() - t


def measure(model, tok, reqs: list[EditRequest], label: str, rows: list[dict]) -> dict:
    out = {}
    for dtype in ("float32", "bfloat16"):
        evaluate_requests(model, tok, reqs[:2], dtype=dtype)  # warm-up
        m = evaluate_requests(model, tok, reqs, dtype=dtype)
        out[dtype] = {k: m[k] for k in KEYS} | {"seconds": m["eval_s"], "prompts_per_s": n_prompts(reqs) / m["eval_s"]}
    diff = {k: out["bfloat16"][k] - out["float32"][k] for k in KEYS}
    out["bf16_minus_fp32"] = diff
    rows.append({"model": label, "records": len(reqs), **{f"{d} prompts/s": out[d]["prompts_per_s"] for d in out if d != "bf16_minus_fp32"},
                 **{f"d {k}": diff[k] for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--edit", type=int, default=64, help="records edited in one EMMET batch (without --ledger)")
    ap.add_argument("--ledger", default=None, help="a lifelong ledger to replay instead of editing")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(ROOT / "results" / "eval_dtype"))
    args = ap.parse_args()
    threads = configure_threads()
    model, tok = lmedit.load_model()
    reqs = lmedit.load_requests(args.data)[:args.n]
    rows: list[dict] = []
    res: dict = {"threads": threads, "n": len(reqs), "torch": torch.__version__, "lmedit": lmedit.__version__,
                 "command": "python " + " ".join(sys.argv)}
    old_scoring(model, tok, reqs[:2])
    t_old = old_scoring(model, tok, reqs)
    res["old_scoring"] = {"seconds": t_old, "prompts_per_s": n_prompts(reqs) / t_old}
    res["unedited"] = measure(model, tok, reqs, "unedited", rows)
    if args.ledger:
        editor = lmedit.Editor.load(model, tok, args.ledger)
        edited = [EditRequest.from_dict(d) for i in range(len(editor.ledger.batches))
                  for d in editor.ledger.read_batch(i).requests][:args.n]
        label = f"ledger ({editor.ledger.n_requests} edits)"
    else:
        editor = lmedit.Editor(model, tok, "emmet")
        edited = reqs[:args.edit]
        editor.edit(edited)
        label = f"EMMET batch of {len(edited)}"
    res["edited"] = {"how": label, **measure(model, tok, edited, label, rows)}
    new = res["unedited"]["float32"]["prompts_per_s"], res["unedited"]["bfloat16"]["prompts_per_s"]
    res["speedup_vs_old"] = {"float32": new[0] / res["old_scoring"]["prompts_per_s"],
                             "bfloat16": new[1] / res["old_scoring"]["prompts_per_s"]}
    print(f"{threads} threads; old scoring (float32): {res['old_scoring']['prompts_per_s']:.1f} prompts/s; "
          f"now x{res['speedup_vs_old']['float32']:.2f} in float32, x{res['speedup_vs_old']['bfloat16']:.2f} in bfloat16")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "eval_dtype.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'eval_dtype.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
