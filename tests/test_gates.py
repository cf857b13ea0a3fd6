"""CI gates on reports, and what the JSON report records for reproducibility."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import saved_state_dict

from tncompress.errors import TncompressError
from tncompress.gates import evaluate_gates, parse_gate


def _report(*models: dict) -> dict:
    return {"models": [{"path": f"m{i}.pt", **m} for i, m in enumerate(models)]}


@pytest.mark.parametrize("expr, value, passed", [
    ("params_reduction>=4", 4.0, True), ("params_reduction>=4", 3.99, False), ("params_reduction > 4", 4.0, False),
    ("top1_drop<=1.0", 1.0, True), ("top1_drop<=1.0%", 1.01, False), ("top1_drop<1", 0.99, True),
    ("macs_reduction==2", 2.0, True), ("speedup>=1e0", 0.8, False), ("compression>=2", 3.0, True),
    ("params_ratio<=0.25", 0.25, True), ("macs_ratio<0.5", 0.5, False),
])
def test_gate_expressions(expr, value, passed):
    gate = parse_gate(expr)
    metric = gate.metric
    entry = {"top1_drop": value} if metric == "top1_drop" else {metric: value}
    [result] = evaluate_gates([gate], _report({}, entry))
    assert result.passed is passed and result.value == value and result.model == "m1.pt"


def test_nan_never_passes():
    [result] = evaluate_gates([parse_gate("params_ratio>=0")], _report({}, {"params_ratio": float("nan")}))
    assert not result.passed


@pytest.mark.parametrize("expr, message", [
    ("params_ratio=>4", "METRIC OP NUMBER"), ("params_ratio>=", "METRIC OP NUMBER"), ("4<=params_ratio", "METRIC OP"),
    ("param_ratio>=4", "did you mean 'params_ratio'"), ("top1_drop<=abc", "METRIC OP NUMBER"),
])
def test_bad_gates_are_user_errors(expr, message):
    with pytest.raises(TncompressError, match=message):
        parse_gate(expr)


def test_gates_apply_to_every_compared_model_and_max_layer_errors():
    report = _report({"params_reduction": 1.0}, {"params_reduction": 5.0, "layers": [{"output_rel_error": 0.1}]},
                     {"params_reduction": 3.0, "layers": [{"output_rel_error": 0.4}, {"output_rel_error": None}]})
    results = evaluate_gates([parse_gate("params_reduction>=4"), parse_gate("max_output_error<=0.3")], report)
    assert [(r.model, r.metric, r.passed) for r in results] == [
        ("m1.pt", "params_reduction", True), ("m2.pt", "params_reduction", False),
        ("m1.pt", "max_output_error", True), ("m2.pt", "max_output_error", False)]
    with pytest.raises(TncompressError, match="m1.pt has no top1; it needs --dataset"):
        evaluate_gates([parse_gate("top1>=90")], report)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A LeNet-5 state dict, its compressed version, and the recipe used."""
    from typer.testing import CliRunner

    from tncompress.cli import app

    folder = tmp_path_factory.mktemp("gates")
    base = saved_state_dict(folder, "lenet5", "l5.pt")
    recipe = folder / "r.yaml"
    recipe.write_text("version: 1\ncalibration: {seed: 7}\nlayers:\n  - {name: classifier.1, method: lowrank, rank: 8}\n")
    small = folder / "l5-lr.pt"
    result = CliRunner().invoke(app, ["decompose", str(base), "--arch", "lenet5", "-r", str(recipe), "-o", str(small)])
    assert result.exit_code == 0, result.output
    return base, small, recipe


def test_report_gates_exit_codes_and_outputs(pair, cli, tmp_path):
    base, small, recipe = pair
    ok = cli("report", base, small, "--json", "--gate", "params_reduction>=2", "--gate", "macs_reduction>=1")
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert [g["passed"] for g in data["gates"]] == [True, True]

    out = tmp_path / "report.md"
    bad = cli("report", base, small, "--markdown", "-o", out, "--gate", "params_reduction>=2",
              "--gate", "params_reduction>=100", "--gate", "max_output_error<=0.001")
    assert bad.exit_code == 3
    failed = [line for line in bad.stderr.splitlines() if line.startswith("gate failed")]
    assert len(failed) == 2 and "params_reduction>=100" in failed[0] and "l5-lr.pt" in failed[0]
    assert "max_output_error<=0.001" in failed[1]
    assert "Traceback" not in bad.output
    text = out.read_text()  # the report is written even when a gate fails: CI shows it in the summary
    assert "## Gates" in text and text.count("**FAIL**") == 2 and text == bad.stdout

    table = cli("report", base, small, "--gate", "params_reduction>=100")
    assert table.exit_code == 3 and "gate failed: params_reduction>=100" in table.stderr


def test_json_report_records_versions_seed_and_hashes(pair, cli):
    base, small, recipe = pair
    res = cli("report", base, small, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["schema_version"] == 1 and isinstance(data["seed"], int)
    versions = data["versions"]
    assert versions["tncompress"] == data["tncompress_version"]
    assert versions["torch"] == str(torch.__version__)
    assert {"python", "torchvision", "tensorly", "numpy"} <= set(versions)
    sha = {i["path"]: i for i in data["inputs"]}
    assert sha[str(base)]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    made = sha[str(small)]
    assert made["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    assert made["recipe_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert made["decomposed_from_sha256"] == sha[str(base)]["sha256"]
    assert made["calibration_seed"] == 7 and made["model_output_error"] > 0


def test_help_lists_the_exit_codes(cli):
    top = cli("--help")
    assert all(f"{code} " in top.stdout for code in ("0", "1", "2", "3")) and "gate" in top.stdout
    assert "--gate" in cli("report", "--help").stdout
