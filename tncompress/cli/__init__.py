"""The ``tncompress`` command line: parses arguments, calls the library, renders with rich.

One module per command (``plan``, ``decompose``, ``report``, ``export``, ``train``/``finetune``,
``sweep``); each registers itself on the shared typer app of :mod:`tncompress.cli.common`.
"""
from __future__ import annotations

import os
import sys

# Set before torch is imported: busy-waiting OpenMP threads starve each other on small or shared
# machines (measured 3× to 1000× slowdowns of the decompositions on 2 cores with another process busy),
# so the decomposing commands let idle threads sleep. `report`, `train` and `finetune` keep OpenMP's
# default: sleeping threads cost tens of µs to wake for every small op, which made batch-1 latency up
# to 2× worse than a deployed model sees (docs/performance.md) and cost training 10-37% of its
# throughput on ResNet-20 (docs/train-speed.md). An OMP_WAIT_POLICY set by the user always wins.
_COMMAND = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
if _COMMAND not in ("report", "train", "finetune"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402

from tncompress.cli.common import app, console, err_console  # noqa: E402

# Importing a command's module registers it on the app; this order is the order of `tncompress --help`.
COMMAND_MODULES = ("plan", "decompose", "report", "export", "train", "sweep")
for _name in COMMAND_MODULES:
    importlib.import_module(f"tncompress.cli.{_name}")

__all__ = ["app", "console", "err_console", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
