"""Exit codes as documented (0 success, 1 internal error, 2 user error, 3 gate failed), and --debug."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from tncompress.models import ModelSpec, build_model

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tncompress.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd)


def test_user_error_without_and_with_debug(tmp_path):
    args = ["plan", tmp_path / "missing.pt", "--arch", "lenet5", "-r", "configs/mlp-mnist-tt.yaml"]
    plain = _run(*args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert [line for line in plain.stderr.splitlines() if line.strip()] == [f"error: {tmp_path / 'missing.pt'}: no such file"]
    debug = _run("--debug", *args)
    assert debug.returncode == 2  # same code with --debug
    assert "Traceback (most recent call last)" in debug.stderr and "CheckpointError" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_internal_error_is_exit_1_with_one_line(cli, monkeypatch, tmp_path):
    import tncompress.recipe

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(tncompress.recipe, "load_recipe", broken)
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), tmp_path / "l5.pt")
    res = cli("plan", tmp_path / "l5.pt", "--arch", "lenet5", "-r", "configs/mlp-mnist-tt.yaml")
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error: ZeroDivisionError: a bug" in lines[0] and "--debug" in lines[0]


def test_success_is_exit_0(tmp_path):
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), tmp_path / "l5.pt")
    assert _run("report", tmp_path / "l5.pt", "--arch", "lenet5", "--json").returncode == 0
