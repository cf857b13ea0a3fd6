"""Product-of-sums layers (tncompress.decompositions.prodsum, ProdSumLinear): fits, structure, round trips."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tncompress
from tncompress.checkpoint import save_compressed
from tncompress.decompositions import prodsum as ps
from tncompress.errors import RankError, TncompressError
from tncompress.layers import LAYER_CLASSES, build_layer
from tncompress.layers.prodsum_linear import ProdSumLinear

FAMILIES = list(ps.FAMILIES)
F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.detach() - b.detach()) / torch.linalg.norm(b.detach()))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("family", ["gaussian", "sparse", "kronecker"])
def test_bases_that_span_the_space_reproduce_w(family):
    # p = 1 with in·out bases in general position: the least-squares fit is W itself. (Sparse
    # bases need enough of them to cover every entry: 4× as many at density 0.2.)
    dense = nn.Linear(5, 4).double()
    terms = 20 * (4 if family == "sparse" else 1)
    layer = ProdSumLinear.from_dense(dense, terms=terms, family=family, density=0.2)
    assert layer.fit_error < 1e-9
    assert (layer.to_dense().weight - dense.weight).abs().max() < 1e-6


def test_circulant_spans_circulant_matrices():
    # n shifts span every (cropped) circulant: a circulant W is reproduced exactly.
    c = torch.randn(7, dtype=F64)
    w = torch.stack([torch.roll(c, i) for i in range(7)])[:5]  # rows: shifted copies, cropped to 5×7
    dense = nn.Linear(7, 5, bias=False).double()
    with torch.no_grad():
        dense.weight.copy_(w)
    layer = ProdSumLinear.from_dense(dense, terms=7, family="circulant")
    assert layer.fit_error < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_least_squares_residual_is_orthogonal_to_every_basis(family):
    w = torch.randn(6, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    bases = ps.make_bases(family, 6, 8, 7, seed=3, factor=0, density=0.3)
    a = ps.least_squares(family, bases, w, 6, 8)
    residual = w - ps.assemble(family, bases, a, 6, 8)
    dense_bases = ps.basis_chunk(family, bases, 0, 7, 6, 8)
    inner = (dense_bases * residual).sum((1, 2))
    assert inner.abs().max() < 1e-10 * w.norm()
    # and no other combination does better
    for _ in range(5):
        other = a + 1e-3 * torch.randn_like(a)
        assert torch.linalg.norm(w - ps.assemble(family, bases, other, 6, 8)) >= torch.linalg.norm(residual)


def test_structured_gram_routes_match_the_generic_one():
    w = torch.randn(6, 10, dtype=F64, generator=torch.Generator().manual_seed(2))
    for family in ("circulant", "kronecker", "gaussian"):
        bases = ps.make_bases(family, 6, 10, 9, seed=0, factor=0)
        fast = ps._gram_rhs_one(family, bases, w, 6, 10)
        slow = ps._gram_rhs_generic(family, bases, w, 6, 10, None, None)
        for x, y in zip(fast, slow):
            torch.testing.assert_close(x, y)


def test_alternating_least_squares_for_a_product():
    # Spanning bases on both factors: ALS is a rank-4 matrix factorisation, and a rank-4 W (a
    # product of two sums) is recovered. More sweeps never do worse.
    torch.manual_seed(0)
    truth = ProdSumLinear(6, 5, p=2, terms=[20, 24], widths=[4], seed=9, dtype=F64)
    layer = ProdSumLinear.from_dense(truth.to_dense(), p=2, terms=[20, 24], widths=[4], sweeps=50)
    assert layer.fit_error < 1e-6
    one_sweep = ProdSumLinear.from_dense(nn.Linear(6, 5).double(), p=2, terms=[6, 6], widths=[3], sweeps=1)
    more = ProdSumLinear.from_dense(nn.Linear(6, 5).double(), p=2, terms=[6, 6], widths=[3], sweeps=10)
    assert more.fit_error <= one_sweep.fit_error + 1e-12


# ---------------------------------------------------------------------------------- bases


@pytest.mark.parametrize("family", FAMILIES)
def test_bases_depend_only_on_family_shape_seed_factor_and_index(family):
    a = ps.make_bases(family, 6, 9, 4, seed=5, factor=1, density=0.3)
    b = ps.make_bases(family, 6, 9, 7, seed=5, factor=1, density=0.3)  # more terms: same first four
    for k in a:
        assert torch.equal(a[k], b[k][:4])
    if family != "circulant":  # shifts need no random numbers
        c = ps.make_bases(family, 6, 9, 4, seed=6, factor=1, density=0.3)
        d = ps.make_bases(family, 6, 9, 4, seed=5, factor=0, density=0.3)
        assert not all(torch.equal(a[k], c[k]) for k in a)
        assert not all(torch.equal(a[k], d[k]) for k in a)


def test_circulant_basis_is_a_cropped_cyclic_shift():
    bases = ps.make_bases("circulant", 3, 5, 3, seed=0, factor=0)
    m = ps.basis_chunk("circulant", bases, 0, 3, 3, 5)
    full = torch.stack([torch.roll(torch.eye(5, dtype=F64), o, dims=1) for o in (0, 1, -1)])
    torch.testing.assert_close(m, full[:, :3, :])


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_holds_only_the_scalars_and_bias(family):
    layer = ProdSumLinear(12, 10, p=2, terms=[5, 6], family=family, widths=[8])
    assert set(layer.state_dict()) == {"coeffs.0", "coeffs.1", "bias"}
    assert sum(p.numel() for p in layer.parameters()) == 5 + 6 + 10
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_rebuilds_the_bases(tmp_path, family):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    layer = ProdSumLinear.from_dense(model[0], p=2 if family != "sparse" else 1, terms=9, family=family, seed=11)
    model[0] = layer
    entry = {"name": "0", "method": "prodsum", "config": layer.config()}
    json.dumps(entry)
    path = tmp_path / "ps.pt"
    save_compressed(path, model, spec=None, layers=[entry])
    base = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    loaded = tncompress.load(path, base_model=base)
    assert isinstance(loaded[0], ProdSumLinear)
    for name, buf in layer.named_buffers():
        assert torch.equal(buf, dict(loaded[0].named_buffers())[name])
    x = torch.randn(3, 20)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_float64_layer_regenerates_exact_bases():
    layer = ProdSumLinear(8, 6, terms=5).double()
    direct = ProdSumLinear(8, 6, terms=5, dtype=F64)
    assert torch.equal(layer.basis0_m, direct.basis0_m)  # not a float32 copy cast up


# ---------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("shape", [(12, 10), (10, 12)])
def test_forward_equals_to_dense(family, p, shape):
    torch.manual_seed(p)
    layer = ProdSumLinear(*shape, p=p, terms=6, family=family, dtype=F64)
    dense = layer.to_dense()
    x = torch.randn(2, 3, shape[0], dtype=F64)
    torch.testing.assert_close(layer(x), dense(x))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x))  # inference route (cached, maybe merged)
        torch.testing.assert_close(layer(x), dense(x))


def test_structured_routes_are_taken_and_exact():
    torch.manual_seed(0)
    kron = ProdSumLinear(256, 192, terms=4, family="kronecker", dtype=F64)
    circ = ProdSumLinear(100, 60, p=2, terms=[9, 5], family="circulant", widths=[80], dtype=F64)
    assert kron._factor_kind(0) == "kron" and circ._factor_kind(1) == "fft"
    for layer in (kron, circ):
        x = torch.randn(5, layer.in_features, dtype=F64)
        torch.testing.assert_close(layer(x), layer.to_dense()(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck(family):
    torch.manual_seed(0)
    layer = ProdSumLinear(6, 4, p=2, terms=[3, 4], family=family, widths=[5], g="tanh", dtype=F64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)

    def f(x, *ps_):
        return torch.func.functional_call(layer, dict(zip(names, ps_)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("family,p,shape", [("gaussian", 1, (64, 48)), ("gaussian", 2, (64, 48)),
                                            ("sparse", 2, (30, 200)), ("kronecker", 1, (256, 192)),
                                            ("kronecker", 2, (64, 48)), ("circulant", 1, (100, 60)),
                                            ("circulant", 2, (64, 48))])
def test_macs_per_sample_matches_flop_counter(family, p, shape):
    layer = ProdSumLinear(*shape, p=p, terms=4, family=family, widths=[8] if p == 2 and family != "circulant" else None)
    x = torch.randn(1, shape[0])
    fft = sum(ps.fft_macs(max(layer.shapes[j])) for j in range(p) if layer._factor_kind(j) == "fft")
    layer.eval().merge()  # inference: the factors are assembled once, by merge()
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            layer(x)
    layer.train()
    if layer._merged(None):
        fft = 0
    assert counter.get_total_flops() // 2 + fft == layer.macs_per_sample()
    if family == "gaussian" and p == 1:  # with autograd the factor is assembled every call
        with FlopCounterMode(display=False) as counter:
            layer(torch.randn(5, shape[0]))
        assert counter.get_total_flops() // 2 == 5 * layer.macs_per_sample() + layer.assemble_macs(5)


@pytest.mark.parametrize("family,p", [("gaussian", 1), ("gaussian", 2), ("circulant", 2), ("kronecker", 2)])
def test_random_init_matches_nn_linear_variance(family, p):
    torch.manual_seed(0)
    layer = ProdSumLinear(48, 40, p=p, terms=24, family=family, bias=False)
    weights = []
    for _ in range(200):
        layer.reset_parameters()
        weights.append(layer.to_dense().weight.detach())
    ratio = torch.stack(weights).pow(2).mean().item() * 3 * 48
    assert abs(ratio - 1) < 0.15, ratio


# ---------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs,needle", [
    ({"p": 0}, "p (the number of factors)"), ({"terms": 0}, "terms must be positive"),
    ({"terms": [3, 3]}, "terms has 2 entries but p = 1"), ({"family": "fourier"}, "unknown product-of-sums family"),
    ({"g": "relu"}, "unknown g"), ({"p": 2, "widths": [0]}, "widths must be"), ({"density": 0.0}, "density"),
    ({"family": "circulant", "terms": 31}, "distinct shifts"), ({"seed": 1.5}, "seed must be"),
    ({"terms": 200_000, "family": "gaussian"}, "would hold"),
])
def test_bad_settings_are_one_line_errors(kwargs, needle):
    with pytest.raises(RankError) as exc:
        ProdSumLinear(30, 20, **kwargs)
    assert isinstance(exc.value, TncompressError)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_from_dense_needs_identity_g():
    with pytest.raises(RankError, match="g = identity"):
        ProdSumLinear.from_dense(nn.Linear(4, 3), terms=4, g="tanh")


def test_config_rebuilds_through_the_registry_and_repr():
    layer = ProdSumLinear(20, 10, p=2, terms=[3, 4], family=["circulant", "kronecker"], widths=[12], seed=4)
    assert LAYER_CLASSES["prodsum"] is ProdSumLinear
    again = build_layer("prodsum", json.loads(json.dumps(layer.config())))
    again.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 20)
    assert torch.equal(again(x), layer(x))
    text = repr(layer)
    assert "terms=[3, 4]" in text and "params=7" in text and "circulant" in text


# ---------------------------------------------------------------------------------- recipe / CLI


def test_recipe_prodsum_through_the_cli(cli, tmp_path, model_def, write_recipe):
    import sys

    from tncompress.models import import_file

    name = import_file(model_def)
    torch.manual_seed(0)
    torch.save(sys.modules[name].make(16).state_dict(), tmp_path / "sd.pt")
    recipe = write_recipe("version: 1\nlayers:\n"
                          "  - {name: fc, method: prodsum, p: 2, terms: [40, 50], family: kronecker, widths: [32]}\n"
                          "  - {name: out, method: prodsum, terms: 640, family: gaussian}\n")
    out = tmp_path / "ps.pt"
    arch = ("--arch", f"{name}:make", "--arch-arg", "width=16", "--import", model_def)
    res = cli("plan", tmp_path / "sd.pt", *arch, "-r", recipe, "--input-shape", "1,3,8,8")
    assert res.exit_code == 0, res.output
    assert "prodsum p=2" in res.output
    res = cli("decompose", tmp_path / "sd.pt", *arch, "-r", recipe, "-o", out, "--input-shape", "1,3,8,8")
    assert res.exit_code == 0, res.output
    model = tncompress.load(out, imports=[str(model_def)])
    assert isinstance(model.fc, ProdSumLinear) and model.fc.terms == [40, 50]
    assert isinstance(model.out, ProdSumLinear)
    assert sum(p.numel() for p in model.out.parameters()) == 640 + 10
    dense = sys.modules[name].make(16)
    dense.load_state_dict(torch.load(tmp_path / "sd.pt"))
    torch.testing.assert_close(model.out.to_dense().weight, dense.out.weight, atol=1e-5, rtol=1e-4)  # 640 = 64·10: spans
    bad = write_recipe("version: 1\nlayers:\n  - {name: fc, method: prodsum, p: 0}\n", "bad.yaml")
    res = cli("decompose", tmp_path / "sd.pt", *arch, "-r", bad, "-o", tmp_path / "bad.pt", "--input-shape", "1,3,8,8")
    assert res.exit_code == 2 and "layers[0]: p must be a positive integer, got 0" in res.output  # at recipe entry


def test_recipe_prodsum_on_a_conv_builds_prodsum_conv(cli, tmp_path, model_def, write_recipe):
    """method prodsum on a Conv2d factorizes its unfolded kernel; the checkpoint rebuilds it."""
    import sys

    from tncompress.layers import ProdSumConv2d
    from tncompress.models import import_file

    name = import_file(model_def)
    torch.manual_seed(0)
    torch.save(sys.modules[name].make(16).state_dict(), tmp_path / "sd.pt")
    recipe = write_recipe("version: 1\nlayers:\n  - {name: conv, method: prodsum, terms: 432, family: gaussian}\n")
    arch = ("--arch", f"{name}:make", "--arch-arg", "width=16", "--import", model_def)
    plan = cli("plan", tmp_path / "sd.pt", *arch, "-r", recipe, "--input-shape", "1,3,8,8", "--json")
    assert plan.exit_code == 0, plan.output
    entry = next(e for e in json.loads(plan.stdout)["layers"] if e["name"] == "conv")
    assert entry["method"] == "prodsum_conv" and entry["params_after"] == 432 + 16
    out = tmp_path / "ps.pt"
    res = cli("decompose", tmp_path / "sd.pt", *arch, "-r", recipe, "-o", out, "--input-shape", "1,3,8,8")
    assert res.exit_code == 0, res.output
    model = tncompress.load(out, imports=[str(model_def)])
    assert isinstance(model.conv, ProdSumConv2d)
    dense = sys.modules[name].make(16)
    dense.load_state_dict(torch.load(tmp_path / "sd.pt"))
    # 432 = 16·3·3·3 Gaussian bases span the unfolded kernel: the fit is exact
    torch.testing.assert_close(model.conv.to_dense().weight, dense.conv.weight, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------- conv


def test_conv_on_the_unfolded_kernel():
    from tncompress.layers import ProdSumConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect").double()
    layer = ProdSumConv2d.from_dense(conv, terms=4 * 3 * 6, family="gaussian")  # spans: exact
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    assert layer.fit_error < 1e-9
    torch.testing.assert_close(layer(x), conv(x))
    assert set(layer.state_dict()) == {"coeffs.0", "bias"}
    again = build_layer("prodsum_conv", json.loads(json.dumps(layer.config()))).double()
    again.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(again(x), layer(x))
    small = ProdSumConv2d(3, 8, 3, padding="same", p=2, terms=[5, 7], family="kronecker", dtype=F64)
    torch.testing.assert_close(small(x), small.to_dense()(x))
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            small(x[:1])
    assert counter.get_total_flops() // 2 == small.macs_per_sample((9, 9)) + small.assemble_macs()
    with pytest.raises(RankError, match="groups=2"):
        ProdSumConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
