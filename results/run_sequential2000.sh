#!/usr/bin/env bash
# 2,000 sequential edits (20 batches of 100) on the embedded model, EMMET then MEMIT (each with its
# embedded preset), from CounterFact's EasyEdit-format training records. About 35 minutes per method
# on 2 cores. Writes results/sequential2000/{emmet,memit}.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
for m in emmet memit; do
  .venv/bin/python benchmarks/sequential.py --method "$m" --batch-size 100 --batches 20 \
    --data ../shared/data/counterfact/counterfact_train_10000.json --out results/sequential2000
done
.venv/bin/python benchmarks/plot_sequential.py results/sequential2000/emmet.json results/sequential2000/memit.json --out results/sequential2000/compare.png
