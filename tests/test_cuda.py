"""CUDA paths (skipped without a GPU): layers on the device match the CPU, autocast works, and a
model decomposed on the GPU saves and reloads."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tncompress.layers import CPConv2d, LowRankLinear, TTLinear, Tucker2Conv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layers():
    torch.manual_seed(0)
    return [
        (TTLinear(1024, 512, ranks=8), torch.randn(16, 1024)),
        (LowRankLinear(256, 128, rank=16), torch.randn(16, 256)),
        (CPConv2d(32, 64, 3, rank=40, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), torch.randn(4, 32, 20, 20)),
        (CPConv2d(32, 64, 3, rank=40, padding=1, form="4conv"), torch.randn(4, 32, 20, 20)),
        (Tucker2Conv2d(32, 64, 3, ranks=(16, 24), stride=2, padding=1), torch.randn(4, 32, 20, 20)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_cuda_forward_matches_cpu_and_autocast_runs(index):
    layer, x = _layers()[index]
    with torch.no_grad():
        ref = layer(x)
        gpu = layer.cuda()
        out = gpu(x.cuda()).cpu()
        assert (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item() < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(x.cuda()).float().cpu()
        assert (torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref)).item() < 5e-2
    loss = gpu(x.cuda()).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


def test_from_dense_on_cuda_keeps_device(tmp_path):
    import tncompress
    from tncompress.compress import decompose
    from tncompress.models import ModelSpec, build_model
    from tncompress.recipe import parse_recipe

    spec = ModelSpec("torchvision:resnet18", {"num_classes": 10})
    model = build_model(spec).cuda()
    recipe = parse_recipe({"version": 1, "exclude": ["conv1"], "defaults": {
        "Conv2d": {"method": "cp", "rank": 0.3, "n_iter_max": 10}, "Linear": {"method": "tt", "rank": 4}}})
    result = decompose(model, recipe, input_shape=[1, 3, 32, 32])
    assert all(p.is_cuda for p in result.model.parameters())
    path = tmp_path / "r18-cp.pt"
    tncompress.save(result, path, spec=spec)
    loaded = tncompress.load(path).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.layer1[0].conv1, (CPConv2d, Tucker2Conv2d)) and not isinstance(loaded.fc, nn.Linear)
