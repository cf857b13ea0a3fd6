"""Tucker-2 decomposition of conv kernels and the Tucker2Conv2d layer."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import CONV_GEOMETRIES
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tncompress.decompositions.tucker2 import tucker2, tucker2_to_kernel
from tncompress.errors import RankError, TncompressError
from tncompress.layers.tucker_conv import Tucker2Conv2d

F64 = torch.float64

GEOMETRIES = [*CONV_GEOMETRIES, pytest.param((1, 1), dict(stride=(1, 2)), id="1x1")]


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_conv(cin: int, cout: int, kernel_size, bias: bool = True, **geometry) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, kernel_size, bias=bias, dtype=F64, **geometry)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel_size, geometry", GEOMETRIES)
def test_full_rank_reproduces_dense_conv(bias, kernel_size, geometry):
    conv = random_conv(5, 7, kernel_size, bias, **geometry)
    layer = Tucker2Conv2d.from_dense(conv, (5, 7))  # (r_in, r_out) = (cin, cout)
    x = torch.randn(2, 5, 9, 11, dtype=F64)
    assert rel(layer(x), conv(x)) < 1e-5
    assert layer.rel_error < 1e-10 and layer.fit_info is None
    leaves = [m for m in layer.modules() if not list(m.children())]
    assert all(type(m) is nn.Conv2d for m in leaves)


def test_ranks_are_in_data_flow_order():
    conv = random_conv(6, 10, 3, padding=1)
    layer = Tucker2Conv2d.from_dense(conv, (2, 5))  # r_in=2, r_out=5
    assert layer.ranks == (2, 5)
    assert layer.pointwise_in.out_channels == 2
    assert tuple(layer.core.weight.shape) == (5, 2, 3, 3)
    assert layer.pointwise_out.in_channels == 5
    assert "r_in=2" in repr(layer) and "r_out=5" in repr(layer)


def test_low_multilinear_rank_kernel_is_recovered():
    g = torch.Generator().manual_seed(1)
    core = torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    u = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=F64))[0]
    kernel = tucker2_to_kernel(core, u, v)
    for method in ("hooi", "hosvd"):
        c, uo, ui = tucker2(kernel, (3, 2), method=method)
        assert c.shape == (3, 2, 3, 3) and uo.shape == (8, 3) and ui.shape == (6, 2)
        assert rel(tucker2_to_kernel(c, uo, ui), kernel) < 1e-10
        assert torch.allclose(uo.T @ uo, torch.eye(3, dtype=F64), atol=1e-10)
        assert torch.allclose(ui.T @ ui, torch.eye(2, dtype=F64), atol=1e-10)


def test_hooi_is_no_worse_than_hosvd():
    kernel = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    errs = {}
    for method in ("hosvd", "hooi"):
        c, uo, ui = tucker2(kernel, (5, 4), method=method)
        errs[method] = rel(tucker2_to_kernel(c, uo, ui), kernel)
    assert errs["hooi"] <= errs["hosvd"] + 1e-12


def test_to_dense_round_trip():
    torch.manual_seed(0)
    layer = Tucker2Conv2d(5, 7, (3, 2), (3, 4), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                          padding_mode="reflect", dtype=F64)
    dense = layer.to_dense()
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "padding_mode"):
        assert getattr(dense, attr) == getattr(layer, attr), attr
    x = torch.randn(2, 5, 10, 9, dtype=F64)
    assert rel(dense(x), layer(x)) < 1e-12
    back = Tucker2Conv2d.from_dense(dense, (3, 4))  # the rebuilt kernel has exactly these ranks
    assert rel(back(x), layer(x)) < 1e-10


@pytest.mark.parametrize("bias", [True, False])
def test_config_rebuilds_structure(bias):
    conv = nn.Conv2d(4, 6, (3, 3), stride=(2, 1), padding="valid", bias=bias)
    layer = Tucker2Conv2d.from_dense(conv, (2, 3))
    assert layer.pointwise_in.weight.dtype == torch.float32
    rebuilt = Tucker2Conv2d(**json.loads(json.dumps(layer.config())))
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.config() == layer.config()


@pytest.mark.parametrize("kernel_size, geometry", GEOMETRIES)
@pytest.mark.parametrize("hw", [(9, 11), (16, 16)])
def test_macs_match_flop_counter(kernel_size, geometry, hw):
    layer = Tucker2Conv2d(5, 7, kernel_size, (3, 4), **geometry)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, 5, *hw))
    assert layer.macs_per_sample(hw) * 2 == counter.get_total_flops()
    # analytic cross-check for the simple padded case
    if geometry.get("padding") == (1, 2) and "dilation" not in geometry:
        oh, ow = (hw[0] + 2 - 3) // 2 + 1, (hw[1] + 4 - 3) + 1
        assert layer.macs_per_sample(hw) == hw[0] * hw[1] * 5 * 3 + oh * ow * 4 * 3 * 9 + oh * ow * 4 * 7


def test_rank_errors():
    kernel = torch.randn(4, 3, 3, 3)
    for bad in ((0, 2), (5, 2), (2, 0), (2, 4), (1.5, 2), (2,)):
        with pytest.raises(RankError):
            tucker2(kernel, bad)  # type: ignore[arg-type]
    for bad in ((0, 2), (4, 2), (2, 5), (2, 0)):
        with pytest.raises(RankError):
            Tucker2Conv2d(3, 4, 3, bad)
        with pytest.raises(RankError):
            Tucker2Conv2d.from_dense(nn.Conv2d(3, 4, 3), bad)


def test_unsupported_reason():
    assert Tucker2Conv2d.unsupported_reason(nn.Conv2d(4, 4, 3)) is None
    reason = Tucker2Conv2d.unsupported_reason(nn.Conv2d(4, 8, 3, groups=4))
    assert reason is not None and "groups=4" in reason and "\n" not in reason
    assert Tucker2Conv2d.unsupported_reason(nn.Conv1d(3, 3, 3)) is not None
    with pytest.raises(TncompressError, match="groups=2"):
        Tucker2Conv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), (2, 2))


def test_gradcheck():
    torch.manual_seed(0)
    layer = Tucker2Conv2d(3, 2, (2, 3), (2, 2), stride=(1, 2), padding=(1, 0), dtype=F64)
    x = torch.randn(1, 3, 4, 5, dtype=F64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


def test_random_init_matches_dense_variance():
    variances = []
    for seed in range(4):
        torch.manual_seed(seed)
        variances.append(Tucker2Conv2d(64, 64, 3, (24, 32)).dense_kernel().double().var().item())
    expected = 1.0 / (3 * 64 * 9)  # variance of nn.Conv2d's default (kaiming_uniform, a=√5) init
    ratio = sum(variances) / len(variances) / expected
    assert 0.8 < ratio < 1.25, ratio


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated upstream
def test_torchscript_matches_eager():
    layer = Tucker2Conv2d(3, 4, 3, (2, 3), stride=(2, 1), padding=1).eval()
    x = torch.randn(2, 3, 7, 6)
    assert torch.allclose(torch.jit.script(layer)(x), layer(x))
