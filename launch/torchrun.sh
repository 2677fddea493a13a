#!/usr/bin/env bash
# Pre-train on one machine without SLURM: torchrun starts one process per GPU and Lightning
# picks up its environment (rank, world size, master address).
#   launch/torchrun.sh 8 configs/pretrain/aimv2_large_224.yaml trainer.num_nodes=1
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_GPUS CONFIG [key=value ...]" >&2
  exit 2
fi
gpus=$1
shift
exec torchrun --standalone --nproc_per_node "$gpus" -m aimv2 pretrain "$@" trainer.devices="$gpus"
