#!/usr/bin/env bash
# make demo: the whole job end to end, offline, in a few minutes on 2 CPU cores.
#   1. train the TT paper's MNIST MLP (a baseline)     4. report size / MACs / accuracy of all three
#   2. decompose its first layer into a TT-matrix      5. ResNet-18: CP and Tucker-2 recipes, size and MACs
#   3. fine-tune it with distillation from the baseline
# Real MNIST is used when $TNCOMPRESS_DATA (or ../shared/data) has it or a download works; otherwise
# a clearly labelled synthetic set, whose accuracy means nothing about real data. Outputs: demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VIRTUAL_ENV:-$PWD/.venv}"
TNC="$VENV/bin/tncompress"
PY="$VENV/bin/python"
OUT=demo-out
mkdir -p "$OUT"
rm -f "$OUT"/*.state.pt

DATASET=mnist
if ! "$PY" -c "from tncompress.data import load_dataset; load_dataset('mnist', 'test', limit=1)" 2>/dev/null; then
  DATASET=synthetic
  echo "!! MNIST is not available offline (set TNCOMPRESS_DATA to a folder with MNIST/raw): using the SYNTHETIC"
  echo "!! set instead. The pipeline runs the same, but its accuracy figures mean nothing about real data."
fi
EPOCHS_TRAIN="${DEMO_EPOCHS_TRAIN:-4}"
EPOCHS_FT="${DEMO_EPOCHS_FT:-2}"

echo "== 1. Train a baseline: mlp-1024 on $DATASET ($EPOCHS_TRAIN epochs)"
"$TNC" train --arch mlp-1024 --dataset "$DATASET" --epochs "$EPOCHS_TRAIN" -o "$OUT/mlp.pt"

echo "== 2. Plan and decompose: fc1 as a TT-matrix (modes 4·8·8·4, rank 8)"
"$TNC" plan "$OUT/mlp.pt" --recipe configs/mlp-mnist-tt.yaml
"$TNC" decompose "$OUT/mlp.pt" --recipe configs/mlp-mnist-tt.yaml -o "$OUT/mlp-tt.pt"

echo "== 3. Fine-tune the TT model, distilling from the baseline ($EPOCHS_FT epochs)"
"$TNC" finetune "$OUT/mlp-tt.pt" --dataset "$DATASET" --epochs "$EPOCHS_FT" --teacher "$OUT/mlp.pt" -o "$OUT/mlp-tt-ft.pt"

echo "== 4. Report: params, bytes, MACs, accuracy"
"$TNC" report "$OUT/mlp.pt" "$OUT/mlp-tt.pt" "$OUT/mlp-tt-ft.pt" --dataset "$DATASET" --layers
"$TNC" report "$OUT/mlp.pt" "$OUT/mlp-tt.pt" "$OUT/mlp-tt-ft.pt" --dataset "$DATASET" --markdown -o "$OUT/report-mlp.md" > /dev/null
"$PY" -c "import tncompress; m = tncompress.load('$OUT/mlp-tt-ft.pt'); print(m.fc1)"

echo "== 5. ResNet-18 (10 classes, random weights: no download) with the CP and Tucker-2 recipes"
"$PY" -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), '$OUT/r18.pt')"
ARCH=(--arch torchvision:resnet18 --arch-arg num_classes=10 --input-shape 1,3,32,32)
"$TNC" decompose "$OUT/r18.pt" "${ARCH[@]}" --recipe configs/resnet18-tucker.yaml -o "$OUT/r18-tucker.pt"
"$TNC" decompose "$OUT/r18.pt" "${ARCH[@]}" --recipe configs/resnet18-cp.yaml -o "$OUT/r18-cp.pt"
"$TNC" report "$OUT/r18.pt" "$OUT/r18-tucker.pt" "$OUT/r18-cp.pt" --input-shape 1,3,32,32 --latency --channels-last
"$TNC" report "$OUT/r18.pt" "$OUT/r18-tucker.pt" "$OUT/r18-cp.pt" --input-shape 1,3,32,32 --markdown -o "$OUT/report-r18.md" > /dev/null

echo "demo finished ($DATASET): outputs and Markdown reports in $OUT/"
