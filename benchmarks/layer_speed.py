"""Layer speed: TTLinear at the VGG-16 fc6 shape against nn.Linear, and CP / Tucker-2 against dense
convolutions at ResNet-18 shapes, on CPU or CUDA. Medians of repeated runs after warm-up; on CUDA,
timed with CUDA events. Writes JSON and a Markdown table.

    python benchmarks/layer_speed.py --device cpu --out docs/layer-speed-cpu
    python benchmarks/layer_speed.py --device cuda --out docs/layer-speed-cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tncompress.layers import CPConv2d, TTLinear, Tucker2Conv2d
from tncompress.measure import count_macs, count_params

FC6 = dict(in_features=25088, out_features=4096, in_modes=[2, 7, 8, 8, 7, 4], out_modes=[4, 4, 4, 4, 4, 4])
# (cin, cout, stride, input H=W) of ResNet-18's 3×3 convs at 224×224 input
R18_CONVS = [(64, 64, 1, 56), (64, 128, 2, 56), (128, 128, 1, 28), (128, 256, 2, 28), (256, 256, 1, 14),
             (256, 512, 2, 14), (512, 512, 1, 7)]


def timer(device: str) -> Callable[[Callable[[], object], int, int], float]:
    """Median milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    def run(fn: Callable[[], object], warmup: int = 3, repeats: int = 15) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device == "cuda":
            torch.cuda.synchronize()
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def fwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def f() -> object:
        with torch.inference_mode():
            return layer(x)
    return f


def fwd_bwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def f() -> object:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
    return f


def peer_tt_linear(rank: int) -> nn.Module | None:
    """tensorly-torch's TT layer (factorization blocktt, implementation factorized) at the fc6 shape
    and the same TT-ranks, or None when tensorly-torch is not installed (pip install '.[bench]')."""
    try:
        import tltorch
    except ImportError:
        return None
    return tltorch.FactorizedLinear(in_tensorized_features=tuple(FC6["in_modes"]),
                                    out_tensorized_features=tuple(FC6["out_modes"]), factorization="blocktt",
                                    rank=[1] + [rank] * (len(FC6["in_modes"]) - 1) + [1], implementation="factorized")


def gemm_rate(device: str, measure) -> float:
    """Achieved float32 GFLOP/s of a square GEMM (the machine's arithmetic rate, same run)."""
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    ms = measure(lambda: a @ b, 2, 5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/layer-speed")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = args.device
    measure = timer(device)
    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
    info["gemm_gflops"] = round(gemm_rate(device, measure), 1)
    rows = []
    dense = nn.Linear(FC6["in_features"], FC6["out_features"]).to(device)
    batches = [1, 64, 256]
    for batch in batches:
        x = torch.randn(batch, FC6["in_features"], device=device)
        xg = x.clone().requires_grad_(False)
        base_f = measure(fwd(dense, x))
        base_fb = measure(fwd_bwd(dense, xg), 2, 7)
        rows.append({"layer": "fc6 nn.Linear", "rank": None, "batch": batch, "params": count_params(dense),
                     "macs": count_macs(dense, x).total, "fwd_ms": base_f, "fwd_bwd_ms": base_fb})
        for rank in (1, 2, 4, 8):
            tt = TTLinear(**FC6, ranks=rank).to(device)
            f, fb = measure(fwd(tt, x)), measure(fwd_bwd(tt, xg), 2, 7)
            row = {"layer": "fc6 TTLinear", "rank": rank, "batch": batch, "params": count_params(tt),
                   "macs": count_macs(tt, x).total, "fwd_ms": f, "fwd_bwd_ms": fb,
                   "speedup_fwd": base_f / f, "speedup_fwd_bwd": base_fb / fb}
            peer = peer_tt_linear(rank)
            if peer is not None:
                peer = peer.to(device)
                assert count_params(peer) == row["params"], "peer and tncompress must have the same TT structure"
                row["peer_fwd_ms"] = measure(fwd(peer, x))
                row["peer_fwd_bwd_ms"] = measure(fwd_bwd(peer, xg), 2, 7)
            rows.append(row)
    conv_rows = []
    batch = 64 if device == "cuda" else 8
    for cin, cout, stride, hw in R18_CONVS:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(device)
        x = torch.randn(batch, cin, hw, hw, device=device)
        base = measure(fwd(conv, x))
        entry = {"shape": f"{cin}→{cout}, stride {stride}, {hw}×{hw} input", "batch": batch, "dense_ms": base,
                 "dense_macs": count_macs(conv, x).total}
        for name, layer in (("cp", CPConv2d(cin, cout, 3, rank=max(1, int(0.3 * cout * cin * 9 / (cin + cout + 9))),
                                            stride=stride, padding=1)),
                            ("tucker2", Tucker2Conv2d(cin, cout, 3, ranks=(max(1, cin // 2), max(1, cout // 2)),
                                                      stride=stride, padding=1))):
            layer = layer.to(device)
            ms = measure(fwd(layer, x))
            entry[f"{name}_ms"] = ms
            entry[f"{name}_macs"] = count_macs(layer, x).total
            entry[f"{name}_speedup"] = base / ms
            entry[f"{name}_mac_ratio"] = entry["dense_macs"] / entry[f"{name}_macs"]
        conv_rows.append(entry)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "linear": rows, "conv": conv_rows}, indent=2))
    lines = [f"# Layer speed on {info['device']} ({device}, {info['threads']} threads, torch {info['torch']})", "",
             f"float32; medians after warm-up{' (CUDA events)' if device == 'cuda' else ''}. Measured GEMM rate "
             f"{info['gemm_gflops']} GFLOP/s; 'floor' = MACs·2 / that rate. Generated by `benchmarks/layer_speed.py`.", "",
             "## VGG-16 fc6 (25,088 → 4,096), TT modes 2·7·8·8·7·4 → 4^6", "",
             "Speed-ups are against `nn.Linear`; 'vs peer' is tensorly-torch 0.5's `FactorizedLinear` "
             "(blocktt, factorized) with the same modes and ranks (same parameter count, checked), same run.", "",
             "| layer | rank | batch | params | MACs | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | "
             "time / floor | peer fwd ms | fwd vs peer | peer fwd+bwd ms | fwd+bwd vs peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = 2 * r["macs"] / (info["gemm_gflops"] * 1e9) * 1e3
        peer = (f"{r['peer_fwd_ms']:.3f} | {r['peer_fwd_ms'] / r['fwd_ms']:.1f}× | {r['peer_fwd_bwd_ms']:.3f} | "
                f"{r['peer_fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}×") if "peer_fwd_ms" in r else "– | – | – | –"
        lines.append(f"| {r['layer']} | {r['rank'] or '–'} | {r['batch']} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r.get('speedup_fwd', 1.0):.1f}× | "
                     f"{r.get('speedup_fwd_bwd', 1.0):.1f}× | {r['fwd_ms'] / floor:.1f} | {peer} |")
    lines += ["", f"## ResNet-18 3×3 convolutions (224×224 model input), batch {batch}: dense vs CP (30% params, 3conv) "
              "vs Tucker-2 (half the channels)", "",
              "| shape | dense ms | CP ms | CP speed-up | CP MAC ratio | Tucker-2 ms | Tucker-2 speed-up | Tucker-2 MAC ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for c in conv_rows:
        lines.append(f"| {c['shape']} | {c['dense_ms']:.3f} | {c['cp_ms']:.3f} | {c['cp_speedup']:.2f}× | "
                     f"{c['cp_mac_ratio']:.2f}× | {c['tucker2_ms']:.3f} | {c['tucker2_speedup']:.2f}× | "
                     f"{c['tucker2_mac_ratio']:.2f}× |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
