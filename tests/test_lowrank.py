"""Truncated SVD / rank rules (tncompress.decompositions.svd) and the LowRankLinear layer."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tncompress.decompositions.svd import (
    energy_rank,
    lowrank_rank_for_fraction,
    singular_values,
    truncated_svd,
)
from tncompress.errors import RankError
from tncompress.layers.lowrank_linear import LowRankLinear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.detach() - b.detach()) / torch.linalg.norm(b.detach()))


# ---------------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("rank", [1, 4, 17, 20])
def test_truncated_svd_is_optimal_and_balanced(rank):
    w = torch.randn(20, 33, generator=torch.Generator().manual_seed(0))  # float32 in
    left, right = truncated_svd(w, rank)
    assert left.shape == (20, rank) and right.shape == (rank, 33)
    assert left.dtype == right.dtype == torch.float64
    s = torch.linalg.svdvals(w.double())
    err = torch.linalg.norm(left @ right - w.double())
    assert torch.isclose(err, s[rank:].norm(), rtol=1e-9, atol=1e-10)  # Eckart–Young
    # sqrt(S) on each side: column norms of left = row norms of right = sqrt(s)
    torch.testing.assert_close(left.norm(dim=0), s[:rank].sqrt())
    torch.testing.assert_close(right.norm(dim=1), s[:rank].sqrt())


def test_truncated_svd_rejects_bad_ranks():
    w = torch.randn(6, 4)
    for bad in (0, -1, 5, 2.0):
        with pytest.raises(RankError) as exc:
            truncated_svd(w, bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(RankError):
        truncated_svd(torch.randn(2, 3, 4), 1)


def test_singular_values_and_energy_rank():
    w = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))
    s = singular_values(w)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    # squared: 16, 9, 4, 1, 0 -> total 30; cumulative 16, 25, 29, 30
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 16 / 30) == 1
    assert energy_rank(s, 0.54) == 2
    assert energy_rank(s, 29 / 30) == 3
    assert energy_rank(s, 0.97) == 4
    assert energy_rank(s, 1.0) == 4  # the zero singular value is never needed
    assert energy_rank(torch.zeros(3), 0.9) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(RankError):
            energy_rank(s, bad)


@pytest.mark.parametrize("m,n", [(4096, 25088), (10, 784), (64, 64), (3, 5)])
@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.3, 0.9])
def test_rank_for_fraction_is_largest_within_budget(m, n, fraction):
    r = lowrank_rank_for_fraction(m, n, fraction)
    assert 1 <= r <= min(m, n)
    if r * (m + n) <= fraction * m * n:
        assert r == min(m, n) or (r + 1) * (m + n) > fraction * m * n
    else:
        assert r == 1  # even rank 1 is over budget: at least 1


def test_rank_for_fraction_exact_values():
    assert lowrank_rank_for_fraction(100, 100, 0.1) == 5  # 5·200 = 1000 = 0.1·10000
    assert lowrank_rank_for_fraction(100, 100, 0.0999) == 4
    assert lowrank_rank_for_fraction(100, 100, 5.0) == 100
    with pytest.raises(RankError):
        lowrank_rank_for_fraction(100, 100, 0)


# ---------------------------------------------------------------------------------- layer


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_is_exact_at_full_rank(bias):
    torch.manual_seed(0)
    dense = nn.Linear(30, 20, bias=bias)
    layer = LowRankLinear.from_dense(dense, rank=20)
    x = torch.randn(7, 30)
    assert rel_err(layer(x), dense(x)) < 1e-5
    assert rel_err(layer.to_dense().weight, dense.weight) < 1e-5
    assert (layer.bias is None) == (not bias)


def test_from_dense_truncation_error_is_optimal():
    torch.manual_seed(1)
    dense = nn.Linear(40, 24).double()
    s = torch.linalg.svdvals(dense.weight.detach())
    layer = LowRankLinear.from_dense(dense, rank=6)
    err = torch.linalg.norm(layer.to_dense().weight - dense.weight).detach()
    assert torch.isclose(err, s[6:].norm(), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_dense_keeps_dtype(dtype):
    dense = nn.Linear(16, 12, dtype=dtype)
    layer = LowRankLinear.from_dense(dense, rank=3)
    assert all(p.dtype == dtype for p in layer.parameters())
    assert layer.to_dense().weight.dtype == dtype


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 4), (0,), ()])
def test_forward_equals_dense(bias, lead):
    torch.manual_seed(2)
    layer = LowRankLinear(30, 20, rank=4, bias=bias, dtype=torch.float64)
    dense = layer.to_dense()
    x = torch.randn(*lead, 30, dtype=torch.float64)
    expected = x @ dense.weight.T + (dense.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected)


def test_rank_is_clipped_or_rejected():
    assert LowRankLinear(30, 20, rank=50).rank == 20
    assert LowRankLinear(30, 20, rank=50).first.shape == (20, 30)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(RankError):
            LowRankLinear(30, 20, rank=bad)


def test_gradcheck_tiny_layer():
    torch.manual_seed(0)
    layer = LowRankLinear(5, 4, rank=2, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_random_init_matches_nn_linear_variance():
    # nn.Linear: Var(W_ij) = 1/(3·in). Pooled over 300 inits the estimate's spread is ~1%.
    torch.manual_seed(0)
    layer = LowRankLinear(64, 48, rank=5, bias=False)
    firsts, seconds = [], []
    for _ in range(300):
        layer.reset_parameters()
        firsts.append(layer.first.detach().clone())
        seconds.append(layer.second.detach().clone())
    weights = torch.bmm(torch.stack(seconds), torch.stack(firsts))  # one call: see test_tt
    ratio = weights.pow(2).mean().item() * 3 * 64
    assert abs(ratio - 1) < 0.05, ratio
    # The two factors share the scale evenly.
    assert abs(layer.first.std().item() / layer.second.std().item() - 1) < 0.1
    bias = LowRankLinear(64, 48, rank=5).bias
    assert bias.abs().max() <= 1 / 8


def test_state_dict_round_trip_through_config():
    layer = LowRankLinear.from_dense(nn.Linear(30, 20), rank=7)
    config = layer.config()
    json.dumps(config)
    rebuilt = type(layer)(**config)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(4, 30)
    assert torch.equal(rebuilt(x), layer(x))
    nobias = LowRankLinear(30, 20, rank=3, bias=False)
    again = LowRankLinear(**nobias.config())
    again.load_state_dict(nobias.state_dict(), strict=True)
    assert torch.equal(again(x), nobias(x))


@pytest.mark.parametrize("bias", [True, False])
def test_macs_per_sample_matches_flop_counter(bias):
    layer = LowRankLinear(784, 300, rank=16, bias=bias)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, 784))
    assert counter.get_total_flops() == 2 * layer.macs_per_sample() == 2 * 16 * (784 + 300)


def test_extra_repr():
    text = repr(LowRankLinear(30, 20, rank=4))
    assert "rank=4" in text and "in_features=30" in text and "params=200" in text


@pytest.mark.parametrize("shape", [(20, 33), (33, 20)])
def test_large_matrix_route_is_also_optimal(monkeypatch, shape):
    # Large weights go through eigh of the Gram matrix instead of LAPACK's slow SVD; force that
    # route on a small matrix and check it gives the same optimal, balanced factors.
    import tncompress.decompositions.svd as svd_module

    monkeypatch.setattr(svd_module, "_EXACT_SVD_WORK", 0)
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(singular_values(w), s, rtol=1e-7, atol=1e-7)
    for rank in (1, 6, 20):
        left, right = truncated_svd(w, rank)
        err = torch.linalg.norm(left @ right - w)
        assert torch.isclose(err, s[rank:].norm(), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(left.norm(dim=0), s[:rank].sqrt())
        torch.testing.assert_close(right.norm(dim=1), s[:rank].sqrt())
