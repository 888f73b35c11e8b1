"""Where the wall time of editing one fact goes, phase by phase, in one fresh process.

Usage::

    python benchmarks/one_fact_phases.py [--requests FILE]   (default: the demo's first request)

What ``lmedit edit --requests one.json`` does, timed step by step: import torch, import lmedit,
load the embedded model (transformers' model imports included), the before-probe (probabilities
and an 8-token greedy continuation), the Editor, the edit with cached statistics (its own phase
timings), the after-probe. Run it twice so the statistics and context-template caches are warm.
"""

import time

t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
import argparse  # noqa: E402
import importlib.resources  # noqa: E402
import json  # noqa: E402

import lmedit  # noqa: E402
from lmedit._runtime import configure_threads  # noqa: E402
from lmedit.cli import _probe  # noqa: E402

t2 = time.perf_counter()
ap = argparse.ArgumentParser()
ap.add_argument("--requests", default=None)
args = ap.parse_args()
threads = configure_threads()
path = args.requests or str(importlib.resources.files("lmedit") / "examples" / "demo_requests.json")
reqs = lmedit.load_requests(path, limit=1)
t2b = time.perf_counter()
model, tok = lmedit.load_model()
t3 = time.perf_counter()
_probe(model, tok, reqs)
t4 = time.perf_counter()
editor = lmedit.Editor(model, tok, "emmet")
t5 = time.perf_counter()
result = editor.edit(reqs)
t6 = time.perf_counter()
_probe(model, tok, reqs)
t7 = time.perf_counter()
phases = {"import_torch_s": t1 - t0, "import_lmedit_s": t2 - t1, "load_model_s": t3 - t2b, "probe_before_s": t4 - t3,
          "editor_s": t5 - t4, "edit_s": t6 - t5, "probe_after_s": t7 - t6, "total_s": t7 - t0}
print(json.dumps({"threads": threads, "torch": torch.__version__, "phases": phases,
                  "edit_timings": {k: round(v, 3) for k, v in result.timings.items()},
                  "target_steps": float(result.targets.steps.float().mean())}, indent=1))
