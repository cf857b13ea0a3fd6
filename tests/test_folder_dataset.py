"""folder:PATH datasets written by the test: class order, exact pixels, splits, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tncompress.data import DatasetError, clear_folder_cache, dataset_info, load_dataset


def _write(root, split, cls, index, value, suffix=".png"):
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.full((8, 8, 3), value, dtype=np.uint8)
    pixels[0, 0] = (index * 10) % 256
    Image.fromarray(pixels).save(folder / f"{index}{suffix}")


@pytest.fixture
def folder(tmp_path):
    clear_folder_cache()
    for split, n in (("train", 3), ("val", 2)):
        for k, cls in enumerate(["zebra", "ant", "mole"]):
            for i in range(n):
                _write(tmp_path, split, cls, i, 40 * (k + 1))
    return tmp_path


def test_classes_in_sorted_order_and_exact_unnormalised_pixels(folder):
    train = load_dataset(f"folder:{folder}", "train")
    test = load_dataset(f"folder:{folder}", "test")  # read from val/
    assert train.classes == test.classes == ["ant", "mole", "zebra"]
    assert dataset_info(f"folder:{folder}").num_classes == 3 and len(train) == 9 and len(test) == 6
    for i in range(len(train)):
        x, label = train[i]
        value = {"ant": 80, "mole": 120, "zebra": 40}[train.classes[label]]
        assert x.shape == (3, 8, 8) and torch.allclose(x[:, 4, 4], torch.full((3,), value / 255.0))


def test_given_mean_and_std_are_applied(folder):
    ds = load_dataset(f"folder:{folder}", "train", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    x, label = ds[0]
    value = {"ant": 80, "mole": 120, "zebra": 40}[ds.classes[label]]
    assert torch.allclose(x[:, 4, 4], torch.full((3,), (value / 255.0 - 0.5) / 0.25), atol=1e-6)


def test_a_class_missing_from_one_split_is_one_line(folder):
    for f in (folder / "val" / "mole").iterdir():
        f.unlink()
    (folder / "val" / "mole").rmdir()
    clear_folder_cache()
    with pytest.raises(DatasetError, match="mole") as info:
        load_dataset(f"folder:{folder}", "test")
    assert "\n" not in str(info.value)


def test_an_unreadable_image_is_named(folder):
    bad = folder / "train" / "ant" / "broken.jpg"
    bad.write_bytes(b"not an image")
    clear_folder_cache()
    with pytest.raises(DatasetError, match="broken.jpg") as info:
        load_dataset(f"folder:{folder}", "train")
    assert "\n" not in str(info.value)


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(DatasetError, match="no such folder") as info:
        load_dataset(f"folder:{tmp_path / 'nowhere'}", "train")
    assert "\n" not in str(info.value)
