"""Injected numerical faults are detected, fallen back from and reported per layer; an output error
above the recipe's bound fails loudly (GateError, exit 3) unless allowed. Never a silently broken model."""
from __future__ import annotations

import math

import pytest
import torch

import tncompress
from tncompress.errors import GateError
from tncompress.layers import CPConv2d, TTLinear
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import parse_recipe


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return build_model(ModelSpec("lenet5")).eval()


def _poison(cls, how):
    """A from_dense that runs the real one, then corrupts the result with ``how(layer)``."""
    real = cls.from_dense.__func__

    def from_dense(klass, *args, **kwargs):
        layer = real(klass, *args, **kwargs)
        how(layer)
        return layer

    return classmethod(from_dense)


def _nan_first_param(layer):
    with torch.no_grad():
        next(layer.parameters()).view(-1)[0] = float("nan")


def _decompose(model, recipe, **kwargs):
    return tncompress.decompose(model, parse_recipe(recipe), input_shape=[1, 1, 32, 32], **kwargs)


def _finite(model) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(model(torch.randn(4, 1, 32, 32))).all())


def test_nan_tt_factors_leave_the_layer_dense(lenet, monkeypatch):
    monkeypatch.setattr(TTLinear, "from_dense", _poison(TTLinear, _nan_first_param))
    result = _decompose(lenet, {"version": 1, "layers": [{"name": "classifier.1", "method": "tt", "rank": 4},
                                                         {"name": "classifier.3", "method": "lowrank", "rank": 8}]})
    entry = {p.name: p for p in result.plan}["classifier.1"]
    assert entry.action == "keep" and "non-finite" in entry.reason
    assert any("non-finite" in note for note in entry.notes)
    assert isinstance(result.model.classifier[1], torch.nn.Linear)  # the trained dense layer, unchanged
    assert torch.equal(result.model.classifier[1].weight, lenet.classifier[1].weight)
    assert {p.name: p for p in result.plan}["classifier.3"].action == "decompose"  # others unaffected
    assert _finite(result.model)


def test_nan_cp_factors_fall_back_to_tucker2(lenet, monkeypatch):
    monkeypatch.setattr(CPConv2d, "from_dense", _poison(CPConv2d, _nan_first_param))
    result = _decompose(lenet, {"version": 1, "layers": [{"name": "features.3", "method": "cp", "rank": 6}]})
    entry = {p.name: p for p in result.plan}["features.3"]
    assert entry.action == "decompose" and entry.method == "tucker2"
    assert "non-finite" in entry.reason and any("fell back to Tucker-2" in n for n in entry.notes)
    assert type(result.model.features[3]).__name__ == "Tucker2Conv2d"
    assert math.isfinite(entry.output_rel_error) and _finite(result.model)


def test_nan_cp_with_fallback_none_stays_dense(lenet, monkeypatch):
    monkeypatch.setattr(CPConv2d, "from_dense", _poison(CPConv2d, _nan_first_param))
    result = _decompose(lenet, {"version": 1, "layers": [{"name": "features.3", "method": "cp", "rank": 6,
                                                          "fallback": "none"}]})
    entry = {p.name: p for p in result.plan}["features.3"]
    assert entry.action == "keep" and isinstance(result.model.features[3], torch.nn.Conv2d)


def test_cp_degeneracy_falls_back_and_is_reported(lenet, monkeypatch):
    def degenerate(layer):
        layer.fit_info = {**(layer.fit_info or {}), "degenerate": True, "attempts": 3, "norm_ratio": 1e6}

    monkeypatch.setattr(CPConv2d, "from_dense", _poison(CPConv2d, degenerate))
    result = _decompose(lenet, {"version": 1, "layers": [{"name": "features.3", "method": "cp", "rank": 6}]})
    entry = {p.name: p for p in result.plan}["features.3"]
    assert entry.method == "tucker2" and "CP degenerated" in entry.reason
    assert any("CP degenerate after 3 attempts" in n for n in entry.notes)


def test_cp_above_its_error_bound_tries_tucker2(lenet, monkeypatch):
    def damage(layer):  # a fit that is finite but far off: its output error is about 1
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(1e-3)

    monkeypatch.setattr(CPConv2d, "from_dense", _poison(CPConv2d, damage))
    recipe = {"version": 1, "layers": [{"name": "features.3", "method": "cp", "rank": 0.5, "max_output_error": 0.9}]}
    result = _decompose(lenet, recipe)
    entry = {p.name: p for p in result.plan}["features.3"]
    assert entry.method == "tucker2" and "above 0.9" in entry.reason
    assert entry.output_rel_error < 0.9 and result.calibration["bound_violations"] == []


def test_error_bound_fails_loudly_unless_allowed(lenet):
    recipe = {"version": 1, "calibration": {"max_output_error": 0.05},
              "layers": [{"name": "classifier.1", "method": "lowrank", "rank": 1}]}
    with pytest.raises(GateError, match=r"layer classifier.1: output error 0.\d+ on the calibration batch exceeds "
                                        r"max_output_error 0.05") as info:
        _decompose(lenet, recipe)
    assert info.value.exit_code == 3
    result = _decompose(lenet, recipe, allow_error=True)
    assert len(result.calibration["bound_violations"]) == 1
    entry = {p.name: p for p in result.plan}["classifier.1"]
    assert any("exceeds max_output_error 0.05" in n for n in entry.notes)
    # a per-rule bound overrides the recipe-wide one
    loose = {**recipe, "layers": [{**recipe["layers"][0], "max_output_error": 2.0}]}
    assert _decompose(lenet, loose).calibration["bound_violations"] == []


def test_model_error_bound(lenet):
    recipe = {"version": 1, "calibration": {"max_model_error": 1e-6},
              "layers": [{"name": "classifier.3", "method": "lowrank", "rank": 2}]}
    with pytest.raises(GateError, match="model's output error .* exceeds calibration.max_model_error 1e-06"):
        _decompose(lenet, recipe)
    result = _decompose(lenet, {**recipe, "calibration": {"max_model_error": 10.0}})
    assert 0 < result.calibration["model_output_error"] < 10.0


def test_cli_bound_exit_code_and_allow_error(tmp_path, cli, write_recipe, lenet):
    source = tmp_path / "l5.pt"
    torch.save(lenet.state_dict(), source)
    recipe = write_recipe("version: 1\nlayers:\n  - {name: classifier.1, method: lowrank, rank: 1, max_output_error: 0.05}\n")
    out = tmp_path / "out.pt"
    refused = cli("decompose", source, "--arch", "lenet5", "-r", recipe, "-o", out)
    assert refused.exit_code == 3 and not out.exists()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "classifier.1" in errors[0] and "--allow-error" in errors[0]
    allowed = cli("decompose", source, "--arch", "lenet5", "-r", recipe, "-o", out, "--allow-error")
    assert allowed.exit_code == 0 and out.exists() and "warning:" in allowed.stderr
    meta = torch.load(out, weights_only=True)["metadata"]
    assert len(meta["bound_violations"]) == 1 and meta["model_output_error"] > 0
