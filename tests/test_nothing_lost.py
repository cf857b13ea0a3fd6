"""Nothing is lost or half-written: real processes killed with SIGKILL while writing leave the previous
file intact and loadable; their temporaries are cleaned up by the next write; decomposing never
changes its input file. (A fine-tune killed with SIGKILL and resumed is in test_train.py.)"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tncompress.checkpoint import atomic_save, atomic_write, remove_stale_temporaries
from tncompress.models import ModelSpec, build_model

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def _temporaries(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp"))


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"child exited early with {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "child never reached the write"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_PAUSED_WRITER = """
import sys, time
from pathlib import Path
import torch
from tncompress.checkpoint import atomic_write

def write(tmp: Path) -> None:
    # the real bytes of a new checkpoint, half of them written, then the process hangs mid-write
    import io
    buffer = io.BytesIO()
    torch.save({{"generation": 2, "w": torch.full((1 << 20,), 2.0)}}, buffer)
    data = buffer.getvalue()
    with open(tmp, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
    Path({marker!r}).write_text("half written")
    time.sleep(600)

atomic_write({path!r}, write)
"""


def test_kill_mid_write_keeps_the_previous_file(tmp_path):
    """Deterministic: the child has written half of the new checkpoint when it is SIGKILLed."""
    path, marker = tmp_path / "model.pt", tmp_path / "marker"
    atomic_save({"generation": 1, "w": torch.full((1 << 20,), 1.0)}, path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER.format(path=str(path), marker=str(marker))],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, marker.exists)

    assert path.read_bytes() == before  # byte for byte
    loaded = torch.load(path, weights_only=True)
    assert loaded["generation"] == 1 and torch.equal(loaded["w"], torch.full((1 << 20,), 1.0))
    leftovers = _temporaries(tmp_path, "model.pt")
    assert len(leftovers) == 1 and str(proc.pid) in leftovers[0].name  # the killed writer's, half written
    assert leftovers[0].stat().st_size > 0

    atomic_save({"generation": 3, "w": torch.zeros(2)}, path)  # the next write cleans up after it
    assert _temporaries(tmp_path, "model.pt") == []
    assert torch.load(path, weights_only=True)["generation"] == 3


_LOOPING_SAVER = """
import sys
import torch
from tncompress.checkpoint import atomic_save
torch.set_num_threads(1)
big = torch.empty(24 << 20)  # 96 MiB: each save takes a while
for generation in range(2, 10_000):
    big.fill_(float(generation))
    atomic_save({{"generation": generation, "w": big}}, {path!r})
"""


def test_kill_during_real_torch_save_of_a_large_checkpoint(tmp_path):
    """Not staged: a child saves a 96 MiB checkpoint over and over to the same path and is SIGKILLed
    at the moment a temporary is being written. The file is always one complete generation."""
    path = tmp_path / "big.pt"
    atomic_save({"generation": 1, "w": torch.ones(4)}, path)
    proc = subprocess.Popen([sys.executable, "-c", _LOOPING_SAVER.format(path=str(path))], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen_growing = {"n": 0}

    def mid_write() -> bool:
        temps = _temporaries(tmp_path, "big.pt")
        try:
            size = temps[0].stat().st_size if temps else 0
        except FileNotFoundError:  # renamed between glob and stat
            return False
        if 0 < size < 50 << 20:
            seen_growing["n"] += 1
        return seen_growing["n"] >= 2 and path.stat().st_size > 90 << 20  # a big generation is already in place

    _kill_when(proc, mid_write, timeout=120)
    loaded = torch.load(path, weights_only=True)
    generation = loaded["generation"]
    assert generation >= 2
    assert loaded["w"].numel() == 24 << 20 and bool((loaded["w"] == float(generation)).all())
    leftovers = _temporaries(tmp_path, "big.pt")
    assert len(leftovers) <= 1  # the killed write's temporary (none if killed between two saves)
    assert remove_stale_temporaries(path) == leftovers
    assert _temporaries(tmp_path, "big.pt") == []


def test_stale_temporaries_of_live_writers_are_left_alone(tmp_path):
    path = tmp_path / "out.pt"
    live = tmp_path / f".out.pt.{os.getppid()}.abc.tmp"  # our parent process is alive
    live.write_bytes(b"in progress")
    dead_pid = _dead_pid()
    dead = tmp_path / f".out.pt.{dead_pid}.xyz.tmp"
    dead.write_bytes(b"abandoned")
    other = tmp_path / f".other.pt.{dead_pid}.xyz.tmp"
    other.write_bytes(b"another file's")
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert live.exists() and other.exists() and not dead.exists()
    assert path.read_bytes() == b"new"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_decompose_never_modifies_its_input(tmp_path, cli, write_recipe):
    torch.manual_seed(0)
    source = tmp_path / "l5.pt"
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), source)
    digest, mtime = hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_mtime_ns
    recipe = write_recipe("version: 1\nlayers:\n  - {name: classifier.1, method: tt, rank: 4}\n"
                          "  - {name: features.3, method: tucker2, rank: [4, 8]}\n")
    out = tmp_path / "l5-c.pt"
    assert cli("decompose", source, "--arch", "lenet5", "-r", recipe, "-o", out).exit_code == 0
    # a compressed checkpoint as input, decomposed again, stays untouched too
    digest_c = hashlib.sha256(out.read_bytes()).hexdigest()
    recipe2 = write_recipe("version: 1\nlayers:\n  - {name: classifier.3, method: lowrank, rank: 4}\n", "r2.yaml")
    assert cli("decompose", out, "-r", recipe2, "-o", tmp_path / "l5-cc.pt").exit_code == 0
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest and source.stat().st_mtime_ns == mtime
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest_c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l5-c.pt", "l5-cc.pt", "l5.pt", "r2.yaml", "recipe.yaml"]


def test_failed_decompose_leaves_an_existing_output_untouched(tmp_path, cli, write_recipe):
    """An error bound that fails (exit 3) writes nothing: the previous output stays as it was."""
    torch.manual_seed(0)
    source = tmp_path / "l5.pt"
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), source)
    out = tmp_path / "out.pt"
    out.write_bytes(b"previous result")
    recipe = write_recipe("version: 1\ncalibration: {max_output_error: 0.01}\n"
                          "layers:\n  - {name: classifier.1, method: lowrank, rank: 1}\n")
    result = cli("decompose", source, "--arch", "lenet5", "-r", recipe, "-o", out)
    assert result.exit_code == 3, result.output
    assert "classifier.1" in result.stderr and "max_output_error 0.01" in result.stderr
    assert out.read_bytes() == b"previous result"
    assert _temporaries(tmp_path, "out.pt") == []
