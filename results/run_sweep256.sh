#!/usr/bin/env bash
# EMMET vs MEMIT (same layers 4-8) at batch size 256 (and 64 where BATCH_SIZES says so) on the first
# 256 CounterFact records, each batch from the unedited model, with the lambda / ridge chosen on
# held-out records by run_tuning.sh (read from results/tuning/tuning.json).
# About 7 minutes per cell on 2 cores; the unedited metrics are measured once per sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t SETS < <(.venv/bin/python - <<'PY'
import json
for method, chosen in json.load(open("results/tuning/tuning.json"))["chosen"].items():
    for key, value in chosen.items():
        if key not in ("score", "tied_values"):
            print(f"--set-method={method}:{key}={value}")
PY
)
.venv/bin/lmedit sweep --methods memit,emmet --batch-sizes "${BATCH_SIZES:-256}" "${SETS[@]}" \
  --data ../shared/data/counterfact/counterfact_500.json --n 256 --out results/sweep256 --quiet
