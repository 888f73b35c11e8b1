#!/usr/bin/env bash
# Issue 13's per-model check: 64 CounterFact records (the first 64 of counterfact_500.json, none of
# them used to choose a preset), ROME / MEMIT / EMMET each with the model's preset, one batch of 64
# from the unedited model (ROME applies the 64 edits one after another), with fluency (--generation),
# timings per phase and the process's peak memory. A finished (model, method) is skipped.
# Usage: bash results/run_models64.sh [MODEL ...]   (default: gemma-3-270m)
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(gemma-3-270m)
for model in "${models[@]}"; do
  for m in emmet memit rome; do
    out="results/models64/$model/$m.json"
    [ -f "$out" ] && { echo "skip $out"; continue; }
    .venv/bin/lmedit eval --model "$model" --method "$m" --data ../shared/data/counterfact/counterfact_500.json \
      --n 64 --batch-size 64 --generation --quiet --out "$out" > /dev/null
    echo "done $out"
  done
done
