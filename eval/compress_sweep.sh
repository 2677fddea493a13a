#!/usr/bin/env bash
# Compressor sweep: held-out caption loss against the number of visual tokens M (and prefill FLOPs)
# for every compressor kind, as one table (results.md / results.json) and one plot.
#   eval/compress_sweep.sh configs/compress/tiny.yaml runs/compress/sweep            # the offline demo
# Options and key=value overrides (passed to every `aimv2 compress train`) may come in any order after
# CONFIG and OUT_DIR, e.g. `--tokens "1 4" trainer.max_steps=600`; --tokens sets the M values (default
# "1 4 16": the demo encoder's 4 x 4 grid); --kinds a subset of the kinds (default all six).
# pool and kdv have no per-M weights: one run each (trained over all M), evaluated at every M.
# resampler, tokenpacker and quecc have weights per M: one run per M. mlp keeps all N tokens.
# Region kinds (tokenpacker, quecc) need sqrt(M) to divide the patch grid (4 x 4 at the demo's 56 px,
# 8 x 8 at 112 px, 16 x 16 at 224).
# aimv2 comes from PATH, or from the Python in $PYTHON (e.g. PYTHON=.venv/bin/python).
set -euo pipefail
if [ -n "${PYTHON:-}" ] || ! command -v aimv2 >/dev/null; then aimv2() { "${PYTHON:-python3}" -m aimv2 "$@"; }; fi
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG OUT_DIR [--tokens \"1 4 16\"] [--kinds \"pool kdv ...\"] [key=value ...]" >&2
  exit 2
fi
config=$1; out=$2; shift 2
all_kinds="pool kdv resampler tokenpacker quecc mlp"
ms="1 4 16"; kinds=$all_kinds; overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --tokens) ms=$2; shift 2 ;;
    --tokens=*) ms=${1#--tokens=}; shift ;;
    --kinds) kinds=$2; shift 2 ;;
    --kinds=*) kinds=${1#--kinds=}; shift ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "$0: unrecognized argument: $1 (overrides are key=value)" >&2; exit 2 ;;
  esac
done
for kind in $kinds; do
  case " $all_kinds " in *" $kind "*) ;; *) echo "$0: --kinds: unknown kind '$kind' (known: $all_kinds)" >&2; exit 2 ;; esac
done
wanted() { case " $kinds " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
list=$(echo "$ms" | tr ' ' ',')
runs=()
for kind in pool kdv; do
  wanted $kind || continue
  aimv2 compress train "$config" run_dir="$out/$kind" compressor.kind=$kind \
      compressor.num_tokens="${ms##* }" compressor.train_tokens="[$list]" "${overrides[@]}"
  runs+=("$out/$kind")
done
for kind in resampler tokenpacker quecc; do
  wanted $kind || continue
  for m in $ms; do
    aimv2 compress train "$config" run_dir="$out/${kind}_m$m" compressor.kind=$kind \
        compressor.num_tokens=$m compressor.train_tokens="[]" "${overrides[@]}"
    runs+=("$out/${kind}_m$m")
  done
done
if wanted mlp; then
  aimv2 compress train "$config" run_dir="$out/mlp" compressor.kind=mlp compressor.num_tokens=0 \
      compressor.train_tokens="[]" "${overrides[@]}"
  runs+=("$out/mlp")
fi
aimv2 compress evaluate "${runs[@]}" --tokens "$list" --out "$out/eval"
