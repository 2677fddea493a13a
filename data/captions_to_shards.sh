#!/usr/bin/env bash
# A folder of images plus a captions file (JSONL lines {"image": "rel/path.jpg", "caption": "..."}
# or a CSV with columns image,caption) -> image-caption shards for pre-training.
#   data/captions_to_shards.sh /photos /photos/captions.jsonl /data/my_shards
# aimv2 comes from PATH, or from the Python in $PYTHON (e.g. PYTHON=.venv/bin/python).
set -euo pipefail
if [ -n "${PYTHON:-}" ] || ! command -v aimv2 >/dev/null; then aimv2() { "${PYTHON:-python3}" -m aimv2 "$@"; }; fi
if [ $# -ne 3 ]; then
  echo "usage: $0 IMAGES_DIR CAPTIONS_FILE OUT_DIR" >&2
  exit 2
fi
aimv2 shards captions --images "$1" --captions "$2" --out "$3" --samples-per-shard 1000
