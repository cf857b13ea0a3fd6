"""Shared pieces of the factorized convolutions: geometry parsing, MAC counting, the reason a
conv cannot be factorized, and a base class with the methods every conv chain has in common
(``to_dense``, ``macs_per_sample``, the geometry part of ``config`` and ``extra_repr``)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from tncompress.errors import RankError
from tncompress.layers.base import FactorizedLayer

_IntPair = int | Sequence[int]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")


# --------------------------------------------------------------------------------------------------
# Helpers shared by the factorized conv layers
# --------------------------------------------------------------------------------------------------


def _pair(value: _IntPair, name: str) -> tuple[int, int]:
    """An int or a length-2 sequence of ints (e.g. a JSON list) as a tuple of two ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return (int(value[0]), int(value[1]))
    raise RankError(f"{name} must be an int or a pair of ints, got {value!r}")


def _padding(value: str | _IntPair) -> str | tuple[int, int]:
    if isinstance(value, str):
        if value not in ("same", "valid"):
            raise RankError(f"padding must be 'same', 'valid', an int or a pair of ints, got {value!r}")
        return value
    return _pair(value, "padding")


def _padding_mode(value: str) -> PaddingMode:
    """``value`` checked as one of nn.Conv2d's padding modes."""
    if value not in PADDING_MODES:
        raise RankError(f"padding_mode must be zeros, reflect, replicate or circular, got {value!r}")
    return cast(PaddingMode, value)


def _json_geometry(value: str | tuple[int, ...]) -> str | list[int]:
    return value if isinstance(value, str) else [int(v) for v in value]


def conv_unsupported_reason(conv: nn.Module, what: str) -> str | None:
    """Why ``conv`` cannot be replaced by a ``what`` layer (one line), or None if it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d; {what} only replaces 2-d convolutions"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return f"lazy {type(conv).__name__} has no weights yet; run a forward pass before decomposing"
    if conv.groups != 1:
        return (
            f"groups={conv.groups} (grouped/depthwise conv) is not supported by {what}, "
            "which needs groups=1; leave this layer dense"
        )
    if conv.weight.is_complex():
        return f"complex weights are not supported by {what}"
    return None


def conv_output_hw(conv: nn.Conv2d, input_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial output size of ``conv`` for an input of size ``input_hw`` (as PyTorch computes it)."""
    out = []
    for axis in range(2):
        size, k = int(input_hw[axis]), conv.kernel_size[axis]
        s, d = conv.stride[axis], conv.dilation[axis]
        if conv.padding == "same":
            out.append(size)
            continue
        p = 0 if isinstance(conv.padding, str) else int(conv.padding[axis])
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def conv_macs(conv: nn.Conv2d, input_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(MACs for one sample, output (H, W)) of ``conv``; bias adds are not counted (as
    ``FlopCounterMode``, whose conv FLOPs are 2 · out_h · out_w · cout · cin/groups · kh · kw)."""
    oh, ow = conv_output_hw(conv, input_hw)
    kh, kw = conv.kernel_size
    macs = oh * ow * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    return macs, (oh, ow)


def split_geometry(kernel_size: tuple[int, int], stride: tuple[int, int], padding: str | tuple[int, int],
                   padding_mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Where the stride and padding go in a 1×1 → spatial → 1×1 chain: (first 1×1, spatial) kwargs.

    Normally the spatial conv takes them. For a 1×1 kernel the spatial conv touches one pixel, so
    padding and subsampling commute with the bias-free first 1×1 conv: the first conv takes them and
    runs on the strided grid only (a 1×1 stride-2 downsample does 4× less work in its first conv)."""
    if kernel_size == (1, 1) and padding != "same":
        return {"stride": stride, "padding": padding, "padding_mode": padding_mode}, {"stride": 1, "padding": 0}
    return {}, {"stride": stride, "padding": padding, "padding_mode": padding_mode}


def dense_init_variance(fan_in: int) -> float:
    """Weight variance of ``nn.Conv2d``/``nn.Linear`` default init (kaiming_uniform, a=√5)."""
    return 1.0 / (3.0 * fan_in)


def _check_channels(in_channels: int, out_channels: int) -> None:
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RankError(f"{name} must be a positive integer, got {v!r}")


def _decomposition_device(weight: Tensor) -> torch.device:
    """Where to run the float64 decomposition (MPS has no float64, so use the CPU there)."""
    return torch.device("cpu") if weight.device.type == "mps" else weight.device


class FactorizedConv2d(FactorizedLayer):
    """A chain of plain ``nn.Conv2d`` modules standing for one dense convolution.

    Subclasses set the geometry attributes (``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``padding_mode``), own ``pointwise_out`` (the last 1×1
    conv, which carries the bias) and implement ``conv_chain`` and ``dense_kernel``.
    """

    if TYPE_CHECKING:  # for the type checker only: TorchScript would compile class-level annotations
        in_channels: int
        out_channels: int
        kernel_size: tuple[int, int]
        stride: tuple[int, int]
        padding: str | tuple[int, int]
        dilation: tuple[int, int]
        padding_mode: PaddingMode
        pointwise_out: nn.Conv2d

    def set_geometry(self, in_channels: int, out_channels: int, kernel_size: _IntPair, stride: _IntPair,
                     padding: str | _IntPair, dilation: _IntPair, padding_mode: str) -> None:
        """Check and store the dense conv's geometry (every factorized conv starts with this)."""
        _check_channels(in_channels, out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _padding(padding)
        self.dilation = _pair(dilation, "dilation")
        self.padding_mode = _padding_mode(padding_mode)

    def conv_chain(self) -> list[nn.Conv2d]:  # pragma: no cover - overridden
        """The convolutions in the order the input flows through them."""
        raise NotImplementedError

    def dense_kernel(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def reset_chain(self, factors: list[Tensor], inner: int) -> None:
        """Draw i.i.d. N(0, σ²) factors so the effective kernel has the dense conv's default-init
        variance: Var(K) = inner · σ^(2·len(factors)) = 1 / (3·fan_in), where ``inner`` is the
        number of summed terms per kernel entry; the bias is drawn like the dense conv's."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        std = (dense_init_variance(fan_in) / inner) ** (1.0 / (2 * len(factors)))
        with torch.no_grad():
            for w in factors:
                nn.init.normal_(w, 0.0, std)
            if self.pointwise_out.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.pointwise_out.bias, -bound, bound)

    def input_projection(self) -> Tensor | None:
        first = self.conv_chain()[0]
        if first.kernel_size != (1, 1) or first.groups != 1:
            return None
        return first.weight[:, :, 0, 0]

    def output_projection(self) -> tuple[Tensor, Tensor | None] | None:
        return self.pointwise_out.weight[:, :, 0, 0], self.pointwise_out.bias

    def output_features(self, x: Tensor) -> Tensor:
        for conv in self.conv_chain()[:-1]:
            x = conv(x)
        return x

    def geometry_config(self) -> dict[str, Any]:
        """JSON-safe constructor arguments shared by every factorized conv."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": _json_geometry(self.padding),
            "dilation": list(self.dilation),
            "bias": self.pointwise_out.bias is not None,
            "padding_mode": self.padding_mode,
        }

    def geometry_repr(self) -> str:
        return (f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"bias={self.pointwise_out.bias is not None}, padding_mode={self.padding_mode}")

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (same hyper-parameters, dtype and device)."""
        w = self.pointwise_out.weight
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=self.pointwise_out.bias is not None, padding_mode=self.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_kernel())
            bias = self.pointwise_out.bias
            if conv.bias is not None and bias is not None:
                conv.bias.copy_(bias)
        return conv

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """Multiply-accumulates of one forward for one sample of spatial size ``input_hw``."""
        if input_hw is None:
            raise ValueError(f"{type(self).__name__}.macs_per_sample needs input_hw, the input's (H, W)")
        hw = (int(input_hw[0]), int(input_hw[1]))
        total = 0
        for conv in self.conv_chain():
            macs, hw = conv_macs(conv, hw)
            total += macs
        return total
