#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels that scripts/gpu_check.sh installs on the GPU machine, which has
# no network and whose image (python 3.12, torch+CUDA, transformers, accelerate, pyarrow, typer, matplotlib, pytest)
# lacks pydantic and deepspeed. Run it on any x86-64 Linux machine with PyPI; carry .whl/ with the tree.
#   scripts/fetch_gpu_wheels.sh            # python 3.12 wheels (the GPU image's python)
#   PY=3.11 scripts/fetch_gpu_wheels.sh    # another python version
# DeepSpeed has no wheel on PyPI: it is built here with DS_BUILD_OPS=0 (pure Python, its ops JIT-compile where
# they run). vllm's CUDA wheel is too large to carry: the gpu check samples with the transformers backend.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-3.12}"
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# versions that worked on the GPU image (docs: /work/shared/docs/solopo-reference.md, "GPU box"); one of each
PINNED=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0)
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${PINNED[@]}"
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
fi
ls -la "$DEST"
du -sh "$DEST"
