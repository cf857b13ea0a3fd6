"""Measurements: parameters, bytes on disk, MACs of the ops actually run, latency.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2): it counts matrix
multiplies and convolutions, not element-wise ops (activations, bias adds, batch norm, pooling).
Two gaps of the counter are closed here (:func:`mac_counter`): PyTorch's fused attention fast path
(``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode) runs native kernels the
counter does not see, so counting runs with that fast path off (same arithmetic, countable ops); and
the CPU kernel of ``F.scaled_dot_product_attention`` has no formula in torch, so one is added (the
two products ``Q·Kᵀ`` and ``weights·V``).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tncompress.errors import TncompressError
from tncompress.layers.base import merged

MAC_RULE = ("MACs = FLOPs / 2 of the matmul, attention and convolution ops run in one inference forward pass at "
            "batch 1 with the factorized layers merged for inference (one-off work such as merging TT cores "
            "done beforehand), counted by "
            "torch.utils.flop_counter.FlopCounterMode with PyTorch's fused attention fast path off (the same "
            "arithmetic through countable ops); element-wise ops (bias, activations, softmax, norms, pooling) "
            "and embedding lookups are not counted")


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_buffers(model: nn.Module) -> int:
    return sum(b.numel() for b in model.buffers())


def file_bytes(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size


@dataclass
class MacCount:
    """Total MACs of one forward and the MACs of each module (qualified names, root = "")."""

    total: int
    per_module: dict[str, int] = field(default_factory=dict)


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of scaled dot-product attention: ``Q·Kᵀ`` and ``weights·V`` (batch and heads leading;
    grouped-query key/value heads broadcast to the query's)."""
    *lead, length, d_qk = (int(s) for s in query_shape)
    source, d_v = int(key_shape[-2]), int(value_shape[-1])
    return 2 * math.prod(lead) * length * source * (d_qk + d_v)


def _extra_formulas() -> dict[Any, Any]:
    ops = torch.ops.aten
    return {getattr(ops, name): _sdpa_flops for name in ("_scaled_dot_product_flash_attention_for_cpu",)
            if hasattr(ops, name)}


def mac_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU attention kernel (use inside :func:`countable_attention`)."""
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


@contextlib.contextmanager
def countable_attention() -> Iterator[None]:
    """Turn PyTorch's fused MultiheadAttention / TransformerEncoderLayer fast path off for the block:
    its native kernels are invisible to FlopCounterMode (ViT-B/16 counted 11.3 G MACs of its 17.6 G).
    The slow path does the same arithmetic with countable ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:  # pragma: no cover - torch without the switch
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def count_macs(model: nn.Module, example: torch.Tensor) -> MacCount:
    """MACs of one forward of ``model`` on ``example`` (divide by the batch size for per-sample)."""
    root = type(model).__name__
    counter = mac_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), merged(model), countable_attention():
            model(example)  # warm-up: merged layers precompute their schedules' batch-independent work
            with counter:
                model(example)
    finally:
        model.train(was_training)
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else key
        per_module[name] = int(sum(ops.values()) // 2)
    return MacCount(int(counter.get_total_flops() // 2), per_module)


def measure_latency(model: nn.Module, example: torch.Tensor, *, warmup: int = 3, repeats: int = 20,
                    max_seconds: float = 10.0) -> dict[str, float]:
    """Median and spread of wall-clock forward latency in milliseconds (CUDA synchronised), with
    the factorized layers merged for inference (:func:`tncompress.layers.merged`)."""
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times: list[float] = []
    with torch.inference_mode(), merged(model):  # deployed inference: batch-independent work done once
        for _ in range(warmup):
            model(example)
        sync()
        budget_end = time.perf_counter() + max_seconds
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            if time.perf_counter() > budget_end and len(times) >= 3:
                break
    ordered = sorted(times)
    return {"median_ms": statistics.median(times), "p10_ms": ordered[len(ordered) // 10],
            "p90_ms": ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)], "runs": len(times),
            "threads": torch.get_num_threads(), "batch": int(example.shape[0])}


def parse_shape(text: str | Sequence[int]) -> list[int]:
    """``"1,3,32,32"`` → ``[1, 3, 32, 32]`` (also accepts ``x`` as the separator)."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    parts = re.split(r"[,x×]", text.replace(" ", ""))
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise TncompressError(f"input shape {text!r}: expected positive integers like 1,3,32,32")
    shape = [int(p) for p in parts]
    per_sample = 1
    for size in shape[1:]:
        per_sample *= size
    if per_sample > MAX_SAMPLE_ELEMENTS:
        raise TncompressError(f"input shape {text!r}: {per_sample:,} values per sample is more than the "
                              f"{MAX_SAMPLE_ELEMENTS:,} tncompress accepts (is a dimension mistyped?)")
    return shape


MAX_SAMPLE_ELEMENTS = 1 << 28  # 1 GiB of float32 per sample: beyond that, a typo rather than a model input


class LargestTensorMode(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces inside the ``with`` block:
    the evidence that a factorized layer never materialises its dense weight."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
