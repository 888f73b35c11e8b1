"""One figure comparing sequential-editing runs of ``benchmarks/sequential.py`` (one JSON per method).

Usage: ``python benchmarks/plot_sequential.py results/sequential2000/emmet.json results/sequential2000/memit.json
        --out results/sequential2000/compare.png``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="JSON files written by benchmarks/sequential.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("es_newest", "ES of the newest batch"), ("es_first", "ES of the first batch (retention)"),
              ("ns_first", "NS of the first batch"), ("fluency", "fluency (n-gram entropy, bits)"),
              ("rel_change_max", "max_l |W_l - W_l0| / |W_l0|")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.3))
    for path in args.runs:
        run = json.loads(Path(path).read_text())
        x = [r["edits"] for r in run["rows"]]
        start = {"ns_first": run["ns_first_before"], "fluency": run["fluency_before"], "rel_change_max": 0.0}
        for ax, (key, title) in zip(axes, panels):
            xs, ys = x, [r[key] for r in run["rows"]]
            if key in start:
                xs, ys = [0] + xs, [start[key]] + ys
            ax.plot(xs, ys, marker=".", label=run["method"])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("edits")
            ax.grid(alpha=0.3)
    for ax, (key, _) in zip(axes, panels):
        if key.startswith(("es", "ns")):
            ax.set_ylim(0, 102)
    axes[0].legend()
    bs = json.loads(Path(args.runs[0]).read_text())["batch_size"]
    fig.suptitle(f"sequential editing, batches of {bs}, embedded SmolLM2-135M, layers 4-8")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
