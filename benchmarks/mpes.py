"""Most-probable early stopping (MPES) as a speed lever: target-vector time and steps in one run.

Usage::

    python benchmarks/mpes.py [--n 32] [--method emmet] [--arms "early_stop=loss;early_stop=most_probable"]
        [--out results/mpes] [--name speed.json] [--step-cost 1,4,16,64]

Optimises the target vectors of the first ``--n`` CounterFact records (counterfact_500.json) with
the method's preset on the embedded model, once with the loss stop and once with MPES
(``early_stop="most_probable"``), alternating the order over two rounds so that a noisy machine
affects both alike (``--arms`` compares any settings the same way, e.g. the learning rate); reports
seconds per request, mean steps and the final probability of target_new
(teacher forced on the optimisation prompts). Edit quality with each stop on 256 records:
``results/run_mpes.sh``. Writes OUT/speed.json.

Why the time saved is less than the steps saved: ``--step-cost A1,A2,...`` also times one step
(forward, backward, Adam: the difference between 6 steps and 1 with no early stop) of A requests
each, in the last arm's settings, and estimates each arm's time from its requests' step counts as
if a step cost what it costs at its number of active requests (interpolated).
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
    ap.add_argument("--chunk", type=int, default=64, help="requests per chunk in the model of --step-cost "
                    "(compute_targets' default on a CPU)")
    ap.add_argument("--step-cost", default="", metavar="A1,A2,...",
                    help="also time one step at these numbers of active requests (see the module's text)")
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
                             "mean_target_prob": float(tr.target_prob.mean()), "steps": tr.steps.tolist()})
            print(arm, got[arm][-1], flush=True)
    summary = {}
    for arm, runs in got.items():
        summary[arm] = {"s_per_request": sum(r["seconds"] for r in runs) / (len(runs) * len(reqs)),
                        "mean_steps": runs[0]["mean_steps"], "mean_target_prob": runs[0]["mean_target_prob"]}
    first, last = list(arms)[0], list(arms)[-1]
    summary["time_saved"] = 1 - summary[last]["s_per_request"] / summary[first]["s_per_request"]
    summary["steps_saved"] = 1 - summary[last]["mean_steps"] / summary[first]["mean_steps"]
    if args.step_cost:
        sizes = sorted({int(a) for a in args.step_cost.split(",")})
        cost = step_costs(model, tok, args.method, arms[last], reqs, sizes)
        summary["step_cost_s"] = cost
        for arm in arms:  # each arm's steps, costed at the number of requests still active at each step
            summary[arm]["modelled_s_per_request"] = modelled(got[arm][0]["steps"], cost, args.chunk) / len(reqs)
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.name).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "code": code_version(),
                                                "threads": threads,
                                                "n": len(reqs), "method": args.method, "runs": got,
                                                "summary": summary}, indent=1))
    return 0


def code_version() -> str:
    """The commit the benchmark ran from, with "+changes" if the work tree differed from it."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lmedit", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + ("+changes" if dirty else "")


def step_costs(model, tok, method: str, arm: dict, reqs, sizes: list[int]) -> dict[int, float]:
    """Seconds of one step at A active requests: the time of 6 steps minus that of 1, over 5, with no
    early stop (every request runs every step), the chunk of A requests' one-off costs cancelling;
    each the faster of two runs."""
    out = {}
    for a in sizes:
        sub = (reqs * (a // len(reqs) + 1))[:a]
        t = {1: float("inf"), 6: float("inf")}
        for k in (1, 6, 1, 6):
            ed = lmedit.Editor(model, tok, method, **{**arm, "early_stop": "loss", "early_stop_loss": 0.0,
                                                      "v_num_grad_steps": k})
            hp, flat = ed.hparams, [x for g in ed.template_groups() for x in g]
            start = time.perf_counter()
            with working_copy(model, hp.compute_dtype) as work:
                compute_targets(work, tok, ed.adapter, sub, flat, hp.layers[-1], hp, anchor=hp.site)
            t[k] = min(t[k], time.perf_counter() - start)
        out[a] = (t[6] - t[1]) / 5
        print(f"one step at {a} active requests: {out[a]:.3f} s", flush=True)
    return out


def modelled(steps: list[int], cost: dict[int, float], chunk: int) -> float:
    """Seconds the steps would take, each chunk of ``chunk`` requests in turn, a step costed at its
    number of active requests (linear between the measured sizes, proportional beyond the largest,
    that of the smallest below it). Steps only: no per-chunk costs (layout, prefix pass), and each
    chunk's last iteration, which has no backward, costed as a full step; not the same quantity as
    ``s_per_request``."""
    total = 0.0
    for c in range(0, len(steps), chunk):
        part = steps[c:c + chunk]
        total += sum(step_cost_at(sum(s > t for s in part), cost) for t in range(max(part)))
    return total


def step_cost_at(a: int, cost: dict[int, float]) -> float:
    """Seconds of one step with ``a`` active requests: linear between the measured sizes of ``cost``,
    proportional beyond the largest, and the smallest size's cost below that size."""
    sizes = sorted(cost)
    if a >= sizes[-1]:
        return cost[sizes[-1]] * a / sizes[-1]
    hi = next(s for s in sizes if s >= a)
    lo = max([s for s in sizes if s <= a], default=hi)
    return cost[lo] if hi == lo else cost[lo] + (cost[hi] - cost[lo]) * (a - lo) / (hi - lo)


if __name__ == "__main__":
    sys.exit(main())
