"""Error types that carry a one-line, user-facing message and an exit code.

The CLI catches :class:`TncompressError` and prints ``error: <message>`` without a traceback;
anything else is an internal error (exit 1) and shows a traceback only with ``--debug``.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_GATE = 3


class TncompressError(Exception):
    """A problem the user can fix: bad input, missing file, impossible setting."""

    exit_code = EXIT_USER


class RecipeError(TncompressError):
    """The recipe is malformed or asks for something impossible."""


class RankError(TncompressError):
    """A rank (or mode) setting that cannot be honoured for a given layer."""


class CheckpointError(TncompressError):
    """A checkpoint cannot be read, trusted or matched to its architecture."""


class ModelSpecError(TncompressError):
    """An architecture spec cannot be resolved to a model."""


class GateError(TncompressError):
    """A quality bound was not met (a report gate, or a recipe's output-error bound): exit 3."""

    exit_code = EXIT_GATE
