#!/usr/bin/env bash
# Issue 17: most-probable early stopping (ENCORE's MPES) as a speed lever. The same 256 CounterFact
# records (counterfact_500.json) edited by EMMET (embedded preset) in batches of 64, each batch from the
# unedited model, once with the loss stop and once with MPES (mpes_extra_steps from the preset);
# the JSONs' timings.targets_s is the target-vector time. Writes results/mpes/{loss,most_probable}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results/mpes
for stop in ${STOPS:-loss most_probable}; do
  [ -s "results/mpes/$stop.json" ] && continue   # resumable: a finished arm is kept
  .venv/bin/lmedit eval --data ../shared/data/counterfact/counterfact_500.json --n 256 --batch-size 64 \
    --method emmet --set early_stop=$stop --eval-dtype model --json --quiet > "results/mpes/$stop.json.tmp"
  mv "results/mpes/$stop.json.tmp" "results/mpes/$stop.json"
done
