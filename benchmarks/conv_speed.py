"""Conv layer speed: every convolution shape of ResNet-18 (32×32 and 224×224 inputs) and VGG-16
(224×224) as dense, CP and Tucker-2 layers, with the shipped recipes' ranks (CP keeps 30% of each
layer's parameters, Tucker-2 50%), in both memory layouts (NCHW and channels-last).

For each shape: MACs and median forward latency of the three layers, the speed-up against dense
(best layout against best layout) and the ratio of that speed-up to the MAC reduction (1.0 means the
layer turns every MAC saved into time saved). Layers have random weights: speed does not depend on
the values. All latencies of one shape are measured in alternating rounds in the same run.

    python benchmarks/conv_speed.py --out docs/conv-speed-cpu [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import machine_info, median_ms
from torch import nn

from tncompress.compress import make_plan
from tncompress.layers import build_layer
from tncompress.layers.conv_base import conv_macs
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import parse_recipe

# The shipped recipes' rules (configs/resnet18-cp.yaml, configs/resnet18-tucker.yaml), applied to
# every conv that sees more than 3 input channels (the stems stay dense in the recipes).
RECIPES = {
    "cp": {"method": "cp", "rank": 0.3, "form": "3conv"},
    "tucker2": {"method": "tucker2", "rank": 0.5},
}
MODELS = [
    ("ResNet-18", ModelSpec("torchvision:resnet18", {"num_classes": 10}), 32, [1, 64]),
    ("ResNet-18", ModelSpec("torchvision:resnet18"), 224, [1]),
    ("VGG-16", ModelSpec("torchvision:vgg16"), 224, [1]),
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def conv_shapes(spec: ModelSpec, size: int) -> list[dict]:
    """Distinct (conv geometry, input shape) of a model, with how often each occurs and the
    planned CP and Tucker-2 structures for it."""
    model = build_model(spec).eval()
    plans = {}
    for method, rule in RECIPES.items():
        recipe = parse_recipe({"version": 1, "defaults": {"Conv2d": dict(rule)}})
        plans[method] = {p.name: p for p in make_plan(model, recipe, [1, 3, size, size])}
    shapes: dict[tuple, dict] = {}
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or conv.in_channels <= 3:
            continue
        cp, tk = plans["cp"][name], plans["tucker2"][name]
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               tuple(cp.input_shape[1:]))
        entry = shapes.setdefault(key, {"names": [], "conv": conv, "input": cp.input_shape[1:],
                                        "cp": cp.config, "tucker2": tk.config})
        entry["names"].append(name)
    return list(shapes.values())


def describe(entry: dict) -> str:
    conv, (_, h, w) = entry["conv"], entry["input"]
    k, s = conv.kernel_size, conv.stride
    return f"{conv.in_channels}→{conv.out_channels} {k[0]}×{k[1]}{' /' + str(s[0]) if s != (1, 1) else ''} @{h}×{w}"


def measure_shape(entry: dict, batch: int, device: str, rounds: int) -> dict:
    """Median ms of dense / CP / Tucker-2 in both layouts, measured in alternating rounds."""
    layers = {"dense": entry["conv"], "cp": build_layer("cp", entry["cp"]),
              "tucker2": build_layer("tucker2", entry["tucker2"])}
    x = torch.randn(batch, *entry["input"], device=device)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for name, layer in layers.items():
        for layout, fmt in LAYOUTS.items():
            m = copy.deepcopy(layer).eval().to(device=device, memory_format=fmt)
            fns[(name, layout)] = (lambda m=m, xin=x.contiguous(memory_format=fmt): m(xin))
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for key, fn in fns.items():
                times[key].append(median_ms(fn, device, warmup=2, repeats=3))
    ms = {k: statistics.median(v) for k, v in times.items()}
    hw = (entry["input"][1], entry["input"][2])
    macs = {"dense": conv_macs(entry["conv"], hw)[0] * batch,
            "cp": layers["cp"].macs_per_sample(hw) * batch,
            "tucker2": layers["tucker2"].macs_per_sample(hw) * batch}
    row = {"shape": describe(entry), "count": len(entry["names"]), "layers": entry["names"], "batch": batch,
           "cp_rank": entry["cp"]["rank"], "tucker2_ranks": entry["tucker2"]["ranks"]}
    for name in layers:
        row[f"{name}_macs"] = macs[name]
        for layout in LAYOUTS:
            row[f"{name}_{layout}_ms"] = ms[(name, layout)]
        row[f"{name}_ms"] = min(ms[(name, layout)] for layout in LAYOUTS)
        row[f"{name}_layout"] = min(LAYOUTS, key=lambda lay: ms[(name, lay)])
    for name in ("cp", "tucker2"):
        row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]
        row[f"{name}_mac_ratio"] = row["dense_macs"] / row[f"{name}_macs"]
        row[f"{name}_efficiency"] = row[f"{name}_speedup"] / row[f"{name}_mac_ratio"]
    return row


def markdown(info: dict, groups: list[dict]) -> list[str]:
    lines = [f"# Conv layer speed: dense vs CP vs Tucker-2 ({info['summary']})", "",
             "Every distinct convolution of the model (the 3-channel stems stay dense, as in the recipes), "
             "with the shipped recipes' ranks: CP keeps 30% of the layer's parameters (3-conv form), Tucker-2 "
             "50%. Median forward latency in NCHW and channels-last (CL); the speed-up compares the best "
             "layout of each layer against the best layout of dense; 'eff.' = speed-up ÷ MAC reduction "
             "(1.0: every MAC saved is time saved). ×n = how many layers of the model have the shape. "
             "Generated by `benchmarks/conv_speed.py`.", ""]
    for g in groups:
        rows = g["rows"]
        lines += [f"## {g['model']}, {g['size']}×{g['size']} input, batch {g['batch']}", "",
                  "| conv (input) | ×n | dense ms NCHW / CL | CP rank | CP ms NCHW / CL | CP speed-up | CP MACs ÷ | "
                  "CP eff. | Tucker-2 ranks | Tucker-2 ms NCHW / CL | Tucker-2 speed-up | Tucker-2 MACs ÷ | "
                  "Tucker-2 eff. |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['shape']} | {r['count']} | {r['dense_nchw_ms']:.3f} / {r['dense_channels_last_ms']:.3f} | "
                f"{r['cp_rank']} | {r['cp_nchw_ms']:.3f} / {r['cp_channels_last_ms']:.3f} | {r['cp_speedup']:.2f}× | "
                f"{r['cp_mac_ratio']:.2f} | {r['cp_efficiency']:.2f} | {r['tucker2_ranks']} | "
                f"{r['tucker2_nchw_ms']:.3f} / {r['tucker2_channels_last_ms']:.3f} | {r['tucker2_speedup']:.2f}× | "
                f"{r['tucker2_mac_ratio']:.2f} | {r['tucker2_efficiency']:.2f} |")
        tot = {name: sum(r[f"{name}_ms"] * r["count"] for r in rows) for name in ("dense", "cp", "tucker2")}
        macs = {name: sum(r[f"{name}_macs"] * r["count"] for r in rows) for name in ("dense", "cp", "tucker2")}
        lines += ["", f"All these convs of the model together (each shape × n): dense {tot['dense']:.2f} ms; "
                  f"CP {tot['cp']:.2f} ms ({tot['dense'] / tot['cp']:.2f}× for {macs['dense'] / macs['cp']:.2f}× "
                  f"fewer MACs); Tucker-2 {tot['tucker2']:.2f} ms ({tot['dense'] / tot['tucker2']:.2f}× for "
                  f"{macs['dense'] / macs['tucker2']:.2f}× fewer MACs).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="docs/conv-speed-cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info(args.device)
    groups = []
    for model_name, spec, size, batches in MODELS:
        entries = conv_shapes(spec, size)
        for batch in batches:
            rows = [measure_shape(e, batch, args.device, args.rounds) for e in entries]
            groups.append({"model": model_name, "size": size, "batch": batch, "rows": rows})
            print(f"{model_name} {size} b{batch}: done", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "groups": groups}, indent=2))
    out.with_suffix(".md").write_text("\n".join(markdown(info, groups)) + "\n")
    print("\n".join(markdown(info, groups)))


if __name__ == "__main__":
    main()
