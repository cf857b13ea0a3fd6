"""The TT paper's MNIST table on this machine: the 1024-1024-10 MLP with fc1 as a TT-matrix (modes
4·8·8·4 both sides) at TT-ranks 1, 2, 4, 8, against the dense net.

Protocol (one run, one seed): train the dense net; decompose its trained fc1 by TT-SVD at each rank;
fine-tune with knowledge distillation from the dense net. Accuracy on the full 10,000-image test
set after decomposition and after fine-tuning. Data: $TNCOMPRESS_DATA (MNIST, 23,797 training
images in this project's shared data).

    python benchmarks/mnist_tt.py --out docs/mnist-tt [--augment] [--epochs-base 10] [--epochs-ft 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from bench_common import machine_info

from tncompress.compress import decompose
from tncompress.data import dataset_summary, load_dataset, make_loader
from tncompress.measure import count_params
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import parse_recipe
from tncompress.train import TrainConfig, evaluate, train

PUBLISHED = {1: 97.1, 2: 97.5, 3: 98.0, 4: 98.2}   # Novikov et al. 2015, max TT-rank 1–4, trained on 60,000 images


def peer_tt(fc1: torch.nn.Linear, rank: int) -> torch.nn.Module | None:
    """tensorly-torch's TT layer (blocktt, factorized) made from the same trained fc1 by its own
    from_linear (TT-SVD), or None when tensorly-torch is not installed (pip install '.[bench]')."""
    try:
        import tltorch
    except ImportError:
        return None
    return tltorch.FactorizedLinear.from_linear(
        fc1, auto_tensorize=False, in_tensorized_features=(4, 8, 8, 4), out_tensorized_features=(4, 8, 8, 4),
        rank=[1, rank, rank, rank, 1], factorization="blocktt", implementation="factorized")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/mnist-tt")
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--epochs-base", type=int, default=10)
    parser.add_argument("--epochs-ft", type=int, default=5)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--kd-weight", type=float, default=0.7)
    parser.add_argument("--lr-ft", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]

    train_set = load_dataset("mnist", "train", image_size=32, augment=args.augment)
    test_set = load_dataset("mnist", "test", image_size=32)
    test_loader = make_loader(test_set, 1000, shuffle=False)

    def loaders(batch: int):
        return lambda epoch: make_loader(train_set, batch, shuffle=True, seed=args.seed, epoch=epoch)

    torch.manual_seed(args.seed)
    dense = build_model(ModelSpec("mlp-1024"))
    base_cfg = TrainConfig(epochs=args.epochs_base, batch_size=128, lr=0.05, warmup_epochs=0.5, seed=args.seed)
    t0 = time.perf_counter()
    base = train(dense, loaders(128), test_loader, base_cfg)
    base_seconds = time.perf_counter() - t0
    base_top1 = base.history[-1]["test_top1"]
    print(f"dense: {base_top1:.2f}% ({base_seconds:.0f} s)", flush=True)

    rows = []
    for rank in ranks:
        recipe = parse_recipe({"version": 1, "layers": [
            {"name": "fc1", "method": "tt", "in_modes": [4, 8, 8, 4], "out_modes": [4, 8, 8, 4], "rank": rank}]})
        result = decompose(dense, recipe, input_shape=[1, 1, 32, 32])
        student = result.model
        before = evaluate(student, test_loader)["top1"]
        cfg = TrainConfig(epochs=args.epochs_ft, batch_size=128, lr=args.lr_ft, seed=args.seed, kd_weight=args.kd_weight)
        t0 = time.perf_counter()
        ft = train(student, loaders(128), test_loader, cfg, teacher=copy.deepcopy(dense))
        seconds = time.perf_counter() - t0
        fc1 = student.fc1
        row = {"rank": rank, "fc1_params": count_params(fc1), "params": count_params(student),
               "before": before, "after": ft.history[-1]["test_top1"], "seconds": seconds}
        # The peer, trained the same way in the same run: its own TT-SVD of the same trained fc1,
        # then the same distillation schedule, seed and data order.
        peer_layer = peer_tt(dense.fc1, rank)
        if peer_layer is not None:
            peer = copy.deepcopy(dense)
            peer.fc1 = peer_layer
            row["peer_fc1_params"] = count_params(peer_layer)
            row["peer_before"] = evaluate(peer, test_loader)["top1"]
            t0 = time.perf_counter()
            peer_ft = train(peer, loaders(128), test_loader, cfg, teacher=copy.deepcopy(dense))
            row["peer_seconds"] = time.perf_counter() - t0
            row["peer_after"] = peer_ft.history[-1]["test_top1"]
        rows.append(row)
        print(rows[-1], flush=True)

    lines = ["# MNIST: the TT paper's MLP with fc1 as a TT-matrix", "",
             f"Data: {dataset_summary('mnist', 'train', image_size=32)}; test: full 10,000 images — "
             "**MNIST, 23,797 training images** (published figures were trained on all 60,000).", "",
             f"Protocol: dense 1024-1024-10 MLP trained {args.epochs_base} epochs (SGD, lr 0.05, momentum 0.9, "
             f"cosine, batch 128{', augmentation' if args.augment else ''}); its fc1 (1024×1024) decomposed by "
             f"TT-SVD with modes 4·8·8·4 → 4·8·8·4 at each rank; fine-tuned {args.epochs_ft} epochs with "
             f"distillation from the dense net (weight {args.kd_weight}, T = 4, SGD lr {args.lr_ft}, cosine). Seed "
             f"{args.seed}, one run each, top-1 of the last epoch (no selection on the test set). Machine: "
             f"{machine_info('cpu')['summary']}. Generated by "
             "`benchmarks/mnist_tt.py`.", "",
             "The peer is tensorly-torch 0.5's `FactorizedLinear` (blocktt, factorized), made from the same "
             "trained fc1 by its own `from_linear` and fine-tuned with the same schedule, seed and data order "
             "in the same run (same TT structure: the fc1 parameter counts match).", "",
             "| TT-rank | fc1 params | model params | after decomposition | after fine-tune | published, max rank "
             "(60k images) | peer after decomposition | peer after fine-tune | fine-tune time (peer) |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| dense | 1,049,600 | {count_params(dense):,} | – | {base_top1:.2f}% | – | – | – | "
             f"{base_seconds:.0f} s (training) |"]
    for r in rows:
        peer = (f"{r['peer_before']:.2f}% | {r['peer_after']:.2f}% | {r['seconds']:.0f} s ({r['peer_seconds']:.0f} s)"
                if "peer_after" in r else f"– | – | {r['seconds']:.0f} s")
        lines.append(f"| {r['rank']} | {r['fc1_params']:,} | {r['params']:,} | {r['before']:.2f}% | {r['after']:.2f}% | "
                     f"{str(PUBLISHED[r['rank']]) + '%' if r['rank'] in PUBLISHED else '–'} | {peer} |")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"dense_top1": base_top1, "dense_seconds": base_seconds,
                                                    "published": PUBLISHED, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
