"""Uniform fractions against a budget, on the MNIST CNN every tutorial starts from
(tests/corpus/mnist_cnn.py: two 5×5 convs, ``x.view(-1, 320)``, two Linear layers), through the
command line exactly as a user runs it.

1. ``tncompress train`` the CNN on MNIST (the real files under $TNCOMPRESS_DATA) for a few epochs;
2. ``tncompress decompose`` it at half of its parameters / MACs, no training afterwards:
   uniform ``rank: 0.5`` on every layer (data-free, and data-aware on 512 training images), and
   ``--budget params:0.5`` / ``--budget macs:0.5`` (configs/budget-data-aware.yaml, and the default
   recipe with the budget measured on the same images);
3. ``tncompress report --json`` all of them on the full test set; write ``OUT.json`` and ``OUT.md``.

    python benchmarks/mnist_cnn_budget.py --out docs/mnist-cnn-budget      # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine_info

from tncompress.checkpoint import atomic_write

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "corpus" / "mnist_cnn.py"
UNIFORM = "version: 1\ndefaults:\n  Linear: {method: lowrank, rank: 0.5%s}\n  Conv2d: {method: tucker2, rank: 0.5%s}\n"
CALIBRATION = ["--calibration-data", "mnist", "--calibration-size", "512"]
# (label, extra decompose arguments, uses a recipe file written here: None / "uniform" / "uniform-aware")
POINTS = [
    ("uniform rank: 0.5, data-free", "uniform", []),
    ("uniform rank: 0.5, data-aware", "uniform-aware", CALIBRATION),
    ("--budget params:0.5 (default recipe, real calibration)", None, ["--budget", "params:0.5", *CALIBRATION]),
    ("--budget params:0.5, configs/budget-data-aware.yaml", "configs", ["--budget", "params:0.5", *CALIBRATION]),
    ("--budget macs:0.5, configs/budget-data-aware.yaml", "configs", ["--budget", "macs:0.5", *CALIBRATION]),
]


def tncompress(*args: str) -> str:
    """Run the CLI as a user does; its stdout (a failure stops the benchmark with the CLI's message)."""
    done = subprocess.run([sys.executable, "-m", "tncompress", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"tncompress {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/mnist-cnn-budget")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        arch = ["--arch", "mnist_cnn:make", "--import", str(MODEL)]
        dense = work / "cnn.pt"
        tncompress("train", *arch, "--dataset", "mnist", "--epochs", str(args.epochs), "--lr", "0.05", "--seed", "0",
                   "-o", str(dense))
        recipes = {"uniform": work / "u.yaml", "uniform-aware": work / "ua.yaml",
                   "configs": ROOT / "configs" / "budget-data-aware.yaml"}
        recipes["uniform"].write_text(UNIFORM % ("", ""))
        recipes["uniform-aware"].write_text(UNIFORM % (", data_aware: true", ", data_aware: true"))
        outputs = []
        for k, (_, recipe, extra) in enumerate(POINTS):
            out = work / f"p{k}.pt"
            with_recipe = ["--recipe", str(recipes[recipe])] if recipe else []
            tncompress("decompose", str(dense), *with_recipe, *extra, "-o", str(out))
            outputs.append(str(out))
        report = json.loads(tncompress("report", str(dense), *outputs, "--dataset", "mnist", "--json"))
    rows = []
    base = report["models"][0]
    for (label, _, _), entry in zip([("dense", None, []), *POINTS], report["models"]):
        rows.append({"model": label, "params": entry["params"], "macs": entry["macs"],
                     "params_ratio": entry["params"] / base["params"], "macs_ratio": entry["macs"] / base["macs"],
                     "top1": entry["accuracy"]["top1"], "images": entry["accuracy"]["images"]})
    result = {"machine": machine_info(), "epochs": args.epochs, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(out.with_suffix(".md"), lambda p: p.write_text(to_markdown(result)))
    print(to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    dense = rows[0]["top1"]
    lines = ["# Uniform fractions against a budget: the tutorial MNIST CNN", "",
             f"`python benchmarks/mnist_cnn_budget.py` on {result['machine']['summary']}; {result['seconds']:.0f} s. "
             f"The CNN of tests/corpus/mnist_cnn.py trained {result['epochs']} epochs on MNIST (23,797 training "
             "images) by `tncompress train`, then decomposed by `tncompress decompose` without any training "
             "afterwards; top-1 on the full test set (10,000 images). Data-aware and budget rows calibrate on 512 "
             "MNIST training images.", "",
             "| model | params (ratio) | MACs (ratio) | top-1 | Δ top-1 |", "|---|---|---|---|---|"]
    for row in rows:
        delta = "–" if row is rows[0] else f"{row['top1'] - dense:+.2f}"
        lines.append(f"| {row['model']} | {row['params']:,} ({row['params_ratio']:.3f}) | {row['macs']:,} "
                     f"({row['macs_ratio']:.3f}) | {row['top1']:.2f}% | {delta} |")
    lines += ["", "At the same size, a uniform fraction cuts every layer alike — the 1-channel stem and the 10-way "
              "head included — while the budget measures what each layer's rank does to the model's predictions "
              "and spends the parameters where they matter.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
