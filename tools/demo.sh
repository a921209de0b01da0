#!/usr/bin/env bash
# The CPU demo: make the embedded data set, train DPNTiny with 2 processes through
# ppdpn.launch (Paddle's launcher), then evaluate the best checkpoint on the held-out split.
# Extra arguments are passed to train.py as overrides, e.g. `-o Global.epochs=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=./demo_data
OUT=./output/demo

if [ ! -f "$DATA/train_list.txt" ]; then
  # 300 train + 100 val images per class: sized so training + eval fit in 3 minutes on 2 cores
  "$PY" -m data.make_demo --out "$DATA" --train-per-class 300 --val-per-class 100
fi
if [ -f "$OUT/checkpoints/latest" ]; then
  echo "[demo] $OUT holds an earlier demo run: it resumes (delete $OUT to train from scratch)"
fi
start=$(date +%s)
# CUDA_VISIBLE_DEVICES must be unset (not empty) for CPU processes: see README.
"$PY" -m ppdpn.launch --nproc_per_node 2 --log_dir "$OUT/launch" \
  train.py -c configs/demo.yaml -o Global.output_dir="$OUT" "$@"
trained=$(( $(date +%s) - start ))
echo "[demo] training + eval took ${trained}s (2 CPU processes)"
echo "[demo] held-out evaluation of the best checkpoint:"
"$PY" train.py -c configs/demo.yaml --eval-only \
  -o Global.pretrained_model="$OUT/checkpoints/best.pdckpt" Global.output_dir="$OUT" "$@" | tail -n 1
echo "[demo] checkpoints: $OUT/checkpoints  PaddleClas-layout weights: $OUT/best_model.pdparams"
echo "[demo] VisualDL:    visualdl --logdir $OUT/vdl --host 127.0.0.1 --port 8040 --language en"
echo "[demo] curves:      $OUT/curves.png   log: $OUT/train.log   per-epoch: $OUT/metrics.jsonl"
