"""The method registry: every method is one registered unit, its settings are typed and checked
where the recipe enters, and a new method works end to end without touching the pipeline."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tncompress
from tncompress import methods as registry
from tncompress.errors import RecipeError
from tncompress.layers import FactorizedLayer, LowRankLinear
from tncompress.methods.base import Method, Planned, Settings, positive_int, setting
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import parse_recipe

BUILT_IN = ["tt", "lowrank", "cp", "tucker2", "prodsum"]


def test_built_in_methods_are_registered_in_order():
    assert list(registry.all_methods())[:5] == BUILT_IN
    assert registry.methods_for("Linear")[:3] == ["tt", "lowrank", "prodsum"]
    assert registry.methods_for("Conv2d")[:3] == ["cp", "tucker2", "prodsum"]
    assert registry.resolve_name("svd") == "lowrank" and registry.resolve_name("tucker") == "tucker2"
    assert registry.method_for_layer("prodsum_conv").name == "prodsum"


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_declares_typed_settings_with_valid_defaults(name):
    method = registry.get_method(name)
    assert method.summary and method.types
    fields = dataclasses.fields(method.settings)
    assert fields, "a method without settings still needs a rank or a shape"
    for f in fields:
        assert f.metadata.get("doc"), f"{name}.{f.name} has no description"
    defaults = method.settings.from_mapping({}, "x")
    assert defaults.given() == {}
    for cls in method.layer_classes():
        assert issubclass(cls, FactorizedLayer) and cls.method


@pytest.mark.parametrize("settings, needle", [
    ({"method": "tucker2", "rank": 4, "n_iter": "ten"}, "n_iter must be a positive integer, got 'ten'"),
    ({"method": "tucker2", "algorithm": "magic"}, "algorithm must be 'hooi' or 'hosvd'"),
    ({"method": "cp", "rank": 4, "retries": -1}, "retries must be a non-negative integer"),
    ({"method": "cp", "rank": 4, "engine": 3}, "engine must be 'als' or 'tensorly'"),
    ({"method": "lowrank", "floor": 0}, "floor must be a positive integer"),
    ({"method": "prodsum", "g": "relu"}, "g must be 'identity' or 'tanh'"),
    ({"method": "prodsum", "sweeps": 1.5}, "sweeps must be a positive integer"),
])
def test_a_bad_setting_is_one_line_when_the_recipe_is_read(settings, needle):
    type_name = "Conv2d" if settings["method"] in ("cp", "tucker2") else "Linear"
    with pytest.raises(RecipeError) as info:
        parse_recipe({"version": 1, "defaults": {type_name: settings}}, "r.yaml")
    assert str(info.value) == f"r.yaml: defaults.{type_name}: {needle}" or needle in str(info.value)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"r.yaml: defaults.{type_name}")


def test_a_setting_only_rule_is_checked_against_the_methods_that_take_it():
    parse_recipe({"version": 1, "defaults": {"Conv2d": {"method": "tucker2"}},
                  "layers": [{"type": "Conv2d", "n_iter": 3}]})  # fine for tucker2
    with pytest.raises(RecipeError, match="n_iter must be a positive integer"):
        parse_recipe({"version": 1, "layers": [{"type": "Conv2d", "n_iter": "x"}]})


# --- a new method, registered from here --------------------------------------------------------------

@dataclass(frozen=True)
class FixedFractionSettings(Settings):
    divisor: Any = setting(2, positive_int, "keep min(in, out) / divisor singular values")


class FixedFraction(Method):
    name = "fixedfraction"
    types = ("Linear",)
    settings = FixedFractionSettings
    summary = "truncated SVD at a fixed fraction of the full rank"

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return LowRankLinear

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (LowRankLinear,)

    def plan(self, module: nn.Module, s: FixedFractionSettings, where: str) -> Planned:
        assert isinstance(module, nn.Linear)
        r = max(1, min(module.in_features, module.out_features) // int(s.divisor))
        return Planned({"in_features": module.in_features, "out_features": module.out_features, "rank": r,
                        "bias": module.bias is not None}, r, [f"1/{s.divisor} of the full rank"])

    def factorize(self, module: nn.Module, config: dict[str, Any], s: FixedFractionSettings) -> nn.Module:
        assert isinstance(module, nn.Linear)
        return LowRankLinear.from_dense(module, rank=config["rank"])


@pytest.fixture
def fixed_fraction():
    method = registry.register(FixedFraction())
    try:
        yield method
    finally:
        registry._REGISTRY.pop(method.name)


def test_a_new_method_runs_end_to_end_without_pipeline_changes(fixed_fraction, tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("mlp-1024")
    model = build_model(spec).eval()
    recipe = parse_recipe({"version": 1, "defaults": {"Linear": {"method": "fixedfraction", "divisor": 4}},
                           "exclude": ["fc3"]}, "new.yaml")
    plan = tncompress.make_plan(model, recipe, [1, 1, 32, 32])
    decided = [p for p in plan if p.action == "decompose"]
    assert [p.name for p in decided] == ["fc1", "fc2"] and all("1/4 of the full rank" in p.notes for p in decided)
    result = tncompress.decompose(model, recipe, input_shape=[1, 1, 32, 32])
    assert any(isinstance(m, LowRankLinear) for m in result.model.modules())
    path = tmp_path / "new.pt"
    tncompress.save(result, path, spec=spec)
    loaded = tncompress.load(path)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    with pytest.raises(RecipeError, match="divisor must be a positive integer"):
        parse_recipe({"version": 1, "defaults": {"Linear": {"method": "fixedfraction", "divisor": 0}}})


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get_method("tt"))


# --- a new method with its own layer class: checkpoints of it reload through the registry ----------

class ScaledLowRank(LowRankLinear):
    """A layer class the built-in table does not know: W = scale · second · first."""

    method = "scaled_lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 scale: float = 1.0) -> None:
        super().__init__(in_features, out_features, rank, bias)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.scale)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "scale": self.scale}


class ScaledLowRankMethod(FixedFraction):
    name = "scaledlowrank"

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return ScaledLowRank

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (ScaledLowRank,)

    def plan(self, module: nn.Module, s: FixedFractionSettings, where: str) -> Planned:
        planned = super().plan(module, s, where)
        return Planned({**planned.config, "scale": 0.5}, planned.ranks, planned.notes)

    def factorize(self, module: nn.Module, config: dict[str, Any], s: FixedFractionSettings) -> nn.Module:
        assert isinstance(module, nn.Linear)
        layer = ScaledLowRank(module.in_features, module.out_features, config["rank"], module.bias is not None,
                              scale=config["scale"])
        with torch.no_grad():
            fitted = LowRankLinear.from_dense(module, rank=config["rank"])
            layer.first.copy_(fitted.first / config["scale"])
            layer.second.copy_(fitted.second)
            if layer.bias is not None and fitted.bias is not None:
                layer.bias.copy_(fitted.bias)
        return layer


def test_a_new_layer_class_reloads_from_its_checkpoint_through_the_registry(tmp_path):
    from tncompress.errors import CheckpointError
    from tncompress.layers import LAYER_CLASSES

    method = registry.register(ScaledLowRankMethod())
    assert "scaled_lowrank" not in LAYER_CLASSES  # only the registry knows the class
    try:
        torch.manual_seed(0)
        spec = ModelSpec("mlp-1024")
        model = build_model(spec).eval()
        recipe = parse_recipe({"version": 1, "defaults": {"Linear": {"method": "scaledlowrank", "divisor": 4}},
                               "exclude": ["fc3"]}, "new.yaml")
        result = tncompress.decompose(model, recipe, input_shape=[1, 1, 32, 32])
        path = tmp_path / "scaled.pt"
        tncompress.save(result, path, spec=spec)
        loaded = tncompress.load(path)
        layers = [m for m in loaded.modules() if isinstance(m, ScaledLowRank)]
        assert len(layers) == 2 and all(m.scale == 0.5 for m in layers)
        x = torch.randn(3, 1, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), result.model(x))
    finally:
        registry._REGISTRY.pop(method.name)
    with pytest.raises(CheckpointError, match="unknown layer method 'scaled_lowrank'"):
        tncompress.load(path)  # the method is gone: one clear error, not a traceback
