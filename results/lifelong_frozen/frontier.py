"""Edits written against known facts kept, every run of this directory at one edit count.

    python results/lifelong_frozen/frontier.py [--edits 2000]

Reads results/lifelong_frozen/METHOD.json (the frozen-target protocol: every run moves to the same
target vectors, so the rows differ by their solver and settings alone), prints a markdown table of
ES over the edited facts, first-batch ES, known facts kept, perplexity and the edited matrices'
largest relative change, and plots ES against known facts kept with issue 12's 2,000-edit goal
(ES >= 97, known facts kept >= 95 %) into frontier_EDITS.png.
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=2000)
    args = ap.parse_args()
    rows = []
    for path in sorted(HERE.glob("*.json")):
        state = json.loads(path.read_text())
        if path.stem == "unedited" or "rows" not in state:
            continue
        row = next((r for r in state["rows"] if r["edits"] == args.edits), None)
        if row is not None:
            rows.append((path.stem, row))
    rows.sort(key=lambda t: -t[1]["known_retention"])
    print(f"| run ({args.edits:,} edits) | ES all | ES first | known kept % | perplexity | max rel. change |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['all_efficacy_score']:.1f} | {r['first_efficacy_score']:.0f} | {r['known_retention']:.1f} "
              f"| {r['perplexity']:.1f} | {r['rel_change_max']:.2f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    placed: list[tuple[float, float]] = []
    for name, r in rows:
        x, y = r["known_retention"], r["all_efficacy_score"]
        ax.scatter(x, y, color="C0")
        near = sum(abs(x - px) < 6 and abs(y - py) < 4 for px, py in placed)  # stack labels of close points
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 3 - 10 * near), textcoords="offset points")
        placed.append((x, y))
    ax.add_patch(plt.Rectangle((95, 97), 5, 3, color="C2", alpha=0.4, label="issue 12's goal"))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("known facts kept (%)")
    ax.set_ylabel("efficacy over all edited facts (ES)")
    ax.set_title(f"after {args.edits:,} sequential edits (frozen targets, embedded model)", fontsize=10)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(HERE / f"frontier_{args.edits}.png", dpi=120)
    print(f"wrote {HERE / f'frontier_{args.edits}.png'}")


if __name__ == "__main__":
    main()
