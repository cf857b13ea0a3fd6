"""Low-rank (truncated SVD) 2-d convolution as two plain ``nn.Conv2d`` modules.

The kernel K (cout, cin, kh, kw) unfolded to the (cout × cin·kh·kw) matrix W ≈ U·V (rank r) becomes

    kh×kw conv (cin → r; stride, padding, dilation, padding mode; no bias) → 1×1 (r → cout, bias).

For a 1×1 kernel the unfolding is the conv's weight matrix itself, so this is exactly the matrix
SVD (Eckart–Young optimal), and the first conv is a 1×1 map of the input channels (which the
data-aware fitting whitens, see :meth:`FactorizedConv2d.input_projection`). What Tucker-2 builds
for a 1×1 conv (:mod:`tncompress.methods.tucker2`).
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from tncompress.errors import RankError, TncompressError
from tncompress.layers.base import dense_layout
from tncompress.layers.conv_base import (
    FactorizedConv2d,
    _decomposition_device,
    _IntPair,
    conv_unsupported_reason,
)

__all__ = ["LowRankConv2d"]


class LowRankConv2d(FactorizedConv2d):
    """Truncated-SVD convolution: kh×kw (cin → rank) → 1×1 (rank → cout).

    A ``rank`` above ``min(cout, cin·kh·kw)`` adds nothing and is clipped to it; a rank below 1
    raises :class:`RankError`.
    """

    method = "lowrank_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        rank: int,
        stride: _IntPair = 1,
        padding: str | _IntPair = 0,
        dilation: _IntPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise RankError(f"low-rank conv rank must be a positive integer, got {rank!r}")
        self.rank: int = min(int(rank), out_channels, in_channels * self.kernel_size[0] * self.kernel_size[1])
        self.rel_error: float | None = None  # kernel error after from_dense
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first: nn.Conv2d = nn.Conv2d(in_channels, self.rank, self.kernel_size, stride=self.stride, padding=self.padding,
                               dilation=self.dilation, bias=False, padding_mode=self.padding_mode, **fk)
        self.pointwise_out = nn.Conv2d(self.rank, out_channels, 1, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose rebuilt kernel has the variance of a default-initialised dense conv:
        with two i.i.d. N(0, σ²) factors, Var(K) = rank·σ⁴ = 1 / (3·fan_in)."""
        self.reset_chain([self.first.weight, self.pointwise_out.weight], self.rank)

    @staticmethod
    def unsupported_reason(conv: nn.Module) -> str | None:
        """One-line reason why ``conv`` cannot become a low-rank conv, or None if it can."""
        return conv_unsupported_reason(conv, "low-rank conv")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int) -> LowRankConv2d:
        """The best rank-``rank`` approximation of a trained ``conv``'s unfolded kernel (truncated SVD
        in float64, √s on each side, cast back). The kernel's relative Frobenius error is left in
        ``layer.rel_error``."""
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise TncompressError(f"cannot use a low-rank conv here: {reason}")
        from tncompress.decompositions.svd import truncated_svd

        weight = conv.weight.detach()
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )
        r = layer.rank
        w64 = weight.to(device=_decomposition_device(weight), dtype=torch.float64).reshape(conv.out_channels, -1)
        left, right = truncated_svd(w64, r)
        norm = torch.linalg.vector_norm(w64).item()
        err = torch.linalg.vector_norm(w64 - left @ right).item()
        with torch.no_grad():
            layer.first.weight.copy_(right.reshape(r, conv.in_channels, *layer.kernel_size).to(weight.device, weight.dtype))
            layer.pointwise_out.weight.copy_(left.reshape(conv.out_channels, r, 1, 1).to(weight.device, weight.dtype))
            if conv.bias is not None and layer.pointwise_out.bias is not None:
                layer.pointwise_out.bias.copy_(conv.bias.detach())
        layer.rel_error = err / norm if norm > 0 else 0.0
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return dense_layout(self.pointwise_out(self.first(x)), x)

    def conv_chain(self) -> list[nn.Conv2d]:
        return [self.first, self.pointwise_out]

    def dense_kernel(self) -> Tensor:
        """The equivalent (cout, cin, kh, kw) kernel (computed in float64, returned in the layer's dtype)."""
        with torch.no_grad():
            w_out = self.pointwise_out.weight.double()[:, :, 0, 0]  # (cout, rank)
            k = torch.einsum("or,rihw->oihw", w_out, self.first.weight.double())
        return k.to(self.pointwise_out.weight.dtype)

    def config(self) -> dict[str, Any]:
        """JSON-safe constructor arguments that rebuild this structure."""
        return {**self.geometry_config(), "rank": self.rank}

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, rank={self.rank}, {self.geometry_repr()}"
        )
