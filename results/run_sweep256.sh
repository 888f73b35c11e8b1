#!/usr/bin/env bash
# EMMET vs MEMIT (same layers 4-8, embedded presets) at batch size 256 on the first 256 CounterFact
# records (each batch from the unedited model), plus batch 64 on the same records when time allows.
# About 7 minutes per cell on 2 cores; the unedited metrics are measured once per sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/lmedit sweep --methods memit,emmet --batch-sizes "${BATCH_SIZES:-64,256}" \
  --data ../shared/data/counterfact/counterfact_500.json --n 256 --out results/sweep256 --quiet
