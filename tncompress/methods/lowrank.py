"""Low-rank (truncated SVD) factorization of fully-connected layers and embedding tables:
``recipe method: lowrank`` (alias ``svd``). A table (vocabulary × dim) becomes a narrower lookup
(vocabulary × rank) followed by a Linear rank → dim."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from tncompress.decompositions import svd as svd_ops
from tncompress.errors import RankError
from tncompress.layers import FactorizedLayer, LowRankEmbedding, LowRankLinear
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
    types = ("Linear", "Embedding")
    settings = LowRankSettings
    summary = "W ≈ U·V by truncated SVD (two Linear maps through a rank-r bottleneck; an embedding: a narrow table)"
    supports_budget = True

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return LowRankEmbedding if isinstance(module, nn.Embedding) else LowRankLinear

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (LowRankLinear, LowRankEmbedding)

    @staticmethod
    def _sides(module: nn.Module) -> tuple[int, int]:
        """(rows, columns) of the matrix the SVD factors: a Linear's (out, in), a table's (vocab, dim)."""
        if isinstance(module, nn.Embedding):
            return module.num_embeddings, module.embedding_dim
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features

    @staticmethod
    def _config(module: nn.Module, rank: int | None) -> dict[str, Any]:
        if isinstance(module, nn.Embedding):
            config: dict[str, Any] = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                                      "padding_idx": module.padding_idx}
        else:
            assert isinstance(module, nn.Linear)
            config = {"in_features": module.in_features, "out_features": module.out_features,
                      "bias": module.bias is not None}
        if rank is not None:
            config["rank"] = int(rank)
        return config

    def structure(self, module: nn.Module, s: LowRankSettings, where: str) -> Planned:
        return Planned(self._config(module, None), None)

    def plan(self, module: nn.Module, s: LowRankSettings, where: str) -> Planned:
        notes: list[str] = []
        m, n = self._sides(module)
        full = min(m, n)
        rank = s.rank
        frac, share = fraction(rank, where), energy(rank, where)
        if frac is not None:
            r = svd_ops.lowrank_rank_for_fraction(m, n, frac)
            notes.append(f"rank {r} keeps at most {frac:.0%} of the parameters")
        elif share is not None:
            r = svd_ops.energy_rank(svd_ops.singular_values(_weight(module)), share)
            notes.append(f"rank {r} keeps {share:.0%} of the spectral energy")
        elif rank == "vbmf":
            from tncompress.decompositions.ranks import evbmf_rank

            floor, weakening = int(s.floor), float(s.weakening)
            r = evbmf_rank(_weight(module).double())
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
        return Planned(self._config(module, int(r)), int(r), notes)

    def factorize(self, module: nn.Module, config: dict[str, Any], s: LowRankSettings) -> nn.Module:
        if isinstance(module, nn.Embedding):
            return LowRankEmbedding.from_dense(module, rank=config["rank"])
        assert isinstance(module, nn.Linear)
        return LowRankLinear.from_dense(module, rank=config["rank"])

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        m, n = self._sides(module)
        ranks = [r for r in range(1, min(m, n) + 1) if r * (m + n) < m * n]
        if isinstance(module, nn.Embedding):  # a lookup (no MACs) then rank → dim per token
            tokens = math.prod(int(v) for v in in_shape) if in_shape else 1
            return list(ranks), [r * (m + n) for r in ranks], [tokens * r * n for r in ranks]
        assert isinstance(module, nn.Linear)
        bias = m if module.bias is not None else 0
        positions = max(1, macs_before // (m * n))
        return list(ranks), [r * (m + n) + bias for r in ranks], [positions * r * (m + n) for r in ranks]

    def approximator(self, module: nn.Module, config: dict[str, Any], s: LowRankSettings, top: Any,
                     cp_iterations: int) -> Callable[[Any], torch.Tensor]:
        """One truncated SVD at rank ``top``; every smaller rank is a slice of it (exact)."""
        assert isinstance(module, (nn.Linear, nn.Embedding))
        left, right = svd_ops.truncated_svd(module.weight.detach().to(torch.float64), int(top))
        return lambda rank: left[:, : int(rank)] @ right[: int(rank)]

    def approximations(self, module: nn.Module, config: dict[str, Any], s: LowRankSettings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        at = self.approximator(module, config, s, max(int(r) for r in ranks), cp_iterations)
        for r in ranks:
            yield at(r)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = cast(torch.Tensor, module.weight)
    return weight.detach()


register(LowRankMethod())
