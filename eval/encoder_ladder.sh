#!/usr/bin/env bash
# Encoder scaling on a CPU: a ladder of `aimv2 pretrain` runs (sizes x lengths) on generated scenes,
# each with the held-out validation loss (data.val), then `aimv2 scaling encoder` fits loss against
# encoder parameters and compute, checks the fit on the held-out run (the one with the most compute)
# and says which size a larger budget should train.
#   eval/encoder_ladder.sh runs/ladder                                  # debug and tiny x 4 lengths
#   aimv2 scaling encoder runs/ladder/runs --out runs/ladder/fit --budgets 1e15,1e16   # the fit again, other budgets
# Options: --sizes "debug tiny", --steps "150 300 600 1200", --lr "debug=2e-3 tiny=1e-3", --scenes "40000 1000"
# (generated scenes to train on and held out), then key=value overrides for every run (e.g. trainer.seed=1).
# Data: 40,000 generated scenes at 56 px to train on (the longest run, 1200 steps of 32, draws 38,400
# samples from them, resampled) and 1,000 other scenes (another seed) held out; the captions' word list as tokenizer.
# Every run uses the same recipe (debug.yaml's: warmup, batch 32, cosine to max_steps: one schedule per
# run length, as Chinchilla's ladders) except model.size, max_steps and the peak lr, set per size as the
# paper's recipes do (--lr): debug 2e-3 (debug.yaml's); tiny 1e-3, chosen on 150-step runs of tiny
# (held-out loss 1.094 at 2e-3, 0.877 at 1e-3, 0.875 at 5e-4). key=value overrides go to every run.
# aimv2 comes from PATH, or from the Python in $PYTHON (e.g. PYTHON=.venv/bin/python).
set -euo pipefail
if [ -n "${PYTHON:-}" ] || ! command -v aimv2 >/dev/null; then aimv2() { "${PYTHON:-python3}" -m aimv2 "$@"; }; fi
if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR [--sizes \"debug tiny\"] [--steps \"150 300 600 1200\"] [--lr \"debug=2e-3 tiny=1e-3\"] [--scenes \"40000 1000\"] [key=value ...]" >&2
  exit 2
fi
out=$1; shift
sizes="debug tiny"; steps="150 300 600 1200"; lrs="debug=2e-3 tiny=1e-3 small=7e-4"; scenes="40000 1000"
overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --sizes) sizes=$2; shift 2 ;;
    --sizes=*) sizes=${1#--sizes=}; shift ;;
    --steps) steps=$2; shift 2 ;;
    --steps=*) steps=${1#--steps=}; shift ;;
    --lr) lrs=$2; shift 2 ;;
    --lr=*) lrs=${1#--lr=}; shift ;;
    --scenes) scenes=$2; shift 2 ;;
    --scenes=*) scenes=${1#--scenes=}; shift ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "$0: unrecognized argument: $1 (overrides are key=value)" >&2; exit 2 ;;
  esac
done
read -r n_train n_val <<< "$scenes"
aimv2 shards scenes --out "$out/data/train" --counts "$n_train" 10 10 --image-size 56 --seed 0
aimv2 shards scenes --out "$out/data/val" --counts "$n_val" 10 10 --image-size 56 --seed 1
shards=$(( (n_train + 999) / 1000 - 1 ))  # the scene writer puts 1000 samples in a shard
runs=()
for size in $sizes; do
  lr=""
  for pair in $lrs; do if [ "${pair%%=*}" = "$size" ]; then lr=${pair#*=}; fi; done
  [ -n "$lr" ] || { echo "$0: no lr for size $size in --lr \"$lrs\"" >&2; exit 2; }
  for n in $steps; do
    run="$out/runs/${size}_${n}"
    aimv2 pretrain configs/pretrain/debug.yaml run_dir="$run" model.size="$size" model.img_size=56 \
        data.sources="[{urls: '$out/data/train/pretrain/{00000..$(printf %05d $shards)}.tar'}]" data.shuffle_buffer=2000 \
        data.batch_size=32 data.hflip=0.0 data.crop_scale="[0.8,1.0]" \
        data.tokenizer.kind=words data.tokenizer.path="$out/data/train/vocab.txt" data.tokenizer.max_length=20 \
        data.val.urls="$out/data/val/pretrain/00000.tar" data.val.every_n_steps=$((n / 3)) \
        optim.lr="$lr" trainer.max_steps="$n" trainer.resume=auto trainer.progress_bar=false trainer.checkpoint_every_n_steps=100000 \
        visualize.every_n_steps=0 "${overrides[@]}"
    runs+=("$run")
  done
done
aimv2 scaling encoder "${runs[@]}" --out "$out/fit"   # the most-compute run is held out and predicted
