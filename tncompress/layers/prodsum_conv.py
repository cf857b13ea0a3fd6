"""Product-of-sums convolution: the unfolded kernel K (out × in·kh·kw) is a product of sums,
K = Π_j Σ_k g(a_jk)·M_jk (see :mod:`tncompress.layers.prodsum_linear`), run as one ``conv2d``.

Why not the :class:`~tncompress.layers.conv_base.FactorizedConv2d` chain: that base is a chain of
``nn.Conv2d`` modules holding weights, while here the kernel is *generated* from a few scalars and
applied by a single convolution (the assembly is batch independent and costs nothing per pixel).
The convolution runs through the arithmetic of an ``nn.Conv2d`` template on the meta device (its
``_conv_forward`` with the generated kernel), so stride, padding (strings and modes), dilation behave
exactly as ``nn.Conv2d`` and the layer traces. groups = 1 only. ``merge()`` keeps the kernel.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tncompress.errors import RankError
from tncompress.layers.base import dense_layout
from tncompress.layers.conv_base import (
    _json_geometry,
    _padding,
    _padding_mode,
    _pair,
    conv_macs,
    conv_unsupported_reason,
)
from tncompress.layers.prodsum_linear import ProdSumFactors, _is_int

__all__ = ["ProdSumConv2d"]


class ProdSumConv2d(ProdSumFactors):
    """A drop-in ``nn.Conv2d`` (groups = 1) whose unfolded kernel is a product of sums."""

    method = "prodsum_conv"
    if TYPE_CHECKING:  # for the type checker only: TorchScript would compile class-level annotations
        _template: nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: str | int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, bias: bool = True, padding_mode: str = "zeros",
                 p: int = 1, terms: int | Sequence[int] = 16, family: str | Sequence[str] = "gaussian",
                 seed: int = 0, widths: Sequence[int] | None = None, g: str = "identity", density: float = 0.05,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not _is_int(v) or v < 1:
                raise RankError(f"{name} must be a positive integer, got {v!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size if not isinstance(kernel_size, list) else tuple(kernel_size), "kernel_size")
        self.stride = _pair(tuple(stride) if isinstance(stride, list) else stride, "stride")
        self.dilation = _pair(tuple(dilation) if isinstance(dilation, list) else dilation, "dilation")
        self.padding = _padding(tuple(padding) if isinstance(padding, list) else padding)
        self.padding_mode = _padding_mode(padding_mode)
        self.fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._setup(self.out_channels, self.fan_in, p, terms, family, seed, widths, g, density, device, dtype)
        self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype)) if bias else None
        # Not a submodule (it must not appear in the state dict): only its conv arithmetic is used.
        object.__setattr__(self, "_template", nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            bias=bias, padding_mode=self.padding_mode, device="meta"))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random scalars with nn.Conv2d's weight variance 1/(3·fan_in); bias as nn.Conv2d's."""
        self.reset_factors(self.fan_in)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @staticmethod
    def unsupported_reason(conv: nn.Module) -> str | None:
        return conv_unsupported_reason(conv, "prodsum")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, p: int = 1, terms: int | Sequence[int] = 16,
                   family: str | Sequence[str] = "gaussian", seed: int = 0, widths: Sequence[int] | None = None,
                   g: str = "identity", density: float = 0.05, sweeps: int = 8) -> "ProdSumConv2d":
        """Fit a trained ``conv``'s unfolded kernel (least squares for p = 1, ALS for p > 1)."""
        reason = conv_unsupported_reason(conv, "prodsum")
        if reason:
            raise RankError(reason)
        weight = conv.weight.detach()
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.bias is not None, conv.padding_mode, p=p, terms=terms, family=family,
                        seed=seed, widths=widths, g=g, density=density, device=weight.device, dtype=torch.float64)
        finally:
            torch.random.set_rng_state(state)
        layer.fit_error = layer.fit_dense(weight.reshape(conv.out_channels, -1), sweeps=sweeps)
        layer = layer.to(dtype=weight.dtype)
        if layer.bias is not None and conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias.detach())
        return layer

    def kernel(self) -> Tensor:
        """The (out, in, kh, kw) kernel, differentiable in the scalars."""
        return self.weight_matrix().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def _precompute(self) -> Tensor:
        return self.kernel()

    def forward(self, x: Tensor) -> Tensor:
        kernel = self._merged_ops()
        if kernel is None:
            kernel = self.kernel()
        # nn.Conv2d's own arithmetic (padding modes, string padding) on the generated kernel: a plain
        # function of tensors, so the layer traces and exports
        return dense_layout(self._template._conv_forward(x, kernel, self.bias), x)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": _json_geometry(self.padding), "dilation": list(self.dilation),
                "bias": self.bias is not None, "padding_mode": self.padding_mode, **self.factor_config()}

    def to_dense(self) -> nn.Conv2d:
        ref = self.coeffs[0]
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)  # type: ignore[union-attr]
        return conv

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """MACs of the convolution for one sample of spatial size ``input_hw`` (the kernel assembly is
        batch independent; see :meth:`assemble_macs`)."""
        if input_hw is None:
            raise ValueError("ProdSumConv2d.macs_per_sample needs input_hw, the input's (H, W)")
        return conv_macs(self._template, (int(input_hw[0]), int(input_hw[1])))[0]

    def assemble_macs(self) -> int:
        """Matmul MACs of building the kernel from the scalars (every forward)."""
        dims = [self.out_channels, *self.widths, self.fan_in]
        build = sum(self.terms[j] * r * c for j, (r, c) in enumerate(self.shapes)
                    if self.families[j] in ("gaussian", "kronecker"))
        return build + sum(dims[0] * dims[j] * dims[j + 1] for j in range(1, self.p))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, {self.factor_repr()}, bias={self.bias is not None}")
