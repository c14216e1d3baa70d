#!/usr/bin/env bash
# The whole workflow on synthetic data, on CPU: synth -> cv -> blend -> submit.
set -euo pipefail
EK=$(realpath "${1:-ek}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$ROOT/demo" && mkdir -p "$ROOT/demo" && cd "$ROOT/demo"
"$EK" synth --out data --train 160 --validation 32 --test 32 --size 64 --seed 0
"$EK" cv --data data --folds 3 "$ROOT/configs/tiny.yaml" "$ROOT/configs/tiny_fpn.yaml"
"$EK" status
"$EK" blend --oof
"$EK" submit --data data
"$EK" submit --check submissions/submission.csv --data data
echo "demo submission: $ROOT/demo/submissions/submission.csv"
