"""Recipe parsing, validation, precedence and overrides."""
from __future__ import annotations

import pytest

from tncompress.errors import RecipeError
from tncompress.recipe import apply_overrides, load_recipe, match_layers, parse_recipe

LAYERS = [("features.0", "Conv2d"), ("features.2", "Conv2d"), ("features.10", "Conv2d"),
          ("classifier.0", "Linear"), ("classifier.3", "Linear"), ("classifier.6", "Linear")]


def choices(data):
    return {c.name: c for c in match_layers(parse_recipe(data), LAYERS)}


def test_precedence_name_beats_pattern_beats_type_beats_defaults():
    got = choices({
        "version": 1,
        "defaults": {"Linear": {"method": "tt", "rank": 8}, "Conv2d": {"method": "tucker2", "rank": "vbmf"}},
        "layers": [
            {"name": "classifier.0", "rank": 4},          # name tier: rank only, method cascades
            {"type": "Linear", "method": "lowrank", "rank": 16},
            {"pattern": "classifier.*", "method": "tt"},
            {"type": "Conv2d", "method": "cp", "rank": 0.3},
            {"regex": r"features\.1\d*", "rank": 0.5},
        ],
        "exclude": ["features.0"],
    })
    assert got["classifier.0"].settings == {"method": "tt", "rank": 4}
    assert got["classifier.0"].decided_by.startswith("layers[0] (name")
    assert got["classifier.3"].settings == {"method": "tt"}  # pattern beats type; a new method starts afresh
    assert got["features.2"].settings == {"method": "cp", "rank": 0.3}
    assert got["features.10"].settings == {"method": "cp", "rank": 0.5}
    assert got["features.0"].excluded_by == "exclude: features.0"


def test_later_rule_wins_inside_a_tier():
    got = choices({"version": 1, "layers": [
        {"pattern": "classifier.*", "method": "tt", "rank": 2},
        {"pattern": "classifier.[03]", "rank": 6},
        {"type": "Conv2d", "method": "none"},
    ]})
    assert got["classifier.0"].settings["rank"] == 6
    assert got["classifier.6"].settings["rank"] == 2


def test_layers_without_rule_have_no_settings():
    got = choices({"version": 1, "layers": [{"name": "classifier.0", "method": "tt"}]})
    assert got["classifier.3"].settings == {} and got["classifier.3"].decided_by is None


@pytest.mark.parametrize("data, needle", [
    ({"layers": []}, "missing 'version: 1'"),
    ({"version": 2}, "unsupported recipe version 2"),
    ({"version": 1, "layer": []}, "unknown top-level key (did you mean 'layers'?)"),
    ({"version": 1, "layers": [{"name": "classifier.0", "methd": "tt"}]}, "unknown key 'methd' (did you mean 'method'?)"),
    ({"version": 1, "layers": [{"name": "classifier.0", "method": "tensor"}]}, "unknown method 'tensor'"),
    ({"version": 1, "layers": [{"method": "tt"}]}, "needs a selector"),
    ({"version": 1, "layers": [{"name": "a", "pattern": "b", "method": "tt"}]}, "not name and pattern"),
    ({"version": 1, "layers": [{"regex": "(", "method": "tt"}]}, "invalid regular expression"),
    ({"version": 1, "layers": [{"type": "Conv3d", "method": "cp"}]}, "unknown layer type 'Conv3d'"),
    ({"version": 1, "defaults": {"Lineer": {"method": "tt"}}}, "did you mean 'Linear'"),
    ({"version": 1, "layers": {"name": "x"}}, "expected a list of rules"),
    ({"version": 1, "exclude": [3]}, "exclude: expected a list"),
    ({"version": 1, "calibration": {"batch_size": 0}}, "calibration.batch_size"),
    (["version", 1], "a recipe is a YAML mapping"),
])
def test_malformed_recipes_are_one_line_errors(data, needle):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, source="r.yaml")
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith("r.yaml")


def test_rule_matching_nothing_names_closest_layers():
    with pytest.raises(RecipeError, match=r"layers\[0\] \(name: classifer.0\) matches no layer; closest layers: classifier.0"):
        match_layers(parse_recipe({"version": 1, "layers": [{"name": "classifer.0", "method": "tt"}]}), LAYERS)
    with pytest.raises(RecipeError, match="exclude entry 'feature.0' matches no layer"):
        match_layers(parse_recipe({"version": 1, "exclude": ["feature.0"]}), LAYERS)
    with pytest.raises(RecipeError, match="no Conv2d layers"):
        match_layers(parse_recipe({"version": 1, "layers": [{"type": "Conv2d", "method": "cp", "rank": 3}]}),
                     [("fc", "Linear")])


def test_malformed_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nlayers:\n  - {name: fc1, method: tt\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: malformed YAML at line \d+, column \d+"):
        load_recipe(path)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="the recipe is empty"):
        load_recipe(tmp_path / "empty.yaml")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_set_nested_values():
    data = {"version": 1, "layers": [{"name": "fc1", "method": "tt", "rank": 8}]}
    out = apply_overrides(data, ["layers.0.rank=2", "defaults.Linear.method=lowrank", "layers.0.in_modes=[4, 8, 8, 4]"])
    assert out["layers"][0]["rank"] == 2 and out["layers"][0]["in_modes"] == [4, 8, 8, 4]
    assert out["defaults"] == {"Linear": {"method": "lowrank"}}
    assert data["layers"][0]["rank"] == 8  # input untouched
    with pytest.raises(RecipeError, match="no list item '3'"):
        apply_overrides(data, ["layers.3.rank=2"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_overrides(data, ["rank"])


def test_shipped_recipes_parse():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")):
        recipe = load_recipe(path)
        assert recipe.rules or recipe.defaults, path


def test_rule_switching_method_starts_afresh():
    got = choices({"version": 1, "defaults": {"Conv2d": {"method": "cp", "rank": 0.3, "n_iter_max": 5}},
                   "layers": [{"name": "features.2", "method": "tucker2", "rank": [8, 8]},
                              {"name": "features.10", "rank": 0.2}]})
    assert got["features.2"].settings == {"method": "tucker2", "rank": [8, 8]}
    assert got["features.10"].settings == {"method": "cp", "rank": 0.2, "n_iter_max": 5}
