#!/usr/bin/env bash
# Issue 17: the target optimisation's learning rate as a speed lever (fewer steps to the most-probable
# stop). The same 256 CounterFact records (counterfact_500.json) edited by EMMET (embedded preset, MPES)
# in batches of 64, each batch from the unedited model, with v_lr 1.0 and with the preset's 0.5; the
# JSONs' timings hold the target-vector time and target_steps_per_request (mean optimisation steps).
# Writes results/target_lr/v_lr{LR}.json; resumable (a finished arm is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results/target_lr
for lr in ${LRS:-1.0 0.5}; do
  [ -s "results/target_lr/v_lr$lr.json" ] && continue
  .venv/bin/lmedit eval --data ../shared/data/counterfact/counterfact_500.json --n 256 --batch-size 64 \
    --method emmet --set v_lr=$lr --eval-dtype model --json --quiet > "results/target_lr/v_lr$lr.json.tmp"
  mv "results/target_lr/v_lr$lr.json.tmp" "results/target_lr/v_lr$lr.json"
done
