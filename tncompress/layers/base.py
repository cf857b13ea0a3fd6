"""The contract every factorized layer in :mod:`tncompress.layers` follows.

Layers depend on torch only, so a compressed model runs where tensorly is not installed.
Each layer class:

* ``method``: class attribute, the recipe name of the method ("tt", "lowrank", "cp", "tucker2").
* ``config() -> dict``: JSON-safe constructor keyword arguments; ``type(layer)(**layer.config())``
  rebuilds a layer of identical structure (parameter names and shapes), so a checkpoint's state
  dict loads into it with ``strict=True``.
* ``from_dense(module, ...)``: a classmethod that initialises the layer from a trained dense
  ``nn.Linear`` / ``nn.Conv2d`` (decomposition done in float64, cast back to the module's dtype and
  device).
* ``reset_parameters()``: random initialisation with the variance of the dense layer it replaces.
* ``to_dense()``: the equivalent dense ``nn.Linear`` / ``nn.Conv2d`` (same dtype and device).
* ``macs_per_sample(input_hw=None) -> int``: multiply-accumulates of one forward for one sample
  (for convs, ``input_hw`` is the input's (H, W)); equals FlopCounterMode's FLOPs / 2.
* ``extra_repr()``: shapes and ranks.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn


class FactorizedLayer(nn.Module):
    """Base class: shared bookkeeping for factorized layers."""

    method: ClassVar[str] = ""

    def config(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dense(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:  # pragma: no cover
        raise NotImplementedError
