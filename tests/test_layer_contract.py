"""One contract, every registered layer class (tncompress.layers.LAYER_CLASSES): exact at full rank,
to_dense() agrees with forward, config round trip, gradcheck, tracing, and a correct output after
every way a parameter can change — with and without the merge() inference snapshot."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tncompress.layers import (
    LAYER_CLASSES,
    CPConv2d,
    FactorizedLayer,
    LowRankConv2d,
    LowRankEmbedding,
    LowRankLinear,
    ProdSumConv2d,
    ProdSumLinear,
    TTEmbedding,
    TTLinear,
    Tucker2Conv2d,
    merged,
)


def _embedding() -> nn.Embedding:
    torch.manual_seed(3)
    table = nn.Embedding(20, 6, padding_idx=2).double()
    return table


def _linear(m: int = 6, n: int = 12) -> nn.Linear:
    return nn.Linear(n, m).double()


def _conv(cin: int = 3, cout: int = 4, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=1).double()


def _cp_exact() -> tuple[nn.Module, FactorizedLayer]:
    """A kernel of exact CP rank 2 (made by a CP layer), recovered by CP at rank 2."""
    torch.manual_seed(1)
    truth = CPConv2d(3, 4, 3, 2, padding=1, dtype=torch.float64)
    dense = truth.to_dense()
    return dense, CPConv2d.from_dense(dense, rank=2, n_iter_max=500, tol=0.0)


# class -> (dense layer, factorized layer that is exact for it, input)
FULL_RANK: dict[type, Callable[[], tuple[nn.Module, FactorizedLayer]]] = {
    TTLinear: lambda: (d := _linear(), TTLinear.from_dense(d, ranks=None)),
    LowRankLinear: lambda: (d := _linear(), LowRankLinear.from_dense(d, rank=6)),
    CPConv2d: _cp_exact,
    Tucker2Conv2d: lambda: (d := _conv(), Tucker2Conv2d.from_dense(d, ranks=(3, 4))),
    ProdSumLinear: lambda: (d := _linear(3, 4), ProdSumLinear.from_dense(d, terms=12)),
    ProdSumConv2d: lambda: (d := nn.Conv2d(2, 2, 2, padding=1, padding_mode="reflect").double(),
                            ProdSumConv2d.from_dense(d, terms=16)),
    LowRankConv2d: lambda: (d := _conv(), LowRankConv2d.from_dense(d, rank=4)),
    TTEmbedding: lambda: (d := _embedding(), TTEmbedding.from_dense(d, [3, 7], [2, 3], ranks=None)),
    LowRankEmbedding: lambda: (d := _embedding(), LowRankEmbedding.from_dense(d, rank=6)),
}


def _input(layer: nn.Module, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if hasattr(layer, "num_embeddings"):  # token ids, the padding index among them
        ids = torch.randint(0, layer.num_embeddings, (batch, 4), generator=gen)
        ids[0, 0] = 2
        return ids
    if hasattr(layer, "in_channels"):
        return torch.randn(batch, layer.in_channels, 5, 5, generator=gen, dtype=torch.float64)
    return torch.randn(batch, layer.in_features, generator=gen, dtype=torch.float64)


def _reference(layer: FactorizedLayer, x: torch.Tensor) -> torch.Tensor:
    """The output the current parameters define, computed through the dense equivalent."""
    with torch.no_grad():
        return layer.to_dense()(_as_layer_dtype(layer, x))


def _as_layer_dtype(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Float inputs in the layer's dtype; token ids stay integers."""
    return x.to(next(layer.parameters()).dtype) if x.is_floating_point() else x


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


CLASSES = sorted(LAYER_CLASSES.values(), key=lambda c: c.__name__)


def test_every_registered_class_is_covered():
    assert set(LAYER_CLASSES.values()) == set(FULL_RANK)


@pytest.fixture(params=CLASSES, ids=lambda c: c.__name__)
def pair(request: pytest.FixtureRequest) -> tuple[nn.Module, FactorizedLayer]:
    torch.manual_seed(0)
    return FULL_RANK[request.param]()


def test_full_rank_is_the_dense_layer(pair):
    dense, layer = pair
    x = _input(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)


def test_to_dense_agrees_with_forward(pair):
    _, layer = pair
    x = _input(layer)
    with torch.no_grad():
        _close(layer(x), _reference(layer, x))
        layer.eval().merge()
        _close(layer(x), _reference(layer, x))


def test_config_round_trip(pair):
    _, layer = pair
    again = type(layer)(**layer.config()).double()
    again.load_state_dict(layer.state_dict(), strict=True)
    x = _input(layer)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))
    assert again.config() == layer.config()


def test_gradcheck_in_input_and_parameters(pair):
    _, layer = pair
    x = _input(layer, batch=2)
    x = x.requires_grad_(True) if x.is_floating_point() else x
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def f(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_traces_and_matches(pair):
    _, layer = pair
    x = _input(layer)
    with torch.no_grad():
        traced = torch.jit.trace(layer.eval(), (x,), check_trace=False)
        _close(traced(_input(layer, batch=3)), layer(_input(layer, batch=3)))


# --- every way a parameter can change -------------------------------------------------------------

def _optimizer_step(layer: FactorizedLayer, x: torch.Tensor) -> None:
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    layer(x).pow(2).mean().backward()
    opt.step()
    layer.eval()


def _in_place_no_grad(layer: FactorizedLayer, x: torch.Tensor) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)


def _data_op(layer: FactorizedLayer, x: torch.Tensor) -> None:
    for p in layer.parameters():
        p.data.mul_(1.5)  # invisible to PyTorch's version counters


def _data_assign(layer: FactorizedLayer, x: torch.Tensor) -> None:
    for p in layer.parameters():
        p.data = p.data * 1.5 + 0.01


def _load_state_dict(layer: FactorizedLayer, x: torch.Tensor) -> None:
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    layer.load_state_dict(other.state_dict())


def _to_dtype(layer: FactorizedLayer, x: torch.Tensor) -> None:
    layer.float()


UPDATES = {"optimizer step": _optimizer_step, "in place under no_grad": _in_place_no_grad,
           ".data op": _data_op, ".data =": _data_assign, "load_state_dict": _load_state_dict,
           ".to(float32)": _to_dtype}


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("update", list(UPDATES))
def test_output_follows_every_parameter_update(pair, update, merge):
    _, layer = pair
    layer.eval()
    x = _input(layer)
    if merge:
        layer.merge()
    with torch.no_grad():
        layer(x)  # a first inference call: whatever the layer precomputes is now in use
    UPDATES[update](layer, x)
    if merge and update == ".data op":
        layer.merge()  # the one change PyTorch cannot see: the documented remedy is to merge again
    xin = _as_layer_dtype(layer, x)
    with torch.no_grad():
        _close(layer(xin), _reference(layer, xin))
    _close(layer(xin).detach(), _reference(layer, xin))  # and with autograd


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_compiled_layer_follows_parameter_updates(pair, merge):
    _, layer = pair
    layer.eval()
    if merge:
        layer.merge()
    compiled = torch.compile(layer, backend="eager", dynamic=False)
    x = _input(layer)
    with torch.no_grad():
        _close(compiled(x), _reference(layer, x))
        for p in layer.parameters():
            p.mul_(1.5)
        _close(compiled(x), _reference(layer, x))


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_functional_call_uses_the_given_parameters(pair, merge):
    _, layer = pair
    layer.eval()
    if merge:
        layer.merge()
    x = _input(layer)
    new = {n: p.detach() * 1.5 for n, p in layer.named_parameters()}
    with torch.no_grad():
        got = functional_call(layer, new, (x,))
        other = copy.deepcopy(layer)
        other.unmerge()
        other.load_state_dict({**other.state_dict(), **new})
        _close(got, _reference(other, x))


def test_merged_context_restores_and_snapshot_is_explicit():
    torch.manual_seed(0)
    model = nn.Sequential(TTLinear(12, 6, ranks=2), ProdSumLinear(6, 4, terms=8)).double().eval()
    x = torch.randn(2, 12, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
        with merged(model):
            assert all(m.merged for m in model if isinstance(m, (TTLinear, ProdSumLinear)))
            torch.testing.assert_close(model(x), plain)
        assert not any(m.merged for m in model if isinstance(m, (TTLinear, ProdSumLinear)))
    model[0].merge()
    model.train()
    assert not model[0].merged  # training mode drops the snapshot


def test_complex_linear_weights_are_refused():
    from tncompress.errors import RankError

    linear = nn.Linear(8, 6, dtype=torch.complex64)
    for cls, kwargs in ((TTLinear, {}), (LowRankLinear, {"rank": 2}), (ProdSumLinear, {"terms": 4})):
        with pytest.raises(RankError) as info:
            cls.from_dense(linear, **kwargs)
        assert "complex weights are not supported" in str(info.value) and "\n" not in str(info.value)
        assert cls.unsupported_reason(linear) is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_circulant_prodsum_runs_in_half_precision(dtype):
    torch.manual_seed(0)
    layer = ProdSumLinear(16, 16, p=2, terms=[6, 6], family="circulant")
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x)
        half = copy.deepcopy(layer).to(dtype)
        got = half(x.to(dtype))
    assert got.dtype == dtype and got.shape == (3, 16)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", ["circulant", "gaussian"])
def test_prodsum_empty_batch_with_autograd(family):
    layer = ProdSumLinear(16, 12, p=2 if family == "circulant" else 1, terms=6, family=family)
    x = torch.randn(0, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 16)


def test_torchscript_export_of_a_product_of_sums_conv(tmp_path):
    """It used to fail: the conv ran through torch.func.functional_call, which tracing cannot follow."""
    from tncompress.export import export_model

    torch.manual_seed(0)
    model = nn.Sequential(ProdSumConv2d(3, 4, 3, padding=1, terms=12), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    export_model(model, x, tmp_path / "m.ts", "torchscript")
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    with torch.no_grad():
        other = torch.randn(5, 3, 6, 6)
        torch.testing.assert_close(loaded(other), model(other))
