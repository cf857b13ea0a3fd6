"""TT-matrix decomposition (tncompress.decompositions.tt) and the TTLinear layer."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tncompress.decompositions.tt import (
    auto_modes,
    balanced_modes,
    clip_tt_ranks,
    max_tt_ranks,
    tt_matrix_svd,
    tt_matrix_to_full,
    tt_param_count,
    tt_rank_for_fraction,
)
from tncompress.errors import RankError
from tncompress.layers.tt_linear import TTLinear, _candidate_groupings, _make_plan
from tncompress.measure import LargestTensorMode

FC6_IN = [2, 7, 8, 8, 7, 4]
FC6_OUT = [4] * 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.detach() - b.detach()) / torch.linalg.norm(b.detach()))


def random_tt(out_modes, in_modes, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = [1, *ranks, 1]
    return [torch.randn(full[k], m, n, full[k + 1], generator=g, dtype=dtype)
            for k, (m, n) in enumerate(zip(out_modes, in_modes))]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------------- modes and ranks


@pytest.mark.parametrize("features,d", [(25088, 6), (4096, 6), (4096, 4), (1000, 3), (7, 3), (1, 2), (360, 5)])
def test_balanced_modes_multiply_out_and_are_balanced(features, d):
    modes = balanced_modes(features, d)
    assert len(modes) == d and math.prod(modes) == features
    assert modes == sorted(modes)


def test_balanced_modes_values():
    assert balanced_modes(25088, 6) == [4, 4, 4, 7, 7, 8]
    assert balanced_modes(4096, 6) == [4] * 6
    assert balanced_modes(7, 3) == [1, 1, 7]  # too few primes: 1s


@pytest.mark.parametrize("n_in,n_out", [(25088, 4096), (4096, 1000), (784, 10), (7, 3), (16, 16), (256, 120)])
def test_auto_modes_fit_and_have_no_empty_cores(n_in, n_out):
    in_modes, out_modes = auto_modes(n_in, n_out)
    assert math.prod(in_modes) == n_in and math.prod(out_modes) == n_out
    assert len(in_modes) == len(out_modes) >= 2
    assert all(m * n > 1 for m, n in zip(out_modes, in_modes))
    assert max_tt_ranks(out_modes, in_modes)  # bonds exist


def test_auto_modes_default_order_and_explicit_d():
    assert len(auto_modes(25088, 4096)[0]) == 4  # large layers: 4 cores
    assert len(auto_modes(100, 60)[0]) == 3
    assert len(auto_modes(20, 12)[0]) == 2
    in_modes, out_modes = auto_modes(25088, 4096, d=6)
    assert sorted(in_modes) == [4, 4, 4, 7, 7, 8] and out_modes == [4] * 6


def test_bond_maxima_and_clipping_fc6():
    assert max_tt_ranks(FC6_OUT, FC6_IN) == [8, 224, 7168, 448, 16]
    assert clip_tt_ranks(2, FC6_OUT, FC6_IN) == [2] * 5
    assert clip_tt_ranks(100, FC6_OUT, FC6_IN) == [8, 100, 100, 100, 16]
    assert tt_param_count(FC6_OUT, FC6_IN, 2) == 528
    assert tt_param_count(FC6_OUT, FC6_IN, [2] * 5) == 528
    layer = TTLinear(25088, 4096, in_modes=FC6_IN, out_modes=FC6_OUT, ranks=100)
    assert layer.ranks == [8, 100, 100, 100, 16]
    assert sum(p.numel() for p in layer.cores) == tt_param_count(FC6_OUT, FC6_IN, 100)


def test_explicit_rank_list_is_validated():
    with pytest.raises(RankError) as exc:
        clip_tt_ranks([8, 100, 100, 100, 17], FC6_OUT, FC6_IN)
    msg = one_line(exc)
    assert "bond 5" in msg and "16" in msg
    with pytest.raises(RankError) as exc:
        clip_tt_ranks([4, 4], FC6_OUT, FC6_IN)
    assert "5" in one_line(exc)
    for bad in (0, -3, [1, 0, 2, 2, 2], "8", 2.5):
        with pytest.raises(RankError):
            clip_tt_ranks(bad, FC6_OUT, FC6_IN)
    with pytest.raises(RankError):
        TTLinear(25088, 4096, in_modes=FC6_IN, out_modes=FC6_OUT, ranks=[9, 4, 4, 4, 4])


def test_rank_for_fraction_is_largest_within_budget():
    for fraction in (1e-4, 1e-3, 0.01, 0.2):
        r = tt_rank_for_fraction(FC6_OUT, FC6_IN, fraction)
        budget = fraction * 25088 * 4096
        assert tt_param_count(FC6_OUT, FC6_IN, r) <= budget
        assert tt_param_count(FC6_OUT, FC6_IN, r + 1) > budget
    assert tt_rank_for_fraction(FC6_OUT, FC6_IN, 1e-9) == 1  # at least 1
    with pytest.raises(RankError):
        tt_rank_for_fraction(FC6_OUT, FC6_IN, 0.0)


# ---------------------------------------------------------------------------------- TT-SVD


@pytest.mark.parametrize("out_modes,in_modes", [([2, 3, 4], [3, 2, 5]), ([4, 6], [5, 6]), ([24], [30]),
                                                ([24, 1], [1, 30]), ([1, 2, 3, 4], [5, 1, 3, 2])])
def test_tt_svd_is_exact_at_full_rank(out_modes, in_modes):
    w = torch.randn(24, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cores = tt_matrix_svd(w, out_modes, in_modes)
    assert [c.shape[3] for c in cores[:-1]] == max_tt_ranks(out_modes, in_modes)
    assert all(c.dtype == torch.float64 for c in cores)
    assert rel_err(tt_matrix_to_full(cores), w) < 1e-10


def test_tt_svd_of_float32_is_computed_in_float64():
    w = torch.randn(24, 30)
    cores = tt_matrix_svd(w, [2, 3, 4], [3, 2, 5])
    assert all(c.dtype == torch.float64 for c in cores)
    assert rel_err(tt_matrix_to_full(cores), w.double()) < 1e-10


def test_tt_svd_rel_eps_bounds_the_error():
    g = torch.Generator().manual_seed(2)
    out_modes, in_modes = [4, 4, 4], [4, 3, 6]
    signal = tt_matrix_to_full(random_tt(out_modes, in_modes, [3, 5], seed=2))
    w = signal / signal.norm() + 0.2 * torch.randn(64, 72, dtype=torch.float64, generator=g) / math.sqrt(64 * 72)
    previous = max_tt_ranks(out_modes, in_modes)
    for eps in (0.0, 0.01, 0.1, 0.25, 0.5, 0.9):
        cores = tt_matrix_svd(w, out_modes, in_modes, rel_eps=eps)
        ranks = [c.shape[3] for c in cores[:-1]]
        err = rel_err(tt_matrix_to_full(cores), w)
        assert err <= eps + 1e-12, (eps, err)
        assert all(r <= p for r, p in zip(ranks, previous))  # looser accuracy, never larger ranks
        previous = ranks
        capped = tt_matrix_svd(w, out_modes, in_modes, ranks=3, rel_eps=eps)
        assert [c.shape[3] for c in capped[:-1]] == [min(3, r) for r in ranks]
    assert tt_matrix_svd(w, out_modes, in_modes, rel_eps=0.25)[0].shape[3] < 16  # it did truncate


def test_tt_svd_finds_the_exact_tt_ranks():
    out_modes, in_modes, ranks = [3, 4, 2, 3], [2, 3, 4, 2], [2, 3, 2]
    w = tt_matrix_to_full(random_tt(out_modes, in_modes, ranks))
    cores = tt_matrix_svd(w, out_modes, in_modes, rel_eps=1e-9)
    assert [c.shape[3] for c in cores[:-1]] == ranks
    assert rel_err(tt_matrix_to_full(cores), w) < 1e-10


def test_tt_svd_with_two_cores_is_the_optimal_low_rank_approximation():
    w = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 12):
        cores = tt_matrix_svd(w, [20, 1], [1, 30], ranks=r)
        err = torch.linalg.norm(tt_matrix_to_full(cores) - w)
        assert torch.isclose(err, s[r:].norm(), rtol=1e-10)  # Eckart–Young


def test_tt_svd_pads_unreachable_explicit_ranks():
    w = torch.randn(16, 16, dtype=torch.float64)
    cores = tt_matrix_svd(w, [2, 2, 2, 2], [2, 2, 2, 2], ranks=[1, 16, 4])
    assert [c.shape[3] for c in cores[:-1]] == [1, 16, 4]


def test_tt_svd_rejects_modes_that_do_not_multiply_out():
    w = torch.randn(24, 30)
    with pytest.raises(RankError) as exc:
        tt_matrix_svd(w, [2, 3, 5], [3, 2, 5])
    msg = one_line(exc)
    assert "30" in msg and "24" in msg
    with pytest.raises(RankError):
        tt_matrix_svd(w, [2, 3, 4], [3, 10])
    with pytest.raises(RankError):
        tt_matrix_svd(w, [2, 3, 4], [3, 2, 5], ranks=[7, 1])
    with pytest.raises(RankError):
        TTLinear(30, 24, in_modes=[3, 2, 5], out_modes=[2, 3, 3])  # 18 < 24 outputs (a larger product pads)


# ---------------------------------------------------------------------------------- TTLinear


def small_layer(bias=True, dtype=torch.float32, seed=0, ranks=(3, 4, 2)):
    torch.manual_seed(seed)
    layer = TTLinear(60, 48, in_modes=[3, 2, 5, 2], out_modes=[2, 4, 3, 2], ranks=list(ranks), bias=bias, dtype=dtype)
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 4), (1,), (0,), ()])
def test_forward_equals_dense(bias, lead):
    layer = small_layer(bias=bias, dtype=torch.float64)
    dense = layer.to_dense()
    x = torch.randn(*lead, 60, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, 48)
    expected = x @ dense.weight.T + (dense.bias if bias else 0)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


def test_every_contraction_plan_gives_the_same_result():
    layer = small_layer(dtype=torch.float64)
    x = torch.randn(7, 60, dtype=torch.float64)
    expected = layer.to_dense()(x)
    shapes = [tuple(c.shape) for c in layer.cores]
    plans = [_make_plan(shapes, g, dr, 7) for g in _candidate_groupings(4) for dr in ("r2l", "l2r")]
    assert len(plans) == 14
    for plan in plans:
        torch.testing.assert_close(layer._forward_with_plan(x, plan), expected, rtol=1e-10, atol=1e-12)
        with FlopCounterMode(display=False) as counter:
            layer._forward_with_plan(x, plan)
        assert counter.get_total_flops() == 2 * plan.macs  # the cost model counts what runs


def test_non_contiguous_input():
    layer = small_layer(dtype=torch.float64)
    x = torch.randn(60, 9, dtype=torch.float64).T
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_is_exact_at_full_rank(bias):
    torch.manual_seed(0)
    dense = nn.Linear(60, 48, bias=bias)
    layer = TTLinear.from_dense(dense, ranks=None, in_modes=[3, 2, 5, 2], out_modes=[2, 4, 3, 2])
    assert layer.ranks == max_tt_ranks([2, 4, 3, 2], [3, 2, 5, 2])
    x = torch.randn(10, 60)
    assert rel_err(layer(x), dense(x)) < 1e-5
    assert rel_err(layer.to_dense().weight, dense.weight) < 1e-5
    assert (layer.bias is None) == (not bias)
    assert layer.cores[0].dtype == torch.float32 and layer.cores[0].requires_grad


def test_from_dense_keeps_dtype_and_balances_cores():
    dense = nn.Linear(64, 32).double()
    layer = TTLinear.from_dense(dense, ranks=4)
    assert all(c.dtype == torch.float64 for c in layer.cores) and layer.bias.dtype == torch.float64
    norms = torch.stack([c.norm() for c in layer.cores])
    torch.testing.assert_close(norms, norms.mean().expand_as(norms))
    layer32 = TTLinear.from_dense(nn.Linear(64, 32), ranks=4)
    assert all(p.dtype == torch.float32 for p in layer32.parameters())


def test_from_dense_rel_eps_and_partial_modes():
    g = torch.Generator().manual_seed(4)
    w = tt_matrix_to_full(random_tt([4, 4, 4], [4, 2, 8], [2, 3])).float()
    dense = nn.Linear(64, 64)
    with torch.no_grad():
        dense.weight.copy_(w + 1e-3 * torch.randn(64, 64, generator=g))
    layer = TTLinear.from_dense(dense, ranks=None, in_modes=[4, 2, 8], rel_eps=0.05)
    assert layer.out_modes and math.prod(layer.out_modes) == 64 and len(layer.out_modes) == 3
    assert rel_err(layer.to_dense().weight, dense.weight) <= 0.05
    capped = TTLinear.from_dense(dense, ranks=2, in_modes=[4, 2, 8], out_modes=[4, 4, 4], rel_eps=0.05)
    assert capped.ranks == [2, 2]


def test_gradcheck_tiny_layer():
    torch.manual_seed(0)
    layer = TTLinear(6, 4, in_modes=[2, 3], out_modes=[2, 2], ranks=2, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_random_init_matches_nn_linear_variance():
    # Var(W_ij) of nn.Linear's default init is 1/(3·in). Pool 300 independent inits so the
    # (heavy-tailed) product-of-Gaussians estimate is within ~1% (5% tolerance); the textbook
    # mistake (no square root on Π r_k) would be off by a factor Π r_k = 64 here. W is formed
    # for all inits at once (few large ops: tiny BLAS calls are slow on a busy 2-core machine).
    torch.manual_seed(0)
    target = 1.0 / (3 * 64)
    layer = TTLinear(64, 48, in_modes=[4, 4, 4], out_modes=[4, 4, 3], ranks=8, bias=False)
    stacks: list[list[torch.Tensor]] = [[] for _ in layer.cores]
    for _ in range(300):
        layer.reset_parameters()
        for stack, core in zip(stacks, layer.cores):
            stack.append(core.detach().clone())
    full = torch.stack(stacks[0])  # (S, 1, m, n, r)
    for stack in stacks[1:]:
        core = torch.stack(stack)
        s_, r0, ma, na, _ = full.shape
        full = torch.einsum("sxabr,srcdy->sxacbdy", full, core)
        full = full.reshape(s_, r0, ma * core.shape[2], na * core.shape[3], core.shape[4])
    torch.testing.assert_close(full[-1].reshape(48, 64), layer.to_dense().weight.detach())
    ratio = full.pow(2).mean().item() / target
    assert abs(ratio - 1) < 0.05, ratio
    layer = TTLinear(64, 48, ranks=8)
    assert layer.bias.abs().max() <= 1 / 8 and layer.bias.std() > 1 / 16  # nn.Linear's U(±1/√in)


def test_state_dict_round_trip_through_config():
    layer = TTLinear.from_dense(nn.Linear(60, 48), ranks=[3, 5, 2], in_modes=[3, 2, 5, 2], out_modes=[2, 4, 3, 2])
    rebuilt = type(layer)(**layer.config())
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(4, 60)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.config() == layer.config()
    import json

    json.dumps(layer.config())
    nobias = TTLinear(60, 48, ranks=3, bias=False)
    again = TTLinear(**nobias.config())
    again.load_state_dict(nobias.state_dict(), strict=True)
    assert torch.equal(again(x), nobias(x))


@pytest.mark.parametrize("shape", [((2, 7, 8, 8, 7, 4), (4,) * 6, 4), ((3, 2, 5, 2), (2, 4, 3, 2), 3),
                                   ((8, 8, 8, 8), (8, 8, 8, 8), 8), ((784,), (10,), 1)])
def test_macs_per_sample_matches_flop_counter(shape):
    in_modes, out_modes, r = shape
    layer = TTLinear(math.prod(in_modes), math.prod(out_modes), in_modes=list(in_modes), out_modes=list(out_modes), ranks=r)
    x = torch.randn(1, layer.in_features)
    with FlopCounterMode(display=False) as counter:  # with autograd the cores are merged every call
        layer(x)
    assert counter.get_total_flops() == 2 * (layer.macs_per_sample() + layer.merge_macs())
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:  # unmerged: no hidden cache, merges again
            layer(x)
        assert counter.get_total_flops() == 2 * (layer.macs_per_sample() + layer.merge_macs())
        layer.eval().merge()
        layer(x)  # merged for inference: merges once, then reuses them
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert counter.get_total_flops() == 2 * layer.macs_per_sample()


@pytest.mark.parametrize("batch", [1, 64])
def test_forward_never_forms_w_at_fc6(batch):
    layer = TTLinear(25088, 4096, in_modes=FC6_IN, out_modes=FC6_OUT, ranks=4)
    w_size = 25088 * 4096
    x = torch.randn(batch, 25088)
    with torch.no_grad(), LargestTensorMode() as mode, FlopCounterMode(display=False) as counter:
        layer(x)
    assert mode.largest <= max(x.numel(), batch * 4096 * 16)  # activations only, nothing W-sized
    assert counter.get_total_flops() / 2 < batch * w_size / 20  # ≥ 20x fewer MACs than nn.Linear
    assert layer.macs_per_sample() < w_size / 20


def test_fc6_plan_merges_cores():
    layer = TTLinear(25088, 4096, in_modes=FC6_IN, out_modes=FC6_OUT, ranks=4)
    plan = layer._plan_for(64)
    assert 2 <= len(plan.groups) < 6  # neither W nor the naive six-step chain


def test_extra_repr_shows_structure():
    text = repr(TTLinear(25088, 4096, in_modes=FC6_IN, out_modes=FC6_OUT, ranks=2))
    assert "in_modes=[2, 7, 8, 8, 7, 4]" in text and "ranks=[2, 2, 2, 2, 2]" in text and "params=528" in text


def test_layers_import_without_tensorly():
    code = (
        "import sys; sys.modules['tensorly'] = None\n"
        "import torch\n"
        "from tncompress.layers.tt_linear import TTLinear\n"
        "from tncompress.layers.lowrank_linear import LowRankLinear\n"
        "l = TTLinear(64, 32, ranks=4); l(torch.randn(2, 64)); l.to_dense()\n"
        "TTLinear.from_dense(l.to_dense(), ranks=4)\n"
        "LowRankLinear.from_dense(torch.nn.Linear(8, 6), rank=2)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_merged_snapshot_follows_parameter_updates():
    torch.manual_seed(0)
    layer = TTLinear(64, 48, in_modes=[4, 4, 4], out_modes=[4, 4, 3], ranks=3).eval()
    x = torch.randn(5, 64)
    layer.merge()
    with torch.no_grad():
        first = layer(x)
        assert layer._merged_ops()  # the snapshot holds the merged cores
        layer.cores[0].mul_(2.0)  # an in-place update, like an optimizer step
        second = layer(x)
    expected = x @ layer.to_dense().weight.T + layer.bias
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    other = TTLinear(64, 48, in_modes=[4, 4, 4], out_modes=[4, 4, 3], ranks=3)
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), other(x))
    y = layer(x)  # with autograd: no cache, gradients flow
    y.sum().backward()
    assert all(c.grad is not None for c in layer.cores)
