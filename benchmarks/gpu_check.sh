#!/usr/bin/env bash
# Unattended GPU check (issue 14): run on a machine with a GPU, from the repository root.
#   here, once:   .venv/bin/python benchmarks/gpu_check.py --prepare gpu_assets   (config + tokenizer, no weights;
#                 the statistics corpus as JSONL)
#   there:        bash benchmarks/gpu_check.sh        (carry gpu_assets; needs torch, transformers, accelerate)
# Then a 2-process statistics run on one GPU each, when the machine has two or more.
set -euo pipefail
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the CUDA tests (tiny models: GPU and GPU/CPU-split edits give the CPU deltas, solves on the layer's device)
LMEDIT_TEST_TOKENIZER="${ASSETS:-gpu_assets}/smollm2-135m" $PY -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py \
  || echo "gpu_check: CUDA tests FAILED"
$PY benchmarks/gpu_check.py --assets "${ASSETS:-gpu_assets}" --out "${OUT:-results/gpu}" "$@"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  for n in 1 "$NGPU"; do
    start=$(date +%s.%N)
    $PY -m torch.distributed.run --standalone --nproc-per-node "$n" -m lmedit stats --model /tmp/lmedit-gpu-smollm2 \
      --n-samples 5000 --forward-dtype bfloat16 --out "/tmp/lmedit-stats-$n" --quiet
    echo "statistics with $n GPU process(es): $(echo "$(date +%s.%N) - $start" | bc) s"
  done
fi
