"""Turn a recipe's per-layer settings into a concrete plan: method, modes, ranks, the factorized
layer's constructor config, and parameters / MACs before and after, with the reason for every
layer that is left dense."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import torch
from torch import nn

from tncompress.errors import RankError, RecipeError
from tncompress.methods import get_method, methods_for
from tncompress.methods.base import layer_macs
from tncompress.recipe import COMMON_SETTING_KEYS, LayerChoice, Recipe, match_layers
from tncompress.surgery import candidate_layers, type_name

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = {"batch_size": 8, "seed": 0}


@dataclass
class LayerPlan:
    """The plan for one decomposable layer (serialised into checkpoints with :meth:`to_dict`)."""

    name: str
    type: str
    action: str                        # "decompose" or "keep"
    method: str                        # "tt", "lowrank", "cp", "tucker2" or "none"
    decided_by: str | None = None
    rules: list[str] = field(default_factory=list)
    reason: str = ""                   # why kept, or a summary of what was chosen
    settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    ranks: Any = None
    input_shape: list[int] | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    weight_rel_error: float | None = None
    output_rel_error: float | None = None
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None  # with a recipe budget: candidates, measured sensitivity, scan time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def awaits_budget(self) -> bool:
        """Planned for decomposition with the rank left to the recipe's budget."""
        return self.action == "decompose" and self.ranks is None

    @property
    def layer_entry(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this layer's structure."""
        return {"name": self.name, "method": self.method, "config": dict(self.config)}


def calibration_settings(recipe: Recipe | None) -> dict[str, int]:
    settings = dict(DEFAULT_CALIBRATION)
    if recipe is not None:
        settings.update(recipe.calibration)
    return settings


def calibration_batch(input_shape: Sequence[int], batch_size: int, seed: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reproducible standard-normal batch of ``batch_size`` samples shaped like ``input_shape``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, *[int(s) for s in input_shape[1:]])
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def trace_shapes(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> dict[str, tuple[list[int], list[int]]]:
    """Run ``model`` once and record (input shape, output shape) of the named submodules."""
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, args: tuple, output: Any, _name: str = name) -> None:
            if _name not in shapes and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes[_name] = (list(args[0].shape), list(output.shape))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        raise RecipeError(f"the model does not run on an input of shape {list(example.shape)} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "give the right --input-shape") from exc
    finally:
        for h in handles:
            h.remove()
    return shapes


def dense_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dense_macs(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """MACs of one sample through a dense Linear / Conv2d, from traced shapes."""
    if isinstance(module, nn.Linear):
        positions = math.prod(in_shape[1:-1]) if len(in_shape) > 2 else 1
        return positions * module.in_features * module.out_features
    assert isinstance(module, nn.Conv2d)
    kh, kw = module.kernel_size
    return module.out_channels * (module.in_channels // module.groups) * kh * kw * out_shape[-2] * out_shape[-1]


def factorized_macs(layer: nn.Module, in_shape: Sequence[int]) -> int:
    """MACs of one sample through a factorized layer, for the input shape traced at the dense layer."""
    return layer_macs(layer, in_shape)


@dataclass
class Plan(Sequence[LayerPlan]):
    """Every decomposable layer's plan, in model order, and the budget's allocation summary (None
    without a recipe budget). Iterates, indexes and measures like the list of its layers."""

    layers: list[LayerPlan]
    budget: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @overload
    def __getitem__(self, index: int) -> LayerPlan: ...

    @overload
    def __getitem__(self, index: slice) -> list[LayerPlan]: ...

    def __getitem__(self, index: int | slice) -> LayerPlan | list[LayerPlan]:
        return self.layers[index]

    @property
    def decomposed(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.action == "decompose"]


def _where(choice: LayerChoice, source: str) -> str:
    return f"{source}: layer {choice.name}" + (f" ({choice.decided_by})" if choice.decided_by else "")


def _with_where(exc: RankError | RecipeError, where: str) -> RankError | RecipeError:
    return exc if str(exc).startswith(where) else type(exc)(f"{where}: {exc}")


def plan_layer(choice: LayerChoice, module: nn.Module, shapes: tuple[list[int], list[int]] | None,
               source: str, *, rank_from_budget: bool = False) -> LayerPlan:
    """Resolve one layer's merged settings into a :class:`LayerPlan` through its method.

    With ``rank_from_budget`` (the recipe has a ``budget`` and the method supports it), the plan
    holds the rank-free structure only (``ranks`` None) and :mod:`tncompress.budget` decides.
    """
    tname = choice.type_name
    plan = LayerPlan(name=choice.name, type=tname, action="keep", method="none",
                     decided_by=choice.decided_by, rules=list(choice.rules), settings=dict(choice.settings))
    plan.params_before = plan.params_after = dense_params(module)
    if shapes is not None:
        plan.input_shape = list(shapes[0])
        plan.macs_before = plan.macs_after = dense_macs(module, *shapes)
    where = _where(choice, source)
    if choice.excluded_by:
        plan.reason = f"excluded ({choice.excluded_by})"
        plan.decided_by = choice.excluded_by
        return plan
    name = choice.settings.get("method")
    if name is None:
        plan.reason = ("no rule matched" if not choice.rules
                       else f"no method given for this {tname} (rules: {', '.join(choice.rules)})")
        if choice.rules:
            raise RecipeError(f"{where}: no method given; add 'method:' to the rule or to defaults.{tname}")
        return plan
    applicable = [*methods_for(tname), "none"]
    if name not in applicable:
        raise RecipeError(f"{where}: method {name!r} does not apply to a {tname}; use one of {', '.join(applicable)}")
    keys = frozenset() if name == "none" else get_method(name).settings.keys()
    extra = set(choice.settings) - {"method"} - keys - COMMON_SETTING_KEYS
    if extra:
        raise RecipeError(f"{where}: key {sorted(extra)[0]!r} does not apply to method {name!r} "
                          f"(it takes {', '.join(sorted(keys)) or 'no settings'})")
    if name == "none":
        plan.reason = "method: none"
        return plan
    method = get_method(name)
    settings = method.parse(choice.settings, where)
    reason = method.unsupported(module)
    if reason:
        plan.reason = reason
        plan.notes.append(f"{name} requested but not applied: {reason}")
        return plan
    if shapes is None:
        plan.reason = "not run by the model's forward pass on the calibration input; left dense"
        return plan
    budgeted = rank_from_budget and method.supports_budget
    try:
        planned = method.structure(module, settings, where) if budgeted else method.plan(module, settings, where)
        layer = None if budgeted else method.layer_class(module)(**planned.config)
    except (RankError, RecipeError) as exc:
        raise _with_where(exc, where) from None
    plan.action, plan.config, plan.ranks = "decompose", planned.config, planned.ranks
    plan.method = method.layer_class(module).method  # the layer's key: what a checkpoint rebuilds
    plan.notes.extend(planned.notes)
    if layer is None:
        plan.reason = f"{name}: rank decided by the budget"
        return plan
    plan.params_after = dense_params(layer)
    plan.macs_after = factorized_macs(layer, shapes[0])
    plan.reason = method.describe(planned)
    if plan.params_after >= plan.params_before:
        plan.notes.append(f"grows the layer: {plan.params_after:,} params vs {plan.params_before:,} dense")
    return plan


def plan_layers(model: nn.Module, recipe: Recipe, input_shape: Sequence[int]) -> Plan:
    """Match the recipe to ``model`` and resolve every decomposable layer into a :class:`LayerPlan`.

    With a recipe ``budget``, layers of methods the budget supports are planned without ranks;
    :func:`tncompress.budget.apply_budget` fills them in (:func:`tncompress.compress.make_plan`
    runs both).
    """
    candidates = list(candidate_layers(model))
    pairs = [(name, type_name(module) or "") for name, module, _ in candidates]
    choices = match_layers(recipe, pairs)
    param = next(model.parameters(), None)
    example = calibration_batch(input_shape, 1, 0, dtype=param.dtype if param is not None else torch.float32,
                                device=param.device if param is not None else "cpu")
    shapes = trace_shapes(model, example, [n for n, _, _ in candidates])
    budgeted = bool(recipe.budget)
    plans = []
    for choice, (name, module, blocked) in zip(choices, candidates):
        if blocked and not choice.excluded_by:
            plan = plan_layer(LayerChoice(name, choice.type_name, {}, choice.rules, choice.decided_by), module,
                              shapes.get(name), recipe.source)
            plan.reason = blocked
        else:
            plan = plan_layer(choice, module, shapes.get(name), recipe.source, rank_from_budget=budgeted)
        plans.append(plan)
    return Plan(plans)

