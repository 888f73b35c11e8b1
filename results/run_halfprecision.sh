#!/usr/bin/env bash
# Issue 6's dtype check on the embedded model: EMMET (embedded preset) on the first 64 CounterFact
# records, one batch, with the model loaded in float32 and in bfloat16 (statistics, keys, targets
# and solves run in float32/float64 or a bf16 copy either way; the delta is cast once).
# float16 is not run here: this CPU has no float16 matmuls (measured 30x slower than float32);
# tests/integration/test_methods_battery.py covers float16 on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
for dt in float32 bfloat16; do
  .venv/bin/lmedit eval --method emmet --dtype "$dt" --data ../shared/data/counterfact/counterfact_500.json \
    --n 64 --batch-size 64 --quiet --out "results/halfprecision/emmet_$dt.json"
done
