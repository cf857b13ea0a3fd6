"""``tncompress export``: TorchScript or ONNX files that run without tncompress."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from tncompress.cli.common import app, console, handle_errors, input_shape_of, load_input
from tncompress.cli.options import ArchArgOpt, ArchOpt, ImportOpt, InputShapeOpt, TrustOpt
from tncompress.errors import TncompressError


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
    from tncompress.planner import example_batch

    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise TncompressError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    output = output or default_output(checkpoint, fmt)
    if output.resolve() == checkpoint.resolve():
        raise TncompressError(f"--output {output} is the input file; export to a new file")
    check_output_path(output)
    loaded = load_input(checkpoint, arch, arch_args, imports, trust_pickle, input_shape)
    shape = input_shape_of(loaded, input_shape)
    example = example_batch(loaded.model, shape)
    result = export_model(loaded.model, example, output, fmt, opset=opset)
    checked = (f"outputs match the PyTorch model at batch {' and '.join(map(str, result.batch_sizes))} "
               f"(max abs difference {result.max_abs_diff:.3g}, {result.checked_with})"
               if result.max_abs_diff is not None else "outputs not checked (onnxruntime is not installed)")
    part = f"; it returns the model's {result.output!r} output" if result.output is not None else ""
    console.print(escape(f"wrote {output} ({fmt}, input {shape}){part}; {checked}"), highlight=False)


# --- training ------------------------------------------------------------------------------------
