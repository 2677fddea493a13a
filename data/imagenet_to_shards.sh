#!/usr/bin/env bash
# ImageNet-1k (ImageFolder layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) -> class-labelled shards
# for probing. Writes OUT/train and OUT/val, each with classes.json and per-shard count manifests.
#   data/imagenet_to_shards.sh /datasets/imagenet /data/imagenet_shards
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 IMAGENET_ROOT OUT_DIR" >&2
  exit 2
fi
for split in train val; do
  aimv2 shards classes --root "$1/$split" --out "$2/$split" --samples-per-shard 1000
done
