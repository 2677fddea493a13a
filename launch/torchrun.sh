#!/usr/bin/env bash
# Pre-train on one machine without SLURM: torchrun starts one process per GPU and Lightning
# picks up its environment (rank, world size, master address).
#   launch/torchrun.sh 8 configs/pretrain/aimv2_large_224.yaml run_dir=runs/l224   # key=value overrides follow
#   STRATEGY=fsdp launch/torchrun.sh 8 configs/pretrain/aimv2_huge_224.yaml run_dir=runs/h224
# Environment: STRATEGY (a preset of configs/strategy/ or a YAML path), PYTHON (default: python),
# MAX_RESTARTS (default 3). If a process dies, torchrun restarts all of them and trainer.resume=auto
# continues from the newest intact checkpoint; running the same command again continues the run too.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_GPUS CONFIG [key=value ...]" >&2
  exit 2
fi
gpus=$1
config=$2
shift 2
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    --max-restarts "${MAX_RESTARTS:-3}" -m aimv2 pretrain "$config" ${STRATEGY:+--strategy "$STRATEGY"} \
    trainer.resume=auto "$@" trainer.devices="$gpus" trainer.num_nodes=1
