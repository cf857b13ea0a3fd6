#!/usr/bin/env bash
# make demo: the main job end to end, offline — a checkpoint, a recipe, a plan, a compressed
# checkpoint, a report. Writes into demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VIRTUAL_ENV:-$PWD/.venv}"
TNC="$VENV/bin/tncompress"
PY="$VENV/bin/python"
OUT=demo-out
mkdir -p "$OUT"

echo "== 1. A trained checkpoint: a ResNet-18 (10 classes) state dict (random weights: offline, no download)"
"$PY" -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), '$OUT/r18.pt')"
ARCH=(--arch torchvision:resnet18 --arch-arg num_classes=10 --input-shape 1,3,32,32)

echo "== 2. Plan (dry run) with the Tucker-2 recipe"
"$TNC" plan "$OUT/r18.pt" "${ARCH[@]}" --recipe configs/resnet18-tucker.yaml

echo "== 3. Decompose: Tucker-2 and CP"
"$TNC" decompose "$OUT/r18.pt" "${ARCH[@]}" --recipe configs/resnet18-tucker.yaml -o "$OUT/r18-tucker.pt"
"$TNC" decompose "$OUT/r18.pt" "${ARCH[@]}" --recipe configs/resnet18-cp.yaml -o "$OUT/r18-cp.pt"

echo "== 4. Report: params, bytes, MACs, latency"
"$TNC" report "$OUT/r18.pt" "$OUT/r18-tucker.pt" "$OUT/r18-cp.pt" "${ARCH[@]}" --latency
"$TNC" report "$OUT/r18.pt" "$OUT/r18-tucker.pt" "$OUT/r18-cp.pt" "${ARCH[@]}" --markdown -o "$OUT/report.md" > /dev/null

echo "== 5. TT-matrix for the MNIST MLP (1024-1024-10), loaded back through the Python API"
"$PY" -c "import torch; from tncompress.models import ModelSpec, build_model; torch.manual_seed(0); torch.save(build_model(ModelSpec('mlp-1024')).state_dict(), '$OUT/mlp.pt')"
"$TNC" decompose "$OUT/mlp.pt" --arch mlp-1024 --recipe configs/mlp-mnist-tt.yaml -o "$OUT/mlp-tt.pt"
"$PY" -c "import tncompress, torch; m = tncompress.load('$OUT/mlp-tt.pt'); print(m); print(m(torch.randn(2, 1, 32, 32)).shape)"
"$TNC" report "$OUT/mlp.pt" "$OUT/mlp-tt.pt" --arch mlp-1024 --layers

echo "demo finished: outputs in $OUT/ (report.md is the Markdown report)"
