#!/usr/bin/env bash
# zsRE (MEND's eval split): the first 128 records, EMMET and MEMIT (embedded presets, layers 4-8),
# one batch of 128 each; top-1 token accuracy of the answer for the question and its rephrasing,
# and specificity on the loc question, before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
for m in emmet memit; do
  .venv/bin/lmedit eval --method "$m" --data ../shared/data/zsre/zsre_eval_1037.json --n 128 \
    --batch-size 128 --quiet --out "results/zsre/$m.json"
done
