"""Several processes, one training run: the process group that ``torchrun`` sets up, seen from the loop.

``torchrun --nproc-per-node=N -m tncompress finetune …`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment. :func:`join` turns that
into an initialised process group (NCCL with one GPU per process, ``cuda:LOCAL_RANK``; gloo on the
CPU) and a :class:`Ranks` value that the loop consults: who writes files (rank 0), how to shard
data (:func:`shard_sampler`), how to sum a metric over ranks (:func:`all_sum`). Without torchrun's
variables nothing here does anything and one process trains alone.

Semantics (docs/distributed.md): ``--batch-size`` is per process, so the global batch is
N × batch-size; the learning rate is used as given (scale it yourself if you keep the per-process
batch and add processes).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from tncompress.errors import TncompressError

log = logging.getLogger(__name__)

_TIMEOUT_ENV = "TNCOMPRESS_DIST_TIMEOUT"  # seconds a collective may wait (default 30 min)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its machine,
    and the backend (None when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True inside an initialised process group (even of one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, states and reports, and renders progress."""
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}" if self.enabled else "single process"


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current() -> Ranks:
    """The process group this process belongs to, or :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise TncompressError(f"the launcher set {name}={value!r}, which is not a whole number") from None


def _timeout() -> timedelta:
    text = os.environ.get(_TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        raise TncompressError(f"{_TIMEOUT_ENV} must be a number of seconds (got {text!r})") from None
    if seconds <= 0:
        raise TncompressError(f"{_TIMEOUT_ENV} must be > 0 (got {text!r})")
    return timedelta(seconds=seconds)


def join(device: str) -> tuple[Ranks, bool]:
    """Join torchrun's process group for a run on ``device`` (``auto``/``cpu``/``cuda``).

    Returns ``(ranks, created)``: ``created`` is True when this call initialised the group (the
    caller then ends it with :func:`leave`). Not launched by torchrun → ``(SINGLE, False)``. An
    already initialised group (a library user's own) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return current(), False
    if not launched_by_torchrun():
        return SINGLE, False
    if not dist.is_available():
        raise TncompressError("this torch is built without torch.distributed; run one process")
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    text = str(device).strip().lower()
    cuda = text.startswith("cuda") or (text == "auto" and torch.cuda.is_available())
    if cuda:
        if ":" in text:
            raise TncompressError(f"--device {text} cannot be used under torchrun: each process uses "
                                  "cuda:LOCAL_RANK; pass --device cuda (or auto)")
        if not torch.cuda.is_available():
            raise TncompressError("--device cuda: CUDA is not available; use --device cpu (gloo backend)")
        count = torch.cuda.device_count()
        if local >= count:
            raise TncompressError(f"LOCAL_RANK {local} has no GPU: this machine has {count}; start at most "
                                  f"{count} processes per node (--nproc-per-node)")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=_timeout())
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TncompressError(f"cannot join the distributed run ({backend}, rank {rank} of {world}): {first}") from exc
    ranks = Ranks(rank, world, local, backend)
    log.info("joined the process group: %s, backend %s, local rank %d", ranks.label(), backend, local)
    return ranks, True


def leave(created: bool) -> None:
    """End the process group if :func:`join` created it."""
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run, else ``device``."""
    if ranks.enabled and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file)."""
    if ranks.enabled:
        dist.barrier()


def all_sum(ranks: Ranks, values: Sequence[torch.Tensor | float | int], device: torch.device) -> list[float]:
    """The sums over all ranks of a few scalars (float64), as Python floats."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if ranks.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


class StridedSampler(Sampler[int]):
    """Indices ``rank, rank + world, …`` of a dataset in order, without padding: each image is
    evaluated by exactly one rank, so metrics summed over ranks count every image once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_sampler(length: int, ranks: Ranks, *, shuffle: bool, seed: int, epoch: int
                  ) -> Sampler[int]:
    """This rank's share of a dataset of ``length`` items for one epoch.

    Training (``shuffle``): a :class:`~torch.utils.data.DistributedSampler` seeded with ``seed``
    and ``set_epoch(epoch)``, so every epoch has a new order shared by all ranks, padded so each
    rank gets the same number of batches (DDP needs that). Batch k of the N ranks together is
    the k-th block of N × batch indices of that order, the same as one process with an N times
    larger batch. Evaluation: :class:`StridedSampler` (no padding, no duplicates).
    """
    if not shuffle:
        return StridedSampler(length, ranks.rank, ranks.world_size)
    sampler: DistributedSampler = DistributedSampler(range(length), num_replicas=ranks.world_size,  # type: ignore[arg-type]
                                                     rank=ranks.rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return sampler
