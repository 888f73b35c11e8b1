#!/bin/sh
# Chat-form evaluation and editing on the embedded model: 64 CounterFact records, one batch, EMMET preset.
# Each cell is skipped when its JSON exists (rerun after a kill continues with the missing ones).
set -e
D=../shared/data/counterfact/counterfact_500.json
for mode in off on bare; do
  [ -f results/chat/emmet_chat_prompts_$mode.json ] || .venv/bin/lmedit eval --data $D --n 64 --batch-size 64 \
    --method emmet --chat --set chat_prompts=$mode --quiet --out results/chat/emmet_chat_prompts_$mode.json
done
