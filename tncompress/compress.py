"""The decompose pipeline, end to end: recipe → plan → (budget) → apply, for the library and the CLI.

Each step is its own module and imports only the ones before it (:mod:`tncompress.recipe`,
:mod:`tncompress.planner`, :mod:`tncompress.budget`, :mod:`tncompress.apply`); this one joins them.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tncompress.apply import (
    ProgressCallback,
    apply_plan,
    capture_inputs,
    check_error_bounds,
    layer_bound,
    model_output_error,
    reference_output,
)
from tncompress.budget import apply_budget
from tncompress.data_aware import reestimate_batchnorm
from tncompress.layers.attention import unpack_attention
from tncompress.planner import LayerPlan, Plan, calibration_settings, describe_synthetic, example_batch, plan_layers
from tncompress.recipe import Recipe
from tncompress.surgery import repack_attention, unpacked

log = logging.getLogger(__name__)

__all__ = ["DecomposeResult", "ProgressCallback", "apply_plan", "capture_inputs", "check_error_bounds", "decompose",
           "layer_bound", "make_plan", "model_output_error", "reference_output"]


@dataclass
class DecomposeResult:
    """The compressed model, the full plan (every layer, with errors) and what the calibration saw."""

    model: nn.Module
    plan: Sequence[LayerPlan]
    calibration: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None   # the recipe budget's allocation summary (tncompress.budget)

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The layers this run decomposed (a checkpoint records every factorized layer of the model)."""
        return [p.layer_entry for p in self.plan if p.action == "decompose"]

    @property
    def model_output_error(self) -> float | None:
        return self.calibration.get("model_output_error")

    @property
    def bound_violations(self) -> list[str]:
        return list(self.calibration.get("bound_violations") or [])

    def metadata(self) -> dict[str, Any]:
        """The checkpoint metadata of this run, the same for the library and the CLI."""
        return {"seed": self.calibration.get("seed"), "model_output_error": self.model_output_error,
                "bound_violations": self.bound_violations, "calibration": dict(self.calibration),
                **({"budget": self.budget} if self.budget else {})}


def make_plan(model: nn.Module, recipe: Recipe, input_shape: Sequence[int],
              calibration_input: torch.Tensor | None = None) -> Plan:
    """Plan every decomposable layer (:func:`tncompress.planner.plan_layers`) and, with a recipe
    ``budget``, allocate the ranks (:func:`tncompress.budget.apply_budget`, which measures
    sensitivities on ``calibration_input``; default: the recipe's Gaussian batch). A model with
    ``nn.MultiheadAttention`` is planned on a copy whose attention projections are ordinary layers
    (:func:`tncompress.surgery.unpacked`), so the plan names ``…attn.q_proj`` and the like."""
    model = unpacked(model)
    plan = plan_layers(model, recipe, input_shape)
    if recipe.budget:
        return apply_budget(model, plan, recipe, input_shape, calibration_input)
    return plan


def decompose(model: nn.Module, recipe: Recipe, *, input_shape: Sequence[int] | None = None,
              calibration_input: torch.Tensor | None = None, inplace: bool = False,
              progress: ProgressCallback | None = None, allow_error: bool = False,
              calibration_source: str | None = None) -> DecomposeResult:
    """Plan and apply ``recipe`` to ``model``; returns the compressed model and the annotated plan.

    ``input_shape`` is one sample's shape with a leading batch dimension (e.g. ``[1, 3, 32, 32]``);
    without it, the calibration batch's, else what the first layer decides
    (:func:`tncompress.input_shape.resolve_input_shape`). The calibration batch defaults to
    reproducible Gaussian noise of that shape; a given batch
    (real images, preprocessed as the model expects) is described by ``calibration_source``. With
    real images, BatchNorm statistics are re-estimated on them after decomposition unless the
    recipe says ``calibration: {reestimate_bn: false}``. The recipe's error bounds are enforced
    (:class:`GateError`) unless ``allow_error``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if input_shape is None:
        from tncompress.input_shape import resolve_input_shape

        given = [1, *calibration_input.shape[1:]] if calibration_input is not None else None
        input_shape = resolve_input_shape(model, None, given).shape
    calib = calibration_settings(recipe)
    synthetic = calibration_input is None
    kind = describe_synthetic(model) if synthetic else (calibration_source or "given batch")
    if calibration_input is None:
        calibration_input = example_batch(model, input_shape, calib["batch_size"], calib["seed"])
    unpack_attention(model)  # equivalent attention modules with callable projections (repacked below if untouched)
    plan = make_plan(model, recipe, input_shape, calibration_input)  # a budget measures sensitivities on it
    reference = reference_output(model, calibration_input)
    apply_plan(model, plan, calibration_input, progress, max_output_error=calib.get("max_output_error"))
    repacked = repack_attention(model)
    if repacked:
        log.info("kept %d attention modules as nn.MultiheadAttention (no projection decomposed)", len(repacked))
    real = not synthetic
    reestimated = 0
    if calib.get("reestimate_bn", real) and any(p.action == "decompose" for p in plan):
        reestimated = reestimate_batchnorm(model, calibration_input)
        if reestimated:
            log.info("re-estimated %d BatchNorm layers on the calibration batch (%s)", reestimated, kind)
    model_error = model_output_error(model, calibration_input, reference)
    problems = check_error_bounds(plan, calib, model_error, allow_error=allow_error, source=recipe.source)
    return DecomposeResult(model, plan, {**calib, "input_shape": list(input_shape), "kind": kind,
                                         "samples": int(calibration_input.shape[0]),
                                         "bn_reestimated": reestimated,
                                         "model_output_error": model_error, "bound_violations": problems},
                           budget=plan.budget)
