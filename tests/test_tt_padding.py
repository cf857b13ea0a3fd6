"""TTLinear with padded modes (Π n_k ≥ in_features, Π m_k ≥ out_features): the layer is the real block
W_pad[:out, :in] of its TT matrix, exact at full rank, with MACs as FlopCounterMode counts them."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from tncompress.decompositions.tt import tt_matrix_svd, tt_matrix_to_full
from tncompress.errors import RankError
from tncompress.layers.tt_linear import TTLinear, _candidate_groupings, _make_plan

# (in_features, out_features, in_modes, out_modes)
PADDED_IN = (50, 36, [4, 4, 4], [3, 3, 4])
PADDED_OUT = (48, 37, [4, 4, 3], [2, 4, 5])
PADDED_BOTH = (50, 37, [4, 4, 4], [2, 4, 5])
ONE_CORE = (5, 3, [8], [4])
EXACT = (60, 48, [3, 2, 5, 2], [2, 4, 3, 2])
PADDED = {"in": PADDED_IN, "out": PADDED_OUT, "both": PADDED_BOTH, "one core": ONE_CORE}


def _dense(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).double()


def _layer(shape: tuple, ranks: int | list[int] = 3, bias: bool = True, dtype: torch.dtype = torch.float64) -> TTLinear:
    n_in, n_out, in_m, out_m = shape
    torch.manual_seed(1)
    return TTLinear(n_in, n_out, in_modes=in_m, out_modes=out_m, ranks=ranks, bias=bias, dtype=dtype)


def _reference(layer: TTLinear, x: torch.Tensor) -> torch.Tensor:
    """The map the docs promise: the real block of the full TT matrix W_pad, plus the bias."""
    w = tt_matrix_to_full([c.detach() for c in layer.cores])
    assert w.shape == (layer.padded_out_features, layer.padded_in_features)
    y = x @ w[: layer.out_features, : layer.in_features].T
    return y + layer.bias.detach() if layer.bias is not None else y


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(PADDED))
def test_full_rank_from_dense_is_the_dense_layer(case, bias):
    n_in, n_out, in_m, out_m = PADDED[case]
    dense = _dense(n_in, n_out, bias)
    layer = TTLinear.from_dense(dense, ranks=None, in_modes=in_m, out_modes=out_m)
    assert (layer.padded_in_features, layer.padded_out_features) == (math.prod(in_m), math.prod(out_m))
    assert layer.cores[0].dtype == torch.float64
    gen = torch.Generator().manual_seed(3)
    for lead in [(7,), (2, 3), (2, 1, 4), (1,), (0,), ()]:
        x = torch.randn(*lead, n_in, generator=gen, dtype=torch.float64)
        y = layer(x)
        assert y.shape == (*lead, n_out) and y.is_contiguous()
        torch.testing.assert_close(y, dense(x), rtol=1e-10, atol=1e-10)
    back = layer.to_dense()
    assert isinstance(back, nn.Linear) and (back.in_features, back.out_features) == (n_in, n_out)
    torch.testing.assert_close(back.weight, dense.weight, rtol=1e-10, atol=1e-10)
    assert (back.bias is None) == (not bias)


@pytest.mark.parametrize("case", list(PADDED))
def test_forward_is_the_real_block_of_w_pad(case):
    layer = _layer(PADDED[case])
    x = torch.randn(3, 4, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.to_dense()(x), _reference(layer, x), rtol=1e-10, atol=1e-12)
    xt = torch.randn(layer.in_features, 9, dtype=torch.float64).T  # non-contiguous input
    torch.testing.assert_close(layer(xt), _reference(layer, xt), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [PADDED_BOTH, (10, 6, [2, 6], [2, 6]), (7, 6, [2, 2, 2], [1, 2, 6])])
@pytest.mark.parametrize("bias", [True, False])
def test_every_contraction_plan_is_exact_and_counted(shape, bias):
    """Every schedule, including those whose last GEMM has exactly out_features columns while the
    output is padded (where fusing the bias would be wrong), gives the real block; MACs as counted."""
    layer = _layer(shape, ranks=2, bias=bias)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    expected = _reference(layer, x)
    shapes = [tuple(c.shape) for c in layer.cores]
    for groups in _candidate_groupings(len(shapes)):
        for direction in ("r2l", "l2r"):
            plan = _make_plan(shapes, groups, direction, 5)
            torch.testing.assert_close(layer._forward_with_plan(x, plan), expected, rtol=1e-10, atol=1e-12)
            assert _flops(layer._forward_with_plan, x, plan) == 2 * plan.macs


def test_truncated_tt_is_the_real_block_of_the_padded_tt_svd():
    n_in, n_out, in_m, out_m = PADDED_BOTH
    dense = _dense(n_in, n_out)
    padded = torch.zeros(math.prod(out_m), math.prod(in_m), dtype=torch.float64)
    padded[:n_out, :n_in] = dense.weight.detach()
    errors = []
    for rank in [1, 2, 4, 8, None]:
        layer = TTLinear.from_dense(dense, ranks=rank, in_modes=in_m, out_modes=out_m)
        svd = tt_matrix_to_full(tt_matrix_svd(padded, out_m, in_m, ranks=rank))
        got = layer.to_dense().weight.detach()
        torch.testing.assert_close(got, svd[:n_out, :n_in], rtol=1e-10, atol=1e-12)
        real = float(torch.linalg.norm(got - dense.weight.detach()))
        assert real <= float(torch.linalg.norm(svd - padded)) + 1e-12  # the real block is part of the error
        errors.append(real / float(torch.linalg.norm(dense.weight.detach())))
    assert all(math.isfinite(e) for e in errors)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-12


@pytest.mark.parametrize("eps", [0.3, 0.05])
def test_rel_eps_bounds_the_error_of_the_real_block(eps):
    n_in, n_out, in_m, out_m = PADDED_BOTH
    dense = _dense(n_in, n_out)
    layer = TTLinear.from_dense(dense, ranks=None, in_modes=in_m, out_modes=out_m, rel_eps=eps)
    w = dense.weight.detach()
    assert float(torch.linalg.norm(layer.to_dense().weight - w) / torch.linalg.norm(w)) <= eps


# ---------------------------------------------------------------------------------- MACs

@pytest.mark.parametrize("case", ["exact", *PADDED])
def test_macs_per_sample_matches_flop_counter(case):
    layer = _layer(EXACT if case == "exact" else PADDED[case], dtype=torch.float32)
    plan1 = layer._plan_for(1)
    x1 = torch.randn(1, layer.in_features)
    # with autograd (and unmerged under no_grad) every forward merges the cores again
    assert _flops(layer, x1) == 2 * (layer.macs_per_sample() + layer.merge_macs())
    x3 = torch.randn(3, 5, layer.in_features)  # (B, T, in): 15 rows
    chosen = layer._plan_for(15)  # costed at its bucket (16 rows): recount it at 15
    plan15 = _make_plan([tuple(c.shape) for c in layer.cores], chosen.groups, chosen.direction, 15)
    assert _flops(layer, x3) == 2 * plan15.macs and layer.merge_macs(15) == plan15.merge_macs
    # MACs are linear in the batch for a fixed schedule: n·macs_per_sample plus the merge once
    assert _flops(layer._forward_with_plan, x3, plan1) == 2 * (15 * layer.macs_per_sample() + plan1.merge_macs)
    with torch.no_grad():
        assert _flops(layer, x1) == 2 * (layer.macs_per_sample() + layer.merge_macs())
        layer.eval().merge()
        layer(x1)
        layer(x3)  # snapshot filled for both schedules
        assert _flops(layer, x1) == 2 * layer.macs_per_sample()
        assert _flops(layer, x3) == 2 * (plan15.macs - plan15.merge_macs)


def test_macs_count_the_padded_contractions():
    """A padded layer costs what its padded TT matrix costs: the same as the unpadded layer of those sizes."""
    n_in, n_out, in_m, out_m = PADDED_BOTH
    padded = TTLinear(n_in, n_out, in_modes=in_m, out_modes=out_m, ranks=3)
    full = TTLinear(math.prod(in_m), math.prod(out_m), in_modes=in_m, out_modes=out_m, ranks=3)
    assert padded.macs_per_sample() == full.macs_per_sample() > 0
    assert padded.merge_macs() == full.merge_macs()


# ---------------------------------------------------------------------------------- snapshot, contract

@pytest.mark.parametrize("case", list(PADDED))
def test_merged_snapshot_equals_unmerged_forward(case):
    layer = _layer(PADDED[case]).eval()
    inputs = [torch.randn(*lead, layer.in_features, dtype=torch.float64) for lead in [(1,), (6,), (2, 9), ()]]
    with torch.no_grad():
        plain = [layer(x) for x in inputs]
        layer.merge()
        got = [layer(x) for x in inputs]
        assert layer._merged_ops()  # the snapshot is in use
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.cores[-1].mul_(2.0)  # an update the snapshot must not hide
        torch.testing.assert_close(layer(inputs[1]), _reference(layer, inputs[1]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_config_and_state_dict_round_trip(bias):
    layer = TTLinear.from_dense(_dense(50, 37, bias).float(), ranks=[3, 4], in_modes=[4, 4, 4], out_modes=[2, 4, 5])
    config = layer.config()
    assert set(config) == set(_layer(EXACT).config())  # no new keys
    assert config["in_modes"] == [4, 4, 4] and config["out_modes"] == [2, 4, 5]
    rebuilt = TTLinear(**json.loads(json.dumps(config)))
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(4, 50)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.config() == config
    assert [tuple(c.shape) for c in rebuilt.cores] == [(1, 2, 4, 3), (3, 4, 4, 4), (4, 5, 4, 1)]


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_tiny_padded_layer(bias):
    layer = _layer((5, 3, [2, 3], [2, 2]), ranks=2, bias=bias)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)

    def f(inp, *ps):
        return functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_traces_and_matches():
    layer = _layer(PADDED_BOTH).eval()
    x = torch.randn(3, 50, dtype=torch.float64)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        other = torch.randn(3, 50, dtype=torch.float64)
        torch.testing.assert_close(traced(other), layer(other))


def test_random_init_has_the_dense_variance_on_the_real_block():
    # nn.Linear: Var(W_ij) = 1/(3·in) with the real in_features (50), not the padded 64.
    layer = _layer(PADDED_BOTH, ranks=4, bias=True, dtype=torch.float32)
    samples = []
    for _ in range(200):
        layer.reset_parameters()
        samples.append(layer.to_dense().weight.detach())
    ratio = torch.stack(samples).pow(2).mean().item() * 3 * 50
    assert abs(ratio - 1) < 0.1, ratio
    assert layer.bias.abs().max() <= 1 / math.sqrt(50)


# ---------------------------------------------------------------------------------- errors, repr, data-aware

@pytest.mark.parametrize("in_modes, out_modes", [([3, 2, 4], [2, 3, 5]), ([3, 2, 5], [2, 3, 3]), ([2, 2], [2, 2])])
def test_a_product_smaller_than_the_features_is_a_clear_error(in_modes, out_modes):
    with pytest.raises(RankError) as info:
        TTLinear(30, 24, in_modes=in_modes, out_modes=out_modes)
    msg = str(info.value)
    assert "\n" not in msg and "30" in msg and "24" in msg and "need ≥" in msg
    with pytest.raises(RankError):
        TTLinear.from_dense(nn.Linear(30, 24), ranks=2, in_modes=in_modes, out_modes=out_modes)


def test_extra_repr_shows_the_padding_only_when_present():
    text = repr(_layer(PADDED_BOTH))
    assert "padded=in 50→[4, 4, 4]=64, out 37→[2, 4, 5]=40" in text
    assert "padded" not in repr(_layer(EXACT))


def test_kronecker_whitening_is_skipped_for_padded_in_modes():
    cfg = {"in_modes": [4, 4, 4], "out_modes": [2, 4, 5]}
    assert TTLinear.input_kronecker_modes(nn.Linear(50, 37), cfg) is None
    assert TTLinear.input_kronecker_modes(nn.Linear(64, 37), cfg) == [4, 4, 4]  # padded out modes are fine
    assert TTLinear.input_kronecker_modes(nn.Linear(64, 40), cfg) == [4, 4, 4]


def test_padded_weight_zero_pads_in_float64_and_leaves_exact_sizes_alone():
    w = torch.randn(37, 50)
    p = TTLinear.padded_weight(w, [4, 4, 4], [2, 4, 5])
    assert p.shape == (40, 64) and p.dtype == torch.float64
    assert torch.equal(p[:37, :50], w.double()) and not p[37:].any() and not p[:, 50:].any()
    assert TTLinear.padded_weight(w, [5, 10], [37]) is w
