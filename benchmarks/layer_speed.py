"""Layer speed: TTLinear at the VGG-16 fc6 shape against nn.Linear and tensorly-torch's TT layer, on
CPU or CUDA (the conv layers are in conv_speed.py). Medians of repeated runs after warm-up; on CUDA,
timed with CUDA events. Writes JSON and a Markdown table.

    python benchmarks/layer_speed.py --device cpu --out docs/layer-speed-cpu
    python benchmarks/layer_speed.py --device cuda --out docs/layer-speed-cuda
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import machine_info, median_ms
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tncompress.layers import TTLinear
from tncompress.measure import LargestTensorMode, count_macs, count_params

FC6 = dict(in_features=25088, out_features=4096, in_modes=[2, 7, 8, 8, 7, 4], out_modes=[4, 4, 4, 4, 4, 4])


def fwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def f() -> object:
        with torch.inference_mode():
            return layer(x)
    return f


def plain_macs(layer: nn.Module, x: torch.Tensor) -> int:
    """MACs of one inference forward computed from the parameters (no ``merge()`` snapshot), i.e.
    the forward as it runs in training and in eval without a snapshot."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        layer(x)
    return int(counter.get_total_flops() // 2)


def largest_tensor_mb(layer: nn.Module, x: torch.Tensor) -> float:
    """MB of the largest tensor made by one inference forward (after warm-up, so cached merged cores
    are not recounted) — for fc6 the dense W alone would be 411 MB."""
    with torch.inference_mode():
        layer(x)
        with LargestTensorMode() as mode:
            layer(x)
    return mode.largest * x.element_size() / 1e6


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

    def measure(fn: Callable[[], object], warmup: int = 3, repeats: int = 15) -> float:
        return median_ms(fn, device, warmup, repeats)

    torch.manual_seed(0)
    info = machine_info(device)
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
                     "macs": count_macs(dense, x).total, "fwd_ms": base_f, "fwd_bwd_ms": base_fb,
                     "largest_tensor_mb": largest_tensor_mb(dense, x)})
        for rank in (1, 2, 4, 8):
            tt = TTLinear(**FC6, ranks=rank).to(device).eval()
            f, fb = measure(fwd(tt, x)), measure(fwd_bwd(tt, xg), 2, 7)
            row = {"layer": "fc6 TTLinear", "rank": rank, "batch": batch, "params": count_params(tt),
                   "macs": plain_macs(tt, x), "fwd_ms": f, "fwd_bwd_ms": fb,
                   "largest_tensor_mb": largest_tensor_mb(tt, x),
                   "speedup_fwd": base_f / f, "speedup_fwd_bwd": base_fb / fb}
            # Deployed inference: merge() precomputes the batch-independent core contractions once
            # (an explicit snapshot; training and autograd never use it). Same layer, same run.
            tt.merge()
            mf = measure(fwd(tt, x))
            merged_row = {"layer": "fc6 TTLinear merged", "rank": rank, "batch": batch, "params": count_params(tt),
                          "macs": count_macs(tt, x).total, "fwd_ms": mf, "largest_tensor_mb": largest_tensor_mb(tt, x),
                          "speedup_fwd": base_f / mf}
            tt.unmerge()
            peer = peer_tt_linear(rank)
            if peer is not None:
                peer = peer.to(device)
                assert count_params(peer) == row["params"], "peer and tncompress must have the same TT structure"
                row["peer_fwd_ms"] = measure(fwd(peer, x))
                row["peer_fwd_bwd_ms"] = measure(fwd_bwd(peer, xg), 2, 7)
                row["peer_largest_tensor_mb"] = largest_tensor_mb(peer, x)
                merged_row["peer_fwd_ms"] = row["peer_fwd_ms"]
            rows.extend([row, merged_row])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "linear": rows}, indent=2))
    lines = [f"# TT layer speed ({info['summary']})", "",
             f"float32; medians after warm-up{' (CUDA events)' if device == 'cuda' else ''}. Measured GEMM rate "
             f"{info['gemm_gflops']} GFLOP/s; 'floor' = MACs·2 / that rate. Generated by `benchmarks/layer_speed.py`.", "",
             "## VGG-16 fc6 (25,088 → 4,096), TT modes 2·7·8·8·7·4 → 4^6", "",
             "Speed-ups are against `nn.Linear`; 'vs peer' is tensorly-torch 0.5's `FactorizedLinear` "
             "(blocktt, factorized) with the same modes and ranks (same parameter count, checked), same run.", "",
             "'largest tensor' is the biggest tensor one forward makes (MB; the dense fc6 W is 411 MB): the "
             "TT forward never forms W.", "",
             "'TTLinear' rows compute every forward from the cores (training, and eval without a snapshot); "
             "'TTLinear merged' rows are the same layer after `merge()` (what `report --latency` and "
             "MAC counting use): the batch-independent core contractions are done once, so MACs are lower "
             "and there is no backward (autograd always computes from the cores).", "",
             "| layer | rank | batch | params | MACs | fwd ms | GFLOP/s | floor ms | time / floor | largest tensor MB | "
             "fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | peer fwd ms | fwd vs peer | peer fwd+bwd ms | "
             "fwd+bwd vs peer | peer largest tensor MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = 2 * r["macs"] / (info["gemm_gflops"] * 1e9) * 1e3
        if "peer_fwd_bwd_ms" in r:
            peer = (f"{r['peer_fwd_ms']:.3f} | {r['peer_fwd_ms'] / r['fwd_ms']:.1f}× | {r['peer_fwd_bwd_ms']:.3f} | "
                    f"{r['peer_fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}× | {r['peer_largest_tensor_mb']:.1f}")
        elif "peer_fwd_ms" in r:
            peer = f"{r['peer_fwd_ms']:.3f} | {r['peer_fwd_ms'] / r['fwd_ms']:.1f}× | – | – | –"
        else:
            peer = "– | – | – | – | –"
        fb = f"{r['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r else "–"
        fb_speedup = f"{r.get('speedup_fwd_bwd', 1.0):.1f}×" if "fwd_bwd_ms" in r else "–"
        gflops = 2 * r["macs"] / (r["fwd_ms"] * 1e-3) / 1e9
        lines.append(f"| {r['layer']} | {r['rank'] or '–'} | {r['batch']} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['fwd_ms']:.3f} | {gflops:.0f} | {floor:.3f} | {r['fwd_ms'] / floor:.1f} | "
                     f"{r['largest_tensor_mb']:.1f} | {fb} | {r.get('speedup_fwd', 1.0):.1f}× | "
                     f"{fb_speedup} | {peer} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
