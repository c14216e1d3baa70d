#!/usr/bin/env bash
# The three commands plus `ek kaggle` on synthetic Severstal data (256 x 1600 grayscale,
# 4 classes, train.csv RLE masks, mean Dice over (image, class) pairs), on CPU.
set -euo pipefail
EK=$(realpath "${1:-ek}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$ROOT/demo-steel" && mkdir -p "$ROOT/demo-steel" && cd "$ROOT/demo-steel"
"$EK" synth --task steel --out data --train 32 --test 8 --seed 0
"$EK" folds --data data --task steel --folds 2
"$EK" cv --epochs 3 "$ROOT/configs/tiny_steel.yaml"
"$EK" status
"$EK" blend --oof
"$EK" submit
"$EK" submit --check submissions/submission.csv --data data
"$EK" kaggle --slug steel-ensemble-kit --title "Steel ensemble (ensemble-kit)" --device cpu
echo "demo-steel submission: $ROOT/demo-steel/submissions/submission.csv"
echo "demo-steel Kaggle dataset: $ROOT/demo-steel/submissions/kaggle"
