"""Low-rank fully-connected layer: W = second · first (a truncated SVD of a trained weight).

Two plain ``F.linear`` calls (in → rank → out), so it exports and compiles like any linear stack.
Pure torch: a compressed model runs where tensorly is not installed.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tncompress.errors import RankError
from tncompress.layers.base import FactorizedLayer, linear_unsupported_reason

__all__ = ["LowRankLinear"]


class LowRankLinear(FactorizedLayer):
    """``y = (x·firstᵀ)·secondᵀ + b`` with ``first`` (rank × in) and ``second`` (out × rank).

    A ``rank`` above ``min(in_features, out_features)`` adds nothing and is clipped to it (like a
    scalar TT rank); a rank below 1 raises :class:`RankError`.
    """

    method = "lowrank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise RankError(f"low-rank rank must be a positive integer, got {rank!r}")
        self.in_features: int = int(in_features)
        self.out_features: int = int(out_features)
        self.rank: int = min(int(rank), self.in_features, self.out_features)
        factory = {"device": device, "dtype": dtype}
        self.first: nn.Parameter = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.second: nn.Parameter = nn.Parameter(torch.empty(self.out_features, self.rank, **factory))
        self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose product W has nn.Linear's default variance 1/(3·in).

        With i.i.d. N(0, σ²) factors, Var(W_ij) = rank·σ⁴, so σ = (std / √rank)^(1/2) on both
        (the two-core case of the TT rule; equal scales keep the two factors' gradients balanced).
        """
        std = 1.0 / math.sqrt(3.0 * self.in_features)
        sigma = math.sqrt(std / math.sqrt(self.rank))
        with torch.no_grad():
            self.first.normal_(0.0, sigma)
            self.second.normal_(0.0, sigma)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @staticmethod
    def unsupported_reason(linear: nn.Module) -> str | None:
        """Why ``linear`` cannot become a LowRankLinear (one line), or None."""
        return linear_unsupported_reason(linear, "low-rank")

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The best rank-``rank`` approximation of a trained ``linear`` (SVD in float64, cast back)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear.from_dense expects an nn.Linear, got {type(linear).__name__}")
        reason = cls.unsupported_reason(linear)
        if reason is not None:
            raise RankError(f"cannot use low-rank here: {reason}")
        from tncompress.decompositions.svd import truncated_svd  # pure torch; imported where needed

        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        left, right = truncated_svd(weight, layer.rank)
        with torch.no_grad():
            layer.second.copy_(left.to(dtype=weight.dtype, device=weight.device))
            layer.first.copy_(right.to(dtype=weight.dtype, device=weight.device))
            if layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    def input_projection(self) -> Tensor | None:
        return self.first

    def output_projection(self) -> tuple[Tensor, Tensor | None] | None:
        return self.second, self.bias

    def output_features(self, x: Tensor) -> Tensor:
        return F.linear(x, self.first)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this structure (JSON-safe)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same dtype and device)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.first.device, dtype=self.first.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.second @ self.first)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """rank·(in + out) MACs per sample; the bias add is not counted (as in FlopCounterMode)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        params = self.rank * (self.in_features + self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"params={params}, bias={self.bias is not None}")
