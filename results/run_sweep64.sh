#!/usr/bin/env bash
# EMMET vs MEMIT (same layers 4-8, embedded presets) at batch sizes 1, 16, 64 on the first 64
# CounterFact records. The batch-64 cells are the runs of run_counterfact64.sh (same settings),
# copied in as emmet_b64.json / memit_b64.json; the sweep skips finished cells.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/lmedit sweep --methods memit,emmet --batch-sizes 1,16,64 \
  --data ../shared/data/counterfact/counterfact_500.json --n 64 --out results/sweep64 --quiet
