"""Low-rank (truncated SVD) factorization of fully-connected layers: ``recipe method: lowrank``
(alias ``svd``)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress.decompositions import svd as svd_ops
from tncompress.errors import RankError
from tncompress.layers import FactorizedLayer, LowRankLinear
from tncompress.methods import register
from tncompress.methods.base import (
    Ladder,
    Method,
    Planned,
    Settings,
    bad_rank,
    energy,
    fraction,
    is_int,
    positive_int,
    rank_int,
    setting,
    unchecked,
    unit_interval,
)


@dataclass(frozen=True)
class LowRankSettings(Settings):
    rank: Any = setting("vbmf", unchecked, "an integer, a fraction of params, {energy: e} or vbmf")
    floor: Any = setting(1, positive_int, "smallest rank VBMF may choose")
    weakening: Any = setting(0.0, unit_interval, "move the VBMF rank this far towards full rank")


class LowRankMethod(Method):
    name = "lowrank"
    order = 20
    aliases = ("svd",)
    types = ("Linear",)
    settings = LowRankSettings
    summary = "W ≈ U·V by truncated SVD (two Linear maps through a rank-r bottleneck)"
    supports_budget = True

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return LowRankLinear

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (LowRankLinear,)

    def structure(self, module: nn.Module, s: LowRankSettings, where: str) -> Planned:
        assert isinstance(module, nn.Linear)
        return Planned({"in_features": module.in_features, "out_features": module.out_features,
                        "bias": module.bias is not None}, None)

    def plan(self, module: nn.Module, s: LowRankSettings, where: str) -> Planned:
        assert isinstance(module, nn.Linear)
        notes: list[str] = []
        m, n = module.out_features, module.in_features
        full = min(m, n)
        rank = s.rank
        frac, share = fraction(rank, where), energy(rank, where)
        if frac is not None:
            r = svd_ops.lowrank_rank_for_fraction(m, n, frac)
            notes.append(f"rank {r} keeps at most {frac:.0%} of the parameters")
        elif share is not None:
            r = svd_ops.energy_rank(svd_ops.singular_values(module.weight.detach()), share)
            notes.append(f"rank {r} keeps {share:.0%} of the spectral energy")
        elif rank == "vbmf":
            from tncompress.decompositions.ranks import evbmf_rank

            floor, weakening = int(s.floor), float(s.weakening)
            r = evbmf_rank(module.weight.detach().double())
            r = min(full, max(floor, math.ceil(r + weakening * (full - r) - 1e-9)))  # as for Tucker-2
            notes.append(f"rank {r} from empirical VBMF" + (f", weakened by {s.weakening}" if weakening else "")
                         + (f", at least {floor}" if floor > 1 else ""))
        elif is_int(rank):
            r = rank_int(rank, where)
            if r > full:
                raise RankError(f"{where}: rank {r} exceeds the largest useful rank {full} of a {m}×{n} weight")
        else:
            raise bad_rank(rank, where, "an integer, a fraction in (0, 1], {energy: 0.9} or vbmf")
        if r * (m + n) >= m * n:
            notes.append(f"rank {r} does not compress this layer ({r * (m + n)} ≥ {m * n} weights)")
        config = {"in_features": n, "out_features": m, "rank": int(r), "bias": module.bias is not None}
        return Planned(config, int(r), notes)

    def factorize(self, module: nn.Module, config: dict[str, Any], s: LowRankSettings) -> nn.Module:
        assert isinstance(module, nn.Linear)
        return LowRankLinear.from_dense(module, rank=config["rank"])

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        assert isinstance(module, nn.Linear)
        m, n = module.out_features, module.in_features
        bias = m if module.bias is not None else 0
        positions = max(1, macs_before // (m * n))
        ranks = [r for r in range(1, min(m, n) + 1) if r * (m + n) < m * n]
        return list(ranks), [r * (m + n) + bias for r in ranks], [positions * r * (m + n) for r in ranks]

    def approximator(self, module: nn.Module, config: dict[str, Any], s: LowRankSettings, top: Any,
                     cp_iterations: int) -> Callable[[Any], torch.Tensor]:
        """One truncated SVD at rank ``top``; every smaller rank is a slice of it (exact)."""
        assert isinstance(module, nn.Linear)
        left, right = svd_ops.truncated_svd(module.weight.detach().to(torch.float64), int(top))
        return lambda rank: left[:, : int(rank)] @ right[: int(rank)]

    def approximations(self, module: nn.Module, config: dict[str, Any], s: LowRankSettings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        at = self.approximator(module, config, s, max(int(r) for r in ranks), cp_iterations)
        for r in ranks:
            yield at(r)


register(LowRankMethod())
