#!/usr/bin/env bash
# The prepared GPU check: what only a GPU shows, in under 10 minutes on one H100/H200 (the most a lent
# device allows for one command). From the repository root, with the project importable:
#
#   benchmarks/gpu_check.sh                      # PYTHON=... to choose the interpreter
#
# 1. the gpu-marked tests, at most 200 s                                        -> gpu_tests.txt
#    - DeepSpeed ZeRO-2/3 and FSDP pre-training train, save, resume, export; fsdp2 (test_gpu_scaleout.py,
#      test_gpu_fsdp2.py); the training step without a device-to-host sync and a NaN step skipped on
#      the device (test_gpu_step.py); FlexAttention masks (test_masks.py)
#    - the paths only a GPU takes (test_device_invariants.py): the paper's probe config resumed from
#      heads.pt trains on CUDA; compress trains and resumes under DeepSpeed ZeRO-2 with optimizer
#      offload and DeepSpeed's CPU Adam (compiled on first use, about a minute); compress under FSDP
#      decays exactly the unwrapped module's matrices
#    With pytest-xdist present the tests run on 4 workers, spread test by test; without it they run
#    one after another (pyproject's `-n auto` dropped), which may not finish in 200 s.
# 2. the L recipe exactly as shipped (bf16-mixed, clipping 1.0, fused AdamW, batch 32) for 150 steps
#    and a resume to 170 under ddp, fsdp, deepspeed_zero2 and deepspeed_zero3, one GPU each:
#    samples/s, MFU, peak memory, checkpoint kind, export (benchmarks/scaleout.py), at most 280 s
#                                                                                -> scaleout.{json,md}
# 3. the training-step MFU at L, bf16, batch 64, compiled blocks (benchmarks/train_step.py), and the
#    summary of every figure against its target (benchmarks/run.py), at most 100 s
#                                                                                -> train_step_gpu.{json,md}, summary.md
# The limits (200 + 280 + 100 s, plus about 15 s to install and start) are estimates: no step has been
# timed on a GPU yet. Each step has its own limit, so one that hangs cannot take the others' figures
# with it, and its results are copied to OUT as soon as it ends.
#
# Packages the GPU image lacks (webdataset, omegaconf, open_clip, deepspeed, ...) travel as wheels in
# .whl/ (benchmarks/gpu_wheels.sh writes them here); they are installed to /tmp/site first. With
# OUT set (the device tool), the result files are copied there.
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
collect() {  # copy the step's result files to OUT (the device tool) as soon as the step is over
  [ -n "${OUT:-}" ] || return 0
  for f in "$@"; do [ -f "$results/$f" ] && cp "$results/$f" "$OUT/"; done
  return 0
}
if "$PY" -c "import xdist" 2>/dev/null; then
  spread=(-n 4 --dist load)     # test by test over 4 workers: the slow subprocess tests overlap
else
  spread=(-o addopts=)          # pyproject's `-n auto` needs pytest-xdist: run them one after another
fi
timeout 200 "$PY" -m pytest -v -m gpu tests -p no:cacheprovider "${spread[@]}" 2>&1 | tail -60 | tee "$results/gpu_tests.txt" || status=1
collect gpu_tests.txt
timeout 280 "$PY" benchmarks/scaleout.py --steps 150 --strategies ddp fsdp deepspeed_zero2 deepspeed_zero3 || status=1
collect scaleout.json scaleout.md
timeout 100 "$PY" benchmarks/run.py --gpu --only train_step_gpu summary || status=1
collect train_step_gpu.json train_step_gpu.md summary.md
exit $status
