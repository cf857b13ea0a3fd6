"""Export a model to a file that runs without tncompress: TorchScript (``torch.jit.load``) or ONNX.

Every export is checked: the exported model is run on a reproducible batch and compared with the
PyTorch model; a difference above the tolerance is an error, never a silently wrong file. ONNX needs
the optional ``export`` extra (onnx, onnxscript; onnxruntime to check the result).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tncompress.checkpoint import atomic_write
from tncompress.errors import TncompressError

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
TOLERANCE = 1e-4  # max |exported - torch| relative to max |torch|


class ExportError(TncompressError):
    """The model cannot be exported in the asked format, or the export does not reproduce it."""


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float | None       # against the PyTorch model on the check batch; None if not checked
    checked_with: str | None         # "torch.jit.load", "onnxruntime" or None
    batch_sizes: list[int]
    output: str | None = None        # which part of a structured output was exported ("logits"); None: the tensor


class _PrimaryOutput(nn.Module):
    """A model whose output is a Hugging Face ``ModelOutput`` / dict / tuple, reduced to the one
    tensor it is judged by (``logits``, ``last_hidden_state``, or its first tensor), so tracers and
    exporters see one tensor in and one out."""

    def __init__(self, model: nn.Module, key: str | int) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[self.key]


def _output_key(output: Any) -> str | int | None:
    """Where the primary tensor of a structured output lives (see :func:`tncompress.outputs.primary_output`)."""
    from tncompress.outputs import primary_output

    tensor = primary_output(output)
    if tensor is None:
        return None
    if isinstance(output, dict):
        return next(k for k, v in output.items() if v is tensor)
    return next(i for i, v in enumerate(output) if v is tensor)


def default_output(source: str | Path, fmt: str) -> Path:
    source = Path(source)
    return source.with_name(source.name.removesuffix(source.suffix) + SUFFIXES[fmt])


def _check_batches(example: torch.Tensor) -> list[torch.Tensor]:
    """Two batch sizes, so a batch dimension frozen into the export is caught."""
    gen = torch.Generator().manual_seed(0)
    shape = tuple(example.shape[1:])
    if not example.is_floating_point():  # token ids: stay below the largest id of the example
        high = max(1, int(example.max()) + 1)
        return [torch.randint(0, high, (n, *shape), generator=gen).to(example.dtype) for n in (1, 3)]
    return [torch.randn((n, *shape), generator=gen).to(example.dtype) for n in (1, 3)]


def _compare(reference: torch.Tensor, got: torch.Tensor, where: str) -> float:
    if tuple(got.shape) != tuple(reference.shape):
        raise ExportError(f"{where}: the exported model returns shape {tuple(got.shape)}, the model {tuple(reference.shape)}")
    diff = float((got.double() - reference.double()).abs().max())
    scale = max(1.0, float(reference.double().abs().max()))
    if not diff <= TOLERANCE * scale:
        raise ExportError(f"{where}: the exported model differs from the PyTorch model by {diff:.3g} "
                          f"(tolerance {TOLERANCE * scale:.3g}); not written")
    return diff


def _torchscript(model: nn.Module, example: torch.Tensor, tmp: Path) -> None:
    # Traced with autograd on, so factorized layers compute from their parameters on every call
    # (inference caches such as TT's merged cores are not baked in as constants).
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still supported
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(tmp))


def _onnx(model: nn.Module, example: torch.Tensor, tmp: Path, opset: int | None) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'tncompress[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"],
                              "dynamic_shapes": ({0: batch},), "dynamo": True, "external_data": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    noise = io.StringIO()
    with torch.enable_grad(), contextlib.redirect_stdout(noise), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), **kwargs)
    if program is None:  # the dynamo exporter always returns a program; None means a legacy export path ran
        raise ExportError("torch.onnx.export returned no ONNX program (legacy exporter?); upgrade torch")
    program.save(str(tmp))


def _run_torchscript(path: Path, batch: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(batch)


def _run_onnx(path: Path, batch: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])


def export_model(model: nn.Module, example: torch.Tensor, path: str | Path, fmt: str,
                 *, opset: int | None = None) -> ExportResult:
    """Export ``model`` (traced on ``example``, a batch shaped like the real input) to ``path``
    atomically, after checking the exported file reproduces the model at batch 1 and 3."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    model = model.cpu().eval()
    batches = _check_batches(example.cpu())
    # batch 2: exporters specialise a dimension of size 1, which would freeze the batch size
    example = torch.cat([example.cpu()[:1]] * 2)
    with torch.no_grad():
        references = [model(b) for b in batches]
    output_name = None
    if not all(isinstance(r, torch.Tensor) for r in references):
        kind = type(references[0]).__name__
        key = _output_key(references[0])
        if key is None:
            raise ExportError("export supports models with one tensor input and a tensor output (or a structured "
                              "output such as a Hugging Face ModelOutput holding one)")
        model = _PrimaryOutput(model, key)
        references = [r[key] for r in references]
        output_name = str(key)
        log.info("the model returns a %s; exporting its %r tensor", kind, key)
    result = ExportResult(Path(path), fmt, None, None, [int(b.shape[0]) for b in batches], output_name)

    def write(tmp: Path) -> None:
        try:
            if fmt == "torchscript":
                _torchscript(model, example, tmp)
            else:
                _onnx(model, example, tmp, opset)
        except ExportError:
            raise
        except Exception as exc:  # tracers and exporters raise many types for unsupported code
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{fmt} export failed: {type(exc).__name__}: {first[:300]}") from exc
        runner = _run_torchscript if fmt == "torchscript" else _run_onnx
        diffs = []
        for batch, reference in zip(batches, references):
            got = runner(tmp, batch)
            if got is None:
                log.warning("onnxruntime is not installed: %s written without checking its outputs", path)
                return
            diffs.append(_compare(reference, got, f"{path} (batch {batch.shape[0]})"))
        result.max_abs_diff = max(diffs)
        result.checked_with = "torch.jit.load" if fmt == "torchscript" else "onnxruntime"

    atomic_write(path, write)
    return result
