"""What every command shares: the typer app, the consoles, error handling (one line and an exit
code for a user error) and loading the model a command was given."""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperGroup

from tncompress._version import __version__
from tncompress.errors import EXIT_INTERNAL, TncompressError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = ("Exit codes: 0 success, 1 internal error (a bug: rerun with --debug), 2 user error (bad input, "
                   "recipe, option or path), 3 a quality gate failed (report --gate, or a recipe's error bound).")
# Root flags that are also accepted after the command name (``tncompress decompose … --debug``).
ROOT_FLAGS = ("--debug", "--verbose", "-v")


def root_flags_first(group: Any, args: list[str]) -> list[str]:
    """``args`` with the root flags that follow the command name moved before it, so that
    ``--debug``/``--verbose`` work in either position. Stops at ``--``; skips the values of the
    command's own options (``--note -v`` keeps its value) and flags the command defines itself."""
    commands = getattr(group, "commands", {})
    start = next((i for i, arg in enumerate(args) if arg in commands), None)
    if start is None:
        return list(args)
    command = commands[args[start]]
    own: set[str] = set()
    takes_value: set[str] = set()
    for param in command.params:  # typer's own click: options are known by their type name
        if getattr(param, "param_type_name", None) == "option":
            names = set(param.opts) | set(param.secondary_opts)
            own |= names
            if not param.is_flag and not param.count:
                takes_value |= names
    moved: list[str] = []
    rest: list[str] = []
    i = start + 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in ROOT_FLAGS and arg not in own:
            moved.append(arg)
        else:
            rest.append(arg)
            if arg in takes_value and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        i += 1
    return [*args[:start], *moved, args[start], *rest]


class RootGroup(TyperGroup):
    """The ``tncompress`` group: root flags may also follow the command name."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, root_flags_first(self, args))


app = typer.Typer(
    name="tncompress",
    cls=RootGroup,
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
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs (also after the command name)."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Log what the library does (also after the command name)."),
) -> None:
    """Make trained PyTorch models smaller and faster with tensor decompositions."""
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)],
                        force=True)


def _fail(message: str, code: int) -> None:
    """``error: <message>`` on stderr and exit ``code``; the message is printed as it is (escaped:
    paths like ``model[v2].pt`` and hints like ``tncompress[export]`` are not rich markup)."""
    where = _launched_rank()
    prefix = f"rank {where}: " if where is not None else ""  # under torchrun: say which process failed
    err_console.print(f"[bold red]error:[/] {escape(prefix + message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _launched_rank() -> str | None:
    """``RANK`` of a process that torchrun started (with ``WORLD_SIZE`` > 1), else None."""
    if os.environ.get("RANK") is None or os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    return os.environ["RANK"]


def is_main_process() -> bool:
    """False on the ranks of a torchrun job other than 0: they train but do not render."""
    return _launched_rank() in (None, "0")


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

def model_spec(arch: str | None, arch_args: list[str] | None, imports: list[str] | None, input_shape: str | None):
    from tncompress.measure import parse_shape
    from tncompress.models import ModelSpec, parse_arch_args

    if arch is None:
        if arch_args:
            raise TncompressError("--arch-arg needs --arch")
        return None
    return ModelSpec(arch=arch, kwargs=parse_arch_args(arch_args or []), imports=[str(Path(p)) for p in imports or []],
                     input_shape=parse_shape(input_shape) if input_shape else None)


def load_input(path: Path, arch, arch_args, imports, trust_pickle, input_shape):
    from tncompress.checkpoint import load_model

    spec = model_spec(arch, arch_args, imports, input_shape)
    return load_model(path, spec, trust_pickle=trust_pickle, imports=[str(p) for p in imports or []])


def input_shape_of(loaded, input_shape: str | None, dataset: str | None = None) -> list[int]:
    """The shape to run the model at: given, recorded, the dataset's, the architecture's, or the
    first layer's (:func:`tncompress.input_shape.resolve_input_shape`), checked by one forward."""
    from tncompress.input_shape import resolve_input_shape
    from tncompress.measure import parse_shape

    given = parse_shape(input_shape) if input_shape else None
    return resolve_input_shape(loaded.model, loaded.spec, given, dataset).shape


def torch_seed(seed: int) -> None:
    """Seed model initialisation (the training loop re-seeds per epoch itself)."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """A comma-separated list of numbers (``--mean 0.485,0.456,0.406``), or a one-line error."""
    if text is None or str(text).strip() == "":
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise TncompressError(f"{flag} expects comma-separated numbers (one per channel), got {text!r}") from None
    return values


def calibration_input(loaded: Any, source: str | None, size: int, data_dir: str | None,
                      mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> tuple[Any, str | None]:
    """(images, description) of ``--calibration-data``, or (None, None) for the recipe's noise batch."""
    if source is None:
        return None, None
    from tncompress.calibration import calibration_images
    from tncompress.finetune import DataOptions

    calib = calibration_images(loaded, DataOptions(source, data_dir, mean=mean, std=std), size)
    return calib.images, calib.description
