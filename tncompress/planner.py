"""Turn a recipe's per-layer settings into a concrete plan: method, modes, ranks, the factorized
layer's constructor config, and parameters / MACs before and after, with the reason for every
layer that is left dense."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tncompress.decompositions import svd as svd_ops
from tncompress.decompositions import tt as tt_ops
from tncompress.errors import RankError, RecipeError
from tncompress.layers import LAYER_CLASSES, CPConv2d, ProdSumConv2d, Tucker2Conv2d
from tncompress.recipe import COMMON_SETTING_KEYS, METHOD_KEYS, METHODS_BY_TYPE, LayerChoice, Recipe, match_layers
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
    if isinstance(layer, (CPConv2d, Tucker2Conv2d, ProdSumConv2d)):
        return int(layer.macs_per_sample((int(in_shape[-2]), int(in_shape[-1]))))
    positions = math.prod(in_shape[1:-1]) if len(in_shape) > 2 else 1
    return positions * int(layer.macs_per_sample())


# --- rank resolution -----------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(value: Any, where: str) -> float | None:
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise RankError(f"{where}: a float rank is the fraction of the layer's parameters to keep, in (0, 1]; "
                            f"got {value} (use an integer for an absolute rank)")
        return value
    return None


def _energy(value: Any, where: str) -> float | None:
    if isinstance(value, dict):
        if set(value) != {"energy"}:
            raise RankError(f"{where}: a rank mapping takes one key, 'energy' (e.g. rank: {{energy: 0.9}}); got {sorted(value)}")
        e = value["energy"]
        if not isinstance(e, (int, float)) or isinstance(e, bool) or not 0.0 < float(e) <= 1.0:
            raise RankError(f"{where}: energy must be a number in (0, 1], got {e!r}")
        return float(e)
    return None


def _positive_int(value: Any, where: str) -> int:
    if not _is_int(value) or value < 1:
        raise RankError(f"{where}: a rank must be a positive integer, got {value!r}")
    return int(value)


def _bad_rank(value: Any, where: str, forms: str) -> RankError:
    return RankError(f"{where}: cannot read rank {value!r}; for this method use {forms}")


def plan_tt(module: nn.Linear, s: dict[str, Any], where: str) -> tuple[dict[str, Any], Any, list[str]]:
    notes: list[str] = []
    d = s.get("d")
    if d is not None and (not _is_int(d) or d < 2):
        raise RankError(f"{where}: d (number of TT cores) must be an integer ≥ 2, got {d!r}")
    in_modes, out_modes = s.get("in_modes"), s.get("out_modes")
    for key, modes, feats in (("in_modes", in_modes, module.in_features), ("out_modes", out_modes, module.out_features)):
        if modes is None:
            continue
        if not isinstance(modes, list) or not modes or not all(_is_int(m) and m >= 1 for m in modes):
            raise RankError(f"{where}: {key} must be a list of positive integers, got {modes!r}")
        if math.prod(modes) != feats:
            raise RankError(f"{where}: {key} {modes} multiply to {math.prod(modes)}, but the layer has {feats} "
                            f"{'input' if key == 'in_modes' else 'output'} features")
    if in_modes is not None and out_modes is not None and len(in_modes) != len(out_modes):
        raise RankError(f"{where}: in_modes has {len(in_modes)} entries and out_modes {len(out_modes)}; they must match")
    if in_modes is None or out_modes is None:
        n_cores = len(in_modes or out_modes or []) or d
        auto_in, auto_out = tt_ops.auto_modes(module.in_features, module.out_features, n_cores)
        in_modes = in_modes or auto_in
        out_modes = out_modes or auto_out
        notes.append(f"modes chosen automatically: in {list(in_modes)}, out {list(out_modes)}")
    elif d is not None and d != len(in_modes):
        raise RankError(f"{where}: d = {d} but the given modes have {len(in_modes)} entries")

    rank = s.get("rank", 8)
    frac, energy = _fraction(rank, where), _energy(rank, where)
    if frac is not None:
        ranks = [tt_ops.tt_rank_for_fraction(out_modes, in_modes, frac)] * (len(in_modes) - 1)
        ranks = tt_ops.clip_tt_ranks(ranks[0], out_modes, in_modes)
        notes.append(f"rank {ranks} keeps at most {frac:.0%} of the parameters")
    elif energy is not None:
        eps = math.sqrt(max(0.0, 1.0 - energy))
        cores = tt_ops.tt_matrix_svd(module.weight.detach(), out_modes, in_modes, rel_eps=eps)
        ranks = [int(c.shape[-1]) for c in cores[:-1]]
        notes.append(f"ranks from TT-SVD at relative accuracy {eps:.3g} (energy {energy})")
    elif _is_int(rank):
        _positive_int(rank, where)
        ranks = tt_ops.clip_tt_ranks(rank, out_modes, in_modes)
        if any(r < rank for r in ranks):
            notes.append(f"rank {rank} clipped to the useful maximum at each bond: {ranks}")
    elif isinstance(rank, list):
        for r in rank:
            _positive_int(r, where)
        ranks = tt_ops.clip_tt_ranks(rank, out_modes, in_modes)
    else:
        raise _bad_rank(rank, where, "an integer, a list of d-1 integers, a fraction in (0, 1], or {energy: 0.9}")
    config = {"in_features": module.in_features, "out_features": module.out_features,
              "in_modes": list(in_modes), "out_modes": list(out_modes), "ranks": list(ranks),
              "bias": module.bias is not None}
    return config, list(ranks), notes


def plan_lowrank(module: nn.Linear, s: dict[str, Any], where: str) -> tuple[dict[str, Any], Any, list[str]]:
    notes: list[str] = []
    m, n = module.out_features, module.in_features
    full = min(m, n)
    rank = s.get("rank", "vbmf")
    frac, energy = _fraction(rank, where), _energy(rank, where)
    if frac is not None:
        r = svd_ops.lowrank_rank_for_fraction(m, n, frac)
        notes.append(f"rank {r} keeps at most {frac:.0%} of the parameters")
    elif energy is not None:
        r = svd_ops.energy_rank(svd_ops.singular_values(module.weight.detach()), energy)
        notes.append(f"rank {r} keeps {energy:.0%} of the spectral energy")
    elif rank == "vbmf":
        from tncompress.decompositions.ranks import evbmf_rank

        floor, weakening = s.get("floor", 1), s.get("weakening", 0.0)
        if not _is_int(floor) or floor < 1:
            raise RankError(f"{where}: floor must be a positive integer, got {floor!r}")
        if not isinstance(weakening, (int, float)) or isinstance(weakening, bool) or not 0.0 <= weakening < 1.0:
            raise RankError(f"{where}: weakening must be a number in [0, 1), got {weakening!r}")
        r = evbmf_rank(module.weight.detach().double())
        r = min(full, max(floor, math.ceil(r + weakening * (full - r) - 1e-9)))  # as for Tucker-2
        notes.append(f"rank {r} from empirical VBMF" + (f", weakened by {weakening}" if weakening else "")
                     + (f", at least {floor}" if floor > 1 else ""))
    elif _is_int(rank):
        r = _positive_int(rank, where)
        if r > full:
            raise RankError(f"{where}: rank {r} exceeds the largest useful rank {full} of a {m}×{n} weight")
    else:
        raise _bad_rank(rank, where, "an integer, a fraction in (0, 1], {energy: 0.9} or vbmf")
    if r * (m + n) >= m * n:
        notes.append(f"rank {r} does not compress this layer ({r * (m + n)} ≥ {m * n} weights)")
    config = {"in_features": n, "out_features": m, "rank": int(r), "bias": module.bias is not None}
    return config, int(r), notes


def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride), "padding": padding,
            "dilation": list(conv.dilation), "bias": conv.bias is not None, "padding_mode": conv.padding_mode}


def plan_cp(module: nn.Conv2d, s: dict[str, Any], where: str) -> tuple[dict[str, Any], Any, list[str]]:
    notes: list[str] = []
    form = s.get("form", "3conv")
    if form not in ("3conv", "4conv"):
        raise RecipeError(f"{where}: form must be '3conv' or '4conv', got {form!r}")
    if s.get("engine", "als") not in ("als", "tensorly"):
        raise RecipeError(f"{where}: engine must be 'als' or 'tensorly', got {s['engine']!r}")
    if s.get("fallback", "tucker2") not in ("tucker2", "none"):
        raise RecipeError(f"{where}: fallback must be 'tucker2' or 'none', got {s['fallback']!r}")
    shape = tuple(module.weight.shape)
    rank = s.get("rank")
    if rank is None:
        raise RankError(f"{where}: method cp needs a rank (an integer, or a fraction of parameters such as 0.3)")
    frac = _fraction(rank, where)
    if frac is not None:
        from tncompress.decompositions.ranks import cp_rank_for_fraction

        r = cp_rank_for_fraction(shape, frac, form)
        notes.append(f"rank {r} keeps at most {frac:.0%} of the parameters")
    elif _is_int(rank):
        r = _positive_int(rank, where)
    else:
        raise _bad_rank(rank, where, "an integer or a fraction in (0, 1]")
    config = {**_conv_kwargs(module), "rank": int(r), "form": form}
    return config, int(r), notes


def plan_tucker2(module: nn.Conv2d, s: dict[str, Any], where: str) -> tuple[dict[str, Any], Any, list[str]]:
    from tncompress.decompositions import ranks as rank_rules

    notes: list[str] = []
    cout, cin = module.out_channels, module.in_channels
    shape = tuple(module.weight.shape)
    rank = s.get("rank", "vbmf")
    floor, weakening = s.get("floor", 1), s.get("weakening", 0.0)
    if not _is_int(floor) or floor < 1:
        raise RankError(f"{where}: floor must be a positive integer, got {floor!r}")
    if not isinstance(weakening, (int, float)) or isinstance(weakening, bool) or not 0.0 <= weakening < 1.0:
        raise RankError(f"{where}: weakening must be a number in [0, 1), got {weakening!r}")
    frac, energy = _fraction(rank, where), _energy(rank, where)
    if frac is not None:
        r_out, r_in = rank_rules.tucker2_ranks_for_fraction(shape, frac)
        notes.append(f"ranks keep at most {frac:.0%} of the parameters")
    elif energy is not None:
        r_out, r_in = rank_rules.energy_tucker2_ranks(module.weight.detach(), energy)
        notes.append(f"ranks keep {energy:.0%} of each unfolding's energy")
    elif rank == "vbmf":
        r_out, r_in = rank_rules.vbmf_tucker2_ranks(module.weight.detach(), floor=floor, weakening=float(weakening))
        notes.append("ranks from empirical VBMF of the two channel unfoldings"
                     + (f", weakened by {weakening}" if weakening else ""))
    elif _is_int(rank):
        r = _positive_int(rank, where)
        r_in, r_out = min(r, cin), min(r, cout)
        if (r_in, r_out) != (r, r):
            notes.append(f"rank {r} clipped to the channel counts: in {r_in}, out {r_out}")
    elif isinstance(rank, (list, dict)):
        if isinstance(rank, dict):
            if set(rank) != {"in", "out"}:
                raise _bad_rank(rank, where, "{in: R_in, out: R_out}")
            r_in, r_out = rank["in"], rank["out"]
        elif len(rank) != 2:
            raise RankError(f"{where}: a Tucker-2 rank list is [R_in, R_out], got {rank!r}")
        else:
            r_in, r_out = rank
        r_in, r_out = _positive_int(r_in, where), _positive_int(r_out, where)
        if r_in > cin or r_out > cout:
            raise RankError(f"{where}: Tucker-2 ranks [R_in={r_in}, R_out={r_out}] exceed the channels "
                            f"(in {cin}, out {cout})")
    else:
        raise _bad_rank(rank, where, "an integer, [R_in, R_out], a fraction in (0, 1], {energy: 0.9} or vbmf")
    algorithm = s.get("algorithm", "hooi")
    if algorithm not in ("hooi", "hosvd"):
        raise RecipeError(f"{where}: algorithm must be 'hooi' or 'hosvd', got {algorithm!r}")
    config = {**_conv_kwargs(module), "ranks": [int(r_in), int(r_out)]}
    return config, [int(r_in), int(r_out)], notes


def plan_prodsum(module: nn.Linear | nn.Conv2d, s: dict[str, Any], where: str) -> tuple[dict[str, Any], Any, list[str]]:
    """Product-of-sums: no rank; the trainable count is Σ terms (validated by the layer itself). A
    Conv2d gets the same factorization of its unfolded (out, in·kh·kw) kernel."""
    sweeps = s.get("sweeps", 8)
    if not _is_int(sweeps) or sweeps < 1:
        raise RecipeError(f"{where}: sweeps (alternating least-squares sweeps for p > 1) must be a positive integer, got {sweeps!r}")
    shape = (_conv_kwargs(module) if isinstance(module, nn.Conv2d)
             else {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None})
    config = {**shape, **{k: s[k] for k in ("p", "terms", "family", "seed", "widths", "g", "density") if k in s}}
    terms = s.get("terms", 16)
    return config, terms if isinstance(terms, list) else [terms] * s.get("p", 1), []


PLANNERS = {"tt": plan_tt, "lowrank": plan_lowrank, "cp": plan_cp, "tucker2": plan_tucker2, "prodsum": plan_prodsum}


def _layer_method(module: nn.Module, method: str) -> str:
    """The layer class key a recipe method builds for ``module`` (prodsum on a conv: prodsum_conv)."""
    return "prodsum_conv" if method == "prodsum" and isinstance(module, nn.Conv2d) else method


def _unsupported(module: nn.Module, method: str) -> str | None:
    if method in ("cp", "tucker2") or _layer_method(module, method) == "prodsum_conv":
        cls = LAYER_CLASSES[_layer_method(module, method)]
        return cls.unsupported_reason(module)  # type: ignore[attr-defined]
    return None


def plan_layer(choice: LayerChoice, module: nn.Module, shapes: tuple[list[int], list[int]] | None,
               source: str) -> LayerPlan:
    """Resolve one layer's merged settings into a :class:`LayerPlan`."""
    tname = choice.type_name
    plan = LayerPlan(name=choice.name, type=tname, action="keep", method="none",
                     decided_by=choice.decided_by, rules=list(choice.rules), settings=dict(choice.settings))
    plan.params_before = plan.params_after = dense_params(module)
    if shapes is not None:
        plan.input_shape = list(shapes[0])
        plan.macs_before = plan.macs_after = dense_macs(module, *shapes)
    where = f"{source}: layer {choice.name}" + (f" ({choice.decided_by})" if choice.decided_by else "")
    if choice.excluded_by:
        plan.reason = f"excluded ({choice.excluded_by})"
        plan.decided_by = choice.excluded_by
        return plan
    method = choice.settings.get("method")
    if method is None:
        plan.reason = ("no rule matched" if not choice.rules
                       else f"no method given for this {tname} (rules: {', '.join(choice.rules)})")
        if choice.rules:
            raise RecipeError(f"{where}: no method given; add 'method:' to the rule or to defaults.{tname}")
        return plan
    if method not in METHODS_BY_TYPE[tname]:
        raise RecipeError(f"{where}: method {method!r} does not apply to a {tname}; "
                          f"use one of {', '.join(METHODS_BY_TYPE[tname])}")
    extra = set(choice.settings) - {"method"} - METHOD_KEYS[method] - COMMON_SETTING_KEYS
    if extra:
        raise RecipeError(f"{where}: key {sorted(extra)[0]!r} does not apply to method {method!r} "
                          f"(it takes {', '.join(sorted(METHOD_KEYS[method])) or 'no settings'})")
    if method == "none":
        plan.reason = "method: none"
        return plan
    reason = _unsupported(module, method)
    if reason:
        plan.reason = reason
        plan.notes.append(f"{method} requested but not applied: {reason}")
        return plan
    if shapes is None:
        plan.reason = "not run by the model's forward pass on the calibration input; left dense"
        return plan
    try:
        config, ranks, notes = PLANNERS[method](module, choice.settings, where)
        layer = LAYER_CLASSES[_layer_method(module, method)](**config)
    except (RankError, RecipeError) as exc:
        if str(exc).startswith(where):
            raise
        raise type(exc)(f"{where}: {exc}") from None
    plan.action, plan.method, plan.config, plan.ranks = "decompose", method, config, ranks
    plan.notes.extend(notes)
    plan.params_after = dense_params(layer)
    plan.macs_after = factorized_macs(layer, shapes[0])
    plan.reason = f"{method} rank {ranks}"
    if method == "tt":
        plan.reason += f", modes in {config['in_modes']} out {config['out_modes']}"
    if method == "prodsum":
        plan.method = _layer_method(module, method)
        plan.config, plan.ranks = layer.config(), list(layer.terms)
        plan.reason = f"prodsum p={layer.p}, terms {layer.terms}, family {layer.factor_config()['family']}"
    if plan.params_after >= plan.params_before:
        plan.notes.append(f"grows the layer: {plan.params_after:,} params vs {plan.params_before:,} dense")
    return plan


def make_plan(model: nn.Module, recipe: Recipe, input_shape: Sequence[int],
              calibration_input: torch.Tensor | None = None) -> list[LayerPlan]:
    """Match the recipe to ``model`` and resolve every decomposable layer into a :class:`LayerPlan`.

    With a recipe ``budget``, the ranks come from :func:`tncompress.budget.apply_budget`, which
    measures sensitivities on ``calibration_input`` (default: the recipe's Gaussian batch).
    """
    budget_choice = None
    if getattr(recipe, "budget", None):
        from tncompress.budget import budget_choice
    candidates = list(candidate_layers(model))
    pairs = [(name, type_name(module) or "") for name, module, _ in candidates]
    choices = match_layers(recipe, pairs)
    param = next(model.parameters(), None)
    example = calibration_batch(input_shape, 1, 0, dtype=param.dtype if param is not None else torch.float32,
                                device=param.device if param is not None else "cpu")
    shapes = trace_shapes(model, example, [n for n, _, _ in candidates])
    plans = []
    for choice, (name, module, blocked) in zip(choices, candidates):
        if blocked and not choice.excluded_by:
            plan = plan_layer(LayerChoice(name, choice.type_name, {}, choice.rules, choice.decided_by), module,
                              shapes.get(name), recipe.source)
            plan.reason = blocked
        else:
            plan = plan_layer(budget_choice(choice) if budget_choice else choice, module, shapes.get(name),
                              recipe.source)
        plans.append(plan)
    if budget_choice is not None:
        from tncompress.budget import apply_budget

        return apply_budget(model, plans, recipe, input_shape, calibration_input)
    return plans
