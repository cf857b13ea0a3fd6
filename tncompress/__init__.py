"""tncompress: make trained PyTorch models smaller and faster with tensor decompositions.

The Python API mirrors the command line::

    import tncompress
    spec = tncompress.ModelSpec("torchvision:resnet18", {"num_classes": 10}, input_shape=[1, 3, 32, 32])
    model = tncompress.build_model(spec)           # or your trained model
    recipe = tncompress.build_recipe(budget="params:0.5")   # or tncompress.load_recipe("configs/….yaml")
    result = tncompress.decompose(model, recipe, input_shape=spec.input_shape)
    tncompress.save(result, "r18-half.pt", spec=spec)
    model = tncompress.load("r18-half.pt")
"""
from __future__ import annotations

import importlib
from typing import Any

from tncompress._version import __version__

_EXPORTS = {
    "decompose": "tncompress.compress",
    "DecomposeResult": "tncompress.compress",
    "save": "tncompress.api",
    "load": "tncompress.checkpoint",
    "load_model": "tncompress.checkpoint",
    "load_recipe": "tncompress.recipe",
    "parse_recipe": "tncompress.recipe",
    "build_recipe": "tncompress.recipe",
    "make_plan": "tncompress.compress",
    "ModelSpec": "tncompress.models",
    "build_model": "tncompress.models",
    "build_report": "tncompress.report",
    "count_macs": "tncompress.measure",
    "count_params": "tncompress.measure",
    "TncompressError": "tncompress.errors",
}


def __getattr__(name: str) -> Any:
    # Lazy, so ``import tncompress`` stays cheap and loading a model never needs tensorly.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tncompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, "__version__"])


__all__ = ["__version__", *_EXPORTS]
