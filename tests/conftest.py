"""Shared fixtures: small models saved in the formats users have, and a CLI runner."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

os.environ["COLUMNS"] = "200"  # rich tables: wide enough that layer names are not folded

from tncompress.cli import app  # noqa: E402

torch.set_num_threads(2)


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli():
    """Run the CLI in-process; returns exit code, stdout and stderr."""
    runner = CliRunner()

    def run(*args: str) -> CliResult:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No downloads, and a data root with nothing in it: tests write the files they read."""
    monkeypatch.setenv("TNCOMPRESS_NO_DOWNLOAD", "1")
    monkeypatch.setenv("TNCOMPRESS_DATA", str(tmp_path / "no-data-here"))


def saved_state_dict(tmp_path: Path, arch: str, name: str) -> Path:
    """A freshly built (seeded) reference model's state dict, saved as a user's file."""
    from tncompress.models import ModelSpec, build_model

    torch.manual_seed(0)
    path = tmp_path / name
    torch.save(build_model(ModelSpec(arch)).state_dict(), path)
    return path


def assert_user_error(result: CliResult, *needles: str) -> None:
    """A user mistake: exit 2, one `error:` line that mentions each needle, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert result.stderr.startswith("error:"), repr(result.stderr)  # nothing (not even a blank line) before it
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


class SmallNet(nn.Module):
    """A small conv + linear net exercising the things recipes select."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, (3, 1), padding=(1, 0), bias=False), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODEL_DEF = textwrap.dedent('''
    import torch
    from torch import nn

    class UserNet(nn.Module):
        def __init__(self, width=32):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width * 4 * 4, 64)
            self.out = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
            return self.out(torch.relu(self.fc(x)))

    def make(width=32):
        return UserNet(width)
''')


@pytest.fixture
def model_def(tmp_path: Path) -> Path:
    """A user's model file, importable with --import."""
    path = tmp_path / "user_models.py"
    path.write_text(MODEL_DEF)
    return path


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: one thread avoids OpenMP spin-wait stalls on small, busy CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Conv geometries with per-axis asymmetric stride / padding / dilation, string padding and padding modes.
CONV_GEOMETRIES = [
    pytest.param((3, 3), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), id="asym"),
    pytest.param((2, 3), dict(padding="same", dilation=(1, 2)), id="same-even"),
    pytest.param((3, 2), dict(stride=(1, 2), padding="valid"), id="valid"),
    pytest.param((3, 3), dict(stride=(2, 1), padding=(1, 2), padding_mode="reflect"), id="reflect"),
    pytest.param((3, 2), dict(padding=(2, 1), dilation=(2, 1), padding_mode="circular"), id="circular"),
    # 1×1 kernels: stride and padding move into the first 1×1 conv (see split_geometry)
    pytest.param((1, 1), dict(stride=2, padding=1, padding_mode="reflect"), id="1x1-stride-pad"),
]


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    """A library error that is one TncompressError line mentioning each needle; returns the message."""
    from tncompress.errors import TncompressError

    message = str(exc.value)
    assert isinstance(exc.value, TncompressError)
    assert "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message
