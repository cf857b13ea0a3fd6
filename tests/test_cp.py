"""CP decomposition of conv kernels and the CPConv2d layer."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CONV_GEOMETRIES
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tncompress.decompositions import cp as cp_mod
from tncompress.decompositions.cp import (
    balance_factors,
    cp_conv_kernel,
    cp_norm_ratio,
    cp_to_kernel,
    cp_to_tensor,
    degeneracy_threshold,
)
from tncompress.errors import RankError, TncompressError
from tncompress.layers.cp_conv import CPConv2d

F64 = torch.float64

GEOMETRIES = CONV_GEOMETRIES


pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_kernel(shape: tuple[int, int, int, int], rank: int, seed: int = 0) -> torch.Tensor:
    """A kernel with exact 4-way CP rank ``rank`` (hence 3-way rank ≤ rank as well)."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=F64) for n in shape]
    return cp_to_kernel(factors, shape)


def dense_conv(kernel: torch.Tensor, bias: bool, **geometry) -> nn.Conv2d:
    cout, cin, kh, kw = kernel.shape
    conv = nn.Conv2d(cin, cout, (kh, kw), bias=bias, dtype=F64, **geometry)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    return conv


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


EXACT = dict(l2_reg=1e-12, n_iter_max=1000, tol=1e-14)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("form", ["3conv", "4conv"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel_size, geometry", GEOMETRIES)
def test_exact_rank_reproduces_dense_conv(form, bias, kernel_size, geometry):
    rank = 4
    kernel = low_rank_kernel((7, 5, *kernel_size), rank)
    conv = dense_conv(kernel, bias, **geometry)
    layer = CPConv2d.from_dense(conv, rank, form=form, **EXACT)
    x = torch.randn(2, 5, 9, 11, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert rel(layer(x), conv(x)) < 1e-5
    assert layer.fit_info["rel_error"] < 1e-5 and not layer.fit_info["degenerate"]
    leaves = [m for m in layer.modules() if not list(m.children())]
    assert leaves and all(type(m) is nn.Conv2d for m in leaves)  # plain convs only
    assert (layer.pointwise_out.bias is not None) == bias


@pytest.mark.parametrize("form", ["3conv", "4conv"])
def test_from_dense_casts_back_and_records_fit(form):
    conv = nn.Conv2d(6, 8, 3, padding=1)  # float32, default init: not low rank
    layer = CPConv2d.from_dense(conv, 5, form=form, n_iter_max=30)
    assert layer.pointwise_in.weight.dtype == torch.float32
    assert set(layer.fit_info) == {"rel_error", "degenerate", "attempts", "norm_ratio", "notes"}
    assert 0.0 < layer.fit_info["rel_error"] < 1.0 and layer.fit_info["attempts"] >= 1
    assert rel(layer.dense_kernel().double(), conv.weight.double()) == pytest.approx(
        layer.fit_info["rel_error"], rel=1e-3)
    json.dumps(layer.fit_info)  # plain data


@pytest.mark.parametrize("form", ["3conv", "4conv"])
def test_to_dense_round_trip(form):
    torch.manual_seed(0)
    layer = CPConv2d(5, 7, (3, 2), 6, stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                     padding_mode="reflect", form=form, dtype=F64)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "padding_mode"):
        assert getattr(dense, attr) == getattr(layer, attr), attr
    x = torch.randn(2, 5, 10, 9, dtype=F64)
    assert rel(dense(x), layer(x)) < 1e-12
    back = CPConv2d.from_dense(dense, 6, form=form, **EXACT)
    assert rel(back(x), layer(x)) < 1e-5


@pytest.mark.parametrize("form", ["3conv", "4conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_config_rebuilds_structure(form, bias):
    conv = nn.Conv2d(4, 6, (3, 3), stride=(2, 1), padding="valid", bias=bias)
    layer = CPConv2d.from_dense(conv, 3, form=form, n_iter_max=20)
    cfg = json.loads(json.dumps(layer.config()))
    rebuilt = CPConv2d(**cfg)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.config() == layer.config()
    assert "rank=3" in repr(layer) and form in repr(layer)


@pytest.mark.parametrize("form", ["3conv", "4conv"])
@pytest.mark.parametrize("kernel_size, geometry", GEOMETRIES)
@pytest.mark.parametrize("hw", [(9, 11), (16, 16)])
def test_macs_match_flop_counter(form, kernel_size, geometry, hw):
    layer = CPConv2d(5, 7, kernel_size, 3, form=form, **geometry)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, 5, *hw))
    assert layer.macs_per_sample(hw) * 2 == counter.get_total_flops()


def test_rank_errors():
    kernel = low_rank_kernel((4, 3, 3, 3), 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RankError):
            cp_conv_kernel(kernel, bad)
        with pytest.raises(RankError):
            CPConv2d(3, 4, 3, bad)
    with pytest.raises(RankError):
        cp_conv_kernel(kernel[0], 2)  # not a 4-d kernel
    with pytest.raises(RankError, match="NaN"):
        cp_conv_kernel(torch.full((2, 2, 3, 3), float("nan")), 1)


def test_unsupported_reason():
    assert CPConv2d.unsupported_reason(nn.Conv2d(4, 4, 3)) is None
    reason = CPConv2d.unsupported_reason(nn.Conv2d(4, 4, 3, groups=2))
    assert reason is not None and "groups=2" in reason and "\n" not in reason
    assert CPConv2d.unsupported_reason(nn.Linear(3, 3)) is not None
    with pytest.raises(TncompressError, match="groups=4"):
        CPConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4), 2)


@pytest.mark.parametrize("form", ["3conv", "4conv"])
def test_gradcheck(form):
    torch.manual_seed(0)
    layer = CPConv2d(2, 3, (3, 2), 2, stride=(2, 1), padding=(1, 0), form=form, dtype=F64)
    x = torch.randn(1, 2, 5, 4, dtype=F64, requires_grad=True)
    params = tuple(layer.parameters())

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(dict(layer.named_parameters()), ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("form", ["3conv", "4conv"])
def test_random_init_matches_dense_variance(form):
    variances = []
    for seed in range(4):
        torch.manual_seed(seed)
        layer = CPConv2d(64, 64, 3, 48, form=form)
        variances.append(layer.dense_kernel().double().var().item())
    expected = 1.0 / (3 * 64 * 9)  # kaiming_uniform(a=√5) variance of nn.Conv2d
    ratio = sum(variances) / len(variances) / expected
    assert 0.8 < ratio < 1.25, ratio
    # and the dense conv's own default init agrees with that formula
    dense_var = torch.stack([nn.Conv2d(64, 64, 3).weight.detach().var() for _ in range(4)]).mean()
    assert dense_var.item() / expected == pytest.approx(1.0, abs=0.05)


def test_factors_are_balanced_and_reconstruct():
    kernel = low_rank_kernel((6, 5, 3, 3), 3, seed=3)
    res = cp_conv_kernel(kernel, 3, form="4conv", **EXACT)
    norms = torch.stack([f.norm(dim=0) for f in res.factors])  # (modes, R)
    assert torch.allclose(norms, norms[0:1].expand_as(norms), rtol=1e-10)
    assert rel(cp_to_kernel(res.factors, kernel.shape), kernel) < 1e-5
    assert [tuple(f.shape) for f in res.factors] == [(6, 3), (5, 3), (3, 3), (3, 3)]
    res3 = cp_conv_kernel(kernel, 3, form="3conv", **EXACT)
    assert [tuple(f.shape) for f in res3.factors] == [(6, 3), (5, 3), (9, 3)]


def test_norm_ratio_flags_huge_cancelling_components():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, 1, generator=g, dtype=F64) for _ in range(2))
    # Orthogonal-ish well-separated components: ratio ≈ √R, far below the threshold.
    q = [torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=F64))[0] for _ in range(3)]
    assert cp_norm_ratio(q) == pytest.approx(math.sqrt(3), rel=1e-9)
    # (1/ε)[(a+εb)∘(a+εb)∘(a+εb) − a∘a∘a] ≈ a∘a∘b + a∘b∘a + b∘a∘a: two huge cancelling terms.
    eps = 1e-4
    s = eps ** (-1.0 / 3.0)
    factors = [torch.cat([(a + eps * b) * s, a * s * (-1 if i == 0 else 1)], dim=1) for i in range(3)]
    ratio = cp_norm_ratio(factors)
    assert ratio > degeneracy_threshold(2) * 10
    assert cp_norm_ratio(balance_factors(factors)) == pytest.approx(ratio, rel=1e-9)


def test_border_rank_case_triggers_retries(monkeypatch):
    """a∘a∘b + a∘b∘a + b∘a∘a has rank 3 but border rank 2: rank-2 ALS drifts into growing,
    cancelling components. With a strict threshold the first (weakly regularised) attempt is
    flagged, and stronger ridges on the retries bring the component norms down."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    t = (torch.einsum("i,j,k->ijk", a, a, b) + torch.einsum("i,j,k->ijk", a, b, a)
         + torch.einsum("i,j,k->ijk", b, a, a))
    kernel = t.reshape(4, 4, 2, 2)
    free = cp_conv_kernel(kernel, 2, retries=0, l2_reg=0.0, n_iter_max=400, tol=0.0)
    short = cp_conv_kernel(kernel, 2, retries=0, l2_reg=0.0, n_iter_max=50, tol=0.0)
    # The swamp signature: error falls while the component norms keep growing.
    assert free.rel_error < short.rel_error and free.norm_ratio > short.norm_ratio > math.sqrt(2)

    monkeypatch.setattr(cp_mod, "DEGENERACY_FACTOR", 1.5)  # threshold 1.5·√2 ≈ 2.1
    res = cp_conv_kernel(kernel, 2, retries=2, l2_reg=0.0, n_iter_max=400, tol=0.0)
    assert "degenerate" in res.notes[0]
    assert res.attempts >= 2 and len([n for n in res.notes if n.startswith("attempt")]) == res.attempts
    if not res.degenerate:
        assert res.norm_ratio <= degeneracy_threshold(2)
    else:
        assert "Tucker-2" in res.notes[-1]
    with_no_retry = cp_conv_kernel(kernel, 2, retries=0, l2_reg=0.0, n_iter_max=400, tol=0.0)
    assert with_no_retry.degenerate and with_no_retry.attempts == 1


def test_zero_kernel_is_not_an_error():
    res = cp_conv_kernel(torch.zeros(3, 2, 3, 3), 2)
    assert res.rel_error == 0.0 and not res.degenerate
    assert all(torch.count_nonzero(f) == 0 for f in res.factors)


def test_tensorly_engine_agrees_on_exact_kernel():
    kernel = low_rank_kernel((6, 5, 3, 3), 3, seed=5)
    ours = cp_conv_kernel(kernel, 3, form="3conv", **EXACT)
    ref = cp_conv_kernel(kernel, 3, form="3conv", engine="tensorly", l2_reg=1e-12, n_iter_max=300,
                         tol=1e-14)
    assert ours.rel_error < 1e-6 and ref.rel_error < 1e-4
    assert rel(cp_to_tensor(ours.factors), cp_to_tensor(ref.factors)) < 1e-4


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated upstream
def test_torchscript_and_dense_agree():
    layer = CPConv2d(3, 4, 3, 2, padding=1, form="4conv").eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(scripted(x), layer(x))


@pytest.mark.parametrize("layer_cls", ["cp", "tucker2"])
def test_strided_1x1_conv_runs_its_first_conv_on_the_strided_grid(layer_cls):
    """A 1×1 stride-2 downsample: the first 1×1 conv subsamples, so every conv of the chain runs at
    the output resolution and the chain costs (cin·R + mid + R'·cout) MACs per output pixel."""
    from tncompress.layers import Tucker2Conv2d

    torch.manual_seed(0)
    dense = nn.Conv2d(64, 128, 1, stride=2, bias=False)
    if layer_cls == "cp":
        layer = CPConv2d.from_dense(dense, rank=12)
        per_pixel = 64 * 12 + 12 + 12 * 128
    else:
        layer = Tucker2Conv2d.from_dense(dense, ranks=(11, 24))
        per_pixel = 64 * 11 + 11 * 24 + 24 * 128
    x = torch.randn(2, 64, 16, 16)
    assert layer.macs_per_sample((16, 16)) == per_pixel * 8 * 8
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-5)
        assert layer.pointwise_in(x).shape[-2:] == (8, 8)
