"""The contract every factorized layer in :mod:`tncompress.layers` follows.

Layers depend on torch only, so a compressed model runs where tensorly is not installed.
Each layer class:

* ``method``: class attribute, the recipe name of the method ("tt", "lowrank", "cp", "tucker2").
* ``config() -> dict``: JSON-safe constructor keyword arguments; ``type(layer)(**layer.config())``
  rebuilds a layer of identical structure (parameter names and shapes), so a checkpoint's state
  dict loads into it with ``strict=True``.
* ``from_dense(module, ...)``: a classmethod that initialises the layer from a trained dense
  ``nn.Linear`` / ``nn.Conv2d`` (decomposition done in float64, cast back to the module's dtype and
  device).
* ``reset_parameters()``: random initialisation with the variance of the dense layer it replaces.
* ``to_dense()``: the equivalent dense ``nn.Linear`` / ``nn.Conv2d`` (same dtype and device).
* ``macs_per_sample(input_hw=None) -> int``: multiply-accumulates of one forward for one sample
  (for convs, ``input_hw`` is the input's (H, W)); equals FlopCounterMode's FLOPs / 2.
* ``extra_repr()``: shapes and ranks.
* ``merge()`` / ``unmerge()``: an explicit inference snapshot (see below).

Inference snapshot. The forward never caches anything on its own: it computes from the current
parameters, so optimizer steps, in-place edits (also through ``.data``), ``.data =``,
``load_state_dict``, ``.to()``, ``torch.compile`` and ``torch.func.functional_call`` are always seen.
Layers whose forward starts with batch-independent work (TT merges neighbouring cores,
product-of-sums assembles its factors) can precompute it once with ``merge()``, for deployment
(``report --latency`` measures that way). The snapshot is used only in eval mode without autograd,
and is ignored or dropped whenever PyTorch can tell the parameters changed: ``train()``,
``load_state_dict``, ``.to()``/``.half()``/…, an in-place update that bumps a parameter's version
(optimizer steps, ``p.mul_()`` under ``no_grad``), a parameter swapped or re-pointed (``p.data =``,
``functional_call``), and under ``torch.compile``, tracing or scripting. One change is invisible to
PyTorch itself: an in-place edit through ``p.data`` (``p.data.mul_(2)``) bumps no version counter.
After such an edit call ``merge()`` again (or ``unmerge()``); without a snapshot nothing is stale.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def dense_layout(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in the memory layout a dense ``nn.Conv2d`` / ``nn.Linear`` gives for input ``x``:
    contiguous for a contiguous input, channels-last for a channels-last one. A factorized chain
    (or a substituted weight) can hand back another layout, and the user's next op may be a
    ``.view`` that needs this one. A no-op when the layout already matches."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y.contiguous()
    return y.contiguous()


@dataclass
class _Snapshot:
    """What ``merge()`` precomputed, and the parameters it was computed from.

    ``kept`` holds a detached alias of every parameter, so their storage stays alive while the
    snapshot exists and a later ``p.data = new`` can never land on the same address.
    """

    ops: Any
    params: list[nn.Parameter]
    kept: list[torch.Tensor]
    ptrs: list[int]
    versions: list[int]


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return -1


class FactorizedLayer(nn.Module):
    """Base class: the contract, and the explicit inference snapshot (``merge()``/``unmerge()``)."""

    method: ClassVar[str] = ""
    _snapshot: _Snapshot | None = None
    __jit_unused_properties__: ClassVar[list[str]] = ["merged"]  # torch.jit.script compiles properties

    # ------------------------------------------------------------------ inference snapshot

    def _precompute(self) -> Any:
        """The batch-independent operators ``merge()`` keeps (None: nothing worth keeping)."""
        return None

    def merge(self) -> None:
        """Precompute the batch-independent part of the forward from the current parameters, for
        inference. A snapshot: see the module docstring for when it is ignored or dropped."""
        self.unmerge()
        with torch.no_grad():
            ops = self._precompute()
        if ops is None:
            return
        params = list(self.parameters())
        self._snapshot = _Snapshot(ops, params, [p.detach() for p in params], [p.data_ptr() for p in params],
                                   [_version(p) for p in params])

    def unmerge(self) -> None:
        """Drop the snapshot: the forward computes from the parameters again."""
        self._snapshot = None

    @property
    def merged(self) -> bool:
        return self._snapshot is not None

    def _merged_ops(self) -> Any:
        """The snapshot's operators if they are still valid for this call, else None."""
        snap = self._snapshot
        if snap is None or self.training:
            return None
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return None
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None  # autograd records: gradients must flow to the parameters
        if len(params) != len(snap.params):
            return None
        for p, ref, ptr, version in zip(params, snap.params, snap.ptrs, snap.versions):
            if p is not ref or p.data_ptr() != ptr or _version(p) != version:
                return None
        return snap.ops

    # ------------------------------------------------------------------ data-aware fitting
    # A layer whose forward starts with a linear map of the input features (channels) and ends with
    # one (plus the bias) exposes them, so calibration data can whiten the first and refit the last
    # (tncompress.data_aware); layers without such ends return None.

    def input_projection(self) -> Tensor | None:
        """The weight applied first to the input features, viewed as (rank, in_features), or None."""
        return None

    def output_projection(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight viewed as (out_features, rank), bias or None) of the last linear map, or None."""
        return None

    def output_features(self, x: Tensor) -> Tensor:
        """What the last linear map receives for input ``x`` (features on dim 1 for convs, last dim else)."""
        raise NotImplementedError(f"{type(self).__name__} has no output projection")

    @classmethod
    def input_kronecker_modes(cls, module: nn.Module, config: dict[str, Any]) -> list[int] | None:
        """For layers whose input side is a product of per-mode maps (TT-matrix cores): the input
        modes ``module`` would be split into with ``config``, so the inputs can be whitened by a
        Kronecker-factored second moment; None otherwise."""
        return None

    def map_input_modes(self, maps: list[Tensor]) -> None:
        """Multiply each input mode of the factors by ``maps[k]`` (``n_k × n_k``), in place."""
        raise NotImplementedError(f"{type(self).__name__} has no input modes")

    def core_patches(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """For layers whose middle factor is a full linear map of local patches (Tucker-2's core):
        (patches as rows (samples·pixels, patch features), that factor's weight viewed as
        (rank_out, patch features)), so the factor can be refit by least squares; None otherwise."""
        return None

    def train(self, mode: bool = True) -> FactorizedLayer:
        if mode:
            self.unmerge()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> FactorizedLayer:
        self.unmerge()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.unmerge()
        super()._load_from_state_dict(*args, **kwargs)

    def config(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dense(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:  # pragma: no cover
        raise NotImplementedError


def linear_unsupported_reason(linear: nn.Module, what: str) -> str | None:
    """Why ``linear`` cannot be replaced by a ``what`` layer (one line), or None if it can."""
    if not isinstance(linear, nn.Linear):
        return f"{type(linear).__name__} is not an nn.Linear; {what} only replaces fully-connected layers"
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        return f"lazy {type(linear).__name__} has no weights yet; run a forward pass before decomposing"
    if linear.weight.is_complex():
        return f"complex weights are not supported by {what} (its factors are real)"
    return None


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Merge every factorized layer of ``model`` for the duration (inference), then unmerge them,
    also when the block raises. Layers that were merged before stay merged."""
    layers = [m for m in model.modules() if isinstance(m, FactorizedLayer) and not m.merged]
    try:
        for layer in layers:
            layer.merge()
        yield model
    finally:
        for layer in layers:
            layer.unmerge()
