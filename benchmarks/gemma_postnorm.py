"""Do edits land on Gemma 3, whose blocks normalise the MLP output (post_feedforward_layernorm)?

Usage: ``python benchmarks/gemma_postnorm.py --n 16 --out results/gemma_postnorm``

Gemma-3-270M (``make models``), the first N records of ``counterfact_train_10000.json`` from
record 5,000 (held out from the evaluation records of results/), EMMET over layers 3-7 and ROME at
layer 5, statistics over 2,000 excerpt paragraphs (bf16 forward), plain prompts. Variants:

* ``emmet``: lmedit's gemma3_text adapter. EMMET's targets are residual-stream vectors; each
  layer's share is written into the projection's output as if it were added to the residual (what
  a hand-registered llama-like adapter does too);
* ``emmet-through-norm``: the same, but each share converted through the norm first
  (``ModelAdapter.output_change``: the change of the projection's output the norm turns into the
  share, to first order), which lmedit applies only to targets optimised at the MLP output;
* ``emmet-mlp-site``: EMMET with its targets optimised where the last layer's edit is written, at
  its MLP output before the norm (``target_site="mlp"``), so the
  target is reachable; each layer's share of the residual still missing is converted through its
  norm;
* ``emmet-single-mlp``, ``memit-single-mlp``: the ``gemma-3-270m`` preset: layer 5 alone (one
  layer, the whole batch), the targets at that layer's MLP output as ROME's (clamp 2.0; MEMIT's
  lambda 15);
* ``rome``: ROME (the preset: layer 5) with its v* optimised at the MLP output before the norm,
  and converted.

Reports per variant: mean log-prob per token of target_new on the edited prompts after the edit,
ES / PS / NS (CounterFact), the target optimisation's own probability and per-layer diagnostics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lmedit
from lmedit.evaluate.runner import evaluate_requests
from lmedit.evaluate.scoring import score_continuations

DATA = "../shared/data/counterfact/counterfact_train_10000.json"


def mean_lp(model, tok, reqs) -> float:
    got = score_continuations(model, tok, [r.text for r in reqs], [r.target_new for r in reqs])
    return float(sum(float(lp.mean()) for lp, _ in got) / len(got))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--variants", default="emmet,emmet-through-norm,emmet-mlp-site,emmet-single-mlp,memit-single-mlp,rome")
    ap.add_argument("--out", default="results/gemma_postnorm")
    args = ap.parse_args()
    from lmedit._runtime import configure_threads

    configure_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = lmedit.load_model("gemma-3-270m")
    reqs = lmedit.load_requests(DATA)[5000:5000 + args.n]
    pre = evaluate_requests(model, tok, reqs)
    base = {"mean_logprob_target_new": mean_lp(model, tok, reqs), **{k: pre[k] for k in
            ("efficacy_score", "paraphrase_score", "neighborhood_score")}}
    print("unedited", json.dumps(base))
    common = dict(chat_prompts="off", mom2_n_samples=2000, mom2_forward_dtype="auto", compute_dtype="auto")
    for variant in args.variants.split(","):
        cell = out / f"{variant}.json"
        if cell.exists():
            print(variant, cell.read_text())
            continue
        method = variant.split("-")[0]
        if variant.endswith("single-mlp") or variant == "rome":  # the gemma-3-270m preset (one layer, MLP-output site)
            editor = lmedit.Editor(model, tok, method, preset="gemma-3-270m")
        else:  # generic settings over layers 3-7
            site = "mlp" if variant.endswith("mlp-site") else "block"
            editor = lmedit.Editor(model, tok, method, preset="none", layers=[3, 4, 5, 6, 7], target_site=site, **common)
        layers = list(editor.hparams.layers)
        from lmedit.core.distribute import Pieces

        real = Pieces._through_norm
        if variant == "emmet-through-norm":
            Pieces._through_norm = lambda self: True
        try:
            res = editor.edit(reqs)
        finally:
            Pieces._through_norm = real
        post = evaluate_requests(model, tok, reqs)
        row = {"variant": variant, "method": method, "layers": layers,
               "mean_logprob_target_new": mean_lp(model, tok, reqs),
               **{k: post[k] for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score")},
               "target_prob_mean": float(res.targets.target_prob.mean()), "timings": res.timings,
               "layer_info": res.layer_info,
               "unedited": base}
        res.undo()
        cell.write_text(json.dumps(row, indent=1))
        print(variant, json.dumps({k: v for k, v in row.items() if k not in ("timings", "unedited")}), flush=True)


if __name__ == "__main__":
    main()
