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
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tncompress.errors import TncompressError
from tncompress.layers.base import merged

log = logging.getLogger(__name__)

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


# Relative spread (IQR / median) thresholds of the latency measurements, both from
# torch.utils.benchmark: 0.1 is adaptive_autorange's default stopping threshold and the level at which
# its Measurement warns of "system fluctuation"; 0.25 is where it warns of "significant environmental
# influence". Above 0.25 the middle half of the measurements spans more than a quarter of the median,
# wider than most speed-ups a decomposition buys, so the report says "noisy machine" instead of a figure.
STABLE_IQR = 0.1
NOISY_IQR = 0.25

LATENCY_RULE = ("forward latency with the factorized layers merged for inference, under torch.inference_mode; "
                "every model of the report warmed up, then timed together in interleaved rounds (A, B, C, A, "
                "B, C, ...) with torch.utils.benchmark.Timer.blocked_autorange, until every model's IQR / median "
                f"is at most {STABLE_IQR:g} or the time budget is spent; median and quartiles of the per-run "
                "times of all rounds; a speed-up (baseline median / model median) is significant only when the "
                "two interquartile ranges do not overlap, and is not given when either IQR / median is above "
                f"{NOISY_IQR:g} (noisy machine)")


# Builds the timer of one model: an object with ``blocked_autorange(min_run_time=...)`` returning a
# measurement with ``times`` (seconds per run, one per timed block), ``raw_times`` and
# ``number_per_run``, as torch.utils.benchmark's Timer and Measurement have.
TimerFactory = Callable[[nn.Module, torch.Tensor], Any]


def torch_timer(model: nn.Module, example: torch.Tensor) -> Any:
    """A ``torch.utils.benchmark.Timer`` running ``model(example)`` with the current thread count
    (its own default is one thread); its clock synchronises an accelerator around each block."""
    from torch.utils.benchmark import Timer

    return Timer(stmt="model(example)", globals={"model": model, "example": example},
                 num_threads=torch.get_num_threads(), label="tncompress latency")


@dataclass
class LatencyStats:
    """Per-run forward times of one model in milliseconds, over every round of an interleaved run."""

    median_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    measurements: int  # timed blocks (each the mean of ``runs / measurements`` forwards on average)
    runs: int          # forwards timed (warm-up and block-size estimation not counted)
    rounds: int
    stable: bool       # every model of the run reached IQR / median <= STABLE_IQR before the budget ran out

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    @property
    def relative_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else math.inf

    def noisy(self, threshold: float = NOISY_IQR) -> bool:
        """Whether the spread is too wide for a figure (see :data:`NOISY_IQR`)."""
        return not self.relative_iqr <= threshold

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms,
                "p90_ms": self.p90_ms, "iqr_ms": self.iqr_ms, "relative_iqr": self.relative_iqr,
                "measurements": self.measurements, "runs": self.runs, "rounds": self.rounds, "stable": self.stable,
                "noisy": self.noisy()}

    @classmethod
    def from_times(cls, times_s: Sequence[float], runs: int, rounds: int, stable: bool) -> LatencyStats:
        """Quantiles (linear interpolation, as torch.utils.benchmark's Measurement) of times in seconds."""
        q = torch.tensor(list(times_s), dtype=torch.float64).quantile(
            torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).mul(1e3).tolist()
        return cls(median_ms=q[2], p10_ms=q[0], p25_ms=q[1], p75_ms=q[3], p90_ms=q[4], measurements=len(times_s),
                   runs=runs, rounds=rounds, stable=stable)


def _relative_iqr(times: Sequence[float]) -> float:
    q = torch.tensor(list(times), dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float((q[2] - q[0]) / q[1]) if float(q[1]) > 0 else math.inf


def measure_latencies(models: Sequence[nn.Module], examples: Sequence[torch.Tensor], *, warmup: int = 3,
                      min_rounds: int = 5, max_rounds: int = 100, round_seconds: float = 0.05,
                      max_seconds: float = 10.0, stable_iqr: float = STABLE_IQR,
                      timer_factory: TimerFactory | None = None) -> list[LatencyStats]:
    """Time ``models[i](examples[i])`` for all models together, interleaved round by round.

    Why interleaved: a background process or a clock change during one model's block of runs turned
    into a fictional speed-up when models were timed one after the other; in rounds it hits every
    model alike. Each model is warmed up (``warmup`` forwards), then every round gives each model one
    ``blocked_autorange(min_run_time=round_seconds)`` of its timer (``torch.utils.benchmark.Timer``
    unless ``timer_factory`` builds another, as tests do). Rounds stop after ``min_rounds`` once every
    model's IQR / median is at most ``stable_iqr``, or when ``max_seconds`` of wall time (counted from
    the first round) or ``max_rounds`` are spent. Factorized layers are merged for inference.
    """
    if len(models) != len(examples) or not models:
        raise ValueError("measure_latencies needs one example per model and at least one model")
    make = timer_factory or torch_timer
    times: list[list[float]] = [[] for _ in models]
    runs = [0] * len(models)
    rounds, stable = 0, False
    with torch.inference_mode(), contextlib.ExitStack() as stack:  # deployed inference: batch-independent work once
        for model in models:
            stack.enter_context(merged(model))
        for model, example in zip(models, examples):
            for _ in range(warmup):
                model(example)
        if any(e.is_cuda for e in examples):
            torch.cuda.synchronize()
        timers = [make(model, example) for model, example in zip(models, examples)]
        started = time.perf_counter()
        while rounds < max_rounds:
            for i, timer in enumerate(timers):
                measurement = timer.blocked_autorange(min_run_time=round_seconds)
                times[i].extend(float(t) for t in measurement.times)
                runs[i] += int(measurement.number_per_run) * len(measurement.raw_times)
            rounds += 1
            if rounds < min_rounds:
                continue
            if all(_relative_iqr(t) <= stable_iqr for t in times):
                stable = True
                break
            if time.perf_counter() - started > max_seconds:
                break
    log.debug("latency: %d rounds of %d models, stable=%s", rounds, len(models), stable)
    return [LatencyStats.from_times(t, n, rounds, stable) for t, n in zip(times, runs)]


def compare_latency(base: LatencyStats | dict[str, Any], other: LatencyStats | dict[str, Any], *,
                    noisy_iqr: float = NOISY_IQR) -> dict[str, Any]:
    """Speed-up of ``other`` against ``base`` (baseline median / model median) with the interval
    [base p25 / other p75, base p75 / other p25]: it excludes 1 exactly when the two interquartile
    ranges do not overlap, the rule for calling the speed-up significant. When either spread is above
    ``noisy_iqr`` the verdict is "noisy machine" and nothing is significant."""
    b = base.to_dict() if isinstance(base, LatencyStats) else base
    o = other.to_dict() if isinstance(other, LatencyStats) else other
    speedup = b["median_ms"] / o["median_ms"] if o["median_ms"] > 0 else None
    low = b["p25_ms"] / o["p75_ms"] if o["p75_ms"] > 0 else None
    high = b["p75_ms"] / o["p25_ms"] if o["p25_ms"] > 0 else None
    noisy = not all(_spread(s) <= noisy_iqr for s in (b, o))
    if noisy or speedup is None or low is None or high is None:
        verdict = "noisy machine"
    elif low > 1:
        verdict = "faster"
    elif high < 1:
        verdict = "slower"
    else:
        verdict = "not significant"
    return {"speedup": speedup, "speedup_low": low, "speedup_high": high,
            "speedup_significant": verdict in ("faster", "slower"), "speedup_verdict": verdict}


def _spread(stats: dict[str, Any]) -> float:
    """IQR / median of a latency record (inf when the median is not positive)."""
    median = stats["median_ms"]
    return (stats["p75_ms"] - stats["p25_ms"]) / median if median > 0 else math.inf


def measure_latency(model: nn.Module, example: torch.Tensor, *, warmup: int = 3, max_seconds: float = 10.0,
                    **options: Any) -> dict[str, Any]:
    """Median and spread of one model's forward latency in milliseconds, timed as
    :func:`measure_latencies` times several (``options`` go to it), plus the thread count and batch."""
    [stats] = measure_latencies([model], [example], warmup=warmup, max_seconds=max_seconds, **options)
    return {**stats.to_dict(), "threads": torch.get_num_threads(), "batch": int(example.shape[0])}


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
