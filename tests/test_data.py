"""Datasets by name: tiny files written in each real on-disk format, read through the public API.

Nothing here touches the network: an autouse fixture makes every urlopen fail like an offline
machine. The real shared MNIST is checked when ``../shared/data`` (or /work/shared/data) has it.
"""
from __future__ import annotations

import collections
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_line

from tncompress import data as D

ROOT = Path(__file__).resolve().parents[1]
SHARED_CANDIDATES = [ROOT.parent / "shared" / "data", Path("/work/shared/data")]
SHARED_DATA = next((p for p in SHARED_CANDIDATES if (p / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()), None)
MNIST_TRAIN_CLASS_COUNTS = [2361, 2706, 2326, 2466, 2330, 2118, 2353, 2470, 2275, 2392]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no user environment: downloads fail as they do on an offline machine."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv(D.ENV_DATA, raising=False)
    monkeypatch.delenv(D.ENV_NO_DOWNLOAD, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# ---------------------------------------------------------------------------------------------
# Writers of the real formats


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: magic 0x00000803 / 0x00000801 (uint8, ndim), big-endian dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


MNIST_LIKE = [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]


def write_mnist_like(root: Path, folder: str, n_train: int = 20, n_test: int = 7, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 5, seed: int = 0, bytes_keys: bool = True) -> dict:
    """The 'python version': pickled dicts, data uint8 N×3072 (R, G, B planes of 32×32), labels list."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list] = {"train": [], "test": []}
    names = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for k, (name, split) in enumerate(names):
        n = n_test if split == "test" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        entry = {"batch_label": f"batch {k}", "labels": labels, "data": data,
                 "filenames": [f"img_{k}_{j}.png" for j in range(n)]}
        if bytes_keys and k == 1:  # keys as bytes, as a Python 2 pickle read with encoding="bytes" would have them
            entry = {key.encode(): value for key, value in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)  # the originals are Python 2 pickles (protocol 2)
        out[split].append((data, labels))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {split: (np.concatenate([d for d, _ in parts]), sum((lab for _, lab in parts), []))
            for split, parts in out.items()}


TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]


def smooth_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A smooth RGB image (JPEG keeps those close to the original)."""
    coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
    t = torch.from_numpy(coarse).permute(2, 0, 1)[None]
    big = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return big.round().clamp(0, 255).to(torch.uint8).numpy()


def write_tiny_imagenet(root: Path, per_class: int = 2, n_val: int = 5, seed: int = 0) -> dict:
    """Official layout: wnids.txt, train/<wnid>/images/<wnid>_<k>.JPEG, val/images + annotations."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    originals: dict[str, list] = {"train": [], "test": []}
    for label, wnid in enumerate(TINY_WNIDS):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(per_class):
            img = smooth_image(rng)
            path = folder / f"{wnid}_{k}.JPEG"
            if label == 1 and k == 0:  # a greyscale JPEG, as some official images are
                img = img.mean(axis=2).round().astype(np.uint8)
                Image.fromarray(img, mode="L").save(path, quality=95)
                img = np.repeat(img[..., None], 3, axis=2)
            else:
                Image.fromarray(img).save(path, quality=95)
            originals["train"].append((path, img, label))
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for k in range(n_val):
        label = (2 * k + 1) % len(TINY_WNIDS)
        img = smooth_image(rng)
        path = base / "val" / "images" / f"val_{k}.JPEG"
        Image.fromarray(img).save(path, quality=95)
        lines.append(f"val_{k}.JPEG\t{TINY_WNIDS[label]}\t0\t0\t63\t63")
        originals["test"].append((path, img, label))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "test" / "images").mkdir(parents=True)  # the unlabelled official test split: ignored
    return originals


def pixels(ds: D.ImageDataset, index: int) -> torch.Tensor:
    """Item ``index`` with its normalisation undone, as 0..255 values."""
    x, _ = ds[index]
    return ds.denormalize(x) * 255


# ---------------------------------------------------------------------------------------------
# Registry, names, data root


def test_registry_has_the_datasets_with_standard_constants():
    assert set(D.DATASETS) == {"mnist", "fashion-mnist", "cifar10", "tiny-imagenet", "synthetic"}
    assert D.DATASETS["mnist"].mean == (0.1307,) and D.DATASETS["mnist"].std == (0.3081,)
    assert D.DATASETS["fashion-mnist"].mean == (0.2860,) and D.DATASETS["fashion-mnist"].std == (0.3530,)
    assert D.DATASETS["cifar10"].channels == 3 and len(D.DATASETS["cifar10"].mean) == 3
    assert D.DATASETS["tiny-imagenet"].mean == (0.485, 0.456, 0.406)
    assert D.DATASETS["tiny-imagenet"].num_classes == 200 and D.DATASETS["tiny-imagenet"].image_size == 64
    assert D.DATASETS["synthetic"].synthetic and not D.DATASETS["mnist"].synthetic
    for info in D.DATASETS.values():
        assert len(info.mean) == len(info.std) == info.channels and info.files


def test_unknown_name_is_one_line_with_a_suggestion():
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("mnsit", "train")
    one_line(exc, "'mnsit'", "did you mean 'mnist'", "fashion-mnist", "cifar10", "tiny-imagenet", "synthetic")
    assert D.dataset_info("CIFAR_10").name == "cifar10" and D.dataset_info("FashionMNIST").name == "fashion-mnist"


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("synthetic", "validation")
    one_line(exc, "'validation'", "train", "test")
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("synthetic", "train", channels=2)
    one_line(exc, "channels", "1 or 3")
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("synthetic", "train", image_size=0)
    one_line(exc, "image_size")
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("synthetic", "train", limit=-1)
    one_line(exc, "limit")


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert D.data_root() == tmp_path / "home" / ".cache" / "tncompress" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.data_root() == tmp_path / "xdg" / "tncompress" / "data"
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path / "env"))
    assert D.data_root() == tmp_path / "env"
    assert D.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert D.data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: idx files


@pytest.mark.parametrize("name,folder", MNIST_LIKE)
def test_idx_files_read_exactly(tmp_path, name, folder):
    arrays = write_mnist_like(tmp_path, folder)
    for split in ("train", "test"):
        images, labels = arrays[split]
        ds = D.load_dataset(name, split, data_dir=tmp_path, download=False)
        assert len(ds) == len(labels) and ds.shape == (1, 28, 28)
        assert ds.targets.tolist() == labels.tolist()
        for i in (0, len(ds) - 1):
            raw, label = ds.raw(i)
            assert raw.dtype == torch.uint8 and torch.equal(raw[0], torch.from_numpy(images[i]))
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y == labels[i]
            assert torch.allclose(pixels(ds, i)[0], torch.from_numpy(images[i]).float(), atol=1e-3)
        assert ds.location == tmp_path / folder / "raw"


def test_environment_variable_names_the_root(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "MNIST")
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path))
    assert len(D.load_dataset("mnist", "test", download=False)) == 7


def test_resize_channels_and_limit(tmp_path):
    arrays = write_mnist_like(tmp_path, "MNIST")
    ds = D.load_dataset("mnist", "train", data_dir=tmp_path, image_size=32, channels=3, limit=5, download=False)
    assert len(ds) == 5 and ds.shape == (3, 32, 32)
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and y == arrays["train"][1][4]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert ds.mean == (0.1307,) * 3
    # resizing is bilinear: a constant image stays constant, and 28 → 28 is the identity
    const = torch.full((1, 1, 28, 28), 0.5)
    assert torch.allclose(ds.transform(const), torch.full((1, 3, 32, 32), (0.5 - 0.1307) / 0.3081), atol=1e-5)
    full = D.load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    assert len(full) == 20 and torch.equal(full.raw(3)[0], ds.raw(3)[0])
    assert len(D.load_dataset("mnist", "train", data_dir=tmp_path, download=False, limit=1000)) == 20


def test_summary_line(tmp_path):
    write_mnist_like(tmp_path, "MNIST")
    line = D.dataset_summary("mnist", "train", data_dir=tmp_path, image_size=32, download=False)
    assert line == f"MNIST train: 20 images (of the official 60,000), 1×32×32, from {tmp_path / 'MNIST' / 'raw'}"
    line = D.dataset_summary("mnist", "test", data_dir=tmp_path, download=False, limit=3)
    assert line.startswith("MNIST test: 3 images (first 3 of 7), 1×28×28, from ")


def test_truncated_idx_file_is_named(tmp_path):
    write_mnist_like(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[: 16 + 10 * 784 + 100])  # a download cut short
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    one_line(exc, str(path), "truncated", "20×28×28")
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    one_line(exc, str(path), "not an idx file")


def test_image_and_label_counts_must_match(tmp_path):
    write_mnist_like(tmp_path, "FashionMNIST")
    write_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    one_line(exc, "7 images", "6 labels")


@pytest.mark.parametrize("name,folder", MNIST_LIKE)
def test_missing_files_offline_give_one_line(tmp_path, monkeypatch, name, folder):
    import torchvision.datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST

    def offline_download(self):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(cls, "download", offline_download)
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset(name, "train", data_dir=tmp_path)
    where = str(tmp_path / folder / "raw")
    one_line(exc, where, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "download failed",
             "Network is unreachable", "--data-dir", "TNCOMPRESS_DATA")


def test_torchvision_download_path_fails_cleanly_offline(tmp_path):
    """The real torchvision download code, with urlopen failing as it does without a network."""
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("mnist", "test", data_dir=tmp_path / "empty")
    one_line(exc, "MNIST not found", "download failed", "--data-dir")


def test_download_can_be_switched_off(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def must_not_run(self):
        raise AssertionError("download attempted")

    monkeypatch.setattr(tvd.MNIST, "download", must_not_run)
    monkeypatch.setattr(tvd.CIFAR10, "download", must_not_run)
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    one_line(exc, "download is off", str(tmp_path / "MNIST" / "raw"))
    monkeypatch.setenv(D.ENV_NO_DOWNLOAD, "1")
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("cifar10", "test", data_dir=tmp_path)
    one_line(exc, D.ENV_NO_DOWNLOAD, "test_batch", "batches.meta")


def test_gzipped_files_get_a_hint(tmp_path):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    raw.rename(raw.with_name(raw.name + ".gz"))
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    one_line(exc, "t10k-images-idx3-ubyte.gz", "gunzip")


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python pickles


def test_cifar10_batches_read_exactly(tmp_path):
    written = write_cifar10(tmp_path)
    for split, n in (("train", 20), ("test", 5)):
        data, labels = written[split]
        ds = D.load_dataset("cifar10", split, data_dir=tmp_path, download=False)
        assert len(ds) == n and ds.shape == (3, 32, 32) and ds.targets.tolist() == labels
        assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
        expected = torch.from_numpy(data).reshape(-1, 3, 32, 32)
        for i in range(n):
            raw, label = ds.raw(i)
            assert torch.equal(raw, expected[i]) and label == labels[i]
        assert torch.allclose(pixels(ds, n - 1), expected[n - 1].float(), atol=1e-3)
        # the channel planes are R, G, B in that order
        assert torch.equal(ds.raw(0)[0][0].flatten(), torch.from_numpy(data[0, :1024]))


def test_cifar10_reader_agrees_with_torchvision(tmp_path, monkeypatch):
    """Same files through torchvision's reader (its md5 check switched off: the files are ours)."""
    import torchvision.datasets.cifar as tvc

    write_cifar10(tmp_path, bytes_keys=False)  # torchvision reads str keys only, as the originals have
    monkeypatch.setattr(tvc, "check_integrity", lambda *args, **kwargs: True)
    for train in (True, False):
        theirs = tvc.CIFAR10(str(tmp_path), train=train, download=False)
        ours = D.load_dataset("cifar10", "train" if train else "test", data_dir=tmp_path, download=False)
        assert torch.equal(ours.images.permute(0, 2, 3, 1), torch.from_numpy(theirs.data))
        assert ours.targets.tolist() == list(theirs.targets) and ours.classes == theirs.classes


def test_cifar10_grayscale_and_resize(tmp_path):
    written = write_cifar10(tmp_path)
    ds = D.load_dataset("cifar10", "test", data_dir=tmp_path, channels=1, download=False)
    assert ds.shape == (1, 32, 32)
    rgb = torch.from_numpy(written["test"][0][2]).reshape(3, 32, 32).float()
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert torch.allclose(pixels(ds, 2)[0], luma, atol=1e-3)
    big = D.load_dataset("cifar10", "test", data_dir=tmp_path, image_size=64, download=False)
    assert big[0][0].shape == (3, 64, 64)


def test_cifar10_augmentation_is_a_padded_crop_or_flip(tmp_path):
    write_cifar10(tmp_path)
    ds = D.load_dataset("cifar10", "train", data_dir=tmp_path, augment=True, download=False)
    torch.manual_seed(0)
    for i in range(4):
        out = pixels(ds, i).round()
        padded = F.pad(ds.raw(i)[0].float(), (4, 4, 4, 4))
        candidates = [padded[:, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in candidates)
    torch.manual_seed(1)
    a = ds[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, ds[0][0])


def test_malformed_cifar_batches_name_the_file(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    cases = [
        (b"this is not a pickle", "cannot unpickle"),
        (pickle.dumps([1, 2, 3], protocol=2), "not a dict"),
        (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "uint8 N×3072"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "2 images but 1 labels"),
        (pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}), "outside 0..9"),
        (pickle.dumps({"data": collections.OrderedDict(), "labels": []}), "refusing to load collections.OrderedDict"),
    ]
    for content, needle in cases:
        batch.write_bytes(content)
        with pytest.raises(D.DatasetError) as exc:
            D.load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
        one_line(exc, needle)
        if needle != "outside 0..9":
            one_line(exc, str(batch))


def test_cifar10_missing_offline(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline_download(self):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(tvd.CIFAR10, "download", offline_download)
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("cifar10", "train", data_dir=tmp_path)
    one_line(exc, "CIFAR-10 not found", str(tmp_path / "cifar-10-batches-py"), "data_batch_1",
             "batches.meta", "Temporary failure in name resolution", "TNCOMPRESS_DATA")


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet: JPEG folders


def test_tiny_imagenet_reads_official_layout(tmp_path):
    from PIL import Image

    originals = write_tiny_imagenet(tmp_path)
    for split, alias in (("train", "train"), ("test", "val")):
        ds = D.load_dataset("tiny-imagenet", alias, data_dir=tmp_path)
        assert len(ds) == len(originals[split]) and ds.shape == (3, 64, 64)
        assert ds.classes == TINY_WNIDS
        assert ds.targets.tolist() == [label for _, _, label in originals[split]]
        for i, (path, img, label) in enumerate(originals[split]):
            raw, y = ds.raw(i)
            assert y == label and raw.shape == (3, 64, 64) and raw.dtype == torch.uint8
            with Image.open(path) as im:
                decoded = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            assert torch.equal(raw, decoded)  # exactly what PIL decodes
            diff = (raw.float() - torch.from_numpy(img).permute(2, 0, 1).float()).abs().mean()
            assert diff < 4  # and close to what was written (JPEG is lossy)
            assert torch.allclose(pixels(ds, i), raw.float(), atol=1e-3)
    line = D.dataset_summary("tiny-imagenet", "test", data_dir=tmp_path, image_size=32)
    assert line.startswith("Tiny-ImageNet test (official val split): 5 images") and "3×32×32" in line


def test_tiny_imagenet_missing_folder_says_where_to_get_it(tmp_path):
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("tiny-imagenet", "train", data_dir=tmp_path)
    one_line(exc, str(tmp_path / "tiny-imagenet-200"), D.TINY_IMAGENET_URL, "wnids.txt", "val_annotations.txt",
             "--data-dir")


def test_tiny_imagenet_malformed_folders(tmp_path):
    write_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good.replace(TINY_WNIDS[0], "n99999999"))
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("tiny-imagenet", "test", data_dir=tmp_path)
    one_line(exc, str(ann), "line 2", "n99999999", "not in wnids.txt")
    ann.write_text(good + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("tiny-imagenet", "test", data_dir=tmp_path)
    one_line(exc, "val_99.JPEG", "line 6", "is not in")
    ann.write_text(good)

    bad_jpeg = base / "train" / TINY_WNIDS[2] / "images" / f"{TINY_WNIDS[2]}_1.JPEG"
    bad_jpeg.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ds = D.load_dataset("tiny-imagenet", "train", data_dir=tmp_path)
    assert ds[0][1] == 0
    with pytest.raises(D.DatasetError) as exc:
        ds[len(ds) - 1]
    one_line(exc, str(bad_jpeg), "cannot read image")

    (base / "wnids.txt").unlink()
    with pytest.raises(D.DatasetError) as exc:
        D.load_dataset("tiny-imagenet", "train", data_dir=tmp_path)
    one_line(exc, "wnids.txt is missing", str(base))


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_labelled_and_learnable():
    train = D.load_dataset("synthetic", "train")
    test = D.load_dataset("synthetic", "test")
    assert (len(train), len(test)) == (6000, 1000) and train.shape == (1, 28, 28)
    assert train.info.synthetic and "synthetic" in train.describe() and "says nothing" in train.describe()
    assert test.targets.bincount().tolist() == [100] * 10
    again = D.load_dataset("synthetic", "train", limit=700)
    assert torch.equal(again.images, train.images[:700])  # first N do not depend on N
    assert not torch.equal(train.images[:1000], test.images)
    x, n = D.generate_synthetic(50, seed=5)
    assert torch.equal(x, D.generate_synthetic(50, seed=5)[0]) and not torch.equal(x, D.generate_synthetic(50, seed=6)[0])
    assert train.images.float().std() > 20  # not constant
    # a small MLP learns it well in two epochs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for epoch in range(2):
        for xb, yb in D.make_loader(train, 128, shuffle=True, epoch=epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = next(iter(D.make_loader(test, 1000, shuffle=False)))
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.85, accuracy


def test_mnist_like_augmentation_keeps_shape_and_range():
    ds = D.load_dataset("synthetic", "train", augment=True, image_size=32, limit=16)
    torch.manual_seed(0)
    batch = torch.stack([x for x, _ in ds.__getitems__(list(range(16)))])
    plain = D.load_dataset("synthetic", "train", image_size=32, limit=16)
    assert batch.shape == (16, 1, 32, 32)
    values = ds.denormalize(batch)
    assert values.min() >= -1e-5 and values.max() <= 1 + 1e-5
    assert not torch.equal(batch, torch.stack([plain[i][0] for i in range(16)]))


# ---------------------------------------------------------------------------------------------
# Loaders


def test_loader_order_is_fixed_by_seed_and_epoch():
    ds = D.load_dataset("synthetic", "test", limit=64)

    def order(seed: int, epoch: int) -> list[int]:
        loader = D.make_loader(ds, 16, shuffle=True, seed=seed, epoch=epoch)
        return torch.cat([x.flatten(1).sum(1) for x, _ in loader]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 0)) == sorted(order(3, 7))  # a permutation of the same samples


def test_loader_batches_equal_items_and_pin_only_for_cuda():
    ds = D.load_dataset("synthetic", "test", limit=40, image_size=32, channels=3)
    loader = D.make_loader(ds, 16, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.long
    assert torch.allclose(xb, torch.stack([ds[i][0] for i in range(16)]))
    assert yb.tolist() == ds.targets[:16].tolist()
    assert sum(len(y) for _, y in loader) == 40
    assert not loader.pin_memory and not D.make_loader(ds, 8, shuffle=False, device="cpu").pin_memory
    assert D.make_loader(ds, 8, shuffle=False, device="cuda").pin_memory == torch.cuda.is_available()


def test_worker_processes_give_the_same_batches():
    ds = D.load_dataset("synthetic", "test", limit=32)
    batches = [torch.cat([x for x, _ in D.make_loader(ds, 8, shuffle=True, seed=2, num_workers=workers)])
               for workers in (0, 1)]
    assert torch.equal(batches[0], batches[1])


# ---------------------------------------------------------------------------------------------
# The real shared MNIST (23,797 training images)


@pytest.mark.skipif(SHARED_DATA is None, reason="no shared MNIST beside the checkout")
def test_shared_mnist():
    train = D.load_dataset("mnist", "train", data_dir=SHARED_DATA, download=False, image_size=32)
    test = D.load_dataset("mnist", "test", data_dir=SHARED_DATA, download=False)
    assert len(train) == 23_797 and len(test) == 10_000
    assert train.targets.bincount(minlength=10).tolist() == MNIST_TRAIN_CLASS_COUNTS
    assert train.raw(0)[1] == 5 and test.raw(0)[1] == 7  # the well-known first labels
    assert train[0][0].shape == (1, 32, 32) and train.raw(23_796)[0].shape == (1, 28, 28)
    assert "23,797 images (of the official 60,000)" in train.describe()
