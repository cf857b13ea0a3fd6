"""Apply a plan: decompose each planned layer from its trained weights, check it on a calibration
batch, fall back where CP degenerates, and swap the factorized modules in."""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tncompress.decompositions.ranks import tucker2_ranks_for_fraction
from tncompress.errors import GateError
from tncompress.layers import CPConv2d, LowRankLinear, ProdSumConv2d, ProdSumLinear, TTLinear, Tucker2Conv2d
from tncompress.planner import LayerPlan, calibration_batch, calibration_settings, dense_params, factorized_macs, make_plan
from tncompress.recipe import Recipe
from tncompress.surgery import set_module

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, LayerPlan, int, int], None]  # (event, plan, index, total)


@dataclass
class DecomposeResult:
    """The compressed model, the full plan (every layer, with errors), and the structure to save."""

    model: nn.Module
    plan: list[LayerPlan]
    calibration: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None   # the recipe budget's allocation summary (tncompress.budget)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return [p.layer_entry for p in self.plan if p.action == "decompose"]


def _rel_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.double(), approx.double()
    denom = torch.linalg.vector_norm(reference).item()
    diff = torch.linalg.vector_norm(reference - approx).item()
    return diff / denom if denom > 0 else diff


def capture_inputs(model: nn.Module, batch: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inputs that the named layers see when ``model`` runs on ``batch``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, args: tuple, _name: str = name) -> None:
            captured.setdefault(_name, args[0].detach())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return captured


def _factorize(module: nn.Module, plan: LayerPlan) -> nn.Module:
    s, c = plan.settings, plan.config
    if plan.method == "tt":
        return TTLinear.from_dense(module, ranks=c["ranks"], in_modes=c["in_modes"], out_modes=c["out_modes"])
    if plan.method == "lowrank":
        return LowRankLinear.from_dense(module, rank=c["rank"])
    if plan.method in ("prodsum", "prodsum_conv"):
        kwargs = {k: c[k] for k in ("p", "terms", "family", "seed", "widths", "g", "density")}
        cls = ProdSumConv2d if plan.method == "prodsum_conv" else ProdSumLinear
        return cls.from_dense(module, sweeps=s.get("sweeps", 8), **kwargs)
    if plan.method == "tucker2":
        return Tucker2Conv2d.from_dense(module, ranks=tuple(c["ranks"]), method=s.get("algorithm", "hooi"),
                                        n_iter=s.get("n_iter", 20))
    if plan.method == "cp":
        kwargs = {k: s[k] for k in ("n_iter_max", "tol", "retries", "l2_reg", "engine") if k in s}
        return CPConv2d.from_dense(module, rank=c["rank"], form=c["form"], **kwargs)
    raise ValueError(f"unknown method {plan.method!r}")


def _to_tucker2(module: nn.Conv2d, plan: LayerPlan, budget: nn.Module, why: str) -> Tucker2Conv2d:
    """Tucker-2 at about ``budget``'s parameter count; the plan says so and why."""
    fraction = min(1.0, dense_params(budget) / max(1, dense_params(module)))
    r_out, r_in = tucker2_ranks_for_fraction(tuple(module.weight.shape), fraction)
    new = Tucker2Conv2d.from_dense(module, ranks=(r_in, r_out))
    plan.method, plan.config, plan.ranks = "tucker2", new.config(), [r_in, r_out]
    plan.reason = f"tucker2 rank {[r_in, r_out]} ({why})"
    plan.notes.append(f"fell back to Tucker-2 ranks [R_in={r_in}, R_out={r_out}] at the same parameter budget")
    return new


def _cp_fallback(module: nn.Conv2d, plan: LayerPlan, layer: CPConv2d) -> nn.Module:
    """CP degenerated: record it, then Tucker-2 at about the same parameter count, or keep dense."""
    info = dict(getattr(layer, "fit_info", {}))
    plan.notes.append(f"CP degenerate after {info.get('attempts')} attempts "
                      f"(component-norm ratio {info.get('norm_ratio', float('nan')):.3g})")
    if plan.settings.get("fallback", "tucker2") == "none":
        plan.notes.append("fallback: none — layer left dense")
        return module
    return _to_tucker2(module, plan, layer, "CP degenerated")


Errors = tuple[float | None, float | None]  # (relative weight error, relative output error)


def _errors(module: nn.Module, new: nn.Module, x: torch.Tensor | None) -> Errors:
    with torch.no_grad():
        weight = _rel_error(module.weight, new.to_dense().weight)
        output = _rel_error(module(x), new(x)) if x is not None else None
    return weight, output


def _healthy(new: nn.Module, errors: Errors) -> bool:
    """Finite factors and finite errors: anything else is a numerical fault, never written."""
    finite = all(bool(torch.isfinite(p.detach()).all()) for p in new.parameters())
    return finite and all(e is None or math.isfinite(e) for e in errors)


def layer_bound(entry: LayerPlan, default: float | None) -> float | None:
    """The output-error bound of a layer: its rule's ``max_output_error``, else the recipe-wide one."""
    bound = entry.settings.get("max_output_error", default)
    return None if bound is None else float(bound)


def apply_plan(model: nn.Module, plan: list[LayerPlan], calibration_input: torch.Tensor,
               progress: ProgressCallback | None = None, *, max_output_error: float | None = None) -> list[LayerPlan]:
    """Decompose ``model`` in place following ``plan`` (updated with errors, timings, fallbacks).

    Numerical faults are handled per layer and recorded in its notes: a degenerate CP fit is retried
    and falls back to Tucker-2 (or dense); non-finite factors or errors fall back to Tucker-2 for a
    CP conv, else leave the layer dense; a CP layer whose output error exceeds its bound
    (``max_output_error``) tries Tucker-2 at the same budget and keeps the better. Bounds are
    enforced by :func:`check_error_bounds`, not here.
    """
    todo = [p for p in plan if p.action == "decompose"]
    inputs = capture_inputs(model, calibration_input, [p.name for p in todo])
    for index, entry in enumerate(todo):
        if progress:
            progress("start", entry, index, len(todo))
        module = model.get_submodule(entry.name)
        x = inputs.get(entry.name)
        started = time.perf_counter()
        new = _factorize(module, entry)
        kept = "CP degenerate and fallback none; left dense"
        if isinstance(new, CPConv2d) and (new.fit_info or {}).get("degenerate"):
            new = _cp_fallback(module, entry, new)
        errors: Errors = (None, None) if new is module else _errors(module, new, x)
        if new is not module and not _healthy(new, errors):
            entry.notes.append(f"{entry.method} produced non-finite factors or errors (weight error {errors[0]}, "
                               f"output error {errors[1]})")
            if isinstance(new, CPConv2d) and entry.settings.get("fallback", "tucker2") != "none":
                new = _to_tucker2(module, entry, new, "CP produced non-finite values")
                errors = _errors(module, new, x)
            if not _healthy(new, errors):
                new, errors, kept = module, (None, None), "decomposition produced non-finite values; left dense"
                entry.notes.append("layer left dense: no finite decomposition was found")
        bound = layer_bound(entry, max_output_error)
        if (isinstance(new, CPConv2d) and bound is not None and errors[1] is not None and errors[1] > bound
                and entry.settings.get("fallback", "tucker2") != "none"):
            cp_layer, cp_errors, cp_state = new, errors, (entry.method, entry.config, entry.ranks, entry.reason)
            alt = _to_tucker2(module, entry, cp_layer, f"CP output error {errors[1]:.3g} above {bound:g}")
            alt_errors = _errors(module, alt, x)
            if _healthy(alt, alt_errors) and alt_errors[1] is not None and alt_errors[1] < cp_errors[1]:
                new, errors = alt, alt_errors
            else:
                entry.method, entry.config, entry.ranks, entry.reason = cp_state
                entry.notes[-1] = (f"Tucker-2 at the same budget was no better (output error {alt_errors[1]}); "
                                   "kept CP")
        entry.seconds = round(time.perf_counter() - started, 3)
        if new is module:
            entry.action, entry.method, entry.config, entry.ranks = "keep", "none", {}, None
            entry.params_after, entry.macs_after = entry.params_before, entry.macs_before
            entry.reason = kept
        else:
            new.train(module.training)
            entry.weight_rel_error, entry.output_rel_error = errors
            entry.params_after = dense_params(new)
            if entry.input_shape:
                entry.macs_after = factorized_macs(new, entry.input_shape)
            fit = getattr(new, "fit_info", None)
            if fit:
                entry.notes.append(f"CP fit: rel. error {fit.get('rel_error', float('nan')):.3g}, "
                                   f"{fit.get('attempts')} attempt(s)")
            if bound is not None and errors[1] is not None and errors[1] > bound:
                entry.notes.append(f"output error {errors[1]:.3g} exceeds max_output_error {bound:g}")
            set_module(model, entry.name, new)
        log.info("%s: %s, weight error %s, output error %s (%.2fs)", entry.name, entry.reason,
                 entry.weight_rel_error, entry.output_rel_error, entry.seconds)
        if progress:
            progress("done", entry, index, len(todo))
    return plan


def reference_output(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's output on the calibration batch, taken before decomposing."""
    with torch.no_grad():
        out = model(batch)
    return out.detach().clone() if isinstance(out, torch.Tensor) else out


def model_output_error(model: nn.Module, batch: torch.Tensor, reference: Any) -> float | None:
    """Relative error of the decomposed model's output against ``reference`` (None for non-tensor outputs)."""
    if not isinstance(reference, torch.Tensor):
        return None
    with torch.no_grad():
        out = model(batch)
    return _rel_error(reference, out) if isinstance(out, torch.Tensor) else None


def check_error_bounds(plan: Sequence[LayerPlan], calibration: dict[str, Any], model_error: float | None,
                       *, allow_error: bool = False, source: str = "the recipe") -> list[str]:
    """Enforce the recipe's bounds: per layer ``max_output_error`` (rule or ``calibration``) and
    ``calibration.max_model_error`` on the whole model; a non-finite model output always counts.

    Raises :class:`GateError` (exit 3) naming the first violation unless ``allow_error``; returns
    one line per violation either way.
    """
    default = calibration.get("max_output_error")
    problems = []
    for entry in plan:
        bound = layer_bound(entry, default)
        err = entry.output_rel_error
        if entry.action == "decompose" and bound is not None and err is not None and not err <= bound:
            problems.append(f"layer {entry.name}: output error {err:.3g} on the calibration batch exceeds "
                            f"max_output_error {bound:g}")
    max_model = calibration.get("max_model_error")
    if model_error is not None and not math.isfinite(model_error):
        problems.append("the decomposed model's output on the calibration batch is not finite (NaN/Inf)")
    elif max_model is not None and model_error is not None and model_error > float(max_model):
        problems.append(f"the decomposed model's output error {model_error:.3g} on the calibration batch exceeds "
                        f"calibration.max_model_error {float(max_model):g}")
    if problems and not allow_error:
        more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GateError(f"{source}: {problems[0]}{more}; raise the rank or loosen the bound, or pass "
                        "--allow-error to write it anyway")
    return problems


def decompose(model: nn.Module, recipe: Recipe, *, input_shape: Sequence[int],
              calibration_input: torch.Tensor | None = None, inplace: bool = False,
              progress: ProgressCallback | None = None, allow_error: bool = False) -> DecomposeResult:
    """Plan and apply ``recipe`` to ``model``; returns the compressed model and the annotated plan.

    ``input_shape`` is one sample's shape with a leading batch dimension (e.g. ``[1, 3, 32, 32]``);
    the calibration batch defaults to reproducible Gaussian noise of that shape. The recipe's error
    bounds are enforced (:class:`GateError`) unless ``allow_error``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    calib = calibration_settings(recipe)
    kind = "gaussian noise" if calibration_input is None else "given batch"
    if calibration_input is None:
        param = next(model.parameters(), None)
        calibration_input = calibration_batch(input_shape, calib["batch_size"], calib["seed"],
                                              dtype=param.dtype if param is not None else torch.float32,
                                              device=param.device if param is not None else "cpu")
    plan = make_plan(model, recipe, input_shape, calibration_input)  # a budget measures sensitivities on it
    reference = reference_output(model, calibration_input)
    apply_plan(model, plan, calibration_input, progress, max_output_error=calib.get("max_output_error"))
    model_error = model_output_error(model, calibration_input, reference)
    problems = check_error_bounds(plan, calib, model_error, allow_error=allow_error, source=recipe.source)
    return DecomposeResult(model, plan, {**calib, "input_shape": list(input_shape), "kind": kind,
                                         "model_output_error": model_error, "bound_violations": problems},
                           budget=getattr(plan, "budget", None))
