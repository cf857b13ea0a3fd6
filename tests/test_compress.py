"""The decompose driver on a small net: every method end to end, skips with reasons, errors recorded."""
from __future__ import annotations

import pytest
import torch
from conftest import SmallNet

from tncompress.compress import decompose
from tncompress.errors import RankError
from tncompress.layers import CPConv2d, TTLinear, Tucker2Conv2d
from tncompress.recipe import parse_recipe


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SmallNet().eval()


def test_every_method_applies_and_grouped_conv_is_skipped_with_reason(net):
    recipe = parse_recipe({"version": 1, "defaults": {"Conv2d": {"method": "cp", "rank": 0.5, "n_iter_max": 30}},
                           "layers": [{"name": "features.2", "method": "tucker2", "rank": [8, 16]},
                                      {"name": "head.1", "method": "tt", "rank": 4},
                                      {"name": "head.3", "method": "lowrank", "rank": 4}]})
    result = decompose(net, recipe, input_shape=[1, 3, 16, 16])
    plan = {p.name: p for p in result.plan}
    model = result.model
    assert isinstance(model.features[0], CPConv2d) and isinstance(model.features[4], CPConv2d)
    assert isinstance(model.features[2], Tucker2Conv2d) and isinstance(model.head[1], TTLinear)
    grouped = plan["features.6"]
    assert grouped.action == "keep" and "groups" in grouped.reason and type(model.features[6]) is torch.nn.Conv2d
    for p in result.plan:
        if p.action == "decompose":
            assert 0 <= p.weight_rel_error < 1 and 0 <= p.output_rel_error < 1.5, p
            assert p.params_after < p.params_before
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert isinstance(net.features[0], torch.nn.Conv2d)  # the input model is untouched


def test_full_rank_decomposition_reproduces_the_model(net):
    net = net.double()
    recipe = parse_recipe({"version": 1, "layers": [
        {"name": "features.2", "method": "tucker2", "rank": [16, 32]},
        {"name": "head.3", "method": "lowrank", "rank": 10},
        {"name": "head.1", "method": "tt", "in_modes": [8, 16, 16], "out_modes": [4, 8, 8], "rank": 10_000}]})
    result = decompose(net, recipe, input_shape=[1, 3, 16, 16])
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref, out = net(x), result.model(x)
    assert (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item() < 1e-10
    assert all(p.weight_rel_error < 1e-10 for p in result.plan if p.action == "decompose")
    assert next(result.model.head[1].parameters()).dtype == torch.float64


def test_cp_degeneracy_falls_back_to_tucker2(net, monkeypatch):
    import tncompress.decompositions.cp as cp

    monkeypatch.setattr(cp, "degeneracy_threshold", lambda rank: 0.0)  # every fit counts as degenerate
    recipe = parse_recipe({"version": 1, "layers": [{"name": "features.4", "method": "cp", "rank": 0.4,
                                                     "n_iter_max": 5, "retries": 1}]})
    result = decompose(net, recipe, input_shape=[1, 3, 16, 16])
    entry = next(p for p in result.plan if p.name == "features.4")
    assert entry.method == "tucker2" and isinstance(result.model.features[4], Tucker2Conv2d)
    assert any("degenerate" in n for n in entry.notes) and any("fell back to Tucker-2" in n for n in entry.notes)
    recipe = parse_recipe({"version": 1, "layers": [{"name": "features.4", "method": "cp", "rank": 0.4,
                                                     "n_iter_max": 5, "retries": 1, "fallback": "none"}]})
    result = decompose(net, recipe, input_shape=[1, 3, 16, 16])
    entry = next(p for p in result.plan if p.name == "features.4")
    assert entry.action == "keep" and "left dense" in entry.reason
    assert type(result.model.features[4]) is torch.nn.Conv2d


@pytest.mark.parametrize("rule, message", [
    ({"name": "head.1", "method": "tt", "rank": 0}, "positive integer"),
    ({"name": "head.1", "method": "tt", "rank": 1.5}, "fraction of the layer's parameters"),
    ({"name": "head.1", "method": "tt", "rank": [4, 4, 4, 4, 4, 4, 4, 4, 4]}, "rank"),
    ({"name": "head.1", "method": "tt", "rank": "vbmf"}, "cannot read rank 'vbmf'"),
    ({"name": "features.2", "method": "tucker2", "rank": [64, 8]}, "exceed the channels"),
    ({"name": "features.2", "method": "cp"}, "needs a rank"),
    ({"name": "head.3", "method": "lowrank", "rank": {"energy": 2}}, "energy must be a number in (0, 1]"),
])
def test_ranks_that_cannot_be_honoured(net, rule, message):
    with pytest.raises(RankError) as err:
        decompose(net, parse_recipe({"version": 1, "layers": [rule]}), input_shape=[1, 3, 16, 16])
    assert message in str(err.value) and f"layer {rule['name']}" in str(err.value)
