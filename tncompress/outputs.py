"""The output rule: which tensor of a model's output is the one it is judged by.

Users' models return a tensor, a ``(logits, loss)`` tuple (nanoGPT's convention), a dict, or a
Hugging Face ``ModelOutput``. Everything that scores an output (plan and budget errors, calibration
errors, data-aware fits, report accuracy, fine-tuning, export) uses this one rule:

1. a tensor is itself;
2. a mapping (dict, ``ModelOutput``) or an object with attributes: its ``logits`` entry, else its
   ``last_hidden_state`` (a Hugging Face encoder without a head), else its first tensor;
3. a tuple or list: its first tensor (depth first, so ``((logits, aux), loss)`` gives ``logits``).

An output with no tensor at all is an error that says so in one line.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tncompress.errors import TncompressError

PREFERRED_KEYS = ("logits", "last_hidden_state")
RULE = "the output tensor itself; else its 'logits' entry, else 'last_hidden_state', else its first tensor"


class OutputError(TncompressError):
    """A model whose output holds no tensor to judge it by."""


def primary_output(output: Any) -> torch.Tensor | None:
    """The tensor ``output`` is judged by (see the module docstring), or None when it holds none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in PREFERRED_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        values: list[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        for key in PREFERRED_KEYS:  # a dataclass-like output object
            if isinstance(getattr(output, key, None), torch.Tensor):
                return getattr(output, key)
        return None
    for value in values:
        found = primary_output(value)
        if found is not None:
            return found
    return None


def output_tensor(output: Any, where: str = "the model") -> torch.Tensor:
    """:func:`primary_output`, or a one-line :class:`OutputError` naming what came back instead."""
    found = primary_output(output)
    if found is None:
        raise OutputError(f"{where} returned {describe(output)}, which holds no tensor to judge the model by "
                          f"(the rule: {RULE})")
    return found


def describe(output: Any) -> str:
    """A short description of an output's structure, for messages."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {', '.join(map(str, list(output)[:5])) or '(none)'}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} ({', '.join(type(v).__name__ for v in output[:5])})"
    return f"a {type(output).__name__}"
