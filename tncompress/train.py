"""Fine-tune (or train) a model: the loop behind ``tncompress finetune``, as a plain library call.

One call, :func:`train`, runs SGD or AdamW with a per-step linear warm-up and cosine (or constant)
schedule, optional mixed precision on CUDA, optional knowledge distillation from a teacher, an
evaluation after every epoch, and an atomic resume state written at each epoch end. Nothing is
printed: progress goes to an ``on_event(event, payload)`` callback that the CLI renders.

Determinism: every RNG (torch, CUDA, ``random``, numpy) is re-seeded at the start of each epoch from
``(seed, epoch)``, so an epoch's randomness (shuffling, dropout, augmentation) never depends on what
happened before it. A run killed during epoch k and resumed from the state of epoch k-1 therefore
ends, on the CPU, with exactly the weights and metrics of an uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tncompress import distributed
from tncompress._version import __version__
from tncompress.checkpoint import atomic_save, check_output_path, load_state_dict_into
from tncompress.distributed import SINGLE, Ranks
from tncompress.errors import CheckpointError, TncompressError
from tncompress.outputs import output_tensor

log = logging.getLogger(__name__)

STATE_FORMAT = "tncompress-train-state"
STATE_FORMAT_VERSION = 1

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LAYOUTS = ("auto", "channels-last", "contiguous")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Settings that shape the training trajectory: a resume must use the same values (epochs may grow).
_RESUME_FIXED = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "nesterov", "warmup_epochs",
                 "schedule", "min_lr_ratio", "label_smoothing", "seed", "kd_temperature", "kd_weight",
                 "grad_clip")

Event = Callable[[str, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------------
# configuration


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Every setting of a training run (validated on construction; errors are one line naming the flag).

    ``warmup_epochs`` may be fractional: the warm-up is linear per optimizer step over
    ``round(warmup_epochs * steps_per_epoch)`` steps. ``kd_weight`` is the distillation weight alpha
    (0 disables distillation). ``amp``: ``auto`` = bf16 on a CUDA GPU that supports it, else fp16 with
    a GradScaler; off on the CPU (``bf16`` on the CPU is allowed when asked for explicitly).
    ``memory_format``: ``auto`` trains models with 2-D convolutions in channels-last layout (measured
    faster for training on the CPU, docs/train-speed.md), ``channels-last`` or ``contiguous`` force one.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    kd_temperature: float = 4.0
    kd_weight: float = 0.0
    grad_clip: float | None = None
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        self.memory_format = str(self.memory_format).lower()
        self.optimizer = str(self.optimizer).lower()
        self.schedule = str(self.schedule).lower()
        self.amp = str(self.amp).lower()
        self.device = str(self.device).lower()
        self.validate()

    def validate(self) -> None:
        """Raise :class:`TncompressError` with one line for the first bad value."""
        def number(name: str, *, integer: bool = False) -> float:
            value = getattr(self, name)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                kind = "a whole number" if integer else "a number"
                raise TncompressError(f"{_flag(name)} must be {kind} (got {value!r})")
            return value

        def check(condition: bool, message: str) -> None:
            if not condition:
                raise TncompressError(message)

        check(number("epochs", integer=True) >= 1, f"--epochs must be ≥ 1 (got {self.epochs})")
        check(number("batch_size", integer=True) >= 1, f"--batch-size must be ≥ 1 (got {self.batch_size})")
        check(self.optimizer in OPTIMIZERS,
              f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        check(number("lr") > 0, f"--lr must be > 0 (got {self.lr})")
        check(0 <= number("momentum") < 1, f"--momentum must be in [0, 1) (got {self.momentum})")
        check(number("weight_decay") >= 0, f"--weight-decay must be ≥ 0 (got {self.weight_decay})")
        check(isinstance(self.nesterov, bool), f"--nesterov must be true or false (got {self.nesterov!r})")
        if self.nesterov:
            check(self.optimizer == "sgd", "--nesterov applies to --optimizer sgd only")
            check(self.momentum > 0, "--nesterov needs --momentum > 0")
        check(number("warmup_epochs") >= 0, f"--warmup-epochs must be ≥ 0 (got {self.warmup_epochs})")
        check(self.warmup_epochs <= self.epochs,
              f"--warmup-epochs ({self.warmup_epochs}) must not exceed --epochs ({self.epochs})")
        check(self.schedule in SCHEDULES,
              f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        check(0 <= number("min_lr_ratio") <= 1, f"--min-lr-ratio must be in [0, 1] (got {self.min_lr_ratio})")
        check(0 <= number("label_smoothing") < 1,
              f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        check(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)} (got {self.amp!r})")
        check(bool(_DEVICE_RE.match(self.device)),
              f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        check(number("seed", integer=True) >= 0, f"--seed must be ≥ 0 (got {self.seed})")
        check(number("kd_temperature") > 0, f"--kd-temperature must be > 0 (got {self.kd_temperature})")
        check(0 <= number("kd_weight") <= 1, f"--kd-weight must be in [0, 1] (got {self.kd_weight})")
        if self.grad_clip is not None:
            check(number("grad_clip") > 0, f"--grad-clip must be > 0 (got {self.grad_clip})")
        check(self.memory_format in LAYOUTS,
              f"memory_format must be one of {', '.join(LAYOUTS)} (got {self.memory_format!r}; the CLI sets it "
              "with --channels-last or --no-channels-last)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (stored in the resume state and in checkpoint metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from a newer tncompress) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------------
# device, precision, seeding


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU; ``cuda``/``cuda:N`` must exist."""
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if not _DEVICE_RE.match(text):
        raise TncompressError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU was found"
        raise TncompressError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise TncompressError(f"--device {text}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                              f"GPU{'' if count == 1 else 's'} (cuda:0…cuda:{count - 1})")
    return device


def resolve_amp(amp: str, device: torch.device, model_dtype: torch.dtype = torch.float32
                ) -> tuple[torch.dtype | None, bool, str]:
    """Mixed-precision choice → ``(autocast dtype or None, use GradScaler, name)``.

    ``auto``: bf16 on a CUDA GPU that supports it, fp16 + GradScaler on older GPUs, off on the CPU
    and for models that are not float32 (their dtype is kept as the user chose it).
    """
    amp = str(amp).lower()
    if amp not in AMP_MODES:
        raise TncompressError(f"--amp must be one of {', '.join(AMP_MODES)} (got {amp!r})")
    cuda = device.type == "cuda"
    if amp == "off" or (amp == "auto" and (not cuda or model_dtype != torch.float32)):
        return None, False, "off"
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise TncompressError("--amp bf16: this GPU does not support bfloat16; use --amp fp16 or off")
        return torch.bfloat16, False, "bf16"
    if not cuda:
        raise TncompressError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or off")
    return torch.float16, True, "fp16"


def uses_channels_last(memory_format: str, model: nn.Module, example: torch.Tensor | None = None) -> bool:
    """Whether to train ``model`` in channels-last layout: ``auto`` → if it has a 2-D convolution and
    its forward runs on a channels-last ``example`` (a user's ``x.view(-1, 320)`` after a conv does
    not: NHWC activations are not viewable so, and auto then trains in the default layout)."""
    if memory_format == "channels-last":
        return True
    if memory_format == "contiguous":
        return False
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    if example is None or example.dim() != 4:
        return True
    return _runs_channels_last(model, example)


def _runs_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``model``'s forward accepts NHWC activations (tried on a copy in eval mode)."""
    import copy

    probe = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    first = next(probe.parameters(), None)
    x = example[:1].to(first.device if first is not None else "cpu")
    if first is not None and x.is_floating_point():
        x = x.to(first.dtype)
    try:
        with torch.no_grad():
            probe(x.contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # the user's forward needs the default layout
        log.info("training in the default layout: the model's forward fails on channels-last tensors (%s: %s)",
                 type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    return True


def channels_last_used(model: nn.Module) -> bool:
    """Whether any 4-D parameter of ``model`` is stored channels-last (and not also contiguous)."""
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, epoch)`` (stable across runs, platforms and versions);
    ranks other than 0 of a distributed run get their own stream (augmentation must differ across
    ranks), rank 0 the single-process one."""
    text = f"tncompress:{seed}:{epoch}" + (f":rank{rank}" if rank else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and numpy's global RNG."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state(cuda: bool) -> dict[str, Any]:
    """All global RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# losses, schedule, optimizer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch, in float32.

    The T² factor keeps the gradient scale comparable to cross-entropy (Hinton et al. 2015).
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so the first step is
    not wasted at lr 0). Then ``constant`` → 1, or ``cosine`` → ``m + (1 − m)·½(1 + cos(π·p))`` with
    ``p = (step − warmup_steps) / (total_steps − warmup_steps)`` and ``m = min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(config: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps: ``round(warmup_epochs · steps_per_epoch)``, at least 1 if asked."""
    if config.warmup_epochs <= 0:
        return 0
    total = config.epochs * steps_per_epoch
    return min(total, max(1, round(config.warmup_epochs * steps_per_epoch)))


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps_for(config, steps_per_epoch)

    def factor(step: int) -> float:  # a plain function: LambdaLR then keeps it out of its state_dict
        return lr_factor(step, total_steps=total, warmup_steps=warmup, schedule=config.schedule,
                         min_lr_ratio=config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into ``decay`` (matrices, conv kernels, TT cores…) and ``no_decay``
    (1-D and scalar parameters: biases, norm scales and shifts, trainable scalars); empty groups are
    dropped."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW, with no weight decay on 1-D parameters."""
    groups = parameter_groups(model, config.weight_decay)
    if not groups:
        raise TncompressError("the model has no trainable parameters (all have requires_grad=False)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr)


# --------------------------------------------------------------------------------------------------
# evaluation


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        return item[0], item[1]
    raise TncompressError(f"data loaders must yield (inputs, labels) pairs, got {type(item).__name__}")


def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | str | None = None, *,
             amp: str = "off", ranks: Ranks = SINGLE, channels_last: bool = False) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy and throughput of ``model`` on ``loader``.

    With the ``ranks`` of a distributed run, ``loader`` is this rank's shard and the counts are
    summed over all ranks (every rank returns the metrics of the whole evaluation set).

    Runs without gradients in eval mode and restores every module's previous training flag. Top-5 is
    top-min(5, C) for a C-class model (100 % when C ≤ 5); ``num_classes`` is returned so callers can
    hide it. Returns ``top1, top5, loss, images, seconds, images_per_second, num_classes``.
    """
    device = _model_device(model) if device is None else (
        device if isinstance(device, torch.device) else resolve_device(device))
    dtype = _model_dtype(model)
    amp_dtype, _, _ = resolve_amp(amp, device, dtype)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images, num_classes = 0, 0
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for item in loader:
                x, y = _batch(item)
                x, y = _to(x, device, dtype), y.to(device, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    logits = output_tensor(model(x), "the model")
                logits = logits.float()
                num_classes = logits.shape[1]
                k = min(5, num_classes)
                top = logits.topk(k, dim=1).indices
                hits = top.eq(y.view(-1, 1))
                correct1 += hits[:, 0].sum()
                correct5 += hits.any(dim=1).sum()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                images += y.shape[0]
        _sync(device)
    finally:
        for module, mode in modes.items():
            module.training = mode
    if ranks.enabled:
        sums = distributed.all_sum(ranks, [correct1.item(), correct5.item(), loss_sum.item(), images,
                                           num_classes if images else 0, 1 if images else 0], device)
        correct1, correct5 = torch.tensor(int(sums[0])), torch.tensor(int(sums[1]))
        loss_sum, images = torch.tensor(sums[2]), int(sums[3])
        num_classes = int(round(sums[4] / sums[5])) if sums[5] else 0
    seconds = time.perf_counter() - start
    if images == 0:
        raise TncompressError("the evaluation data is empty")
    return {
        "top1": 100.0 * correct1.item() / images,
        "top5": 100.0 * correct5.item() / images,
        "loss": loss_sum.item() / images,
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else float("inf"),
        "num_classes": int(num_classes),
    }


# --------------------------------------------------------------------------------------------------
# resume state


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a resume state written by :func:`train` (``weights_only=True``), with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise TncompressError(f"cannot resume: {path} does not exist (no epoch of that run was completed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TncompressError(f"cannot resume: {path} is not a readable training state ({first})") from exc
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise TncompressError(f"cannot resume: {path} is not a tncompress training state")
    if not isinstance(state.get("format_version"), int) or state["format_version"] > STATE_FORMAT_VERSION:
        raise TncompressError(f"cannot resume: {path} was written by a newer tncompress "
                              f"(state format {state.get('format_version')!r}); upgrade tncompress")
    return dict(state)


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig, path: Path, world_size: int = 1) -> None:
    old = TrainConfig.from_dict(saved["config"])
    fixed: tuple[str, ...] = _RESUME_FIXED
    saved_world = int(saved.get("world_size", 1))
    if saved_world != world_size:  # the global batch changes anyway: the per-process batch may too
        fixed = tuple(k for k in fixed if k != "batch_size")
        log.warning("resuming a run of %d process(es) with %d: the global batch is now %d × %d (was %d × %d)",
                    saved_world, world_size, world_size, config.batch_size, saved_world, old.batch_size)
    diffs = [f"{_flag(k)} {getattr(old, k)!r} → {getattr(config, k)!r}"
             for k in fixed if getattr(old, k) != getattr(config, k)]
    if diffs:
        raise TncompressError(f"cannot resume {path}: settings differ from the saved run ({'; '.join(diffs)}); "
                              "use the same settings (only --epochs may grow)")
    if config.epochs < old.epochs:
        raise TncompressError(f"cannot resume {path}: it was started with --epochs {old.epochs}; "
                              f"--epochs {config.epochs} may not be smaller")


# --------------------------------------------------------------------------------------------------
# result


@dataclass
class TrainResult:
    """What a run did: per-epoch history, best and final test metrics, device, precision, time."""

    history: list[dict[str, Any]]
    best_top1: float
    best_epoch: int
    final: dict[str, Any]
    device: str
    amp: str
    seconds: float
    epochs: int
    start_epoch: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, Any]:
        """Plain dict (weights_only-safe) for a checkpoint's ``metadata``."""
        return {
            "epochs": int(self.epochs),
            "best_top1": float(self.best_top1),
            "best_epoch": int(self.best_epoch),
            "final": {k: _plain_number(v) for k, v in self.final.items()},
            "history": [{k: _plain_number(v) for k, v in entry.items()} for entry in self.history],
            "device": str(self.device),
            "amp": str(self.amp),
            "seconds": float(self.seconds),
            "resumed_from_epoch": int(self.start_epoch),
            "config": dict(self.config),
        }


def _plain_number(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


# --------------------------------------------------------------------------------------------------
# the loop


def _steps_in(loader: Any) -> int:
    try:
        steps = len(loader)
    except TypeError:
        raise TncompressError("the training data loader must have a length (len(loader)) so the learning-rate "
                              "schedule can be laid out") from None
    if steps <= 0:
        raise TncompressError("the training data is empty")
    return int(steps)


def _non_finite(epoch: int, step: int, steps: int, lr: float, value: float, config: TrainConfig) -> TncompressError:
    kind = "NaN" if math.isnan(value) else "infinite"
    hint = f"try a lower --lr (now {config.lr:g})" + ("" if config.grad_clip else " or --grad-clip 1.0")
    return TncompressError(f"the training loss became {kind} at epoch {epoch}, step {step}/{steps} "
                           f"(lr {lr:.3g}); stopped — {hint}")


@dataclass
class _Run:
    """One training session: the model and what drives it (device, precision, optimizer, schedule),
    and what it has done so far (history, best epoch, time). The named steps below read and update it."""

    model: nn.Module
    config: TrainConfig
    device: torch.device
    dtype: torch.dtype
    amp_dtype: torch.dtype | None
    amp_name: str
    use_scaler: bool
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    teacher: nn.Module | None = None
    teacher_dtype: torch.dtype = torch.float32
    state_path: Path | None = None
    saved: dict[str, Any] | None = None
    on_event: Event | None = None
    report_every: int = 20
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    steps_per_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    prior_seconds: float = 0.0
    start_epoch: int = 0
    ranks: Ranks = SINGLE
    net: nn.Module | None = None  # what the forward pass calls: the model, or its DDP wrapper
    channels_last: bool = False   # inputs (and the model's 4-D weights) in NHWC layout

    @property
    def forward(self) -> nn.Module:
        return self.net if self.net is not None else self.model

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event, payload)

    def result(self, seconds: float) -> TrainResult:
        return TrainResult(history=self.history, best_top1=max(self.best_top1, 0.0), best_epoch=self.best_epoch,
                           final=self.final, device=str(self.device), amp=self.amp_name, seconds=seconds,
                           epochs=len(self.history), start_epoch=self.start_epoch, config=self.config.to_dict())


@dataclass
class _EpochStats:
    """What one pass over the training data measured."""

    loss: float
    top1: float
    images: int
    lr: float
    seconds: float


def _checked_arguments(config: TrainConfig, teacher: nn.Module | None, state_path: str | Path | None,
                       resume: bool, report_every: int) -> tuple[nn.Module | None, Path | None, dict[str, Any] | None]:
    """Refuse contradictory arguments before any work; returns (teacher or None, state path, saved state)."""
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a TrainConfig")
    config.validate()
    if report_every < 1:
        raise TncompressError(f"report_every must be ≥ 1 (got {report_every})")
    if config.kd_weight > 0 and teacher is None:
        raise TncompressError("--kd-weight > 0 needs a teacher model (--teacher)")
    if teacher is not None and config.kd_weight <= 0:
        log.info("a teacher was given but --kd-weight is 0: distillation is off")
        teacher = None
    path = Path(state_path) if state_path is not None else None
    if resume and path is None:
        raise TncompressError("cannot resume: no training-state file was given")
    saved = None
    if path is not None:
        check_output_path(path)  # fail now, not after the first epoch
        if resume:
            saved = load_state(path)
            _check_resumable(saved, config, path, distributed.current().world_size)
    return teacher, path, saved


# ---------------------------------------------------------------- checkpointing


def _restore(run: _Run) -> None:
    """Continue from the saved resume state: weights, optimizer, scaler, history, RNGs."""
    saved, path = run.saved, run.state_path
    if saved is None:
        if path is not None and path.exists():
            log.warning("%s exists and will be overwritten (pass resume=True to continue it)", path)
        return
    load_state_dict_into(run.model, saved["model"], str(path))
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot resume {path}: its optimizer state does not fit this model "
                              f"({exc})") from exc
    if run.use_scaler and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.history = [dict(h) for h in saved["history"]]
    run.best_top1, run.best_epoch = float(saved["best"]["top1"]), int(saved["best"]["epoch"])
    run.final = dict(saved.get("final") or {})
    run.prior_seconds = float(saved.get("seconds", 0.0))
    run.start_epoch = int(saved["epoch"])
    _set_rng_state(saved["rng"])
    if saved.get("device") != str(run.device) or saved.get("amp") != run.amp_name:
        log.warning("resuming on %s with amp %s; the saved run used %s with amp %s — results may differ "
                    "slightly from an uninterrupted run", run.device, run.amp_name, saved.get("device"),
                    saved.get("amp"))
    log.info("resuming %s after epoch %d of %d", path, run.start_epoch, run.config.epochs)


def _save_state(run: _Run, epoch: int, seconds: float) -> None:
    """Write the resume state after ``epoch`` atomically (a crash leaves the previous epoch's); in a
    distributed run rank 0 writes it (the weights are the same on every rank)."""
    if run.state_path is None or not run.ranks.is_main:
        return
    assert run.scheduler is not None
    state = _state(run.model, run.optimizer, run.scheduler, run.scaler, run.config, epoch, run.steps_per_epoch,
                   run.history, run.best_top1, run.best_epoch, run.final, run.device, run.amp_name, seconds)
    state["world_size"] = run.ranks.world_size
    atomic_save(state, run.state_path)


# ---------------------------------------------------------------- schedule


def _lay_out_schedule(run: _Run, epoch: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule, laid out when the first epoch's length is known (restored on resume);
    later epochs must have the same length."""
    if run.scheduler is not None:
        if steps != run.steps_per_epoch:
            raise TncompressError(f"epoch {epoch} has {steps} batches but earlier epochs had {run.steps_per_epoch}; "
                                  "the training data must keep its size")
        return run.scheduler
    saved = run.saved
    regrid = False  # resumed with another number of processes: same epochs, other steps per epoch
    if saved is not None and int(saved["steps_per_epoch"]) != steps:
        if int(saved.get("world_size", 1)) == run.ranks.world_size:
            raise TncompressError(f"cannot resume {run.state_path}: the training data now has {steps} batches "
                                  f"per epoch, the saved run had {saved['steps_per_epoch']}; use the same "
                                  "data and --batch-size")
        regrid = True
    run.steps_per_epoch = steps
    scheduler = _make_scheduler(run.optimizer, run.config, steps)
    if saved is not None:
        scheduler.load_state_dict(saved["scheduler"])
        if regrid:  # the schedule is per step: continue at the same epoch boundary of the new grid
            scheduler.last_epoch = run.start_epoch * steps
            scheduler._step_count = scheduler.last_epoch + 1
        # Recompute the current lr with this run's schedule (it differs if --epochs grew).
        for group, base, fn in zip(run.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
    run.scheduler = scheduler
    run.emit("start", {"epochs": run.config.epochs, "start_epoch": run.start_epoch, "steps_per_epoch": steps,
                       "device": str(run.device), "amp": run.amp_name, "resumed": saved is not None,
                       "distillation": run.teacher is not None, "world_size": run.ranks.world_size})
    return scheduler


def _step_schedule(run: _Run, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    if run.use_scaler:  # a skipped fp16 step makes LambdaLR warn; the schedule stays per batch
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
    else:
        scheduler.step()


# ---------------------------------------------------------------- loss (with distillation)


def _loss(run: _Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one batch: label cross-entropy weighted 1 − kd_weight, plus kd_weight times
    the distillation loss against the teacher's logits when there is a teacher."""
    config = run.config
    with torch.autocast(device_type=run.device.type, dtype=run.amp_dtype or torch.float32,
                        enabled=run.amp_dtype is not None):
        logits = output_tensor(run.forward(x), "the model")
        loss = torch.zeros((), device=run.device)
        if config.kd_weight < 1:
            loss = (1 - config.kd_weight) * F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        if run.teacher is not None:
            with torch.inference_mode():  # no autograd bookkeeping for the teacher at all
                teacher_logits = output_tensor(run.teacher(_to(x, run.device, run.teacher_dtype)), "the teacher")
            loss = loss + config.kd_weight * distillation_loss(logits, teacher_logits, config.kd_temperature)
    return logits, loss


class _FiniteWatch:
    """Remembers the first non-finite loss on the device and checks it every ``every`` steps, so
    CUDA needs no host sync per step (the CPU checks every step, where a sync is free)."""

    def __init__(self, device: torch.device, every: int) -> None:
        self.every = every
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, step: int, loss: torch.Tensor) -> None:
        first = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.bad_value = torch.where(first, loss.float(), self.bad_value)
        self.first_bad = torch.where(first, self.first_bad.new_full((), step), self.first_bad)

    def check(self, run: _Run, epoch: int, step: int, steps: int, lr: float) -> None:
        if (step % self.every == 0 or step == steps) and self.first_bad.item() >= 0:
            raise _non_finite(epoch, int(self.first_bad.item()), steps, lr, self.bad_value.item(), run.config)


# ---------------------------------------------------------------- one epoch


def train_one_epoch(run: _Run, epoch: int, loader: Iterable[Any], steps: int) -> _EpochStats:
    """One pass over ``loader`` (``steps`` batches): forward, loss, backward, clipped step, schedule."""
    scheduler = _lay_out_schedule(run, epoch, steps)
    start = time.perf_counter()
    run.emit("epoch_start", {"epoch": epoch, "epochs": run.config.epochs, "steps_per_epoch": steps, "lr": run.lr})
    run.forward.train()
    watch = _FiniteWatch(run.device, 1 if run.device.type == "cpu" else run.report_every)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    images, step, lr = 0, 0, run.lr
    world = run.ranks.world_size  # every rank has as many batches of the same sizes (padded shards)
    params = run.params
    for step, item in enumerate(loader, start=1):
        if step > steps:
            raise TncompressError(f"the training loader yielded more than its length ({steps}) batches")
        x, y = _batch(item)
        x, y = _to(x, run.device, run.dtype), y.to(run.device, non_blocking=True)
        if run.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = run.lr
        logits, loss = _loss(run, x, y)
        detached = loss.detach()
        watch.record(step, detached)
        watch.check(run, epoch, step, steps, lr)

        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if run.config.grad_clip is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(params, run.config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        _step_schedule(run, scheduler)

        batch = y.shape[0]
        images += batch
        loss_sum += detached.double() * batch
        correct += (logits.detach().argmax(dim=1) == y).sum()
        if run.on_event is not None and (step % run.report_every == 0 or step == steps):
            elapsed = time.perf_counter() - start
            run.emit("batch", {"epoch": epoch, "epochs": run.config.epochs, "step": step,
                               "steps_per_epoch": steps, "global_step": (epoch - 1) * steps + step,
                               "loss": loss_sum.item() / images, "top1": 100.0 * correct.item() / images,
                               "images": images * world,
                               "images_per_second": images * world / elapsed if elapsed > 0 else 0.0, "lr": lr})
    if step != steps:
        raise TncompressError(f"the training loader yielded {step} batches but its length is {steps}")
    _sync(run.device)
    seconds = time.perf_counter() - start
    total_loss, total_correct, total_images = distributed.all_sum(
        run.ranks, [loss_sum.item(), correct.item(), images], run.device)  # the whole epoch over all ranks
    return _EpochStats(loss=total_loss / total_images, top1=100.0 * total_correct / total_images,
                       images=int(total_images), lr=lr, seconds=seconds)


# ---------------------------------------------------------------- evaluation


def _evaluate_epoch(run: _Run, epoch: int, stats: _EpochStats, test_loader: Iterable[Any],
                    epoch_start: float) -> dict[str, Any]:
    """Test the model after ``epoch``, record the epoch in the history and track the best one;
    returns the ``epoch_end`` event's payload."""
    run.emit("eval_start", {"epoch": epoch, "epochs": run.config.epochs})
    metrics = evaluate(run.model, test_loader, run.device, amp=run.amp_name, ranks=run.ranks,
                       channels_last=run.channels_last)
    improved = metrics["top1"] > run.best_top1
    if improved:
        run.best_top1, run.best_epoch = metrics["top1"], epoch
    entry = {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_top1": stats.top1,
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "test_loss": metrics["loss"],
        "lr": stats.lr,
        "seconds": time.perf_counter() - epoch_start,
        "images_per_second": stats.images / stats.seconds if stats.seconds > 0 else 0.0,
        "eval_seconds": metrics["seconds"],
    }
    run.history.append(entry)
    run.final = metrics
    return {**entry, "epochs": run.config.epochs, "best_top1": run.best_top1, "best_epoch": run.best_epoch,
            "improved": improved, "test_images": metrics["images"]}


# ---------------------------------------------------------------- the loop


def _start(model: nn.Module, config: TrainConfig, teacher: nn.Module | None, state_path: Path | None,
           saved: dict[str, Any] | None, on_event: Event | None, report_every: int,
           example: torch.Tensor | None = None) -> _Run:
    """Move the model (and teacher) to the device and set up precision, optimizer and scaler; in a
    distributed run, wrap the model in DistributedDataParallel (events then go to rank 0 only)."""
    ranks = distributed.current()
    device = distributed.device_for(ranks, resolve_device(config.device))
    dtype = _model_dtype(model)
    amp_dtype, use_scaler, amp_name = resolve_amp(config.amp, device, dtype)
    model.to(device)
    channels_last = uses_channels_last(config.memory_format, model, example)
    if channels_last and teacher is not None and config.memory_format == "auto" and example is not None \
            and example.dim() == 4 and not _runs_channels_last(teacher, example):
        channels_last = False  # the teacher sees the same input tensors
    if channels_last:
        model.to(memory_format=torch.channels_last)
    teacher_dtype = dtype
    if teacher is not None:
        teacher.to(device)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        teacher.eval()
        teacher_dtype = _model_dtype(teacher)
    net = None
    if ranks.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(model=model, config=config, device=device, dtype=dtype, amp_dtype=amp_dtype, amp_name=amp_name,
                use_scaler=use_scaler, optimizer=make_optimizer(model, config),
                scaler=torch.amp.GradScaler(device.type, enabled=use_scaler), teacher=teacher,
                teacher_dtype=teacher_dtype, state_path=state_path, saved=saved,
                on_event=on_event if ranks.is_main else None, report_every=report_every, ranks=ranks, net=net,
                channels_last=channels_last)


def _first_input(loader: Iterable[Any]) -> torch.Tensor | None:
    """One input batch of ``loader`` (to try the model's layout on), or None."""
    try:
        item = next(iter(loader))
    except (StopIteration, TypeError):
        return None
    x = item[0] if isinstance(item, (tuple, list)) else item
    return x if isinstance(x, torch.Tensor) else None


def train(model: nn.Module, train_loader_factory: Callable[[int], Iterable[Any]], test_loader: Iterable[Any],
          config: TrainConfig, *, teacher: nn.Module | None = None, state_path: str | Path | None = None,
          resume: bool = False, on_event: Event | None = None, report_every: int = 20) -> TrainResult:
    """Train ``model`` in place for ``config.epochs`` epochs and return what happened.

    ``train_loader_factory(epoch)`` (epoch numbers start at 1) is called after the RNGs are seeded
    for that epoch and returns its ``(inputs, labels)`` batches; ``test_loader`` is iterated after
    every epoch. With ``state_path`` a resume state is written atomically at each epoch end;
    ``resume=True`` continues from it. Events: ``start``, ``epoch_start``, ``batch`` (every
    ``report_every`` steps and at the last step), ``eval_start``, ``epoch_end``. The model (and
    teacher) are moved to the device, keep their dtype, and the model stays there, in eval mode, with
    the last epoch's weights (not the best epoch's). A KeyboardInterrupt stops at once (re-raised) and
    leaves the last completed epoch's state untouched. All global RNGs are re-seeded per epoch.

    Inside a ``torch.distributed`` process group (torchrun): the model is wrapped in
    DistributedDataParallel, both loaders must yield this rank's shard
    (:func:`tncompress.data.make_loader` with ``ranks``), metrics are summed over the ranks, rank 0
    alone writes the state and receives the events, and the others wait for it at a barrier.
    """
    teacher, path, saved = _checked_arguments(config, teacher, state_path, resume, report_every)
    teacher_modes = {m: m.training for m in teacher.modules()} if teacher is not None else {}
    try:
        run = _start(model, config, teacher, path, saved, on_event, report_every, _first_input(test_loader))
        _restore(run)
        if run.start_epoch >= config.epochs:
            log.info("%s already holds %d completed epochs: nothing to train", path, run.start_epoch)
            model.eval()
            return run.result(run.prior_seconds)
        session_start = time.perf_counter()
        epoch = run.start_epoch
        try:
            for epoch in range(run.start_epoch + 1, config.epochs + 1):
                epoch_start = time.perf_counter()
                seed_everything(epoch_seed(config.seed, epoch, run.ranks.rank))
                loader = train_loader_factory(epoch)
                stats = train_one_epoch(run, epoch, loader, _steps_in(loader))
                epoch_end = _evaluate_epoch(run, epoch, stats, test_loader, epoch_start)
                _save_state(run, epoch, run.prior_seconds + time.perf_counter() - session_start)
                run.emit("epoch_end", epoch_end)  # after the save: a listener sees the epoch on disk
                distributed.barrier(run.ranks)  # the other ranks wait for rank 0's files
        except KeyboardInterrupt:
            log.info("interrupted during epoch %d; %s", epoch,
                     f"{path} holds epoch {len(run.history)}" if path and run.history else "nothing was saved")
            raise
    finally:
        for module, mode in teacher_modes.items():
            module.training = mode
        if channels_last_used(model):  # hand the model (and teacher) back in the layout they came in
            model.to(memory_format=torch.contiguous_format)
            if teacher is not None:
                teacher.to(memory_format=torch.contiguous_format)
    model.eval()
    return run.result(run.prior_seconds + time.perf_counter() - session_start)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
           config: TrainConfig, epoch: int, steps_per_epoch: int, history: list[dict[str, Any]], best_top1: float,
           best_epoch: int, final: dict[str, Any], device: torch.device, amp: str, seconds: float) -> dict[str, Any]:
    """Everything needed to continue after ``epoch`` (weights_only-safe: tensors and plain values)."""
    return {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "tncompress_version": str(__version__),
        "torch_version": str(torch.__version__),
        "epoch": int(epoch),
        "steps_per_epoch": int(steps_per_epoch),
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "history": copy.deepcopy(history),
        "best": {"top1": float(best_top1), "epoch": int(best_epoch)},
        "final": {k: _plain_number(v) for k, v in final.items()},
        "device": str(device),
        "amp": amp,
        "seconds": float(seconds),
        "rng": _rng_state(device.type == "cuda"),
    }
