#!/usr/bin/env bash
# The prepared GPU check: what only a GPU shows, in about 8 minutes on one H200 (fits the 10 minutes
# a lent device allows for one command). From the repository root, with the project importable:
#
#   benchmarks/gpu_check.sh                      # PYTHON=... to choose the interpreter
#
# 1. the gpu-marked tests (DeepSpeed ZeRO-2/3 and FSDP train, save, resume, export; the training step
#    without a device-to-host sync; a NaN step skipped on the device)            -> gpu_tests.txt
# 2. the L recipe exactly as shipped (bf16-mixed, clipping 1.0, fused AdamW, batch 32) for 150 steps
#    and a resume to 170 under ddp, fsdp, deepspeed_zero2 and deepspeed_zero3, one GPU each:
#    samples/s, MFU, peak memory, checkpoint kind, export (benchmarks/scaleout.py)  -> scaleout.{json,md}
# 3. the training-step MFU at L, bf16, batch 64, compiled blocks (benchmarks/train_step.py), and the
#    summary of every figure against its target (benchmarks/run.py)  -> train_step_gpu.{json,md}, summary.md
#
# Packages the GPU image lacks (webdataset, omegaconf, open_clip, deepspeed, ...) travel as wheels in
# .whl/ (benchmarks/gpu_wheels.sh writes them here); they are installed to /tmp/site first. With
# OUT set (the device tool), the result files are copied there. Each step has its own time limit, so
# one that hangs cannot take the others' figures with it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 AIMV2_PROGRESS=lines DS_BUILD_OPS=0
results=benchmarks/results
mkdir -p "$results"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu_check on', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 2
status=0
timeout 120 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -40 | tee "$results/gpu_tests.txt" || status=1
timeout 330 "$PY" benchmarks/scaleout.py --steps 150 --strategies ddp fsdp deepspeed_zero2 deepspeed_zero3 || status=1
timeout 120 "$PY" benchmarks/run.py --gpu --only train_step_gpu summary || status=1
if [ -n "${OUT:-}" ]; then
  for f in gpu_tests.txt scaleout.json scaleout.md train_step_gpu.json train_step_gpu.md summary.md; do
    [ -f "$results/$f" ] && cp "$results/$f" "$OUT/"
  done
fi
exit $status
