"""Product-of-sums layers (ProdSumNet, C. W. Wu 2018): ``recipe method: prodsum``.

W = Π_j Σ_k g(a_jk)·M_jk with fixed bases rebuilt from a seed and trainable scalars a_jk; a Linear
gets :class:`~tncompress.layers.ProdSumLinear`, a Conv2d the same factorization of its unfolded
kernel (:class:`~tncompress.layers.ProdSumConv2d`). There is no rank: the budget does not apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tncompress.decompositions import prodsum as ps
from tncompress.layers import FactorizedLayer, ProdSumConv2d, ProdSumLinear
from tncompress.methods import register
from tncompress.methods.base import Method, Planned, Settings, any_int, conv_kwargs, one_of, positive_int, setting, unchecked

_LAYER_KEYS = ("p", "terms", "family", "seed", "widths", "g", "density")


@dataclass(frozen=True)
class ProdSumSettings(Settings):
    p: Any = setting(1, positive_int, "number of factors")
    terms: Any = setting(16, unchecked, "summed bases per factor (one value or one per factor)")
    family: Any = setting("gaussian", unchecked, f"basis family per factor: {', '.join(ps.FAMILIES)}")
    seed: Any = setting(0, any_int, "seed the fixed bases are rebuilt from")
    widths: Any = setting(None, unchecked, "the p − 1 inner sizes (default min(in, out))")
    g: Any = setting("identity", one_of(*ps.G_FUNCTIONS), "the scalar map g")
    density: Any = setting(0.05, unchecked, "density of sparse bases, in (0, 1]")
    sweeps: Any = setting(8, positive_int, "alternating least-squares sweeps for p > 1")


class ProdSumMethod(Method):
    dense_compute = True  # the conv / matmul runs on the assembled dense weight
    name = "prodsum"
    order = 50
    types = ("Linear", "Conv2d")
    settings = ProdSumSettings
    summary = "product of sums of fixed bases with trainable scalars (Linear, or a Conv2d's unfolded kernel)"

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return ProdSumConv2d if isinstance(module, nn.Conv2d) else ProdSumLinear

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (ProdSumLinear, ProdSumConv2d)

    def plan(self, module: nn.Module, s: ProdSumSettings, where: str) -> Planned:
        """No rank: the layer (built by the planner) checks terms, families, widths and density."""
        if isinstance(module, nn.Conv2d):
            shape = conv_kwargs(module)
        else:
            assert isinstance(module, nn.Linear)
            shape = {"in_features": module.in_features, "out_features": module.out_features,
                     "bias": module.bias is not None}
        config = {**shape, **{k: getattr(s, k) for k in _LAYER_KEYS if s.is_given(k)}}
        layer = self.layer_class(module)(**config)  # validates, and gives the resolved structure
        assert isinstance(layer, (ProdSumLinear, ProdSumConv2d))
        return Planned(layer.config(), list(layer.terms), [],
                       f"prodsum p={layer.p}, terms {layer.terms}, family {layer.factor_config()['family']}")

    def factorize(self, module: nn.Module, config: dict[str, Any], s: ProdSumSettings) -> nn.Module:
        kwargs = {k: config[k] for k in _LAYER_KEYS}
        if isinstance(module, nn.Conv2d):
            return ProdSumConv2d.from_dense(module, sweeps=s.sweeps, **kwargs)
        assert isinstance(module, nn.Linear)
        return ProdSumLinear.from_dense(module, sweeps=s.sweeps, **kwargs)


register(ProdSumMethod())
