"""1×1 convs under Tucker-2 become a truncated SVD (LowRankConv2d), and a Tucker-2 fraction is split
between the ranks by the truncated-HOSVD error instead of in proportion to the channels."""
from __future__ import annotations

import math

import pytest
import test_layer_contract as contract
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tncompress.compress import decompose, make_plan
from tncompress.decompositions import svd as svd_ops
from tncompress.decompositions.ranks import (
    evbmf_rank,
    tucker2_params,
    tucker2_ranks_for_fraction,
    tucker2_split_for_fraction,
)
from tncompress.errors import RankError
from tncompress.layers import LAYER_CLASSES, LowRankConv2d, Tucker2Conv2d, build_layer
from tncompress.methods import get_method, method_for_layer
from tncompress.methods.tucker2 import hosvd_bases, project
from tncompress.planner import plan_layer
from tncompress.recipe import LayerChoice, parse_recipe
from tncompress.surgery import apply_structure


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def weights(layer: nn.Module) -> int:
    """Parameters without the bias (what a fraction of the parameters counts)."""
    return sum(p.numel() for n, p in layer.named_parameters() if not n.endswith("bias"))


def low_rank_plus_noise(cout: int, cin: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, rank, generator=gen) @ torch.randn(rank, cin, generator=gen) / math.sqrt(rank)
    return (w + noise * torch.randn(cout, cin, generator=gen)).reshape(cout, cin, 1, 1) / math.sqrt(cin)


def pointwise(cin: int = 160, cout: int = 960, rank: int = 40, noise: float = 0.3, **geometry) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1, **geometry)
    with torch.no_grad():
        conv.weight.copy_(low_rank_plus_noise(cout, cin, rank, noise))
    return conv


def plan(module: nn.Module, rank, shape=(1, 160, 7, 7), **settings):
    choice = LayerChoice("conv", "Conv2d", {"method": "tucker2", "rank": rank, **settings}, ["rule"], "rule")
    out_shape = list(module(torch.zeros(shape, dtype=module.weight.dtype)).shape)
    return plan_layer(choice, module, (list(shape), out_shape), "test.yaml")


GEOMETRIES = [
    pytest.param(1, dict(stride=2, padding=1), id="1x1-stride2-pad1"),
    pytest.param(1, dict(stride=(1, 2), padding=1, padding_mode="reflect"), id="1x1-reflect"),
    pytest.param(3, dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), id="3x3-asym"),
    pytest.param((3, 2), dict(padding="same", dilation=(2, 1), padding_mode="circular"), id="3x2-same-circular"),
]


# --- the layer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, geometry", GEOMETRIES)
def test_full_rank_is_exact(k, geometry):
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 5, k, **geometry).double()
    layer = LowRankConv2d.from_dense(dense, rank=100)  # clipped to min(out, in·kh·kw) = 5
    assert layer.rank == 5 and layer.rel_error < 1e-12
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
        assert rel(layer.dense_kernel(), dense.weight) < 1e-10
        torch.testing.assert_close(layer.to_dense()(x), dense(x), rtol=1e-10, atol=1e-10)


def test_rank_r_error_is_eckart_young():
    torch.manual_seed(0)
    dense = nn.Conv2d(24, 40, 1, stride=2, padding=1).double()
    s = torch.linalg.svdvals(dense.weight.detach()[:, :, 0, 0])
    x = torch.randn(3, 24, 6, 6, dtype=torch.float64)
    for r in (1, 5, 12, 23):
        layer = LowRankConv2d.from_dense(dense, rank=r)
        optimal = float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert layer.rel_error == pytest.approx(optimal, rel=1e-9, abs=1e-12)
        assert rel(layer.dense_kernel(), dense.weight) == pytest.approx(optimal, rel=1e-9, abs=1e-12)
        # the singular values are split evenly: both factors have the same scale
        first, second = layer.first.weight.reshape(r, -1), layer.pointwise_out.weight.reshape(-1, r)
        torch.testing.assert_close(first.norm(dim=1), second.norm(dim=0), rtol=1e-9, atol=1e-12)
        with torch.no_grad():  # the bias is the dense conv's, also on the padded border
            torch.testing.assert_close(layer(x), nn.functional.conv2d(x, layer.dense_kernel(), dense.bias, 2, 1))


@pytest.mark.parametrize("k, geometry", GEOMETRIES)
def test_macs_are_flop_counter_flops_over_two(k, geometry):
    layer = LowRankConv2d(6, 5, k, rank=3, **geometry)
    x = torch.randn(1, 6, 11, 9)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() // 2 == layer.macs_per_sample((11, 9)) > 0


@pytest.mark.parametrize("k, geometry", GEOMETRIES)
def test_config_and_state_dict_round_trip(k, geometry):
    torch.manual_seed(0)
    layer = LowRankConv2d.from_dense(nn.Conv2d(6, 5, k, bias=False, **geometry), rank=2)
    for again in (type(layer)(**layer.config()), build_layer("lowrank_conv", layer.config())):
        again.load_state_dict(layer.state_dict(), strict=True)
        x = torch.randn(2, 6, 9, 8)
        with torch.no_grad():
            assert torch.equal(again(x), layer(x))
        assert again.config() == layer.config() and again.pointwise_out.bias is None
    assert LAYER_CLASSES["lowrank_conv"] is LowRankConv2d and method_for_layer("lowrank_conv").name == "tucker2"
    assert "rank=2" in repr(layer)


def test_bad_ranks_and_modules_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RankError):
            LowRankConv2d(4, 4, 1, rank=bad)  # type: ignore[arg-type]
    assert "groups=2" in (LowRankConv2d.unsupported_reason(nn.Conv2d(4, 4, 1, groups=2)) or "")
    assert LowRankConv2d.unsupported_reason(nn.Linear(4, 4)) is not None


def test_default_init_has_the_dense_variance():
    torch.manual_seed(0)
    layer = LowRankConv2d(64, 128, 1, rank=48)
    dense_var = 1.0 / (3.0 * 64)
    assert float(layer.dense_kernel().var()) == pytest.approx(dense_var, rel=0.1)


# the contract every registered layer class passes (tests/test_layer_contract.py), for this class in a
# 1×1 and a 3×3 geometry
@pytest.fixture(params=["1x1", "3x3"])
def pair(request: pytest.FixtureRequest) -> tuple[nn.Module, LowRankConv2d]:
    torch.manual_seed(0)
    if request.param == "1x1":
        dense = nn.Conv2d(3, 4, 1, stride=2, padding=1, padding_mode="reflect").double()
        return dense, LowRankConv2d.from_dense(dense, rank=3)
    dense = contract._conv()
    return dense, LowRankConv2d.from_dense(dense, rank=4)


test_contract_full_rank_is_the_dense_layer = contract.test_full_rank_is_the_dense_layer
test_contract_to_dense_agrees_with_forward = contract.test_to_dense_agrees_with_forward
test_contract_config_round_trip = contract.test_config_round_trip
test_contract_gradcheck = contract.test_gradcheck_in_input_and_parameters
test_contract_traces_and_matches = contract.test_traces_and_matches
test_contract_output_follows_every_parameter_update = contract.test_output_follows_every_parameter_update
test_contract_compiled_layer_follows_parameter_updates = contract.test_compiled_layer_follows_parameter_updates
test_contract_functional_call = contract.test_functional_call_uses_the_given_parameters


# --- Tucker-2 on a 1×1 conv ------------------------------------------------------------------------

def test_tucker2_fraction_on_a_1x1_conv_is_a_truncated_svd_and_beats_proportional_tucker2():
    """mobilenet_v2's features.17.conv.0.0 shape (160 → 960): the SVD at 25% of the parameters is far
    better than Tucker-2 with the old proportional ranks at (at least) the same parameter count."""
    conv = pointwise()
    p = plan(conv, 0.25)
    assert p.action == "decompose" and p.method == "lowrank_conv" and isinstance(p.ranks, int)
    assert "truncated SVD rank" in p.reason
    assert any(n.startswith("1×1 conv: a matrix, factorized by truncated SVD") and "same parameter budget" in n
               for n in p.notes)
    method = get_method("tucker2")
    settings = method.parse(p.settings, "conv")
    layer = method.factorize(conv, p.config, settings)
    assert isinstance(layer, LowRankConv2d) and layer.config() == {**p.config}
    assert weights(layer) <= 0.25 * conv.weight.numel() and p.params_after == sum(x.numel() for x in layer.parameters())
    assert weights(LowRankConv2d(160, 960, 1, rank=layer.rank + 1)) > 0.25 * conv.weight.numel()  # the largest that fits

    r_out, r_in = tucker2_ranks_for_fraction(tuple(conv.weight.shape), 0.25)  # the old split
    old = Tucker2Conv2d.from_dense(conv, ranks=(r_in, r_out))
    assert weights(layer) <= weights(old)
    svd_error = rel(layer.dense_kernel(), conv.weight)
    assert svd_error == pytest.approx(layer.rel_error, rel=1e-5)
    assert svd_error < 0.7 * old.rel_error  # 0.43 against 0.81 on this weight
    x = torch.randn(2, 160, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-4)


def test_every_tucker2_rank_form_maps_to_an_svd_rank():
    conv = pointwise()
    m, n = 960, 160
    w = conv.weight.detach()[:, :, 0, 0]
    assert plan(conv, 0.5).ranks == svd_ops.lowrank_rank_for_fraction(m, n, 0.5) == 68
    assert plan(conv, {"energy": 0.9}).ranks == svd_ops.energy_rank(svd_ops.singular_values(w), 0.9)
    vbmf = plan(conv, "vbmf").ranks
    assert vbmf == evbmf_rank(w.double()) and 30 <= vbmf <= 60  # near the planted rank 40
    assert plan(conv, "vbmf", floor=100).ranks == 100
    assert plan(conv, "vbmf", weakening=0.5).ranks == math.ceil(vbmf + 0.5 * (160 - vbmf))
    assert plan(conv, 30).ranks == 30
    clipped = plan(conv, 500, allow_growth=True)
    assert clipped.ranks == 160 and any("clipped" in n for n in clipped.notes)
    assert any("does not compress" in n for n in clipped.notes)
    for pair in ([12, 77], {"in": 12, "out": 77}):
        got = plan(conv, pair)
        budget = tucker2_params((960, 160, 1, 1), 77, 12)
        assert got.ranks * (m + n) <= budget < (got.ranks + 1) * (m + n)
        assert any("same parameter budget as Tucker-2 [R_in=12, R_out=77]" in n for n in got.notes)
    with pytest.raises(RankError, match="exceed the channels"):
        plan(conv, [200, 10])
    with pytest.raises(RankError, match="cannot read rank"):
        plan(conv, "big")


def test_grouped_1x1_conv_stays_tucker2_and_is_refused_as_before():
    method = get_method("tucker2")
    grouped = nn.Conv2d(8, 8, 1, groups=2)
    assert method.layer_class(grouped) is Tucker2Conv2d
    assert "Tucker-2" in (method.unsupported(grouped) or "")
    assert method.layer_class(nn.Conv2d(8, 8, 1)) is LowRankConv2d
    assert method.layer_class(nn.Conv2d(8, 8, 3)) is Tucker2Conv2d
    assert set(method.layer_classes()) == {Tucker2Conv2d, LowRankConv2d}


def test_data_aware_whitening_and_checkpoint_reload_of_a_mixed_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 48, 1), nn.ReLU(),
                          nn.Conv2d(48, 24, 1, stride=2, padding=1), nn.Flatten(), nn.Linear(24 * 5 * 5, 10))
    recipe = parse_recipe({"version": 1, "defaults": {"Conv2d": {"method": "tucker2", "rank": 0.5, "n_iter": 3,
                                                                 "data_aware": True}},
                           "exclude": ["0"]}, source="test.yaml")
    result = decompose(model, recipe, input_shape=[1, 3, 8, 8])
    by_name = {p.name: p for p in result.plan}
    for name in ("2", "4"):
        entry = by_name[name]
        assert entry.method == "lowrank_conv" and isinstance(result.model.get_submodule(name), LowRankConv2d)
        assert any(n.startswith("data_aware: inputs whitened") for n in entry.notes)
        assert entry.weight_rel_error is not None and entry.output_rel_error is not None
    rebuilt = apply_structure(copy_model(model), [p.layer_entry for p in result.plan if p.action == "decompose"])
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), result.model(x))


def copy_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# --- the Tucker-2 split of a fraction ---------------------------------------------------------------

def test_rgb_stem_keeps_all_three_input_channels():
    """A 7×7 stem 3 → 64 whose three input channels all matter (and whose output unfolding has rank
    16): the proportional split gives R_in = 1, the error-minimising split R_in = 3 and is exact."""
    gen = torch.Generator().manual_seed(0)
    stem = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        stem.weight.copy_((torch.randn(64, 16, generator=gen) @ torch.randn(16, 3 * 49, generator=gen)).reshape(
            64, 3, 7, 7) / 50)
    split = tucker2_split_for_fraction(stem.weight, 0.5)
    assert split.proportional[1] == 1 and split.r_in == 3 and split.r_out >= 16
    assert split.error < 1e-6 and split.bound < 1e-6
    assert split.bound <= split.proportional_bound and split.error <= split.proportional_error
    assert split.proportional_error > 0.5
    p = plan(stem, 0.5, shape=(1, 3, 32, 32))
    assert p.method == "tucker2" and p.ranks == [3, split.r_out]
    assert tucker2_params((64, 3, 7, 7), split.r_out, 3) <= 0.5 * stem.weight.numel()
    assert any("least truncated-HOSVD error" in n and "[R_in=1," in n for n in p.notes)
    layer = get_method("tucker2").factorize(stem, p.config, get_method("tucker2").parse(p.settings, "stem"))
    old = Tucker2Conv2d.from_dense(stem, ranks=(1, split.proportional[0]))
    assert layer.rel_error < 1e-6 < 0.5 < old.rel_error


@pytest.mark.parametrize("shape, fraction", [
    ((16, 3, 3, 3), 0.5), ((64, 3, 7, 7), 0.25), ((32, 32, 3, 3), 0.25), ((48, 16, 3, 3), 0.5),
    ((8, 40, 3, 1), 0.3), ((24, 24, 2, 2), 0.05), ((4, 4, 3, 3), 0.01),
])
def test_split_fits_the_budget_and_is_never_worse_than_proportional(shape, fraction):
    gen = torch.Generator().manual_seed(sum(shape))
    # a decaying spectrum on each channel mode, as trained kernels have
    kernel = torch.randn(shape, generator=gen, dtype=torch.float64)
    kernel = torch.einsum("oihw,o,i->oihw", kernel, torch.linspace(1, 0.1, shape[0], dtype=torch.float64),
                          torch.linspace(1, 0.2, shape[1], dtype=torch.float64))
    dense = math.prod(shape)
    split = tucker2_split_for_fraction(kernel, fraction)
    prop = tucker2_ranks_for_fraction(shape, fraction)
    assert split.proportional == prop
    if tucker2_params(shape, 1, 1) <= fraction * dense:
        assert tucker2_params(shape, split.r_out, split.r_in) <= fraction * dense
    else:
        assert (split.r_out, split.r_in) == prop == (1, 1)
    assert 1 <= split.r_out <= shape[0] and 1 <= split.r_in <= shape[1]
    # the reported errors are the truncated HOSVD's, and the chosen split is the best of every split
    bases = hosvd_bases(kernel)
    assert split.error == pytest.approx(rel(project(kernel, bases, (split.r_in, split.r_out)), kernel), abs=1e-9)
    assert split.proportional_error == pytest.approx(rel(project(kernel, bases, prop[::-1]), kernel), abs=1e-9)
    assert split.error <= split.proportional_error + 1e-12 and split.error <= split.bound + 1e-12
    best = min((rel(project(kernel, bases, (ri, ro)), kernel) for ri in range(1, shape[1] + 1)
                for ro in range(1, shape[0] + 1) if tucker2_params(shape, ro, ri) <= fraction * dense), default=None)
    if best is not None:
        assert split.error == pytest.approx(best, abs=1e-9)
    by_bound = tucker2_split_for_fraction(kernel, fraction, criterion="bound")
    assert by_bound.bound <= by_bound.proportional_bound + 1e-12


def test_split_of_a_zero_or_non_finite_kernel_is_proportional():
    prop = tucker2_ranks_for_fraction((8, 6, 3, 3), 0.5)
    zero = tucker2_split_for_fraction(torch.zeros(8, 6, 3, 3), 0.5)
    assert (zero.r_out, zero.r_in) == prop and zero.error == 0.0
    bad = torch.randn(8, 6, 3, 3)
    bad[0, 0, 0, 0] = math.nan
    nan = tucker2_split_for_fraction(bad, 0.5)
    assert (nan.r_out, nan.r_in) == prop and math.isnan(nan.error)
    with pytest.raises(RankError):
        tucker2_split_for_fraction(torch.zeros(8, 6, 3, 3), 0.5, criterion="magic")


def test_other_tucker2_rank_forms_on_kxk_convs_are_unchanged():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    assert plan(conv, [5, 7], shape=(1, 16, 8, 8)).ranks == [5, 7]
    assert plan(conv, {"in": 5, "out": 7}, shape=(1, 16, 8, 8)).ranks == [5, 7]  # was refused as a mapping
    assert plan(conv, 6, shape=(1, 16, 8, 8)).ranks == [6, 6]
    assert plan(conv, 100, shape=(1, 16, 8, 8), allow_growth=True).ranks == [16, 24]
    grown = plan(conv, 100, shape=(1, 16, 8, 8))  # more parameters than dense: kept, and the plan says why
    assert grown.action == "keep" and "allow_growth" in grown.reason and "params against" in grown.reason


# --- the budget hooks on a 1×1 conv ------------------------------------------------------------------

def test_budget_ladder_of_a_1x1_conv_is_the_svd_ladder():
    conv = pointwise(64, 96, rank=8, noise=0.1, stride=2, padding=1)
    method = get_method("tucker2")
    settings = method.parse({"method": "tucker2"}, "conv")
    config = method.structure(conv, settings, "conv").config
    in_shape = [1, 64, 9, 9]
    dense_params = sum(p.numel() for p in conv.parameters())
    ranks, params, macs = method.ladder(conv, config, in_shape, 0, True)
    assert ranks == [r for r in range(1, 65) if r * (64 + 96) < 64 * 96] and ranks[-1] == 38
    assert all(b > a for a, b in zip(params, params[1:])) and all(p < dense_params for p in params)
    assert params == [r * (64 + 96) + 96 for r in ranks]
    assert all(m == ranks[i] * macs[0] for i, m in enumerate(macs))
    for i in (0, 9, len(ranks) - 1):  # what the planner reports for that rung, built and counted
        layer = method.layer_class(conv)(**{**config, "rank": ranks[i]})
        assert sum(p.numel() for p in layer.parameters()) == params[i]
        assert layer.macs_per_sample((9, 9)) == macs[i]
        p = plan(conv, ranks[i], shape=tuple(in_shape))
        assert (p.params_after, p.macs_after) == (params[i], macs[i])
    assert method.ladder(conv, config, in_shape, 0, False)[2] == [0] * len(ranks)
    # approximations: truncated SVD slices, errors as Eckart–Young says
    s = torch.linalg.svdvals(conv.weight.detach().double()[:, :, 0, 0])
    approx = list(method.approximations(conv, config, settings, [1, 8, 20], 0))
    at = method.approximator(conv, config, settings, 20, 0)
    for r, w in zip([1, 8, 20], approx):
        assert w.shape == conv.weight.shape and w.dtype == torch.float64
        assert rel(w, conv.weight) == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-9)
        torch.testing.assert_close(at(r), w)


def exact_pointwise_model() -> nn.Module:
    """A small CNN (6×6 input) whose two 1×1 convs (layers 2 and 6) are exactly rank 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 96, 1), nn.ReLU(),
                          nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 64, 1), nn.Flatten(),
                          nn.Linear(64 * 6 * 6, 10))
    with torch.no_grad():
        for i in (2, 6):
            conv = model[i]
            conv.weight.copy_(low_rank_plus_noise(conv.out_channels, conv.in_channels, 4, 0.0, seed=i))
    return model.eval()


def test_budget_end_to_end_with_1x1_convs():
    """The 1×1 convs are exactly rank 4: the budget takes them as truncated SVDs of about that rank."""
    model = exact_pointwise_model()
    recipe = parse_recipe({"version": 1, "defaults": {"Conv2d": {"method": "tucker2", "n_iter": 2}},
                           "exclude": ["0"], "budget": {"params_ratio": 0.6, "candidates": 8, "sensitivity": "layer"}},
                          source="test.yaml")
    plan_ = make_plan(model, recipe, [1, 3, 6, 6])
    by_name = {p.name: p for p in plan_}
    for name in ("2", "6"):
        entry = by_name[name]
        assert entry.action == "decompose" and entry.method == "lowrank_conv", entry.reason
        assert isinstance(entry.ranks, int) and entry.ranks >= 4 and entry.budget is not None
        assert entry.budget["sensitivity"] < 1e-6 and "truncated SVD" in " ".join(entry.notes)
    small = apply_structure(copy_model(model), [p.layer_entry for p in plan_ if p.action == "decompose"])
    assert isinstance(small[2], LowRankConv2d) and isinstance(small[6], LowRankConv2d)
    ratio = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert plan_.budget is not None and plan_.budget["achieved_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert abs(ratio / 0.6 - 1) <= 0.02
