"""Small conveniences of the Python API that join several modules."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tncompress.checkpoint import save_compressed
from tncompress.compress import DecomposeResult
from tncompress.models import ModelSpec


def save(result: DecomposeResult, path: str | Path, *, spec: ModelSpec | None,
         recipe: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> None:
    """Write a :class:`DecomposeResult` as a compressed checkpoint that :func:`tncompress.load` rebuilds."""
    if spec is not None and spec.input_shape is None and "input_shape" in result.calibration:
        spec = ModelSpec(spec.arch, spec.kwargs, spec.imports, list(result.calibration["input_shape"]))
    save_compressed(path, result.model, spec=spec, plan=[p.to_dict() for p in result.plan],
                    recipe=recipe, metadata={**result.metadata(), **(metadata or {})})
