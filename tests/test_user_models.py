"""Issue 20's failures on ordinary user code, one test each: a ``.view`` after a conv under a budget,
the dense layer's memory layout from every factorized conv, the input shape when none is given, the
output rule, never a larger or slower layer, notes on tiny layers, ``--budget`` with and without a
recipe, whole pickles that record their architecture, and sibling imports."""
from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error
from torch import nn

import tncompress
from tncompress.compress import decompose, make_plan
from tncompress.errors import RecipeError
from tncompress.input_shape import InputShapeError, resolve_input_shape
from tncompress.models import ModelSpec
from tncompress.outputs import OutputError, output_tensor, primary_output
from tncompress.recipe import build_recipe, parse_budget_option, parse_recipe


class ViewNet(nn.Module):
    """The tutorial MNIST CNN: ``x.view(-1, 320)`` right after the convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.view(-1, 320))))


def _recipe(defaults: dict, **extra) -> object:
    return parse_recipe({"version": 1, "defaults": defaults, **extra}, source="test.yaml")


@pytest.mark.parametrize("conv_method", ["tucker2", "cp"])
@pytest.mark.parametrize("budget", [{"macs_ratio": 0.5}, {"params_ratio": 0.5}])
def test_budget_runs_a_model_that_views_after_its_convs(conv_method, budget):
    """The budget probe runs the model with substituted weights; a strided weight used to hand
    ``.view`` a channels-last activation ("view size is not compatible with input tensor's size")."""
    torch.manual_seed(0)
    model = ViewNet().eval()
    rec = _recipe({"Conv2d": {"method": conv_method}, "Linear": {"method": "lowrank"}},
                  budget={**budget, "candidates": 4, "cp_iterations": 3})
    result = decompose(model, rec, input_shape=[1, 1, 28, 28])
    assert result.budget is not None and abs(result.budget["achieved_ratio"] / 0.5 - 1) <= 0.02
    with torch.no_grad():
        assert result.model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_factorized_convs_keep_the_dense_layout():
    """Contiguous in → contiguous out, channels-last in → channels-last out, as nn.Conv2d does,
    also when a factor's weight is stored strided (as a refit or a user's edit can leave it)."""
    from tncompress.layers import CPConv2d, LowRankConv2d, ProdSumConv2d, Tucker2Conv2d

    torch.manual_seed(0)
    dense = nn.Conv2d(8, 12, 3, padding=1)
    layers = [CPConv2d.from_dense(dense, rank=4, n_iter_max=5), Tucker2Conv2d.from_dense(dense, ranks=(4, 6)),
              LowRankConv2d.from_dense(nn.Conv2d(8, 12, 1), rank=3), ProdSumConv2d.from_dense(dense, terms=16)]
    for layer in layers:
        for p in layer.parameters():
            if p.dim() == 4:  # strided storage, same values: oneDNN then may answer channels-last
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        x = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            assert layer(x).is_contiguous(), type(layer).__name__
            y = layer(x.contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous(), type(layer).__name__


# --- the input shape ---------------------------------------------------------------------------------

def test_input_shape_from_each_source():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert resolve_input_shape(mlp, None).shape == [1, 784]
    assert resolve_input_shape(ViewNet(), None, dataset="mnist").shape == [1, 1, 28, 28]
    recorded = ModelSpec("x:y", {}, [], [1, 1, 28, 28])
    assert resolve_input_shape(ViewNet(), recorded).source == "recorded with the model"
    assert resolve_input_shape(nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)), ModelSpec("mlp-1024"),
                               dataset="mnist").shape == [1, 1, 32, 32]  # the reference net wins over the data
    lm = nn.Sequential(OrderedDict(wte=nn.Embedding(50, 8), head=nn.Linear(8, 50)))
    assert resolve_input_shape(lm, None).shape == [1, 32]


def test_input_shape_a_conv_cannot_decide_is_one_line():
    with pytest.raises(InputShapeError, match=r"conv1 is a conv with 1 input channel.*--input-shape 1,1,H,W"):
        resolve_input_shape(ViewNet(), None)
    with pytest.raises(InputShapeError, match=r"does not run on input shape 1,1,32,32.*--input-shape"):
        resolve_input_shape(ViewNet(), None, [1, 1, 32, 32])  # 32×32 does not give the 320 features of .view


def test_cli_report_on_a_one_channel_model_without_input_shape(cli, tmp_path):
    """Was "internal error: RuntimeError: Given groups=1, weight of size [10, 1, 5, 5], expected input[1, 3, 224, 224]"."""
    model_def = tmp_path / "viewnet.py"
    model_def.write_text("import torch.nn.functional as F\nfrom torch import nn\n"
                         "class Net(nn.Module):\n"
                         "    def __init__(self):\n"
                         "        super().__init__()\n"
                         "        self.conv1 = nn.Conv2d(1, 10, 5)\n        self.fc = nn.Linear(10 * 24 * 24, 10)\n"
                         "    def forward(self, x):\n        return self.fc(F.relu(self.conv1(x)).view(x.shape[0], -1))\n"
                         "def make():\n    return Net()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import viewnet  # noqa: F401 - the file the CLI imports
        torch.save(viewnet.make().state_dict(), tmp_path / "net.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("viewnet", None)
    arch = ["--arch", "viewnet:make", "--import", str(model_def)]
    assert_user_error(cli("report", tmp_path / "net.pt", *arch), "--input-shape 1,1,H,W")
    ok = cli("report", tmp_path / "net.pt", *arch, "--dataset", "synthetic", "--limit-test", "8")
    assert ok.exit_code == 0, ok.output


def test_import_of_a_file_that_imports_its_sibling(cli, tmp_path):
    (tmp_path / "blocks_sib.py").write_text("from torch import nn\ndef block():\n    return nn.Linear(6, 4)\n")
    (tmp_path / "net_sib.py").write_text("import blocks_sib\nfrom torch import nn\ndef make():\n"
                                         "    return nn.Sequential(blocks_sib.block(), nn.ReLU(), nn.Linear(4, 2))\n")
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), tmp_path / "m.pt")
    try:
        res = cli("plan", tmp_path / "m.pt", "--arch", "net_sib:make", "--import", tmp_path / "net_sib.py",
                  "--budget", "params:0.9")
    finally:
        for name in ("net_sib", "blocks_sib"):
            sys.modules.pop(name, None)
    assert "No module named" not in res.output
    assert res.exit_code in (0, 2), res.output  # a 2-layer net may not reach the budget; the import worked


# --- the output rule ---------------------------------------------------------------------------------

def test_output_rule():
    logits, loss, feats = torch.randn(2, 5), torch.tensor(1.0), torch.randn(2, 3)
    assert primary_output((logits, None)) is logits                       # nanoGPT's (logits, loss)
    assert primary_output(((logits, feats), loss)) is logits              # depth first
    assert primary_output({"features": feats, "logits": logits}) is logits
    assert primary_output({"last_hidden_state": feats, "pooler": logits}) is feats

    class Output:  # an output object with attributes
        def __init__(self) -> None:
            self.logits = logits

    assert primary_output(Output()) is logits
    with pytest.raises(OutputError, match="holds no tensor"):
        output_tensor({"a": 1, "b": None})


class TupleLM(nn.Module):
    """forward(idx, targets=None) → (logits, loss), the nanoGPT convention."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 40)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.head(torch.relu(self.fc(self.wte(idx))))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def test_a_tuple_output_language_model_goes_through_a_budget():
    torch.manual_seed(0)
    model = TupleLM().eval()
    rec = _recipe({"Linear": {"method": "lowrank"}}, budget={"params_ratio": 0.6, "candidates": 4})
    result = decompose(model, rec, input_shape=[1, 12])
    assert result.model_output_error is not None
    assert result.budget is not None and result.budget["selection_measure"] == "top-1 disagreement"


# --- never larger or slower, and tiny layers -------------------------------------------------------

def test_a_larger_factorization_stays_dense_unless_allowed():
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    big = make_plan(model, _recipe({"Linear": {"method": "lowrank", "rank": 4}}), [1, 20])
    head = big[1]  # 16 → 4 at rank 4: (16 + 4)·4 = 80 > 64 params
    assert head.action == "keep" and "allow_growth" in head.reason and "params against" in head.reason
    allowed = make_plan(model, _recipe({"Linear": {"method": "lowrank", "rank": 4, "allow_growth": True}}), [1, 20])
    assert allowed[1].action == "decompose"


def test_a_params_budget_never_gives_a_layer_more_macs():
    """A TT on a 10-way head did 3.2× its MACs under a params budget; now every rank that would
    make a layer slower is dropped before the allocation is final."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    plan = make_plan(model, _recipe({"Linear": {"method": "tt"}}, budget={"params_ratio": 0.02, "candidates": 5}),
                     [1, 1024])
    assert all(p.macs_after <= p.macs_before for p in plan), [(p.name, p.macs_before, p.macs_after) for p in plan]
    assert abs(plan.budget["achieved_ratio"] / 0.02 - 1) <= 0.02
    with pytest.raises(RecipeError, match="would raise the layer's MACs above dense.*allow_growth"):
        make_plan(model, _recipe({"Linear": {"method": "tt"}}, budget={"params_ratio": 0.3, "candidates": 5}), [1, 1024])


def test_uniform_fraction_on_a_stem_and_a_head_is_noted():
    plan = make_plan(ViewNet(), _recipe({"Conv2d": {"method": "tucker2", "rank": 0.5},
                                         "Linear": {"method": "lowrank", "rank": 0.5}}), [1, 1, 28, 28])
    notes = {p.name: " ".join(p.notes) for p in plan}
    assert "a stem" in notes["conv1"] and "10 outputs" in notes["fc2"] and "--budget" in notes["fc2"]
    assert "uniform fraction" not in notes["conv2"]


# --- --budget --------------------------------------------------------------------------------------

def test_budget_option_parsing():
    assert parse_budget_option("params:0.5") == {"params_ratio": 0.5}
    assert parse_budget_option("MACS:0.25") == {"macs_ratio": 0.25}
    assert parse_budget_option("0.3") == {"params_ratio": 0.3}
    for bad, needle in (("flops:0.5", "params:R or macs:R"), ("params:half", "not a number"), ("macs:2", r"\(0, 1\]")):
        with pytest.raises(RecipeError, match=needle):
            parse_budget_option(bad)
    rec = build_recipe(None, budget="macs:0.5")
    assert rec.budget == {"macs_ratio": 0.5} and rec.defaults["Linear"]["method"] == "lowrank"
    with pytest.raises(RecipeError, match="--recipe FILE.*--budget"):
        build_recipe(None)


def test_cli_budget_with_and_without_a_recipe(cli, tmp_path, write_recipe):
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(tncompress.build_model(ModelSpec("mlp-1024")).state_dict(), ckpt)
    res = cli("plan", ckpt, "--arch", "mlp-1024", "--budget", "params:0.2", "--json")
    assert res.exit_code == 0, res.output
    import json

    payload = json.loads(res.stdout)
    assert payload["recipe"] == "--budget params:0.2" and abs(payload["budget"]["achieved_ratio"] / 0.2 - 1) <= 0.02
    recipe = write_recipe("version: 1\ndefaults:\n  Linear: {method: lowrank, rank: 8}\n"
                          "budget: {params_ratio: 0.5, candidates: 4, sensitivity: layer}\n")
    res = cli("plan", ckpt, "--arch", "mlp-1024", "-r", recipe, "--budget", "params:0.1", "--json")
    assert res.exit_code == 0, res.output
    budget = json.loads(res.stdout)["budget"]
    assert budget["target_ratio"] == 0.1 and budget["sensitivity"] == "layer"  # the recipe's other keys kept
    assert_user_error(cli("plan", ckpt, "--arch", "mlp-1024"), "--recipe FILE", "--budget")
    assert_user_error(cli("plan", ckpt, "--arch", "mlp-1024", "--budget", "params:3"), "(0, 1]")


# --- whole pickles -------------------------------------------------------------------------------------

def test_whole_pickle_records_its_class_when_it_rebuilds(cli, tmp_path):
    (tmp_path / "defs_pk.py").write_text("from torch import nn\nclass Net(nn.Module):\n"
                                         "    def __init__(self):\n        super().__init__()\n"
                                         "        self.fc1 = nn.Linear(64, 32)\n        self.fc2 = nn.Linear(32, 10)\n"
                                         "    def forward(self, x):\n        return self.fc2(self.fc1(x).relu())\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import defs_pk

        torch.save(defs_pk.Net(), tmp_path / "whole.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("defs_pk", None)
    out = tmp_path / "out.pt"
    res = cli("decompose", tmp_path / "whole.pt", "--trust-pickle", "--import", tmp_path / "defs_pk.py",
              "--budget", "params:0.5", "-o", out)
    assert res.exit_code == 0, res.output
    assert torch.load(out, weights_only=True)["base"]["arch"] == "defs_pk:Net"
    sys.modules.pop("defs_pk", None)
    model = tncompress.load(out)  # nothing more needed: the class and its file are recorded
    assert type(model).__name__ == "Net"
    assert cli("export", out, "--format", "torchscript", "-o", tmp_path / "out.ts").exit_code == 0
    sys.modules.pop("defs_pk", None)
