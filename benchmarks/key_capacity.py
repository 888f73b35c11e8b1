"""How much room is left in the edited layers' key space as a lifelong run goes on.

Usage::

    python benchmarks/key_capacity.py results/lifelong2000/ledgers/encore [--out results/lifelong2000/key_capacity.json]

Reads the keys every batch of a ledger stored (per edited layer, (B, d_in)) and, before each batch,
looks at the sum of all earlier batches' k k^T (what ``preserve_edits`` preserves):
- ``eff_rank``: its participation ratio tr(S)^2 / ||S||_F^2 (how many directions carry the
  preserved energy), and ``rank99``: how many eigenvectors hold 99 % of its trace;
- ``novelty``: the mean share of a new key's energy outside those ``rank99`` directions, i.e. how
  much of what the new batch writes can go where no earlier edit must be preserved.
If the layer's width capped how many facts fit, rank99 would approach d_in and novelty fall to 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lmedit._fs import read_safetensors, write_json


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ledger")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ledger = Path(args.ledger)
    manifest = json.loads((ledger / "manifest.json").read_text())
    if manifest["batches"] and "compacted" in manifest["batches"][0]:
        ap.error(f"{ledger} is compacted: this reads every batch's own file (run it on the ledger before compacting)")
    earlier: dict[int, torch.Tensor] = {}
    rows = []
    n = 0
    for batch in manifest["batches"]:
        tensors = read_safetensors(ledger / batch["tensors_file"], "ledger file")[1]
        keys = {int(k.split(".")[1]): v.double() for k, v in tensors.items() if k.startswith("keys.")}
        for layer, K in sorted(keys.items()):
            if layer in earlier:
                S = earlier[layer]
                ev, U = torch.linalg.eigh(S)
                ev, U = ev.flip(0).clamp_min(0), U.flip(1)
                share = ev.cumsum(0) / ev.sum()
                r99 = int((share < 0.99).sum()) + 1
                inside = (K @ U[:, :r99]).pow(2).sum(1)
                novelty = float((1 - inside / K.pow(2).sum(1)).mean())
                rows.append({"edits_before": n, "layer": layer, "d_in": S.shape[0],
                             "eff_rank": float(ev.sum() ** 2 / ev.pow(2).sum()), "rank99": r99, "novelty": novelty})
            earlier[layer] = earlier.get(layer, 0) + K.T @ K
        n += batch["n_requests"]
    by_n = sorted({r["edits_before"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    print(f"{ledger}: {n} edits, layers {layers}; per layer: effective rank / rank holding 99 % / novelty of the next batch")
    print("edits | " + " | ".join(f"L{l}" for l in layers))
    for e in by_n:
        if e % 500 and e != by_n[0] and e != by_n[-1]:
            continue
        cells = []
        for l in layers:
            r = next(r for r in rows if r["edits_before"] == e and r["layer"] == l)
            cells.append(f"{r['eff_rank']:.0f} / {r['rank99']} / {r['novelty']:.3f}")
        print(f"{e} | " + " | ".join(cells))
    if args.out:
        write_json(args.out, {"ledger": str(ledger), "edits": n, "rows": rows,
                              "command": "python benchmarks/key_capacity.py " + " ".join(sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
