#!/usr/bin/env bash
# ImageNet-1k (ImageFolder layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) -> class-labelled shards
# for probing. Writes OUT/train and OUT/val, each with classes.json and per-shard count manifests.
#   data/imagenet_to_shards.sh /datasets/imagenet /data/imagenet_shards
# aimv2 comes from PATH, or from the Python in $PYTHON (e.g. PYTHON=.venv/bin/python).
set -euo pipefail
if [ -n "${PYTHON:-}" ] || ! command -v aimv2 >/dev/null; then aimv2() { "${PYTHON:-python3}" -m aimv2 "$@"; }; fi
if [ $# -ne 2 ]; then
  echo "usage: $0 IMAGENET_ROOT OUT_DIR" >&2
  exit 2
fi
for split in train val; do
  aimv2 shards classes --root "$1/$split" --out "$2/$split" --samples-per-shard 1000
done
