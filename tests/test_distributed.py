"""Two real processes under torchrun (gloo on the CPU): the same weights as one process with the
same global batches, one writer, a killed run that resumes (also with another number of processes),
and a user error that ends every rank with its line instead of a hang."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built"),
              pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to kill a run")]

EPOCHS = 3
RUN = ["train", "--arch", "mlp-1024", "--dataset", "synthetic", "--limit-train", "1536", "--limit-test", "256",
       "--lr", "0.05", "--warmup", "0.5", "--device", "cpu", "--seed", "3"]
TIMEOUT = 240


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TNCOMPRESS_NO_DOWNLOAD": "1", "TNCOMPRESS_DATA": str(tmp / "no-data"), "OMP_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore"})
    return env


def _command(nproc: int, batch: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tncompress", *RUN, "--batch-size", str(batch), "--epochs", str(EPOCHS), "-o", str(out), *extra]


def _launch(nproc: int, batch: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(nproc, batch, out, *extra), cwd=out.parent, env=_env(out.parent),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)


def _kill_everything_running(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker``: torchrun starts its workers in
    their own sessions, so killing the launcher's process group would leave them running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in command and int(entry.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """An uninterrupted run of 3 epochs on 2 processes with per-process batch 32."""
    out = tmp_path_factory.mktemp("ddp2") / "m.pt"
    res = _launch(2, 32, out)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_two_processes_equal_one_with_the_global_batch(two_process_run, tmp_path):
    one = tmp_path / "m.pt"
    res = _launch(1, 64, one)
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_same_weights(two_process_run, one)
    two_meta = torch.load(two_process_run, weights_only=True)["metadata"]["training"]
    one_meta = torch.load(one, weights_only=True)["metadata"]["training"]
    assert two_meta["processes"] == 2 and two_meta["global_batch_size"] == 64 and one_meta["processes"] == 1
    # The evaluation is summed over both ranks' halves of the test set: the whole set's metrics.
    for key in ("test_top1", "test_top5", "test_loss", "train_loss", "train_top1"):
        assert two_meta["history"][-1][key] == pytest.approx(one_meta["history"][-1][key], rel=1e-5), key


def test_one_writer_and_one_progress_stream(two_process_run):
    files = sorted(p.name for p in two_process_run.parent.iterdir())
    assert files == ["m.pt", "m.pt.state.pt"]  # no per-rank copies, no temporary files left
    state = torch.load(two_process_run.parent / "m.pt.state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == EPOCHS


def test_killed_distributed_run_resumes_with_any_number_of_processes(two_process_run, tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    out = killed / "m.pt"
    state = killed / "m.pt.state.pt"
    proc = subprocess.Popen(_command(2, 32, out), cwd=killed, env=_env(killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill_everything_running(str(out))  # the launcher and both ranks (in their own sessions), during epoch 2
    finally:
        proc.wait(timeout=30)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] < EPOCHS, "the run finished before it could be killed"

    again = tmp_path / "again"
    shutil.copytree(killed, again)
    res = _launch(2, 32, out, "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"epoch {saved['epoch']}:" not in res.stdout and f"epoch {EPOCHS}:" in res.stdout, res.stdout
    _assert_same_weights(two_process_run, out)

    # The same state resumed by one process with the same global batch: the same weights.
    res = _launch(1, 64, again / "m.pt", "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_same_weights(two_process_run, again / "m.pt")


def test_a_user_error_ends_every_rank_with_its_line(tmp_path):
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "tncompress", "train", "--arch", "mlp-1024", "--dataset", f"folder:{tmp_path / 'none'}",
                          "--device", "cpu", "-o", str(tmp_path / "m.pt")], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode != 0
    assert time.monotonic() - started < TIMEOUT
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines and all(line.startswith("error: rank ") and "no such folder" in line for line in lines)
    assert not (tmp_path / "m.pt").exists()


def test_python_dash_m_is_the_command():
    res = subprocess.run([sys.executable, "-m", "tncompress", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "tncompress" in res.stdout.lower()


def test_shards_split_each_epoch_into_blocks_of_the_global_batch():
    """Batch k of the ranks together is block k of one shared order; evaluation sees every item once."""
    from torch.utils.data import TensorDataset

    from tncompress.data import make_loader
    from tncompress.distributed import Ranks

    data = TensorDataset(torch.arange(50).float().view(-1, 1), torch.arange(50))
    one = Ranks(0, 1, 0, "gloo")
    for epoch in (1, 2):
        whole = [y.tolist() for _, y in make_loader(data, 8, shuffle=True, seed=4, epoch=epoch, ranks=one)]
        shards = [[y.tolist() for _, y in make_loader(data, 4, shuffle=True, seed=4, epoch=epoch,
                                                      ranks=Ranks(r, 2, r, "gloo"))] for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == len(whole)  # same number of steps on every rank
        for k, block in enumerate(whole):
            assert sorted(shards[0][k] + shards[1][k]) == sorted(block)
    orders = [torch.cat([y for _, y in make_loader(data, 8, shuffle=True, seed=4, epoch=e, ranks=one)]).tolist()
              for e in (1, 2)]
    assert orders[0] != orders[1]  # set_epoch: a new order each epoch
    tests = [torch.cat([y for _, y in make_loader(data, 7, shuffle=False, ranks=Ranks(r, 3, r, "gloo"))]).tolist()
             for r in range(3)]
    assert sorted(sum(tests, [])) == list(range(50))
