"""Training throughput: the tool's loop (tncompress.train.train, what `tncompress finetune` runs)
against a plain PyTorch loop written for the same model, the same DataLoader (same batches and
augmentation) and the same optimizer, measured in one run, with and without a distillation teacher,
in both memory layouts; then 2 gloo processes (torchrun) against 1 on the same global batch.

Models: the published CIFAR-10 ResNet-20 (../shared/models) dense, CP and Tucker-2 (rank 0.5,
data-free factors: the speed does not depend on their values) on CIFAR-10 (JPEG q75 copy, random
crop and flip), and the 1024-1024-10 MLP on MNIST (23,797 training images). Each figure is the best
of ``--repeats`` passes over ``--images`` training images, the variants interleaved so that drifts
of the machine hit them alike. Every OpenMP wait policy given is run in its own process.

    python benchmarks/train_speed.py --out docs/train-speed [--images 1280] [--policies PASSIVE,default]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 128


SPEC_ARGS = {"arch": "resnet:resnet20", "imports": [str(SHARED / "models" / "resnet-cifar" / "resnet.py")],
             "input_shape": [1, 3, 32, 32]}


def _dense_resnet20() -> Any:
    from tncompress.checkpoint import load_model
    from tncompress.models import ModelSpec

    return load_model(SHARED / "models" / "resnet-cifar" / "resnet20-12fca82f.th", ModelSpec(**SPEC_ARGS)).model


def _decomposed(dense: Any, method: str) -> Any:
    """The ResNet-20 with every 3×3 conv but the stem decomposed at rank 0.5 (a DecomposeResult)."""
    import tncompress
    from tncompress.recipe import parse_recipe

    recipe = parse_recipe({"version": 1, "defaults": {"Conv2d": {"method": method, "rank": 0.5}},
                           "exclude": ["conv1", "linear"]}, method)
    return tncompress.decompose(dense, recipe, input_shape=[1, 3, 32, 32], allow_error=True)


def _models() -> dict[str, tuple[Any, Any, str]]:
    """name → (student, dense teacher, dataset)."""
    import torch

    from tncompress.models import ModelSpec, build_model

    dense = _dense_resnet20()
    out: dict[str, tuple[Any, Any, str]] = {"resnet20 dense": (dense, dense, "cifar")}
    for method in ("cp", "tucker2"):
        out[f"resnet20 {method}"] = (_decomposed(dense, method).model, dense, "cifar")
    torch.manual_seed(0)
    mlp = build_model(ModelSpec("mlp-1024"))
    out["mnist mlp"] = (mlp, copy.deepcopy(mlp), "mnist")
    return out


def _datasets(images: int) -> dict[str, Any]:
    from tncompress.data import load_dataset

    cifar = load_dataset(f"folder:{SHARED / 'data' / 'cifar10-jpeg'}", "train", mean=MEAN, std=STD, augment=True,
                         limit=images)
    mnist = load_dataset("mnist", "train", data_dir=str(SHARED / "data"), image_size=32, augment=True, limit=images,
                         download=False)
    return {"cifar": cifar, "mnist": mnist}


def plain_loop(model: Any, teacher: Any, loader: Any, channels_last: bool) -> float:
    """img/s of the loop anyone would write: SGD with momentum and weight decay, cross-entropy (plus
    Hinton distillation with the teacher under no_grad), the schedule stepped per batch."""
    import torch
    import torch.nn.functional as F

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    if teacher is not None:
        teacher.to(memory_format=fmt).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader))
    images = 0
    start = time.perf_counter()
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(x)
            kd = F.kl_div(F.log_softmax(logits / 4, 1), F.log_softmax(soft / 4, 1), reduction="batchmean",
                          log_target=True) * 16
            loss = 0.3 * loss + 0.7 * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        images += y.shape[0]
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    if teacher is not None:
        teacher.to(memory_format=torch.contiguous_format)
    return images / seconds


def data_only(loader: Any) -> float:
    """img/s of iterating the DataLoader alone (decode cache, augmentation, normalisation, collation)."""
    images = 0
    start = time.perf_counter()
    for _, y in loader:
        images += y.shape[0]
    return images / (time.perf_counter() - start)


def tool_loop(model: Any, teacher: Any, loader_for: Any, test: Any, layout: str) -> float:
    """img/s of the training pass of tncompress.train.train (its own epoch timer, evaluation excluded)."""
    from tncompress.train import TrainConfig, train

    config = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, kd_weight=0.7 if teacher is not None else 0.0,
                         device="cpu", memory_format=layout)
    result = train(model, loader_for, test, config, teacher=teacher)
    return float(result.history[0]["images_per_second"])


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """All single-process measurements under this process's OpenMP settings."""
    import torch
    from bench_common import machine_info

    from tncompress.data import make_loader

    torch.set_num_threads(args.threads)
    data = _datasets(args.images)
    rows = []
    loading = {kind: max(data_only(make_loader(dataset, BATCH, shuffle=True, seed=0, epoch=e)) for e in (1, 2))
               for kind, dataset in data.items()}
    for name, (student, dense, kind) in _models().items():
        dataset = data[kind]
        test = [next(iter(make_loader(dataset, 16, shuffle=False)))]  # one small batch: evaluation is not timed

        def loader_for(epoch: int, dataset: Any = dataset) -> Any:
            return make_loader(dataset, BATCH, shuffle=True, seed=0, epoch=epoch)

        convs = any(isinstance(m, torch.nn.Conv2d) for m in student.modules())
        for with_teacher in (False, True):
            teacher = dense if with_teacher else None
            best: dict[str, float] = {}
            for _ in range(args.repeats):
                variants = {"plain": lambda: plain_loop(copy.deepcopy(student), teacher, loader_for(1), False),
                            "tool": lambda: tool_loop(copy.deepcopy(student), teacher, loader_for, test, "auto")}
                if convs:
                    variants["plain channels-last"] = lambda: plain_loop(copy.deepcopy(student), teacher,
                                                                         loader_for(1), True)
                    variants["tool contiguous"] = lambda: tool_loop(copy.deepcopy(student), teacher, loader_for,
                                                                    test, "contiguous")
                for key, fn in variants.items():
                    best[key] = max(best.get(key, 0.0), fn())
            row = {"model": name, "teacher": with_teacher, "data only": loading[kind], **best}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"info": machine_info("cpu"), "rows": rows}


def two_processes(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """`tncompress finetune` of the Tucker-2 ResNet-20 under torchrun, 2 gloo processes of 1 thread
    with batch 64 each, against 1 process of 2 threads with batch 128 (the same global batch)."""
    import tncompress
    from tncompress.models import ModelSpec

    source = workdir / "t2.pt"
    tncompress.save(_decomposed(_dense_resnet20(), "tucker2"), source, spec=ModelSpec(**SPEC_ARGS))
    rows = []
    for nproc, batch, threads in ((1, BATCH, 2), (2, BATCH // 2, 1)):
        out = workdir / f"ft{nproc}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TNCOMPRESS_NO_DOWNLOAD="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "tncompress", "finetune", str(source), "--dataset",
                   f"folder:{SHARED / 'data' / 'cifar10-jpeg'}", "--mean", ",".join(map(str, MEAN)),
                   "--std", ",".join(map(str, STD)), "--augment", "--limit-train", str(args.images),
                   "--limit-test", "500", "--epochs", "1", "--batch-size", str(batch), "--lr", "0.01",
                   "--device", "cpu", "-o", str(out)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"torchrun with {nproc} process(es) failed:\n{done.stdout}\n{done.stderr}")
        import torch

        history = torch.load(out, weights_only=True)["metadata"]["training"]["history"][0]
        rows.append({"processes": nproc, "batch_per_process": batch, "threads_per_process": threads,
                     "images_per_second": history["images_per_second"], "wall_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/train-speed")
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", default="PASSIVE,default",
                        help="OpenMP wait policies to run under, each in its own process ('default': unset)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-processes", action="store_true", help="do not run the torchrun comparison")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results: dict[str, Any] = {"args": vars(args), "policies": {}}
    for policy in args.policies.split(","):
        env = dict(os.environ, TNCOMPRESS_DATA=str(SHARED / "data"))
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        command = [sys.executable, __file__, "--worker", "--images", str(args.images), "--repeats",
                   str(args.repeats), "--threads", str(args.threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
        if done.returncode != 0:
            raise SystemExit(f"the {policy} worker failed:\n{done.stderr}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        results["policies"][policy] = json.loads(line[len("RESULT "):])
    if not args.skip_processes:
        with tempfile.TemporaryDirectory() as tmp:
            results["processes"] = two_processes(args, Path(tmp))
    out = ROOT / args.out
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    """The Markdown tables of docs/train-speed.md."""
    args = results["args"]
    lines = ["# Training throughput: the tool's loop against a plain PyTorch loop", ""]
    for policy, part in results["policies"].items():
        info = part["info"]
        lines += [f"## OMP_WAIT_POLICY={policy if policy != 'default' else '(unset)'} ({info['summary']})", "",
                  f"Images per second of the training pass (batch {BATCH}, SGD, best of {args['repeats']} passes "
                  f"over {args['images']:,} training images). 'data only': iterating the DataLoader without a "
                  "model. 'plain': a hand-written loop on the same DataLoader; "
                  "'tool': `tncompress.train.train` as `tncompress finetune` runs it (default layout: channels-last "
                  "for conv models). Ratio = tool / the faster plain loop.", "",
                  "| model | teacher | data only | plain | plain channels-last | tool | tool contiguous | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            plain_best = max(r["plain"], r.get("plain channels-last", 0.0))
            lines.append(f"| {r['model']} | {'yes' if r['teacher'] else 'no'} | {r['data only']:.0f} | "
                         f"{r['plain']:.0f} | "
                         f"{r.get('plain channels-last', float('nan')):.0f} | {r['tool']:.0f} | "
                         f"{r.get('tool contiguous', float('nan')):.0f} | {r['tool'] / plain_best:.2f} |")
        lines.append("")
    if results.get("processes"):
        lines += ["## Two gloo processes against one (torchrun, same global batch)", "",
                  "`tncompress finetune` of the Tucker-2 ResNet-20, 1 epoch on the same images; img/s of the "
                  "training pass from the checkpoint's history, wall time of the whole command (start-up, data "
                  "decoding and evaluation included).", "",
                  "| processes | batch per process | threads per process | img/s | wall s |", "|---|---|---|---|---|"]
        for r in results["processes"]:
            lines.append(f"| {r['processes']} | {r['batch_per_process']} | {r['threads_per_process']} | "
                         f"{r['images_per_second']:.0f} | {r['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
