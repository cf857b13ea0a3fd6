"""Which input shape to run a model at when the user gave none, and proof that the model runs there.

The order, first match wins:

1. ``--input-shape`` as given;
2. the shape recorded with the model (a tncompress checkpoint's spec), or the one a reference net
   (``mlp-1024``, ``lenet5``) or a ``cifar_stem`` ResNet is built for;
3. the dataset the command reads (``--dataset`` / ``--calibration-data``): its channels and native
   image size (a model whose first layer is a conv keeps that conv's channel count);
4. the architecture's own default (the reference nets; torchvision models: 3×224×224, 3×32×32 with
   ``cifar_stem``);
5. the first layer, where it decides the shape: a Linear takes ``[1, in_features]``, an embedding a
   window of token ids (as long as a position table allows, at most 32). A conv fixes only the
   channels, so it decides nothing and the user is asked for ``--input-shape``.

Whatever the source, the model is run once on a sample of that shape: a shape it does not run on is
a one-line error naming ``--input-shape``, never a traceback from deep inside the user's forward.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tncompress.errors import TncompressError
from tncompress.models import BUILTIN_MODELS, ModelSpec

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 32  # token window for a model that starts with an embedding and has no position table


class InputShapeError(TncompressError):
    """No input shape can be told, or the model does not run on the one there is."""


@dataclass(frozen=True)
class InputShape:
    """A batch-1 input shape and where it came from (said in plans and reports)."""

    shape: list[int]
    source: str


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module, in registration order, that holds parameters of its own."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            return name, module
    return None


def _position_table(model: nn.Module) -> int | None:
    """The length of a learned position table (nanoGPT's ``wpe``, BERT's ``position_embeddings``)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) and ("pos" in leaf or leaf == "wpe"):
            return int(module.num_embeddings)
    return None


def _from_first_layer(model: nn.Module) -> InputShape | None:
    from tncompress.planner import token_vocabulary

    found = first_layer(model)
    if found is None:
        return None
    name, module = found
    if token_vocabulary(model) is not None:  # the planner's rule for a model that takes token ids
        table = _position_table(model)
        tokens = min(DEFAULT_TOKENS, table) if table else DEFAULT_TOKENS
        return InputShape([1, tokens], f"its first layer {name} (an embedding; {tokens} token ids)")
    if isinstance(module, nn.Linear):
        return InputShape([1, int(module.in_features)], f"its first layer {name} (Linear, {module.in_features} inputs)")
    return None


def _from_dataset(model: nn.Module, dataset: str) -> InputShape | None:
    from tncompress.data import dataset_info

    info = dataset_info(dataset)
    if not info.image_size:
        return None
    found = first_layer(model)
    channels = found[1].in_channels if found is not None and isinstance(found[1], nn.Conv2d) else info.channels
    return InputShape([1, int(channels), int(info.image_size), int(info.image_size)], f"the dataset {dataset}")


def _from_architecture(spec: ModelSpec | None) -> InputShape | None:
    """torchvision's 3×224×224 (the reference nets were taken before the dataset)."""
    if spec is not None and spec.arch.startswith("torchvision:"):
        return InputShape(spec.default_input_shape(), f"the default of {spec.arch}")
    return None


def _undecided(model: nn.Module) -> str:
    found = first_layer(model)
    if found is None:
        return "the model has no parameters"
    name, module = found
    if isinstance(module, nn.Conv2d):
        return (f"its first layer {name} is a conv with {module.in_channels} input channel(s), which fixes no image "
                f"size; pass --input-shape 1,{module.in_channels},H,W")
    return f"its first layer {name} ({type(module).__name__}) does not fix it; pass --input-shape"


def resolve_input_shape(model: nn.Module, spec: ModelSpec | None, given: Sequence[int] | None = None,
                        dataset: str | None = None, *, check: bool = True) -> InputShape:
    """The input shape to use for ``model`` (see the module docstring), run once to prove it."""
    choice: InputShape | None = None
    if given:
        choice = InputShape([int(v) for v in given], "given (--input-shape)")
    elif spec is not None and spec.input_shape:
        choice = InputShape(list(spec.input_shape), "recorded with the model")
    elif spec is not None and (spec.arch in BUILTIN_MODELS or spec.kwargs.get("cifar_stem")):
        choice = InputShape(spec.default_input_shape(), f"the input {spec.arch} is built for")
    elif dataset is not None:
        choice = _from_dataset(model, dataset)
    if choice is None:
        choice = _from_architecture(spec) or _from_first_layer(model)
    if choice is None:
        raise InputShapeError(f"cannot tell which input the model takes: {_undecided(model)} "
                              "(or give --dataset / --calibration-data)")
    if check:
        check_runs(model, choice)
    log.info("input shape %s (%s)", choice.shape, choice.source)
    return choice


def check_runs(model: nn.Module, choice: InputShape) -> None:
    """Run ``model`` once on a sample of ``choice.shape``; a failure is one line naming --input-shape."""
    from tncompress.planner import example_batch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_batch(model, choice.shape, 1, 0))
    except TncompressError:
        raise
    except Exception as exc:  # the user's forward rejected the shape
        text = str(exc).strip().splitlines()
        first = text[0] if text else ""
        hint = "pass the right one with --input-shape" if choice.source.startswith("given") else \
            "pass --input-shape (e.g. 1,C,H,W)"
        raise InputShapeError(f"the model does not run on input shape {','.join(map(str, choice.shape))} "
                              f"({choice.source}): {type(exc).__name__}: {first[:300]}; {hint}") from None
    finally:
        model.train(was)
