"""The known facts' answers, graded: mean token log-probability on the unedited model and after a
run's ledger, for runs whose ledgers are still on this machine.

Usage (from the repository root)::

    python results/lifelong2000/known_logprob.py results/lifelong2000/rerun.json \\
        results/lifelong2000/l5k.json ...

Each results file of ``benchmarks/lifelong.py`` keeps its known facts (``state["known"]``); its
ledger (``results/lifelong2000/ledgers/LABEL``, not committed) replays onto a freshly loaded base
model. Prints, per run and in total, the facts' mean answer-token log-probability before and after,
the share still answered (as the run measured it) and how the log-probability fell for facts kept
and for facts lost, and what the lost facts answer now (how many give the new target of some edit
in the ledger, how many the unedited model's second choice, and the most common answers).
Retention counts flips; most facts this model knows, it knows barely, so a graded measure tells a
small shift from a large one.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.retention import answer_scores
from lmedit.evaluate.scoring import score_continuations


def main(paths: list[str]) -> None:
    configure_threads()
    answers_lost = []
    print("| run | edits | known kept % | mean log p, unedited | after | kept facts: change | lost facts: change |")
    print("|---|---|---|---|---|---|---|")
    for p in map(Path, paths):
        state = json.loads(p.read_text())
        ledger = p.parent / "ledgers" / state["method"]
        model, tok = lmedit.load_model()
        known = state["known"]
        _, before = answer_scores(model, tok, known["prompts"], known["answers"])
        runner_up = [second_choice(model, tok, q) for q in known["prompts"]]
        editor = lmedit.Editor.load(model, tok, ledger, progress=False)
        # one pass after the edits: per fact its answer tokens' log-probs, argmax flags and argmax ids
        scored = score_continuations(model, tok, known["prompts"], known["answers"], with_argmax=True)
        ok = [bool(flags.all()) for _, flags, _ in scored]  # as answer_scores reads them
        after = [float(lp.float().mean()) for lp, _, _ in scored]
        kept = [a - b for a, b, o in zip(after, before, ok) if o]
        lost = [a - b for a, b, o in zip(after, before, ok) if not o]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        # what the lost facts answer now (the greedy first answer token), against the edits' new targets
        targets = {json_r["target_new"].strip().lower() for f in sorted(ledger.glob("batch-*.json"))
                   for json_r in json.loads(f.read_text())}
        lost_ids = [(int(am[0]), r) for (_, _, am), o, r in zip(scored, ok, runner_up) if not o]
        now = [tok.decode([i]).strip().lower() for i, _ in lost_ids]
        answers_lost.append((state["method"], len(now), sum(a in targets for a in now),
                             sum(i == r for i, r in lost_ids), Counter(now).most_common(5)))
        print(f"| {state['method']} | {editor.ledger.n_requests} | {100 * sum(ok) / len(ok):.1f} | {mean(before):.3f} "
              f"| {mean(after):.3f} | {mean(kept):+.3f} (n={len(kept)}) | {mean(lost):+.3f} (n={len(lost)}) |",
              flush=True)
    print("\nLost facts: the first answer token now: how many are the new target of some edit in the ledger, how "
          "many the unedited model's second choice after the prompt")
    for label, n, hit, second, common in answers_lost:
        print(f"- {label}: {hit} of {n} answer an edited target_new, {second} the unedited runner-up; "
              f"most common: {common}")


@torch.no_grad()
def second_choice(model, tok, prompt: str) -> int:
    """The unedited model's second most probable next token after ``prompt``."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    return int(model(ids).logits[0, -1].topk(2).indices[1])


if __name__ == "__main__":
    main(sys.argv[1:])
