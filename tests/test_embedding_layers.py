"""LowRankEmbedding and TTEmbedding: exact at full rank (padded modes included), SVD-optimal /
TT-SVD-bounded truncation, nn.Embedding's padding and range semantics, a forward that never forms
the table, MACs equal to FlopCounterMode, config/state-dict round trip, gradients, id shapes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from tncompress.errors import RankError
from tncompress.layers import LAYER_CLASSES, LowRankEmbedding, TTEmbedding, build_layer
from tncompress.measure import LargestTensorMode


def _table(v: int, d: int, dtype: torch.dtype = torch.float64, padding_idx: int | None = None,
           seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(v, d, padding_idx=padding_idx, dtype=dtype)


def _flops(layer: nn.Module, ids: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(ids)
    return int(counter.get_total_flops())


# (V, D, vocab_modes, dim_modes): padded vocab, D not a product, exact products, one core
TT_SHAPES = [
    (50, 8, [4, 4, 4], [2, 2, 2]),
    (50, 6, [8, 8], [2, 4]),
    (24, 12, [2, 3, 4], [3, 2, 2]),
    (30, 10, [2, 4, 4], [4, 2, 2]),
    (7, 5, [7], [5]),
]


# ------------------------------------------------------------------ exactness and truncation

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", TT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}-{s[3]}")
def test_tt_full_rank_reproduces_the_table(shape, dtype, tol):
    v, d, vm, dm = shape
    dense = _table(v, d, dtype, padding_idx=1)
    layer = TTEmbedding.from_dense(dense, vm, dm, ranks=None)
    assert layer.cores[0].dtype == dtype
    ids = torch.arange(v)
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), dense(ids), rtol=tol, atol=tol)
        torch.testing.assert_close(layer.to_dense().weight, dense.weight, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_lowrank_full_rank_reproduces_the_table(dtype, tol):
    dense = _table(40, 6, dtype, padding_idx=0)
    layer = LowRankEmbedding.from_dense(dense, rank=100)  # clipped to min(V, D)
    assert layer.rank == 6
    ids = torch.arange(40)
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), dense(ids), rtol=tol, atol=tol)
        torch.testing.assert_close(layer.to_dense().weight, dense.weight, rtol=tol, atol=tol)


def test_lowrank_error_is_the_svd_optimum_and_decreases():
    dense = _table(30, 12)
    w = dense.weight.detach()
    s = torch.linalg.svdvals(w)
    errors = []
    for rank in range(1, 13):
        layer = LowRankEmbedding.from_dense(dense, rank)
        err = float(torch.linalg.norm(layer.to_dense().weight.detach() - w))
        assert err == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), abs=1e-9)  # Eckart–Young
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10


def _unfolding_errors(table: torch.Tensor, vm: list[int], dm: list[int], ranks: list[int]) -> float:
    """TT-SVD's bound: sqrt(Σ_k best rank-r_k error² of unfolding k) of the (padded) TT-matrix tensor."""
    k_all = len(vm)
    t = table.reshape(*vm, *dm).permute(*[ax for k in range(k_all) for ax in (k, k_all + k)])
    total = 0.0
    for k, r in enumerate(ranks):
        rows = math.prod(vm[: k + 1]) * math.prod(dm[: k + 1])
        s = torch.linalg.svdvals(t.reshape(rows, -1))
        total += float(s[r:].pow(2).sum())
    return math.sqrt(total)


def test_tt_error_decreases_with_rank_within_the_tt_svd_bound():
    v, d, vm, dm = 60, 6, [4, 4, 4], [2, 1, 3]
    dense = _table(v, d)
    padded = torch.zeros(64, 6, dtype=torch.float64)
    padded[:v, :d] = dense.weight.detach()
    errors = []
    for rank in [1, 2, 3, 4, 6, 8, 12, 24]:
        layer = TTEmbedding.from_dense(dense, vm, dm, ranks=rank)
        err = float(torch.linalg.norm(layer.to_dense().weight.detach() - dense.weight.detach()))
        assert err <= _unfolding_errors(padded, vm, dm, layer.ranks) + 1e-9
        errors.append(err)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1.0 and errors[-1] < 1e-10


def test_tt_rel_eps_bounds_the_relative_error():
    dense = _table(64, 8)
    layer = TTEmbedding.from_dense(dense, [4, 4, 4], [2, 2, 2], ranks=None, rel_eps=0.5)
    rel = float(torch.linalg.norm(layer.to_dense().weight.detach() - dense.weight.detach()) / dense.weight.detach().norm())
    assert rel <= 0.5 and max(layer.ranks) < max(TTEmbedding(64, 8, [4, 4, 4], [2, 2, 2], ranks=64).ranks)


def test_reset_parameters_gives_unit_variance_tables():
    torch.manual_seed(0)
    layers = [TTEmbedding(1000, 64, [10, 10, 10], [4, 4, 4], ranks=8, dtype=torch.float64),
              TTEmbedding(512, 32, [8, 8, 8], [2, 4, 4], ranks=[4, 16], dtype=torch.float64),
              LowRankEmbedding(1000, 64, rank=16, dtype=torch.float64)]
    for layer in layers:
        variances = []
        for _ in range(4):
            layer.reset_parameters()
            variances.append(float(layer.to_dense().weight.detach().var()))
        assert 0.5 < sum(variances) / len(variances) < 2.0, (layer, variances)


# ------------------------------------------------------------------ nn.Embedding semantics

@pytest.mark.parametrize("kind", ["tt", "lowrank"])
def test_padding_positions_are_exact_zeros_without_gradient(kind):
    layer: nn.Module
    if kind == "tt":
        layer = TTEmbedding(50, 6, [4, 4, 4], [2, 1, 3], ranks=3, padding_idx=-2, dtype=torch.float64)
    else:
        layer = LowRankEmbedding(50, 6, rank=3, padding_idx=-2, dtype=torch.float64)
    assert layer.padding_idx == 48 and layer.config()["padding_idx"] == 48
    ids = torch.tensor([[48, 3, 48], [0, 49, 48]])
    out = layer(ids)
    assert torch.equal(out[ids == 48], torch.zeros(3, 6, dtype=torch.float64))
    assert (out[ids != 48].abs().sum(-1) > 0).all()
    out[ids == 48].sum().backward()  # only padding positions: no gradient reaches the factors
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
    dense = layer.to_dense()
    assert dense.padding_idx == 48 and not dense.weight[48].any()
    torch.testing.assert_close(dense(ids), layer(ids).detach(), rtol=1e-12, atol=1e-12)


def test_from_dense_keeps_padding_idx():
    dense = _table(50, 6, padding_idx=5)
    for layer in (TTEmbedding.from_dense(dense, [4, 4, 4], [2, 1, 3], ranks=2),
                  LowRankEmbedding.from_dense(dense, rank=2)):
        assert layer.padding_idx == 5
        assert not layer(torch.tensor([5, 5])).any()


@pytest.mark.parametrize("cls", [TTEmbedding, LowRankEmbedding], ids=lambda c: c.__name__)
def test_unsupported_reasons(cls):
    assert cls.unsupported_reason(nn.Embedding(10, 4)) is None
    assert cls.unsupported_reason(nn.Embedding(10, 4, padding_idx=2)) is None  # zero row at init
    nonzero_pad = nn.Embedding(10, 4, padding_idx=2)
    with torch.no_grad():
        nonzero_pad.weight[2] = 1.0
    bad = {
        "nn.Linear": nn.Linear(4, 4),
        "EmbeddingBag": nn.EmbeddingBag(10, 4),
        "max_norm": nn.Embedding(10, 4, max_norm=1.0),
        "scale_grad_by_freq": nn.Embedding(10, 4, scale_grad_by_freq=True),
        "sparse": nn.Embedding(10, 4, sparse=True),
        "complex": nn.Embedding(10, 4, dtype=torch.complex64),
        "padding row": nonzero_pad,
    }
    for needle, module in bad.items():
        reason = cls.unsupported_reason(module)
        assert isinstance(reason, str) and "\n" not in reason, needle
        assert needle.split(".")[-1].split()[0].lower() in reason.lower(), (needle, reason)
    with pytest.raises(RankError, match="max_norm"):
        if cls is TTEmbedding:
            TTEmbedding.from_dense(bad["max_norm"], [2, 5], [2, 2])
        else:
            LowRankEmbedding.from_dense(bad["max_norm"], 2)
    with pytest.raises(TypeError, match="expects an nn.Embedding"):
        if cls is TTEmbedding:
            TTEmbedding.from_dense(nn.Linear(4, 4), [2, 2], [2, 2])  # type: ignore[arg-type]
        else:
            LowRankEmbedding.from_dense(nn.Linear(4, 4), 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("layer", [TTEmbedding(50, 6, [4, 4, 4], [2, 1, 3], ranks=2), LowRankEmbedding(50, 6, 2)],
                         ids=["tt", "lowrank"])
def test_out_of_range_and_non_integer_ids_raise(layer):
    for ids in (torch.tensor([0, 50]), torch.tensor([[-1, 3]]), torch.tensor(63)):  # 50..63: padded TT rows
        with pytest.raises(IndexError):
            layer(ids)
    with pytest.raises(TypeError):
        layer(torch.tensor([0.0, 1.0]))
    assert layer(torch.tensor([0, 49], dtype=torch.int32)).shape == (2, 6)


@pytest.mark.parametrize("layer", [TTEmbedding(50, 6, [4, 4, 4], [2, 1, 3], ranks=3, dtype=torch.float64),
                                   LowRankEmbedding(50, 6, 3, dtype=torch.float64)], ids=["tt", "lowrank"])
def test_id_shapes_and_dtypes_match_the_dense_embedding(layer):
    dense = layer.to_dense()
    gen = torch.Generator().manual_seed(3)
    for ids in (torch.randint(0, 50, (2, 3), generator=gen), torch.randint(0, 50, (7,), generator=gen),
                torch.tensor(17), torch.randint(0, 50, (2, 0, 4), generator=gen)):
        for dt in (torch.int64, torch.int32):
            out = layer(ids.to(dt))
            assert out.shape == (*ids.shape, 6) and out.dtype == torch.float64
            torch.testing.assert_close(out, dense(ids), rtol=1e-12, atol=1e-12)


def test_tt_rows_follow_the_row_major_id_split():
    layer = TTEmbedding(24, 6, [2, 3, 4], [1, 2, 3], ranks=2, dtype=torch.float64)
    i1, i2, i3 = 1, 2, 3
    row = layer(torch.tensor(i1 * 12 + i2 * 4 + i3))
    g1, g2, g3 = (c.detach() for c in layer.cores)
    expected = torch.einsum("xaip,pbjq,qckz->abcijkxz", g1[:, i1:i1 + 1], g2[:, i2:i2 + 1], g3[:, i3:i3 + 1])
    torch.testing.assert_close(row, expected.reshape(-1), rtol=1e-12, atol=1e-12)


def test_tt_forward_never_forms_the_table():
    v, d = 4096, 64
    layer = TTEmbedding(v, d, [16, 16, 16], [4, 4, 4], ranks=8)
    ids = torch.randint(0, v, (8,))
    for grad in (False, True):
        with torch.set_grad_enabled(grad), LargestTensorMode() as mode:
            out = layer(ids)
        assert out.shape == (8, d)
        # at most a (permuted) view of the middle core or the 8 tokens' gathered middle-core slices
        assert mode.largest <= max(max(c.numel() for c in layer.cores), 8 * 8 * 4 * 8)
        assert mode.largest * 64 <= v * d


def test_invalid_structure_is_refused():
    with pytest.raises(RankError, match="cover"):
        TTEmbedding(65, 8, [4, 4, 4], [2, 2, 2])
    with pytest.raises(RankError, match="cover"):
        TTEmbedding(64, 9, [4, 4, 4], [2, 2, 2])
    with pytest.raises(RankError, match="same length"):
        TTEmbedding(50, 8, [4, 4, 4], [2, 4])
    with pytest.raises(RankError):
        TTEmbedding(50, 8, [4, 4, 4], [2, 2, 2], ranks=[2])
    with pytest.raises(RankError):
        LowRankEmbedding(50, 8, 0)
    with pytest.raises(ValueError):
        LowRankEmbedding(50, 8, 2, padding_idx=50)


# ------------------------------------------------------------------ cost, structure, gradients

def test_macs_equal_flop_counter_for_one_token_and_scale_with_tokens():
    layers = [
        TTEmbedding(50, 8, [4, 4, 4], [2, 2, 2], ranks=4),
        TTEmbedding(50, 6, [8, 8], [2, 4], ranks=5),
        TTEmbedding(300, 16, [4, 8, 10], [4, 2, 2], ranks=[3, 5]),  # right to left is cheaper
        TTEmbedding(300, 16, [4, 8, 10], [2, 2, 4], ranks=[3, 5]),  # left to right is cheaper
        TTEmbedding(1000, 64, [10, 10, 10], [4, 4, 4], ranks=8, padding_idx=0),
        TTEmbedding(4096, 60, [8, 8, 8, 8], [2, 2, 4, 4], ranks=[2, 6, 3]),
        TTEmbedding(7, 5, [7], [5], ranks=1),
        LowRankEmbedding(100, 16, 4),
        LowRankEmbedding(100, 16, 40, padding_idx=3),
    ]
    assert {lay._left_to_right for lay in layers if isinstance(lay, TTEmbedding)} == {True, False}
    for layer in layers:
        one = _flops(layer, torch.tensor([1]))
        assert one == 2 * layer.macs_per_sample(), layer
        assert _flops(layer, torch.arange(6).reshape(2, 3)) == 6 * one
    assert layers[6].macs_per_sample() == 0
    assert layers[7].macs_per_sample() == 4 * 16


@pytest.mark.parametrize("layer", [TTEmbedding(60, 10, [3, 4, 5], [2, 1, 5], ranks=[3, 4], padding_idx=2),
                                   TTEmbedding(300, 16, [4, 8, 10], [4, 2, 2], ranks=[3, 5]),
                                   LowRankEmbedding(60, 10, 4, padding_idx=2)], ids=["tt-l2r", "tt-r2l", "lowrank"])
def test_config_and_state_dict_round_trip(layer):
    config = json.loads(json.dumps(layer.config()))
    assert config == layer.config()
    again = type(layer)(**config)
    again.load_state_dict(layer.state_dict(), strict=True)
    ids = torch.randint(0, layer.num_embeddings, (4, 5))
    with torch.no_grad():
        assert torch.equal(again(ids), layer(ids))
        torch.testing.assert_close(layer(ids), layer.to_dense()(ids), rtol=1e-5, atol=1e-5)
    rebuilt = build_layer(type(layer).method, config)
    assert type(rebuilt) is type(layer) and LAYER_CLASSES[type(layer).method] is type(layer)
    assert str(layer.num_embeddings) in repr(layer)
    layer.eval().merge()  # nothing worth precomputing: merge is a no-op, the output unchanged
    with torch.no_grad():
        assert torch.equal(again(ids), layer(ids))


@pytest.mark.parametrize("layer", [TTEmbedding(11, 5, [3, 4], [2, 3], ranks=2, padding_idx=1, dtype=torch.float64),
                                   TTEmbedding(20, 6, [2, 2, 5], [3, 2, 1], ranks=[2, 3], dtype=torch.float64),
                                   LowRankEmbedding(11, 5, 3, padding_idx=1, dtype=torch.float64)],
                         ids=["tt2", "tt3-r2l", "lowrank"])
def test_gradcheck_and_every_factor_gets_a_gradient(layer):
    ids = torch.tensor([[0, 1, 2], [10, 5, 1]])
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, ps)), (ids,))

    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-7)
    (layer(ids) * torch.randn(2, 3, layer.embedding_dim, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_tt_traces_and_matches():
    layer = TTEmbedding(50, 6, [4, 4, 4], [2, 1, 3], ranks=3, padding_idx=0).eval()
    ids = torch.tensor([[0, 4, 49]])
    with torch.no_grad():
        traced = torch.jit.trace(layer, (ids,), check_trace=False)
        other = torch.tensor([[7, 0, 12]])
        torch.testing.assert_close(traced(other), layer(other))
