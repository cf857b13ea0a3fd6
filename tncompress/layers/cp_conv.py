"""CP-decomposed 2-d convolution (Lebedev et al. 2015) as a chain of plain ``nn.Conv2d`` modules.

A dense kernel K(cout, cin, kh, kw) ≈ Σ_r out[o, r] · in[i, r] · spatial_r(h, w) becomes

* ``form="3conv"``: 1×1 (cin → R) → depthwise kh×kw (R groups) → 1×1 (R → cout, bias);
* ``form="4conv"``: 1×1 (cin → R) → depthwise kh×1 → depthwise 1×kw → 1×1 (R → cout, bias),
  with spatial_r(h, w) = h_r(h) · w_r(w).

Stride, padding (numbers or "same"/"valid"), dilation and padding mode are carried exactly per axis:
the depthwise kh×kw conv takes them as they are; in the 4-conv form the kh×1 conv takes the height
components and the 1×kw conv the width components. Padding commutes with the bias-free 1×1 convs and
pads each axis independently for every padding mode, so the chain equals the dense conv with the
rebuilt kernel. Only plain modules are used, so torch.compile, TorchScript and ONNX export just work.

"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tncompress.errors import RankError, RecipeError, TncompressError
from tncompress.layers.base import dense_layout
from tncompress.layers.conv_base import (
    FactorizedConv2d,
    _decomposition_device,
    _IntPair,
    _padding,
    _pair,
    conv_unsupported_reason,
    split_geometry,
)

CP_FORMS = ("3conv", "4conv")

# --------------------------------------------------------------------------------------------------
# CPConv2d
# --------------------------------------------------------------------------------------------------


class CPConv2d(FactorizedConv2d):
    """Rank-R CP convolution: 1×1 → depthwise spatial (one kh×kw, or kh×1 then 1×kw) → 1×1."""

    method = "cp"

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
        form: str = "3conv",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise RankError(f"CP rank must be an integer >= 1, got {rank!r}")
        if form not in CP_FORMS:
            raise RecipeError(f"unknown CP form {form!r}; choose one of {', '.join(CP_FORMS)}")
        self.rank = rank
        self.form = form
        self.fit_info: dict[str, Any] | None = None
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        first, spatial = split_geometry(self.kernel_size, self.stride, self.padding, self.padding_mode)
        self.pointwise_in = nn.Conv2d(in_channels, rank, 1, bias=False, **first, **fk)
        stride = _pair(spatial["stride"], "stride")
        sp_padding: str | tuple[int, int] = _padding(spatial["padding"])
        self.spatial: nn.Module
        if form == "3conv":
            self.spatial = nn.Conv2d(rank, rank, (kh, kw), stride, sp_padding, self.dilation,
                                     groups=rank, bias=False, padding_mode=self.padding_mode, **fk)
        else:
            pad_h: str | tuple[int, int] | int
            pad_w: str | tuple[int, int] | int
            if isinstance(sp_padding, str):
                pad_h = pad_w = sp_padding
            else:
                pad_h, pad_w = (sp_padding[0], 0), (0, sp_padding[1])
            self.spatial = nn.Sequential(
                nn.Conv2d(rank, rank, (kh, 1), (stride[0], 1), pad_h, (self.dilation[0], 1),
                          groups=rank, bias=False, padding_mode=self.padding_mode, **fk),
                nn.Conv2d(rank, rank, (1, kw), (1, stride[1]), pad_w, (1, self.dilation[1]),
                          groups=rank, bias=False, padding_mode=self.padding_mode, **fk),
            )
        self.pointwise_out = nn.Conv2d(rank, out_channels, 1, bias=bias, **fk)
        self.reset_parameters()

    # -- construction ------------------------------------------------------------------------------

    def _spatial_convs(self) -> list[nn.Conv2d]:
        if isinstance(self.spatial, nn.Sequential):
            return [m for m in self.spatial if isinstance(m, nn.Conv2d)]
        assert isinstance(self.spatial, nn.Conv2d)
        return [self.spatial]

    def _factor_weights(self) -> list[Tensor]:
        return [self.pointwise_in.weight, *(c.weight for c in self._spatial_convs()),
                self.pointwise_out.weight]

    def reset_parameters(self) -> None:
        """Random init whose rebuilt kernel has the variance of a default-initialised dense conv.

        With N i.i.d. N(0, σ²) factors and R components, Var(K) = R·σ^(2N); the dense target is
        1 / (3·fan_in), fan_in = cin·kh·kw. The bias is drawn like the dense conv's bias.
        """
        self.reset_chain(self._factor_weights(), self.rank)

    @staticmethod
    def unsupported_reason(conv: nn.Module) -> str | None:
        """One-line reason why ``conv`` cannot become a CP layer, or None if it can."""
        return conv_unsupported_reason(conv, "CP")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, form: str = "3conv", **cp_kwargs: Any) -> CPConv2d:
        """Initialise from a trained ``nn.Conv2d`` by CP of its kernel (float64, then cast back).

        ``cp_kwargs`` go to :func:`tncompress.decompositions.cp.cp_conv_kernel` (``n_iter_max``,
        ``tol``, ``l2_reg``, ``retries``, ``seed``, ``engine``). The outcome is left in the plain
        dict ``layer.fit_info`` (rel_error, degenerate, attempts, norm_ratio, notes) so the caller
        can decide to fall back to another method when ``degenerate`` is true.
        """
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise TncompressError(f"cannot use CP here: {reason}")
        from tncompress.decompositions.cp import cp_conv_kernel

        weight = conv.weight.detach()
        result = cp_conv_kernel(weight.to(_decomposition_device(weight)), rank, form=form, **cp_kwargs)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, form=form,
            device=weight.device, dtype=weight.dtype,
        )
        kh, kw = layer.kernel_size
        f_out, f_in, *f_sp = (f.to(device=weight.device, dtype=weight.dtype) for f in result.factors)
        with torch.no_grad():
            layer.pointwise_in.weight.copy_(f_in.T.reshape(rank, -1, 1, 1))
            convs = layer._spatial_convs()
            if form == "3conv":
                convs[0].weight.copy_(f_sp[0].T.reshape(rank, 1, kh, kw))
            else:
                convs[0].weight.copy_(f_sp[0].T.reshape(rank, 1, kh, 1))
                convs[1].weight.copy_(f_sp[1].T.reshape(rank, 1, 1, kw))
            layer.pointwise_out.weight.copy_(f_out.reshape(-1, rank, 1, 1))
            if conv.bias is not None and layer.pointwise_out.bias is not None:
                layer.pointwise_out.bias.copy_(conv.bias.detach())
        layer.fit_info = {
            "rel_error": result.rel_error,
            "degenerate": result.degenerate,
            "attempts": result.attempts,
            "norm_ratio": result.norm_ratio,
            "notes": list(result.notes),
        }
        return layer

    # -- use -----------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return dense_layout(self.pointwise_out(self.spatial(self.pointwise_in(x))), x)

    def conv_chain(self) -> list[nn.Conv2d]:
        return [self.pointwise_in, *self._spatial_convs(), self.pointwise_out]

    def dense_kernel(self) -> Tensor:
        """The equivalent (cout, cin, kh, kw) kernel (computed in float64, returned in the
        layer's dtype)."""
        kh, kw = self.kernel_size
        with torch.no_grad():
            w_in = self.pointwise_in.weight.double()[:, :, 0, 0]  # (R, cin)
            w_out = self.pointwise_out.weight.double()[:, :, 0, 0]  # (cout, R)
            convs = self._spatial_convs()
            if self.form == "3conv":
                sp = convs[0].weight.double()[:, 0]  # (R, kh, kw)
            else:
                h = convs[0].weight.double()[:, 0, :, 0]  # (R, kh)
                w = convs[1].weight.double()[:, 0, 0, :]  # (R, kw)
                sp = h[:, :, None] * w[:, None, :]
            # one GEMM against the Khatri-Rao product of the input and spatial factors: einsum's default
            # path took 2.5 s for 512→512 3×3 at rank 1141 (decompose checks every layer through this)
            khatri_rao = (w_in[:, :, None] * sp.reshape(self.rank, 1, kh * kw)).reshape(self.rank, -1)
            k = (w_out @ khatri_rao).reshape(self.out_channels, self.in_channels, kh, kw)
        return k.to(self.pointwise_out.weight.dtype)

    def config(self) -> dict[str, Any]:
        """JSON-safe constructor arguments that rebuild this structure."""
        return {**self.geometry_config(), "rank": self.rank, "form": self.form}

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, rank={self.rank}, form={self.form}, {self.geometry_repr()}"
        )
