"""A conformance corpus: models written the way users write them (tests/corpus/*.py), each driven
through the whole command line — plan → decompose (uniform ranks, TT/CP, data-aware on real images,
a parameter budget and a MAC budget) → tncompress.load → report → finetune → export — with the
properties every step promises checked on the files it writes.

The CLI runs in-process (typer's CliRunner, as the other CLI tests do). Each invocation starts from
the imports a fresh process would have: modules imported from the corpus or the test's folders are
dropped afterwards and ``sys.path`` is restored, so ``--import`` does the importing every time. The
model that ``decompose`` writes is captured at the moment it is saved, to check that
``tncompress.load`` gives back exactly that model.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import tncompress
from tncompress.cli import app
from tncompress.measure import count_macs, count_params

CORPUS = Path(__file__).parent / "corpus"
NUM_CLASSES = 10
CALIBRATION = ["--calibration-size", "16"]
TRAIN_LIMITS = ["--epochs", "1", "--limit-train", "16", "--limit-test", "16", "--batch-size", "8"]
FACTORIZED = {"LowRankLinear", "TTLinear", "Tucker2Conv2d", "CPConv2d", "LowRankEmbedding", "TTEmbedding",
              "LowRankConv2d"}

# --- the corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    file: str                          # tests/corpus/<file>.py
    factory: str | None                # None: the model is pickled whole from a script (__main__)
    channels: int = 1                  # image input (ignored for token models)
    size: int = 28
    shape: str | None = None           # the --input-shape a user passes; None: nothing given anywhere
    tokens: bool = False               # forward(idx, targets=None) -> (logits, loss)
    vocab: int = 65
    seq: int = 16
    decomposed: tuple[str, ...] = ()   # layers the uniform recipe must factorize
    dense: dict[str, str] = field(default_factory=dict)  # layers that must stay dense: a word of the reason
    calls: dict[str, int] = field(default_factory=dict)  # layers called more than once per forward

    @property
    def path(self) -> Path:
        return CORPUS / f"{self.file}.py"

    @property
    def arch_flags(self) -> list[str]:
        """How a user names the model of a state dict (or a whole pickle) on every command."""
        if self.factory is None:
            return ["--trust-pickle", "--import", str(self.path)]
        return ["--arch", f"{self.file}:{self.factory}", "--import", str(self.path)]

    @property
    def shape_flags(self) -> list[str]:
        return ["--input-shape", self.shape] if self.shape else []

    def example(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if self.tokens:
            return torch.randint(0, self.vocab, (batch, self.seq), generator=gen)
        return torch.randn(batch, self.channels, self.size, self.size, generator=gen)


CASES = [
    Case("mnist-cnn-view", "mnist_cnn", "make", shape="1,1,28,28", decomposed=("conv1", "conv2", "fc1", "fc2")),
    Case("whole-pickle-main", "whole_pickle", None, channels=3, size=32, shape="1,3,32,32",
         decomposed=("conv1", "conv2", "fc", "out")),
    Case("custom-blocks-sequential", "custom_blocks", "make", channels=3, size=32, shape="1,3,32,32",
         decomposed=("0.conv", "1.body.conv", "2.conv", "3.body.conv", "6")),
    Case("shared-layer", "shared_layer", "make", shape="1,1,28,28", decomposed=("inp", "shared", "head"),
         calls={"shared": 2}),
    Case("channels-last-forward", "channels_last", "make", channels=3, size=32, shape="1,3,32,32",
         decomposed=("conv1", "conv2", "conv3", "fc")),
    Case("gray-no-input-shape", "gray_adaptive", "make", shape=None,
         decomposed=("features.0", "features.3", "classifier")),
    Case("char-lm-logits-loss", "char_lm", "make", shape="1,16", tokens=True,
         decomposed=tuple(f"transformer.h.{i}.{name}" for i in range(2)
                          for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")) + ("transformer.wpe",),
         dense={"lm_head": "tied", "transformer.wte": "tied"}),
    Case("mha-seq-first", "seq_first_attention", "make", shape="1,1,28,28",
         decomposed=("embed", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ff", "head")),
    Case("dict-output", "dict_output", "make", channels=3, size=32, shape="1,3,32,32",
         decomposed=("conv1", "conv2", "proj", "classifier")),
    Case("import-sibling-module", "sibling_net", "make", shape="1,1,28,28",
         decomposed=("body.0.conv", "body.2.conv", "fc", "out")),
]

DEFAULTS = """\
version: 1
defaults:
  Linear: {method: lowrank, rank: 0.5%(aware)s}
  Conv2d: {method: tucker2, rank: 0.5%(aware)s}
  Embedding: {method: lowrank, rank: 0.5}
"""
RECIPES = {
    # name: (recipe text, calibrate on the case's image folder)
    "uniform": (DEFAULTS % {"aware": ""}, False),
    "tt-cp": ("version: 1\ndefaults:\n  Linear: {method: tt, rank: 0.5}\n  Conv2d: {method: cp, rank: 0.5}\n"
              "  Embedding: {method: tt, rank: 0.5}\n", False),
    "data-aware": (DEFAULTS % {"aware": ", data_aware: true"}, True),
    "budget-params": (DEFAULTS % {"aware": ""} + "budget: {params_ratio: 0.5}\n", False),
    "budget-macs": (DEFAULTS % {"aware": ""} + "budget: {macs_ratio: 0.5}\n", True),
}
COMPRESSING = ("uniform", "data-aware", "budget-params")  # each shrinks the parameter count

# --- running the CLI as a fresh process would ------------------------------------------------------


@dataclass(repr=False)
class Run:
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str
    debug: str = ""  # stderr of the same command rerun with --debug, when it failed

    def __repr__(self) -> str:
        return f"Run(tncompress {' '.join(self.args[:2])} …, exit {self.exit_code})"

    def describe(self) -> str:
        tail = (self.debug or self.stderr)[-6000:]
        return f"`tncompress {' '.join(self.args)}` exited {self.exit_code}:\n{self.stderr[-1500:]}\n--debug:\n{tail}"

    def check(self) -> Run:
        assert self.exit_code == 0, self.describe()
        return self


class Cli:
    """The CLI in-process, with what each command imports dropped afterwards; remembers the model
    each ``save_compressed`` call wrote (keyed by the resolved output path)."""

    def __init__(self, roots: list[Path]) -> None:
        self.runner = CliRunner()
        self.roots = [str(r.resolve()) for r in roots]
        self.saved: dict[Path, nn.Module] = {}

    def _invoke(self, args: list[str]) -> Any:
        import tncompress.checkpoint as ckpt

        original = ckpt.save_compressed

        def spy(path: Any, model: nn.Module, **kwargs: Any) -> None:
            original(path, model, **kwargs)
            self.saved[Path(path).resolve()] = copy.deepcopy(model).eval()

        ckpt.save_compressed = spy
        try:
            with fresh_imports(self.roots):
                return self.runner.invoke(app, args, catch_exceptions=True)
        finally:
            ckpt.save_compressed = original

    def load(self, path: Path) -> nn.Module:
        """``tncompress.load`` as a fresh Python session runs it (it imports the recorded files itself)."""
        with fresh_imports(self.roots):
            return tncompress.load(path)

    def __call__(self, *args: Any) -> Run:
        argv = [str(a) for a in args]
        res = self._invoke(argv)
        run = Run(argv, res.exit_code, res.stdout, res.stderr)
        if res.exit_code != 0:
            run.debug = self._invoke(["--debug", *argv]).stderr
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                run.debug += f"\n(uncaught {type(res.exception).__name__}: {res.exception})"
        return run


@contextlib.contextmanager
def fresh_imports(roots: list[str]) -> Iterator[None]:
    """Drop the modules imported from files under ``roots`` and restore ``sys.path`` on leaving."""
    path = list(sys.path)
    before = set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if any(os.path.abspath(file).startswith(root) for root in roots):
                del sys.modules[name]


def corpus_module(case: Case, roots: list[str]) -> Any:
    """The case's model file imported as its stem (its folder on sys.path, for a sibling import),
    dropped from sys.modules again so that the CLI imports it itself."""
    with fresh_imports(roots):
        sys.path.insert(0, str(CORPUS))
        spec = importlib.util.spec_from_file_location(case.file, case.path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[case.file] = module
        spec.loader.exec_module(module)
    return module


def quick_steps(model: nn.Module, case: Case, steps: int = 3) -> nn.Module:
    """A few SGD steps on random data, so the weights are not exactly at initialisation."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(steps):
        x = case.example(8, seed=step)
        opt.zero_grad()
        if case.tokens:
            _, loss = model(x, torch.roll(x, -1, dims=1))
        else:
            out = model(x)
            loss = nn.functional.cross_entropy(logits_of(out), torch.arange(8) % NUM_CLASSES)
        loss.backward()
        opt.step()
    return model.eval()


# --- outputs ---------------------------------------------------------------------------------------


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, tuple):
        return out[0]
    return out


def flat(out: Any) -> list[Any]:
    """Every leaf of a (nested) output, tensors and Nones, in order."""
    if isinstance(out, dict):
        return [leaf for key in sorted(out) for leaf in flat(out[key])]
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in flat(item)]
    return [out]


def structure(out: Any) -> Any:
    """The output's form with each tensor replaced by its shape: dicts keep their keys, tuples their length."""
    if isinstance(out, dict):
        return {key: structure(value) for key, value in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(structure(v) for v in out)
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    return out


@torch.no_grad()
def forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model.eval()(x)


def assert_same_outputs(got: Any, want: Any, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert structure(got) == structure(want), (what, structure(got), structure(want))
    for a, b in zip(flat(got), flat(want)):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        else:
            assert a == b, (what, a, b)


def factorized_layers(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in FACTORIZED}


# --- data on disk ----------------------------------------------------------------------------------


def write_image_folder(root: Path, channels: int, size: int, per_class: int = 2) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: grayscale (mode L) or RGB PNGs
    whose brightness and stripes depend on the class."""
    rng = np.random.default_rng(channels * 100 + size)
    for split in ("train", "test"):
        for k in range(NUM_CLASSES):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = rng.integers(0, 96, (size, size, channels)).astype(np.int32) + 12 * k
                base[:, k::NUM_CLASSES] += 60
                pixels = np.clip(base, 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels[:, :, 0], mode="L") if channels == 1 else Image.fromarray(pixels, "RGB")
                image.save(folder / f"{split}{i}.png")
    return root


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("conformance")
    saved = {k: os.environ.get(k) for k in ("TNCOMPRESS_NO_DOWNLOAD", "TNCOMPRESS_DATA")}
    os.environ["TNCOMPRESS_NO_DOWNLOAD"] = "1"
    os.environ["TNCOMPRESS_DATA"] = str(root / "no-data-here")
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cli(workdir) -> Cli:
    return Cli([CORPUS, workdir])


@pytest.fixture(scope="module")
def folders(workdir) -> dict[int, str]:
    """folder:PATH datasets of 10 classes: 1-channel 28×28 and RGB 32×32."""
    return {1: "folder:" + str(write_image_folder(workdir / "gray28", 1, 28)),
            3: "folder:" + str(write_image_folder(workdir / "rgb32", 3, 32))}


@dataclass(repr=False)
class Prepared:
    case: Case
    dir: Path
    source: Path          # the file the user has: a state dict or a whole pickle
    dense: nn.Module      # the same weights, for comparisons
    dataset: str | None   # folder:PATH matching the model's input; None for token models
    results: dict[str, Run] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Prepared({self.case.id}, {self.source.name})"


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def prepared(request, workdir, folders, cli) -> Prepared:
    case: Case = request.param
    where = workdir / case.id
    where.mkdir()
    module = corpus_module(case, cli.roots)
    if case.factory is None:  # pickled whole by a script, where the class lives in __main__
        source, weights = where / "whole.pt", where / "whole-state.pt"
        done = subprocess.run([sys.executable, str(case.path), str(source), str(weights)], cwd=where,
                              capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        assert done.returncode == 0, done.stderr
        dense = module.ScriptNet()
        dense.load_state_dict(torch.load(weights, weights_only=True))
        dense.eval()
    else:
        torch.manual_seed(0)
        dense = quick_steps(getattr(module, case.factory)(), case)
        source = where / f"{case.file}.pt"
        torch.save(dense.state_dict(), source)
    dataset = None if case.tokens else folders[case.channels]
    return Prepared(case, where, source, dense, dataset)


def calibrates(prep: Prepared, recipe: str) -> bool:
    """Whether ``decompose`` gets ``--calibration-data``: for the recipes that say so and, for a model
    whose input shape nothing records, always (the images are then what tells its input size)."""
    return prep.dataset is not None and (RECIPES[recipe][1] or prep.case.shape is None)


def decomposed(cli: Cli, prep: Prepared, name: str) -> tuple[Run, Path]:
    """``decompose`` of the case with one of RECIPES, run once per module and remembered."""
    out = prep.dir / f"{name}.pt"
    if name not in prep.results:
        text, _ = RECIPES[name]
        recipe = prep.dir / f"{name}.yaml"
        recipe.write_text(text)
        data = ["--calibration-data", prep.dataset, *CALIBRATION] if calibrates(prep, name) else []
        prep.results[name] = cli("decompose", prep.source, *prep.case.arch_flags, *prep.case.shape_flags,
                                 "-r", recipe, "-o", out, *data, "--json")
    return prep.results[name], out


def needs(cli: Cli, prep: Prepared, name: str) -> Path:
    run, out = decomposed(cli, prep, name)
    if run.exit_code != 0:
        pytest.fail(f"this step needs `decompose` with the {name!r} recipe, which failed: {run.describe()}")
    return out


# --- the steps -------------------------------------------------------------------------------------


def test_plan(cli, prepared):
    case = prepared.case
    recipe = prepared.dir / "plan.yaml"
    recipe.write_text(RECIPES["uniform"][0])
    data = [] if case.shape or case.tokens else ["--calibration-data", prepared.dataset, *CALIBRATION]
    run = cli("plan", prepared.source, *case.arch_flags, *case.shape_flags, "-r", recipe, *data, "--json").check()
    plan = json.loads(run.stdout)
    layers = {layer["name"]: layer for layer in plan["layers"]}
    for name in case.decomposed:
        assert name in layers, (name, sorted(layers))
        entry = layers[name]
        assert entry["action"] == "decompose", (name, entry["reason"])
        assert 0 < entry["params_after"] < entry["params_before"], (name, entry)
    for name, why in case.dense.items():
        assert layers[name]["action"] == "keep" and why in layers[name]["reason"], (name, layers[name])
    for name, calls in case.calls.items():
        assert layers[name]["calls"] == calls, (name, layers[name])
    if case.shape:
        assert plan["input_shape"] == [int(v) for v in case.shape.split(",")]
    else:  # inferred: the channels of the first conv, the size of the calibration images
        assert plan["input_shape"] == [1, case.channels, case.size, case.size], plan["input_shape"]


def test_no_input_shape_and_no_data_is_a_user_error(cli, workdir):
    """Without --input-shape, a recorded shape or images, a model whose first layer is a conv has no
    known input size: one line saying to pass --input-shape (exit 2), not a crash on a guessed
    3×224×224 input."""
    case = next(c for c in CASES if c.shape is None and not c.tokens)
    where = workdir / "no-shape-no-data"
    where.mkdir()
    torch.save(getattr(corpus_module(case, cli.roots), case.factory)().state_dict(), where / "model.pt")
    (where / "plan.yaml").write_text(RECIPES["uniform"][0])
    run = cli("plan", where / "model.pt", *case.arch_flags, "-r", where / "plan.yaml")
    assert run.exit_code == 2, run.describe()
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--input-shape" in lines[0], run.describe()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_decompose_and_load(cli, prepared, recipe):
    case = prepared.case
    run, out = decomposed(cli, prepared, recipe)
    run.check()
    assert out.exists()
    printed = json.loads(run.stdout)
    model = cli.load(out)

    # what was written is what decompose had in memory
    saved = cli.saved.get(out.resolve())
    assert saved is not None, "decompose wrote its checkpoint without tncompress.checkpoint.save_compressed"
    x = case.example()
    assert_same_outputs(forward(model, x), forward(saved, x), f"{recipe}: reloaded vs decompose-time model")
    # the same kind of output as the user's model: tuple (logits, None), dict keys, shapes
    reference = forward(prepared.dense, x)
    assert structure(forward(model, x)) == structure(reference)
    assert all(torch.isfinite(t).all() for t in flat(forward(model, x)) if isinstance(t, torch.Tensor))

    raw = torch.load(out, weights_only=True)
    plan = {entry["name"]: entry for entry in raw["plan"]}
    factorized = factorized_layers(model)
    for name, entry in plan.items():  # never larger or slower, unless a rule allows growth
        if entry["action"] == "decompose":
            assert entry["params_after"] < entry["params_before"], (name, entry)
            if entry["macs_before"]:  # (an embedding's dense lookup counts no MACs)
                assert entry["macs_after"] <= entry["macs_before"], (name, entry)
            error = entry["output_rel_error"]
            assert error is not None and math.isfinite(error), (name, entry)
    if recipe in ("uniform", "data-aware"):  # half of each layer's params: every listed layer is factorized
        for name in case.decomposed:
            assert plan[name]["action"] == "decompose", (name, plan[name]["reason"])
        assert set(factorized) >= set(case.decomposed), factorized
    if recipe == "tt-cp":  # TT / CP may cost more MACs than the dense layer: then it stays dense, saying why
        for name in case.decomposed:
            entry = plan[name]
            assert entry["action"] == "decompose" or "allow_growth" in entry["reason"], (name, entry["reason"])
            assert (entry["action"] == "decompose") == (name in factorized), (name, entry["action"], factorized)
    for name, why in case.dense.items():
        assert plan[name]["action"] == "keep" and why in plan[name]["reason"], (name, plan[name])
    if recipe != "tt-cp":  # (TT on a small MLP may grow every layer's MACs: then all stay dense)
        assert factorized, "nothing was factorized"
    assert {p["name"] for p in printed["layers"] if p["action"] == "decompose"} == \
        {n for n, p in plan.items() if p["action"] == "decompose"}

    before, after = count_params(prepared.dense), count_params(model)
    if recipe in COMPRESSING or factorized:
        assert after < before, (before, after)
    if recipe == "budget-params":
        assert after <= 0.5 * 1.02 * before, (after / before, raw["metadata"].get("budget"))
    if recipe == "budget-macs":
        example = case.example(1)
        ratio = count_macs(model, example).total / count_macs(prepared.dense, example).total
        assert ratio <= 0.5 * 1.02, (ratio, raw["metadata"].get("budget"))

    calibration = raw["metadata"]["calibration"]
    if calibrates(prepared, recipe):
        assert calibration["samples"] == 16 and "16 images" in calibration["kind"], calibration
        # the images were shaped as the model expects: channels of the first layer, the folder's size
        assert calibration["input_shape"][1:] == [case.channels, case.size, case.size], calibration
    error = raw["metadata"]["model_output_error"]
    assert error is not None and math.isfinite(error), raw["metadata"]

    if case.tokens:  # forward(idx, targets) still gives a scalar loss
        idx = case.example()
        with torch.no_grad():
            logits, loss = model(idx, torch.roll(idx, -1, dims=1))
        assert logits.shape == (2, case.seq, case.vocab) and loss.ndim == 0 and torch.isfinite(loss)
    if case.id == "channels-last-forward":  # NHWC or NCHW input: the same answer
        assert_same_outputs(forward(model, x.contiguous(memory_format=torch.channels_last)), forward(model, x),
                            "channels-last input", rtol=1e-4, atol=1e-5)


def test_report(cli, prepared):
    case = prepared.case
    outs = [needs(cli, prepared, name) for name in ("uniform", "data-aware")]
    data = ["--dataset", prepared.dataset, "--limit-test", "16"] if prepared.dataset else []
    run = cli("report", prepared.source, *outs, *case.arch_flags, *case.shape_flags, *data, "--json").check()
    report = json.loads(run.stdout)
    base, *small = report["models"]
    assert len(small) == 2
    assert base["params"] == count_params(prepared.dense)
    for entry, out in zip(small, outs):
        model = cli.load(out)
        assert entry["params"] == count_params(model) < base["params"]
        assert entry["macs"] < base["macs"], entry  # (the *_ratio fields: their direction is being changed)
        rows = {row["name"]: row for row in entry["layers"]}
        for name in case.decomposed:
            assert name in rows and rows[name]["method"] != "dense", (name, rows.get(name))
        if prepared.dataset:
            assert entry["accuracy"]["images"] == 16, entry["accuracy"]
    if prepared.dataset:
        assert base["accuracy"]["images"] == 16
    if case.id == "channels-last-forward":
        lat = cli("report", prepared.source, outs[0], *case.arch_flags, *case.shape_flags, "--latency", "--latency-time", "3",
                  "--channels-last", "--latency-batch", "2", "--json").check()
        for entry in json.loads(lat.stdout)["models"]:
            assert entry["latency"]["layout"] == "channels_last" and entry["latency"]["median_ms"] > 0


def test_finetune(cli, prepared):
    """One tiny epoch on the case's image folder, distilling from the user's dense file."""
    case = prepared.case
    if case.tokens:
        pytest.skip("finetune reads image datasets only: there is no token/text dataset to train a language model on")
    out = needs(cli, prepared, "uniform")
    ft = prepared.dir / "uniform-ft.pt"
    cli("finetune", out, "--dataset", prepared.dataset, "--teacher", prepared.source, *case.arch_flags,
        *TRAIN_LIMITS, "-o", ft).check()
    before, after = cli.load(out), cli.load(ft)
    assert factorized_layers(after) == factorized_layers(before)
    moved = [name for name, p in after.state_dict().items()
             if p.is_floating_point() and not torch.equal(p, before.state_dict()[name])]
    assert moved, "fine-tuning changed no weight"
    x = case.example()
    assert structure(forward(after, x)) == structure(forward(prepared.dense, x))
    assert all(torch.isfinite(t).all() for t in flat(forward(after, x)) if isinstance(t, torch.Tensor))


def test_export_torchscript(cli, prepared):
    case = prepared.case
    out = needs(cli, prepared, "uniform")
    target = prepared.dir / "uniform.torchscript.pt"
    cli("export", out, "--format", "torchscript", "-o", target).check()
    assert target.exists()
    scripted = torch.jit.load(str(target))
    model = cli.load(out)
    for batch in (1, 3):
        x = case.example(batch, seed=5)
        with torch.no_grad():
            got = scripted(x)
        want = logits_of(forward(model, x))
        torch.testing.assert_close(logits_of(got), want, rtol=1e-4, atol=1e-5)
    if case.id == "channels-last-forward":
        x = case.example(2, seed=6)
        with torch.no_grad():
            got = scripted(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(logits_of(got), logits_of(forward(model, x)), rtol=1e-4, atol=1e-5)
