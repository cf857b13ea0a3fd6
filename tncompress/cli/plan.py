"""``tncompress plan``: the dry run."""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from tncompress.cli.common import app, calibration_input, console, handle_errors, input_shape_of, load_input, parse_floats
from tncompress.cli.options import (
    ArchArgOpt,
    ArchOpt,
    BudgetOpt,
    CalibrationDataOpt,
    CalibrationSizeOpt,
    DataDirOpt,
    ImportOpt,
    InputShapeOpt,
    MeanOpt,
    OptionalRecipeOpt,
    SetOpt,
    StdOpt,
    TrustOpt,
)
from tncompress.cli.render import plan_json, plan_table, print_budget, print_notes, totals_line


@app.command()
@handle_errors
def plan(
    checkpoint: Path = typer.Argument(..., help="Input: state dict (with --arch), tncompress checkpoint, or trusted pickle."),
    recipe: Path = OptionalRecipeOpt,
    budget_text: str = BudgetOpt,
    overrides: list[str] = SetOpt,
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    input_shape: str = InputShapeOpt,
    calibration_data: str = CalibrationDataOpt,
    calibration_size: int = CalibrationSizeOpt,
    data_dir: str = DataDirOpt,
    mean: str = MeanOpt,
    std: str = StdOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Dry run: which rule picks each layer, method, modes, ranks, params and MACs before and after."""
    from tncompress.compress import make_plan
    from tncompress.measure import count_params
    from tncompress.recipe import build_recipe

    rec = build_recipe(recipe, overrides or [], budget_text)
    loaded = load_input(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    shape = input_shape_of(loaded, input_shape, calibration_data)
    images, _ = calibration_input(loaded, calibration_data, calibration_size, data_dir,
                                  parse_floats(mean, "--mean"), parse_floats(std, "--std"))
    layers = make_plan(loaded.model, rec, shape, images)
    budget = layers.budget
    if as_json:
        sys.stdout.write(plan_json(layers, {"input": str(checkpoint), "recipe": rec.source, "input_shape": shape,
                                             **({"budget": budget} if budget else {})}) + "\n")
        return
    console.print(plan_table(layers, f"Plan for {checkpoint} with {rec.source} (input {shape})"))
    print_notes(layers)
    console.print(escape(totals_line(layers, count_params(loaded.model))))
    print_budget(budget)

