"""Loading inputs and the compressed checkpoint format: round trips, safety, clear errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import SmallNet

import tncompress
from tncompress.checkpoint import atomic_save, load_model
from tncompress.compress import decompose
from tncompress.errors import CheckpointError, ModelSpecError
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import parse_recipe

R18 = ModelSpec("torchvision:resnet18", {"num_classes": 10})


def test_compressed_resnet18_reloads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(R18)
    recipe = parse_recipe({"version": 1, "exclude": ["conv1"], "defaults": {
        "Conv2d": {"method": "tucker2", "rank": 0.5, "n_iter": 2}, "Linear": {"method": "lowrank", "rank": 4}}})
    result = decompose(model, recipe, input_shape=[1, 3, 32, 32])
    path = tmp_path / "r18-tucker.pt"
    tncompress.save(result, path, spec=R18)

    raw = torch.load(path, weights_only=True)  # our own files never need weights_only=False
    assert raw["format"] == "tncompress-checkpoint" and raw["format_version"] == 1
    assert raw["base"]["arch"] == "torchvision:resnet18" and raw["base"]["input_shape"] == [1, 3, 32, 32]
    assert {e["name"] for e in raw["layers"]} == {p.name for p in result.plan if p.action == "decompose"}
    assert all("weight_rel_error" in p for p in raw["plan"])

    loaded = tncompress.load(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in result.model.parameters())
    # the input model was not modified by decompose()
    assert isinstance(model.layer1[0].conv1, torch.nn.Conv2d)


def test_state_dict_inputs_and_dataparallel_prefix(tmp_path):
    model = build_model(R18)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "dp.pt"
    torch.save(model.state_dict(), plain)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, wrapped)
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, tmp_path / "nested.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for name in ("plain.pt", "dp.pt", "nested.pt"):
            loaded = load_model(tmp_path / name, R18)
            assert loaded.kind == "state_dict"
            assert torch.equal(loaded.model(x), ref)


def test_state_dict_needs_arch_and_the_right_one(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(build_model(R18).state_dict(), path)
    with pytest.raises(CheckpointError, match="is a state dict: say which architecture"):
        load_model(path, None)
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(10, 512\) but the architecture expects \(1000, 512\)"):
        load_model(path, ModelSpec("torchvision:resnet18"))
    with pytest.raises(CheckpointError, match=r"does not fit the architecture: \d+ missing \(e.g. layer1.2.conv1.weight"):
        load_model(path, ModelSpec("torchvision:resnet34", {"num_classes": 10}))


class Exploit:
    """Unpickling this object would create a file (stands in for arbitrary code execution)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickled_objects_refused_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Exploit(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="--trust-pickle") as refused:
        load_model(evil, R18)
    assert "arbitrary code" in str(refused.value)  # the flag and the risk, in one line
    assert not marker.exists()
    # control: the crafted file really does run code when trusted, so the check above is not vacuous
    with pytest.raises(CheckpointError):
        load_model(evil, R18, trust_pickle=True)
    assert marker.exists()


def test_safetensors_weights_with_an_architecture(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = build_model(ModelSpec("lenet5"))
    path = tmp_path / "l5.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    loaded = load_model(path, ModelSpec("lenet5"))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))


def test_whole_module_pickle_loads_only_with_trust(tmp_path, model_def):
    from tncompress.models import import_file

    module_name = import_file(model_def)
    import sys

    net = sys.modules[module_name].make(8)
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle"
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(loaded.model(x), net.eval()(x))


def test_unreadable_inputs_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pt", R18)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(junk, R18)
    good = tmp_path / "good.pt"
    torch.save(build_model(ModelSpec("mlp-1024")).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(truncated, ModelSpec("mlp-1024"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="neither a state dict nor a model"):
        load_model(tmp_path / "list.pt", R18)


def test_atomic_save_leaves_previous_file_on_failure(tmp_path):
    path = tmp_path / "out.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("fails mid-write")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]  # no temporary left behind


def test_user_factory_and_import(tmp_path, model_def):
    spec = ModelSpec("user_models:make", {"width": 8}, [str(model_def)])
    model = build_model(spec)
    assert model.conv.out_channels == 8
    with pytest.raises(ModelSpecError, match="has no attribute 'nothing'"):
        build_model(ModelSpec("user_models:nothing", {}, [str(model_def)]))
    with pytest.raises(ModelSpecError, match="torchvision has no model 'resnet19'"):
        build_model(ModelSpec("torchvision:resnet19"))
    with pytest.raises(ModelSpecError, match="unknown architecture"):
        build_model(ModelSpec("resnet18"))


def test_recompressing_a_compressed_checkpoint_keeps_earlier_layers(tmp_path, cli, write_recipe):
    net = SmallNet()
    src = tmp_path / "small.pt"
    torch.save(net.state_dict(), src)
    mod = tmp_path / "small_def.py"
    mod.write_text("from conftest import SmallNet\n\ndef make():\n    return SmallNet()\n")
    r1 = write_recipe("version: 1\nlayers:\n  - {name: head.1, method: tt, rank: 4}\n", "r1.yaml")
    r2 = write_recipe("version: 1\nlayers:\n  - {name: features.2, method: tucker2, rank: [8, 8]}\n", "r2.yaml")
    common = ["--arch", "small_def:make", "--import", str(mod), "--input-shape", "1,3,16,16"]
    assert cli("decompose", src, "-r", r1, "-o", tmp_path / "a.pt", *common).exit_code == 0
    res = cli("decompose", tmp_path / "a.pt", "-r", r2, "-o", tmp_path / "b.pt", "--import", str(mod))
    assert res.exit_code == 0, res.output
    raw = torch.load(tmp_path / "b.pt", weights_only=True)
    assert [e["name"] for e in raw["layers"]] == ["features.2", "head.1"]  # read from the model, in its order
    model = tncompress.load(tmp_path / "b.pt", imports=[str(mod)])
    assert type(model.head[1]).__name__ == "TTLinear" and type(model.features[2]).__name__ == "Tucker2Conv2d"
    assert os.path.getsize(tmp_path / "b.pt") < os.path.getsize(src)


def test_cifar_stem_resnet_rebuilds_from_its_spec(tmp_path):
    spec = ModelSpec("torchvision:resnet18", {"num_classes": 10, "cifar_stem": True})
    model = build_model(spec)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert spec.default_input_shape() == [1, 3, 32, 32]
    path = tmp_path / "r18c.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, spec)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))
    with pytest.raises(ModelSpecError, match="cifar_stem=true applies to ResNet-style models"):
        build_model(ModelSpec("torchvision:vgg11", {"cifar_stem": True}))


def test_library_save_of_a_reloaded_model_decomposed_again_keeps_every_layer(tmp_path):
    """tncompress.save() used to record only the layers of the last run, so the file did not reload."""
    from tncompress.recipe import parse_recipe

    torch.manual_seed(0)
    spec = ModelSpec("mlp-1024")
    model = build_model(spec).eval()
    first = tncompress.decompose(model, parse_recipe({"version": 1, "layers": [{"name": "fc1", "method": "lowrank",
                                                                               "rank": 8}]}),
                                 input_shape=[1, 1, 32, 32])
    tncompress.save(first, tmp_path / "a.pt", spec=spec)
    again = tncompress.load(tmp_path / "a.pt")
    second = tncompress.decompose(again, parse_recipe({"version": 1, "layers": [{"name": "fc2", "method": "tt",
                                                                                "rank": 4}]}),
                                  input_shape=[1, 1, 32, 32])
    tncompress.save(second, tmp_path / "b.pt", spec=spec)
    raw = torch.load(tmp_path / "b.pt", weights_only=True)
    assert {e["name"]: e["method"] for e in raw["layers"]} == {"fc1": "lowrank", "fc2": "tt"}
    reloaded = tncompress.load(tmp_path / "b.pt")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), second.model(x))
