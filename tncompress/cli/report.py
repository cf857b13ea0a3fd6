"""``tncompress report``: size, MACs, latency and accuracy of models side by side, with CI gates."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from tncompress.cli.common import app, console, err_console, handle_errors, input_shape_of, load_input, parse_floats
from tncompress.cli.options import ArchArgOpt, ArchOpt, DataDirOpt, ImportOpt, InputShapeOpt, MeanOpt, StdOpt, TrustOpt
from tncompress.errors import EXIT_GATE, TncompressError


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
    latency: bool = typer.Option(False, "--latency", help="Measure forward latency: all models timed together in "
                                 "interleaved rounds (torch.utils.benchmark), median and IQR; a speed-up is shown "
                                 "only when significant, 'noisy machine' when the spread is too wide."),
    latency_batch: int = typer.Option(1, "--latency-batch", min=1, help="Batch size for --latency."),
    latency_time: float = typer.Option(None, "--latency-time", min=0.5, help="Seconds the interleaved timing may "
                                       "take in all (default: 10 per model); it stops earlier once stable."),
    channels_last: bool = typer.Option(False, "--channels-last",
                                       help="Measure latency with model and input in channels-last (NHWC) layout, "
                                            "usually faster for factorized convolutions on CPU."),
    device: str = typer.Option("cpu", "--device", help="Device for latency and accuracy: cpu or cuda."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Add top-1 / top-5 accuracy on this dataset's test split."),
    data_dir: str = DataDirOpt,
    mean: str = MeanOpt,
    std: str = StdOpt,
    limit_test: int = typer.Option(None, "--limit-test", min=1, help="Evaluate on the first N test images only "
                                   "(the report marks the accuracy as partial)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Evaluation batch size."),
    gates: list[str] = typer.Option(None, "--gate", help="CI gate METRIC OP NUMBER, checked on every model after the "
                                    "baseline, e.g. 'top1_drop<=1.0' or 'params_reduction>=4' (repeatable; exit 3 "
                                    "when one fails). Metrics: params_reduction, macs_reduction, bytes_reduction "
                                    "(baseline / model, 4 = 4× smaller), params_ratio, macs_ratio, bytes_ratio "
                                    "(model / baseline, as a recipe budget), top1, top5, top1_drop, top5_drop, "
                                    "speedup, latency_ms, max_output_error, …"),
) -> None:
    """Params, bytes on disk, MACs (per layer and total), reductions against the first model, and
    accuracy with --dataset; --gate checks CI thresholds (exit 3 when one fails)."""
    from tncompress.checkpoint import atomic_write
    from tncompress.gates import check_options, evaluate_gates, parse_gates
    from tncompress.report import (
        ReportOptions,
        build_report,
        layer_headers,
        layer_rows,
        report_notes,
        summary_rows,
        to_json,
        to_markdown,
    )

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
    shape = input_shape_of(loaded[0], input_shape, dataset) if input_shape or not recorded else list(recorded[0])
    data = None
    if dataset is not None:
        from tncompress.finetune import DataOptions

        data = DataOptions(dataset, data_dir, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                           limit_test=limit_test)
    rep = build_report(loaded, ReportOptions(shape, latency, latency_batch, device, data, batch_size,
                                             channels_last=channels_last, latency_seconds=latency_time))
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
    table = Table(title=escape(f"Report (input {shape}; reductions are baseline / model)"), title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*(escape(str(c)) for c in r))
    console.print(table)
    for note in report_notes(rep):
        console.print(f"[bold yellow]{escape(note)}[/]" if note.startswith("PARTIAL") else escape(note),
                      highlight=False)
    if layers:
        for m in rep["models"]:
            t = Table(title=escape(f"Layers of {m['path']}"), title_justify="left")
            for h in layer_headers(m):
                t.add_column(h, overflow="fold")
            for r in layer_rows(m):
                t.add_row(*(escape(str(c)) for c in r))
            console.print(t)
    console.print(f"[dim]{escape(rep['mac_rule'])}[/]")
    for result in gate_results:
        if result.passed:
            console.print(f"[green]{escape(result.line())}[/]", highlight=False)
    _finish_gates(gate_results)


def _finish_gates(results) -> None:
    """One stderr line per failed gate, then exit 3; nothing when every gate held."""
    failed = [r for r in results if not r.passed]
    for result in failed:
        err_console.print(f"[bold red]{escape(result.line())}[/]", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_GATE)


def _load_for_report(paths: list[Path], arch, arch_args, imports, trust_pickle, input_shape) -> list:
    """Load every model; a state dict given without --arch takes the architecture recorded in a
    tncompress checkpoint of the same report (the usual case: baseline next to its compressed model)."""
    from tncompress.checkpoint import NeedsArchitecture, load_model

    loaded: list[Any] = []
    pending: list[int] = []
    for i, path in enumerate(paths):
        try:
            loaded.append(load_input(path, arch, arch_args, imports, trust_pickle, input_shape))
        except NeedsArchitecture:
            loaded.append(None)
            pending.append(i)
    if pending:
        donor = next((m for m in loaded if m is not None and m.kind == "tncompress" and m.spec is not None), None)
        if donor is None:
            raise NeedsArchitecture(f"{paths[pending[0]]} is a state dict: say which architecture it belongs to "
                                    "with --arch (e.g. --arch torchvision:resnet18 --arch-arg num_classes=10)")
        for i in pending:
            err_console.print("[dim]" + escape(f"{paths[i]}: a state dict; using the architecture recorded in {donor.path} "
                                         f"({donor.spec.arch} {donor.spec.kwargs})") + "[/]", highlight=False)
            loaded[i] = load_model(paths[i], donor.spec, imports=[str(p) for p in imports or []])
    return loaded
