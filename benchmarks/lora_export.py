"""LoRA export on the embedded model: one batch of CounterFact edits, exported with peft's format,
loaded onto a freshly loaded base model, scored like the edited model; then truncated ranks.

Usage::

    python benchmarks/lora_export.py --data ../shared/data/counterfact/counterfact_500.json --n 64 \\
        --ranks 32,16,8 --out results/lora

Writes ``<out>/lora.json`` and ``<out>/lora.md``: CounterFact metrics of the edited model, of the
unmerged peft adapter on a fresh base model (exact rank, then each truncated rank with its
relative error), and the adapter's size against the edited weights and the whole model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.experiment import METRIC_KEYS
from lmedit.evaluate.runner import evaluate_requests


def scored(model, tok, reqs) -> dict:
    m = evaluate_requests(model, tok, reqs)
    return {k: m[k] for k in METRIC_KEYS}


def main() -> None:
    import peft

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_500.json")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--method", default="emmet")
    ap.add_argument("--ranks", default="32,16,8", help="truncated ranks to try besides the exact one")
    ap.add_argument("--out", default="results/lora")
    args = ap.parse_args()
    configure_threads()
    reqs = lmedit.load_requests(args.data, limit=args.n)
    model, tok = lmedit.load_model()
    editor = lmedit.Editor(model, tok, args.method)
    t0 = time.perf_counter()
    res = editor.edit(reqs)
    rows = [{"model": f"edited in place ({args.method})", "rank": None, "rel_error": 0.0, "edit_s": time.perf_counter() - t0,
             **scored(model, tok, reqs)}]
    print(rows[-1], flush=True)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in [None, *(int(r) for r in args.ranks.split(",") if r)]:
            path = Path(tmp) / f"lora-{rank}"
            t0 = time.perf_counter()
            report = res.save_lora(path, rank=rank)
            export_s = time.perf_counter() - t0
            base, _ = lmedit.load_model()  # a freshly loaded base model, as a server would have it
            t0 = time.perf_counter()
            served = peft.PeftModel.from_pretrained(base, str(path)).get_base_model()  # LoRA layers, unmerged
            load_s = time.perf_counter() - t0
            rows.append({"model": "peft adapter on a fresh base", "rank": max(l.rank for l in report.layers),
                         "rel_error": report.max_rel_error, "export_s": export_s, "load_s": load_s,
                         **scored(served, tok, reqs)})
            sizes[str(rank or "exact")] = report.adapter_bytes
            if rank is None:
                exact = report
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"data": args.data, "n": len(reqs), "method": args.method, "hparams": res.hparams_record(), "rows": rows,
              "adapter_bytes": sizes, "edited_weights_bytes": exact.edited_bytes, "model_bytes": whole,
              "layers": [vars(l) for l in exact.layers], "lmedit_version": lmedit.__version__, "peft_version": peft.__version__,
              "command": f"python benchmarks/lora_export.py --data {args.data} --n {args.n} --method {args.method} "
                         f"--ranks {args.ranks} --out {args.out}"}
    (out / "lora.json").write_text(json.dumps(result, indent=1))
    lines = ["| model | rank | max rel. error | " + " | ".join(METRIC_KEYS) + " |", "|---|---|---|" + "---|" * len(METRIC_KEYS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['rank'] or ''} | {r['rel_error']:.1e} | " + " | ".join(f"{r[k]:.1f}" for k in METRIC_KEYS) + " |")
    lines.append(f"\nadapter (exact rank): {sizes['exact'] / 2**20:.2f} MiB; edited matrices {exact.edited_bytes / 2**20:.1f} MiB "
                 f"({exact.edited_bytes / sizes['exact']:.1f}x); whole model {whole / 2**20:.0f} MiB ({whole / sizes['exact']:.0f}x)")
    (out / "lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
