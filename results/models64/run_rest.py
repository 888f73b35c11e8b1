"""MEMIT and ROME on the 64 records of results/run_models64.sh, reusing the unedited model's metrics
that EMMET's run measured on the same records, model and evaluation settings (they do not depend on
the method; measuring them again costs about 20 minutes of generation for Gemma on this CPU).

Usage: python results/models64/run_rest.py [MODEL] [METHOD ...] [--dtype DTYPE] [--pre FILE]   (default: gemma-3-270m
memit rome; --dtype as the first run's `lmedit eval --dtype`, e.g. bfloat16 for qwen2.5-1.5b; --pre: the run whose
unedited metrics to reuse, by default models64/MODEL/emmet.json, e.g. a superseded preset's run kept beside)
"""

import argparse
import json
from pathlib import Path

import lmedit
from lmedit._fs import write_json
from lmedit._runtime import configure_threads
from lmedit.evaluate.experiment import run_eval

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_500.json"

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="gemma-3-270m")
ap.add_argument("methods", nargs="*", default=["memit", "rome"])
ap.add_argument("--dtype", default=None)
ap.add_argument("--pre", type=Path, default=None)
args = ap.parse_args()
model_name, methods = args.model, args.methods
configure_threads()
pre_path = (args.pre or ROOT / "results" / "models64" / model_name / "emmet.json").resolve()
first = json.loads(pre_path.read_text())
pre_from = str(pre_path.relative_to(ROOT)) if pre_path.is_relative_to(ROOT) else str(pre_path)
assert (first["model"], first["n"], first["kind"], first["eval_dtype"]) == (model_name, 64, "counterfact", "model")
assert "generation_entropy" in first["pre"] and not first["chat"] and not first["easyedit"]
model, tok = lmedit.load_model(model_name, dtype=args.dtype)
requests = lmedit.load_requests(str(DATA), limit=64)
for method in methods:
    out = ROOT / "results" / "models64" / model_name / f"{method}.json"
    if out.exists():
        print(f"skip {out}")
        continue
    res = run_eval(model, tok, requests, method=method, batch_size=64, generation=True, model_name=model_name,
                   progress=False, pre=first["pre"])
    res["pre_from"] = pre_from
    res["dtype"] = args.dtype
    write_json(out, res)
    print(f"done {out}", flush=True)
