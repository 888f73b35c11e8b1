#!/usr/bin/env bash
# ROME at batch size 1 (each edit from the unedited model) on the same 64 records as the
# EMMET/MEMIT sweep; the cell joins results/sweep64's table.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/lmedit sweep --methods rome --batch-sizes 1 \
  --data ../shared/data/counterfact/counterfact_500.json --n 64 --out results/sweep64 --quiet
