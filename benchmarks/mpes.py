"""Most-probable early stopping (MPES) as a speed lever: target-vector time and steps in one run.

Usage::

    python benchmarks/mpes.py [--n 32] [--method emmet] [--arms "early_stop=loss;early_stop=most_probable"]
        [--out results/mpes] [--name speed.json]

Optimises the target vectors of the first ``--n`` CounterFact records (counterfact_500.json) with
the method's preset on the embedded model, once with the loss stop and once with MPES
(``early_stop="most_probable"``), alternating the order over two rounds so that a noisy machine
affects both alike (``--arms`` compares any settings the same way, e.g. the learning rate); reports
seconds per request, mean steps and the final probability of target_new
(teacher forced on the optimisation prompts). Edit quality with each stop on 256 records:
``results/run_mpes.sh``. Writes OUT/speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lmedit
from lmedit._runtime import configure_threads
from lmedit.cli import parse_value
from lmedit.core.targets import compute_targets
from lmedit.models.precision import working_copy

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_500.json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--method", default="emmet")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--arms", default="early_stop=loss;early_stop=most_probable",
                    help="settings compared, ';' between arms, ',' between KEY=VALUE overrides of one arm "
                         "(the first arm is the baseline), e.g. 'v_lr=0.5;v_lr=1.0'")
    ap.add_argument("--out", default=str(ROOT / "results" / "mpes"))
    ap.add_argument("--name", default="speed.json")
    args = ap.parse_args()
    threads = configure_threads()
    model, tok = lmedit.load_model()
    reqs = lmedit.load_requests(args.data)[:args.n]
    arms = {a: {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in a.split(","))} for a in args.arms.split(";")}
    got: dict[str, list[dict]] = {a: [] for a in arms}
    for order in (list(arms), list(arms)[::-1]):  # both orders, so that a noisy machine affects every arm alike
        for arm in order:
            ed = lmedit.Editor(model, tok, args.method, **arms[arm])
            hp, flat = ed.hparams, [x for g in ed.template_groups() for x in g]  # templates: cached, not timed
            t = time.perf_counter()
            with working_copy(model, hp.compute_dtype) as work:
                tr = compute_targets(work, tok, ed.adapter, reqs, flat, hp.layers[-1], hp, anchor=hp.site)
            got[arm].append({"seconds": time.perf_counter() - t, "mean_steps": float(tr.steps.float().mean()),
                             "mean_target_prob": float(tr.target_prob.mean())})
            print(arm, got[arm][-1], flush=True)
    summary = {}
    for arm, runs in got.items():
        summary[arm] = {"s_per_request": sum(r["seconds"] for r in runs) / (len(runs) * len(reqs)),
                        "mean_steps": runs[0]["mean_steps"], "mean_target_prob": runs[0]["mean_target_prob"]}
    first, last = list(arms)[0], list(arms)[-1]
    summary["time_saved"] = 1 - summary[last]["s_per_request"] / summary[first]["s_per_request"]
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.name).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "threads": threads,
                                                "n": len(reqs), "method": args.method, "runs": got,
                                                "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
