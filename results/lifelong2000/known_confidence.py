"""Known-fact retention by how confidently the unedited model knew each fact.

Usage (from the repository root)::

    python results/lifelong2000/known_confidence.py results/lifelong2000/rerun.json results/lifelong2000/l5k.json

Every run of ``benchmarks/lifelong.py`` keeps its known facts (``state["known"]``) and, per
evaluation, which of them the edited model still answered (``known_ok``). This scores the facts
on the unedited embedded model once (the answer's lowest token probability, teacher forced: a
proxy for how close the argmax test the retention metric applies is to failing) and splits the
facts into thirds by it, so one sees whether the facts lost are the ones the model barely knew.
Last, for each pair of runs, how many facts both lost at their last evaluation.
"""

from __future__ import annotations

import json
import sys

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.scoring import score_continuations


def main(paths: list[str]) -> None:
    configure_threads()
    runs = [json.loads(open(p).read()) for p in paths]
    known = runs[0]["known"]
    for r, p in zip(runs, paths):
        if r["known"]["prompts"] != known["prompts"]:
            raise SystemExit(f"{p} measured other known facts than {paths[0]}")
    model, tok = lmedit.load_model()
    lowest = [float(lp.min().exp()) for lp, _ in score_continuations(model, tok, known["prompts"], known["answers"])]
    order = sorted(range(len(lowest)), key=lowest.__getitem__)
    thirds = [order[i * len(order) // 3:(i + 1) * len(order) // 3] for i in range(3)]
    head = "| run | edits | all | " + " | ".join(
        f"p in [{lowest[t[0]]:.2f}, {lowest[t[-1]]:.2f}] (n={len(t)})" for t in thirds) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in runs:
        for row in r["rows"]:
            ok = row.get("known_ok")
            if ok is None:
                continue
            cells = [100.0 * sum(ok[i] for i in t) / len(t) for t in thirds]
            print(f"| {r['method']} | {row['edits']} | {100.0 * sum(ok) / len(ok):.1f} | "
                  + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lost = {}
    for r in runs:
        last = [row for row in r["rows"] if row.get("known_ok") is not None][-1]
        lost[f"{r['method']}@{last['edits']}"] = {i for i, ok in enumerate(last["known_ok"]) if not ok}
    names = list(lost)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            x, y = lost[names[a]], lost[names[b]]
            print(f"lost by {names[a]}: {len(x)}, by {names[b]}: {len(y)}, by both: {len(x & y)}")


if __name__ == "__main__":
    main(sys.argv[1:])
