"""What `report` says about latency, accuracy, normalisation, layer errors and ratios (issue 20):
models timed together in interleaved rounds with a significance rule, the split and image count
behind a top-1, where mean/std came from, errors that predate a fine-tune, one meaning per ratio."""
from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
from conftest import assert_user_error, saved_state_dict
from torch import nn
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec

from tncompress import measure
from tncompress.checkpoint import LoadedModel
from tncompress.errors import TncompressError
from tncompress.finetune import DataOptions, normalization_source
from tncompress.gates import evaluate_gates, parse_gate
from tncompress.layers import TTLinear
from tncompress.measure import LatencyStats, compare_latency, measure_latencies, measure_latency
from tncompress.report import fmt_latency, fmt_speedup, summary_rows, to_markdown


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TNCOMPRESS_NO_DOWNLOAD", "1")
    monkeypatch.setenv("TNCOMPRESS_DATA", str(tmp_path / "no-data-here"))


class Sleeper(nn.Module):
    """A model whose forward takes a known wall time (sleeping is immune to CPU contention)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class FakeTimer:
    """Stands in for torch.utils.benchmark.Timer: each round returns the next of ``times_ms``
    (per-run milliseconds, one block each), and logs which model was timed when."""

    def __init__(self, name: str, times_ms: list[float], log: list[str], check=None) -> None:
        self.name, self.times, self.log, self.check = name, itertools.cycle(times_ms), log, check

    def blocked_autorange(self, min_run_time: float = 0.2) -> Measurement:
        if self.check:
            self.check()
        self.log.append(self.name)
        return Measurement(number_per_run=10, raw_times=[10 * next(self.times) / 1e3], task_spec=TaskSpec("m(x)", "pass"))


def fake_factory(times: dict[int, list[float]], log: list[str], check=None):
    """A timer factory giving the i-th model built the times ``times[i]``."""
    counter = itertools.count()

    def make(model: nn.Module, example: torch.Tensor) -> FakeTimer:
        i = next(counter)
        return FakeTimer("ABCDEFG"[i], times[i], log, check)

    return make


def _stats(median: float, p25: float, p75: float) -> dict:
    return {"median_ms": median, "p25_ms": p25, "p75_ms": p75}


# --- 1. latency: interleaved, significance, noisy machine ------------------------------------------

def test_models_are_timed_interleaved_round_by_round_merged_and_in_inference_mode():
    layer = TTLinear.from_dense(nn.Linear(16, 16), 2, in_modes=[4, 4], out_modes=[4, 4])
    states = []

    def check() -> None:
        states.append((layer.merged, torch.is_inference_mode_enabled()))

    log: list[str] = []
    models = [nn.Linear(16, 16), nn.Sequential(layer), nn.Linear(16, 16)]
    stats = measure_latencies(models, [torch.randn(1, 16)] * 3, min_rounds=4, max_rounds=4,
                              timer_factory=fake_factory({0: [1.0], 1: [1.0], 2: [1.0]}, log, check))
    assert log == list("ABC" * 4)  # A, B, C, A, B, C, ... not A, A, A, B, B, B
    assert all(states) and states[0] == (True, True)
    assert not layer.merged  # unmerged again afterwards
    assert [s.rounds for s in stats] == [4, 4, 4] and stats[0].measurements == 4 and stats[0].runs == 40


def test_timing_stops_when_stable_and_runs_on_while_noisy():
    log: list[str] = []
    steady = measure_latencies([nn.Identity(), nn.Identity()], [torch.zeros(1)] * 2, min_rounds=5, max_rounds=50,
                               timer_factory=fake_factory({0: [2.0, 2.02], 1: [8.0, 8.1]}, log))
    assert steady[0].rounds == 5 and steady[0].stable
    log.clear()
    noisy = measure_latencies([nn.Identity(), nn.Identity()], [torch.zeros(1)] * 2, min_rounds=5, max_rounds=12,
                              max_seconds=60, timer_factory=fake_factory({0: [2.0], 1: [1.0, 5.0, 20.0]}, log))
    assert noisy[1].rounds == 12 and not noisy[1].stable and noisy[1].noisy()
    assert noisy[1].median_ms == pytest.approx(5.0) and noisy[1].measurements == 12


def test_sleeping_models_give_a_significant_fourfold_speedup():
    """Real torch.utils.benchmark timing: 8 ms against 2 ms per forward is about 4× and significant."""
    slow, fast = Sleeper(0.008), Sleeper(0.002)
    base, small = measure_latencies([slow, fast], [torch.zeros(1)] * 2, warmup=1, min_rounds=5, max_seconds=5)
    assert 7.5 <= base.median_ms <= 12 and 1.9 <= small.median_ms <= 4
    verdict = compare_latency(base, small)
    assert 2.5 <= verdict["speedup"] <= 4.5
    assert verdict["speedup_significant"] and verdict["speedup_verdict"] == "faster"
    assert verdict["speedup_low"] <= verdict["speedup"] <= verdict["speedup_high"]
    single = measure_latency(fast, torch.zeros(1), warmup=1, max_seconds=2)  # the one-model form still works
    assert {"median_ms", "p10_ms", "p90_ms", "runs", "threads", "batch", "measurements"} <= set(single)
    assert single["batch"] == 1 and single["runs"] >= single["measurements"] >= 5


def test_speedup_verdicts():
    assert compare_latency(_stats(8, 7.9, 8.1), _stats(2, 1.95, 2.05))["speedup_verdict"] == "faster"
    assert compare_latency(_stats(2, 1.95, 2.05), _stats(8, 7.9, 8.1))["speedup_verdict"] == "slower"
    overlap = compare_latency(_stats(10, 9.5, 10.5), _stats(9.8, 9.3, 10.3))  # IQRs overlap
    assert overlap["speedup_verdict"] == "not significant" and not overlap["speedup_significant"]
    assert overlap["speedup"] == pytest.approx(10 / 9.8)
    wild = compare_latency(_stats(10, 9.9, 10.1), _stats(2, 1, 4))  # a 5× figure, but IQR 150% of the median
    assert wild["speedup_verdict"] == "noisy machine" and not wild["speedup_significant"]
    assert compare_latency(_stats(10, 7, 11), _stats(2, 1.9, 2.1))["speedup_verdict"] == "noisy machine"  # base noisy
    stats = LatencyStats.from_times([0.002, 0.002, 0.002, 0.002], runs=4, rounds=4, stable=True)
    assert stats.median_ms == pytest.approx(2.0) and stats.relative_iqr == pytest.approx(0.0)


def test_report_cells_say_noisy_or_not_significant_instead_of_a_figure():
    def entry(path: str, latency: dict, **speed) -> dict:
        return {"path": path, "params": 10, "bytes_on_disk": 10, "macs": 10, "params_reduction": 1.0,
                "macs_reduction": 1.0, "bytes_reduction": 1.0, "latency": latency, **speed}

    quiet = {"median_ms": 8.0, "iqr_ms": 0.2, "noisy": False, "batch": 1, "threads": 2, "layout": "default",
             "rounds": 5, "measurements": 5, "stable": True}
    report = {"models": [
        entry("a.pt", quiet, speedup=1.0, speedup_verdict="baseline"),
        entry("b.pt", {**quiet, "median_ms": 2.0}, **compare_latency(_stats(8, 7.9, 8.1), _stats(2, 1.95, 2.05))),
        entry("c.pt", quiet, **compare_latency(_stats(8, 7.9, 8.1), _stats(8, 7.9, 8.1))),
        entry("d.pt", {**quiet, "noisy": True}, **compare_latency(_stats(8, 7.9, 8.1), _stats(2, 1, 4))),
    ]}
    headers, rows = summary_rows(report)
    speed = [row[headers.index("speed-up")] for row in rows]
    assert speed[0] == "baseline" and speed[1].startswith("4.00× (±0.") and speed[2] == "not significant"
    assert speed[3] == "noisy machine" and fmt_latency(report["models"][3]["latency"]) == "noisy machine"
    assert fmt_speedup(report["models"][1]) == speed[1] and "2.00 ms (IQR 0.20)" in rows[1]


def _checkpoints(tmp_path, cli, mean_std: bool = False):
    base = saved_state_dict(tmp_path, "lenet5", "l5.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nlayers:\n  - {name: classifier.1, method: lowrank, rank: 8}\n")
    small = tmp_path / "l5-lr.pt"
    extra = ["--mean", "0.5", "--std", "0.25"] if mean_std else []
    res = cli("decompose", base, "--arch", "lenet5", "-r", recipe, "-o", small, *extra)
    assert res.exit_code == 0, res.output
    return base, small


def test_report_times_all_models_together_with_a_verdict_in_json_table_and_markdown(cli, tmp_path, monkeypatch):
    base, small = _checkpoints(tmp_path, cli)
    log: list[str] = []
    times = {0: [8.0, 8.05, 7.95], 1: [2.0, 2.01, 1.99], 2: [1.0, 6.0, 30.0]}  # steady, steady, wildly spread
    monkeypatch.setattr(measure, "torch_timer", fake_factory(times, log))
    rep = cli("report", base, small, small, "--arch", "lenet5", "--latency", "--json", "--gate", "speedup>=3")
    assert rep.exit_code == 3, rep.output  # the noisy third model fails the speed-up gate
    assert log[:6] == list("ABCABC")
    data = json.loads(rep.stdout)
    one, two, three = data["models"]
    assert one["speedup_verdict"] == "baseline" and one["latency"]["measurements"] >= 5
    assert two["speedup"] == pytest.approx(4.0, rel=0.02) and two["speedup_significant"] is True
    assert two["speedup_verdict"] == "faster" and two["speedup_low"] > 3
    assert three["speedup_verdict"] == "noisy machine" and three["speedup_significant"] is False
    assert three["latency"]["noisy"] and isinstance(three["speedup"], float)  # the number stays in the JSON
    assert [g["passed"] for g in data["gates"]] == [True, False]
    assert "noisy machine" in data["gates"][1]["note"] and "lower end of the interval" in data["gates"][0]["note"]
    assert "gate failed: speedup>=3" in rep.stderr and "noisy machine" in rep.stderr

    monkeypatch.setattr(measure, "torch_timer", fake_factory(times, []))
    md = cli("report", base, small, small, "--arch", "lenet5", "--latency", "--markdown").stdout
    assert "4.00× (±0." in md and "noisy machine" in md and "interleaved rounds" in md
    monkeypatch.setattr(measure, "torch_timer", fake_factory({0: [8.0, 8.05], 1: [7.9, 8.1]}, []))
    table = cli("report", base, small, "--arch", "lenet5", "--latency")
    assert table.exit_code == 0 and "not significant" in table.stdout


# --- 2, 3. what accuracy was scored on, and where the normalisation came from ---------------------

def test_accuracy_says_split_and_images_and_flags_a_partial_evaluation(cli, tmp_path):
    base, small = _checkpoints(tmp_path, cli)
    rep = cli("report", base, small, "--arch", "lenet5", "--dataset", "synthetic", "--limit-test", "50", "--json")
    assert rep.exit_code == 0, rep.output
    acc = json.loads(rep.stdout)["models"][1]["accuracy"]
    assert acc["split"] == "test" and acc["images"] == 50 and acc["split_images"] == 1000
    assert acc["partial"] is True and acc["limit_test"] == 50
    md = cli("report", base, small, "--arch", "lenet5", "--dataset", "synthetic", "--limit-test", "50", "--markdown").stdout
    assert "top-1 (test, 50 of 1,000 images, partial)" in md and "**PARTIAL EVALUATION: only 50 of the 1,000" in md
    table = cli("report", base, small, "--arch", "lenet5", "--dataset", "synthetic", "--limit-test", "50").stdout
    assert "PARTIAL EVALUATION" in table
    full = json.loads(cli("report", base, "--arch", "lenet5", "--input-shape", "1,1,32,32", "--dataset", "synthetic",
                          "--json").stdout)
    assert full["models"][0]["accuracy"]["partial"] is False and full["models"][0]["accuracy"]["images"] == 1000
    assert "top-1 (test, 1,000 images)" in to_markdown(full)


def test_normalisation_source_is_the_flag_the_checkpoint_or_the_dataset(cli, tmp_path):
    base, small = _checkpoints(tmp_path, cli, mean_std=True)
    data = json.loads(cli("report", base, small, "--arch", "lenet5", "--dataset", "synthetic", "--limit-test", "20",
                          "--json").stdout)
    dense, compressed = (m["accuracy"]["normalization"] for m in data["models"])
    assert compressed["source"] == "recorded in the checkpoint (metadata.preprocessing)"
    assert compressed["mean_from"] == compressed["std_from"] == "checkpoint" and compressed["mean"] == [0.5]
    assert "dataset default" in dense["source"] and dense["mean_from"] == "dataset"
    md = to_markdown(data)
    assert "recorded in the checkpoint" in md and "given (--mean/--std)" not in md
    flagged = json.loads(cli("report", small, "--dataset", "synthetic", "--limit-test", "20", "--mean", "0.1",
                             "--std", "0.2", "--json").stdout)
    assert flagged["models"][0]["accuracy"]["normalization"]["source"] == "given (--mean/--std)"

    loaded = LoadedModel(nn.Identity(), None, "tncompress", "x.pt", header={"metadata": {"preprocessing": {
        "mean": [0.5], "std": [0.25]}}})
    mixed = normalization_source(loaded, DataOptions("synthetic", mean=(0.1,)))
    assert mixed["source"] == "mean given (--mean), std recorded in the checkpoint"


# --- 4. layer errors of a fine-tuned model --------------------------------------------------------

def test_fine_tuned_model_shows_its_layer_errors_as_from_before_fine_tuning(cli, tmp_path):
    base, small = _checkpoints(tmp_path, cli)
    ft = tmp_path / "l5-lr-ft.pt"
    res = cli("finetune", small, "--dataset", "synthetic", "--epochs", "1", "--limit-train", "64", "--limit-test", "32",
              "--batch-size", "32", "-o", ft)
    assert res.exit_code == 0, res.output
    rep = cli("report", base, small, ft, "--json", "--gate", "max_output_error<=10")
    assert rep.exit_code == 0, rep.output
    data = json.loads(rep.stdout)
    fresh, tuned = data["models"][1], data["models"][2]
    assert fresh["fine_tuned"] is False and tuned["fine_tuned"] is True
    assert tuned["layer_errors"] == "at decompose (before fine-tuning)"
    row = next(r for r in tuned["layers"] if r["method"] == "lowrank")
    assert row["output_rel_error"] is None and row["weight_rel_error"] is None
    assert row["output_rel_error_at_decompose"] > 0 and row["weight_rel_error_at_decompose"] > 0
    fresh_row = next(r for r in fresh["layers"] if r["method"] == "lowrank")
    assert fresh_row["output_rel_error"] == fresh_row["output_rel_error_at_decompose"] > 0
    gate = data["gates"][1]
    assert gate["model"] == str(ft) and gate["note"] == "at decompose, before fine-tuning" and gate["passed"]
    md = to_markdown(data)
    assert "weight err at decompose (before fine-tuning)" in md and "were measured at decompose" in md
    table = " ".join(cli("report", base, ft, "--layers").stdout.split())  # rich wraps long lines
    assert "measured at decompose (before fine-tuning)" in table


# --- 5. one meaning per ratio ---------------------------------------------------------------------

def test_ratios_are_model_over_baseline_and_reductions_the_factor(cli, tmp_path):
    base, small = _checkpoints(tmp_path, cli)
    data = json.loads(cli("report", base, small, "--arch", "lenet5", "--json").stdout)
    dense, compressed = data["models"]
    assert compressed["params_ratio"] == pytest.approx(compressed["params"] / dense["params"]) and compressed["params_ratio"] < 1
    assert compressed["params_reduction"] == pytest.approx(1 / compressed["params_ratio"]) and compressed["params_reduction"] > 3
    assert compressed["bytes_ratio"] < 1 < compressed["bytes_reduction"]
    assert compressed["macs_ratio"] < 1 < compressed["macs_reduction"]
    assert "model / baseline" in data["ratio_rule"]
    headers, rows = summary_rows(data)
    assert "params reduction" in headers and rows[1][headers.index("params reduction")] == "3.45×"
    assert "`*_ratio` are model / baseline" in to_markdown(data)
    ok = cli("report", base, small, "--arch", "lenet5", "--json", "--gate", "params_reduction>=3",
             "--gate", "params_ratio<=0.5", "--gate", "compression>=3")
    assert ok.exit_code == 0, ok.output
    assert [g["metric"] for g in json.loads(ok.stdout)["gates"]] == ["params_reduction", "params_ratio", "params_reduction"]
    assert_user_error(cli("report", base, small, "--arch", "lenet5", "--gate", "params_ratio>=4"),
                      "params_ratio>=4", "write 'params_reduction>=4' instead")


@pytest.mark.parametrize("expr, instead", [
    ("params_ratio>=4", "params_reduction>=4"), ("macs_ratio>2", "macs_reduction>2"), ("bytes_ratio==3", "bytes_reduction==3"),
    ("size_ratio>=2", "bytes_reduction>=2"), ("latency_ratio>=1.5", "speedup>=1.5"),
])
def test_a_ratio_gate_above_one_is_refused_with_the_reduction_to_write(expr, instead):
    with pytest.raises(TncompressError, match=f"write '{instead}' instead"):
        parse_gate(expr)


def test_ratio_gates_below_one_and_latency_gates_on_the_interval():
    report = {"models": [{"path": "a.pt"}, {"path": "b.pt", "params_ratio": 0.25, "params_reduction": 4.0,
                                             "speedup": 1.3, "speedup_low": 1.1, "speedup_high": 1.5,
                                             "speedup_verdict": "faster", "latency": {"median_ms": 2.0, "noisy": False}}]}
    assert parse_gate("compression>=4").metric == "params_reduction"
    results = evaluate_gates([parse_gate(e) for e in ("params_ratio<=0.25", "params_reduction>=4", "speedup>=1.2",
                                                      "speedup>=1.05", "latency_ratio<=0.95", "latency_ms<=3")], report)
    assert [r.passed for r in results] == [True, True, False, True, True, True]
    assert results[2].value == 1.1 and "lower end of the interval" in results[2].note
    noisy = {"models": [{"path": "a.pt"}, {**report["models"][1], "speedup_verdict": "noisy machine",
                                           "latency": {"median_ms": 2.0, "noisy": True}}]}
    assert not any(r.passed for r in evaluate_gates([parse_gate("speedup>=1.0"), parse_gate("latency_ms<=100")], noisy))
