"""The published CIFAR-10 ResNet-20 (../shared/models, as its author saved it) compressed end to end
through the CLI on real images (../shared/data/cifar10-jpeg, read as a folder dataset), with its
own preprocessing, real calibration and data-aware factors. Skipped where ../shared is absent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET = SHARED / "models" / "resnet-cifar"
CIFAR = SHARED / "data" / "cifar10-jpeg"
IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"

pytestmark = pytest.mark.skipif(not (RESNET / "resnet20-12fca82f.th").exists() or not CIFAR.is_dir(),
                                reason="needs ../shared/models/resnet-cifar and ../shared/data/cifar10-jpeg")


def test_published_resnet20_compresses_end_to_end_with_real_calibration(cli, tmp_path):
    recipe = tmp_path / "tucker.yaml"
    recipe.write_text("version: 1\ndefaults:\n  Conv2d: {method: tucker2, rank: 0.5, data_aware: true}\n"
                      "exclude: [conv1]\n")
    out = tmp_path / "r20-tucker.pt"
    model = RESNET / "resnet20-12fca82f.th"
    folder = f"folder:{CIFAR}"
    arch = ("--arch", "resnet:resnet20", "--import", RESNET / "resnet.py", "--input-shape", "1,3,32,32")
    res = cli("decompose", model, *arch, "-r", recipe, "-o", out, "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD,
              "--calibration-data", folder, "--calibration-size", "96", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    decomposed = [entry for entry in plan["layers"] if entry["action"] == "decompose"]
    assert len(decomposed) == 18 and all(any(n.startswith("data_aware: inputs whitened") for n in e["notes"])
                                         for e in decomposed)
    raw = torch.load(out, weights_only=True)
    meta = raw["metadata"]
    assert meta["preprocessing"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["calibration"]["samples"] == 96 and "train, 96 images" in meta["calibration"]["kind"]
    assert meta["calibration"]["bn_reestimated"] == 19

    # The report reads the recorded preprocessing: the same accuracy as when it is given again.
    common = ("--dataset", folder, "--limit-test", "300", "--json")
    recorded = cli("report", model, out, *arch, *common, "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD)
    assert recorded.exit_code == 0, recorded.output
    again = cli("report", out, *common, "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD)
    alone = cli("report", out, *common)
    assert again.exit_code == 0 and alone.exit_code == 0, alone.output
    top1 = [m["accuracy"]["top1"] for m in json.loads(recorded.stdout)["models"]]
    assert json.loads(alone.stdout)["models"][0]["accuracy"]["top1"] == json.loads(again.stdout)["models"][0][
        "accuracy"]["top1"] == top1[1]
    assert top1[0] > 70  # the published model, with its own preprocessing, on the JPEG copy
