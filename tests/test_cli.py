"""The command line, end to end: plan → decompose → report, --help/--version, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_user_error

import tncompress
from tncompress.models import ModelSpec, build_model

R18 = ["--arch", "torchvision:resnet18", "--arch-arg", "num_classes=10"]


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    path = tmp_path_factory.mktemp("r18") / "r18.pt"
    torch.manual_seed(0)
    torch.save(build_model(ModelSpec("torchvision:resnet18", {"num_classes": 10})).state_dict(), path)
    return path


def test_help_and_version(cli):
    top = cli("--help")
    assert top.exit_code == 0 and "Exit codes" in top.stdout
    for command in ("plan", "decompose", "report"):
        res = cli(command, "--help")
        assert res.exit_code == 0 and "Usage" in res.stdout, command
    version = cli("--version")
    assert version.exit_code == 0 and tncompress.__version__ in version.stdout


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "tncompress.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("tncompress ")


def test_plan_decompose_report_resnet18(cli, r18, tmp_path):
    recipe = "configs/resnet18-tucker.yaml"
    plan = cli("plan", r18, *R18, "--recipe", recipe, "--input-shape", "1,3,32,32", "--json")
    assert plan.exit_code == 0, plan.output
    layers = json.loads(plan.stdout)["layers"]
    by_name = {layer["name"]: layer for layer in layers}
    assert by_name["conv1"]["action"] == "keep" and "exclude" in by_name["conv1"]["reason"]
    assert by_name["fc"]["reason"] == "no rule matched"
    assert by_name["layer1.0.conv1"]["method"] == "tucker2" and by_name["layer1.0.conv1"]["decided_by"] == "defaults.Conv2d"

    out = tmp_path / "r18-tucker.pt"
    dec = cli("decompose", r18, *R18, "--recipe", recipe, "--input-shape", "1,3,32,32", "-o", out,
              "--set", "defaults.Conv2d.n_iter=1")
    assert dec.exit_code == 0, dec.output
    assert "layers factorized" in dec.stdout and out.exists()

    rep = cli("report", r18, out, *R18, "--json")
    assert rep.exit_code == 0, rep.output
    data = json.loads(rep.stdout)
    base, small = data["models"]
    assert data["schema_version"] == 1 and data["input_shape"] == [1, 3, 32, 32]
    assert base["params"] == 11_181_642 and base["macs"] == 37_016_576
    assert small["params_reduction"] > 1.7 and small["params_ratio"] < 0.6 and small["bytes_on_disk"] < base["bytes_on_disk"]
    assert sum(row["macs"] for row in small["layers"]) <= small["macs"]
    md = cli("report", r18, out, *R18, "--markdown", "-o", tmp_path / "report.md")
    assert md.exit_code == 0 and md.stdout.startswith("# tncompress report")
    assert (tmp_path / "report.md").read_text() == md.stdout
    table = cli("report", r18, out, *R18, "--layers")
    assert table.exit_code == 0 and "layer1.0.conv1" in table.stdout


def test_one_line_errors(cli, r18, tmp_path, write_recipe):
    out = tmp_path / "o.pt"
    bad_yaml = write_recipe("version: 1\nlayers: [ {name: fc\n", "bad.yaml")
    assert_user_error(cli("plan", r18, *R18, "-r", bad_yaml), "bad.yaml", "malformed YAML")
    nothing = write_recipe("version: 1\nlayers:\n  - {name: layer1.0.conv, method: cp, rank: 4}\n", "nothing.yaml")
    assert_user_error(cli("decompose", r18, *R18, "-r", nothing, "-o", out), "matches no layer", "layer1.0.conv1")
    rank = write_recipe("version: 1\nlayers:\n  - {name: fc, method: lowrank, rank: 600}\n", "rank.yaml")
    assert_user_error(cli("decompose", r18, *R18, "-r", rank, "-o", out), "layer fc", "rank 600 exceeds")
    modes = write_recipe("version: 1\nlayers:\n  - {name: fc, method: tt, in_modes: [8, 8, 4], out_modes: [2, 5, 1]}\n", "m.yaml")
    assert_user_error(cli("plan", r18, *R18, "-r", modes), "in_modes [8, 8, 4] multiply to 256", "512 input features")
    wrong = write_recipe("version: 1\nlayers:\n  - {name: fc, method: cp, rank: 3}\n", "wrong.yaml")
    assert_user_error(cli("plan", r18, *R18, "-r", wrong), "method 'cp' does not apply to a Linear")
    assert_user_error(cli("plan", tmp_path / "missing.pt", *R18, "-r", "configs/resnet18-cp.yaml"), "missing.pt", "no such file")
    assert_user_error(cli("plan", r18, *R18, "-r", tmp_path / "none.yaml"), "no such recipe file")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    assert_user_error(cli("plan", tmp_path / "pickled.pt", "-r", "configs/resnet18-cp.yaml"), "--trust-pickle")
    assert_user_error(cli("plan", r18, "-r", "configs/resnet18-cp.yaml"), "--arch")
    assert_user_error(cli("decompose", r18, *R18, "-r", "configs/resnet18-cp.yaml", "-o", r18), "is the input file")
    assert_user_error(cli("decompose", r18, *R18, "-r", "configs/resnet18-cp.yaml", "-o", tmp_path / "no" / "dir.pt",
                          "--set", "defaults.Conv2d.n_iter_max=1", "--set", "defaults.Conv2d.rank=2"), "does not exist")
    assert_user_error(cli("plan", r18, "--arch", "torchvision:resnet18", "-r", "configs/resnet18-cp.yaml"), "fc.weight has shape")
    assert_user_error(cli("plan", r18, *R18, "-r", "configs/resnet18-cp.yaml", "--input-shape", "1,3,x"), "input shape")
    assert not out.exists()


def test_pickled_model_with_trust_and_import(cli, tmp_path, model_def, write_recipe):
    from tncompress.models import import_file

    name = import_file(model_def)
    net = sys.modules[name].make(16)
    torch.save(net, tmp_path / "whole.pt")
    recipe = write_recipe("version: 1\nlayers:\n  - {name: fc, method: lowrank, rank: 8}\n")
    out = tmp_path / "whole-lr.pt"
    res = cli("decompose", tmp_path / "whole.pt", "--trust-pickle", "--import", model_def, "-r", recipe,
              "-o", out, "--input-shape", "1,3,8,8")
    assert res.exit_code == 0, res.output
    # the pickled class needs a constructor argument, so its architecture is not recorded: the
    # message names the flag, and load takes the base model
    with pytest.raises(tncompress.TncompressError, match="architecture was not recorded.*--arch .*--arch-arg"):
        tncompress.load(out)
    model = tncompress.load(out, base_model=sys.modules[name].make(16))
    assert type(model.fc).__name__ == "LowRankLinear"


def test_report_takes_the_baseline_architecture_from_the_compressed_checkpoint(cli, r18, tmp_path):
    out = tmp_path / "r18-tt.pt"
    recipe = tmp_path / "fc.yaml"
    recipe.write_text("version: 1\nlayers:\n  - {name: fc, method: lowrank, rank: 4}\n")
    assert cli("decompose", r18, *R18, "-r", recipe, "-o", out, "--input-shape", "1,3,32,32").exit_code == 0
    rep = cli("report", r18, out, "--input-shape", "1,3,32,32", "--json")  # no --arch: as in the README
    assert rep.exit_code == 0, rep.output
    assert "using the architecture recorded in" in rep.stderr
    base, small = json.loads(rep.stdout)["models"]
    assert base["params"] - small["params"] == 512 * 10 - 4 * (512 + 10)
    assert_user_error(cli("report", r18, "--input-shape", "1,3,32,32"), "--arch")


def test_report_latency_in_channels_last_layout(cli, tmp_path):
    """--channels-last measures the model in NHWC; the JSON says which layout and OpenMP policy."""
    path = tmp_path / "lenet.pt"
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), path)
    for flags, layout in (([], "default"), (["--channels-last"], "channels_last")):
        rep = cli("report", path, "--arch", "lenet5", "--latency", "--latency-batch", "2", "--latency-time", "2", *flags,
                  "--json")
        assert rep.exit_code == 0, rep.output
        latency = json.loads(rep.stdout)["models"][0]["latency"]
        assert latency["layout"] == layout and latency["batch"] == 2 and latency["median_ms"] > 0
        assert "omp_wait_policy" in latency


def test_cli_leaves_openmp_policy_alone_for_report_and_training():
    """Decomposing commands default OMP_WAIT_POLICY to PASSIVE; report (latency) and training
    (throughput, docs/train-speed.md) keep OpenMP's default; a user's setting wins."""
    code = ("import os, sys; sys.argv = ['tncompress'] + sys.argv[1:]; import tncompress.cli; "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    for argv, expected in ((["report", "x.pt"], "unset"), (["--debug", "-v", "report", "x.pt"], "unset"),
                           (["decompose", "report.pt"], "PASSIVE"), (["train", "--arch", "x"], "unset"),
                           (["finetune", "m.pt"], "unset"), (["sweep", "m.pt"], "PASSIVE")):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected, (argv, out.stdout, out.stderr)


def test_help_texts_keep_square_brackets(cli):
    """Rich markup ate `[export]` in `pip install 'tncompress[export]'`."""
    import re

    res = cli("export", "--help")
    assert res.exit_code == 0
    flat = re.sub(r"[\s│]+", "", res.stdout)  # the help box wraps lines
    assert "pipinstall'tncompress[export]'" in flat, res.stdout
