#!/usr/bin/env bash
# Issue 17: most-probable early stopping (ENCORE's MPES) as a speed lever. The same 256 CounterFact
# records (counterfact_500.json) edited by EMMET (embedded preset) in batches of 64, each batch from the
# unedited model, once with the loss stop and once with MPES (mpes_extra_steps from the preset);
# the JSONs' timings.targets_s is the target-vector time. Writes results/mpes/{loss,most_probable}.json.
# METHOD=encore SETS="chat_prompts=off" TAG=encore_nochat_ writes results/mpes/encore_nochat_{loss,most_probable}.json
# (issue 12: the same comparison with ENCORE's settings and no chat rows).
# METHOD=encore TAG=encore_chat_ STOPS="loss most_probable_plain" EVAL_ARGS=--chat: ENCORE with its chat rows,
# the loss stop against MPES reading only the plain prompts (mpes_prompts=plain), chat-form metrics too.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results/mpes
extra=()
for s in ${SETS:-}; do extra+=(--set "$s"); done
for stop in ${STOPS:-loss most_probable}; do
  out="results/mpes/${TAG:-}$stop.json"
  [ -s "$out" ] && continue   # resumable: a finished arm is kept
  arm=(--set early_stop=${stop%_plain})
  [ "$stop" != "${stop%_plain}" ] && arm+=(--set mpes_prompts=plain)
  .venv/bin/lmedit eval --data ../shared/data/counterfact/counterfact_500.json --n 256 --batch-size 64 \
    --method "${METHOD:-emmet}" "${arm[@]}" "${extra[@]}" ${EVAL_ARGS:-} --eval-dtype model --json --quiet > "$out.tmp"
  mv "$out.tmp" "$out"
done
