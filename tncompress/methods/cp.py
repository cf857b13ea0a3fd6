"""CP (canonical polyadic) decomposition of convolutions: ``recipe method: cp`` (Lebedev et al. 2015).

CP can degenerate (diverging components); the apply step then asks :meth:`CPMethod.fallback`,
which builds Tucker-2 at about the same parameter count (``fallback: tucker2``, the default) or
leaves the layer dense (``fallback: none``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress.decompositions.cp import DEFAULT_L2_REG
from tncompress.decompositions.ranks import cp_params, cp_rank_for_fraction, tucker2_ranks_for_fraction
from tncompress.errors import RankError
from tncompress.layers import CPConv2d, FactorizedLayer, Tucker2Conv2d
from tncompress.methods import register
from tncompress.methods.base import (
    Fallback,
    Ladder,
    Method,
    Planned,
    Settings,
    bad_rank,
    conv_kwargs,
    fraction,
    is_int,
    meta_macs,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
    rank_int,
    setting,
    unchecked,
)


@dataclass(frozen=True)
class CPSettings(Settings):
    rank: Any = setting(None, unchecked, "an integer, or a fraction of the layer's parameters")
    form: Any = setting("3conv", one_of("3conv", "4conv"), "3 convs (1×1, k×k depthwise, 1×1) or 4 (separable)")
    n_iter_max: Any = setting(100, positive_int, "ALS sweeps at most")
    tol: Any = setting(1e-7, non_negative_number, "stop when the relative error improves less than this")
    retries: Any = setting(2, non_negative_int, "restarts when the fit degenerates")
    l2_reg: Any = setting(DEFAULT_L2_REG, non_negative_number, "ridge term of the ALS updates")
    fallback: Any = setting("tucker2", one_of("tucker2", "none"), "what to build when CP degenerates")
    engine: Any = setting("als", one_of("als", "tensorly"), "this package's ALS or tensorly's parafac")


def _fit_kwargs(s: CPSettings, keys: Sequence[str] = ("n_iter_max", "tol", "retries", "l2_reg", "engine")
                ) -> dict[str, Any]:
    """The fit settings the recipe gave (the decomposition's own defaults apply to the rest)."""
    return {k: getattr(s, k) for k in keys if s.is_given(k)}


class CPMethod(Method):
    name = "cp"
    order = 30
    types = ("Conv2d",)
    settings = CPSettings
    summary = "CP of the conv kernel: 1×1 → depthwise k×k (or k×1 then 1×k) → 1×1"
    supports_budget = True

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return CPConv2d

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (CPConv2d,)

    def structure(self, module: nn.Module, s: CPSettings, where: str) -> Planned:
        assert isinstance(module, nn.Conv2d)
        return Planned({**conv_kwargs(module), "form": s.form}, None)

    def plan(self, module: nn.Module, s: CPSettings, where: str) -> Planned:
        assert isinstance(module, nn.Conv2d)
        notes: list[str] = []
        shape = tuple(module.weight.shape)
        rank = s.rank
        if rank is None:
            raise RankError(f"{where}: method cp needs a rank (an integer, or a fraction of parameters such as 0.3)")
        frac = fraction(rank, where)
        if frac is not None:
            r = cp_rank_for_fraction(shape, frac, s.form)
            notes.append(f"rank {r} keeps at most {frac:.0%} of the parameters")
        elif is_int(rank):
            r = rank_int(rank, where)
        else:
            raise bad_rank(rank, where, "an integer or a fraction in (0, 1]")
        return Planned({**conv_kwargs(module), "rank": int(r), "form": s.form}, int(r), notes)

    def factorize(self, module: nn.Module, config: dict[str, Any], s: CPSettings) -> nn.Module:
        assert isinstance(module, nn.Conv2d)
        return CPConv2d.from_dense(module, rank=config["rank"], form=config["form"], **_fit_kwargs(s))

    def degenerate(self, layer: nn.Module) -> str | None:
        info = getattr(layer, "fit_info", None) or {}
        if not info.get("degenerate"):
            return None
        return (f"CP degenerate after {info.get('attempts')} attempts "
                f"(component-norm ratio {info.get('norm_ratio', float('nan')):.3g})")

    def fit_note(self, layer: nn.Module) -> str | None:
        fit = getattr(layer, "fit_info", None)
        if not fit:
            return None
        return f"CP fit: rel. error {fit.get('rel_error', float('nan')):.3g}, {fit.get('attempts')} attempt(s)"

    def fallback(self, module: nn.Module, layer: nn.Module, s: CPSettings, why: str) -> Fallback | None:
        """Tucker-2 at about ``layer``'s parameter count, unless the recipe says ``fallback: none``."""
        if s.fallback == "none":
            return None
        assert isinstance(module, nn.Conv2d)
        size = sum(p.numel() for p in layer.parameters())
        dense = sum(p.numel() for p in module.parameters())
        r_out, r_in = tucker2_ranks_for_fraction(tuple(module.weight.shape), min(1.0, size / max(1, dense)))
        new = Tucker2Conv2d.from_dense(module, ranks=(r_in, r_out))
        return Fallback(new, "tucker2", new.config(), [r_in, r_out], f"tucker2 rank {[r_in, r_out]} ({why})",
                        f"fell back to Tucker-2 ranks [R_in={r_in}, R_out={r_out}] at the same parameter budget",
                        "Tucker-2")

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        assert isinstance(module, nn.Conv2d)
        shape = tuple(module.weight.shape)
        per, dense_w = cp_params(shape, 1, config["form"]), math.prod(shape)
        bias = shape[0] if module.bias is not None else 0
        macs1 = meta_macs(CPConv2d, {**config, "rank": 1}, in_shape) if want_macs else 0
        ranks = [r for r in range(1, dense_w // per + 1) if r * per < dense_w]
        return list(ranks), [r * per + bias for r in ranks], [r * macs1 for r in ranks]

    def approximations(self, module: nn.Module, config: dict[str, Any], s: CPSettings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        """CP-ALS per rank, with ``cp_iterations`` sweeps and no retries (a scan, not the final fit)."""
        assert isinstance(module, nn.Conv2d)
        extra = _fit_kwargs(s, ("l2_reg", "engine"))
        for r in ranks:
            layer = CPConv2d.from_dense(module, rank=int(r), form=config["form"], n_iter_max=cp_iterations,
                                        retries=0, **extra)
            yield layer.to_dense().weight.detach().to(torch.float64)


register(CPMethod())
