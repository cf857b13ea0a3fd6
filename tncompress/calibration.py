"""Calibration images: a few hundred real training images, shaped and normalised as the model
expects, on which the decomposition's errors and bounds, a budget's sensitivities and the
data-aware factors are measured (instead of Gaussian noise)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tncompress.checkpoint import LoadedModel
from tncompress.errors import TncompressError
from tncompress.finetune import DataOptions, input_geometry, normalization, normalization_source


@dataclass
class Calibration:
    """The images and one line saying what they are."""

    images: torch.Tensor
    description: str


def calibration_images(loaded: LoadedModel, data: DataOptions, count: int, seed: int = 0) -> Calibration:
    """``count`` images of ``data``'s training split for ``loaded``'s model: a seeded random choice
    for the named datasets (held in memory anyway), the first ``count`` of a folder's fixed
    interleaved order (so only those are decoded)."""
    from tncompress.data import is_folder_dataset, load_dataset

    if count < 1:
        raise TncompressError(f"--calibration-size must be at least 1, got {count}")
    channels, size = input_geometry(loaded, data)
    folder = is_folder_dataset(data.name)
    train_set = load_dataset(data.name, "train", data_dir=data.data_dir, image_size=size, channels=channels,
                             download=data.download, limit=count if folder else data.limit_train,
                             **normalization(loaded, data))
    if folder:
        picks = list(range(len(train_set)))
    else:
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randperm(len(train_set), generator=gen)[: min(count, len(train_set))].tolist()
    images = torch.stack([x for x, _ in train_set.__getitems__(picks)])
    title = train_set.info.title
    text = (f"{title} train, {len(picks):,} images, {images.shape[1]}×{images.shape[2]}×{images.shape[3]}, "
            f"normalised: {normalization_source(loaded, data, train_set)['source']}")
    return Calibration(images, text)
