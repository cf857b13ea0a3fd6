"""``tncompress decompose``: apply a recipe and write the compressed checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tncompress.cli.common import (
    app,
    calibration_input,
    console,
    err_console,
    handle_errors,
    input_shape_of,
    load_input,
    parse_floats,
)
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
from tncompress.errors import TncompressError


@app.command()
@handle_errors
def decompose(
    checkpoint: Path = typer.Argument(..., help="Input: state dict (with --arch), tncompress checkpoint, or trusted pickle."),
    recipe: Path = OptionalRecipeOpt,
    budget_text: str = BudgetOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Compressed checkpoint to write (atomically)."),
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
    as_json: bool = typer.Option(False, "--json", help="Print the resolved plan with errors as JSON."),
    allow_error: bool = typer.Option(False, "--allow-error", help="Write the model even when a layer or the model "
                                     "exceeds the recipe's max_output_error / max_model_error (default: exit 3)."),
) -> None:
    """Decompose the layers a recipe selects and write a reloadable compressed checkpoint.
    The input file is only read; the output is written atomically."""
    from tncompress.checkpoint import check_output_path, file_sha256, save_compressed
    from tncompress.compress import decompose as decompose_model
    from tncompress.measure import count_params
    from tncompress.models import ModelSpec
    from tncompress.recipe import build_recipe

    if output.resolve() == checkpoint.resolve():
        raise TncompressError(f"--output {output} is the input file; write the compressed model to a new file")
    check_output_path(output)
    rec = build_recipe(recipe, overrides or [], budget_text)
    loaded = load_input(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    shape = input_shape_of(loaded, input_shape, calibration_data)
    mean_values, std_values = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    images, source = calibration_input(loaded, calibration_data, calibration_size, data_dir, mean_values, std_values)
    if source:
        err_console.print(f"calibration: {escape(source)}", highlight=False)
    params_before = count_params(loaded.model)
    # the bar starts with the first layer, so an error while planning is one line with nothing before it
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, transient=False, disable=as_json)
    task: Any = None

    def on_progress(event: str, entry: Any, index: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("decomposing", total=total)
        if event == "start":
            progress.update(task, description=escape(f"{entry.name}: {entry.method} {entry.ranks}"))
        else:
            progress.update(task, advance=1)

    try:
        result = decompose_model(loaded.model, rec, input_shape=shape, inplace=True, progress=on_progress,
                                 allow_error=allow_error, calibration_input=images, calibration_source=source)
        if task is not None:
            progress.update(task, description="decomposed")
    finally:
        if task is not None:
            progress.stop()
    layers, budget, model_error = result.plan, result.budget, result.model_output_error
    calib = result.calibration
    for problem in result.bound_violations:
        err_console.print(f"[yellow]warning:[/] {escape(problem)} (written anyway: --allow-error)", highlight=False)
    spec = loaded.spec
    if spec is not None:
        spec = ModelSpec(spec.arch, spec.kwargs, spec.imports, list(shape))
    save_compressed(output, result.model, spec=spec, plan=[p.to_dict() for p in layers], recipe=rec.raw,
                    metadata={"source": str(checkpoint), "source_kind": loaded.kind,
                              "source_sha256": file_sha256(checkpoint), "recipe_path": str(recipe) if recipe else rec.source,
                              "recipe_sha256": file_sha256(recipe) if recipe else None,
                              "recipe_overrides": list(overrides or []),
                              **({"budget_option": budget_text} if budget_text else {}),
                              **({"architecture_note": loaded.note} if loaded.note else {}),
                              **result.metadata(), **_preprocessing(loaded, mean_values, std_values)})
    if as_json:
        sys.stdout.write(plan_json(layers, {"input": str(checkpoint), "output": str(output), "input_shape": shape,
                                             "model_output_error": model_error,
                                             **({"budget": budget} if budget else {})}) + "\n")
        return
    console.print(plan_table(layers, f"Decomposed {checkpoint} → {output} (errors: relative Frobenius norm; "
                                      f"output error on {calib['samples']:,} calibration samples: {calib['kind']})"))
    print_notes(layers)
    console.print(escape(totals_line(layers, params_before, count_params(result.model))))
    print_budget(budget)
    if model_error is not None:
        console.print(f"model output error on the calibration batch: {model_error:.3g} (relative)")
    console.print(escape(f"wrote {output}"), highlight=False)
    if loaded.note:
        err_console.print(f"[yellow]warning:[/] {escape(output.name)} does not record its base architecture: "
                          f"{escape(loaded.note)}; later commands on it need that too", highlight=False)



def _preprocessing(loaded: Any, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> dict[str, Any]:
    """The ``preprocessing`` metadata to record: given now, else carried over from the input checkpoint."""
    from tncompress.finetune import recorded_preprocessing

    pre = recorded_preprocessing(loaded)
    if mean is not None:
        pre["mean"] = list(mean)
    if std is not None:
        pre["std"] = list(std)
    return {"preprocessing": pre} if pre else {}
