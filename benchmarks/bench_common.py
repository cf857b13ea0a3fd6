"""What every benchmark needs: the machine description stated in each table, and a timer
(host clock on the CPU, CUDA events on a GPU) returning the median of repeated runs after warm-up."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """Machine, threads, library versions and the OpenMP wait settings, for every table's header."""
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "kind": device,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(unset)"),
        "date": time.strftime("%Y-%m-%d"),
    }
    info["summary"] = (f"{info['device']}, {device}, {info['cores']} cores, {info['threads']} threads, torch "
                       f"{info['torch']}, OMP_WAIT_POLICY={info['omp_wait_policy']}, "
                       f"GOMP_SPINCOUNT={info['gomp_spincount']}, {info['date']}")
    return info


def median_ms(fn: Callable[[], object], device: str = "cpu", warmup: int = 3, repeats: int = 15) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
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
