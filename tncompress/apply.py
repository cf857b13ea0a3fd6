"""Apply a plan: factorize each planned layer from its trained weights through its method, check it
on the calibration batch, fall back where the method offers one, and swap the factorized modules in.

Pipeline position: recipe → plan → (budget) → **apply** → save. This module imports the planner's
data types and the method registry, nothing after it.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from tncompress import data_aware
from tncompress.errors import GateError
from tncompress.layers import FactorizedLayer
from tncompress.methods import method_for_layer
from tncompress.methods.base import Fallback, Method
from tncompress.outputs import primary_output
from tncompress.planner import LayerPlan, call_shapes, dense_params, factorized_macs
from tncompress.surgery import dense_view, set_module

__all__ = ["ProgressCallback", "apply_plan", "capture_inputs", "check_error_bounds", "layer_bound",
           "model_output_error", "reference_output", "rel_error"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, LayerPlan, int, int], None]  # (event, plan, index, total)
Errors = tuple[float | None, float | None]  # (relative weight error, relative output error)


def rel_error(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    """‖reference − approx‖ / ‖reference‖ in float64; None (undefined) when the reference is zero,
    e.g. the output of a zero-initialised head (:func:`abs_error` then says how far off it is)."""
    reference, approx = reference.double(), approx.double()
    denom = torch.linalg.vector_norm(reference).item()
    diff = torch.linalg.vector_norm(reference - approx).item()
    return diff / denom if denom > 0 else None


def abs_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """‖reference − approx‖ in float64."""
    return torch.linalg.vector_norm(reference.double() - approx.double()).item()


def capture_inputs(model: nn.Module, batch: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Inputs that the named layers see when ``model`` runs on ``batch``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            captured.setdefault(_name, args[0].detach())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return captured


def _errors(module: nn.Module, new: nn.Module, x: torch.Tensor | None) -> Errors:
    assert isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) and isinstance(new, FactorizedLayer)
    dense = new.to_dense()
    assert isinstance(dense, (nn.Linear, nn.Conv2d, nn.Embedding))
    with torch.no_grad():
        weight = rel_error(module.weight, dense.weight)
        output = rel_error(module(x), new(x)) if x is not None else None
    return weight, output


def _undefined_note(module: nn.Module, new: nn.Module, x: torch.Tensor | None) -> str | None:
    """A note for a layer whose dense weight or output is zero, so its relative error is undefined."""
    with torch.no_grad():
        weight = cast(torch.Tensor, module.weight)
        if not bool(weight.detach().any()):
            return "weight error undefined: the dense weight is all zeros"
        if x is not None:
            reference = module(x)
            if not bool(reference.any()):
                return (f"output error undefined: the dense layer's output on the calibration batch is all zeros "
                        f"(absolute error of the factorized layer {abs_error(reference, new(x)):.3g})")
    return None


def _healthy(new: nn.Module, errors: Errors) -> bool:
    """Finite factors and finite errors: anything else is a numerical fault, never written."""
    finite = all(bool(torch.isfinite(p.detach()).all()) for p in new.parameters())
    return finite and all(e is None or math.isfinite(e) for e in errors)


def layer_bound(entry: LayerPlan, default: float | None) -> float | None:
    """The output-error bound of a layer: its rule's ``max_output_error``, else the recipe-wide one."""
    bound = entry.settings.get("max_output_error", default)
    return None if bound is None else float(bound)


def _take(entry: LayerPlan, alt: Fallback) -> nn.Module:
    """Record in the plan that the layer is now the fallback's."""
    entry.method, entry.config, entry.ranks, entry.reason = alt.method, alt.config, alt.ranks, alt.reason
    entry.notes.append(alt.note)
    return alt.layer


def _factorize_checked(module: nn.Module, entry: LayerPlan, method: Method, settings: Any, x: torch.Tensor | None,
                       bound: float | None, factorize: Callable[[], nn.Module] | None = None
                       ) -> tuple[nn.Module, Errors, str]:
    """The factorized layer and its errors, after the method's fallbacks; ``module`` itself (with a
    reason) when no usable factorization was found.

    Faults are handled per layer and recorded in its notes: a degenerate fit (the method says so)
    and non-finite factors or errors take the method's fallback, else leave the layer dense; a layer
    whose output error exceeds its bound tries the fallback and keeps the better of the two.
    """
    new = factorize() if factorize is not None else method.factorize(module, entry.config, settings)
    label = method.name.upper()
    kept = f"{entry.method} failed and has no fallback; left dense"
    fell_back = False
    degenerate = method.degenerate(new)
    if degenerate:
        entry.notes.append(degenerate)
        alt = method.fallback(module, new, settings, f"{label} degenerated")
        if alt is None:
            entry.notes.append("fallback: none — layer left dense")
            return module, (None, None), f"{label} degenerate and fallback none; left dense"
        new, fell_back = _take(entry, alt), True
    errors = _errors(module, new, x)
    if not _healthy(new, errors):
        entry.notes.append(f"{entry.method} produced non-finite factors or errors (weight error {errors[0]}, "
                           f"output error {errors[1]})")
        alt = None if fell_back else method.fallback(module, new, settings, f"{label} produced non-finite values")
        if alt is not None:
            new, fell_back = _take(entry, alt), True
            errors = _errors(module, new, x)
        if not _healthy(new, errors):
            entry.notes.append("layer left dense: no finite decomposition was found")
            return module, (None, None), "decomposition produced non-finite values; left dense"
    if bound is not None and errors[1] is not None and errors[1] > bound and not fell_back:
        alt = method.fallback(module, new, settings, f"{label} output error {errors[1]:.3g} above {bound:g}")
        if alt is not None:
            alt_errors = _errors(module, alt.layer, x)
            if _healthy(alt.layer, alt_errors) and alt_errors[1] is not None and alt_errors[1] < errors[1]:
                return _take(entry, alt), alt_errors, kept
            entry.notes.append(f"{alt.label} at the same budget was no better (output error {alt_errors[1]}); "
                               f"kept {label}")
    return new, errors, kept


ERROR_SAMPLES = 256
"""Calibration samples on which each layer's output error is measured (the model's error uses all)."""


def _data_aware_kronecker(model: nn.Module, module: nn.Module, entry: LayerPlan, method: Method, settings: Any,
                          calibration_input: torch.Tensor, x: torch.Tensor | None, bound: float | None,
                          modes: list[int]) -> tuple[nn.Module, Errors, str]:
    """Factorize a layer whose input side is per-mode (TT) from its Kronecker-whitened weight."""
    factors = data_aware.kronecker_whitening(model, entry.name, calibration_input, modes)
    whitened = data_aware.kronecker_whitened_copy(module, factors, modes)

    def factorize() -> nn.Module:
        layer = method.factorize(whitened, entry.config, settings)
        assert isinstance(layer, FactorizedLayer)
        data_aware.kronecker_unwhiten(layer, factors)
        return layer

    notes = len(entry.notes)
    new, errors, kept = _factorize_checked(module, entry, method, settings, x, bound, factorize=factorize)
    if new is module:
        return new, errors, kept
    # The Kronecker model of the second moment can be poor (on MNIST pixels it lost accuracy against the
    # weights alone, docs/mnist-data-aware.md), so the data-free factors are computed too and the lower
    # output error on the calibration batch wins.
    whitened_notes = entry.notes[notes:]
    del entry.notes[notes:]
    plain, plain_errors, plain_kept = _factorize_checked(module, entry, method, settings, x, bound)
    what = f"inputs whitened per mode {modes} (Kronecker-factored second moment) on {factors[0].samples:,} rows"
    if plain is not module and plain_errors[1] is not None and errors[1] is not None and plain_errors[1] < errors[1]:
        entry.notes.append(f"data_aware: {what} gave output error {errors[1]:.3g} on the calibration batch, the "
                           f"weights alone {plain_errors[1]:.3g}; kept the weights-only factors")
        return plain, plain_errors, plain_kept
    del entry.notes[notes:]
    entry.notes.extend(whitened_notes)
    entry.notes.append(f"data_aware: {what}")
    return new, errors, kept


def _data_aware(model: nn.Module, dense_model: nn.Module, module: nn.Module, entry: LayerPlan, method: Method,
                settings: Any, calibration_input: torch.Tensor, x: torch.Tensor | None,
                bound: float | None) -> tuple[nn.Module, Errors, str]:
    """Factorize with calibration data: decompose the input-whitened weight and map the first factor
    back, then refit the last linear map to the dense layer's output (see :mod:`tncompress.data_aware`).
    TT layers are whitened per input mode (:func:`_data_aware_kronecker`); layers without linear ends
    (product-of-sums) are decomposed from the weights, with a note."""
    conv = isinstance(module, nn.Conv2d)
    cls = method.layer_class(module)
    if not data_aware.supports(cls):
        modes = cls.input_kronecker_modes(module, entry.config)
        if modes is not None:
            return _data_aware_kronecker(model, module, entry, method, settings, calibration_input, x, bound, modes)
        entry.notes.append(f"data_aware: {entry.method} layers have no linear input map to whiten or output map "
                           "to refit; decomposed from the weights alone")
        return _factorize_checked(module, entry, method, settings, x, bound)
    whitening = data_aware.input_whitening(model, entry.name, calibration_input, conv)
    whitened = data_aware.whitened_copy(module, whitening)

    def factorize() -> nn.Module:
        layer = method.factorize(whitened, entry.config, settings)
        assert isinstance(layer, FactorizedLayer)
        data_aware.unwhiten(layer, whitening)
        return layer

    new, errors, kept = _factorize_checked(module, entry, method, settings, x, bound, factorize=factorize)
    if new is module or not isinstance(new, FactorizedLayer) or new.output_projection() is None:
        return new, errors, kept
    before = copy.deepcopy(new.state_dict())
    core_fitted = data_aware.refit_core(new, model, dense_model, entry.name, calibration_input) if conv else None
    fitted = data_aware.refit_output(new, model, dense_model, entry.name, calibration_input, conv)
    refit_errors = _errors(module, new, x)
    if not _healthy(new, refit_errors):
        new.load_state_dict(before)
        entry.notes.append("data_aware: the output refit was not finite; kept the whitened factors")
        refit_errors = errors
    what = "pixels" if conv else "rows"
    core = "core and " if core_fitted is not None else ""
    entry.notes.append(f"data_aware: inputs whitened on {whitening.samples:,} {what} (ridge {whitening.ridge:.2g}), "
                       f"{core}last linear map refit to the dense output on {fitted:,} {what}")
    return new, refit_errors, kept


def apply_plan(model: nn.Module, plan: Sequence[LayerPlan], calibration_input: torch.Tensor,
               progress: ProgressCallback | None = None, *, max_output_error: float | None = None
               ) -> Sequence[LayerPlan]:
    """Decompose ``model`` in place following ``plan`` (updated with errors, timings, fallbacks).

    Layers run in the plan's order (the model's module order, i.e. forward order for sequential
    nets), so a data-aware layer sees the inputs the layers decomposed before it produce. Bounds are
    enforced by :func:`check_error_bounds`, not here: a layer above its bound after the fallbacks is
    written with a note.
    """
    todo = [p for p in plan if p.action == "decompose"]
    inputs = capture_inputs(model, calibration_input[:ERROR_SAMPLES], [p.name for p in todo])
    dense_model = copy.deepcopy(model) if any(p.settings.get("data_aware") for p in todo) else None
    for index, entry in enumerate(todo):
        if progress:
            progress("start", entry, index, len(todo))
        module = dense_view(model.get_submodule(entry.name))
        started = time.perf_counter()
        method = method_for_layer(entry.method)
        settings = method.parse(entry.settings, entry.name)
        bound = layer_bound(entry, max_output_error)
        if dense_model is not None and entry.settings.get("data_aware"):
            new, errors, kept = _data_aware(model, dense_model, module, entry, method, settings, calibration_input,
                                            inputs.get(entry.name), bound)
        else:
            new, errors, kept = _factorize_checked(module, entry, method, settings, inputs.get(entry.name), bound)
        entry.seconds = round(time.perf_counter() - started, 3)
        if new is module:
            entry.action, entry.method, entry.config, entry.ranks = "keep", "none", {}, None
            entry.params_after, entry.macs_after = entry.params_before, entry.macs_before
            entry.reason = kept
        else:
            new.train(module.training)
            entry.weight_rel_error, entry.output_rel_error = errors
            entry.params_after = dense_params(new)
            shapes = call_shapes(entry)
            if shapes:
                entry.macs_after = factorized_macs(new, shapes)
            measured = inputs.get(entry.name)
            undefined = (_undefined_note(module, new, measured)
                         if errors[0] is None or (errors[1] is None and measured is not None) else None)
            if undefined:
                entry.notes.append(undefined)
            fit = method.fit_note(new)
            if fit:
                entry.notes.append(fit)
            if bound is not None and errors[1] is not None and errors[1] > bound:
                entry.notes.append(f"output error {errors[1]:.3g} exceeds max_output_error {bound:g}")
            set_module(model, entry.name, new)
        log.info("%s: %s, weight error %s, output error %s (%.2fs)", entry.name, entry.reason,
                 entry.weight_rel_error, entry.output_rel_error, entry.seconds)
        if progress:
            progress("done", entry, index, len(todo))
    return plan


def reference_output(model: nn.Module, batch: torch.Tensor) -> torch.Tensor | None:
    """The model's output (:func:`primary_output`) on the calibration batch, taken before decomposing."""
    with torch.no_grad():
        out = primary_output(model(batch))
    return None if out is None else out.detach().clone()


def model_output_error(model: nn.Module, batch: torch.Tensor, reference: Any) -> float | None:
    """Relative error of the decomposed model's output against ``reference``; None when the model
    returns no tensor or the reference is all zeros (undefined)."""
    if not isinstance(reference, torch.Tensor):
        return None
    with torch.no_grad():
        out = primary_output(model(batch))
    return rel_error(reference, out) if out is not None else None


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
