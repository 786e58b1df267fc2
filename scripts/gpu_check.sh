#!/usr/bin/env bash
# Everything that must be checked on a GPU, in one command (<= 8 minutes on one H100/H200):
#   1. installs what the GPU image lacks from wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh makes them;
#      nothing is downloaded: the GPU box has no network)
#   2. the gpu tests (tests/test_gpu.py: `solopo train` CLI under ZeRO-3 bf16, transformers sampling, sdpa vs eager)
#   3. bench/train on a Qwen2.5-1.5B shape at 8K/16K: solo, long, solo-shared, long-shared
#   4. the max-trainable-length search (long, long-shared, solo-shared; and long with the previous dense masks)
#   5. bench/train --throughput (plain / ZeRO-3 at one rank, MFU, torch.profiler breakdown)
# Every result and log goes under one folder: $OUT when set, else runs/gpu_check/<time>. A phase that fails or
# runs out of its time budget is recorded in summary.txt and the next phase still runs.
#
#   scripts/gpu_check.sh             # on the GPU machine
#   scripts/gpu_check.sh --dry-run   # on CPU with a tiny shape and tiny lengths (CI: tests/test_gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-runs/gpu_check/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

phase() {  # phase NAME SECONDS CMD...: run with a time budget, log to $OUT/NAME.log, record rc and seconds
  local name=$1 budget=$2
  shift 2
  local t=$(date +%s)
  echo "== $name (budget ${budget}s)" | tee -a "$OUT/progress.log"
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t ))$([[ $rc == 124 || $rc == 137 ]] && echo ' (out of time)')" \
    | tee -a "$SUMMARY"
  tail -n 5 "$OUT/$name.log"
}

if [[ $DRY == 0 ]]; then
  if ! python3 -c "import pydantic, deepspeed" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "no wheels in .whl/: run scripts/fetch_gpu_wheels.sh on a machine with PyPI and carry .whl/" >&2
      exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/solopo_site \
      .whl/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/solopo_site"
  fi
  export DS_BUILD_OPS=0
  (nvidia-smi; python3 -c "import torch, transformers, deepspeed, pydantic; print('torch', torch.__version__,
    'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__,
    'deepspeed', deepspeed.__version__, 'pydantic', pydantic.__version__)") > "$OUT/env.txt" 2>&1
  SHAPE=qwen2.5-1.5b LENGTHS=8k,16k SHORT=1k COMP=128 CAP=70 START=16k STEP=4k LIMIT=256k
  SEARCH=long,long-shared,solo-shared TP_STEPS=2 TP_BACKENDS=plain,zero3
  B_TEST=100 B_BENCH=140 B_SEARCH=120 B_DENSE=40 B_TP=60
  TP_SHAPES=qwen2.5-1.5b,embedded TP_LEN=8192 TP_SHORT=1024 TP_COMP=128
else
  export CUDA_VISIBLE_DEVICES=""
  (python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
    transformers.__version__, '(dry run on CPU)')") > "$OUT/env.txt" 2>&1
  SHAPE=qwen2-tiny LENGTHS=256 SHORT=64 COMP=16 CAP=4 START=256 STEP=256 LIMIT=256
  SEARCH=long-shared TP_STEPS=1 TP_BACKENDS=plain  # ZeRO on CPU: tests/test_train.py
  B_TEST=120 B_BENCH=300 B_SEARCH=300 B_DENSE=150 B_TP=300
  TP_SHAPES=qwen2-tiny TP_LEN=128 TP_SHORT=32 TP_COMP=8
fi

if [[ $DRY == 0 ]]; then
  phase tests $B_TEST python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
    --junitxml="$OUT/tests.xml"
else  # the gpu tests skip without CUDA: check that they collect and skip cleanly
  phase tests $B_TEST python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/tests.xml"
fi
STEPS=(--steps 2 --max-steps 2 --min-seconds 0 --warmup-len 256)
[[ $DRY == 1 ]] && STEPS=(--steps 1 --max-steps 1 --min-seconds 0 --warmup-len 32 --threads 1)
phase bench $B_BENCH python3 bench/train/bench_train.py --shape $SHAPE --modes solo,long,solo-shared,long-shared \
  --lengths $LENGTHS --short $SHORT --completion $COMP --algo orpo "${STEPS[@]}" --out "$OUT"
phase search $B_SEARCH python3 bench/train/bench_train.py --shape $SHAPE --modes "" --lengths "" \
  --search $SEARCH --cap-gb $CAP --search-start $START --search-step $STEP \
  --search-limit $LIMIT --short $SHORT --completion $COMP --algo orpo --tag search "${STEPS[@]}" --out "$OUT"
phase search_dense $B_DENSE python3 bench/train/bench_train.py --shape $SHAPE --modes "" --lengths "" \
  --search long --mask dense --cap-gb $CAP --search-start $START --search-step $STEP --search-limit $LIMIT \
  --short $SHORT --completion $COMP --algo orpo --tag search_dense "${STEPS[@]}" --out "$OUT"
phase throughput $B_TP python3 bench/train/bench_train.py --throughput --shapes $TP_SHAPES --backends $TP_BACKENDS \
  --short $TP_SHORT --long $TP_LEN --completion $TP_COMP --micro 1 --accum 2 --steps $TP_STEPS --out "$OUT"

echo "total seconds=$(( $(date +%s) - T0 ))" | tee -a "$SUMMARY"
echo "results in $OUT"
! grep -v "rc=0" "$SUMMARY" | grep -q "rc="
