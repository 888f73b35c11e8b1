"""How far the keys of a lifelong run's earlier edits move as later batches edit the layers below.

Usage::

    python benchmarks/key_drift.py results/lifelong_frozen/ledgers/encore [--upto 20] [--probe 1] [--out F.json]

Applies the first ``--upto`` batches of the ledger to the base model, reads the keys of batch
``--probe``'s facts again (the method's template groups), and compares them per edited layer with the
keys stored when that batch was edited (what ``preserve_edits`` keeps preserving):
- ``drift``: mean ||k_now - k_then|| / ||k_then||, and ``cos`` their mean cosine;
- ``wrote``: mean ||dW_probe k_then||, what the probe batch's update wrote at its keys;
- ``moved_at_stored``: mean ||(W_now - W_after_probe) k_then||, how much later batches changed the
  output at the stored keys (what the preserved sum sees), and ``moved_at_current``:
  mean ||W_now k_now - W_after_probe k_then||, how much the output the model now reads has changed.
Where ``moved_at_current`` far exceeds ``moved_at_stored``, the stored keys no longer protect the edit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lmedit._fs import write_json
from lmedit.core.keys import collect_keys
from lmedit.editor import Editor
from lmedit.ledger import Ledger
from lmedit.methods import get_method
from lmedit.models.loading import load_model
from lmedit.requests import EditRequest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ledger")
    ap.add_argument("--upto", type=int, default=20, help="batches applied (the state whose keys are read)")
    ap.add_argument("--probe", type=int, default=1, help="the batch (1-based) whose facts' keys are read again")
    ap.add_argument("--model", default=None, help="the ledger's base model (default: the embedded one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ledger = Ledger.open(args.ledger)
    if not 1 <= args.probe <= args.upto <= len(ledger.batches):
        ap.error(f"need 1 <= --probe <= --upto <= {len(ledger.batches)} (the ledger's batches)")
    model, tok = load_model(args.model)
    meta = ledger.batches[args.probe - 1]
    hp = {k: v for k, v in meta["hparams"].items() if k not in ("preset", "chunk_requests")}
    ed = Editor(model, tok, meta["method"], hparams=get_method(meta["method"]).hparams_cls.from_dict(hp))
    ledger.check_base(model, ed.adapter, ed.base_fingerprint)
    layers = list(ed.hparams.layers)
    W0 = {l: ed.adapter.weight(model, l).detach().double().clone() for l in layers}
    total, after_probe, probe = {l: torch.zeros_like(W0[l]) for l in layers}, None, None
    for i in range(args.upto):
        rec = ledger.read_batch(i)
        for l in layers:
            total[l] += rec.deltas[l].double()
        if i == args.probe - 1:
            after_probe, probe = {l: W0[l] + total[l] for l in layers}, rec
    with torch.no_grad():
        for l in layers:
            ed.adapter.weight(model, l).copy_((W0[l] + total[l]).to(ed.adapter.weight(model, l).dtype))
        reqs = [EditRequest.from_dict(r) for r in probe.requests]
        now = collect_keys(model, tok, ed.adapter, reqs, ed.template_groups(), layers)
    rows = []
    print(f"{args.ledger}: keys of batch {args.probe}'s {len(reqs)} facts after {args.upto} batches "
          f"({sum(b['n_requests'] for b in ledger.batches[:args.upto])} edits)")
    print("| layer | drift | cos | wrote | moved at stored keys | moved at current keys |\n|---|---|---|---|---|---|")
    for l in layers:
        k0, k1 = probe.keys[l].double(), now[l].double()
        W = W0[l] + total[l]
        row = {"layer": l,
               "drift": float(((k1 - k0).norm(dim=1) / k0.norm(dim=1)).mean()),
               "cos": float(torch.nn.functional.cosine_similarity(k0, k1, dim=1).mean()),
               "wrote": float(((after_probe[l] - W0[l]) @ k0.T).norm(dim=0).mean()),
               "moved_at_stored": float(((W - after_probe[l]) @ k0.T).norm(dim=0).mean()),
               "moved_at_current": float((W @ k1.T - after_probe[l] @ k0.T).norm(dim=0).mean())}
        rows.append(row)
        print(f"| {l} | {row['drift']:.3f} | {row['cos']:.3f} | {row['wrote']:.2f} | {row['moved_at_stored']:.2f} "
              f"| {row['moved_at_current']:.2f} |")
    if args.out:
        write_json(args.out, {"ledger": str(args.ledger), "upto": args.upto, "probe": args.probe, "rows": rows,
                              "command": "python benchmarks/key_drift.py " + " ".join(sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
