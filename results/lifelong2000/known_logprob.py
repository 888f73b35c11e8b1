"""The known facts' answers, graded: mean token log-probability on the unedited model and after a
run's ledger, for runs whose ledgers are still on this machine.

Usage (from the repository root)::

    python results/lifelong2000/known_logprob.py results/lifelong2000/rerun.json results/lifelong2000/l5k.json ...

Each results file of ``benchmarks/lifelong.py`` keeps its known facts (``state["known"]``); its
ledger (``results/lifelong2000/ledgers/LABEL``, not committed) replays onto a freshly loaded base
model. Prints, per run and in total, the facts' mean answer-token log-probability before and after,
the share still answered (as the run measured it) and how the log-probability fell for facts kept
and for facts lost. Retention counts flips; most facts this model knows, it knows barely, so a
graded measure tells a small shift from a large one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.retention import answer_scores


def main(paths: list[str]) -> None:
    configure_threads()
    print("| run | edits | known kept % | mean log p, unedited | after | kept facts: change | lost facts: change |")
    print("|---|---|---|---|---|---|---|")
    for p in map(Path, paths):
        state = json.loads(p.read_text())
        ledger = p.parent / "ledgers" / state["method"]
        model, tok = lmedit.load_model()
        known = state["known"]
        _, before = answer_scores(model, tok, known["prompts"], known["answers"])
        editor = lmedit.Editor.load(model, tok, ledger, progress=False)
        ok, after = answer_scores(model, tok, known["prompts"], known["answers"])
        kept = [a - b for a, b, o in zip(after, before, ok) if o]
        lost = [a - b for a, b, o in zip(after, before, ok) if not o]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        print(f"| {state['method']} | {editor.ledger.n_requests} | {100 * sum(ok) / len(ok):.1f} | {mean(before):.3f} "
              f"| {mean(after):.3f} | {mean(kept):+.3f} (n={len(kept)}) | {mean(lost):+.3f} (n={len(lost)}) |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
