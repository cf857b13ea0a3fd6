"""MNIST with product-of-sums layers, against ProdSumNet's published 98.44% with 3,554 trainable
parameters (C. W. Wu 2018, trained on all 60,000 images).

A small CNN whose every conv and linear layer is a product of sums (ProdSumConv2d on the unfolded
kernel, ProdSumLinear for the classifier), trained from a random init (the scalars a_jk and the
biases, plus BatchNorm's scale and shift, all counted as trainable parameters). Bases are fixed and
rebuilt from the seed, so they are not parameters. Data: $TNCOMPRESS_DATA (MNIST, 23,797 training
images in this project's shared data), full 10,000-image test set.

    python benchmarks/mnist_prodsum.py --out docs/prodsum-mnist.json [--configs A,B,C,D] [--epochs 15]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tncompress.data import dataset_summary, load_dataset, make_loader
from tncompress.layers import ProdSumConv2d, ProdSumLinear
from tncompress.measure import count_params
from tncompress.train import TrainConfig, train

PUBLISHED = {"top1": 98.44, "params": 3554}

# name: (description, conv1, conv2, classifier) — each a dict of ProdSum settings
CONFIGS: dict[str, dict[str, Any]] = {
    "A": {"what": "gaussian, p = 1",
          "conv1": {"terms": 144, "family": "gaussian"}, "conv2": {"terms": 2000, "family": "gaussian"},
          "fc": {"terms": 1200, "family": "gaussian"}},
    "B": {"what": "kronecker, p = 1",
          "conv1": {"terms": 144, "family": "gaussian"}, "conv2": {"terms": 2000, "family": "kronecker"},
          "fc": {"terms": 1200, "family": "kronecker"}},
    "C": {"what": "gaussian, p = 2 on conv2 and classifier",
          "conv1": {"terms": 144, "family": "gaussian"},
          "conv2": {"p": 2, "terms": [500, 1500], "widths": [32], "family": "gaussian"},
          "fc": {"p": 2, "terms": [100, 1100], "widths": [10], "family": "gaussian"}},
    "D": {"what": "gaussian, p = 1, half the budget",
          "conv1": {"terms": 144, "family": "gaussian"}, "conv2": {"terms": 1000, "family": "gaussian"},
          "fc": {"terms": 500, "family": "gaussian"}},
}


def build(cfg: dict[str, Any], seed: int) -> nn.Module:
    """conv 1→16 (3×3) · BN · ReLU · pool → conv 16→32 (3×3) · BN · ReLU · pool → linear 1568→10."""
    torch.manual_seed(seed)
    return nn.Sequential(
        ProdSumConv2d(1, 16, 3, padding=1, seed=seed, **cfg["conv1"]), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        ProdSumConv2d(16, 32, 3, padding=1, seed=seed + 1, **cfg["conv2"]), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), ProdSumLinear(32 * 7 * 7, 10, seed=seed + 2, **cfg["fc"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/prodsum-mnist.json")
    parser.add_argument("--configs", default="A,B,C,D")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_set = load_dataset("mnist", "train", image_size=28)
    test_set = load_dataset("mnist", "test", image_size=28)
    test_loader = make_loader(test_set, 1000, shuffle=False)
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        model = build(cfg, args.seed)
        conf = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adamw", lr=args.lr, weight_decay=0.0,
                           warmup_epochs=0.5, seed=args.seed)
        t0 = time.perf_counter()
        result = train(model, lambda epoch: make_loader(train_set, 128, shuffle=True, seed=args.seed, epoch=epoch),
                       test_loader, conf)
        seconds = time.perf_counter() - t0
        dense_equiv = sum(m.to_dense().weight.numel() for m in model.modules()
                          if isinstance(m, (ProdSumConv2d, ProdSumLinear)))
        row = {"config": name, "what": cfg["what"], "params": count_params(model),
               "scalars": sum(m.num_trainable_scalars() for m in model.modules()
                              if isinstance(m, (ProdSumConv2d, ProdSumLinear))),
               "dense_weights": dense_equiv, "epochs": args.epochs, "seconds": round(seconds, 1),
               "top1": result.history[-1]["test_top1"], "best_epoch_top1": max(h["test_top1"] for h in result.history),
               "history": [round(h["test_top1"], 2) for h in result.history]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"data": dataset_summary("mnist", "train", image_size=28), "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}", "published": PUBLISHED,
            "optimizer": f"AdamW lr {args.lr}, no weight decay, batch 128, cosine, 0.5 epoch warm-up",
            "seed": args.seed}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
