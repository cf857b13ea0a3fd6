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
from tncompress.layers import CPConv2d, LowRankLinear, TTLinear, Tucker2Conv2d
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
    if plan.method == "tucker2":
        return Tucker2Conv2d.from_dense(module, ranks=tuple(c["ranks"]), method=s.get("algorithm", "hooi"),
                                        n_iter=s.get("n_iter", 20))
    if plan.method == "cp":
        kwargs = {k: s[k] for k in ("n_iter_max", "tol", "retries", "l2_reg", "engine") if k in s}
        return CPConv2d.from_dense(module, rank=c["rank"], form=c["form"], **kwargs)
    raise ValueError(f"unknown method {plan.method!r}")


def _cp_fallback(module: nn.Conv2d, plan: LayerPlan, layer: CPConv2d) -> nn.Module:
    """CP degenerated: record it, then Tucker-2 at about the same parameter count, or keep dense."""
    info = dict(getattr(layer, "fit_info", {}))
    plan.notes.append(f"CP degenerate after {info.get('attempts')} attempts "
                      f"(component-norm ratio {info.get('norm_ratio', float('nan')):.3g})")
    if plan.settings.get("fallback", "tucker2") == "none":
        plan.notes.append("fallback: none — layer left dense")
        return module
    fraction = min(1.0, dense_params(layer) / max(1, dense_params(module)))
    r_out, r_in = tucker2_ranks_for_fraction(tuple(module.weight.shape), fraction)
    new = Tucker2Conv2d.from_dense(module, ranks=(r_in, r_out))
    plan.method, plan.config, plan.ranks = "tucker2", new.config(), [r_in, r_out]
    plan.reason = f"tucker2 rank {[r_in, r_out]} (CP degenerated)"
    plan.notes.append(f"fell back to Tucker-2 ranks [R_in={r_in}, R_out={r_out}] at the same parameter budget")
    return new


def apply_plan(model: nn.Module, plan: list[LayerPlan], calibration_input: torch.Tensor,
               progress: ProgressCallback | None = None) -> list[LayerPlan]:
    """Decompose ``model`` in place following ``plan`` (updated with errors, timings, fallbacks)."""
    todo = [p for p in plan if p.action == "decompose"]
    inputs = capture_inputs(model, calibration_input, [p.name for p in todo])
    for index, entry in enumerate(todo):
        if progress:
            progress("start", entry, index, len(todo))
        module = model.get_submodule(entry.name)
        started = time.perf_counter()
        new = _factorize(module, entry)
        if isinstance(new, CPConv2d) and (new.fit_info or {}).get("degenerate"):
            new = _cp_fallback(module, entry, new)
        entry.seconds = round(time.perf_counter() - started, 3)
        if new is module:
            entry.action, entry.method, entry.config, entry.ranks = "keep", "none", {}, None
            entry.params_after, entry.macs_after = entry.params_before, entry.macs_before
            entry.reason = "CP degenerate and fallback none; left dense"
        else:
            new.train(module.training)
            with torch.no_grad():
                entry.weight_rel_error = _rel_error(module.weight, new.to_dense().weight)
                x = inputs.get(entry.name)
                if x is not None:
                    entry.output_rel_error = _rel_error(module(x), new(x))
            entry.params_after = dense_params(new)
            if entry.input_shape:
                entry.macs_after = factorized_macs(new, entry.input_shape)
            fit = getattr(new, "fit_info", None)
            if fit:
                entry.notes.append(f"CP fit: rel. error {fit.get('rel_error', float('nan')):.3g}, "
                                   f"{fit.get('attempts')} attempt(s)")
            if entry.weight_rel_error is not None and not math.isfinite(entry.weight_rel_error):
                raise FloatingPointError(f"layer {entry.name}: decomposition produced non-finite weights")
            set_module(model, entry.name, new)
        log.info("%s: %s, weight error %s, output error %s (%.2fs)", entry.name, entry.reason,
                 entry.weight_rel_error, entry.output_rel_error, entry.seconds)
        if progress:
            progress("done", entry, index, len(todo))
    return plan


def decompose(model: nn.Module, recipe: Recipe, *, input_shape: Sequence[int],
              calibration_input: torch.Tensor | None = None, inplace: bool = False,
              progress: ProgressCallback | None = None) -> DecomposeResult:
    """Plan and apply ``recipe`` to ``model``; returns the compressed model and the annotated plan.

    ``input_shape`` is one sample's shape with a leading batch dimension (e.g. ``[1, 3, 32, 32]``);
    the calibration batch defaults to reproducible Gaussian noise of that shape.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    plan = make_plan(model, recipe, input_shape)
    calib = calibration_settings(recipe)
    if calibration_input is None:
        param = next(model.parameters(), None)
        calibration_input = calibration_batch(input_shape, calib["batch_size"], calib["seed"],
                                              dtype=param.dtype if param is not None else torch.float32,
                                              device=param.device if param is not None else "cpu")
    apply_plan(model, plan, calibration_input, progress)
    return DecomposeResult(model, plan, {**calib, "input_shape": list(input_shape), "kind": "gaussian noise"})
