"""Global rank budget against uniform ranks on the MNIST MLP (1024-1024-1024-10, 32×32 input),
straight after decomposition (no fine-tuning).

For each method (low-rank on every Linear; TT on every Linear) and each uniform rank r: decompose
with rank r everywhere, note the whole model's parameter ratio ρ, then decompose with
``budget: {params_ratio: ρ}`` (sensitivity measured on a calibration batch of real training
images) — the same parameter budget — and compare top-1 on the full 10,000-image test set. The
KL and layer-output sensitivity measures are reported too; all three select and refine by top-1
disagreement with the dense model on the calibration batch.

    tncompress train --arch mlp-1024 --dataset mnist --epochs 10 -o mlp.pt
    python benchmarks/budget_mlp.py mlp.pt --out docs/budget-mlp.md
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tncompress.checkpoint import load_model
from tncompress.compress import decompose
from tncompress.data import load_dataset, make_loader
from tncompress.finetune import DataOptions
from tncompress.measure import count_params
from tncompress.recipe import parse_recipe
from tncompress.sweep import calibration_from_dataset
from tncompress.train import evaluate

METHODS = {
    # allow_growth: TT at these ranks does more MACs than the dense 1024×1024 layers at batch 1, which
    # the planner refuses by default; this benchmark compares allocations, not speed
    "lowrank": {"ranks": [4, 8, 16, 32], "rule": {"method": "lowrank"}},
    "tt": {"ranks": [16, 32, 48, 64], "rule": {"method": "tt", "allow_growth": True}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the trained dense MLP (tncompress train … -o mlp.pt)")
    parser.add_argument("--out", default="docs/budget-mlp.md")
    parser.add_argument("--calibration", type=int, default=1024, help="training images in the calibration batch")
    parser.add_argument("--methods", default="lowrank,tt")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    dense = loaded.model.eval()
    test_set = load_dataset("mnist", "test", image_size=32)
    loader = make_loader(test_set, 1000, shuffle=False)
    calib = calibration_from_dataset(loaded, DataOptions("mnist"), args.calibration, seed=0)
    base = evaluate(dense, loader)
    total = count_params(dense)
    rows = []
    for method in args.methods.split(","):
        spec = METHODS[method]
        for r in spec["ranks"]:
            # rank r on every layer (fc3, 1024 → 10, at most its full rank 10 for low-rank)
            fc3 = ({"name": "fc3", "rank": min(r, 10)} if method == "lowrank" else
                   {"name": "fc3", "rank": r, "allow_growth": True})
            uniform = decompose(dense, parse_recipe({"version": 1, "defaults": {"Linear": {**spec["rule"], "rank": r}},
                                                     "layers": [fc3]}),
                                input_shape=[1, 1, 32, 32], calibration_input=calib)
            ratio = count_params(uniform.model) / total
            row = {"method": method, "uniform_rank": r, "params_ratio": ratio,
                   "uniform": {"top1": evaluate(uniform.model, loader)["top1"], "ranks": _ranks(uniform.plan),
                               "model_output_error": uniform.calibration["model_output_error"]}}
            for measure in ("model", "kl", "layer"):
                started = time.perf_counter()
                recipe = parse_recipe({"version": 1, "defaults": {"Linear": spec["rule"]},
                                       "budget": {"params_ratio": ratio, "sensitivity": measure}})
                result = decompose(dense, recipe, input_shape=[1, 1, 32, 32], calibration_input=calib)
                row[measure] = {"top1": evaluate(result.model, loader)["top1"], "ranks": _ranks(result.plan),
                                "params_ratio": count_params(result.model) / total,
                                "model_output_error": result.calibration["model_output_error"],
                                "scan_seconds": result.budget["scan_seconds"],
                                "start": result.budget["start"], "calibration_disagreement": result.budget["disagreement"],
                                "uniform_ranks_score": result.budget["uniform_ranks_combined"],
                                "greedy_score": result.budget["greedy_combined"], "score": result.budget["combined"],
                                "refine_evaluations": result.budget["refine_evaluations"],
                                "refine_moves": result.budget["refine_moves"],
                                "refine_seconds": result.budget["refine_seconds"],
                                "seconds": round(time.perf_counter() - started, 2)}
            rows.append(row)
            print(json.dumps(row))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"baseline": base, "rows": rows, "torch": torch.__version__,
                                                    "machine": platform.machine(), "threads": args.threads},
                                                   indent=2) + "\n")
    lines = [f"Dense baseline: top-1 {base['top1']:.2f}% ({total:,} params). MNIST, 23,797 training images, "
             f"full 10,000-image test set; no fine-tuning; calibration: {args.calibration} training images.", "",
             "Budget columns: the sensitivity measure of the scan (`sensitivity:`); every one then starts from "
             "the best of {greedy, uniform fractions, uniform ranks} by top-1 disagreement with the dense model on "
             "the calibration batch (KL breaking ties) and runs the local search on that measure.", "",
             "| method | uniform rank | params ratio (uniform / budget) | uniform top-1 | budget, model output error: top-1 "
             "| its ranks | start → moves (evaluations, s) | calibration disagreement | budget, KL: top-1 | its ranks "
             "| budget, layer output error: top-1 | scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["model"]
        lines.append(f"| {row['method']} | {row['uniform_rank']} | {row['params_ratio']:.4f} / "
                     f"{m['params_ratio']:.4f} | {row['uniform']['top1']:.2f}% | **{m['top1']:.2f}%** "
                     f"| {m['ranks']} | {m['start']} → {m['refine_moves']} ({m['refine_evaluations']}, "
                     f"{m['refine_seconds']:.1f} s) | {100 * m['calibration_disagreement']:.2f}% "
                     f"| {row['kl']['top1']:.2f}% | {row['kl']['ranks']} "
                     f"| {row['layer']['top1']:.2f}% | {m['scan_seconds']:.1f} s |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _ranks(plan) -> str:
    return ", ".join(f"{p.name} {p.ranks if p.action == 'decompose' else 'dense'}" for p in plan)


if __name__ == "__main__":
    main()
