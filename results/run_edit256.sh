#!/usr/bin/env bash
# 256 CounterFact edits in one EMMET batch over layers 4-8 (embedded preset); the JSON's
# "timings" are the edit's phases (statistics cached), excluding the before/after probe.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/lmedit edit --requests ../shared/data/counterfact/counterfact_500.json --n 256 --method emmet \
  --json --quiet > results/edit256_emmet.json
