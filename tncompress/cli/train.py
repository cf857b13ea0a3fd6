"""``tncompress train`` and ``tncompress finetune``: the training loop with a live progress bar."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tncompress.cli.common import (
    app,
    console,
    err_console,
    handle_errors,
    is_main_process,
    load_input,
    model_spec,
    parse_floats,
    torch_seed,
)
from tncompress.cli.options import (
    AmpOpt,
    ArchArgOpt,
    ArchOpt,
    AugmentOpt,
    BatchSizeOpt,
    ChannelsLastOpt,
    DataDirOpt,
    DatasetOpt,
    GradClipOpt,
    ImportOpt,
    LabelSmoothingOpt,
    LimitTestOpt,
    LimitTrainOpt,
    MeanOpt,
    MomentumOpt,
    OptimizerOpt,
    ResumeOpt,
    ScheduleOpt,
    SeedOpt,
    StdOpt,
    TrainDeviceOpt,
    TrustOpt,
    WeightDecayOpt,
    WorkersOpt,
)
from tncompress.errors import TncompressError


def _train_options(epochs: int, batch_size: int, optimizer: str, lr: float, weight_decay: float, momentum: float,
                   warmup: float, schedule: str, label_smoothing: float, amp: str, device: str, seed: int,
                   kd_weight: float, kd_temperature: float, grad_clip: float | None, channels_last: bool | None):
    from tncompress.train import TrainConfig

    layout = "auto" if channels_last is None else ("channels-last" if channels_last else "contiguous")
    return TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                       momentum=momentum, warmup_epochs=warmup, schedule=schedule, label_smoothing=label_smoothing,
                       amp=amp, device=device, seed=seed, kd_weight=kd_weight, kd_temperature=kd_temperature,
                       grad_clip=grad_clip, memory_format=layout)


def _run_training(loaded, output: Path, data, config, teacher, resume: bool, extra: dict[str, Any]) -> None:
    from tncompress.finetune import train_and_save

    main = is_main_process()  # under torchrun only rank 0 renders; the library sends events to it alone
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[stats]}"), console=err_console, transient=True, disable=not main)
    task_ids: dict[str, Any] = {}

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "data":
            console.print(escape(str(payload["train"])), highlight=False)
            console.print(escape(str(payload["test"])), highlight=False)
            if payload.get("ranks", 1) > 1:
                console.print(f"{payload['ranks']} processes, each with batches of {config.batch_size} "
                              f"(global batch {payload['ranks'] * config.batch_size})", highlight=False)
        elif event == "epoch_start":
            if not progress.live.is_started:
                progress.start()  # only once training runs: a data error must stay a single line
            task_ids["epoch"] = progress.add_task(f"epoch {payload['epoch']}/{config.epochs}",
                                                  total=payload.get("steps_per_epoch"), stats="")
        elif event == "batch" and "epoch" in task_ids:
            stats = (f"loss {payload.get('loss', float('nan')):.4f}  acc {payload.get('top1', float('nan')):.2f}%  "
                     f"{payload.get('images_per_second', 0):,.0f} img/s")
            progress.update(task_ids["epoch"], completed=payload.get("step"), stats=stats)
        elif event == "epoch_end":
            if "epoch" in task_ids:
                progress.remove_task(task_ids.pop("epoch"))
            console.print(f"epoch {payload['epoch']}: train loss {payload['train_loss']:.4f}, "
                          f"test top-1 {payload['test_top1']:.2f}%, top-5 {payload['test_top5']:.2f}%, "
                          f"{payload.get('images_per_second', 0):,.0f} img/s, {payload.get('seconds', 0):.1f} s",
                          highlight=False)

    try:
        result = train_and_save(loaded, output, data, config, teacher=teacher, resume=resume, on_event=on_event,
                                extra_metadata=extra)
    except KeyboardInterrupt:
        raise TncompressError(f"interrupted; the last finished epoch is saved — continue with the same command "
                              f"and --resume (state in {output}.state.pt)") from None
    finally:
        if progress.live.is_started:
            progress.stop()
    if not main:
        return
    console.print(escape(f"done: best test top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}), final "
                         f"{result.history[-1]['test_top1']:.2f}% on {data.name}; {result.device}, amp {result.amp}; "
                         f"wrote {output}"), highlight=False)


@app.command()
@handle_errors
def train(
    arch: str = typer.Option(..., "--arch", help="Architecture: mlp-1024, lenet5, torchvision:<name>, package.module:factory."),
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    dataset: str = DatasetOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write (a tncompress checkpoint)."),
    data_dir: str = DataDirOpt,
    mean: str = MeanOpt,
    std: str = StdOpt,
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = BatchSizeOpt,
    optimizer: str = OptimizerOpt,
    lr: float = typer.Option(0.05, "--lr"),
    weight_decay: float = WeightDecayOpt,
    momentum: float = MomentumOpt,
    warmup: float = typer.Option(0.5, "--warmup", help="Warm-up epochs (may be fractional)."),
    schedule: str = ScheduleOpt,
    label_smoothing: float = LabelSmoothingOpt,
    augment: bool = AugmentOpt,
    amp: str = AmpOpt,
    device: str = TrainDeviceOpt,
    seed: int = SeedOpt,
    workers: int = WorkersOpt,
    limit_train: int = LimitTrainOpt,
    limit_test: int = LimitTestOpt,
    resume: bool = ResumeOpt,
    grad_clip: float = GradClipOpt,
    channels_last: bool = ChannelsLastOpt,
) -> None:
    """Train a model from scratch: a baseline for people without a checkpoint."""
    from tncompress.checkpoint import LoadedModel
    from tncompress.finetune import DataOptions
    from tncompress.models import build_model

    spec = model_spec(arch, arch_args, imports, None)
    torch_seed(seed)
    model = build_model(spec)
    loaded = LoadedModel(model, spec, "fresh", "")
    config = _train_options(epochs, batch_size, optimizer, lr, weight_decay, momentum, warmup, schedule,
                            label_smoothing, amp, device, seed, 0.0, 4.0, grad_clip, channels_last)
    data = DataOptions(dataset, data_dir, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                       augment=augment, limit_train=limit_train, limit_test=limit_test, num_workers=workers)
    _run_training(loaded, output, data, config, None, resume, {"source": None, "source_kind": "fresh"})


@app.command()
@handle_errors
def finetune(
    checkpoint: Path = typer.Argument(..., help="Model to fine-tune (usually a compressed tncompress checkpoint)."),
    dataset: str = DatasetOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Fine-tuned tncompress checkpoint to write."),
    teacher: Path = typer.Option(None, "--teacher", help="Teacher for knowledge distillation (e.g. the uncompressed model)."),
    kd_weight: float = typer.Option(
        None, "--kd-weight", help="Weight of the distillation loss in [0, 1] (default 0.7 with --teacher)."),
    kd_temperature: float = typer.Option(4.0, "--kd-temperature"),
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    data_dir: str = DataDirOpt,
    mean: str = MeanOpt,
    std: str = StdOpt,
    epochs: int = typer.Option(5, "--epochs", min=1),
    batch_size: int = BatchSizeOpt,
    optimizer: str = OptimizerOpt,
    lr: float = typer.Option(0.01, "--lr"),
    weight_decay: float = WeightDecayOpt,
    momentum: float = MomentumOpt,
    warmup: float = typer.Option(0.0, "--warmup", help="Warm-up epochs (may be fractional)."),
    schedule: str = ScheduleOpt,
    label_smoothing: float = LabelSmoothingOpt,
    augment: bool = AugmentOpt,
    amp: str = AmpOpt,
    device: str = TrainDeviceOpt,
    seed: int = SeedOpt,
    workers: int = WorkersOpt,
    limit_train: int = LimitTrainOpt,
    limit_test: int = LimitTestOpt,
    resume: bool = ResumeOpt,
    grad_clip: float = GradClipOpt,
    channels_last: bool = ChannelsLastOpt,
) -> None:
    """Fine-tune a (compressed) model to recover accuracy, optionally distilling from a teacher."""
    from tncompress.finetune import DataOptions

    loaded = load_input(checkpoint, arch, arch_args, imports, trust_pickle, None)
    teacher_model = None
    if teacher is not None:
        teacher_model = load_input(teacher, arch, arch_args, imports, trust_pickle, None).model
    if kd_weight is None:
        kd_weight = 0.7 if teacher_model is not None else 0.0
    if kd_weight > 0 and teacher_model is None:
        raise TncompressError("--kd-weight needs --teacher (the model to distil from)")
    torch_seed(seed)
    config = _train_options(epochs, batch_size, optimizer, lr, weight_decay, momentum, warmup, schedule,
                            label_smoothing, amp, device, seed, kd_weight, kd_temperature, grad_clip,
                            channels_last)
    data = DataOptions(dataset, data_dir, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                       augment=augment, limit_train=limit_train, limit_test=limit_test, num_workers=workers)
    _run_training(loaded, output, data, config, teacher_model, resume,
                  {"source": str(checkpoint), "source_kind": loaded.kind,
                   "teacher": str(teacher) if teacher is not None else None})
