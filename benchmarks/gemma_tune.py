"""Choosing the gemma-3-270m preset's clamp and MEMIT lambda on held-out records.

Usage::

    python benchmarks/gemma_tune.py emmet '[{"clamp_norm_factor": 0.75}, {"clamp_norm_factor": 2.0}, {"clamp_norm_factor": 4.0}]'
    python benchmarks/gemma_tune.py memit '[{"mom2_update_weight": 1}, {"mom2_update_weight": 15}, {"mom2_update_weight": 150}]'
    python benchmarks/gemma_tune.py emmet '[{}, {"early_stop": "most_probable"}]' --preset

Gemma-3-270M (``make models``), the 16 held-out records of ``benchmarks/gemma_postnorm.py``
(counterfact_train_10000.json from record 5,000), one batch edited at layer 5 alone with the target at
that layer's MLP output (``distribution="single"``, ``target_site="mlp"``), generic settings plus each
grid point's overrides (clamp 0.75 unless given); prints ES / PS / NS, the mean log-prob of
target_new after the edit, the update's norm, the target optimisation's seconds and mean steps per
grid point (each from the unedited model). ``--preset``: the model's preset plus each point instead.
"""

from __future__ import annotations

import json
import sys

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.runner import evaluate_requests

from gemma_postnorm import DATA, mean_lp  # noqa: E402  (benchmarks/ is on sys.path when this script runs)


def main() -> int:
    method, grid = sys.argv[1], json.loads(sys.argv[2])
    use_preset = "--preset" in sys.argv[3:]  # the gemma-3-270m preset plus each point, instead of generic settings
    configure_threads()
    model, tok = lmedit.load_model("gemma-3-270m")
    reqs = lmedit.load_requests(DATA)[5000:5016]
    common = dict(chat_prompts="off", mom2_n_samples=2000, mom2_forward_dtype="auto", compute_dtype="auto",
                  layers=[5], distribution="single", target_site="mlp")
    for point in grid:
        editor = (lmedit.Editor(model, tok, method, **point) if use_preset
                  else lmedit.Editor(model, tok, method, preset="none", **{**common, **point}))
        res = editor.edit(reqs)
        post = evaluate_requests(model, tok, reqs)
        print(json.dumps({"method": method, **point,
                          **{k: round(post[k], 1) for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")},
                          "mean_logprob_target_new": round(mean_lp(model, tok, reqs), 3),
                          "update_norm": round(res.layer_info[0][5]["update_norm"], 2),
                          "targets_s": round(res.timings.get("targets_s", 0.0), 1),
                          "mean_steps": round(float(res.targets.steps.float().mean()), 1)}), flush=True)
        res.undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
