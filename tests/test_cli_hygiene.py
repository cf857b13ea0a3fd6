"""CLI hygiene (issue 20): text printed as it is (no rich markup eaten), files that are not
checkpoints named for what they are, a teacher that does not fit the student, root flags after the
command name, sweep points reused only with the same settings, re-decomposing a compressed model."""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, saved_state_dict
from PIL import Image

import tncompress.recipe
from tncompress.checkpoint import _read, save_compressed
from tncompress.cli.common import app, root_flags_first
from tncompress.errors import RecipeError
from tncompress.models import ModelSpec, build_model

L5 = ["--arch", "lenet5"]
RECIPE = "version: 1\nlayers:\n  - {name: classifier.1, method: lowrank, rank: 4}\n"
PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "models" / "resnet-cifar" / "resnet20-12fca82f.th"


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def lenet(tmp_path):
    return saved_state_dict(tmp_path, "lenet5", "l5.pt")


# --- 1. square brackets survive ----------------------------------------------------------------

def test_brackets_survive_in_errors_and_success_lines(cli, tmp_path, lenet, write_recipe, monkeypatch):
    recipe = write_recipe(RECIPE)
    missing = tmp_path / "model[v2].pt"
    assert_user_error(cli("plan", missing, *L5, "-r", recipe), f"{missing}: no such file")

    out = tmp_path / "l5-lr[v2].pt"
    res = cli("decompose", lenet, *L5, "-r", recipe, "-o", out)
    assert res.exit_code == 0, res.output
    assert out.exists() and f"wrote {out}" in res.stdout

    def hint(*args, **kwargs):
        raise RecipeError("ONNX export needs the onnx package: pip install 'tncompress[export]'")

    monkeypatch.setattr(tncompress.recipe, "load_recipe", hint)
    assert_user_error(cli("plan", lenet, *L5, "-r", recipe), "pip install 'tncompress[export]'")


# --- 2. files that are not checkpoints -------------------------------------------------------

def test_files_that_are_not_checkpoints_say_what_they_are(cli, tmp_path, write_recipe):
    recipe = write_recipe(RECIPE)
    png = tmp_path / "picture.pt"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("some notes\n")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"weights": [1.0]}, protocol=4))
    cases = [(recipe, "is a YAML/text file", "version: 1"), (png, "is a PNG image"), (tmp_path / "empty.pt", "is empty"),
             (tmp_path / "notes.txt", "is a text file", "some notes"),
             (tmp_path / "plain.pkl", "is a Python pickle, but not a PyTorch checkpoint")]
    for path, *needles in cases:
        res = cli("plan", path, *L5, "-r", recipe)
        assert_user_error(res, str(path), *needles)
        assert "--trust-pickle" not in res.stderr and "invalid load key" not in res.stderr


def test_legacy_format_checkpoints_still_load(cli, tmp_path, write_recipe):
    legacy = tmp_path / "legacy.pt"
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80"
    res = cli("plan", legacy, *L5, "-r", write_recipe(RECIPE))
    assert res.exit_code == 0, res.output
    if PUBLISHED.is_file():  # the published ResNet-20: legacy format, CUDA tensors
        state = _read(PUBLISHED, trust_pickle=False)
        assert "state_dict" in state or any(k.endswith("weight") for k in state)


# --- 3. a teacher that does not fit the student ----------------------------------------------

@pytest.mark.parametrize("teacher_spec, needles", [
    (ModelSpec("lenet5", {"in_channels": 3}), ["does not run on the student's input [1, 1, 32, 32]", "RuntimeError"]),
    (ModelSpec("mlp-1024", {"num_classes": 5}), ["outputs shape [1, 5]", "the student outputs [1, 10]"]),
])
def test_a_teacher_of_another_architecture_is_refused_before_training(cli, tmp_path, teacher_spec, needles):
    student, teacher = tmp_path / "student.pt", tmp_path / "teacher.pt"
    save_compressed(student, build_model(ModelSpec("mlp-1024")), spec=ModelSpec("mlp-1024", input_shape=[1, 1, 32, 32]))
    save_compressed(teacher, build_model(teacher_spec), spec=teacher_spec)
    res = cli("finetune", student, "--teacher", teacher, "--dataset", "synthetic", "--epochs", "1",
              "--limit-train", "64", "--limit-test", "64", "-o", tmp_path / "ft.pt")
    assert_user_error(res, f"teacher {teacher}", *needles)
    assert not (tmp_path / "ft.pt").exists()


# --- 4. --debug / --verbose after the command name -------------------------------------------

def test_debug_is_accepted_before_and_after_the_command(cli, tmp_path, write_recipe):
    args = ["plan", tmp_path / "missing.pt", *L5, "-r", write_recipe(RECIPE)]
    for argv in (["--debug", *args], [*args, "--debug"]):
        res = cli(*argv)
        assert res.exit_code == 2, res.output
        assert "Traceback (most recent call last)" in res.stderr and "no such file" in res.stderr


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_is_accepted_before_and_after_the_command(cli, lenet, write_recipe, flag):
    args = ["plan", lenet, *L5, "-r", write_recipe(RECIPE)]
    for argv in ([flag, *args], [*args, flag]):
        res = cli(*argv)
        assert res.exit_code == 0, res.output
        assert logging.getLogger().level == logging.INFO
    logging.getLogger().setLevel(logging.WARNING)


def test_root_flags_move_only_when_they_are_flags():
    from typer.main import get_command

    group = get_command(app)
    assert root_flags_first(group, ["plan", "m.pt", "--debug", "-v"]) == ["--debug", "-v", "plan", "m.pt"]
    # an option's value that looks like a root flag stays where it is; nothing after -- moves
    assert root_flags_first(group, ["sweep", "m.pt", "--note", "-v", "--debug"]) == \
        ["--debug", "sweep", "m.pt", "--note", "-v"]
    assert root_flags_first(group, ["plan", "m.pt", "--", "--debug"]) == ["plan", "m.pt", "--", "--debug"]
    assert root_flags_first(group, ["--version"]) == ["--version"]


def test_debug_after_the_command_through_the_console_entry(tmp_path, write_recipe):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "tncompress.cli", "decompose", str(tmp_path / "missing.pt"), *L5,
                           "-r", str(write_recipe(RECIPE)), "-o", str(tmp_path / "out.pt"), "--debug"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "No such option" not in proc.stderr and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")


# --- 5. sweep: finished points are reused only with the same settings ------------------------

def test_sweep_does_not_reuse_points_after_a_setting_changes(cli, tmp_path, lenet, write_recipe):
    recipe, out = write_recipe(RECIPE), tmp_path / "sweep"
    base = ["sweep", lenet, *L5, "--input-shape", "1,1,32,32", "-r", recipe, "--ranks", "2", "-d", "synthetic", "-o", out,
            "--limit-train", "128", "--limit-test", "64"]
    tuned = [*base, "--finetune-epochs", "1", "--batch-size", "32"]
    res = cli(*tuned, "--lr", "0.01")
    assert res.exit_code == 0, res.output

    assert_user_error(cli(*tuned, "--lr", "0.1"), "other settings", "lr 0.01 → 0.1", "another -o folder")
    assert json.loads((out / "sweep.json").read_text())["settings"]["lr"] == 0.01
    assert_user_error(cli(*base, "--finetune-epochs", "1", "--batch-size", "16", "--lr", "0.01"),
                      "batch_size 32 → 16")
    assert_user_error(cli(*tuned, "--lr", "0.01", "--seed", "3"), "seed 0 → 3")
    res = cli(*tuned, "--lr", "0.01")  # the same settings: the finished point is reused
    assert res.exit_code == 0 and "r=2: already in" in res.stdout


def test_sweep_without_finetune_ignores_the_finetune_settings(cli, tmp_path, lenet, write_recipe):
    recipe, out = write_recipe(RECIPE), tmp_path / "sweep"
    base = ["sweep", lenet, *L5, "--input-shape", "1,1,32,32", "-r", recipe, "--ranks", "2", "-d", "synthetic", "-o", out,
            "--limit-train", "128", "--limit-test", "64"]
    assert cli(*base, "--lr", "0.01").exit_code == 0
    res = cli(*base, "--lr", "0.5")  # no fine-tune: the learning rate changes nothing
    assert res.exit_code == 0 and "r=2: already in" in res.stdout


# --- 6. re-decomposing a compressed model -----------------------------------------------------

def test_a_rule_naming_an_already_factorized_layer_says_so(cli, tmp_path, lenet, write_recipe):
    recipe, once = write_recipe(RECIPE), tmp_path / "once.pt"
    assert cli("decompose", lenet, *L5, "-r", recipe, "-o", once).exit_code == 0
    assert_user_error(cli("decompose", once, "-r", recipe, "-o", tmp_path / "twice.pt"),
                      "layers[0] (name: classifier.1)", "classifier.1 (lowrank)", "already factorized",
                      "dense layers only")
    exclude = write_recipe("version: 1\nexclude: [classifier.1]\nlayers:\n  - {name: classifier.3, method: lowrank, "
                           "rank: 4}\n", "exclude.yaml")
    assert_user_error(cli("plan", once, "-r", exclude), "exclude entry 'classifier.1'", "already factorized")
    other = write_recipe("version: 1\nlayers:\n  - {name: classifier.9, method: lowrank, rank: 4}\n", "other.yaml")
    assert_user_error(cli("plan", once, "-r", other), "matches no layer")
