"""Datasets by name: MNIST, Fashion-MNIST, CIFAR-10, Tiny-ImageNet, a synthetic stand-in, and a
user's own image folder (``folder:PATH``).

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
normalisation with the dataset's mean and std (converted alongside the channels), or with the
``mean``/``std`` given to :func:`load_dataset` (per output channel, used as they are).

``folder:PATH`` names a user's image folder in torchvision's ``ImageFolder`` layout:
``PATH/train/<class>/…`` and ``PATH/test/<class>/…`` (``PATH/val/`` serves as the test split when
there is no ``test/``). ``PATH`` is taken as written (case-sensitive, ``~`` expanded, relative to the
current folder, not to the data root). Files Pillow reads (``.jpg .jpeg .png .bmp .gif .webp .tif
.tiff .ppm .pgm``, any case) count, also in sub-folders of a class folder; other files and hidden
ones are ignored. Classes are the class-folder names in sorted order (of ``train/`` when it exists),
labels their indices. Images are decoded to RGB uint8 with Pillow, resized (bilinear) to
``image_size``×``image_size`` when it is given (stretched, not cropped), else all must share the size
of the first training image, which must be square. Samples come in a fixed class-mixed order (files
sorted by a hash of their class and name with :data:`FOLDER_ORDER_SEED`), so ``limit`` keeps a
subset of every class, the same one on every run, and adding files does not reshuffle the others.
Decoded images are held in memory as one uint8 tensor when they fit ``$TNCOMPRESS_CACHE_MB``
(default 4096; estimated as N·3·H·W bytes before decoding), decoded by a thread pool and kept for
later loads in the same process; larger sets are decoded batch by batch. A folder has no known
statistics, so it is not normalised unless ``mean``/``std`` are given (values stay in [0, 1]).
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
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tncompress.distributed import Ranks, shard_sampler
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

ENV_CACHE_MB = "TNCOMPRESS_CACHE_MB"
"""Environment variable: megabytes of decoded ``folder:`` images held in memory (default
:data:`DEFAULT_CACHE_MB`); larger folders are decoded batch by batch, 0 always does that."""
DEFAULT_CACHE_MB = 4096
FOLDER_PREFIX = "folder:"
"""Dataset names starting with this (any case) name a user's image folder: ``folder:PATH``."""
FOLDER_ORDER_SEED = 0
"""Seed of the fixed class-mixed order of a ``folder:`` dataset's samples (what ``limit`` cuts)."""

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
    """The registry entry for ``name`` (case and ``_``/``-`` insensitive), or a one-line error.

    ``folder:PATH`` is answered by scanning the folder (cached until its folders change): classes,
    file counts and the size of the first training image (0 when there is none or it is not square).
    """
    path = folder_path(name)
    if path is not None:
        return _scan_folder(path).info
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, [*DATASETS, *_ALIASES], n=1, cutoff=0.5)
    hint = f"did you mean {_ALIASES.get(close[0], close[0])!r}? " if close else ""
    raise DatasetError(f"unknown dataset {name!r}; {hint}known datasets: {', '.join(DATASETS)}, "
                       "or folder:PATH for a folder of images")


def folder_path(name: str) -> str | None:
    """The PATH of a ``folder:PATH`` name (prefix in any case, PATH as written), else None."""
    text = str(name).strip()
    if not text.lower().startswith(FOLDER_PREFIX):
        return None
    path = text[len(FOLDER_PREFIX):].strip()
    if not path:
        raise DatasetError(f"{text!r} names no folder; write folder:PATH, PATH holding train/<class>/<images> "
                           "and test/<class>/<images> (or val/<class>/<images>)")
    return path


def is_folder_dataset(name: str) -> bool:
    """Whether ``name`` is a ``folder:PATH`` name (a user's image folder rather than a named dataset)."""
    return str(name).strip().lower().startswith(FOLDER_PREFIX)


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
    ``targets`` holds all labels; ``mean``/``std`` are the constants used (after channel conversion)
    and ``normalization`` says where they came from. ``mean``/``std`` arguments replace the
    dataset's statistics: one value per output channel (``channels``), or one value for all.
    """

    def __init__(self, info: DatasetInfo, split: str, targets: torch.Tensor, *, location: Path | None,
                 image_size: int | None, channels: int | None, augment: bool,
                 classes: Sequence[str], available: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
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
        given_mean = _check_stats(mean, "mean", self.channels)
        given_std = _check_stats(std, "std", self.channels, positive=True)
        default_mean, default_std = _default_stats(info, self.channels)
        self.mean: tuple[float, ...] = given_mean or default_mean
        self.std: tuple[float, ...] = given_std or default_std
        self.normalization: str = _normalization_text(info, given_mean is not None, given_std is not None)
        # the standard statistics of a named dataset go unmentioned in describe(); anything else is said
        self._say_normalization = given_mean is not None or given_std is not None or _is_identity(info)
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
        if n < self.available and is_folder_dataset(info.name):
            count = f"{n:,} images (first {n:,} of {self.available:,} in a fixed class-mixed order)"
        elif n < self.available:
            count = f"{n:,} images (first {n:,} of {self.available:,})"
        elif n != official and not info.synthetic:
            count = f"{n:,} images (of the official {official:,})"
        else:
            count = f"{n:,} images"
        c, h, w = self.shape
        text = f"{info.title} {split}: {count}, {c}×{h}×{w}"
        if self.augment:
            text += ", augmented"
        if self._say_normalization:
            text += f", normalisation: {self.normalization}"
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


def _is_identity(info: DatasetInfo) -> bool:
    """Whether the dataset's statistics leave values as they are (a user folder: no known statistics)."""
    return all(m == 0 for m in info.mean) and all(s == 1 for s in info.std)


def _default_stats(info: DatasetInfo, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's mean and std converted to ``channels`` output channels."""
    if _is_identity(info):
        return (0.0,) * channels, (1.0,) * channels
    mean, std = tuple(info.mean), tuple(info.std)
    if channels != info.channels:
        if channels == 3:
            mean, std = mean * 3, std * 3
        else:  # luma of the channel means; the weighted std is exact for fully correlated channels
            mean = (sum(w * m for w, m in zip(_LUMA, mean)),)
            std = (sum(w * s for w, s in zip(_LUMA, std)),)
    return mean, std


def _check_stats(values: Sequence[float] | float | None, what: str, channels: int,
                 positive: bool = False) -> tuple[float, ...] | None:
    """User-given ``mean``/``std``: finite numbers (``std`` > 0), one per output channel or one for
    all (broadcast); None stays None. Anything else is a one-line :class:`DatasetError`."""
    if values is None:
        return None
    items: list[Any]
    if isinstance(values, (int, float, np.number)):
        items = [values]
    elif isinstance(values, (np.ndarray, torch.Tensor)):
        items = values.reshape(-1).tolist()
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        items = list(values)
    else:
        raise DatasetError(f"{what} (--{what}) must be a list of numbers, got {values!r}")
    floats: list[float] = []
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
            raise DatasetError(f"{what} (--{what}) must be numbers, got {v!r} in {list(items)!r}")
        f = float(v)
        if not math.isfinite(f) or (positive and f <= 0):
            need = "finite and > 0" if positive else "finite"
            raise DatasetError(f"{what} (--{what}) values must be {need}, got {f!r} in {[float(x) for x in items]}")
        floats.append(f)
    if len(floats) == 1:
        return tuple(floats) * channels
    if len(floats) != channels:
        raise DatasetError(f"{what} (--{what}) needs {channels} value{'s' if channels > 1 else ''} (one per channel "
                           f"of the {channels}-channel input) or 1 for all, got {len(floats)}: {floats}")
    return tuple(floats)


def _normalization_text(info: DatasetInfo, mean_given: bool, std_given: bool) -> str:
    """Where the statistics come from, e.g. "MNIST's mean/std (dataset default)"."""
    identity = _is_identity(info)
    if mean_given and std_given:
        return "given (--mean/--std)"
    if mean_given:
        return "mean given (--mean), std 1" if identity else f"mean given (--mean), {info.title}'s std (dataset default)"
    if std_given:
        return "std given (--std), mean 0" if identity else f"std given (--std), {info.title}'s mean (dataset default)"
    return "none (values in [0, 1])" if identity else f"{info.title}'s mean/std (dataset default)"


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
# User image folders: folder:PATH with train/<class>/… and test/<class>/… (or val/)

FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""File suffixes (any case) of the images a ``folder:`` dataset reads; other files are ignored."""
_FOLDER_LAYOUT = "train/<class>/<images> and test/<class>/<images> (or val/<class>/<images>)"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_SCAN_CACHE_ENTRIES = 8
_DECODED_CACHE_ENTRIES = 2
_DECODE_CHUNK = 256  # files per thread-pool task: few futures, still balanced


@dataclass(frozen=True)
class _FolderSplit:
    """One split folder: its image files (absolute paths, sorted by class then path), their labels,
    and the fixed class-mixed order. Paths are strings: 50,000 ``Path`` objects cost half a second."""

    folder: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]  # indices into the dataset's classes
    order: tuple[int, ...]  # the class-mixed sample order: indices into ``files``


@dataclass(frozen=True)
class _FolderScan:
    """What a scan of ``folder:PATH`` found, and the folder modification times it is valid for."""

    given: str
    root: Path
    splits: dict[str, _FolderSplit]
    classes: tuple[str, ...]
    reference: str  # the first training image (the first test image when there is no train/)
    reference_size: tuple[int, int] | None  # its width, height; None when it cannot be read
    reference_error: str  # why it cannot be read
    dirs: tuple[str, ...]
    stamp: tuple[int, ...]
    info: DatasetInfo

    @property
    def signature(self) -> str:
        """Digest of the folder listing's modification times (part of the decoded-image cache key)."""
        return hashlib.sha256(repr((self.dirs, self.stamp)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class _DecodeSpec:
    """How to decode a folder's images: to ``size``×``size``, resizing, or checking they already are."""

    title: str
    size: int
    resize: bool
    reference: str


_SCANS: OrderedDict[str, _FolderScan] = OrderedDict()
_DECODED: OrderedDict[tuple[str, str, int, bool, str, int], torch.Tensor] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_folder_cache() -> None:
    """Forget cached folder scans and decoded images (they are otherwise kept for the process)."""
    with _CACHE_LOCK:
        _SCANS.clear()
        _DECODED.clear()


def _folder_root(given: str) -> Path:
    """PATH as an absolute path: ``~`` expanded, relative to the current folder."""
    return Path(os.path.abspath(os.path.expanduser(given)))


def _dir_stamp(dirs: Sequence[str]) -> tuple[int, ...] | None:
    """Modification times of ``dirs`` (they change when entries are added, removed or renamed)."""
    try:
        return tuple(os.stat(d).st_mtime_ns for d in dirs)
    except OSError:
        return None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(FOLDER_SUFFIXES)


def _class_files(title: str, folder: str, dirs: list[str]) -> tuple[list[str], int, str]:
    """Paths relative to ``folder`` of the image files below one class folder (sorted), how many
    other files it holds and the name of one; ``dirs`` collects the folders walked."""
    found: list[str] = []
    others = 0
    other_name = ""
    cut = len(folder) + len(os.sep)
    stack = [folder]
    seen: set[str] = set()
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in seen:  # a symlink loop, or two links to one folder
            continue
        seen.add(real)
        dirs.append(current)
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            raise DatasetError(f"{title}: cannot list {current}: {_reason(exc)}") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                stack.append(entry.path)
            elif _is_image_name(entry.name):
                if entry.is_file():
                    found.append(entry.path[cut:])
            elif entry.is_file():
                others += 1
                other_name = other_name or entry.name
    found.sort()
    return found, others, other_name


def _scan_split(title: str, folder: Path, dirs: list[str]) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """Class folders of one split and their image files; one-line errors for an empty split or class."""
    dirs.append(str(folder))
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"{title}: cannot list {folder}: {_reason(exc)}") from exc
    classes = tuple(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    if not classes:
        loose = sum(1 for e in entries if _is_image_name(e.name))
        where = f"it holds {loose:,} image{'s' if loose != 1 else ''} directly: " if loose else ""
        raise DatasetError(f"{title}: {folder} has no class folders; {where}put each class's images in a "
                           f"sub-folder named after the class ({folder}/<class>/<images>)")
    files: dict[str, list[str]] = {}
    for name in classes:
        found, others, other_name = _class_files(title, str(folder / name), dirs)
        if not found:
            also = f" (it holds {others:,} other file{'s' if others != 1 else ''}, e.g. {other_name})" if others else ""
            raise DatasetError(f"{title}: class {name!r} of {folder.name}/ has no images{also}: {folder / name}; "
                               f"images are files ending in {' '.join(FOLDER_SUFFIXES)}")
        files[name] = found
    return classes, files


def _order_key(name: str, relative: str) -> bytes:
    """Sort key of the fixed class-mixed order: a seeded hash of the class and the file's path."""
    text = f"{FOLDER_ORDER_SEED}:{name}/{relative}"
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()


def _image_size_of(path: str) -> tuple[int, int]:
    """Width and height from an image's header (nothing is decoded)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _class_mismatch(title: str, train: Sequence[str], test: Sequence[str], test_name: str) -> None:
    """One line naming the classes found in only one of the two splits, if any."""
    problems = []
    for only, have, lack in ((set(train) - set(test), "train", test_name), (set(test) - set(train), test_name, "train")):
        if only:
            names = sorted(only)
            shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            verb = "are" if len(names) > 1 else "is"
            problems.append(f"class{'es' if len(names) > 1 else ''} {shown} {verb} in {have}/ but not in {lack}/")
    if problems:
        raise DatasetError(f"{title}: {'; '.join(problems)}; both splits need the same class folders")


def _scan_folder(given: str) -> _FolderScan:
    """Scan ``folder:given`` (or return the cached scan while its folders are unchanged)."""
    root = _folder_root(given)
    key = f"{given}\0{root}"
    with _CACHE_LOCK:
        cached = _SCANS.get(key)
    if cached is not None and _dir_stamp(cached.dirs) == cached.stamp:
        return cached
    title = f"folder {given}"
    if not root.exists():
        raise DatasetError(f"{title}: no such folder {root}; expected a folder with {_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise DatasetError(f"{title}: {root} is a file, not a folder; expected a folder with {_FOLDER_LAYOUT}")
    dirs: list[str] = [str(root)]
    split_dirs = {"train": root / "train", "test": root / "test" if (root / "test").is_dir() else root / "val"}
    present = {split: folder for split, folder in split_dirs.items() if folder.is_dir()}
    if not present:
        try:
            found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        except OSError:
            found = []
        has = "it has no sub-folders" if not found else \
            f"it has {', '.join(f + '/' for f in found[:6])}{', …' if len(found) > 6 else ''}"
        raise DatasetError(f"{title}: {root} has no train/, test/ or val/ folder ({has}); expected {_FOLDER_LAYOUT}")
    listed = {split: _scan_split(title, folder, dirs) for split, folder in present.items()}
    if len(listed) == 2:
        _class_mismatch(title, listed["train"][0], listed["test"][0], present["test"].name)
    classes = listed["train"][0] if "train" in listed else listed["test"][0]
    index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, _FolderSplit] = {}
    for split, (split_classes, files) in listed.items():
        base = f"{present[split]}{os.sep}"
        pairs = [(c, f) for c in split_classes for f in files[c]]
        order = sorted(range(len(pairs)), key=lambda i: _order_key(*pairs[i]))
        splits[split] = _FolderSplit(folder=present[split], classes=split_classes,
                                     files=tuple(f"{base}{c}{os.sep}{f}" for c, f in pairs),
                                     labels=tuple(index[c] for c, _ in pairs), order=tuple(order))
    reference = (splits["train"] if "train" in splits else splits["test"]).files[0]
    reference_size: tuple[int, int] | None = None
    reference_error = ""
    try:
        reference_size = _image_size_of(reference)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError… for bad files
        reference_error = _reason(exc)
    square = reference_size is not None and reference_size[0] == reference_size[1]
    info = DatasetInfo(
        name=FOLDER_PREFIX + given, title=title, num_classes=len(classes), channels=3,
        image_size=reference_size[0] if reference_size is not None and square and "train" in splits else 0,
        mean=(0.0,) * 3, std=(1.0,) * 3,
        files=f"{_FOLDER_LAYOUT}; images are files ending in {' '.join(FOLDER_SUFFIXES)}",
        folder=str(root),
        train_size=len(splits["train"].files) if "train" in splits else 0,
        test_size=len(splits["test"].files) if "test" in splits else 0,
        source="user image folder")
    scan = _FolderScan(given=given, root=root, splits=splits, classes=classes, reference=reference,
                       reference_size=reference_size, reference_error=reference_error, dirs=tuple(dirs),
                       stamp=_dir_stamp(dirs) or (), info=info)
    with _CACHE_LOCK:
        _SCANS[key] = scan
        _SCANS.move_to_end(key)
        while len(_SCANS) > _SCAN_CACHE_ENTRIES:
            _SCANS.popitem(last=False)
    log.debug("%s: %d classes, %s", title, len(classes),
              ", ".join(f"{len(p.files):,} {s} images in {p.folder}" for s, p in splits.items()))
    return scan


def _decode_spec(scan: _FolderScan, image_size: int | None) -> _DecodeSpec:
    """Decode to ``image_size`` when given, else to the first training image's size, checked square."""
    title = scan.info.title
    if image_size is not None:
        return _DecodeSpec(title, image_size, True, scan.reference)
    if scan.reference_size is None:
        raise DatasetError(f"{title}: cannot read image {scan.reference}: {scan.reference_error}; "
                           "replace or remove the file")
    w, h = scan.reference_size
    if w != h:
        raise DatasetError(f"{title}: {scan.reference} is {w}×{h}, not square; pass --input-size N to resize "
                           "every image to N×N")
    return _DecodeSpec(title, w, False, scan.reference)


def _size_error(path: str, size: tuple[int, int], spec: _DecodeSpec) -> DatasetError:
    w, h = size
    return DatasetError(f"{spec.title}: {path} is {w}×{h} but the first training image ({spec.reference}) is "
                        f"{spec.size}×{spec.size}; images must share one size: pass --input-size N to resize them all")


def _decode_image(path: str, spec: _DecodeSpec) -> np.ndarray:
    """One image file as uint8 H×W×3 RGB at ``spec.size`` with Pillow (convert("RGB"), bilinear resize);
    a wrong size (when not resizing), an unreadable or a corrupt file is a one-line error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if not spec.resize and im.size != (spec.size, spec.size):
                raise _size_error(path, im.size, spec)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            if rgb.size != (spec.size, spec.size):
                rgb = rgb.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError… for bad files
        raise DatasetError(f"{spec.title}: cannot read image {path}: {_reason(exc)}; replace or remove the file") from exc


@functools.lru_cache(maxsize=1)
def _fast_jpeg() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's libjpeg-turbo decoder (no Python-level JPEG parsing: ~4× faster than Pillow on
    32×32 images), or None. Used only when it reproduces Pillow's pixels exactly on probe images
    (colour with 4:2:0 chroma, and grey), so either way the result is Pillow's; any failure falls back."""
    import io

    from PIL import Image

    try:
        with warnings.catch_warnings():  # the first call only (lru_cache), before any thread starts
            warnings.simplefilter("ignore")
            import torchvision.io.image as tv_image

            decode = torch.ops.image.decode_jpeg
            unchanged = int(tv_image.ImageReadMode.UNCHANGED.value)
        ramp = np.arange(24 * 24 * 3, dtype=np.uint32).reshape(24, 24, 3)
        probes = [Image.fromarray(((ramp * 37) % 251).astype(np.uint8), "RGB"),
                  Image.fromarray(((ramp[..., 0] * 11) % 253).astype(np.uint8), "L")]
        for probe in probes:
            buffer = io.BytesIO()
            probe.save(buffer, "JPEG", quality=75)
            with Image.open(io.BytesIO(buffer.getvalue())) as im:
                expected = np.asarray(im.convert("RGB"))
            got = decode(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), unchanged, False)
            got = got.expand(3, -1, -1) if got.shape[0] == 1 else got
            if not np.array_equal(got.permute(1, 2, 0).numpy(), expected):
                log.debug("torchvision's JPEG decoder differs from Pillow's; decoding with Pillow only")
                return None
    except Exception as exc:  # no torchvision image extension, a changed operator: Pillow does it all
        log.debug("no fast JPEG decoder (%s); decoding with Pillow only", _reason(exc))
        return None
    return lambda data: decode(data, unchanged, False)


def _decode_jpeg_fast(decode: Callable[[torch.Tensor], torch.Tensor], path: str, spec: _DecodeSpec) -> np.ndarray | None:
    """A JPEG as uint8 3×size×size with the fast decoder, or None for Pillow to handle (and word
    any error): unreadable, corrupt, CMYK, or a wrong size when not resizing."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except Exception:
        return None
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        return None
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if tuple(img.shape[1:]) == (spec.size, spec.size):
        return img.numpy()
    if not spec.resize:
        return None
    from PIL import Image

    small = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), "RGB").resize(
        (spec.size, spec.size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)


def _decode_into(out: np.ndarray, files: Sequence[str], start: int, stop: int, spec: _DecodeSpec) -> None:
    """Decode ``files[start:stop]`` into ``out[start:stop]`` (N×3×size×size uint8)."""
    fast = _fast_jpeg()
    for i in range(start, stop):
        path = files[i]
        if fast is not None and path.lower().endswith(_JPEG_SUFFIXES):
            img = _decode_jpeg_fast(fast, path, spec)
            if img is not None:
                out[i] = img
                continue
        out[i] = _decode_image(path, spec).transpose(2, 0, 1)


def _decode_all(files: Sequence[str], spec: _DecodeSpec) -> torch.Tensor:
    """All ``files`` as one uint8 N×3×size×size tensor, decoded by a pool of os.cpu_count() threads
    (the decoders release the GIL while they decode); the first bad file in order raises its error."""
    n = len(files)
    out = np.empty((n, 3, spec.size, spec.size), dtype=np.uint8)
    chunks = [(a, min(a + _DECODE_CHUNK, n)) for a in range(0, n, _DECODE_CHUNK)]
    workers = min(os.cpu_count() or 1, len(chunks))
    _fast_jpeg()  # probe once here, not in several threads at once
    if workers <= 1:
        for a, b in chunks:
            _decode_into(out, files, a, b, spec)
        return torch.from_numpy(out)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tncompress-decode")
    try:
        futures: list[Future[None]] = [pool.submit(_decode_into, out, files, a, b, spec) for a, b in chunks]
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(out)


def _cache_budget() -> int:
    """Bytes of decoded images that may be held in memory (``$TNCOMPRESS_CACHE_MB``, in MiB)."""
    text = os.environ.get(ENV_CACHE_MB, "").strip()
    if not text:
        return DEFAULT_CACHE_MB * 2**20
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not math.isfinite(mb) or mb < 0:
        raise DatasetError(f"{ENV_CACHE_MB} must be a number of megabytes >= 0, got {text!r}")
    return int(mb * 2**20)


def _decoded_images(scan: _FolderScan, split: str, files: Sequence[str], spec: _DecodeSpec,
                    budget: int) -> torch.Tensor:
    """The decoded images of the first ``len(files)`` samples of ``split``: from the process-wide cache
    (a longer decoded prefix of the same order serves too), else decoded now and cached. The cache
    keeps the last two, within ``budget`` bytes."""
    base = (str(scan.root), split, spec.size, spec.resize, scan.signature)
    n = len(files)
    with _CACHE_LOCK:
        for key, images in reversed(_DECODED.items()):
            if key[:5] == base and len(images) >= n:
                _DECODED.move_to_end(key)
                log.debug("%s %s: %s decoded images from the cache", spec.title, split, f"{n:,}")
                return images[:n]
    started = time.perf_counter()
    log.info("%s %s: decoding %s images to %d×%d (up to %d threads)", spec.title, split, f"{n:,}",
             spec.size, spec.size, os.cpu_count() or 1)
    images = _decode_all(files, spec)
    log.info("%s %s: decoded %s images in %.1f s (%.0f MB in memory)", spec.title, split, f"{n:,}",
             time.perf_counter() - started, images.numel() / 2**20)
    with _CACHE_LOCK:
        key = (*base, n)
        _DECODED[key] = images
        _DECODED.move_to_end(key)
        total = sum(t.numel() for t in _DECODED.values())
        while len(_DECODED) > 1 and (len(_DECODED) > _DECODED_CACHE_ENTRIES or total > budget):
            _, dropped = _DECODED.popitem(last=False)
            total -= dropped.numel()
    return images


class FolderImageDataset(ImageDataset):
    """A user's image folder (``folder:PATH``). ``files`` are the samples' image paths (strings, in
    the dataset's order); ``images`` holds them decoded (uint8 N×3×H×W) when they fit
    ``$TNCOMPRESS_CACHE_MB``, else it is None and each batch is decoded from its files."""

    def __init__(self, info: DatasetInfo, split: str, files: list[str], targets: torch.Tensor, *,
                 images: torch.Tensor | None, spec: _DecodeSpec, **kwargs: Any) -> None:
        super().__init__(info, split, targets, **kwargs)
        self.files = files
        self.images = images
        self.spec = spec

    @property
    def in_memory(self) -> bool:
        """Whether the decoded images are held in memory (else each batch is decoded from its files)."""
        return self.images is not None

    def _raw_batch(self, indices: Sequence[int]) -> torch.Tensor:
        if self.images is not None:
            return self.images[list(indices)]
        out = np.empty((len(indices), 3, self.spec.size, self.spec.size), dtype=np.uint8)
        _decode_into(out, [self.files[i] for i in indices], 0, len(indices), self.spec)
        return torch.from_numpy(out)


def _check_folder_split(title: str, split: str) -> str:
    key = str(split).strip().lower()
    if key in ("train", "test"):
        return key
    if key in ("val", "valid", "validation"):
        return "test"
    raise DatasetError(f"{title} has no split {split!r}; use 'train' or 'test' (read from test/, or val/ "
                       "when there is no test/)")


def _load_folder(given: str, split: str, *, image_size: int | None, limit: int | None,
                 **kwargs: Any) -> FolderImageDataset:
    """The ``folder:given`` dataset's ``split`` (the module docstring gives the layout and rules)."""
    title = f"folder {given}"
    split = _check_folder_split(title, split)
    budget = _cache_budget()
    scan = _scan_folder(given)
    part = scan.splits.get(split)
    if part is None:
        if split == "train":
            raise DatasetError(f"{title}: {scan.root} has no train/ folder; expected {_FOLDER_LAYOUT}")
        raise DatasetError(f"{title}: {scan.root} has neither test/ nor val/ (the test split is read from one of "
                           f"them); expected {_FOLDER_LAYOUT}")
    spec = _decode_spec(scan, image_size)
    keep = part.order if limit is None else part.order[:limit]
    files = [part.files[i] for i in keep]
    targets = torch.tensor([part.labels[i] for i in keep], dtype=torch.long)
    need = len(files) * 3 * spec.size * spec.size
    images: torch.Tensor | None = None
    if need <= budget:
        images = _decoded_images(scan, split, files, spec, budget)
    else:
        log.info("%s %s: %s images would take %.0f MB decoded, over %s=%.0f; decoding them batch by batch",
                 title, split, f"{len(files):,}", need / 2**20, ENV_CACHE_MB, budget / 2**20)
        if files:  # a first unreadable file fails here, not in the first batch
            _decode_into(np.empty((1, 3, spec.size, spec.size), dtype=np.uint8), files, 0, 1, spec)
    return FolderImageDataset(scan.info, split, files, targets, images=images, spec=spec, location=part.folder,
                              classes=scan.classes, available=len(part.files), image_size=spec.size, **kwargs)


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
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageDataset:
    """A dataset of (normalised float C×H×W tensor, int label) by name and split.

    ``split`` is "train" or "test" (Tiny-ImageNet: "test" is the official labelled val split).
    ``image_size`` resizes (bilinear, antialiased; e.g. 32 for the TT paper's MNIST MLP),
    ``channels`` converts 1↔3, ``augment`` adds light training augmentation (random crop with
    padding and horizontal flip for colour sets, a small random affine for MNIST-like ones),
    ``limit`` keeps the first N samples. Missing files are downloaded by torchvision when
    ``download`` is true (never for Tiny-ImageNet); problems raise :class:`DatasetError`.

    ``mean``/``std`` replace the dataset's normalisation (one value per output channel, or one for
    all); without them named datasets use their standard statistics and ``folder:PATH`` datasets
    none. ``folder:PATH`` reads a user's image folder (module docstring): ``data_dir`` and
    ``download`` do not apply, ``image_size`` resizes at decode time, ``limit`` keeps the first N
    of a fixed class-mixed order.
    """
    image_size = _check_int(image_size, "image_size")
    channels = _check_int(channels, "channels", allowed=(1, 3))
    limit = _check_int(limit, "limit", minimum=0)
    folder = folder_path(name)
    out_channels = channels or (3 if folder is not None else dataset_info(name).channels)
    _check_stats(mean, "mean", out_channels)  # refuse bad statistics before reading any data
    _check_stats(std, "std", out_channels, positive=True)
    stats: dict[str, Any] = {"mean": mean, "std": std}
    if folder is not None:
        ds: ImageDataset = _load_folder(folder, split, image_size=image_size, limit=limit, channels=channels,
                                        augment=bool(augment), **stats)
        log.info("loaded %s", ds.describe())
        return ds
    info = dataset_info(name)
    split = _check_split(info, split)
    common: dict[str, Any] = {"image_size": image_size, "channels": channels, "augment": bool(augment), **stats}

    if info.synthetic:
        n = info.train_size if split == "train" else info.test_size
        keep = n if limit is None else min(limit, n)
        images, targets = generate_synthetic(keep, _mix_seed(SYNTHETIC_SEED, split))
        ds = TensorImageDataset(info, split, images, targets, location=None,
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
    ranks: Ranks | None = None,
) -> DataLoader:
    """A DataLoader whose order is fixed by (seed, epoch): same pair, same order; next epoch, new order.

    The generator also seeds worker processes, so augmentation is reproducible with
    ``num_workers > 0``; with ``num_workers=0`` augmentation draws from torch's global RNG
    (``torch.manual_seed`` fixes it). Memory is pinned when ``device`` is a CUDA device. With
    ``ranks`` of a distributed run, the loader yields this rank's shard
    (:func:`tncompress.distributed.shard_sampler`: a new shared order per epoch when shuffling,
    every image once when not).
    """
    batch_size = _require_int(batch_size, "batch_size")
    num_workers = _require_int(num_workers, "num_workers", minimum=0)
    generator = torch.Generator()
    generator.manual_seed(_mix_seed(seed, epoch))
    pin = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if ranks is not None and ranks.enabled:
        sampler = shard_sampler(len(dataset), ranks, shuffle=shuffle, seed=seed, epoch=epoch)  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          num_workers=num_workers or 0, pin_memory=pin, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers or 0, pin_memory=pin, drop_last=drop_last)


def dataset_summary(name: str, split: str, **options: Any) -> str:
    """One line, e.g. "MNIST train: 23,797 images (of the official 60,000), 1×32×32, from /data/MNIST/raw";
    ``options`` are :func:`load_dataset`'s."""
    return load_dataset(name, split, **options).describe()
