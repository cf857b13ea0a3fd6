"""Turn a recipe's per-layer settings into a concrete plan: method, modes, ranks, the factorized
layer's constructor config, and parameters / MACs before and after, with the reason for every
layer that is left dense."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tncompress.errors import RankError, RecipeError
from tncompress.measure import countable_attention
from tncompress.methods import get_method, methods_for
from tncompress.methods.base import layer_macs, linear_positions
from tncompress.recipe import COMMON_SETTING_KEYS, LayerChoice, Recipe, match_layers
from tncompress.surgery import candidate_layers, dense_view, other_layers, type_name

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
    calls: int = 1                     # how often the forward calls the layer (MACs count every call)
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
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      vocabulary: int | None = None) -> torch.Tensor:
    """A reproducible batch of ``batch_size`` samples shaped like ``input_shape``: standard-normal
    values, or uniformly random token ids below ``vocabulary`` (int64) for a model that takes ids."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, *[int(s) for s in input_shape[1:]])
    if vocabulary is not None:
        return torch.randint(0, int(vocabulary), shape, generator=gen).to(device=device)
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def token_vocabulary(model: nn.Module) -> int | None:
    """The vocabulary size when ``model`` takes token ids, else None.

    The rule: the model's first module (in registration order) that holds parameters is an
    embedding (``nn.Embedding`` or a factorized one), as in BERT, GPT-2 and every Hugging Face
    language model; a vision model starts with a conv or a Linear.
    """
    for module in model.modules():
        vocab = getattr(module, "num_embeddings", None)
        if "Embedding" in type(module).__name__ and isinstance(vocab, int):
            if any(True for _ in module.parameters()):  # a factorized table keeps its cores in children
                return int(vocab)
        if any(True for _ in module.parameters(recurse=False)):
            return None
    return None


def example_batch(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """:func:`calibration_batch` with the model's dtype and device, and token ids for a model that
    takes them (:func:`token_vocabulary`)."""
    param = next(model.parameters(), None)
    return calibration_batch(input_shape, batch_size, seed, dtype=param.dtype if param is not None else torch.float32,
                             device=param.device if param is not None else "cpu", vocabulary=token_vocabulary(model))


def describe_synthetic(model: nn.Module) -> str:
    """What :func:`example_batch` feeds ``model``, for plans and reports."""
    vocab = token_vocabulary(model)
    return "gaussian noise" if vocab is None else f"random token ids below {vocab:,}"


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def trace_shapes(model: nn.Module, example: torch.Tensor, names: Sequence[str]
                 ) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Run ``model`` once and record (input shape, output shape) of every call of the named
    submodules (a module called twice, e.g. shared between blocks, has two entries)."""
    shapes: dict[str, list[tuple[list[int], list[int]]]] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, args: tuple, output: Any, _name: str = name) -> None:
            first, out = (args[0] if args else None), _first_tensor(output)
            if isinstance(first, torch.Tensor) and out is not None:
                shapes.setdefault(_name, []).append((list(first.shape), list(out.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), countable_attention():
            model(example)
    except Exception as exc:
        what = "token ids" if not example.is_floating_point() else "an input"
        raise RecipeError(f"the model does not run on {what} of shape {list(example.shape)} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "give the right --input-shape") from exc
    finally:
        for h in handles:
            h.remove()
    return shapes


class _TensorsSeen(TorchDispatchMode):
    """The storage addresses of every tensor an op receives (to tell a weight read directly by the
    parent module from an unused module)."""

    def __init__(self) -> None:
        super().__init__()
        self.ptrs: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in (*args, *(kwargs or {}).values()):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.ptrs.add(t.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def weights_read_directly(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> set[str]:
    """Which of the named (never called) modules have their weight used by the forward anyway: a
    parent reads it (torchvision's Swin attention calls ``F.linear`` on ``qkv.weight``)."""
    seen = _TensorsSeen()
    with torch.no_grad(), countable_attention(), seen:
        model(example)
    out = set()
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.untyped_storage().data_ptr() in seen.ptrs:
            out.add(name)
    return out


def dense_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dense_macs(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """MACs of one call of a dense Linear / Conv2d / Embedding at the traced batch of one, from its
    shapes (an embedding lookup is no MAC)."""
    if isinstance(module, nn.Linear):
        return linear_positions(in_shape) * module.in_features * module.out_features
    if isinstance(module, nn.Embedding):
        return 0
    assert isinstance(module, nn.Conv2d)
    kh, kw = module.kernel_size
    return module.out_channels * (module.in_channels // module.groups) * kh * kw * out_shape[-2] * out_shape[-1]


def factorized_macs(layer: nn.Module, in_shape: Sequence[int] | Sequence[Sequence[int]]) -> int:
    """MACs of one sample through a factorized layer, for the input shape traced at the dense layer
    (or the list of shapes of all its calls)."""
    if in_shape and not isinstance(in_shape[0], int):
        return sum(int(layer_macs(layer, shape)) for shape in in_shape)  # type: ignore[arg-type, misc]
    return layer_macs(layer, in_shape)  # type: ignore[arg-type]


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


def call_shapes(entry: LayerPlan) -> list[list[int]] | None:
    """The input shape of every call of the layer, for factorized MACs (None: never traced)."""
    if entry.input_shape is None:
        return None
    return [list(entry.input_shape)] * max(1, entry.calls)


def plan_layer(choice: LayerChoice, module: nn.Module,
               shapes: tuple[list[int], list[int]] | list[tuple[list[int], list[int]]] | None,
               source: str, *, rank_from_budget: bool = False) -> LayerPlan:
    """Resolve one layer's merged settings into a :class:`LayerPlan` through its method.

    With ``rank_from_budget`` (the recipe has a ``budget`` and the method supports it), the plan
    holds the rank-free structure only (``ranks`` None) and :mod:`tncompress.budget` decides.
    """
    tname = choice.type_name
    plan = LayerPlan(name=choice.name, type=tname, action="keep", method="none",
                     decided_by=choice.decided_by, rules=list(choice.rules), settings=dict(choice.settings))
    module = dense_view(module)
    plan.params_before = plan.params_after = dense_params(module)
    calls = [shapes] if isinstance(shapes, tuple) else list(shapes or [])
    if calls:
        plan.input_shape, plan.calls = list(calls[0][0]), len(calls)
        if any(c[0] != calls[0][0] for c in calls):
            plan.notes.append(f"called {len(calls)} times with different input shapes; MACs counted at the first "
                              f"shape {calls[0][0]}")
        elif len(calls) > 1:
            plan.notes.append(f"called {len(calls)} times per forward; MACs count every call")
        plan.macs_before = plan.macs_after = dense_macs(module, *calls[0]) * len(calls)
    shapes = calls[0] if calls else None
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
        article = "an" if tname[:1].lower() in "aeiou" else "a"
        raise RecipeError(f"{where}: method {name!r} does not apply to {article} {tname}; use one of {', '.join(applicable)}")
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
        plan.reason = ("never called by the model's forward on the calibration input (unused, or on a branch this "
                       "input does not take); left dense")
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
    plan.macs_after = factorized_macs(layer, call_shapes(plan) or shapes[0])
    plan.reason = method.describe(planned)
    growth = growth_reason(plan, method.dense_compute)
    if growth and not choice.settings.get("allow_growth", False):
        return keep_dense(plan, f"{KEPT_FOR_GROWTH} {name} {plan.ranks} {growth}; a layer is never made larger or "
                                "slower unless its rule says allow_growth: true")
    growth_notes(plan)
    return plan


KEPT_FOR_GROWTH = "kept dense:"  # how the reason of a layer kept dense by :func:`growth_reason` starts


def growth_reason(plan: LayerPlan, dense_compute: bool = False) -> str | None:
    """Why the planned factorization is no gain: more parameters than the dense layer, or (unless the
    method always runs the dense op, or the dense layer is a lookup without MACs) more MACs."""
    if plan.params_after > plan.params_before:
        return f"would have {plan.params_after:,} params against {plan.params_before:,} dense"
    if not dense_compute and plan.macs_before and plan.macs_after > plan.macs_before:
        return (f"would raise the layer's MACs {plan.macs_after / plan.macs_before:.2f}× "
                f"({plan.macs_after:,} against {plan.macs_before:,} dense)")
    return None


def keep_dense(plan: LayerPlan, reason: str) -> LayerPlan:
    """``plan`` turned back into "keep" with ``reason`` (the dense counts restored)."""
    plan.action, plan.method, plan.config, plan.ranks = "keep", "none", {}, None
    plan.params_after, plan.macs_after = plan.params_before, plan.macs_before
    plan.reason = reason
    return plan


def growth_notes(plan: LayerPlan) -> None:
    """Say when a factorized layer is larger or costlier than the dense one (a TT of small rank can
    double a layer's MACs while shrinking its parameters)."""
    if plan.params_after >= plan.params_before:
        plan.notes.append(f"grows the layer: {plan.params_after:,} params vs {plan.params_before:,} dense")
    if plan.macs_before and plan.macs_after > plan.macs_before:
        plan.notes.append(f"raises the layer's MACs: {plan.macs_after:,} vs {plan.macs_before:,} dense "
                          f"({plan.macs_after / plan.macs_before:.2f}×)")
    elif not plan.macs_before and plan.macs_after:
        plan.notes.append(f"adds {plan.macs_after:,} MACs per sample: the dense lookup has none (it reads rows)")


def _factorized_layers(model: nn.Module) -> dict[str, str]:
    """Name → method of the layers ``model`` already has factorized (a reloaded compressed model),
    so that a rule naming one is told so instead of "matches no layer"."""
    from tncompress.layers.base import FactorizedLayer

    return {name: type(module).method for name, module in model.named_modules() if isinstance(module, FactorizedLayer)}


def plan_layers(model: nn.Module, recipe: Recipe, input_shape: Sequence[int]) -> Plan:
    """Match the recipe to ``model`` and resolve every decomposable layer into a :class:`LayerPlan`.

    With a recipe ``budget``, layers of methods the budget supports are planned without ranks;
    :func:`tncompress.budget.apply_budget` fills them in (:func:`tncompress.compress.make_plan`
    runs both).
    """
    candidates = list(candidate_layers(model))
    pairs = [(name, type_name(module) or "") for name, module, _ in candidates]
    choices = match_layers(recipe, pairs, _factorized_layers(model))
    example = example_batch(model, input_shape)
    shapes = trace_shapes(model, example, [n for n, _, _ in candidates])
    uncalled = [n for n, _, blocked in candidates if n not in shapes and not blocked]
    read = weights_read_directly(model, example, uncalled) if uncalled else set()
    budgeted = bool(recipe.budget)
    plans = []
    for choice, (name, module, blocked) in zip(choices, candidates):
        if name in read:
            blocked = ("never called: its parent reads its weight directly (F.linear / F.conv on .weight), so a "
                       "factorized module here would not run; left dense")
        if blocked and not choice.excluded_by:
            plan = plan_layer(LayerChoice(name, choice.type_name, {}, [], choice.decided_by), module,
                              shapes.get(name), recipe.source)
            plan.reason, plan.rules = blocked, list(choice.rules)
        else:
            plan = plan_layer(choice, module, shapes.get(name), recipe.source, rank_from_budget=budgeted)
        plans.append(plan)
    for name, module, kind, reason in other_layers(model):
        plans.append(LayerPlan(name=name, type=kind, action="keep", method="none", reason=reason,
                               params_before=dense_params(module), params_after=dense_params(module)))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    plans.sort(key=lambda p: order.get(p.name, len(order)))
    small_layer_notes(plans, dense_params(model))
    return Plan(plans)


SMALL_SHARE = 0.01  # a layer whose factorization saves less than this share of the model gains nothing worth its error


def small_layer_notes(plans: Sequence[LayerPlan], total_params: int) -> None:
    """Note the layers a uniform fraction (``rank: 0.5``) decomposes although they hold too little of
    the model to gain anything — a 1-channel stem, a 10-way head: their error costs accuracy for a
    saving below 1% of the model's parameters and MACs. A budget would weigh that; a fraction cannot."""
    total_macs = sum(p.macs_before for p in plans)
    for plan in plans:
        rank = plan.settings.get("rank")
        if plan.action != "decompose" or not isinstance(rank, float) or plan.budget is not None:
            continue
        saved_params = (plan.params_before - plan.params_after) / max(total_params, 1)
        saved_macs = (plan.macs_before - plan.macs_after) / max(total_macs, 1)
        narrow = _narrow_side(plan.config)
        if saved_params < SMALL_SHARE and saved_macs < SMALL_SHARE:
            why = f"saves {saved_params:.2%} of the model's params and {saved_macs:.2%} of its MACs"
        elif narrow:
            why = narrow
        else:
            continue
        plan.notes.append(f"a uniform fraction (rank: {rank:g}) on a layer this small ({why}) costs accuracy for "
                          "little; consider method: none here, or a budget (--budget params:R), which weighs that")


def _narrow_side(config: dict[str, Any]) -> str | None:
    """Whether a layer is too narrow for a rank cut to keep it accurate: a conv with at most 3 input
    channels (a stem), or a weight with a side of at most 16 (a 10-way head)."""
    cin, cout = config.get("in_channels"), config.get("out_channels")
    if isinstance(cin, int) and isinstance(cout, int):
        kernel = config.get("kernel_size") or [1, 1]
        if cin <= 3:
            return f"{cin} input channel(s): a stem"
        side = min(cout, cin * int(kernel[0]) * int(kernel[1]))
        return f"its weight has a side of {side}" if side <= 16 else None
    fin, fout = config.get("in_features"), config.get("out_features")
    if isinstance(fin, int) and isinstance(fout, int) and min(fin, fout) <= 16:
        return f"{min(fin, fout)} {'outputs' if fout <= fin else 'inputs'}"
    return None

