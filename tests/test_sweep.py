"""tncompress sweep: one CSV row per point, resumable, a real PNG plot; point parsing and errors."""
from __future__ import annotations

import csv
import json

import pytest
from conftest import assert_user_error, saved_state_dict
from PIL import Image

from tncompress.errors import TncompressError
from tncompress.recipe import parse_recipe
from tncompress.sweep import SweepPoint, parse_points, point_recipe

FAST = ["--limit-train", "300", "--limit-test", "200"]
RECIPE = ("version: 1\ncalibration: {batch_size: 16}\nbudget: {params_ratio: 0.5, candidates: 4}\n"
          "layers:\n  - {name: fc1, method: tt, in_modes: [4, 8, 8, 4], out_modes: [4, 8, 8, 4], rank: 8}\n"
          "  - {name: fc2, method: lowrank, rank: 8}\n  - {name: fc3, method: none}\n")


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def dense(tmp_path):
    return saved_state_dict(tmp_path, "mlp-1024", "mlp.pt")


def rows(folder):
    with open(folder / "sweep.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_one_row_per_point_resumes_and_plots(cli, tmp_path, dense, write_recipe):
    recipe, out = write_recipe(RECIPE), tmp_path / "sweep"
    res = cli("sweep", dense, "--arch", "mlp-1024", "-r", recipe, "--ranks", "1,2", "--budgets", "0.3",
              "-d", "synthetic", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    table = rows(out)
    assert [r["point"] for r in table] == ["r=1", "r=2", "params=0.3"]
    assert table[0]["ranks"] == "fc1: tt [1, 1, 1]; fc2: lowrank 1" and table[1]["ranks"].endswith("lowrank 2")
    assert int(table[0]["params"]) < int(table[1]["params"])
    assert abs(float(table[2]["params_ratio"]) / 0.3 - 1) <= 0.02
    for r in table:
        assert 0 <= float(r["top1"]) <= 100 and 0 < float(r["macs_ratio"]) and r["top5"]
    data = json.loads((out / "sweep.json").read_text())
    assert data["baseline"]["params"] == 2_109_450 and data["baseline"]["images"] == 200
    assert len(data["points"]) == 3 and data["settings"]["dataset"] == "synthetic"

    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with Image.open(png) as image:
        assert image.width >= 1000 and image.height >= 400

    # resume: done points are skipped, the new one is added
    res = cli("sweep", dense, "--arch", "mlp-1024", "-r", recipe, "--ranks", "1,2,4", "--budgets", "0.3",
              "-d", "synthetic", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("skipped") == 3 and "r=4: top-1" in res.stdout
    table2 = rows(out)
    assert [r["point"] for r in table2] == ["r=1", "r=2", "params=0.3", "r=4"]
    assert table2[:3] == table  # untouched

    # another recipe in the same folder is refused, not mixed in
    other = write_recipe(RECIPE.replace("batch_size: 16", "batch_size: 8"), "other.yaml")
    assert_user_error(cli("sweep", dense, "--arch", "mlp-1024", "-r", other, "--ranks", "1", "-d", "synthetic",
                          "-o", out, *FAST), "other settings", "recipe_sha")


def test_sweep_with_finetune_records_both_accuracies(cli, tmp_path, dense, write_recipe):
    out = tmp_path / "ft"
    res = cli("sweep", dense, "--arch", "mlp-1024", "-r", write_recipe(RECIPE), "--ranks", "2", "-d", "synthetic",
              "--finetune-epochs", "1", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    (row,) = rows(out)
    assert row["finetune_epochs"] == "1" and row["top1_decomposed"] and float(row["finetune_seconds"]) > 0


def test_sweep_calibration_size_is_used_recorded_and_checked(cli, tmp_path, dense, write_recipe):
    recipe, out = write_recipe(RECIPE), tmp_path / "calib"
    res = cli("sweep", dense, "--arch", "mlp-1024", "-r", recipe, "--ranks", "2", "-d", "synthetic",
              "--calibration-size", "24", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sweep.json").read_text())
    (point,) = data["points"]
    assert data["settings"]["calibration_size"] == 24 and point["calibration_images"] == 24
    assert point["calibration"].endswith("train, 24 images")
    # a resume with another calibration size is refused, not mixed in
    assert_user_error(cli("sweep", dense, "--arch", "mlp-1024", "-r", recipe, "--ranks", "2", "-d", "synthetic",
                          "--calibration-size", "32", "-o", out, *FAST), "other settings", "calibration_size")
    assert_user_error(cli("sweep", dense, "--arch", "mlp-1024", "-r", recipe, "--ranks", "2", "-d", "synthetic",
                          "--calibration", "noise", "--calibration-size", "8", "-o", tmp_path / "n", *FAST),
                      "--calibration-size needs --calibration data")


def test_points_parse_and_errors():
    assert [p.label for p in parse_points("1,4", "0.1,macs:0.5")] == ["r=1", "r=4", "params=0.1", "macs=0.5"]
    for ranks, budgets, needle in [(None, None, "give the points"), ("1,x", None, "positive integer"),
                                   (None, "1.5", "ratio in (0, 1]"), (None, "flops:0.5", "macs:"),
                                   ("2,2", None, "twice")]:
        with pytest.raises(TncompressError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            parse_points(ranks, budgets)


def test_point_recipe_sets_ranks_or_budget():
    rec = parse_recipe({"version": 1, "defaults": {"Linear": {"method": "lowrank", "rank": 8}},
                        "layers": [{"name": "fc3", "method": "none"}, {"name": "fc1", "method": "tt"}],
                        "budget": {"params_ratio": 0.5, "candidates": 4}})
    ranked = point_recipe(rec, SweepPoint("rank", 3))
    assert ranked.budget is None and ranked.defaults["Linear"]["rank"] == 3
    assert ranked.rules[1].settings["rank"] == 3 and "rank" not in ranked.rules[0].settings
    budgeted = point_recipe(rec, SweepPoint("macs", 0.4))
    assert budgeted.budget == {"candidates": 4, "macs_ratio": 0.4}
    with pytest.raises(TncompressError, match="no rule decomposes"):
        point_recipe(parse_recipe({"version": 1, "defaults": {"Linear": {"method": "none"}}}), SweepPoint("rank", 2))
    # a method alias is the method: `svd` is low-rank (was "no rule decomposes with a rank")
    aliased = point_recipe(parse_recipe({"version": 1, "defaults": {"Linear": {"method": "svd"}},
                                         "layers": [{"name": "conv1", "method": "tucker"}]}), SweepPoint("rank", 4))
    assert aliased.defaults["Linear"]["rank"] == 4 and aliased.rules[0].settings["rank"] == 4
