"""Choose each method's preservation weight / ridge on held-out records (not the evaluation set).

Usage::

    python benchmarks/tune.py --data ../shared/data/counterfact/counterfact_500.json --records 400:500 \\
        --grid memit:mom2_update_weight=150,500,1500,5000,15000 --grid emmet:emmet_lambda=0.001,0.01,0.1,1,10 \\
        --out results/tuning
    python benchmarks/tune.py --model qwen2.5-1.5b --dtype bfloat16 --records 400:432 --set layers=[4,5,6,7,8] \
        --grid memit:mom2_update_weight=1500,15000 --out results/tuning/qwen2.5-1.5b

The records are edited as one batch per grid point, each from the unedited model. The target
vectors do not depend on lambda or the ridge, so they are optimised once and reused for every grid
point of a method (``Editor.edit(targets=...)``); only keys, solves and the evaluation are repeated. The chosen
value maximises the Score (harmonic mean of ES, PS, NS) on these records; differences below 0.1
point are ties, broken by NS, then PM, then in favour of the preset's value. Writes ``<out>/tuning.json`` and ``<out>/tuning.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lmedit
from lmedit._runtime import configure_threads
from lmedit.evaluate.experiment import METRIC_KEYS
from lmedit.evaluate.runner import evaluate_requests
from lmedit.cli import parse_value



def parse_grid(text: str) -> tuple[str, str, list]:
    """``"memit:mom2_update_weight=150,1500"`` -> ("memit", "mom2_update_weight", [150, 1500])."""
    try:
        method, rest = text.split(":", 1)
        key, values = rest.split("=", 1)
    except ValueError:
        raise SystemExit(f"--grid {text!r}: expected METHOD:KEY=V1,V2,...") from None
    return method, key, [parse_value(v) for v in values.split(",")]


def choose(rows: list[dict], grids: list[tuple[str, str, list]], preset_values: dict[str, object]) -> dict[str, dict]:
    """Per method, the grid value with the best Score; differences below the tables' precision (0.1)
    are ties, broken by NS, then PM, then in favour of the preset's value, then the first listed."""
    chosen = {}
    for method, key, _ in grids:
        cand = [r for r in rows if r["method"] == method and r["param"] == key]
        best = max(cand, key=lambda r: (round(r["score"], 1), round(r["neighborhood_score"], 1),
                                        round(r["paraphrase_magnitude"], 1), r["value"] == preset_values[method]))
        ties = [r["value"] for r in cand if round(r["score"], 1) == round(best["score"], 1)]
        chosen[method] = {key: best["value"], "score": best["score"], "tied_values": ties}
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact_500.json")
    ap.add_argument("--records", default="400:500", help="slice START:STOP of the file's records")
    ap.add_argument("--grid", action="append", required=True, help="METHOD:KEY=V1,V2,... (repeatable)")
    ap.add_argument("--model", default=None, help="a named model, .gguf or HF directory (default: the embedded one)")
    ap.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: as load_model loads it)")
    ap.add_argument("--preset", default=None, help="hyperparameter preset (default: matched; none: generic settings)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides every grid point shares (e.g. layers=[4,5,6,7,8])")
    ap.add_argument("--out", default="results/tuning")
    args = ap.parse_args()
    common = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.sets)}
    configure_threads()
    start, stop = (int(x) for x in args.records.split(":"))
    model, tok = lmedit.load_model(args.model, dtype=args.dtype)
    reqs = lmedit.load_requests(args.data)[start:stop]
    grids = [parse_grid(g) for g in args.grid]
    t_all = time.perf_counter()
    pre = evaluate_requests(model, tok, reqs)
    print(f"unedited: ES {pre['efficacy_score']:.1f} PS {pre['paraphrase_score']:.1f} NS {pre['neighborhood_score']:.1f}",
          flush=True)
    rows = []
    for method, key, values in grids:
        editor = lmedit.Editor(model, tok, method, preset=args.preset, **common)  # one per method: its targets serve every grid point
        cached = None
        for v in values:
            t0 = time.perf_counter()
            res = editor.edit(reqs, targets=cached, **{key: v})
            t_edit = time.perf_counter() - t0
            cached = res.targets
            m = evaluate_requests(model, tok, reqs)
            editor.undo()
            row = {"method": method, "param": key, "value": v, **{k: m[k] for k in METRIC_KEYS}, "edit_s": t_edit,
                   "eval_s": m["eval_s"], "targets_s": res.timings.get("targets_s", 0.0)}
            rows.append(row)
            print(f"{method:6s} {key}={v:<10g} ES {row['efficacy_score']:5.1f} PS {row['paraphrase_score']:5.1f} "
                  f"NS {row['neighborhood_score']:5.1f} Score {row['score']:5.1f}  edit {t_edit:.0f} s", flush=True)
    preset_values = {m: getattr(lmedit.resolve_hparams(model, m, args.preset)[1], k) for m, k, _ in grids}
    chosen = choose(rows, grids, preset_values)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model or "embedded", "dtype": args.dtype, "preset": args.preset, "common": common,
              "data": args.data, "records": args.records, "n": len(reqs), "pre": {k: pre[k] for k in METRIC_KEYS},
              "rows": rows, "chosen": chosen, "criterion": "max Score (harmonic mean of ES, PS, NS) to 0.1 point, then NS, then PM, then the preset's value; one batch",
              "preset_values": preset_values,
              "total_s": time.perf_counter() - t_all, "lmedit_version": lmedit.__version__,
              "command": "python benchmarks/tune.py " + " ".join(sys.argv[1:])}
    (out / "tuning.json").write_text(json.dumps(result, indent=1))
    lines = ["| method | setting | ES | PS | NS | Score | EM | PM | NM | chosen |", "|---|---|---|---|---|---|---|---|---|---|",
             "| unedited | | " + " | ".join(f"{pre[k]:.1f}" for k in METRIC_KEYS) + " | |"]
    for r in rows:
        c = chosen[r["method"]]
        mark = "yes" if c[r["param"]] == r["value"] else ("tie" if r["value"] in c["tied_values"] else "")
        lines.append(f"| {r['method']} | {r['param']}={r['value']:g} | " + " | ".join(f"{r[k]:.1f}" for k in METRIC_KEYS)
                     + f" | {mark} |")
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("chosen:", json.dumps(chosen))


if __name__ == "__main__":
    main()
