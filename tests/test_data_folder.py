"""``folder:PATH`` datasets: tiny image folders written with Pillow, read through the public API.

Every folder is made in ``tmp_path``; the shared CIFAR-10 JPEG copy is read (200 images) when present.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line
from PIL import Image

from tncompress import data as D

SHARED_CIFAR_JPEG = Path("/work/shared/data/cifar10-jpeg")
CLASSES = ["b_dog", "a_cat", "c_emu"]  # written unsorted: labels must follow the sorted order


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """Each test starts without cached scans or decoded images and with the default memory budget."""
    monkeypatch.delenv(D.ENV_CACHE_MB, raising=False)
    D.clear_folder_cache()
    yield
    D.clear_folder_cache()


def pattern(seed: int, size: int | tuple[int, int] = 8) -> np.ndarray:
    """A distinct uint8 H×W×3 image per seed."""
    w, h = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_image(path: Path, array: np.ndarray, fmt: str | None = None, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt)


def make_folder(root: Path, per_class: int = 3, splits: tuple[str, ...] = ("train", "test"),
                classes: list[str] = CLASSES, suffix: str = ".png", size: int = 8) -> dict[Path, np.ndarray]:
    """``root/<split>/<class>/NN<suffix>``; returns each file's pixels as written."""
    written = {}
    seed = 0
    for split in splits:
        for name in classes:
            for k in range(per_class):
                seed += 1
                path = root / split / name / f"{k:02d}{suffix}"
                written[path] = pattern(seed, size)
                write_image(path, written[path])
    return written


def load(root: Path, split: str = "train", **options) -> D.FolderImageDataset:
    ds = D.load_dataset(f"folder:{root}", split, **options)
    assert isinstance(ds, D.FolderImageDataset)
    return ds


# ---------------------------------------------------------------------------------------------
# Labels, values, layout


def test_labels_follow_sorted_classes_and_pixels_are_exact(tmp_path):
    written = make_folder(tmp_path)
    ds = load(tmp_path)
    assert ds.classes == sorted(CLASSES) and ds.num_classes == 3 and len(ds) == 9
    assert ds.shape == (3, 8, 8) and ds.in_memory
    for i in range(len(ds)):
        x, label = ds[i]
        path = Path(ds.files[i])
        assert ds.classes[label] == path.parent.name  # the label is the index of the file's folder
        raw, raw_label = ds.raw(i)
        assert raw_label == label and torch.equal(raw, torch.from_numpy(written[path]).permute(2, 0, 1))
        assert torch.allclose(x, raw.float() / 255, atol=1e-6)  # not normalised: values in [0, 1]
    assert ds.mean == (0.0,) * 3 and ds.std == (1.0,) * 3
    assert ds.normalization == "none (values in [0, 1])"
    assert "normalisation: none (values in [0, 1])" in ds.describe() and str(tmp_path / "train") in ds.describe()


def test_train_and_test_agree_val_accepted_and_info(tmp_path):
    make_folder(tmp_path, splits=("train", "val"))
    train, test = load(tmp_path, "train"), load(tmp_path, "test")
    assert test.location == tmp_path / "val" and train.classes == test.classes
    for ds in (train, test):
        assert [ds.classes[int(y)] for y in ds.targets] == [Path(f).parent.name for f in ds.files]
    assert torch.equal(load(tmp_path, "val").targets, test.targets)  # "val" names the test split
    info = D.dataset_info(f"folder:{tmp_path}")
    assert (info.name, info.title) == (f"folder:{tmp_path}", f"folder {tmp_path}")
    assert (info.num_classes, info.channels, info.image_size, info.train_size, info.test_size) == (3, 3, 8, 9, 9)
    assert info.mean == (0.0,) * 3 and info.std == (1.0,) * 3 and info.source == "user image folder"
    assert D.dataset_info(info.name) == info  # the name round-trips (DataOptions resolves names once)
    assert D.is_folder_dataset(info.name) and not D.is_folder_dataset("mnist")


def test_test_split_from_test_rather_than_val(tmp_path):
    make_folder(tmp_path, splits=("train", "test"))
    make_folder(tmp_path, splits=("val",), per_class=1)
    assert len(load(tmp_path, "test")) == 9  # test/ wins over val/


def test_formats_hidden_and_other_files(tmp_path):
    base = tmp_path / "train"
    arrays = {name: pattern(k) for k, name in enumerate(["a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.gif", "f.tiff",
                                                         "g.webp", "h.ppm"])}
    for name, array in arrays.items():
        write_image(base / "one" / name, array)
    write_image(base / "two" / "deeper" / "x.png", pattern(50))  # sub-folders of a class count for it
    write_image(base / "two" / "gray.pgm", pattern(51), mode="L")
    write_image(base / "two" / ".hidden.png", pattern(52))
    (base / "two" / "notes.txt").write_text("not an image")
    write_image(base / ".ipynb_checkpoints" / "a.png", pattern(53))  # a hidden folder is no class
    (base / "README.md").write_text("loose files in the split folder are ignored")
    ds = load(tmp_path)
    assert ds.classes == ["one", "two"] and len(ds) == len(arrays) + 2
    by_name = {Path(f).name: i for i, f in enumerate(ds.files)}
    for name in ("a.PNG", "d.bmp", "f.tiff", "h.ppm"):  # lossless formats read exactly
        assert torch.equal(ds.raw(by_name[name])[0], torch.from_numpy(arrays[name]).permute(2, 0, 1)), name
    for name in ("b.jpg", "c.JPEG", "e.gif", "g.webp"):  # lossy or palette formats: what Pillow decodes
        with Image.open(base / "one" / name) as im:
            expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(ds.raw(by_name[name])[0], expected), name
    gray = ds.raw(by_name["gray.pgm"])[0]
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_name_prefix_any_case_path_as_written(tmp_path, monkeypatch):
    make_folder(tmp_path / "Pets")
    monkeypatch.chdir(tmp_path)
    assert len(D.load_dataset("FOLDER:Pets", "train", data_dir=tmp_path / "elsewhere")) == 9  # relative to cwd
    monkeypatch.setenv("HOME", str(tmp_path))
    assert D.dataset_info("folder:~/Pets").num_classes == 3
    if not (tmp_path / "pets").exists():  # a case-sensitive file system
        with pytest.raises(D.DatasetError) as exc:
            D.load_dataset("folder:pets", "train")
        one_line(exc, "no such folder", str(tmp_path / "pets"))


def test_channels_one_takes_luma(tmp_path):
    make_folder(tmp_path)
    colour, gray = load(tmp_path), load(tmp_path, channels=1)
    assert gray.shape == (1, 8, 8) and gray.mean == (0.0,) and gray.std == (1.0,)
    luma = torch.tensordot(colour[0][0], torch.tensor([0.299, 0.587, 0.114]), dims=([0], [0]))
    assert torch.allclose(gray[0][0][0], luma, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Normalisation


def test_mean_std_override_on_a_folder(tmp_path):
    make_folder(tmp_path)
    ds = load(tmp_path, mean=[0.5, 0.25, 0.0], std=[0.5])
    raw = ds.raw(0)[0].float() / 255
    expected = (raw - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1)) / 0.5
    assert torch.allclose(ds[0][0], expected, atol=1e-6)
    assert ds.mean == (0.5, 0.25, 0.0) and ds.std == (0.5, 0.5, 0.5)
    assert ds.normalization == "given (--mean/--std)" and "normalisation: given (--mean/--std)" in ds.describe()
    assert torch.allclose(ds.denormalize(ds[0][0]), raw, atol=1e-6)
    only_mean = load(tmp_path, mean=(0.5,))
    assert only_mean.std == (1.0,) * 3 and only_mean.normalization == "mean given (--mean), std 1"


def test_mean_std_override_on_a_named_dataset():
    default = D.load_dataset("synthetic", "test", limit=4)
    assert default.normalization == "Synthetic's mean/std (dataset default)"
    assert "normalisation" not in default.describe()  # the standard statistics go unmentioned
    ds = D.load_dataset("synthetic", "test", limit=4, mean=[0.2], std=[0.4])
    assert torch.allclose(ds[1][0], (ds.raw(1)[0].float() / 255 - 0.2) / 0.4, atol=1e-6)
    assert ds.normalization == "given (--mean/--std)" and "given (--mean/--std)" in ds.describe()
    three = D.load_dataset("synthetic", "test", limit=4, channels=3, std=[0.1, 0.2, 0.3])
    assert three.std == (0.1, 0.2, 0.3) and three.mean == (0.1440,) * 3
    assert three.normalization == "std given (--std), Synthetic's mean (dataset default)"


@pytest.mark.parametrize("mean,std,needles", [
    ([float("nan")], None, ("mean", "finite", "nan")),
    ([0.1, 0.2], None, ("mean", "needs 3 values", "got 2")),
    (None, [0.0], ("std", "> 0")),
    (None, [0.5, -1.0, 0.5], ("std", "> 0", "-1.0")),
    ("abc", None, ("mean", "list of numbers", "'abc'")),
    ([True], None, ("mean", "numbers", "True")),
    (None, [], ("std", "got 0")),
])
def test_mean_std_are_validated(tmp_path, mean, std, needles):
    make_folder(tmp_path)
    with pytest.raises(D.DatasetError) as exc:
        load(tmp_path, mean=mean, std=std)
    one_line(exc, *needles)


def test_named_datasets_validate_mean_std_per_output_channel():
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("synthetic", "test", limit=2, mean=[0.1, 0.2, 0.3])  # synthetic has 1 channel
    one_line(exc, "mean", "needs 1 value", "got 3")
    assert D.load_dataset("synthetic", "test", limit=2, channels=3, mean=[0.1, 0.2, 0.3]).mean == (0.1, 0.2, 0.3)


# ---------------------------------------------------------------------------------------------
# Sizes


def test_image_size_resizes_at_decode_time(tmp_path):
    write_image(tmp_path / "train" / "a" / "wide.png", pattern(1, (12, 8)))
    write_image(tmp_path / "train" / "b" / "big.png", pattern(2, (20, 20)))
    ds = load(tmp_path, image_size=6)
    assert ds.shape == (3, 6, 6) and ds.images is not None and ds.images.shape == (2, 3, 6, 6)
    for i, f in enumerate(ds.files):
        with Image.open(f) as im:
            expected = np.array(im.convert("RGB").resize((6, 6), Image.Resampling.BILINEAR))
        assert torch.equal(ds.raw(i)[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_a_different_size_without_image_size_names_the_file(tmp_path):
    make_folder(tmp_path, splits=("train",))
    odd = tmp_path / "train" / "c_emu" / "odd.png"
    write_image(odd, pattern(99, 10))
    with pytest.raises(D.DatasetError) as exc:
        load(tmp_path)
    one_line(exc, str(odd), "10×10", "8×8", "pass --input-size N")
    assert load(tmp_path, image_size=8).shape == (3, 8, 8)


def test_a_non_square_first_image_needs_image_size(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", pattern(1, (10, 8)))
    assert D.dataset_info(f"folder:{tmp_path}").image_size == 0  # no square native size
    with pytest.raises(D.DatasetError) as exc:
        load(tmp_path)
    one_line(exc, "0.png", "10×8", "not square", "--input-size N")
    assert load(tmp_path, image_size=4).shape == (3, 4, 4)


# ---------------------------------------------------------------------------------------------
# Errors


def test_folder_errors_are_one_line_and_name_the_culprit(tmp_path):
    def fails(name: str, split: str, *needles: str) -> None:
        D.clear_folder_cache()
        with pytest.raises(D.DatasetError) as exc:
            D.load_dataset(name, split)
        one_line(exc, *needles)

    fails("folder:", "train", "names no folder", "folder:PATH")
    fails("folder:   ", "train", "names no folder")
    fails(f"folder:{tmp_path / 'nowhere'}", "train", "no such folder", str(tmp_path / "nowhere"))
    (tmp_path / "file.txt").write_text("x")
    fails(f"folder:{tmp_path / 'file.txt'}", "train", "is a file, not a folder")
    (tmp_path / "bare" / "images").mkdir(parents=True)
    fails(f"folder:{tmp_path / 'bare'}", "train", "no train/, test/ or val/", "images/")

    only_test = tmp_path / "only_test"
    make_folder(only_test, splits=("test",))
    fails(f"folder:{only_test}", "train", "has no train/ folder", str(only_test))
    assert len(D.load_dataset(f"folder:{only_test}", "test")) == 9  # the test split alone still loads
    only_train = tmp_path / "only_train"
    make_folder(only_train, splits=("train",))
    fails(f"folder:{only_train}", "test", "neither test/ nor val/")
    fails(f"folder:{only_train}", "dev", "no split 'dev'", "'train' or 'test'")

    flat = tmp_path / "flat"
    write_image(flat / "train" / "0.png", pattern(0))
    fails(f"folder:{flat}", "train", "has no class folders", "1 image directly", str(flat / "train"))
    empty = tmp_path / "empty"
    make_folder(empty, splits=("train", "test"))
    (empty / "test" / "d_fox").mkdir()
    (empty / "test" / "d_fox" / "list.csv").write_text("a,b")
    fails(f"folder:{empty}", "train", "class 'd_fox' of test/ has no images", "list.csv")

    mismatch = tmp_path / "mismatch"
    make_folder(mismatch, splits=("train",))
    make_folder(mismatch, splits=("val",), classes=["a_cat", "b_dog", "z_yak"])
    fails(f"folder:{mismatch}", "test", "class 'c_emu' is in train/ but not in val/",
          "class 'z_yak' is in val/ but not in train/")

    corrupt = tmp_path / "corrupt"
    make_folder(corrupt, splits=("train",))
    bad = corrupt / "train" / "b_dog" / "01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing useful")
    fails(f"folder:{corrupt}", "train", "cannot read image", str(bad))


def test_a_truncated_jpeg_is_named(tmp_path, monkeypatch):
    make_folder(tmp_path, splits=("train",), suffix=".jpg")
    bad = tmp_path / "train" / "c_emu" / "02.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    for budget in ("4096", "0"):  # decoded at load time, and batch by batch
        monkeypatch.setenv(D.ENV_CACHE_MB, budget)
        with pytest.raises(D.DatasetError) as exc:
            ds = load(tmp_path)
            [ds[i] for i in range(len(ds))]
        one_line(exc, "cannot read image", str(bad))


def test_bad_cache_budget_is_one_line(tmp_path, monkeypatch):
    make_folder(tmp_path)
    monkeypatch.setenv(D.ENV_CACHE_MB, "lots")
    with pytest.raises(D.DatasetError) as exc:
        load(tmp_path)
    one_line(exc, D.ENV_CACHE_MB, "'lots'")


def test_unknown_names_mention_folders():
    with pytest.raises(D.DatasetError) as exc:
        D.dataset_info("pets")
    one_line(exc, "folder:PATH")


# ---------------------------------------------------------------------------------------------
# Order, limit, caching, lazy decoding


def test_limit_keeps_a_fixed_class_mixed_subset(tmp_path):
    make_folder(tmp_path, per_class=10, splits=("train",))
    full = load(tmp_path)
    assert sorted(full.files) == sorted(str(p) for p in (tmp_path / "train").rglob("*.png"))
    assert full.targets.bincount().tolist() == [10, 10, 10]
    assert full.targets[:10].unique().numel() > 1  # not sorted by class
    six = load(tmp_path, limit=6)
    assert six.files == full.files[:6] and torch.equal(six.targets, full.targets[:6])
    assert six.targets.unique().numel() >= 2, six.targets
    assert "first 6 of 30 in a fixed class-mixed order" in six.describe()
    D.clear_folder_cache()
    again = load(tmp_path, limit=6)
    assert again.files == six.files and torch.equal(again.images, six.images)  # same on every run
    # adding a file does not move the others: the order is a hash of each file's own name
    write_image(tmp_path / "train" / "a_cat" / "zz.png", pattern(777))
    D.clear_folder_cache()
    grown = load(tmp_path)
    assert [f for f in grown.files if not f.endswith("zz.png")] == full.files


def test_decoded_images_are_cached_per_process(tmp_path, monkeypatch):
    make_folder(tmp_path, per_class=4)
    calls = []
    real = D._decode_all

    def counting(files, spec):
        calls.append(len(files))
        return real(files, spec)

    monkeypatch.setattr(D, "_decode_all", counting)
    first = load(tmp_path)
    second = load(tmp_path, augment=True)
    assert calls == [12]
    assert second.images.data_ptr() == first.images.data_ptr() and torch.equal(second.images, first.images)
    assert torch.equal(load(tmp_path, limit=5).images, first.images[:5]) and calls == [12]  # a prefix serves
    load(tmp_path, "test")
    load(tmp_path, image_size=4)
    assert calls == [12, 12, 12]  # another split or size is decoded
    # a changed listing is scanned and decoded again
    new = tmp_path / "train" / "a_cat" / "new.png"
    write_image(new, pattern(500))
    folder = tmp_path / "train" / "a_cat"
    stat = folder.stat()
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # coarse clocks
    grown = load(tmp_path)
    assert len(grown) == 13 and str(new) in grown.files and calls[-1] == 13


def test_lazy_decoding_gives_the_same_values(tmp_path, monkeypatch):
    make_folder(tmp_path, suffix=".jpg")
    make_folder(tmp_path / "png")
    for root in (tmp_path, tmp_path / "png"):
        cached = load(root, mean=[0.4], std=[0.2])
        monkeypatch.setenv(D.ENV_CACHE_MB, "0")
        lazy = load(root, mean=[0.4], std=[0.2])
        monkeypatch.delenv(D.ENV_CACHE_MB)
        assert cached.in_memory and not lazy.in_memory and lazy.images is None
        assert lazy.files == cached.files and torch.equal(lazy.targets, cached.targets)
        lazy_batch = torch.stack([x for x, _ in lazy.__getitems__(list(range(len(lazy))))])
        cached_batch = torch.stack([x for x, _ in cached.__getitems__(list(range(len(cached))))])
        assert torch.equal(lazy_batch, cached_batch)


def test_fast_jpeg_path_matches_pillow(tmp_path, monkeypatch):
    if D._fast_jpeg() is None:
        pytest.skip("no torchvision JPEG decoder here: Pillow decodes everything")
    base = tmp_path / "train" / "a"
    for k in range(3):
        write_image(base / f"rgb{k}.jpg", pattern(k, 12))
    write_image(base / "gray.jpg", pattern(7, 12), mode="L")
    write_image(base / "cmyk.jpg", pattern(8, 12), mode="CMYK")
    write_image(base / "png_named.jpg", pattern(9, 12), fmt="PNG")  # the content decides, not the suffix
    results = []
    for fast in (True, False):
        D.clear_folder_cache()
        if not fast:
            monkeypatch.setattr(D, "_fast_jpeg", lambda: None)
        results.append((load(tmp_path).images, load(tmp_path, image_size=5).images))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_loader_and_augmentation(tmp_path):
    make_folder(tmp_path, per_class=4)
    ds = load(tmp_path, augment=True)
    xb, yb = next(iter(D.make_loader(ds, 5, shuffle=True, seed=1)))
    assert xb.shape == (5, 3, 8, 8) and yb.dtype == torch.long and xb.min() >= 0 and xb.max() <= 1
    plain = load(tmp_path)
    batches = list(D.make_loader(plain, 5, shuffle=False))
    assert sum(len(y) for _, y in batches) == 12
    assert torch.equal(batches[0][0], torch.stack([plain[i][0] for i in range(5)]))
    assert batches[0][1].tolist() == plain.targets[:5].tolist()


# ---------------------------------------------------------------------------------------------
# The shared CIFAR-10 JPEG copy


@pytest.mark.skipif(not (SHARED_CIFAR_JPEG / "test").is_dir(), reason="no shared cifar10-jpeg folder")
def test_shared_cifar10_jpeg_folder():
    ds = load(SHARED_CIFAR_JPEG, "test", limit=200)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(ds) == 200 and ds.available == 10_000 and ds.shape == (3, 32, 32)
    assert ds.targets.unique().numel() == 10  # the class-mixed order reaches every class
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and ds.classes[y] == Path(ds.files[0]).parent.name
    info = D.dataset_info(f"folder:{SHARED_CIFAR_JPEG}")
    assert (info.num_classes, info.image_size, info.train_size, info.test_size) == (10, 32, 50_000, 10_000)
