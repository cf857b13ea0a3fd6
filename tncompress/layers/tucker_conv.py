"""Tucker-2 decomposed 2-d convolution (Kim et al. 2016) as three plain ``nn.Conv2d`` modules.

K(cout, cin, kh, kw) ≈ Σ_{a,b} U_out[o, a] · core[a, b, h, w] · U_in[i, b] becomes

    1×1 (cin → r_in) → kh×kw conv (r_in → r_out; stride, padding, dilation, padding mode) → 1×1
    (r_out → cout, bias).

The layer's ``ranks`` are in data-flow order ``(r_in, r_out)``; the decomposition functions in
:mod:`tncompress.decompositions` use the kernel's mode order ``(r_out, r_in)``.
"""
from __future__ import annotations

from collections.abc import Sequence
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
    split_geometry,
)


def _check_ranks(ranks: Sequence[int], in_channels: int, out_channels: int) -> tuple[int, int]:
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != 2:
        raise RankError(f"Tucker-2 ranks must be a pair (r_in, r_out), got {ranks!r}")
    r_in, r_out = ranks
    for name, r, full, what in (("r_in", r_in, in_channels, "in_channels"),
                                ("r_out", r_out, out_channels, "out_channels")):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full:
            raise RankError(f"Tucker-2 {name}={r!r} must be an integer in [1, {what}={full}]")
    return int(r_in), int(r_out)


class Tucker2Conv2d(FactorizedConv2d):
    """Tucker-2 convolution: 1×1 (cin → r_in) → kh×kw (r_in → r_out) → 1×1 (r_out → cout)."""

    method = "tucker2"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        ranks: Sequence[int],
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
        self.ranks = _check_ranks(ranks, in_channels, out_channels)  # (r_in, r_out)
        self.fit_info: dict[str, Any] | None = None  # only CP fills it
        self.rel_error: float | None = None  # kernel error after from_dense
        r_in, r_out = self.ranks
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        first, spatial = split_geometry(self.kernel_size, self.stride, self.padding, self.padding_mode)
        self.pointwise_in = nn.Conv2d(in_channels, r_in, 1, bias=False, **first, **fk)
        self.core = nn.Conv2d(r_in, r_out, self.kernel_size, dilation=self.dilation, bias=False, **spatial, **fk)
        self.pointwise_out = nn.Conv2d(r_out, out_channels, 1, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose rebuilt kernel has the variance of a default-initialised dense conv.

        With three i.i.d. N(0, σ²) factors, Var(K) = r_in·r_out·σ⁶; the dense target is
        1 / (3·fan_in), fan_in = cin·kh·kw. The bias is drawn like the dense conv's bias.
        """
        r_in, r_out = self.ranks
        self.reset_chain([self.pointwise_in.weight, self.core.weight, self.pointwise_out.weight], r_in * r_out)

    @staticmethod
    def unsupported_reason(conv: nn.Module) -> str | None:
        """One-line reason why ``conv`` cannot become a Tucker-2 layer, or None if it can."""
        return conv_unsupported_reason(conv, "Tucker-2")

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, ranks: Sequence[int], method: str = "hooi", n_iter: int = 20
    ) -> Tucker2Conv2d:
        """Initialise from a trained ``nn.Conv2d`` by Tucker-2 of its kernel (float64, cast back).

        ``ranks`` are in the layer's data-flow order ``(r_in, r_out)``. The kernel's relative
        Frobenius error is left in ``layer.rel_error`` (``fit_info`` stays None: it is CP's report).
        """
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise TncompressError(f"cannot use Tucker-2 here: {reason}")
        from tncompress.decompositions.tucker2 import tucker2, tucker2_to_kernel

        r_in, r_out = _check_ranks(ranks, conv.in_channels, conv.out_channels)
        weight = conv.weight.detach()
        k64 = weight.to(device=_decomposition_device(weight), dtype=torch.float64)
        core, u_out, u_in = tucker2(k64, (r_out, r_in), method=method, n_iter=n_iter)
        norm = torch.linalg.vector_norm(k64).item()
        err = torch.linalg.vector_norm(k64 - tucker2_to_kernel(core, u_out, u_in)).item()
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, (r_in, r_out),
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.pointwise_in.weight.copy_(u_in.T.reshape(r_in, -1, 1, 1).to(weight.device, weight.dtype))
            layer.core.weight.copy_(core.to(weight.device, weight.dtype))
            layer.pointwise_out.weight.copy_(u_out.reshape(-1, r_out, 1, 1).to(weight.device, weight.dtype))
            if conv.bias is not None and layer.pointwise_out.bias is not None:
                layer.pointwise_out.bias.copy_(conv.bias.detach())
        layer.rel_error = err / norm if norm > 0 else 0.0
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return dense_layout(self.pointwise_out(self.core(self.pointwise_in(x))), x)

    def conv_chain(self) -> list[nn.Conv2d]:
        return [self.pointwise_in, self.core, self.pointwise_out]

    def core_patches(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The core's input patches (unfolded after the first 1×1) and its weight as (r_out, r_in·kh·kw);
        None when the core pads other than with zeros (its patches are then not an unfold)."""
        core = self.core
        if core.padding_mode != "zeros" or isinstance(core.padding, str) or core.groups != 1:
            return None
        u = self.pointwise_in(x)
        patches = torch.nn.functional.unfold(u, core.kernel_size, dilation=core.dilation, padding=core.padding,
                                             stride=core.stride)  # (N, r_in·kh·kw, L)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return rows, core.weight.view(core.out_channels, -1)

    def dense_kernel(self) -> Tensor:
        """The equivalent (cout, cin, kh, kw) kernel (computed in float64, returned in the
        layer's dtype)."""
        with torch.no_grad():
            w_in = self.pointwise_in.weight.double()[:, :, 0, 0]  # (r_in, cin)
            w_out = self.pointwise_out.weight.double()[:, :, 0, 0]  # (cout, r_out)
            k = torch.einsum("oa,abhw,bi->oihw", w_out, self.core.weight.double(), w_in)
        return k.to(self.pointwise_out.weight.dtype)

    def config(self) -> dict[str, Any]:
        """JSON-safe constructor arguments that rebuild this structure."""
        return {**self.geometry_config(), "ranks": list(self.ranks)}

    def extra_repr(self) -> str:
        r_in, r_out = self.ranks
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, ranks=(r_in={r_in}, r_out={r_out}), {self.geometry_repr()}"
        )
