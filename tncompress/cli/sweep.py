"""``tncompress sweep``: accuracy against compression, point by point, resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from tncompress.cli.common import app, console, err_console, handle_errors, input_shape_of, load_input, parse_floats, torch_seed
from tncompress.cli.options import (
    ArchArgOpt,
    ArchOpt,
    BatchSizeOpt,
    DataDirOpt,
    DatasetOpt,
    ImportOpt,
    InputShapeOpt,
    LimitTestOpt,
    LimitTrainOpt,
    MeanOpt,
    SeedOpt,
    SetOpt,
    StdOpt,
    TrainDeviceOpt,
    TrustOpt,
)
from tncompress.errors import TncompressError


@app.command()
@handle_errors
def sweep(
    checkpoint: Path = typer.Argument(
        ..., help="The dense (trained) model: state dict (with --arch), tncompress checkpoint, or trusted pickle."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe (see configs/). Optional: without it, "
                                "low-rank Linear layers and Tucker-2 convolutions."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for sweep.csv, sweep.json and sweep.png "
                                "(resumable with the same settings; a changed setting is refused)."),
    ranks: str = typer.Option(None, "--ranks", help="Ranks to try, e.g. 1,2,4,8: set on every rule that decomposes with a rank."),
    budgets: str = typer.Option(
        None, "--budgets", help="Whole-model budgets to try, e.g. 0.5,0.2,0.1 (params_ratio) or macs:0.5."),
    dataset: str = DatasetOpt,
    data_dir: str = DataDirOpt,
    mean: str = MeanOpt,
    std: str = StdOpt,
    finetune_epochs: int = typer.Option(
        0, "--finetune-epochs", min=0, help="Short fine-tune of each point (distilled from the dense model)."),
    lr: float = typer.Option(0.01, "--lr", help="Fine-tune learning rate."),
    batch_size: int = BatchSizeOpt,
    calibration: str = typer.Option(
        "data", "--calibration",
        help="data (training images) or noise (the recipe's Gaussian batch): "
             "what the decomposition and a budget's sensitivity scan are measured on."),
    calibration_size: int = typer.Option(
        None, "--calibration-size", min=1,
        help="Training images to calibrate on with --calibration data (default: the recipe's calibration.batch_size)."),
    limit_train: int = LimitTrainOpt,
    limit_test: int = LimitTestOpt,
    device: str = TrainDeviceOpt,
    seed: int = SeedOpt,
    note: str = typer.Option(None, "--note", help="Subtitle of the plot (default: dataset and test images)."),
    overrides: list[str] = SetOpt,
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    input_shape: str = InputShapeOpt,
) -> None:
    """Accuracy against compression: decompose → (fine-tune) → evaluate at each rank or budget;
    writes sweep.csv (one row per point), sweep.json (plus the baseline) and sweep.png. Points
    already in the folder's sweep.json are skipped when made with the same settings; otherwise use a
    new folder."""
    from tncompress.finetune import DataOptions
    from tncompress.sweep import SweepOptions, parse_points, run_sweep

    if calibration not in ("data", "noise"):
        raise TncompressError(f"--calibration must be data or noise, got {calibration!r}")
    if calibration_size is not None and calibration == "noise":
        raise TncompressError("--calibration-size needs --calibration data (noise is the recipe's Gaussian batch)")
    points = parse_points(ranks, budgets)
    loaded = load_input(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    data = DataOptions(
        dataset, data_dir, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
        limit_train=limit_train, limit_test=limit_test)
    options = SweepOptions(data, finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, device=device,
                           seed=seed, calibration=calibration, calibration_size=calibration_size)

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "baseline":
            console.print(f"baseline: top-1 {payload['top1']:.2f}% on {payload['images']:,} test images, "
                          f"{payload['params']:,} params, {payload['macs']:,} MACs", highlight=False)
        elif event == "skip":
            console.print(escape(f"{payload['point']}: already in {output / 'sweep.json'}, skipped"), highlight=False)
        elif event == "start":
            err_console.print(f"[dim]{escape(payload['point'])}: decomposing…[/]", highlight=False)
        elif event == "done":
            console.print(f"{payload['point']}: top-1 {payload['top1']:.2f}%, params {payload['params']:,} "
                          f"({1 / payload['params_ratio']:.3g}× smaller), MACs {payload['macs']:,} "
                          f"({1 / payload['macs_ratio']:.3g}×)", highlight=False)

    torch_seed(seed)
    results = run_sweep(loaded, recipe, points, output, options, overrides=overrides or [],
                        input_shape=input_shape_of(loaded, input_shape, dataset), note=note, on_event=on_event)
    console.print(escape(f"{len(results['points'])} points in {output / 'sweep.csv'}, {output / 'sweep.json'}; "
                         f"plot {output / 'sweep.png'}"), highlight=False)
