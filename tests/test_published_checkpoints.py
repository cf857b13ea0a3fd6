"""Checkpoints as their authors publish them: old BatchNorm state dicts, whole models pickled from a
script, and compressed checkpoints whose --import file moved."""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tncompress
from tncompress.checkpoint import load_model
from tncompress.errors import CheckpointError
from tncompress.models import ModelSpec, build_model, file_sha256
from tncompress.recipe import parse_recipe

RESNET_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "resnet-cifar"
RESNET_PY = RESNET_DIR / "resnet.py"
LOWRANK = {"version": 1, "defaults": {"Linear": {"method": "lowrank", "rank": 2}}}
# module names the tests import files as; removed after each test so no test sees another's
STEMS = ("resnet", "author_resnet", "bnnet", "netdefs", "unrelated", "mymodels")


@pytest.fixture(autouse=True)
def _forget_imported_files():
    yield
    for name in STEMS:
        sys.modules.pop(name, None)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- published CIFAR ResNets -------------------------------------------------------------------

def _author_model(factory: str) -> nn.Module:
    """The model built by the author's own code, weights loaded by PyTorch itself (no tncompress)."""
    spec = importlib.util.spec_from_file_location("author_resnet", RESNET_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["author_resnet"] = module
    spec.loader.exec_module(module)
    return getattr(module, factory)()


@pytest.mark.parametrize(("name", "file", "params"), [
    ("resnet20", "resnet20-12fca82f.th", 269_722),
    ("resnet32", "resnet32-d509ac18.th", 464_154),
])
def test_published_cifar_resnet_loads_exactly_as_published(name, file, params, caplog):
    if not RESNET_DIR.is_dir():
        pytest.skip(f"{RESNET_DIR} is not here")
    path = RESNET_DIR / file
    caplog.set_level(logging.INFO, logger="tncompress.checkpoint")
    loaded = load_model(path, ModelSpec(f"resnet:{name}", imports=[str(RESNET_PY)]))
    assert loaded.kind == "state_dict"
    assert sum(p.numel() for p in loaded.model.parameters()) == params

    published = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    stripped = {k.removeprefix("module."): v for k, v in published.items()}
    assert not any(k.endswith("num_batches_tracked") for k in stripped)  # the old format this test is about
    reference = _author_model(name)
    result = reference.load_state_dict(stripped, strict=False)
    # PyTorch treats a state dict without version metadata as pre-0.4.1 and fills the counters itself
    assert not result.unexpected_keys and not result.missing_keys
    counters = [f"{name}.num_batches_tracked" for name, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert f"{len(counters)} BatchNorm num_batches_tracked buffer(s) missing" in caplog.text

    state, ref_state = loaded.model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    for key, tensor in stripped.items():
        assert torch.equal(state[key], tensor), key
    assert all(int(state[k]) == 0 == int(ref_state[k]) for k in counters)  # the fresh value, as PyTorch keeps it
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference.eval()(x))


# --- num_batches_tracked on a small net --------------------------------------------------------

BN_DEF = """
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2),
                         nn.BatchNorm1d(2))
"""


def test_state_dict_without_batch_counters_loads_and_other_missing_keys_fail(tmp_path):
    defs = tmp_path / "bnnet.py"
    defs.write_text(BN_DEF)
    spec = ModelSpec("bnnet:make", imports=[str(defs)])
    torch.manual_seed(0)
    net = build_model(spec).train()
    net(torch.randn(4, 3, 8, 8))  # running statistics and counters move away from their fresh values
    full = net.state_dict()
    assert int(full["1.num_batches_tracked"]) == 1

    old = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": {"module." + k: v for k, v in old.items()}}, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt", spec).model.state_dict()
    for key, tensor in old.items():
        assert torch.equal(loaded[key], tensor), key
    assert int(loaded["1.num_batches_tracked"]) == 0 and int(loaded["5.num_batches_tracked"]) == 0

    torch.save(full, tmp_path / "full.pt")  # counters present: loaded as saved, not reset
    assert int(load_model(tmp_path / "full.pt", spec).model.state_dict()["1.num_batches_tracked"]) == 1

    broken = {k: v for k, v in old.items() if k != "1.running_var"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as refused:
        load_model(tmp_path / "broken.pt", spec)
    message = _one_line(refused)
    assert "state dict does not fit the architecture: 1 missing (e.g. 1.running_var)" in message
    assert "num_batches_tracked" not in message  # only the key that matters is named


# --- whole models pickled from a script ---------------------------------------------------------

NET_CLASS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(torch.tanh(self.fc(x)))
"""

SAVE_SCRIPT = NET_CLASS + """

if __name__ == "__main__":
    import sys

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(5, 4)
    torch.save(net, sys.argv[1])
    torch.save(net, sys.argv[2], _use_new_zipfile_serialization=False)
    torch.save({"x": x, "y": net(x).detach()}, sys.argv[3])
"""


def test_model_pickled_from_a_script_loads_with_the_file_that_defines_its_class(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SAVE_SCRIPT)
    zipped, legacy, io = tmp_path / "net.pt", tmp_path / "net-legacy.pt", tmp_path / "io.pt"
    subprocess.run([sys.executable, str(script), str(zipped), str(legacy), str(io)], check=True, timeout=120)
    expected = torch.load(io, weights_only=True)
    defs, unrelated = tmp_path / "netdefs.py", tmp_path / "unrelated.py"
    defs.write_text(NET_CLASS)
    unrelated.write_text("VALUE = 1\n")

    for path in (zipped, legacy):
        loaded = load_model(path, trust_pickle=True, imports=[str(unrelated), str(defs)])
        assert loaded.kind == "pickle"
        assert type(loaded.model).__module__ == "netdefs" and type(loaded.model).__name__ == "Net"
        with torch.no_grad():
            assert torch.equal(loaded.model(expected["x"]), expected["y"])

        with pytest.raises(CheckpointError) as refused:
            load_model(path, trust_pickle=True, imports=[str(unrelated)])
        message = _one_line(refused)
        assert "class Net" in message and "__main__" in message and "--import FILE that defines Net" in message


# --- compressed checkpoints made with --import --------------------------------------------------

TINY_DEF = """
from torch import nn


def tiny():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
"""


def _compress_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, nn.Module]:
    """A compressed ``mymodels:tiny`` made with a relative --import path; returns (checkpoint, defs file, model)."""
    (tmp_path / "src").mkdir()
    defs = tmp_path / "src" / "mymodels.py"
    defs.write_text(TINY_DEF)
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec("mymodels:tiny", imports=["src/mymodels.py"])
    assert spec.imports == [str(defs.resolve())] and spec.import_sha256 == [file_sha256(defs)]
    torch.manual_seed(0)
    result = tncompress.decompose(build_model(spec), parse_recipe(LOWRANK), input_shape=[1, 8])
    (tmp_path / "out").mkdir()
    ckpt = tmp_path / "out" / "tiny.pt"
    tncompress.save(result, ckpt, spec=spec)
    return ckpt, defs, result.model


def _reload(ckpt: Path, **kwargs) -> nn.Module:
    sys.modules.pop("mymodels", None)  # a fresh process: nothing imported yet
    return tncompress.load(ckpt, **kwargs)


def test_compressed_checkpoint_finds_its_import_file_from_anywhere(tmp_path, monkeypatch, caplog):
    ckpt, defs, model = _compress_tiny(tmp_path, monkeypatch)
    base = torch.load(ckpt, weights_only=True)["base"]
    assert base["imports"] == [str(defs.resolve())] and base["import_sha256"] == [file_sha256(defs)]
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def reloads_from(where: Path) -> None:
        reloaded = _reload(ckpt)
        assert Path(sys.modules["mymodels"].__file__) == where.resolve()
        with torch.no_grad():
            assert torch.equal(reloaded(x), expected)

    reloads_from(defs)                                   # the recorded absolute path, another working directory
    beside = shutil.move(defs, ckpt.parent / "mymodels.py")
    reloads_from(Path(beside))                           # moved beside the checkpoint
    here = shutil.move(beside, elsewhere / "mymodels.py")
    reloads_from(Path(here))                             # in the current directory

    caplog.set_level(logging.WARNING, logger="tncompress.checkpoint")
    Path(here).write_text(TINY_DEF + "\n# edited since\n")
    reloads_from(Path(here))
    assert "differs from the file the checkpoint was made with" in caplog.text

    Path(here).unlink()
    with pytest.raises(CheckpointError) as refused:
        _reload(ckpt)
    assert _one_line(refused) == (f"{ckpt}: it was made with --import {defs.resolve()}, which is not there; "
                                  "pass --import PATH to the file that defines mymodels:tiny")


def test_imports_given_by_the_caller_win_over_the_recorded_ones(tmp_path, monkeypatch):
    ckpt, defs, model = _compress_tiny(tmp_path, monkeypatch)
    (tmp_path / "mine").mkdir()
    mine = tmp_path / "mine" / "mymodels.py"
    mine.write_text(TINY_DEF + "\nMARK = 'mine'\n")
    reloaded = _reload(ckpt, imports=[str(mine)])
    assert getattr(sys.modules["mymodels"], "MARK", None) == "mine"  # the recorded file still exists, yet not used
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    loaded = load_model(ckpt, imports=[str(mine)])
    assert loaded.spec is not None and loaded.spec.imports == [str(mine)]


def test_checkpoint_of_an_older_version_with_relative_imports_reloads(tmp_path, monkeypatch):
    ckpt, defs, model = _compress_tiny(tmp_path, monkeypatch)
    raw = torch.load(ckpt, weights_only=True)
    raw["base"]["imports"] = ["mymodels.py"]  # what older versions recorded: the path as given, no hashes
    del raw["base"]["import_sha256"]
    torch.save(raw, ckpt)
    spec = ModelSpec.from_dict(raw["base"])
    assert spec.imports == ["mymodels.py"] and spec.import_sha256 == [None]
    shutil.move(defs, ckpt.parent / "mymodels.py")
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(_reload(ckpt)(x), model(x))
