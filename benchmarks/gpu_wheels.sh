#!/usr/bin/env bash
# Wheels of what benchmarks/gpu_check.sh needs and a GPU machine without a package registry lacks,
# for its Python (3.12 by default, PY_VERSION=3.11 for another), into .whl/ (ignored by git):
#
#   benchmarks/gpu_wheels.sh          # then carry .whl to the GPU machine and run benchmarks/gpu_check.sh
#
# torch, timm, lightning, torchmetrics, transformers and safetensors are expected there. DeepSpeed
# publishes only a source archive: it is built here into a pure-Python wheel (its CUDA ops are
# compiled on first use there, which needs nvcc and ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
version=${PY_VERSION:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d .whl webdataset braceexpand omegaconf antlr4-python3-runtime open_clip_torch ftfy wcwidth \
    hjson ninja py-cpuinfo msgpack nvidia-ml-py pytest pluggy iniconfig pytest-xdist execnet
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed
ls -1 .whl
