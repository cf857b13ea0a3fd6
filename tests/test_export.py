"""`tncompress export`: TorchScript and ONNX files that run without tncompress and reproduce the
PyTorch model's outputs."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import tncompress
from tncompress.export import ExportError, export_model
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import parse_recipe

# every factorized layer kind in one small model
RECIPE = {"version": 1, "layers": [
    {"name": "classifier.1", "method": "tt", "rank": 4},
    {"name": "classifier.3", "method": "lowrank", "rank": 8},
    {"name": "features.3", "method": "cp", "rank": 8, "n_iter_max": 30},
    {"name": "features.0", "method": "tucker2", "rank": [1, 4]}]}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    result = tncompress.decompose(build_model(ModelSpec("lenet5")), parse_recipe(RECIPE), input_shape=[1, 1, 32, 32])
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert {"TTLinear", "LowRankLinear", "CPConv2d", "Tucker2Conv2d"} <= kinds
    path = folder / "l5c.pt"
    tncompress.save(result, path, spec=ModelSpec("lenet5"))
    return path


# Runs in a fresh interpreter where importing tncompress fails: the file must not need it.
_PLAIN_TORCH = textwrap.dedent("""
    import sys
    class NoTncompress:
        def find_spec(self, name, path=None, target=None):
            if name == "tncompress" or name.startswith("tncompress."):
                raise ImportError("tncompress is not installed here")
    sys.meta_path.insert(0, NoTncompress())
    import warnings
    warnings.simplefilter("ignore")
    import torch
    model = torch.jit.load(sys.argv[1])
    x = torch.load(sys.argv[2])
    torch.save(model(x), sys.argv[3])
    assert not any(m.startswith("tncompress") for m in sys.modules)
""")


def test_torchscript_runs_without_tncompress(compressed, cli, tmp_path):
    out = tmp_path / "l5c.ts"
    res = cli("export", compressed, "--format", "torchscript", "-o", out)
    assert res.exit_code == 0, res.output
    assert "outputs match the PyTorch model" in res.stdout
    x = torch.randn(5, 1, 32, 32)  # a batch size the export never saw
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-I", "-c", _PLAIN_TORCH, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    with torch.no_grad():
        expected = tncompress.load(compressed)(x)
    got = torch.load(tmp_path / "y.pt").detach()
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5


def test_default_output_name_and_state_dict_input(tmp_path, cli):
    src = tmp_path / "l5.pt"
    torch.save(build_model(ModelSpec("lenet5")).state_dict(), src)
    res = cli("export", src, "--arch", "lenet5", "--format", "torchscript")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "l5.torchscript.pt").is_file()


def test_onnx_matches_pytorch_in_onnxruntime(compressed, cli, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "l5c.onnx"
    res = cli("export", compressed, "--format", "onnx", "-o", out)
    assert res.exit_code == 0, res.output
    assert "onnxruntime" in res.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = tncompress.load(compressed)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 32, 32)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == expected.shape
        assert float(abs(got - expected).max()) <= 1e-4


def test_an_export_that_does_not_reproduce_the_model_is_not_written(tmp_path, monkeypatch):
    """The check is real: an exporter that writes a wrong model fails and leaves no file."""
    import tncompress.export as E

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 3))

    monkeypatch.setattr(E, "_torchscript", lambda m, example, tmp, real=E._torchscript: real(wrong, example, tmp))
    out = tmp_path / "m.ts"
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        export_model(model, torch.randn(1, 4), out, "torchscript")
    assert list(tmp_path.iterdir()) == []
