#!/usr/bin/env bash
# Issue 12: sequential editing in batches of 100 from counterfact_train_10000.json, evaluated every
# 500 edits. Resumable: each method's ledger is in results/lifelong2000/ledgers/ (not committed);
# running this again continues where it stopped (without the ledgers, e.g. on a new machine, a method
# is edited again from the start: the edits are deterministic). --until bounds one sitting.
# ENCORE stops each request by MPES; the other methods keep the loss stop and the learning rate 0.5
# (pinned, so that the table shows what ENCORE's ingredients buy whatever the presets' default, and
# AlphaEdit's ledger, begun with these, goes on with them).
set -euo pipefail
cd "$(dirname "$0")/.."
UNTIL=${UNTIL:-2000}
.venv/bin/python benchmarks/lifelong.py --methods encore,alphaedit,memit,emmet,preserve=memit \
  --set preserve:preserve_edits=true \
  --set memit:early_stop=loss --set emmet:early_stop=loss --set preserve:early_stop=loss --set alphaedit:early_stop=loss \
  --set memit:v_lr=0.5 --set emmet:v_lr=0.5 --set preserve:v_lr=0.5 --set alphaedit:v_lr=0.5 \
  --n 2000 --batch-size 100 --eval-every 500 --until "$UNTIL" \
  --out results/lifelong2000 --quiet
