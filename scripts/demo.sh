#!/usr/bin/env bash
# make demo: the whole job end to end, offline, in a few minutes on 2 CPU cores.
#   1. train the TT paper's MNIST MLP (a baseline)     4. report size / MACs / accuracy of all three
#   2. decompose its first layer into a TT-matrix      5. ResNet-18: a parameter budget and the CP recipe
#   3. fine-tune it with distillation from the baseline  6. a real published ResNet-20 on real CIFAR-10 images:
#                                                          data-aware Tucker-2, short fine-tune, real accuracy
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

echo "== 5. ResNet-18 (10 classes, random weights: no download): a budget at half the parameters, and the CP recipe"
"$PY" -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), '$OUT/r18.pt')"
ARCH=(--arch torchvision:resnet18 --arch-arg num_classes=10 --input-shape 1,3,32,32)
"$TNC" decompose "$OUT/r18.pt" "${ARCH[@]}" --budget params:0.5 -o "$OUT/r18-budget.pt"
"$TNC" decompose "$OUT/r18.pt" "${ARCH[@]}" --recipe configs/resnet18-cp.yaml -o "$OUT/r18-cp.pt"
"$TNC" report "$OUT/r18.pt" "$OUT/r18-budget.pt" "$OUT/r18-cp.pt" --input-shape 1,3,32,32 --latency --channels-last
"$TNC" report "$OUT/r18.pt" "$OUT/r18-budget.pt" "$OUT/r18-cp.pt" --input-shape 1,3,32,32 --markdown -o "$OUT/report-r18.md" > /dev/null

SHARED="${TNCOMPRESS_SHARED:-$(cd .. && pwd)/shared}"
R20="$SHARED/models/resnet-cifar/resnet20-12fca82f.th"
CIFAR="$SHARED/data/cifar10-jpeg"
if [[ -f "$R20" && -d "$CIFAR/train" ]]; then
  echo "== 6. A real model: the published CIFAR-10 ResNet-20 (its author's file, as published) on CIFAR-10 (JPEG q75 copy)"
  R20ARCH=(--arch resnet:resnet20 --import "$SHARED/models/resnet-cifar/resnet.py" --input-shape 1,3,32,32)
  NORM=(--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)   # what the author trained with (ImageNet's)
  "$TNC" decompose "$R20" "${R20ARCH[@]}" "${NORM[@]}" --recipe configs/resnet-cifar-tucker-data.yaml \
    --calibration-data "folder:$CIFAR" --calibration-size "${DEMO_CALIBRATION:-512}" -o "$OUT/r20-tucker.pt"
  "$TNC" finetune "$OUT/r20-tucker.pt" --dataset "folder:$CIFAR" --epochs 1 --limit-train "${DEMO_R20_TRAIN:-2500}" \
    --lr 0.003 --teacher "$R20" "${R20ARCH[@]:0:4}" --limit-test 2000 -o "$OUT/r20-tucker-ft.pt"
  "$TNC" report "$R20" "$OUT/r20-tucker.pt" "$OUT/r20-tucker-ft.pt" "${R20ARCH[@]}" "${NORM[@]}" \
    --dataset "folder:$CIFAR" --limit-test 2000
else
  echo "== 6. skipped: the published ResNet-20 and the CIFAR-10 JPEG copy are not in $SHARED (set TNCOMPRESS_SHARED)"
fi

echo "demo finished ($DATASET): outputs and Markdown reports in $OUT/"
