#!/usr/bin/env bash
# Compressor sweep: held-out caption loss against the number of visual tokens M (and prefill FLOPs)
# for every compressor kind, as one table (results.md / results.json) and one plot.
#   eval/compress_sweep.sh configs/compress/tiny.yaml runs/compress/sweep            # the offline demo
#   eval/compress_sweep.sh my_stage1.yaml runs/sweep "1 4 16 64 144" trainer.max_steps=2000
# pool and kdv have no per-M weights: one run each (trained over all M), evaluated at every M.
# resampler, tokenpacker and quecc have weights per M: one run per M. mlp keeps all N tokens.
# Region kinds (tokenpacker, quecc) need sqrt(M) to divide the patch grid (4 x 4 at the demo's 56 px,
# 8 x 8 at 112 px, 16 x 16 at 224).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG OUT_DIR [\"M values\"] [key=value ...]" >&2
  exit 2
fi
config=$1; out=$2; ms=${3:-"1 4 16"}; shift $(( $# >= 3 ? 3 : 2 ))
list=$(echo "$ms" | tr ' ' ',')
runs=()
for kind in pool kdv; do
  aimv2 compress train "$config" run_dir="$out/$kind" compressor.kind=$kind \
      compressor.num_tokens="${ms##* }" compressor.train_tokens="[$list]" "$@"
  runs+=("$out/$kind")
done
for kind in resampler tokenpacker quecc; do
  for m in $ms; do
    aimv2 compress train "$config" run_dir="$out/${kind}_m$m" compressor.kind=$kind \
        compressor.num_tokens=$m compressor.train_tokens="[]" "$@"
    runs+=("$out/${kind}_m$m")
  done
done
aimv2 compress train "$config" run_dir="$out/mlp" compressor.kind=mlp compressor.num_tokens=0 \
    compressor.train_tokens="[]" "$@"
runs+=("$out/mlp")
aimv2 compress evaluate "${runs[@]}" --tokens "$list" --out "$out/eval"
