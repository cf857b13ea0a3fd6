"""train → decompose → finetune → report --dataset through the CLI, on small synthetic data."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error

import tncompress

FAST = ["--limit-train", "600", "--limit-test", "200", "--batch-size", "64"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TNCOMPRESS_NO_DOWNLOAD", "1")
    monkeypatch.setenv("TNCOMPRESS_DATA", str(tmp_path / "no-data-here"))


def test_train_decompose_finetune_report(cli, tmp_path, write_recipe):
    base, tt, ft = tmp_path / "mlp.pt", tmp_path / "mlp-tt.pt", tmp_path / "mlp-tt-ft.pt"
    res = cli("train", "--arch", "mlp-1024", "--dataset", "synthetic", "--epochs", "2", "-o", base, *FAST)
    assert res.exit_code == 0, res.output
    assert "epoch 2:" in res.stdout and "synthetic" in res.stdout.lower()
    raw = torch.load(base, weights_only=True)
    assert raw["layers"] == [] and raw["base"]["input_shape"] == [1, 1, 32, 32]
    assert raw["metadata"]["training"]["dataset"] == "synthetic" and raw["metadata"]["training"]["epochs"] == 2

    recipe = write_recipe(
        "version: 1\nlayers:\n  - {name: fc1, method: tt, in_modes: [4, 8, 8, 4], out_modes: [4, 8, 8, 4], rank: 4}\n")
    assert cli("decompose", base, "-r", recipe, "-o", tt).exit_code == 0  # no --arch: recorded in mlp.pt
    res = cli("finetune", tt, "--dataset", "synthetic", "--epochs", "1", "--teacher", base, "-o", ft, *FAST)
    assert res.exit_code == 0, res.output
    meta = torch.load(ft, weights_only=True)["metadata"]
    assert meta["training"]["config"]["kd_weight"] == 0.7 and meta["teacher"] == str(base)
    model = tncompress.load(ft)
    assert type(model.fc1).__name__ == "TTLinear"
    assert (tmp_path / "mlp-tt-ft.pt.state.pt").exists()

    rep = cli("report", base, tt, ft, "--dataset", "synthetic", "--limit-test", "200", "--json")
    assert rep.exit_code == 0, rep.output
    models = json.loads(rep.stdout)["models"]
    assert all(m["accuracy"]["images"] == 200 for m in models)
    assert models[0]["accuracy"]["top1"] > 50  # trained, well above the 10% of chance
    assert models[2]["top1_drop"] == pytest.approx(models[0]["accuracy"]["top1"] - models[2]["accuracy"]["top1"])
    table = cli("report", base, ft, "--dataset", "synthetic", "--limit-test", "200")
    assert "top-1" in table.stdout and "baseline" in table.stdout


def test_resume_continues_to_more_epochs(cli, tmp_path):
    out = tmp_path / "m.pt"
    assert cli("train", "--arch", "mlp-1024", "--dataset", "synthetic", "--epochs", "1", "-o", out, *FAST).exit_code == 0
    res = cli("train", "--arch", "mlp-1024", "--dataset", "synthetic", "--epochs", "2", "-o", out, "--resume", *FAST)
    assert res.exit_code == 0, res.output
    assert "epoch 2:" in res.stdout and "epoch 1:" not in res.stdout
    assert torch.load(out, weights_only=True)["metadata"]["training"]["epochs"] == 2


def test_training_errors_are_one_line(cli, tmp_path):
    out = tmp_path / "m.pt"
    assert_user_error(cli("train", "--arch", "mlp-1024", "--dataset", "mnist", "-o", out), "MNIST", "no-data-here")
    assert_user_error(cli("train", "--arch", "mlp-1024", "--dataset", "imagenet", "-o", out), "imagenet")
    assert_user_error(cli("train", "--arch", "mlp-1024", "--dataset", "synthetic", "-o", out, "--lr", "-1"), "lr")
    assert_user_error(cli("train", "--arch", "mlp-1024", "--dataset", "synthetic", "-o", out, "--device", "cuda"), "cuda")
    assert_user_error(cli("train", "--arch", "mlp-1024", "--arch-arg", "num_classes=7", "--dataset", "synthetic",
                          "-o", out, *FAST), "num_classes=10")
    assert_user_error(cli("train", "--arch", "mlp-1024", "--dataset", "synthetic", "-o", out, "--resume", *FAST),
                      "state")
    assert not out.exists()


@pytest.mark.parametrize("alias", ["fmnist", "FashionMNIST"])
def test_dataset_aliases_work_in_finetune_and_report(cli, tmp_path, monkeypatch, alias):
    """`--dataset fmnist` used to load its data, then fail with a KeyError: names resolve where they enter."""
    from test_data import write_mnist_like

    root = tmp_path / "data"
    write_mnist_like(root, "FashionMNIST", n_train=64, n_test=16)
    monkeypatch.setenv("TNCOMPRESS_DATA", str(root))
    base, ft = tmp_path / "base.pt", tmp_path / "ft.pt"
    res = cli("train", "--arch", "mlp-1024", "--dataset", alias, "--epochs", "1", "-o", base, "--batch-size", "32")
    assert res.exit_code == 0, res.output
    res = cli("finetune", base, "--dataset", alias, "--epochs", "1", "-o", ft, "--batch-size", "32")
    assert res.exit_code == 0, res.output
    assert torch.load(ft, weights_only=True)["metadata"]["training"]["dataset"] == "fashion-mnist"
    rep = cli("report", base, ft, "--dataset", alias, "--json")
    assert rep.exit_code == 0, rep.output
