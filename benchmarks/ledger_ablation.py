"""Which part of a long run's accumulated update costs the known facts? Ablations of a ledger.

Usage::

    python benchmarks/ledger_ablation.py --ledger results/lifelong2000/ledgers/encore \\
        --state results/lifelong2000/encore.json [--sample 200] [--out results/lifelong2000/ablation_encore.json]

Loads the embedded model, sums the ledger's deltas per layer (``Ledger.total_deltas``) and measures
the model with (a) every layer's accumulated update, (b) every layer's but one, for each edited
layer, (c) the whole update scaled by 0.5, and (d) none: efficacy / paraphrase / neighbourhood
scores (CounterFact) of a fixed sample of the edited facts (every k-th request of the ledger) and
the share of the unedited model's known facts (the list the lifelong run kept in ``--state``) it
still answers. Reading: whether the damage sits in one layer (the one taking most of the update)
or grows with the update's size as a whole.

Then, per edited layer, how hard the accumulated update dW hits three kinds of keys (the edited
projection's inputs), as the energy ratio sum ||dW k||^2 / sum ||W0 k||^2: the edited facts' keys
(stored in the ledger), the known facts' keys (the subject's last token of each kept known fact,
bare prompt) and the tokens of held-out Wikipedia paragraphs (after those the statistics read),
which is what the preserved C stands for. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import write_json
from lmedit._runtime import configure_threads
from lmedit.evaluate.retention import answered
from lmedit.evaluate.runner import evaluate_requests
from lmedit.ledger import Ledger
from lmedit.models.loading import fingerprint
from lmedit.requests import EditRequest

KNOWNS = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowns" / "known_1209.json"


@torch.no_grad()
def key_hits(model, tok, adapter, ledger: Ledger, total: dict, W0: dict, known_prompts: list[str]) -> dict:
    """{layer: {"edited" | "known" | "text": sum ||dW k||^2 / sum ||W0 k||^2}} on the unedited model."""
    from lmedit.core.corpus import load_corpus
    from lmedit.core.keys import collect_keys
    from lmedit.hooks import Trace

    layers = sorted(total)
    facts = {k["prompt"]: k for k in json.loads(KNOWNS.read_text())}
    known = [EditRequest(facts[p]["template"], facts[p]["subject"], facts[p]["attribute"]) for p in known_prompts]
    keys = {"known": collect_keys(model, tok, adapter, known, [["{}"]], layers)}
    edited: dict[int, list] = {l: [] for l in layers}
    for i in range(len(ledger.batches)):
        for l, k in ledger.read_batch(i).keys.items():
            edited[l].append(k)
    keys["edited"] = {l: torch.cat(v) for l, v in edited.items()}
    texts = load_corpus("wikipedia-excerpt", 2030)[2000:]  # after the 2,000 paragraphs of the statistics
    text_keys: dict[int, list] = {l: [] for l in layers}
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
        with Trace({str(l): adapter.edit_module(model, l) for l in layers}, capture="input") as tr:
            model(input_ids=ids, use_cache=False)
        for l in layers:
            text_keys[l].append(tr.inputs[str(l)].reshape(-1, tr.inputs[str(l)].shape[-1]))
    keys["text"] = {l: torch.cat(v) for l, v in text_keys.items()}
    out = {}
    for l in layers:
        W = W0[l].double() if adapter.layout == "out_in" else W0[l].double().T
        dW = total[l]
        out[l] = {name: float((k[l].double() @ dW.T).pow(2).sum() / (k[l].double() @ W.T).pow(2).sum())
                  for name, k in keys.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--state", required=True, help="the lifelong run's JSON (its 'known' facts)")
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    threads = configure_threads()
    model, tok = lmedit.load_model()
    adapter = lmedit.get_adapter(model)
    ledger = Ledger.open(args.ledger)
    if ledger.n_compacted:
        ap.error(f"{args.ledger} is compacted: this reads every batch's own file (run it on the ledger before compacting)")
    ledger.check_base(model, adapter, fingerprint(model, adapter))
    reqs = [EditRequest.from_dict(r) for i in range(len(ledger.batches)) for r in ledger.read_batch(i).requests]
    sample = reqs[::max(1, len(reqs) // args.sample)][:args.sample]
    known = json.loads(Path(args.state).read_text())["known"]
    total = ledger.total_deltas()
    W0 = {l: adapter.weight(model, l).detach().clone() for l in total}

    def set_update(scale: dict[int, float]) -> None:
        with torch.no_grad():
            for l, d in total.items():
                W = adapter.weight(model, l)
                d = d.to(W.dtype) if adapter.layout == "out_in" else d.T.to(W.dtype)
                W.copy_(W0[l] + scale.get(l, 0.0) * d)

    cells = [("all layers", {l: 1.0 for l in total})]
    cells += [(f"all but layer {l}", {m: 1.0 for m in total if m != l}) for l in sorted(total)]
    cells += [("all x 0.5", {l: 0.5 for l in total}), ("none (unedited)", {})]
    rows = []
    try:
        for name, scale in cells:
            t = time.perf_counter()
            set_update(scale)
            m = evaluate_requests(model, tok, sample)
            ok = answered(model, tok, known["prompts"], known["answers"])
            rows.append({"cell": name, "scale": {str(k): v for k, v in scale.items()},
                         **{k: m[k] for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")},
                         "known_retention": 100.0 * sum(ok) / len(ok), "seconds": time.perf_counter() - t})
            print(f"{name:<18} ES {m['efficacy_score']:5.1f} PS {m['paraphrase_score']:5.1f} "
                  f"NS {m['neighborhood_score']:5.1f} known kept {rows[-1]['known_retention']:5.1f} %", flush=True)
    finally:
        set_update({l: 0.0 for l in total})
    hits = key_hits(model, tok, adapter, ledger, total, W0, known["prompts"])
    for l, h in hits.items():
        print(f"layer {l}: dW energy on edited keys {h['edited']:.3f}, known-fact keys {h['known']:.3f}, "
              f"held-out text tokens {h['text']:.4f}")
    res = {"command": "python " + " ".join(sys.argv), "threads": threads, "ledger": args.ledger,
           "requests": len(reqs), "sample": len(sample), "known_facts": len(known["prompts"]),
           "update_norm": {str(l): float(d.norm()) for l, d in total.items()},
           "weight_norm": {str(l): float(W0[l].double().norm()) for l in total}, "rows": rows,
           "energy_ratio": {str(l): h for l, h in hits.items()}}
    if args.out:
        print(f"wrote {write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
