"""Datasets by name: MNIST, Fashion-MNIST, CIFAR-10, Tiny-ImageNet and a synthetic stand-in.

One job: turn a dataset name and a split into a ``torch.utils.data.Dataset`` of
``(normalised float C×H×W tensor, int label)`` pairs, read from the on-disk layout users already
have, and fail with one clear line when the data is missing or malformed.

Where the data lives (:func:`data_root`): ``data_dir`` if given, else ``$TNCOMPRESS_DATA``, else
``$XDG_CACHE_HOME/tncompress/data`` (``~/.cache/tncompress/data``). Below that root each dataset
keeps torchvision's layout (``MNIST/raw/…``, ``FashionMNIST/raw/…``, ``cifar-10-batches-py/…``)
or the official Tiny-ImageNet one (``tiny-imagenet-200/…``). Missing MNIST, Fashion-MNIST and
CIFAR-10 files are downloaded with torchvision when ``download`` is true (and
``$TNCOMPRESS_NO_DOWNLOAD`` is not set); offline, that fails with one line saying what was expected
where and how to fix it.

Transforms run on whole batches (``__getitems__``, which ``DataLoader`` calls with a batch of
indices), in this order: augmentation at the native size, bilinear resize (antialiased) to
``image_size``, channel conversion (1→3 replicates, 3→1 takes ITU-R 601 luma as PIL's "L" does),
normalisation with the dataset's mean and std (converted alongside the channels).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import logging
import math
import os
import pickle
import re
import socket
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tncompress.errors import TncompressError

log = logging.getLogger(__name__)

ENV_DATA = "TNCOMPRESS_DATA"
"""Environment variable naming the data root (overridden by an explicit ``data_dir``)."""
ENV_NO_DOWNLOAD = "TNCOMPRESS_NO_DOWNLOAD"
"""Set to 1/true/yes to never try a download, whatever ``download`` says (CI, offline machines)."""
DOWNLOAD_TIMEOUT_S = 30.0
"""Socket timeout while torchvision downloads, so a silent network fails instead of hanging."""

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SYNTHETIC_SEED = 0
"""Seed of the ``synthetic`` dataset that :func:`load_dataset` returns."""

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")


class DatasetError(TncompressError):
    """A dataset is unknown, missing, malformed or asked for with impossible settings."""


@dataclass(frozen=True)
class DatasetInfo:
    """What tncompress knows about a dataset before reading it.

    ``image_size`` is the native height (= width); ``mean``/``std`` are per native channel, on
    pixel values scaled to [0, 1]; ``folder`` is where it lives below the data root and ``files``
    describes the layout expected there. ``synthetic`` datasets are generated, so accuracy on them
    says nothing about real data.
    """

    name: str
    title: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: str
    folder: str
    train_size: int
    test_size: int
    synthetic: bool = False
    source: str = ""


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist", "MNIST", 10, 1, 28, (0.1307,), (0.3081,),
            files="MNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte "
                  "(uncompressed idx files, torchvision's layout)",
            folder="MNIST/raw", train_size=60_000, test_size=10_000,
            source="downloaded by torchvision",
        ),
        DatasetInfo(
            "fashion-mnist", "Fashion-MNIST", 10, 1, 28, (0.2860,), (0.3530,),
            files="FashionMNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte "
                  "(uncompressed idx files, torchvision's layout)",
            folder="FashionMNIST/raw", train_size=60_000, test_size=10_000,
            source="downloaded by torchvision",
        ),
        DatasetInfo(
            "cifar10", "CIFAR-10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
            files="cifar-10-batches-py/data_batch_1..data_batch_5, test_batch, batches.meta "
                  "(the unpacked 'python version' archive)",
            folder="cifar-10-batches-py", train_size=50_000, test_size=10_000,
            source="downloaded by torchvision",
        ),
        DatasetInfo(
            "tiny-imagenet", "Tiny-ImageNet", 200, 3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
            files="tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
                  "val/val_annotations.txt (the unzipped official archive)",
            folder="tiny-imagenet-200", train_size=100_000, test_size=10_000,
            source=TINY_IMAGENET_URL,
        ),
        DatasetInfo(
            "synthetic", "Synthetic", 10, 1, 28, (0.1440,), (0.2602,),
            files="nothing: generated in memory from a seed",
            folder="", train_size=6_000, test_size=1_000, synthetic=True,
            source="generated",
        ),
    )
}

_ALIASES = {
    "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet",
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name`` (case and ``_``/``-`` insensitive), or a one-line error."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, [*DATASETS, *_ALIASES], n=1, cutoff=0.5)
    hint = f"did you mean {_ALIASES.get(close[0], close[0])!r}? " if close else ""
    raise DatasetError(f"unknown dataset {name!r}; {hint}known datasets: {', '.join(DATASETS)}")


def data_root(data_dir: str | Path | None = None) -> Path:
    """Where datasets live: ``data_dir``, else ``$TNCOMPRESS_DATA``, else the user's cache folder."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA, "")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "tncompress" / "data"


# --------------------------------------------------------------------------------------------
# Transforms (batched, on float tensors in [0, 1])


def _random_affine(x: torch.Tensor, degrees: float = 10.0, translate: float = 0.1,
                   scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Small random rotation, shift and zoom per image (MNIST-like data: no flips)."""
    b = x.shape[0]
    angle = (torch.rand(b) * 2 - 1) * math.radians(degrees)
    zoom = scale[0] + torch.rand(b) * (scale[1] - scale[0])
    shift = (torch.rand(b, 2) * 2 - 1) * (2 * translate)  # in [-1, 1] grid units: a fraction of the size
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop of the zero-padded image back to its size, and a horizontal flip half the time."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b,))
    left = torch.randint(0, 2 * pad + 1, (b,))
    rows = top[:, None] + torch.arange(h)
    cols = left[:, None] + torch.arange(w)
    flip = torch.rand(b) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------------
# Datasets


class ImageDataset(Dataset):
    """(normalised float C×H×W, int label) pairs; subclasses supply raw uint8 images.

    ``raw(i)`` gives the stored image (uint8, native size and channels) and its label, untouched;
    ``targets`` holds all labels; ``mean``/``std`` are the constants used (after channel conversion).
    """

    def __init__(self, info: DatasetInfo, split: str, targets: torch.Tensor, *, location: Path | None,
                 image_size: int | None, channels: int | None, augment: bool,
                 classes: Sequence[str], available: int) -> None:
        self.info = info
        self.split = split
        self.targets = targets.to(torch.long)
        self.location = location
        self.image_size = image_size or info.image_size
        self.channels = channels or info.channels
        self.augment = augment
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.available = available  # samples on disk before ``limit``
        mean, std = info.mean, info.std
        if self.channels != info.channels:
            if self.channels == 3:
                mean, std = mean * 3, std * 3
            else:  # luma of the channel means; the weighted std is exact for fully correlated channels
                mean = (sum(w * m for w, m in zip(_LUMA, mean)),)
                std = (sum(w * s for w, s in zip(_LUMA, std)),)
        self.mean: tuple[float, ...] = tuple(mean)
        self.std: tuple[float, ...] = tuple(std)
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)

    # subclasses ------------------------------------------------------------------------------
    def _raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images B×C×H×W at the native size and channels."""
        raise NotImplementedError

    # public ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """The stored uint8 image (C×H×W, native) and its label, without any transform."""
        index = self._check_index(index)
        return self._raw_batch([index])[0], int(self.targets[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch at once: DataLoader calls this, so transforms run vectorised over the batch."""
        idx = [self._check_index(i) for i in indices]
        if not idx:
            return []
        x = self.transform(self._raw_batch(idx).to(torch.float32).div_(255.0))
        labels = self.targets[idx].tolist()
        return [(x[k], labels[k]) for k in range(len(idx))]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Augment (if asked), resize, convert channels and normalise a B×C×H×W batch in [0, 1]."""
        if self.augment:
            if self.info.channels == 3:
                x = _random_crop_flip(x, pad=max(1, x.shape[-1] // 8))
            else:
                x = _random_affine(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        if x.shape[1] != self.channels:
            if self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                x = torch.tensordot(x, torch.tensor(_LUMA, dtype=x.dtype), dims=([1], [0])).unsqueeze(1)
        return (x - self._mean) / self._std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of an output (C×H×W or B×C×H×W): back to values in [0, 1]."""
        shape = (-1, 1, 1) if x.dim() == 3 else (1, -1, 1, 1)
        return x * self._std.view(shape) + self._mean.view(shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        """C, H, W of the tensors this dataset returns."""
        return (self.channels, self.image_size, self.image_size)

    def describe(self) -> str:
        """One line: what, how many, what shape, from where."""
        info = self.info
        split = "test (official val split)" if info.name == "tiny-imagenet" and self.split == "test" else self.split
        n = len(self)
        official = info.train_size if self.split == "train" else info.test_size
        if n < self.available:
            count = f"{n:,} images (first {n:,} of {self.available:,})"
        elif n != official and not info.synthetic:
            count = f"{n:,} images (of the official {official:,})"
        else:
            count = f"{n:,} images"
        c, h, w = self.shape
        text = f"{info.title} {split}: {count}, {c}×{h}×{w}"
        if self.augment:
            text += ", augmented"
        if info.synthetic:
            return text + f", generated (seed {SYNTHETIC_SEED}; synthetic: accuracy on it says nothing about real data)"
        return text + f", from {self.location}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def _check_index(self, index: Any) -> int:
        i = int(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return i


class TensorImageDataset(ImageDataset):
    """Images held in memory as one uint8 tensor N×C×H×W (MNIST, Fashion-MNIST, CIFAR-10, synthetic)."""

    def __init__(self, info: DatasetInfo, split: str, images: torch.Tensor, targets: torch.Tensor,
                 **kwargs: Any) -> None:
        super().__init__(info, split, targets, **kwargs)
        self.images = images

    def _raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        return self.images[list(indices)]


class TinyImageNetDataset(ImageDataset):
    """Tiny-ImageNet read lazily from its JPEG files (100,000 of them would be 1.2 GB in memory)."""

    def __init__(self, info: DatasetInfo, split: str, files: list[Path], targets: torch.Tensor,
                 **kwargs: Any) -> None:
        super().__init__(info, split, targets, **kwargs)
        self.files = files

    def _raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([_read_rgb(self.files[i], self.info.image_size) for i in indices])


def _read_rgb(path: Path, size: int) -> torch.Tensor:
    """An image file as uint8 3×size×size (RGB; resized only if the file is not size×size)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError… for bad files
        raise DatasetError(f"Tiny-ImageNet: cannot read image {path}: {_reason(exc)}; "
                           "replace the file (re-extract the archive)") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Errors and downloads


def _reason(exc: BaseException) -> str:
    """An exception as one short line (torchvision's download errors span several lines)."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fix_hint(info: DatasetInfo, where: Path) -> str:
    parent = info.folder.split("/")[0]
    return (f"point --data-dir or {ENV_DATA} at the folder that contains {parent}/, "
            f"or copy the files into {where}")


def _download_disabled() -> bool:
    return os.environ.get(ENV_NO_DOWNLOAD, "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _ensure_files(info: DatasetInfo, where: Path, names: Sequence[str], download: bool,
                  fetch: Callable[[], Any]) -> None:
    """Make sure ``where/names`` exist: download with ``fetch`` if allowed, else one clear error."""
    missing = [n for n in names if not (where / n).is_file()]
    if not missing:
        return
    gz = [n for n in missing if (where / f"{n}.gz").is_file()]
    lacks = f"{info.title} not found: {where} lacks {', '.join(missing)}"
    if gz:
        lacks += f" (it has {', '.join(n + '.gz' for n in gz)}: unpack them with gunzip)"
    fix = _fix_hint(info, where)
    if not download or _download_disabled():
        why = f"downloads are off ({ENV_NO_DOWNLOAD} is set)" if download else "download is off"
        raise DatasetError(f"{lacks}; {why}; {fix}")
    log.info("%s: downloading into %s", info.title, where)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fetch()
    except Exception as exc:  # urllib, socket, ssl, md5 mismatch, read-only folder: all one line
        raise DatasetError(f"{lacks} and the download failed ({_reason(exc)}); {fix}") from exc
    still = [n for n in names if not (where / n).is_file()]
    if still:
        raise DatasetError(f"{lacks} and the download did not produce {', '.join(still)}; {fix}")


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: idx files through torchvision's reader

_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _check_idx(info: DatasetInfo, path: Path, ndim: int) -> tuple[int, ...]:
    """Validate an idx file's header against its size, so a truncated file gets a clear line."""
    what = "images" if ndim == 3 else "labels"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] != ndim:
        raise DatasetError(f"{info.title}: {path} is not an idx file of uint8 {what} "
                           f"(expected magic 0x0000080{ndim}, got 0x{head[:4].hex() or 'nothing'}); "
                           "replace it with the original file")
    if len(head) < 4 + 4 * ndim:
        raise DatasetError(f"{info.title}: {path} is truncated inside its header ({size} bytes); "
                           "replace it with the original file")
    dims = struct.unpack(f">{ndim}I", head[4:])
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        raise DatasetError(
            f"{info.title}: {path} is {kind}: its header says {'×'.join(f'{d:,}' for d in dims)} values "
            f"({expected:,} bytes with the header) but the file has {size:,} bytes; "
            "replace it with the original file")
    if ndim == 3 and dims[1:] != (info.image_size, info.image_size):
        raise DatasetError(f"{info.title}: {path} holds {dims[1]}×{dims[2]} images, expected "
                           f"{info.image_size}×{info.image_size}")
    return dims


def _load_mnist_like(info: DatasetInfo, split: str, root: Path, download: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str], Path]:
    import torchvision.datasets as tvd

    cls = tvd.MNIST if info.name == "mnist" else tvd.FashionMNIST
    where = root / info.folder
    names = [*_IDX["train"], *_IDX["test"]]  # torchvision's reader wants all four
    _ensure_files(info, where, names, download,
                  lambda: cls(str(root), train=split == "train", download=True))
    image_file, label_file = _IDX[split]
    n_images = _check_idx(info, where / image_file, 3)[0]
    n_labels = _check_idx(info, where / label_file, 1)[0]
    if n_images != n_labels:
        raise DatasetError(f"{info.title}: {where / image_file} holds {n_images:,} images but "
                           f"{where / label_file} holds {n_labels:,} labels; the two files must match")
    try:
        ds = cls(str(root), train=split == "train", download=False)
    except Exception as exc:
        raise DatasetError(f"{info.title}: cannot read {where}: {_reason(exc)}") from exc
    images = ds.data.to(torch.uint8).unsqueeze(1)  # N×1×H×W, a view
    return images, ds.targets, list(cls.classes), where


# --------------------------------------------------------------------------------------------
# CIFAR-10: a thin reader of the python-pickle batches
#
# torchvision's CIFAR10 checks the md5 of every batch file against the official archive before it
# reads anything (and unpickles with no restriction). tncompress reads the same format itself:
# files written in that format (tests, re-packed or subset copies) load, and unpickling is limited
# to what the batches contain (numpy arrays, lists, dicts, strings), so a planted pickle cannot run
# code. The download still goes through torchvision, which verifies the archive's md5.

_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_META = "batches.meta"
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of the format)")
        tail = module.split(".", 2)[2] if module.startswith(("numpy.core.", "numpy._core.")) else None
        candidates = [module] if tail is None else [f"numpy._core.{tail}", f"numpy.core.{tail}"]
        for candidate in candidates:  # numpy 2 renamed numpy.core to numpy._core
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot find {module}.{name}")


def _unpickle_dict(info: DatasetInfo, path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise DatasetError(f"{info.title}: {path} is not a {what} (cannot unpickle it: {_reason(exc)}); "
                           "replace it with the original file") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{info.title}: {path} is not a {what} (it holds a {type(obj).__name__}, "
                           "not a dict); replace it with the original file")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_batch(info: DatasetInfo, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: a pickled dict with 'data' (uint8 N×3072, planes R, G, B) and 'labels'."""
    entry = _unpickle_dict(info, path, "CIFAR-10 batch")
    what = f"{info.title}: {path} is not a CIFAR-10 batch"
    if "data" not in entry or "labels" not in entry:
        raise DatasetError(f"{what} (keys {sorted(entry)}; expected 'data' and 'labels'); "
                           "replace it with the original file")
    data = entry["data"]
    side = info.image_size
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * side * side:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{what} ('data' is {desc}; expected uint8 N×{3 * side * side})")
    try:
        labels = np.asarray(entry["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what} ('labels' are not integers: {_reason(exc)})") from exc
    if len(labels) != len(data):
        raise DatasetError(f"{what} ({len(data):,} images but {len(labels):,} labels)")
    return data.reshape(-1, 3, side, side), labels


def _read_cifar_meta(info: DatasetInfo, path: Path) -> list[str]:
    entry = _unpickle_dict(info, path, "CIFAR-10 batches.meta file")
    names = entry.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != info.num_classes:
        raise DatasetError(f"{info.title}: {path} has no list of {info.num_classes} 'label_names'; "
                           "replace it with the original file")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar10(info: DatasetInfo, split: str, root: Path, download: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str], Path]:
    import torchvision.datasets as tvd

    where = root / info.folder
    _ensure_files(info, where, [*_CIFAR_FILES[split], _CIFAR_META], download,
                  lambda: tvd.CIFAR10(str(root), train=split == "train", download=True))
    classes = _read_cifar_meta(info, where / _CIFAR_META)
    parts = [_read_cifar_batch(info, where / name) for name in _CIFAR_FILES[split]]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    targets = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, targets, classes, where


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet: the official folder layout

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _load_tiny_imagenet(info: DatasetInfo, split: str, root: Path
                        ) -> tuple[list[Path], torch.Tensor, list[str], Path]:
    base = root / info.folder
    if not base.is_dir():
        raise DatasetError(
            f"{info.title} not found: no folder {base}; download {TINY_IMAGENET_URL} (240 MB) and unzip it "
            f"into {root}, giving {base}/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
            f"val/val_annotations.txt, or point --data-dir or {ENV_DATA} at the folder that contains "
            "tiny-imagenet-200/")
    bad = f"{info.title}: malformed folder"
    wnids_path = base / "wnids.txt"
    if not wnids_path.is_file():
        raise DatasetError(f"{bad} {base}: wnids.txt is missing (expected {info.files}); "
                           "re-extract the archive")
    wnids = [line.strip() for line in wnids_path.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    if not wnids:
        raise DatasetError(f"{bad}: {wnids_path} lists no classes")
    index: dict[str, int] = {}
    for lineno, wnid in enumerate(wnids, 1):
        if wnid in index:
            raise DatasetError(f"{bad}: {wnids_path} lists {wnid} twice (line {lineno})")
        index[wnid] = len(index)
    if len(wnids) != info.num_classes:
        log.warning("%s: %s lists %d classes (the official set has %d)", info.title, wnids_path,
                    len(wnids), info.num_classes)

    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid, label in index.items():
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise DatasetError(f"{bad}: {folder} is missing (class {wnid} of wnids.txt); "
                                   "re-extract the archive")
            names = sorted(e.name for e in os.scandir(folder)
                           if e.name.lower().endswith(_IMAGE_SUFFIXES) and e.is_file())
            if not names:
                raise DatasetError(f"{bad}: {folder} holds no .JPEG images")
            files.extend(folder / n for n in names)
            labels.extend([label] * len(names))
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetError(f"{bad}: {ann} is missing (it maps val images to classes); "
                               "re-extract the archive")
        images = base / "val" / "images"
        for lineno, line in enumerate(ann.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DatasetError(f"{bad}: {ann} line {lineno} is not 'filename<TAB>wnid<TAB>…': {line[:80]!r}")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise DatasetError(f"{bad}: {ann} line {lineno} names class {wnid!r}, which is not in wnids.txt")
            path = images / name
            if not path.is_file():
                raise DatasetError(f"{bad}: {ann} line {lineno} names {name}, which is not in {images}")
            files.append(path)
            labels.append(index[wnid])
        if not files:
            raise DatasetError(f"{bad}: {ann} lists no images")
    return files, torch.tensor(labels, dtype=torch.long), wnids, base


# --------------------------------------------------------------------------------------------
# Synthetic: a deterministic stand-in for MNIST-like data

_SYN_CHUNK = 500
_SYN_STROKES = 3  # connected segments per class glyph
_SYN_MIN_DISTANCE = 1.0  # between unit-norm glyph renderings (√2 = no overlap at all)


def _render(strokes: torch.Tensor, width: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Draw n glyphs (n × strokes × 2 ends × xy, in pixels) as soft lines: n × size²."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    pix = torch.stack([xx, yy], -1).reshape(-1, 2)
    a, b = strokes[:, :, 0, None, :], strokes[:, :, 1, None, :]
    ab = b - a
    t = (((pix - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    d2 = ((a + t[..., None] * ab - pix) ** 2).sum(-1).amin(1)  # squared distance to the glyph
    return torch.exp(-d2 / (2 * width ** 2))


@functools.lru_cache(maxsize=1)
def _glyphs() -> torch.Tensor:
    """Ten fixed class glyphs: polylines of 3 strokes, 8–13 px each, inside a 28×28 frame, drawn
    so that no two look alike (a minimum distance between their renderings)."""
    g = torch.Generator().manual_seed(20150917)
    glyphs: list[torch.Tensor] = []
    drawn: list[torch.Tensor] = []
    while len(glyphs) < 10:
        pts = [torch.rand(2, generator=g) * 14 + 7]
        for _ in range(_SYN_STROKES):
            angle = torch.rand(1, generator=g).item() * 2 * math.pi
            length = 8 + 5 * torch.rand(1, generator=g).item()
            pts.append(pts[-1] + length * torch.tensor([math.cos(angle), math.sin(angle)]))
        p = torch.stack(pts)
        if p.min() < 3 or p.max() > 24:
            continue
        strokes = torch.stack([p[:-1], p[1:]], 1)  # strokes × 2 ends × xy
        img = _render(strokes[None], torch.tensor([[1.5]]))[0]
        img = img / img.norm()
        if any(float((img - other).norm()) < _SYN_MIN_DISTANCE for other in drawn):
            continue
        glyphs.append(strokes)
        drawn.append(img)
    return torch.stack(glyphs)


@functools.lru_cache(maxsize=32)
def _synthetic_chunk(seed: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of ``_SYN_CHUNK`` samples, balanced over the classes; chunks are independent so
    the first N samples do not depend on how many are asked for."""
    n, size = _SYN_CHUNK, 28
    g = torch.Generator().manual_seed(_mix_seed(seed, chunk, "synthetic"))
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    p = _glyphs()[labels] + torch.randn(n, _SYN_STROKES, 2, 2, generator=g) * 1.2  # jitter stroke ends
    centre = (size - 1) / 2
    angle = (torch.rand(n, generator=g) - 0.5) * 2 * math.radians(15)
    zoom = 0.85 + 0.3 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 6
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1),
                       torch.stack([angle.sin(), angle.cos()], -1)], -2) * zoom[:, None, None]
    p = torch.einsum("nij,nsej->nsei", rot, p - centre) + centre + shift[:, None, None, :]
    width = 0.9 + 0.8 * torch.rand(n, 1, generator=g)
    img = _render(p, width, size) + 0.08 * torch.randn(n, size * size, generator=g)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, 1, size, size)
    return img, labels


def generate_synthetic(n: int, seed: int = SYNTHETIC_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic 1×28×28 uint8 images (class glyphs: jittered, rotated, blurred strokes plus
    noise) and their labels 0–9, fully determined by ``seed``. An MLP learns them to ~97%."""
    if n <= 0:
        return torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    chunks = [_synthetic_chunk(seed, c) for c in range(-(-n // _SYN_CHUNK))]
    return torch.cat([c[0] for c in chunks])[:n], torch.cat([c[1] for c in chunks])[:n]


# --------------------------------------------------------------------------------------------
# Public entry points


def _mix_seed(*parts: Any) -> int:
    """A 63-bit seed from several values, without collisions such as (0, 10) vs (1, 0)."""
    digest = hashlib.sha256(":".join(map(str, ("tncompress", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _require_int(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` checked as an int >= ``minimum`` (None is refused)."""
    checked = _check_int(value, what, minimum=minimum)
    if checked is None:
        raise DatasetError(f"{what} must be an integer >= {minimum}, got None")
    return checked


def _check_int(value: Any, what: str, allowed: Sequence[int] | None = None, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if allowed is not None and value not in allowed:
        raise DatasetError(f"{what} must be {' or '.join(map(str, allowed))}, got {value}")
    if value < minimum:
        raise DatasetError(f"{what} must be at least {minimum}, got {value}")
    return value


def _check_split(info: DatasetInfo, split: str) -> str:
    key = str(split).strip().lower()
    if key in ("train", "test"):
        return key
    if info.name == "tiny-imagenet" and key in ("val", "valid", "validation"):
        return "test"
    extra = " ('test' is the official labelled val split)" if info.name == "tiny-imagenet" else ""
    raise DatasetError(f"{info.title} has no split {split!r}; use 'train' or 'test'{extra}")


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    augment: bool = False,
    download: bool = True,
    limit: int | None = None,
) -> ImageDataset:
    """A dataset of (normalised float C×H×W tensor, int label) by name and split.

    ``split`` is "train" or "test" (Tiny-ImageNet: "test" is the official labelled val split).
    ``image_size`` resizes (bilinear, antialiased; e.g. 32 for the TT paper's MNIST MLP),
    ``channels`` converts 1↔3, ``augment`` adds light training augmentation (random crop with
    padding and horizontal flip for colour sets, a small random affine for MNIST-like ones),
    ``limit`` keeps the first N samples. Missing files are downloaded by torchvision when
    ``download`` is true (never for Tiny-ImageNet); problems raise :class:`DatasetError`.
    """
    info = dataset_info(name)
    split = _check_split(info, split)
    image_size = _check_int(image_size, "image_size")
    channels = _check_int(channels, "channels", allowed=(1, 3))
    limit = _check_int(limit, "limit", minimum=0)
    common: dict[str, Any] = {"image_size": image_size, "channels": channels, "augment": bool(augment)}

    if info.synthetic:
        n = info.train_size if split == "train" else info.test_size
        keep = n if limit is None else min(limit, n)
        images, targets = generate_synthetic(keep, _mix_seed(SYNTHETIC_SEED, split))
        ds: ImageDataset = TensorImageDataset(info, split, images, targets, location=None,
                                              classes=[str(k) for k in range(10)], available=n, **common)
    elif info.name == "tiny-imagenet":
        files, targets, classes, location = _load_tiny_imagenet(info, split, data_root(data_dir))
        available = len(files)
        if limit is not None:
            files, targets = files[:limit], targets[:limit]
        ds = TinyImageNetDataset(info, split, files, targets, location=location, classes=classes,
                                 available=available, **common)
    else:
        reader = _load_cifar10 if info.name == "cifar10" else _load_mnist_like
        images, targets, classes, location = reader(info, split, data_root(data_dir), download)
        bad = (targets < 0) | (targets >= info.num_classes)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise DatasetError(f"{info.title}: label {int(targets[first])} of sample {first} in {location} "
                               f"is outside 0..{info.num_classes - 1}; replace the files with the originals")
        available = len(targets)
        if limit is not None:
            images, targets = images[:limit], targets[:limit]
        ds = TensorImageDataset(info, split, images, targets, location=location, classes=classes,
                                available=available, **common)
    log.info("loaded %s", ds.describe())
    return ds


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order is fixed by (seed, epoch): same pair, same order; next epoch, new order.

    The generator also seeds worker processes, so augmentation is reproducible with
    ``num_workers > 0``; with ``num_workers=0`` augmentation draws from torch's global RNG
    (``torch.manual_seed`` fixes it). Memory is pinned when ``device`` is a CUDA device.
    """
    batch_size = _require_int(batch_size, "batch_size")
    num_workers = _require_int(num_workers, "num_workers", minimum=0)
    generator = torch.Generator()
    generator.manual_seed(_mix_seed(seed, epoch))
    pin = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers or 0, pin_memory=pin, drop_last=drop_last)


def dataset_summary(name: str, split: str, **options: Any) -> str:
    """One line, e.g. "MNIST train: 23,797 images (of the official 60,000), 1×32×32, from /data/MNIST/raw";
    ``options`` are :func:`load_dataset`'s."""
    return load_dataset(name, split, **options).describe()
