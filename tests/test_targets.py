"""The figures the shipped recipes promise, and analytic MACs cross-checked with FlopCounterMode."""
from __future__ import annotations

import pytest
import torch

from tncompress.compress import decompose, make_plan
from tncompress.measure import count_macs, count_params
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import load_recipe
from tncompress.surgery import apply_structure

R18 = ModelSpec("torchvision:resnet18", {"num_classes": 10})


def structural_model(spec, plan):
    """The compressed structure with random factors: enough for counting params and MACs."""
    model = build_model(spec)
    apply_structure(model, [p.layer_entry for p in plan if p.action == "decompose"])
    return model


@pytest.mark.parametrize("recipe, min_params, min_macs", [
    ("configs/resnet18-cp.yaml", 50.0, 45.0),
    ("configs/resnet18-tucker.yaml", 42.0, 41.0),
])
def test_resnet18_recipes_meet_their_reductions(recipe, min_params, min_macs):
    base = build_model(R18)
    x = torch.zeros(1, 3, 32, 32)
    base_params, base_macs = count_params(base), count_macs(base, x).total
    assert (base_params, base_macs) == (11_181_642, 37_016_576)  # the baseline the docs quote
    plan = make_plan(base, load_recipe(recipe), [1, 3, 32, 32])
    small = structural_model(R18, plan)
    params, macs = count_params(small), count_macs(small, x)
    assert 100 * (1 - params / base_params) >= min_params
    assert 100 * (1 - macs.total / base_macs) >= min_macs
    # the planner's analytic counts agree with what FlopCounterMode measures, layer by layer
    for p in plan:
        assert macs.per_module.get(p.name, 0) == p.macs_after, p.name
        assert count_params(small.get_submodule(p.name)) == p.params_after, p.name
    assert sum(p.macs_before for p in plan) == sum(count_macs(base, x).per_module[p.name] for p in plan)


def test_vgg16_recipe_rank2_fc6_has_528_core_parameters():
    torch.manual_seed(0)
    spec = ModelSpec("torchvision:vgg16", {"num_classes": 10})
    model = build_model(spec)
    recipe = load_recipe("configs/vgg16-tt.yaml", ["layers.0.rank=2"])
    result = decompose(model, recipe, input_shape=[1, 3, 32, 32], inplace=True)
    fc6 = result.model.classifier[0]
    assert type(fc6).__name__ == "TTLinear"
    assert sum(core.numel() for core in fc6.cores) == 528
    assert [tuple(c.shape) for c in fc6.cores][:2] == [(1, 4, 2, 2), (2, 4, 7, 2)]
    plan = {p.name: p for p in result.plan}
    assert plan["classifier.0"].params_after == 528 + 4096  # cores + bias
    assert plan["classifier.6"].action == "keep" and plan["features.0"].reason == "no rule matched"
    assert plan["classifier.0"].weight_rel_error is not None and plan["classifier.0"].output_rel_error is not None
