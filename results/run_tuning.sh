#!/usr/bin/env bash
# Choose MEMIT's preservation weight (lambda) and EMMET's ridge on held-out records: CounterFact
# records 400-499 of counterfact_500.json, which no evaluation here uses (the evaluations take the
# first 64 or 256). One batch of 100 per grid point, target vectors optimised once and reused.
# About 15 minutes on 2 cores. Writes results/tuning/tuning.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/tune.py --data ../shared/data/counterfact/counterfact_500.json --records 400:500 \
  --grid memit:mom2_update_weight=150,500,1500,5000,15000 \
  --grid emmet:emmet_lambda=0.01,0.1,1,10 \
  --out results/tuning
