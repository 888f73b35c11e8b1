"""Would continuous batching pay? The step-cost model of ``benchmarks/mpes.py`` (each step costed at its
number of active requests) applied to a run's recorded per-request steps, with the requests optimised
in chunks of 64 (as lmedit does on a CPU), in one chunk, or continuously: a window of W requests
where each request that stops is replaced at once by the next one waiting.

Usage: ``python results/mpes/refill_model.py results/mpes/speed_encore_nochat_n100_relayout.json``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from mpes import modelled, step_cost_at  # noqa: E402


def continuous(steps: list[int], cost: dict[int, float], window: int) -> float:
    """Seconds of steps with at most ``window`` requests active, a stopped one replaced at once."""
    queue, active, total = [s for s in steps if s > 0], [], 0.0
    while queue or active:
        while queue and len(active) < window:
            active.append(queue.pop(0))
        total += step_cost_at(len(active), cost)
        active = [s - 1 for s in active if s > 1]
    return total


def main() -> int:
    data = json.loads(Path(sys.argv[1]).read_text())
    cost = {int(k): v for k, v in data["summary"]["step_cost_s"].items()}
    print(f"{sys.argv[1]}: modelled seconds per request (steps only)")
    print("| arm | chunks of 64 | one chunk | continuous, window 64 | continuous, window 32 |\n|---|---|---|---|---|")
    for arm, runs in data["runs"].items():
        steps, n = runs[0]["steps"], len(runs[0]["steps"])
        cells = [modelled(steps, cost, 64), modelled(steps, cost, n), continuous(steps, cost, 64),
                 continuous(steps, cost, 32)]
        print(f"| {arm} | " + " | ".join(f"{c / n:.3f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
