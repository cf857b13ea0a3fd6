"""The ``tncompress`` command line: parses arguments, calls the library, renders with rich."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tncompress._version import __version__
from tncompress.errors import EXIT_GATE, EXIT_INTERNAL, TncompressError

# Set before torch is imported: busy-waiting OpenMP threads starve each other on small or shared
# machines (measured 3× to 1000× slowdowns of the decompositions on 2 cores with another process busy),
# so the heavy commands let idle threads sleep. `report` keeps OpenMP's default: sleeping threads cost
# tens of µs to wake for every small op, which made batch-1 latency up to 2× worse than a deployed
# model sees (docs/performance.md). An OMP_WAIT_POLICY set by the user always wins.
_COMMAND = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
if _COMMAND != "report":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = ("Exit codes: 0 success, 1 internal error (a bug: rerun with --debug), 2 user error (bad input, "
                   "recipe, option or path), 3 a quality gate failed (report --gate, or a recipe's error bound).")
app = typer.Typer(
    name="tncompress",
    help=f"Make trained PyTorch models smaller and faster with tensor decompositions.\n\n{EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output (CI logs) gets a wide table instead of rich's 80-column default; COLUMNS still wins.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 150
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)
_state = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        import torch

        console.print(f"tncompress {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    """Make trained PyTorch models smaller and faster with tensor decompositions."""
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)],
                        force=True)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _traceback_if_debug() -> None:
    """With --debug, the traceback of the exception being handled goes to stderr; the exit code
    stays the same, so scripts behave alike with and without --debug."""
    if _state["debug"]:
        import traceback

        sys.stderr.write(traceback.format_exc())


def handle_errors(func: F) -> F:
    """User errors: one line and their exit code; other exceptions: exit 1 (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TncompressError as exc:
            _traceback_if_debug()
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # an internal error: a bug or an environment problem
            _traceback_if_debug()
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                  EXIT_INTERNAL)

    return wrapper  # type: ignore[return-value]


# --- shared options ------------------------------------------------------------------------------

ArchOpt = typer.Option(None, "--arch", help="Architecture of a state-dict input: torchvision:<name>, "
                       "package.module:factory, mlp-1024 or lenet5.")
ArchArgOpt = typer.Option(None, "--arch-arg", help="key=value argument for the architecture (repeatable), "
                          "e.g. num_classes=10.")
ImportOpt = typer.Option(None, "--import", help="Python file to import first, so its factories and classes "
                         "resolve (repeatable).")
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow loading a whole pickled nn.Module. Unpickling "
                        "runs code from the file: only for files you trust.")
InputShapeOpt = typer.Option(None, "--input-shape", help="Input shape with batch dimension, e.g. 1,3,32,32 "
                             "(default: recorded in the checkpoint, or the architecture's usual input).")
RecipeOpt = typer.Option(..., "--recipe", "-r", help="YAML recipe (see configs/ and docs/recipes.md).")
DatasetOpt = typer.Option(..., "--dataset", "-d", help="mnist, fashion-mnist, cifar10, tiny-imagenet or synthetic.")
DataDirOpt = typer.Option(None, "--data-dir", help="Dataset root (default: $TNCOMPRESS_DATA, else ~/.cache/tncompress/data).")
SetOpt = typer.Option(None, "--set", help="Override a recipe value: key.path=value, e.g. defaults.Linear.rank=4 "
                      "or layers.0.rank=0.3 (repeatable).")


def _spec(arch: str | None, arch_args: list[str] | None, imports: list[str] | None, input_shape: str | None):
    from tncompress.models import ModelSpec, parse_arch_args
    from tncompress.measure import parse_shape

    if arch is None:
        if arch_args:
            raise TncompressError("--arch-arg needs --arch")
        return None
    return ModelSpec(arch=arch, kwargs=parse_arch_args(arch_args or []), imports=[str(Path(p)) for p in imports or []],
                     input_shape=parse_shape(input_shape) if input_shape else None)


def _load(path: Path, arch, arch_args, imports, trust_pickle, input_shape):
    from tncompress.checkpoint import load_model

    spec = _spec(arch, arch_args, imports, input_shape)
    return load_model(path, spec, trust_pickle=trust_pickle, imports=[str(p) for p in imports or []])


def _input_shape(loaded, input_shape: str | None) -> list[int]:
    from tncompress.measure import parse_shape

    if input_shape:
        return parse_shape(input_shape)
    if loaded.spec is not None:
        return loaded.spec.default_input_shape()
    raise TncompressError(f"{loaded.path}: give --input-shape (e.g. 1,3,224,224); a pickled model records none")


def _plan_table(plan, title: str) -> Table:
    from tncompress.report import human

    table = Table(title=title, title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("rule", overflow="fold")
    table.add_column("method / ranks", overflow="fold")
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("MACs", justify="right", no_wrap=True)
    table.add_column("weight err", justify="right")
    table.add_column("output err", justify="right")
    for p in plan:
        if p.action == "keep":
            table.add_row(p.name, p.decided_by or "–", f"dense: {p.reason}", f"{p.params_before:,}",
                          human(p.macs_before), "–", "–", style="dim")
            continue
        table.add_row(p.name, p.decided_by or "–", p.reason or f"{p.method} {p.ranks}",
                      f"{p.params_before:,} → {p.params_after:,}", f"{human(p.macs_before)} → {human(p.macs_after)}",
                      _fmt(p.weight_rel_error), _fmt(p.output_rel_error))
    return table


def _print_notes(plan) -> None:
    for p in plan:
        for note in p.notes:
            console.print(f"[dim]{p.name}:[/] {note}", highlight=False)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _totals_line(plan, model_params_before: int) -> str:
    before = sum(p.params_before for p in plan)
    after = sum(p.params_after for p in plan)
    macs_b = sum(p.macs_before for p in plan)
    macs_a = sum(p.macs_after for p in plan)
    n = sum(p.action == "decompose" for p in plan)
    total_after = model_params_before - before + after
    params_change = 100 * (total_after / model_params_before - 1) if model_params_before else 0.0
    macs_change = 100 * (macs_a / macs_b - 1) if macs_b else 0.0
    return (f"{n} of {len(plan)} layers factorized; model params {model_params_before:,} → {total_after:,} "
            f"({params_change:+.1f}%); MACs per sample of the Linear/Conv2d layers {macs_b:,} → {macs_a:,} "
            f"({macs_change:+.1f}%)")


_SENSITIVITY = {"model": "squared relative model-output error", "kl": "KL divergence from the dense model's predictions",
                "layer": "squared relative layer-output error"}


def _print_budget(summary: dict[str, Any] | None) -> None:
    """The recipe budget's outcome: target against achieved, and what the allocation gained."""
    if not summary:
        return
    unit = "params" if summary["metric"] == "params" else "MACs"
    console.print(f"budget {summary['metric']}_ratio {summary['target_ratio']:g}: achieved "
                  f"{summary['achieved_ratio']:.4f} ({summary['achieved']:,} of {summary['total']:,} {unit}, whole model); "
                  f"ranks by measured sensitivity (a rank in the recipe is ignored; Δ = "
                  f"{_SENSITIVITY[summary['sensitivity']]} with only that layer replaced), then a local search from "
                  f"the best of greedy / uniform fractions / uniform ranks (started from {summary['start']}: "
                  f"{summary['refine_moves']} moves, {summary['refine_evaluations']} evaluations); all layers together, "
                  f"{summary['selection_measure']}: {summary['combined']:.4g} against greedy "
                  f"{summary['greedy_combined']:.4g}, uniform fractions {summary['uniform_combined']:.4g}, uniform ranks "
                  f"{summary['uniform_ranks_combined']:.4g}; model output error {summary['model_output_error']:.3g}; "
                  f"scan {summary['scan_seconds']:.1f} s ({summary['measured']} of {summary['candidates']} candidate "
                  f"ranks measured over {summary['layers']} layers, {summary['calibration_samples']} calibration samples)",
                  highlight=False)


def _plan_json(plan, extra: dict[str, Any]) -> str:
    return json.dumps({**extra, "layers": [p.to_dict() for p in plan]}, indent=2, default=str)


# --- commands ------------------------------------------------------------------------------------

@app.command()
@handle_errors
def plan(
    checkpoint: Path = typer.Argument(..., help="Input: state dict (with --arch), tncompress checkpoint, or trusted pickle."),
    recipe: Path = RecipeOpt,
    overrides: list[str] = SetOpt,
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    input_shape: str = InputShapeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Dry run: which rule picks each layer, method, modes, ranks, params and MACs before and after."""
    from tncompress.measure import count_params
    from tncompress.compress import make_plan
    from tncompress.recipe import load_recipe

    rec = load_recipe(recipe, overrides or [])
    loaded = _load(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    shape = _input_shape(loaded, input_shape)
    layers = make_plan(loaded.model, rec, shape)
    budget = layers.budget
    if as_json:
        sys.stdout.write(_plan_json(layers, {"input": str(checkpoint), "recipe": str(recipe), "input_shape": shape,
                                             **({"budget": budget} if budget else {})}) + "\n")
        return
    console.print(_plan_table(layers, f"Plan for {checkpoint} with {recipe} (input {shape})"))
    _print_notes(layers)
    console.print(_totals_line(layers, count_params(loaded.model)))
    _print_budget(budget)


@app.command()
@handle_errors
def decompose(
    checkpoint: Path = typer.Argument(..., help="Input: state dict (with --arch), tncompress checkpoint, or trusted pickle."),
    recipe: Path = RecipeOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Compressed checkpoint to write (atomically)."),
    overrides: list[str] = SetOpt,
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    input_shape: str = InputShapeOpt,
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
    from tncompress.recipe import load_recipe

    if output.resolve() == checkpoint.resolve():
        raise TncompressError(f"--output {output} is the input file; write the compressed model to a new file")
    check_output_path(output)
    rec = load_recipe(recipe, overrides or [])
    loaded = _load(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    shape = _input_shape(loaded, input_shape)
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
            progress.update(task, description=f"{entry.name}: {entry.method} {entry.ranks}")
        else:
            progress.update(task, advance=1)

    try:
        result = decompose_model(loaded.model, rec, input_shape=shape, inplace=True, progress=on_progress,
                                 allow_error=allow_error)
        if task is not None:
            progress.update(task, description="decomposed")
    finally:
        if task is not None:
            progress.stop()
    layers, budget, model_error = result.plan, result.budget, result.model_output_error
    calib = result.calibration
    for problem in result.bound_violations:
        err_console.print(f"[yellow]warning:[/] {problem} (written anyway: --allow-error)", highlight=False)
    spec = loaded.spec
    if spec is not None:
        spec = ModelSpec(spec.arch, spec.kwargs, spec.imports, list(shape))
    save_compressed(output, result.model, spec=spec, plan=[p.to_dict() for p in layers], recipe=rec.raw,
                    metadata={"source": str(checkpoint), "source_kind": loaded.kind,
                              "source_sha256": file_sha256(checkpoint), "recipe_path": str(recipe),
                              "recipe_sha256": file_sha256(recipe), "recipe_overrides": list(overrides or []),
                              **result.metadata()})
    if as_json:
        sys.stdout.write(_plan_json(layers, {"input": str(checkpoint), "output": str(output), "input_shape": shape,
                                             "model_output_error": model_error,
                                             **({"budget": budget} if budget else {})}) + "\n")
        return
    console.print(_plan_table(layers, f"Decomposed {checkpoint} → {output} (errors: relative Frobenius norm; "
                                      f"output error on a calibration batch of {calib['batch_size']})"))
    _print_notes(layers)
    console.print(_totals_line(layers, params_before))
    _print_budget(budget)
    if model_error is not None:
        console.print(f"model output error on the calibration batch: {model_error:.3g} (relative)")
    console.print(f"wrote {output}")


@app.command()
@handle_errors
def report(
    checkpoints: list[Path] = typer.Argument(..., help="Models to compare; the first is the baseline."),
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    input_shape: str = InputShapeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema_version 1)."),
    as_markdown: bool = typer.Option(False, "--markdown", help="Print Markdown."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON or Markdown to this file."),
    layers: bool = typer.Option(False, "--layers", help="Show the per-layer table in the terminal."),
    latency: bool = typer.Option(False, "--latency", help="Measure forward latency (median of repeated runs)."),
    latency_batch: int = typer.Option(1, "--latency-batch", min=1, help="Batch size for --latency."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="Measure latency with model and input in channels-last (NHWC) layout, "
                                            "usually faster for factorized convolutions on CPU."),
    device: str = typer.Option("cpu", "--device", help="Device for latency and accuracy: cpu or cuda."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Add top-1 / top-5 accuracy on this dataset's test split."),
    data_dir: str = DataDirOpt,
    limit_test: int = typer.Option(None, "--limit-test", min=1, help="Evaluate on the first N test images only."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Evaluation batch size."),
    gates: list[str] = typer.Option(None, "--gate", help="CI gate METRIC OP NUMBER, checked on every model after the "
                                    "baseline, e.g. 'top1_drop<=1.0' or 'params_ratio>=4' (repeatable; exit 3 when "
                                    "one fails). Metrics: params_ratio, macs_ratio, bytes_ratio, top1, top5, "
                                    "top1_drop, top5_drop, speedup, latency_ms, max_output_error, …"),
) -> None:
    """Params, bytes on disk, MACs (per layer and total), ratios against the first model, and
    accuracy with --dataset; --gate checks CI thresholds (exit 3 when one fails)."""
    from tncompress.checkpoint import atomic_write
    from tncompress.gates import check_options, evaluate_gates, parse_gates
    from tncompress.report import LAYER_HEADERS, ReportOptions, build_report, layer_rows, summary_rows, to_json, to_markdown

    parsed_gates = parse_gates(gates or [])  # bad syntax fails before any work
    check_options(parsed_gates, dataset=dataset is not None, latency=latency)
    if as_json and as_markdown:
        raise TncompressError("choose one of --json and --markdown")
    if output and not (as_json or as_markdown):
        raise TncompressError("--output needs --json or --markdown to say which format to write")
    if output:
        from tncompress.checkpoint import check_output_path

        check_output_path(output)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise TncompressError("--device cuda: no CUDA device is available here")
    loaded = _load_for_report(checkpoints, arch, arch_args, imports, trust_pickle, input_shape)
    recorded = [m.spec.input_shape for m in loaded if m.spec is not None and m.spec.input_shape]
    shape = _input_shape(loaded[0], input_shape) if input_shape or not recorded else list(recorded[0])
    data = None
    if dataset is not None:
        from tncompress.finetune import DataOptions

        data = DataOptions(dataset, data_dir, limit_test=limit_test)
    rep = build_report(loaded, ReportOptions(shape, latency, latency_batch, device, data, batch_size,
                                             channels_last=channels_last))
    gate_results = evaluate_gates(parsed_gates, rep)
    if parsed_gates:
        rep["gates"] = [g.to_dict() for g in gate_results]
    if as_json or as_markdown:
        text = to_json(rep) + "\n" if as_json else to_markdown(rep)
        if output:
            atomic_write(output, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        sys.stdout.write(text)
        _finish_gates(gate_results)
        return
    headers, rows = summary_rows(rep)
    table = Table(title=f"Report (input {shape}; ratios are baseline / model)", title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if layers:
        for m in rep["models"]:
            t = Table(title=f"Layers of {m['path']}", title_justify="left")
            for h in LAYER_HEADERS:
                t.add_column(h, overflow="fold")
            for r in layer_rows(m):
                t.add_row(*r)
            console.print(t)
    console.print(f"[dim]{rep['mac_rule']}[/]")
    for result in gate_results:
        if result.passed:
            console.print(f"[green]{result.line()}[/]", highlight=False)
    _finish_gates(gate_results)


def _finish_gates(results) -> None:
    """One stderr line per failed gate, then exit 3; nothing when every gate held."""
    failed = [r for r in results if not r.passed]
    for result in failed:
        err_console.print(f"[bold red]{result.line()}[/]", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_GATE)


@app.command()
@handle_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Model to export (a tncompress checkpoint, or a state dict with --arch)."),
    fmt: str = typer.Option(..., "--format", "-f", help="torchscript or onnx (onnx needs: pip install 'tncompress\\[export]')."),
    output: Path = typer.Option(None, "--output", "-o", help="File to write (default: next to the input, "
                                ".torchscript.pt or .onnx)."),
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    input_shape: str = InputShapeOpt,
    opset: int = typer.Option(None, "--opset", min=7, help="ONNX opset (default: the exporter's)."),
) -> None:
    """Write a model that runs without tncompress: TorchScript (torch.jit.load) or ONNX. The file is
    checked against the PyTorch model at batch 1 and 3 before it is renamed into place."""
    from tncompress.checkpoint import check_output_path
    from tncompress.export import FORMATS, default_output, export_model
    from tncompress.planner import calibration_batch

    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise TncompressError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    output = output or default_output(checkpoint, fmt)
    if output.resolve() == checkpoint.resolve():
        raise TncompressError(f"--output {output} is the input file; export to a new file")
    check_output_path(output)
    loaded = _load(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    shape = _input_shape(loaded, input_shape)
    param = next(loaded.model.parameters(), None)
    example = calibration_batch(shape, 1, 0) if param is None else calibration_batch(shape, 1, 0, dtype=param.dtype)
    result = export_model(loaded.model, example, output, fmt, opset=opset)
    checked = (f"outputs match the PyTorch model at batch {' and '.join(map(str, result.batch_sizes))} "
               f"(max abs difference {result.max_abs_diff:.3g}, {result.checked_with})"
               if result.max_abs_diff is not None else "outputs not checked (onnxruntime is not installed)")
    console.print(f"wrote {output} ({fmt}, input {shape}); {checked}", highlight=False)


# --- training ------------------------------------------------------------------------------------



BatchSizeOpt = typer.Option(128, "--batch-size", min=1)
OptimizerOpt = typer.Option("sgd", "--optimizer", help="sgd or adamw.")
WeightDecayOpt = typer.Option(5e-4, "--weight-decay")
MomentumOpt = typer.Option(0.9, "--momentum")
ScheduleOpt = typer.Option("cosine", "--schedule", help="cosine or constant.")
LabelSmoothingOpt = typer.Option(0.0, "--label-smoothing")
AugmentOpt = typer.Option(False, "--augment/--no-augment", help="Standard light augmentation.")
AmpOpt = typer.Option("auto", "--amp", help="auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16 or off.")
TrainDeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
SeedOpt = typer.Option(0, "--seed")
WorkersOpt = typer.Option(0, "--workers", min=0, help="DataLoader worker processes.")
LimitTrainOpt = typer.Option(None, "--limit-train", min=1, help="Use only the first N training images.")
LimitTestOpt = typer.Option(None, "--limit-test", min=1, help="Use only the first N test images.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from OUTPUT.state.pt.")
GradClipOpt = typer.Option(None, "--grad-clip")


def _train_options(epochs: int, batch_size: int, optimizer: str, lr: float, weight_decay: float, momentum: float,
                   warmup: float, schedule: str, label_smoothing: float, amp: str, device: str, seed: int,
                   kd_weight: float, kd_temperature: float, grad_clip: float | None):
    from tncompress.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                       momentum=momentum, warmup_epochs=warmup, schedule=schedule, label_smoothing=label_smoothing,
                       amp=amp, device=device, seed=seed, kd_weight=kd_weight, kd_temperature=kd_temperature,
                       grad_clip=grad_clip)


def _run_training(loaded, output: Path, data, config, teacher, resume: bool, extra: dict[str, Any]) -> None:
    from tncompress.finetune import train_and_save

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[stats]}"), console=err_console, transient=True)
    task_ids: dict[str, Any] = {}

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "data":
            console.print(payload["train"], highlight=False)
            console.print(payload["test"], highlight=False)
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
    console.print(f"done: best test top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}), final "
                  f"{result.history[-1]['test_top1']:.2f}% on {data.name}; {result.device}, amp {result.amp}; "
                  f"wrote {output}", highlight=False)


@app.command()
@handle_errors
def train(
    arch: str = typer.Option(..., "--arch", help="Architecture: mlp-1024, lenet5, torchvision:<name>, package.module:factory."),
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    dataset: str = DatasetOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint to write (a tncompress checkpoint)."),
    data_dir: str = DataDirOpt,
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
) -> None:
    """Train a model from scratch: a baseline for people without a checkpoint."""
    from tncompress.checkpoint import LoadedModel
    from tncompress.finetune import DataOptions
    from tncompress.models import build_model

    spec = _spec(arch, arch_args, imports, None)
    torch_seed(seed)
    model = build_model(spec)
    loaded = LoadedModel(model, spec, "fresh", "")
    config = _train_options(epochs, batch_size, optimizer, lr, weight_decay, momentum, warmup, schedule,
                            label_smoothing, amp, device, seed, 0.0, 4.0, grad_clip)
    data = DataOptions(dataset, data_dir, augment=augment, limit_train=limit_train, limit_test=limit_test,
                       num_workers=workers)
    _run_training(loaded, output, data, config, None, resume, {"source": None, "source_kind": "fresh"})


@app.command()
@handle_errors
def finetune(
    checkpoint: Path = typer.Argument(..., help="Model to fine-tune (usually a compressed tncompress checkpoint)."),
    dataset: str = DatasetOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Fine-tuned tncompress checkpoint to write."),
    teacher: Path = typer.Option(None, "--teacher", help="Teacher for knowledge distillation (e.g. the uncompressed model)."),
    kd_weight: float = typer.Option(None, "--kd-weight", help="Weight of the distillation loss in [0, 1] (default 0.7 with --teacher)."),
    kd_temperature: float = typer.Option(4.0, "--kd-temperature"),
    arch: str = ArchOpt,
    arch_args: list[str] = ArchArgOpt,
    imports: list[str] = ImportOpt,
    trust_pickle: bool = TrustOpt,
    data_dir: str = DataDirOpt,
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
) -> None:
    """Fine-tune a (compressed) model to recover accuracy, optionally distilling from a teacher."""
    from tncompress.finetune import DataOptions

    loaded = _load(checkpoint, arch, arch_args, imports, trust_pickle, None)
    teacher_model = None
    if teacher is not None:
        teacher_model = _load(teacher, arch, arch_args, imports, trust_pickle, None).model
    if kd_weight is None:
        kd_weight = 0.7 if teacher_model is not None else 0.0
    if kd_weight > 0 and teacher_model is None:
        raise TncompressError("--kd-weight needs --teacher (the model to distil from)")
    torch_seed(seed)
    config = _train_options(epochs, batch_size, optimizer, lr, weight_decay, momentum, warmup, schedule,
                            label_smoothing, amp, device, seed, kd_weight, kd_temperature, grad_clip)
    data = DataOptions(dataset, data_dir, augment=augment, limit_train=limit_train, limit_test=limit_test,
                       num_workers=workers)
    _run_training(loaded, output, data, config, teacher_model, resume,
                  {"source": str(checkpoint), "source_kind": loaded.kind,
                   "teacher": str(teacher) if teacher is not None else None})


@app.command()
@handle_errors
def sweep(
    checkpoint: Path = typer.Argument(..., help="The dense (trained) model: state dict (with --arch), tncompress checkpoint, or trusted pickle."),
    recipe: Path = RecipeOpt,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for sweep.csv, sweep.json and sweep.png (resumable)."),
    ranks: str = typer.Option(None, "--ranks", help="Ranks to try, e.g. 1,2,4,8: set on every rule that decomposes with a rank."),
    budgets: str = typer.Option(None, "--budgets", help="Whole-model budgets to try, e.g. 0.5,0.2,0.1 (params_ratio) or macs:0.5."),
    dataset: str = DatasetOpt,
    data_dir: str = DataDirOpt,
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", min=0, help="Short fine-tune of each point (distilled from the dense model)."),
    lr: float = typer.Option(0.01, "--lr", help="Fine-tune learning rate."),
    batch_size: int = BatchSizeOpt,
    calibration: str = typer.Option("data", "--calibration", help="data (training images) or noise (the recipe's Gaussian batch): "
                                    "what the decomposition and a budget's sensitivity scan are measured on."),
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
    already in the folder's sweep.json are skipped."""
    from tncompress.finetune import DataOptions
    from tncompress.measure import parse_shape
    from tncompress.sweep import SweepOptions, parse_points, run_sweep

    if calibration not in ("data", "noise"):
        raise TncompressError(f"--calibration must be data or noise, got {calibration!r}")
    points = parse_points(ranks, budgets)
    loaded = _load(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    data = DataOptions(dataset, data_dir, limit_train=limit_train, limit_test=limit_test)
    options = SweepOptions(data, finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size, device=device,
                           seed=seed, calibration=calibration)

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "baseline":
            console.print(f"baseline: top-1 {payload['top1']:.2f}% on {payload['images']:,} test images, "
                          f"{payload['params']:,} params, {payload['macs']:,} MACs", highlight=False)
        elif event == "skip":
            console.print(f"{payload['point']}: already in {output / 'sweep.json'}, skipped", highlight=False)
        elif event == "start":
            err_console.print(f"[dim]{payload['point']}: decomposing…[/]", highlight=False)
        elif event == "done":
            console.print(f"{payload['point']}: top-1 {payload['top1']:.2f}%, params {payload['params']:,} "
                          f"({1 / payload['params_ratio']:.3g}× smaller), MACs {payload['macs']:,} "
                          f"({1 / payload['macs_ratio']:.3g}×)", highlight=False)

    torch_seed(seed)
    results = run_sweep(loaded, recipe, points, output, options, overrides=overrides or [],
                        input_shape=parse_shape(input_shape) if input_shape else None, note=note, on_event=on_event)
    console.print(f"{len(results['points'])} points in {output / 'sweep.csv'}, {output / 'sweep.json'}; "
                  f"plot {output / 'sweep.png'}", highlight=False)


def torch_seed(seed: int) -> None:
    """Seed model initialisation (the training loop re-seeds per epoch itself)."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _load_for_report(paths: list[Path], arch, arch_args, imports, trust_pickle, input_shape) -> list:
    """Load every model; a state dict given without --arch takes the architecture recorded in a
    tncompress checkpoint of the same report (the usual case: baseline next to its compressed model)."""
    from tncompress.checkpoint import NeedsArchitecture, load_model

    loaded: list[Any] = []
    pending: list[int] = []
    for i, path in enumerate(paths):
        try:
            loaded.append(_load(path, arch, arch_args, imports, trust_pickle, input_shape))
        except NeedsArchitecture:
            loaded.append(None)
            pending.append(i)
    if pending:
        donor = next((m for m in loaded if m is not None and m.kind == "tncompress" and m.spec is not None), None)
        if donor is None:
            raise NeedsArchitecture(f"{paths[pending[0]]} is a state dict: say which architecture it belongs to "
                                    "with --arch (e.g. --arch torchvision:resnet18 --arch-arg num_classes=10)")
        for i in pending:
            err_console.print(f"[dim]{paths[i]}: a state dict; using the architecture recorded in {donor.path} "
                              f"({donor.spec.arch} {donor.spec.kwargs})[/]", highlight=False)
            loaded[i] = load_model(paths[i], donor.spec, imports=[str(p) for p in imports or []])
    return loaded


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
