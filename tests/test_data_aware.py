"""Data-aware factors: input whitening, output refit and BatchNorm re-estimation (tncompress.data_aware),
through the recipe setting ``data_aware`` and ``calibration.reestimate_bn``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tncompress
from tncompress import data_aware
from tncompress.apply import rel_error
from tncompress.errors import RecipeError
from tncompress.layers import LowRankLinear, TTLinear, Tucker2Conv2d
from tncompress.recipe import parse_recipe


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Samples with a strongly anisotropic, correlated second moment (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -3, d).unsqueeze(0)
    return torch.randn(n, d, generator=g) @ mix.T + 0.5


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def _recipe(method: str, rank, data_aware_: bool, **extra) -> object:
    rule = {"method": method, "rank": rank, **({"data_aware": True} if data_aware_ else {})}
    return parse_recipe({"version": 1, "defaults": {"Linear": rule} if method == "lowrank" else {"Conv2d": rule},
                         **extra})


def test_whitening_round_trip_is_exact_at_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    x = torch.randn(10, 6, 7, 7, dtype=torch.float64) * torch.linspace(0.1, 3, 6).view(1, 6, 1, 1)
    model = nn.Sequential(conv)
    w = data_aware.input_whitening(model, "0", x, conv=True)
    layer = Tucker2Conv2d.from_dense(data_aware.whitened_copy(conv, w), ranks=(6, 8))
    data_aware.unwhiten(layer, w)
    with torch.no_grad():
        assert rel_error(conv(x), layer(x)) < 1e-9


def test_data_aware_lowrank_has_lower_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    model = MLP().eval()
    x = _correlated(512, 24)
    free = tncompress.decompose(model, _recipe("lowrank", 4, False, exclude=["2", "4"]), input_shape=[1, 24],
                                calibration_input=x, allow_error=True)
    aware = tncompress.decompose(model, _recipe("lowrank", 4, True, exclude=["2", "4"]), input_shape=[1, 24],
                                 calibration_input=x, allow_error=True)
    (p_free,) = [p for p in free.plan if p.action == "decompose"]
    (p_aware,) = [p for p in aware.plan if p.action == "decompose"]
    # Whitened SVD is the optimal rank-4 map for these inputs: its output error cannot be larger.
    assert p_aware.output_rel_error < 0.5 * p_free.output_rel_error
    assert any(n.startswith("data_aware: inputs whitened on 512 rows") for n in p_aware.notes)
    assert isinstance(aware.model[0], LowRankLinear)


def test_output_refit_is_the_least_squares_optimum():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(16, 5, 6, 6)
    layer = Tucker2Conv2d.from_dense(conv, ranks=(3, 3))
    with torch.no_grad():
        target = conv(x)
        before = rel_error(target, layer(x))
    data_aware.refit_output(layer, model, model, "0", x, conv=True)
    with torch.no_grad():
        after = rel_error(target, layer(x))
        assert after <= before + 1e-9
        # optimality: nudging the refit weights in any direction does not lower the error
        w, _ = layer.output_projection()
        w.add_(1e-3 * torch.randn_like(w))
        assert rel_error(target, layer(x)) >= after - 1e-9


def test_core_refit_is_exact_at_full_rank_from_random_factors():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    model = nn.Sequential(conv)
    x = torch.randn(12, 4, 9, 9, dtype=torch.float64)
    layer = Tucker2Conv2d(4, 6, 3, ranks=(4, 6), stride=2, padding=1, dtype=torch.float64)  # random factors
    with torch.no_grad():  # a random but well-conditioned input map (the ridge is relative to the mean eigenvalue)
        layer.pointwise_in.weight.copy_(torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0].view(4, 4, 1, 1))
    assert data_aware.refit_core(layer, model, model, "0", x) == 12 * 5 * 5
    data_aware.refit_output(layer, model, model, "0", x, conv=True)
    with torch.no_grad():
        assert rel_error(conv(x), layer(x)) < 1e-5  # exact but for the 1e-6 relative ridge


def test_core_refit_is_the_joint_optimum_of_core_and_output_map():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 8, 3, padding=1).double()
    model = nn.Sequential(conv)
    x = torch.randn(16, 5, 6, 6, dtype=torch.float64)
    layer = Tucker2Conv2d.from_dense(conv, ranks=(3, 3))
    with torch.no_grad():
        target = conv(x)
    data_aware.refit_output(layer, model, model, "0", x, conv=True)
    with torch.no_grad():
        output_only = rel_error(target, layer(x))
    data_aware.refit_core(layer, model, model, "0", x)
    data_aware.refit_output(layer, model, model, "0", x, conv=True)
    with torch.no_grad():
        joint = rel_error(target, layer(x))
        assert joint < output_only - 1e-3
        # a reduced-rank regression is a global optimum: no nudge of the core and the last map helps
        for _ in range(5):
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            layer.core.weight.add_(1e-3 * torch.randn_like(layer.core.weight))
            layer.pointwise_out.weight.add_(1e-3 * torch.randn_like(layer.pointwise_out.weight))
            assert rel_error(target, layer(x)) >= joint - 1e-9
            layer.load_state_dict(state)


def test_core_refit_declines_a_core_that_pads_other_than_with_zeros():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    layer = Tucker2Conv2d.from_dense(conv, ranks=(2, 2))
    assert data_aware.refit_core(layer, nn.Sequential(conv), nn.Sequential(conv), "0", torch.randn(2, 3, 5, 5)) is None


def test_batchnorm_is_reestimated_on_the_calibration_images():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(100, 3, 8, 8) * 2 + 1
    result = tncompress.decompose(model, _recipe("tucker2", [2, 4], False), input_shape=[1, 3, 8, 8],
                                  calibration_input=x, calibration_source="test images", allow_error=True)
    assert result.calibration["bn_reestimated"] == 2 and result.calibration["kind"] == "test images"
    m = result.model
    with torch.no_grad():
        h = m.conv1(x)
    assert torch.allclose(m.bn1.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(m.bn1.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-4)
    assert not m.training and not m.bn1.training and m.bn1.momentum == 0.1
    off = _recipe("tucker2", [2, 4], False, calibration={"reestimate_bn": False})
    kept = tncompress.decompose(model, off, input_shape=[1, 3, 8, 8], calibration_input=x, allow_error=True)
    assert kept.calibration["bn_reestimated"] == 0 and torch.equal(kept.model.bn1.running_mean, model.bn1.running_mean)
    noise = tncompress.decompose(model, _recipe("tucker2", [2, 4], False), input_shape=[1, 3, 8, 8], allow_error=True)
    assert noise.calibration["bn_reestimated"] == 0  # never on Gaussian noise unless asked


def test_data_aware_convs_beat_data_free_on_the_calibration_batch():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(64, 3, 8, 8) * torch.tensor([3.0, 0.3, 0.03]).view(1, 3, 1, 1)
    for method, rank in (("tucker2", [2, 3]), ("cp", 4)):
        free = tncompress.decompose(model, _recipe(method, rank, False, calibration={"reestimate_bn": False}),
                                    input_shape=[1, 3, 8, 8], calibration_input=x, allow_error=True)
        aware = tncompress.decompose(model, _recipe(method, rank, True, calibration={"reestimate_bn": False}),
                                     input_shape=[1, 3, 8, 8], calibration_input=x, allow_error=True)
        assert aware.model_output_error < free.model_output_error, method


def _kronecker_correlated(n: int, modes: list[int], seed: int = 0) -> torch.Tensor:
    """Inputs whose second moment is exactly Kronecker-structured: x = (A_1 ⊗ A_2) z, anisotropic A_k."""
    g = torch.Generator().manual_seed(seed)
    mixes = [torch.randn(m, m, generator=g) * torch.logspace(0, -2, m).unsqueeze(0) for m in modes]
    return torch.randn(n, *modes, generator=g).reshape(n, -1) @ torch.kron(*mixes).T


def test_kronecker_whitening_round_trip_is_exact_at_full_tt_rank():
    torch.manual_seed(0)
    linear = nn.Linear(24, 32).double()
    x = _kronecker_correlated(64, [4, 6]).double()
    model = nn.Sequential(linear)
    factors = data_aware.kronecker_whitening(model, "0", x, [4, 6])
    assert [f.factor.shape for f in factors] == [(4, 4), (6, 6)] and factors[0].samples == 64
    whitened = data_aware.kronecker_whitened_copy(linear, factors, [4, 6])
    kron = torch.kron(factors[0].factor, factors[1].factor)
    assert torch.allclose(whitened.weight, linear.weight @ kron, atol=1e-12)
    layer = TTLinear.from_dense(whitened, ranks=None, in_modes=[4, 6], out_modes=[4, 8])
    data_aware.kronecker_unwhiten(layer, factors)
    with torch.no_grad():
        assert rel_error(linear(x), layer(x)) < 1e-9
        norms = [float(c.norm()) for c in layer.cores]
        assert max(norms) / min(norms) < 1 + 1e-9  # the scale is spread evenly again


def test_data_aware_tt_has_lower_output_error_on_kronecker_correlated_inputs():
    torch.manual_seed(0)
    model = MLP().eval()
    x = _kronecker_correlated(512, [4, 6])
    rule = {"name": "0", "method": "tt", "in_modes": [4, 6], "out_modes": [4, 8], "rank": 3, "allow_growth": True}
    plans = {}
    for aware in (False, True):
        recipe = parse_recipe({"version": 1, "layers": [{**rule, **({"data_aware": True} if aware else {})}],
                               "exclude": ["2", "4"]})
        result = tncompress.decompose(model, recipe, input_shape=[1, 24], calibration_input=x, allow_error=True)
        (plans[aware],) = [p for p in result.plan if p.action == "decompose"]
    assert plans[True].output_rel_error < 0.7 * plans[False].output_rel_error
    assert any("whitened per mode [4, 6]" in n for n in plans[True].notes)


def test_data_aware_on_a_layer_without_linear_ends_says_so():
    model = MLP().eval()
    recipe = parse_recipe({"version": 1, "layers": [{"name": "0", "method": "prodsum", "terms": 40,
                                                      "data_aware": True}],
                           "exclude": ["2", "4"]})
    result = tncompress.decompose(model, recipe, input_shape=[1, 24], calibration_input=_correlated(32, 24),
                                  allow_error=True)
    (entry,) = [p for p in result.plan if p.action == "decompose"]
    assert any("decomposed from the weights alone" in n for n in entry.notes)


@pytest.mark.parametrize("recipe, key", [
    ({"version": 1, "defaults": {"Linear": {"method": "lowrank", "data_aware": "yes"}}}, "defaults.Linear.data_aware"),
    ({"version": 1, "calibration": {"reestimate_bn": 1}}, "calibration.reestimate_bn"),
])
def test_bad_data_aware_settings_are_one_line_errors(recipe, key):
    with pytest.raises(RecipeError, match="expected true or false") as info:
        parse_recipe(recipe, "r.yaml")
    assert key in str(info.value) and "\n" not in str(info.value)
