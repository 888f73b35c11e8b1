"""How many statistics samples a stable C needs (issue 14): C and edit quality against the sample count.

Usage::

    python benchmarks/stats_samples.py --samples 125,250,500,1000,2000,4000 --out results/stats_samples

On the embedded model with the EMMET preset (layers 4-8, bf16 forward, float64 sums; the offline
excerpt has 5,052 paragraphs): per sample count, the tokens seen, each layer's relative Frobenius
distance of C to the largest count's C, the relative change of its smallest eigenvalues (the
directions equality-constrained edits use), and ES / PS / NS / Score of one EMMET edit of 64
held-out CounterFact records (``counterfact_train_10000.json`` records 5,000-5,063), with the
same target vectors for every count (they do not depend on C). FastMEMIT's claim to test: about
10 x d_in keys (15k tokens for d_in = 1,536) suffice. Each count's result is one JSON file; a
finished count is skipped when run again (statistics are cached by lmedit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import atomic_path
from lmedit._runtime import configure_threads
from lmedit.evaluate.experiment import format_table
from lmedit.evaluate.runner import evaluate_requests

DATA = "../shared/data/counterfact/counterfact_train_10000.json"


def spectrum_change(C: torch.Tensor, ref: torch.Tensor, q: float = 0.1) -> float:
    """Median relative change of the smallest ``q`` of the eigenvalues of C against ``ref``'s."""
    a, b = torch.linalg.eigvalsh(C), torch.linalg.eigvalsh(ref)
    k = max(1, int(q * len(a)))
    return float(((a[:k] - b[:k]).abs() / b[:k].abs().clamp_min(1e-30)).median())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="125,250,500,1000,2000,4000")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", default="results/stats_samples")
    args = ap.parse_args()
    configure_threads()
    counts = sorted(int(x) for x in args.samples.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = lmedit.load_model()
    reqs = lmedit.load_requests(DATA)[5000:5000 + args.n]
    editor = lmedit.Editor(model, tok, "emmet")
    hp = editor.hparams
    ref = editor.covariances(hp.replace(mom2_n_samples=counts[-1]))
    targets = None
    for n in counts:
        cell = out / f"n{n}.json"
        if cell.exists():
            print(f"n={n}: done")
            continue
        t0 = time.perf_counter()
        C = editor.covariances(hp.replace(mom2_n_samples=n))
        stats_s = time.perf_counter() - t0
        row = {"n_samples": n, "layers": list(hp.layers), "stats_s": stats_s,
               "rel_frobenius_vs_max": {l: float((C[l] - ref[l]).norm() / ref[l].norm()) for l in hp.layers},
               "small_eig_rel_change_vs_max": {l: spectrum_change(C[l], ref[l]) for l in hp.layers}}
        from lmedit.core.corpus import load_corpus

        row["tokens"] = sum(len(x) for x in tok(load_corpus(hp.mom2_corpus, n), truncation=True,
                                                max_length=hp.mom2_max_length)["input_ids"])
        res = editor.edit(reqs, targets=targets, mom2_n_samples=n)
        targets = res.targets
        row.update({k: v for k, v in evaluate_requests(model, tok, reqs).items() if k != "eval_s"})
        row["edit_timings"] = res.timings
        res.undo()
        with atomic_path(cell) as tmp:
            tmp.write_text(json.dumps(row, indent=1))
        print(f"n={n} tokens={row['tokens']} ES {row['efficacy_score']:.1f} PS {row['paraphrase_score']:.1f} "
              f"NS {row['neighborhood_score']:.1f} S {row['score']:.1f} "
              f"dC {max(row['rel_frobenius_vs_max'].values()):.4f}", flush=True)
    rows = [json.loads((out / f"n{n}.json").read_text()) for n in counts if (out / f"n{n}.json").exists()]
    table = [{"samples": r["n_samples"], "tokens": r["tokens"], "tokens / d_in": round(r["tokens"] / 1536, 1),
              "max rel. dC": f'{max(r["rel_frobenius_vs_max"].values()):.3f}',
              "small eig. change": f'{max(r["small_eig_rel_change_vs_max"].values()):.3f}',
              "ES": r["efficacy_score"], "PS": r["paraphrase_score"], "NS": r["neighborhood_score"], "Score": r["score"]}
             for r in rows]
    (out / "table.md").write_text(format_table(table, list(table[0])) + "\n")
    print(format_table(table, list(table[0])))


if __name__ == "__main__":
    main()
