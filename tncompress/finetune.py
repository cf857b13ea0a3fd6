"""Train or fine-tune a loaded model on a named dataset and save the result as a tncompress
checkpoint (same plan and structure, plus training metadata). Glue between checkpoint, data and
train; the CLI only renders its events."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tncompress import distributed
from tncompress.checkpoint import LoadedModel, check_output_path, save_compressed
from tncompress.errors import TncompressError
from tncompress.models import ModelSpec
from tncompress.outputs import output_tensor

log = logging.getLogger(__name__)


@dataclass
class DataOptions:
    """How to read the dataset for a model."""

    name: str
    data_dir: str | None = None
    image_size: int | None = None     # None: from the model's recorded input shape, else native
    channels: int | None = None       # None: from the model's recorded input shape, else native
    augment: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    num_workers: int = 0
    download: bool = True
    mean: tuple[float, ...] | None = None  # None: recorded with the model, else the dataset's default
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        """Resolve the dataset name once, where it enters (aliases such as ``fmnist``, any case):
        everything downstream sees the registry's canonical name."""
        from tncompress.data import dataset_info

        self.name = dataset_info(self.name).name


def recorded_preprocessing(loaded: LoadedModel) -> dict[str, Any]:
    """The normalisation recorded in a tncompress checkpoint (``metadata.preprocessing``), or {}."""
    meta = (loaded.header or {}).get("metadata") or {}
    pre = meta.get("preprocessing") or {}
    return {k: list(pre[k]) for k in ("mean", "std") if pre.get(k)}


def normalization(loaded: LoadedModel, options: DataOptions) -> dict[str, Any]:
    """``mean``/``std`` keyword arguments for :func:`tncompress.data.load_dataset`: given on the
    command line, else recorded with the model, else none (the dataset's own default applies)."""
    recorded = recorded_preprocessing(loaded)
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        value = getattr(options, key)
        if value is not None:
            out[key] = list(value)
        elif key in recorded:
            out[key] = recorded[key]
    return out


def normalization_source(loaded: LoadedModel, data: Any, dataset: Any = None) -> dict[str, Any]:
    """Where the mean/std an evaluation used came from, per value: ``flag`` (--mean/--std),
    ``checkpoint`` (recorded in its ``metadata.preprocessing``) or ``dataset`` (its defaults).

    The dataset cannot tell: values recorded in a checkpoint reach it as arguments, as flags do."""
    recorded = recorded_preprocessing(loaded)
    origin = {key: "flag" if getattr(data, key, None) is not None else "checkpoint" if key in recorded else "dataset"
              for key in ("mean", "std")}
    flags = {"mean": "--mean", "std": "--std"}
    if origin["mean"] == origin["std"] == "flag":
        text = "given (--mean/--std)"
    elif origin["mean"] == origin["std"] == "checkpoint":
        text = "recorded in the checkpoint (metadata.preprocessing)"
    elif origin["mean"] == origin["std"] == "dataset":
        text = str(getattr(dataset, "normalization", "") or "the dataset's defaults")
    else:
        said = {"flag": "given ({})", "checkpoint": "recorded in the checkpoint", "dataset": "the dataset's default"}
        text = ", ".join(f"{key} {said[origin[key]].format(flags[key])}" for key in ("mean", "std"))
    out: dict[str, Any] = {"source": text, "mean_from": origin["mean"], "std_from": origin["std"]}
    if dataset is not None and hasattr(dataset, "mean"):
        out.update(mean=[float(v) for v in dataset.mean], std=[float(v) for v in dataset.std])
    return out


def preprocessing_record(dataset: Any) -> dict[str, Any]:
    """What a checkpoint records of the normalisation ``dataset`` applied (so later commands and
    reports need not be told again)."""
    return {"mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std],
            "normalization": str(getattr(dataset, "normalization", ""))}


def input_geometry(loaded: LoadedModel, options: DataOptions) -> tuple[int | None, int | None]:
    """(channels, image size) to feed the model: explicit options first, else the input shape
    recorded with the model (or a reference net's own), else the channels of the first conv and
    the dataset's native size (None)."""
    from tncompress.models import BUILTIN_MODELS

    channels, size = options.channels, options.image_size
    spec = loaded.spec
    shape = None
    if spec is not None:
        if spec.input_shape:
            shape = spec.input_shape
        elif spec.arch in BUILTIN_MODELS or spec.kwargs.get("cifar_stem"):
            shape = spec.default_input_shape()
    if shape is not None and len(shape) == 4:
        channels = channels or int(shape[1])
        if size is None and shape[2] == shape[3]:
            size = int(shape[2])
    if channels is None:
        first_conv = next((m for m in loaded.model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else None
    return channels, size


def test_loader(loaded: LoadedModel, options: DataOptions, batch_size: int, device: torch.device | None = None):
    """The evaluation loader of ``options.name`` shaped for ``loaded``'s model."""
    from tncompress.data import load_dataset, make_loader

    channels, size = input_geometry(loaded, options)
    test_set = load_dataset(options.name, "test", data_dir=options.data_dir, image_size=size, channels=channels,
                            download=options.download, limit=options.limit_test, **normalization(loaded, options))
    test_set.normalization = normalization_source(loaded, options, test_set)["source"]  # flag, checkpoint or dataset
    return make_loader(test_set, batch_size, shuffle=False, num_workers=options.num_workers, device=device)


def check_classes(model: nn.Module, loaded: LoadedModel, dataset: str, example: torch.Tensor) -> None:
    """Refuse a model whose output width does not match the dataset's class count."""
    from tncompress.data import dataset_info

    n = dataset_info(dataset).num_classes
    out = _one_output(model, example[:1])
    if out.ndim != 2 or out.shape[1] != n:
        raise TncompressError(f"{loaded.path}: the model outputs shape {list(out.shape)} but {dataset} has {n} "
                              f"classes (build it with --arch-arg num_classes={n})")


def _one_output(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """``model`` run once in eval mode on ``example`` (moved to its device and float dtype)."""
    first = next(model.parameters(), None)
    x = example
    if first is not None:
        x = x.to(first.device, dtype=first.dtype if x.is_floating_point() and first.is_floating_point() else None)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    return output_tensor(out, "the model")


def check_teacher(teacher: nn.Module, student: nn.Module, example: torch.Tensor, name: str) -> None:
    """Refuse, before any training, a teacher that does not run on the student's input or whose
    output shape differs from the student's (another architecture, another class count): the
    distillation loss would otherwise fail deep inside the first batch."""
    try:
        expected = _one_output(student, example[:1])
    except Exception:  # the student's own problems are reported by check_classes and training
        return
    try:
        got = _one_output(teacher, example[:1])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TncompressError(f"teacher {name} does not run on the student's input {list(example[:1].shape)} "
                              f"({type(exc).__name__}: {first}); distil from a model of the same task and "
                              "input size (usually the dense model the student was compressed from)") from None
    if got.shape != expected.shape:
        raise TncompressError(f"teacher {name} outputs shape {list(got.shape)} but the student outputs "
                              f"{list(expected.shape)} on the same one-sample batch; distil from a model with "
                              "the same outputs (usually the dense model the student was compressed from)")


def train_and_save(loaded: LoadedModel, output: str | Path, data: DataOptions, config: Any, *,
                   teacher: nn.Module | None = None, resume: bool = False,
                   on_event: Callable[[str, dict[str, Any]], None] | None = None,
                   extra_metadata: dict[str, Any] | None = None) -> Any:
    """Train ``loaded.model`` on ``data`` with ``config`` (a :class:`tncompress.train.TrainConfig`),
    keep a resume state beside ``output`` (``<output>.state.pt``) and write ``output`` as a
    tncompress checkpoint after every epoch (atomically), the last one holding the final weights.

    Started by torchrun, every process runs this: it joins the process group, trains on its shard
    of each epoch, and rank 0 alone writes ``output`` and the state while the others wait."""
    output = Path(output)
    check_output_path(output)
    if loaded.path and output.resolve() == Path(loaded.path).resolve():
        raise TncompressError(f"--output {output} is the input file; write to a new file")
    ranks, created = distributed.join(config.device)
    try:
        return _train_and_save(loaded, output, data, config, ranks, teacher=teacher, resume=resume,
                               on_event=on_event if ranks.is_main else None, extra_metadata=extra_metadata)
    finally:
        distributed.leave(created)


def _train_and_save(loaded: LoadedModel, output: Path, data: DataOptions, config: Any, ranks: distributed.Ranks, *,
                    teacher: nn.Module | None, resume: bool, on_event: Callable[[str, dict[str, Any]], None] | None,
                    extra_metadata: dict[str, Any] | None) -> Any:
    from tncompress.data import dataset_info, load_dataset, make_loader
    from tncompress.train import resolve_device, train

    device = distributed.device_for(ranks, resolve_device(config.device))
    channels, size = input_geometry(loaded, data)
    norm = normalization(loaded, data)
    train_set = load_dataset(data.name, "train", data_dir=data.data_dir, image_size=size, channels=channels,
                             augment=data.augment, download=data.download, limit=data.limit_train, **norm)
    test_set = load_dataset(data.name, "test", data_dir=data.data_dir, image_size=size, channels=channels,
                            download=data.download, limit=data.limit_test, **norm)
    for split in (train_set, test_set):  # say where mean/std came from: the flag, the checkpoint or the dataset
        split.normalization = normalization_source(loaded, data, split)["source"]
    if on_event:
        on_event("data", {"train": train_set.describe(), "test": test_set.describe(), "ranks": ranks.world_size})
    example = train_set[0][0].unsqueeze(0)
    check_classes(loaded.model, loaded, data.name, example)
    if teacher is not None:
        check_teacher(teacher, loaded.model, example, (extra_metadata or {}).get("teacher") or "the teacher")

    def loader_for(epoch: int):
        return make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                           num_workers=data.num_workers, device=device, ranks=ranks)

    evaluation = make_loader(test_set, max(256, config.batch_size), shuffle=False, num_workers=data.num_workers,
                             device=device, ranks=ranks)
    spec = loaded.spec
    if spec is not None:
        spec = ModelSpec(spec.arch, spec.kwargs, spec.imports, [1, *example.shape[1:]])
    header = loaded.header or {}
    info = dataset_info(data.name)
    training_meta: dict[str, Any] = {"dataset": data.name, "synthetic": bool(getattr(info, "synthetic", False)),
                                     "train_images": len(train_set), "test_images": len(test_set),
                                     "input_shape": [1, *example.shape[1:]], "augment": data.augment,
                                     "teacher": (extra_metadata or {}).get("teacher"),
                                     "processes": ranks.world_size,
                                     "global_batch_size": ranks.world_size * config.batch_size}

    def save(model: nn.Module, result_meta: dict[str, Any]) -> None:
        if not ranks.is_main:  # one writer; train() and the end of this function hold the barriers
            return
        metadata = dict(header.get("metadata") or {})
        metadata.update(extra_metadata or {})
        history = list(metadata.get("training_runs") or [])
        metadata["training"] = {**training_meta, **result_meta}
        metadata["training_runs"] = history + [metadata["training"]] if result_meta.get("final") else history
        metadata["preprocessing"] = preprocessing_record(train_set)
        save_compressed(output, model, spec=spec, plan=header.get("plan"),
                        recipe=header.get("recipe"), metadata=metadata)

    def events(event: str, payload: dict[str, Any]) -> None:
        if event == "epoch_end":
            save(loaded.model, {"epochs_done": payload.get("epoch"), "final": False, "last": payload})
        if on_event:
            on_event(event, payload)

    state_path = output.with_name(output.name + ".state.pt")
    result = train(loaded.model, loader_for, evaluation, config, teacher=teacher, state_path=state_path,
                   resume=resume, on_event=events)
    save(loaded.model, {**result.to_metadata(), "final": True})
    distributed.barrier(ranks)
    if ranks.is_main:
        log.info("wrote %s", output)
    return result
