"""What a decomposition method is: its settings schema and the hooks the pipeline calls.

A method is one :class:`Method` subclass in one module of :mod:`tncompress.methods`, registered
with :func:`tncompress.methods.register`. It knows everything about itself:

* ``settings``: a dataclass of :class:`Settings` whose fields carry their own checks, so a bad value
  (``n_iter: ten``) is one line naming the recipe, the layer and the key when the plan is made;
* ``plan()``: the factorized layer's constructor config, ranks and notes for one dense layer
  (or :meth:`unsupported` says why the layer stays dense);
* ``factorize()``: the factorized layer initialised from the trained dense layer;
* ``fallback()``: optionally, what to build instead when the factorization degenerates;
* optionally the budget hooks (``structure``, ``ladder``, ``approximations``) that let a recipe
  ``budget`` choose the ranks.

Nothing here imports the pipeline (recipe, planner, budget, compress): the pipeline imports this.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from tncompress.errors import RankError, RecipeError
from tncompress.layers import FactorizedLayer

Check = Callable[[Any], str | None]  # None when the value is acceptable, else what was expected


# --- value checks --------------------------------------------------------------------------------

def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def positive_int(value: Any) -> str | None:
    return None if is_int(value) and value >= 1 else "a positive integer"


def non_negative_int(value: Any) -> str | None:
    return None if is_int(value) and value >= 0 else "a non-negative integer"


def any_int(value: Any) -> str | None:
    return None if is_int(value) else "an integer"


def non_negative_number(value: Any) -> str | None:
    return None if is_number(value) and float(value) >= 0 else "a non-negative number"


def positive_number(value: Any) -> str | None:
    return None if is_number(value) and float(value) > 0 else "a positive number"


def unit_interval(value: Any) -> str | None:
    """[0, 1): e.g. how far to weaken a VBMF rank towards full."""
    return None if is_number(value) and 0.0 <= float(value) < 1.0 else "a number in [0, 1)"


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else " or ".join(repr(c) for c in choices)
    return check


def unchecked(value: Any) -> str | None:
    """For values whose meaning depends on the layer (ranks): :meth:`Method.plan` checks them."""
    return None


def setting(default: Any, check: Check = unchecked, doc: str = "") -> Any:
    """A :class:`Settings` field: its default, its check and a one-line description."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class Settings:
    """Base of every method's settings: the recipe keys the method takes, typed and checked."""

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_value(cls, key: str, value: Any, where: str) -> None:
        """Raise a one-line :class:`RecipeError` if ``value`` is not acceptable for ``key``."""
        for f in dataclasses.fields(cls):
            if f.name == key:
                expected = f.metadata.get("check", unchecked)(value)
                if expected is not None:
                    raise RecipeError(f"{where}: {key} must be {expected}, got {value!r}")
                return

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any], where: str) -> S:
        """The validated settings; keys that are not this method's are refused by the recipe."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                cls.check_value(f.name, values[f.name], where)
                kwargs[f.name] = values[f.name]
        out = cls(**kwargs)
        object.__setattr__(out, "_given", frozenset(kwargs))
        return out

    def is_given(self, key: str) -> bool:
        """Whether the recipe set ``key`` (else the field holds the method's default)."""
        return key in getattr(self, "_given", frozenset())

    def given(self) -> dict[str, Any]:
        """The settings the recipe set, by key."""
        return {k: getattr(self, k) for k in sorted(getattr(self, "_given", frozenset()))}


# --- what a plan hook returns ----------------------------------------------------------------------

@dataclass
class Planned:
    """One layer's plan from a method: the layer's constructor config, the ranks to show, notes."""

    config: dict[str, Any]
    ranks: Any
    notes: list[str] = field(default_factory=list)
    reason: str = ""              # one-line summary; default "<method> rank <ranks>"


@dataclass
class Fallback:
    """What a method builds when its own factorization failed, and what the plan should say."""

    layer: nn.Module
    method: str
    config: dict[str, Any]
    ranks: Any
    reason: str
    note: str
    label: str = ""               # the method as prose, e.g. "Tucker-2"


Ladder = tuple[list[Any], list[int], list[int]]  # (rank per rung, params per rung, MACs per rung)


# --- shared plan helpers ---------------------------------------------------------------------------

def fraction(value: Any, where: str) -> float | None:
    """A float rank: the fraction of the layer's parameters to keep."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise RankError(f"{where}: a float rank is the fraction of the layer's parameters to keep, in (0, 1]; "
                            f"got {value} (use an integer for an absolute rank)")
        return value
    return None


def energy(value: Any, where: str) -> float | None:
    """A ``{energy: e}`` rank: keep that share of the spectral energy."""
    if isinstance(value, dict):
        if set(value) != {"energy"}:
            raise RankError(f"{where}: a rank mapping takes one key, 'energy' (e.g. rank: {{energy: 0.9}}); got {sorted(value)}")
        e = value["energy"]
        if not isinstance(e, (int, float)) or isinstance(e, bool) or not 0.0 < float(e) <= 1.0:
            raise RankError(f"{where}: energy must be a number in (0, 1], got {e!r}")
        return float(e)
    return None


def rank_int(value: Any, where: str) -> int:
    if not is_int(value) or value < 1:
        raise RankError(f"{where}: a rank must be a positive integer, got {value!r}")
    return int(value)


def bad_rank(value: Any, where: str, forms: str) -> RankError:
    return RankError(f"{where}: cannot read rank {value!r}; for this method use {forms}")


def conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
    """The geometry of a dense conv as JSON-safe constructor kwargs of a factorized conv."""
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": padding,
            "dilation": list(conv.dilation), "bias": conv.bias is not None, "padding_mode": conv.padding_mode}


def linear_positions(in_shape: Sequence[int]) -> int:
    """How many feature vectors a Linear maps for an input traced at a batch of one: every dim but
    the last (so a sequence-first (L, 1, E) input, as nn.MultiheadAttention takes, counts L)."""
    return math.prod(int(s) for s in in_shape[:-1]) if len(in_shape) > 1 else 1


def layer_macs(layer: nn.Module, in_shape: Sequence[int]) -> int:
    """MACs of one sample through a factorized layer, for the input shape traced at the dense layer
    (at a batch of one)."""
    if hasattr(layer, "in_channels"):  # a conv: MACs depend on the spatial size
        return int(layer.macs_per_sample((int(in_shape[-2]), int(in_shape[-1]))))  # type: ignore[operator]
    if hasattr(layer, "num_embeddings"):  # an embedding: every id is a token
        return math.prod(int(s) for s in in_shape) * int(layer.macs_per_sample())  # type: ignore[operator]
    if hasattr(layer, "macs_for_rows"):  # the schedule depends on how many rows run together (TT)
        return int(layer.macs_for_rows(linear_positions(in_shape)))  # type: ignore[operator]
    return linear_positions(in_shape) * int(layer.macs_per_sample())  # type: ignore[operator]


def meta_macs(cls: type[FactorizedLayer], config: dict[str, Any], in_shape: Sequence[int]) -> int:
    """MACs of the layer ``cls(**config)`` without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        return layer_macs(cls(**config), in_shape)


# --- the method contract ---------------------------------------------------------------------------

class Method:
    """One decomposition method. Subclass, fill the class attributes, implement :meth:`plan` and
    :meth:`factorize`, and :func:`~tncompress.methods.register` an instance."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    types: ClassVar[tuple[str, ...]] = ()          # recipe layer types: "Linear", "Conv2d"
    settings: ClassVar[type[Settings]] = Settings
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 100                     # position in listings and error messages
    supports_budget: ClassVar[bool] = False        # implements structure / ladder / approximations
    costly_ladder_macs: ClassVar[bool] = False     # MACs per rung need a layer object each (a budget on
                                                   # params then skips them)
    dense_compute: ClassVar[bool] = False          # runs the dense op on an assembled weight: fewer trained
                                                   # parameters, never fewer MACs (judged by parameters only)

    # -- layers it builds

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        """The factorized layer class this method builds for ``module``."""
        raise NotImplementedError

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        """Every layer class the method can build (for checkpoints and the contract test)."""
        raise NotImplementedError

    def unsupported(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be replaced (one line), or None."""
        reason = getattr(self.layer_class(module), "unsupported_reason", None)
        return reason(module) if reason is not None else None

    # -- plan and factorize

    def parse(self, values: Mapping[str, Any], where: str) -> Settings:
        """The method's settings from a layer's merged recipe settings (other keys ignored)."""
        return self.settings.from_mapping(values, where)

    def plan(self, module: nn.Module, settings: Any, where: str) -> Planned:
        """Resolve ``settings`` for ``module``: constructor config, ranks and notes (raises
        :class:`RankError` / :class:`RecipeError` with ``where`` for what cannot be honoured)."""
        raise NotImplementedError

    def describe(self, planned: Planned) -> str:
        return planned.reason or f"{self.name} rank {planned.ranks}"

    def factorize(self, module: nn.Module, config: dict[str, Any], settings: Any) -> nn.Module:
        """The factorized layer of structure ``config``, initialised from the trained ``module``."""
        raise NotImplementedError

    def degenerate(self, layer: nn.Module) -> str | None:
        """Whether a fresh factorization is unusable although finite (e.g. CP's diverging components)."""
        return None

    def fit_note(self, layer: nn.Module) -> str | None:
        """A note on how the fit went (iterations, error), for the plan; None: nothing to say."""
        return None

    def fallback(self, module: nn.Module, layer: nn.Module, settings: Any, why: str) -> Fallback | None:
        """What to build instead of ``layer`` when it degenerated, is non-finite or misses its error
        bound (``why``); None: no alternative (the pipeline leaves the layer dense if it must)."""
        return None

    # -- budget hooks (only with supports_budget)

    def structure(self, module: nn.Module, settings: Any, where: str) -> Planned:
        """The config without the rank, for a layer whose rank the budget decides."""
        raise NotImplementedError

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        """Every compressing rank of the layer, cheapest first, with params and MACs (when asked)."""
        raise NotImplementedError

    def approximations(self, module: nn.Module, config: dict[str, Any], settings: Any, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        """The approximated dense weight (float64) at each of ``ranks``, sharing work between ranks."""
        raise NotImplementedError

    def approximator(self, module: nn.Module, config: dict[str, Any], settings: Any, top: Any,
                     cp_iterations: int) -> Callable[[Any], torch.Tensor] | None:
        """A function rank → approximated weight that reuses one decomposition up to rank ``top``
        (when truncating it is exact or near it), or None to compute each rank on its own."""
        return None
