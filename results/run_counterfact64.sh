#!/usr/bin/env bash
# Issue 4's check: 64 CounterFact records, each method with the embedded preset, one batch of 64
# (ROME applies the 64 edits one after another, as the reference does).
set -euo pipefail
cd "$(dirname "$0")/.."
for m in emmet memit rome; do
  .venv/bin/lmedit eval --method "$m" --data ../shared/data/counterfact/counterfact_500.json --n 64 \
    --batch-size 64 --quiet --out "results/counterfact64/$m.json"
done
