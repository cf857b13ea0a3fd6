"""Fuzzing the recipe loader with hypothesis: whatever the YAML, loading and planning either succeed or
raise a one-line TncompressError — never another exception, never a traceback from the CLI.

Runs are derandomized (the same examples every run, so CI is reproducible) and sized so that the
whole module takes well under half a minute on two cores.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tncompress.compress import make_plan
from tncompress.errors import TncompressError
from tncompress.models import ModelSpec, build_model
from tncompress.recipe import load_recipe, parse_recipe

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
WORDS = ["version", "defaults", "layers", "exclude", "calibration", "budget", "Linear", "Conv2d", "method",
         "rank", "name", "pattern", "regex", "type", "in_modes", "out_modes", "d", "form", "fallback", "engine",
         "algorithm", "n_iter", "n_iter_max", "tol", "retries", "l2_reg", "floor", "weakening", "energy", "in",
         "out", "batch_size", "seed", "max_output_error", "max_model_error", "tt", "cp", "lowrank", "svd",
         "tucker2", "tucker", "none", "vbmf", "3conv", "4conv", "hooi", "hosvd", "tensorly", "als",
         "classifier.*", "features.*", "*", ".*", "classifier\\.[0-9]", *LAYERS]
RUNS: Counter[str] = Counter()  # examples run per test
OUTCOMES: Counter[str] = Counter()  # refused / refused at plan / planned

FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model(ModelSpec("lenet5")).eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _plan_or_user_error(recipe_fn, model) -> str:
    """Load and plan; a TncompressError is an accepted outcome, anything else fails the test."""
    outcome = _outcome(recipe_fn, model)
    OUTCOMES[outcome] += 1
    return outcome


def _outcome(recipe_fn, model) -> str:
    try:
        recipe = recipe_fn()
    except TncompressError as exc:
        _one_line(exc)
        return "refused"
    try:
        with torch.no_grad():
            make_plan(model, recipe, [1, 1, 32, 32])
    except TncompressError as exc:
        _one_line(exc)
        return "refused at plan"
    return "planned"


def _one_line(exc: TncompressError) -> None:
    message = str(exc)
    assert message and "\n" not in message.strip(), repr(message)


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
yamlish = st.lists(st.sampled_from(list("{}[]:,-#&*!|>'\"%@` \n\t.0123456789eE+_") + [": ", "\n  ", "\n- "] + WORDS),
                   max_size=40).map("".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(), st.sampled_from(WORDS),
                    st.text(max_size=10))
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=6), st.integers(-2, 3), st.booleans(), st.none())
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=5)), max_leaves=30)


def _rule() -> st.SearchStrategy[dict]:
    selector = st.one_of(st.fixed_dictionaries({"name": st.sampled_from(LAYERS)}),
                         st.fixed_dictionaries({"pattern": st.sampled_from(["classifier.*", "features.*", "*"])}),
                         st.fixed_dictionaries({"type": st.sampled_from(["Linear", "Conv2d"])}))
    rank = st.one_of(st.integers(-2, 600), st.floats(-0.5, 1.5), st.sampled_from(["vbmf", "x"]),
                     st.lists(st.integers(0, 300), max_size=4), st.fixed_dictionaries({"energy": st.floats(0, 1.2)}),
                     st.fixed_dictionaries({"in": st.integers(0, 20), "out": st.integers(0, 20)}))
    modes = st.lists(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 10, 12, 20]), min_size=1, max_size=4)
    settings_ = st.fixed_dictionaries({}, optional={
        "method": st.sampled_from(["tt", "lowrank", "cp", "tucker2", "none", "svd", "tucker", "bogus"]),
        "rank": rank, "in_modes": modes, "out_modes": modes, "d": st.integers(0, 5),
        "form": st.sampled_from(["3conv", "4conv", "2conv"]), "algorithm": st.sampled_from(["hooi", "hosvd", "x"]),
        "max_output_error": st.one_of(st.floats(-1, 2), st.text(max_size=3)), "floor": st.integers(-1, 4),
        "weakening": st.floats(-0.5, 1.5)})
    return st.builds(lambda a, b: {**a, **b}, selector, settings_)


shaped = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1"])},
    optional={"layers": st.lists(_rule(), max_size=4),
              "exclude": st.lists(st.sampled_from(LAYERS + ["fc9", "*"]), max_size=2),
              "calibration": st.fixed_dictionaries({}, optional={"batch_size": st.integers(-1, 4),
                                                                 "seed": st.integers(-1, 3),
                                                                 "max_model_error": st.floats(-1, 2)})})


@FUZZ
@given(source=text)
def test_arbitrary_text(source, lenet, workdir):
    RUNS["arbitrary text"] += 1
    path = workdir / "text.yaml"
    path.write_text(source, encoding="utf-8")
    _plan_or_user_error(lambda: load_recipe(path), lenet)


@FUZZ
@given(junk=yamlish)
def test_yaml_like_text(junk, lenet, workdir):
    RUNS["YAML-like text"] += 1
    path = workdir / "yamlish.yaml"
    path.write_text(junk, encoding="utf-8")
    _plan_or_user_error(lambda: load_recipe(path), lenet)


@FUZZ
@given(config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**32 - 1), edits=st.integers(1, 6))
def test_mutated_shipped_recipes(config, seed, edits, lenet, workdir):
    """Real recipes with a few characters inserted, deleted or replaced."""
    RUNS["mutated shipped recipes"] += 1
    rng = random.Random(seed)
    chars = list(config.read_text())
    for _ in range(edits):
        i = rng.randrange(len(chars) + 1)
        op = rng.choice(["insert", "delete", "replace"])
        c = rng.choice("{}[]:,-#'\" \n0123456789.")
        if op == "insert" or not chars:
            chars.insert(i, c)
        elif i < len(chars):
            if op == "delete":
                del chars[i]
            else:
                chars[i] = c
    path = workdir / "mutated.yaml"
    path.write_text("".join(chars))
    _plan_or_user_error(lambda: load_recipe(path), lenet)


@FUZZ
@given(tree=trees)
def test_arbitrary_structures(tree, lenet, workdir):
    """Arbitrary nested YAML values: through the file loader, and straight into parse_recipe."""
    RUNS["arbitrary structures"] += 1
    path = workdir / "tree.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    _plan_or_user_error(lambda: load_recipe(path), lenet)
    _plan_or_user_error(lambda: parse_recipe(tree, "tree"), lenet)
    if isinstance(tree, dict):
        _plan_or_user_error(lambda: parse_recipe({**tree, "version": 1}, "tree"), lenet)


@FUZZ
@given(recipe=shaped)
def test_recipe_shaped_structures(recipe, lenet):
    """Plausible recipes with random settings: these reach rank resolution in the planner."""
    RUNS["recipe-shaped structures"] += 1
    _plan_or_user_error(lambda: parse_recipe(recipe, "shaped"), lenet)


@settings(FUZZ, max_examples=80)
@given(source=st.one_of(yamlish, shaped.map(yaml.safe_dump)))
def test_cli_plan_never_shows_a_traceback(source, workdir, cli_once):
    RUNS["CLI plan"] += 1
    path = workdir / "cli.yaml"
    path.write_text(source)
    result = cli_once("plan", workdir / "l5.pt", "--arch", "lenet5", "-r", path)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.fixture(scope="module")
def cli_once(workdir, lenet):
    """A module-scoped CLI runner (hypothesis re-uses it for every example)."""
    from conftest import CliResult
    from typer.testing import CliRunner

    from tncompress.cli import app

    torch.save(lenet.state_dict(), workdir / "l5.pt")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def test_fuzz_ran_its_examples(capsys):
    """Runs last in this module: every fuzz test above really exercised its examples (a strategy that
    hypothesis cannot satisfy would otherwise pass vacuously). Prints the counts (shown with -s)."""
    if not RUNS:
        pytest.skip("run together with the fuzz tests above")
    with capsys.disabled():
        print(f"\nrecipe fuzz examples: {sum(RUNS.values())} ({', '.join(f'{k} {v}' for k, v in RUNS.items())}); "
              f"outcomes of load + plan: {dict(OUTCOMES)}")
    for name, count in RUNS.items():
        assert count >= (60 if name == "CLI plan" else 400), (name, count)
    assert OUTCOMES["planned"] >= 50 and OUTCOMES["refused at plan"] >= 100, OUTCOMES  # both paths reached
