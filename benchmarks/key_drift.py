"""How far the keys of a lifelong run's earlier edits move as later batches edit the layers below.

Usage::

    python benchmarks/key_drift.py results/lifelong_frozen/ledgers/encore [--upto 20] [--probe 1] [--out F.json]

Replays the first ``--upto`` batches of the ledger on the base model (bit for bit, as ``Editor.load``
does), reads the keys of batch ``--probe``'s facts again (the ledger's context templates) and compares
them, per edited layer, with the keys stored when that batch was edited (what ``preserve_edits``
keeps preserving). W_p: the weights right after batch ``--probe``; W: after batch ``--upto``.
- ``drift``: mean ||k_now - k_then|| / ||k_then||, and ``cos`` their mean cosine;
- ``wrote``: mean ||dW_probe k_then||, what the probe batch's own update wrote at its keys;
- ``moved_at_stored``: mean ||(W - W_p) k_then||, what later batches changed at the stored keys (what
  the preserved sum holds them to);
- ``moved_at_current``: mean ||(W - W_p) k_now||, what later batches changed at the keys the model now
  reads (what a preserved sum of refreshed keys would hold them to);
- ``output_moved``: mean ||W k_now - W_p k_then||, how far the layer's output for these facts has
  moved in all, the base weights' response to the moved key included (which no preserved set removes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lmedit._fs import write_json
from lmedit.core.keys import collect_keys
from lmedit.editor import Editor, batch_hparams
from lmedit.ledger import Ledger
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
    if ledger.n_compacted:
        ap.error(f"{args.ledger} is compacted: this replays each batch's own deltas (run it on the ledger before "
                 "compacting)")
    if not 1 <= args.probe <= args.upto <= len(ledger.batches):
        ap.error(f"need 1 <= --probe <= --upto <= {len(ledger.batches)} (the ledger's batches)")
    model, tok = load_model(args.model)
    meta = ledger.batches[args.probe - 1]
    ed = Editor(model, tok, meta["method"], hparams=batch_hparams(meta), context=ledger.manifest["context"])
    ledger.check_base(model, ed.adapter, ed.base_fingerprint)
    records = [ledger.read_batch(i) for i in range(args.upto)]
    probe = records[args.probe - 1]
    layers = sorted(probe.keys)  # the layers the probe batch wrote (distribution single: the last alone)
    ed._replay(records[:args.probe])
    after_probe = {l: ed.adapter.weight(model, l).detach().double().clone() for l in layers}
    ed._replay(records[args.probe:])
    reqs = [EditRequest.from_dict(r) for r in probe.requests]
    with torch.no_grad():
        now = collect_keys(model, tok, ed.adapter, reqs, ed.template_groups(), layers)
    rows = []
    print(f"{args.ledger}: keys of batch {args.probe}'s {len(reqs)} facts after {args.upto} batches "
          f"({sum(b['n_requests'] for b in ledger.batches[:args.upto])} edits)")
    print("| layer | drift | cos | wrote | moved at stored keys | moved at current keys | output moved |\n"
          "|---|---|---|---|---|---|---|")
    for l in layers:
        k0, k1 = probe.keys[l].double(), now[l].double()
        W, Wp = ed.adapter.weight(model, l).detach().double(), after_probe[l]
        row = {"layer": l,
               "drift": float(((k1 - k0).norm(dim=1) / k0.norm(dim=1)).mean()),
               "cos": float(torch.nn.functional.cosine_similarity(k0, k1, dim=1).mean()),
               "wrote": float((probe.deltas[l].double() @ k0.T).norm(dim=0).mean()),
               "moved_at_stored": float(((W - Wp) @ k0.T).norm(dim=0).mean()),
               "moved_at_current": float(((W - Wp) @ k1.T).norm(dim=0).mean()),
               "output_moved": float((W @ k1.T - Wp @ k0.T).norm(dim=0).mean())}
        rows.append(row)
        print(f"| {l} | {row['drift']:.3f} | {row['cos']:.3f} | {row['wrote']:.2f} | {row['moved_at_stored']:.2f} "
              f"| {row['moved_at_current']:.2f} | {row['output_moved']:.2f} |")
    if args.out:
        write_json(args.out, {"ledger": str(args.ledger), "upto": args.upto, "probe": args.probe, "layers": rows,
                              "command": "python benchmarks/key_drift.py " + " ".join(sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
