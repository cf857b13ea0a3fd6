"""Factorized layers in pure torch (no tensorly needed at inference)."""
from __future__ import annotations

from typing import Any

from torch import nn

from tncompress.layers.base import FactorizedLayer, merged
from tncompress.layers.cp_conv import CPConv2d
from tncompress.layers.lowrank_conv import LowRankConv2d
from tncompress.layers.lowrank_embedding import LowRankEmbedding
from tncompress.layers.lowrank_linear import LowRankLinear
from tncompress.layers.prodsum_conv import ProdSumConv2d
from tncompress.layers.prodsum_linear import ProdSumLinear
from tncompress.layers.tt_embedding import TTEmbedding
from tncompress.layers.tt_linear import TTLinear
from tncompress.layers.tucker_conv import Tucker2Conv2d

LAYER_CLASSES: dict[str, type[FactorizedLayer]] = {
    "tt": TTLinear,
    "lowrank": LowRankLinear,
    "cp": CPConv2d,
    "tucker2": Tucker2Conv2d,
    "lowrank_conv": LowRankConv2d,  # what recipe method tucker2 builds for a 1×1 Conv2d
    "prodsum": ProdSumLinear,
    "prodsum_conv": ProdSumConv2d,  # what recipe method prodsum builds for a Conv2d
    "lowrank_embedding": LowRankEmbedding,
    "tt_embedding": TTEmbedding,
}


def build_layer(method: str, config: dict[str, Any]) -> nn.Module:
    """Build an (uninitialised-by-data) factorized layer of the given method from its ``config()``."""
    try:
        cls = LAYER_CLASSES[method]
    except KeyError:
        raise ValueError(f"unknown layer method {method!r}; known: {', '.join(LAYER_CLASSES)}") from None
    return cls(**config)


__all__ = ["FactorizedLayer", "TTLinear", "LowRankLinear", "CPConv2d", "Tucker2Conv2d", "ProdSumLinear", "ProdSumConv2d",
           "LowRankEmbedding", "TTEmbedding", "LowRankConv2d", "LAYER_CLASSES", "build_layer", "merged"]
