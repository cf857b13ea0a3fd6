"""Sweep a recipe over ranks or budgets: for each point decompose → (optionally fine-tune) →
evaluate, and keep the results as CSV and JSON (plus a PNG plot) in one folder, resumable: points
already in its ``sweep.json`` are skipped."""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tncompress.budget import BUDGET_METHODS
from tncompress.checkpoint import LoadedModel, atomic_write
from tncompress.errors import TncompressError
from tncompress.finetune import DataOptions, check_classes, input_geometry, normalization, test_loader
from tncompress.recipe import Recipe, apply_overrides, default_recipe, load_recipe, parse_recipe

log = logging.getLogger(__name__)

CSV_FIELDS = ["point", "kind", "value", "params", "params_ratio", "macs", "macs_ratio", "top1", "top5", "loss",
              "top1_decomposed", "finetune_epochs", "model_output_error", "ranks", "decompose_seconds",
              "finetune_seconds", "eval_seconds"]
Event = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class SweepPoint:
    """One point: a rank for every decomposed layer, or a whole-model budget."""

    kind: str        # "rank", "params" or "macs"
    value: float

    @property
    def label(self) -> str:
        return f"r={int(self.value)}" if self.kind == "rank" else f"{self.kind}={self.value:g}"


@dataclass
class SweepOptions:
    """How each point is evaluated (and fine-tuned)."""

    data: DataOptions
    finetune_epochs: int = 0
    lr: float = 0.01
    kd_weight: float = 0.7          # distillation from the dense model during the fine-tune
    batch_size: int = 128
    eval_batch_size: int = 1000
    device: str = "auto"
    seed: int = 0
    calibration: str = "data"       # "data": training images; "noise": the recipe's Gaussian batch
    calibration_size: int | None = None  # training images for "data" (None: the recipe's calibration.batch_size)


def parse_points(ranks: str | None, budgets: str | None) -> list[SweepPoint]:
    """``--ranks 1,2,4,8`` and ``--budgets 0.5,0.2,macs:0.5`` (a bare number is a params_ratio)."""
    points: list[SweepPoint] = []
    for item in [s.strip() for s in (ranks or "").split(",") if s.strip()]:
        if not item.isdigit() or int(item) < 1:
            raise TncompressError(f"--ranks {ranks!r}: {item!r} is not a positive integer")
        points.append(SweepPoint("rank", int(item)))
    for item in [s.strip() for s in (budgets or "").split(",") if s.strip()]:
        kind, _, raw = item.rpartition(":")
        kind = kind or "params"
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if kind not in ("params", "macs") or not 0 < value <= 1:
            raise TncompressError(f"--budgets {budgets!r}: {item!r} should be a ratio in (0, 1], optionally "
                                  "prefixed params: or macs: (e.g. 0.1 or macs:0.5)")
        points.append(SweepPoint(kind, value))
    if not points:
        raise TncompressError("give the points to sweep: --ranks 1,2,4,8 and/or --budgets 0.5,0.2,0.1")
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        raise TncompressError(f"a point is given twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    return points


def point_recipe(recipe: Recipe, point: SweepPoint) -> Recipe:
    """The recipe for one point: the rank set on every rule that decomposes with a rank (budget
    removed), or the budget set to the point's ratio."""
    data = copy.deepcopy(recipe.raw)
    if point.kind != "rank":
        budget = {k: v for k, v in (data.get("budget") or {}).items() if k not in ("params_ratio", "macs_ratio")}
        data["budget"] = {**budget, f"{point.kind}_ratio": point.value}
        return parse_recipe(data, source=recipe.source)
    data.pop("budget", None)
    overrides = []
    for type_name, settings in (data.get("defaults") or {}).items():
        if isinstance(settings, dict) and _canonical(settings.get("method")) in BUDGET_METHODS:
            overrides.append(f"defaults.{type_name}.rank={int(point.value)}")
    for i, rule in enumerate(data.get("layers") or []):
        if isinstance(rule, dict) and (_canonical(rule.get("method")) in BUDGET_METHODS
                                       or ("method" not in rule and "rank" in rule)):
            overrides.append(f"layers.{i}.rank={int(point.value)}")
    if not overrides:
        raise TncompressError(f"{recipe.source}: no rule decomposes with a rank (tt, lowrank, cp, tucker2), so "
                              "--ranks has nothing to set; use --budgets")
    return parse_recipe(apply_overrides(data, overrides, source="--ranks"), source=recipe.source)


def _canonical(method: Any) -> Any:
    """A recipe's method name with aliases resolved (``svd`` → ``lowrank``), as the recipe parser does."""
    from tncompress.methods import resolve_name

    return resolve_name(method) if isinstance(method, str) else method


def _recipe_hash(recipe: Recipe) -> str:
    text = json.dumps(recipe.raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The settings a finished point's numbers depend on: a sweep resumed in the same folder reuses its
# points only when every one of them is unchanged (the recipe's hash covers its --set overrides; the
# model's hash, the dense model that is also the fine-tune's teacher). The device is left out: it
# changes results only by floating-point rounding.
REUSE_KEYS = ("model_path", "model_sha256", "recipe_sha", "dataset", "mean", "std", "augment", "limit_test",
              "limit_train", "input_shape", "calibration", "calibration_size", "seed", "finetune_epochs", "lr",
              "batch_size", "kd_weight")


def _model_hash(loaded: LoadedModel) -> str | None:
    """SHA-256 of the model's file (None for a model that has none): a retrained file at the same
    path must not reuse the points of the old one."""
    from tncompress.models import file_sha256

    path = Path(loaded.path) if loaded.path else None
    return file_sha256(path) if path is not None and path.is_file() else None


def _data_settings(loaded: LoadedModel, options: SweepOptions) -> dict[str, Any]:
    """The normalisation actually applied (given, else recorded with the model) and augmentation."""
    norm = normalization(loaded, options.data)
    return {"mean": norm.get("mean"), "std": norm.get("std"), "augment": options.data.augment}


def _finetune_settings(options: SweepOptions) -> dict[str, Any]:
    """Fine-tune settings; None without a fine-tune, where they change nothing (so they do not
    block reusing points)."""
    tuned = options.finetune_epochs > 0
    return {"lr": options.lr if tuned else None, "batch_size": options.batch_size if tuned else None,
            "kd_weight": options.kd_weight if tuned else None}


def _changed_settings(previous: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """``"lr 0.01 → 0.1"`` for every reuse key whose value differs from the previous run's (compared
    as JSON, as they are stored); a key the previous run did not record counts as changed."""
    now = json.loads(json.dumps(settings, default=str))
    changed = []
    for key in REUSE_KEYS:
        if key not in previous:
            changed.append(f"{key} not recorded by the earlier run")
        elif previous[key] != now[key]:
            changed.append(f"{key} {previous[key]} → {now[key]}")
    return changed


def calibration_from_dataset(loaded: LoadedModel, data: DataOptions, count: int, seed: int) -> torch.Tensor:
    """``count`` training images shaped and normalised for ``loaded``'s model: real data for the
    decomposition's calibration and a budget's sensitivity scan (see :mod:`tncompress.calibration`)."""
    from tncompress.calibration import calibration_images

    return calibration_images(loaded, data, count, seed).images


def _write_results(out_dir: Path, results: dict[str, Any], note: str | None, plot: bool = True) -> None:
    """sweep.json and sweep.csv (after every point, so an interrupted sweep loses at most one),
    and the plot (at the end: it takes about a second)."""
    from tncompress.plot import plot_sweep

    text = json.dumps(results, indent=2, default=str) + "\n"
    atomic_write(out_dir / "sweep.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in results["points"]:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    atomic_write(out_dir / "sweep.csv", lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))
    if plot:
        plot_sweep(results, out_dir / "sweep.png", note=note)


def _ranks_summary(plan: Sequence[Any]) -> str:
    return "; ".join(f"{p.name}: {p.method} {p.ranks}" for p in plan if p.action == "decompose")


def run_sweep(loaded: LoadedModel, recipe_path: str | Path | None, points: Sequence[SweepPoint], out_dir: str | Path,
              options: SweepOptions, *, overrides: Sequence[str] = (), input_shape: Sequence[int] | None = None,
              note: str | None = None, on_event: Event | None = None) -> dict[str, Any]:
    """Run every point not already in ``out_dir/sweep.json``; returns the results (also written)."""
    from tncompress.compress import decompose
    from tncompress.data import dataset_info
    from tncompress.measure import count_macs, count_params
    from tncompress.planner import calibration_settings
    from tncompress.train import evaluate

    emit = on_event or (lambda event, payload: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TncompressError(f"-o {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(recipe_path, overrides) if recipe_path is not None else default_recipe(overrides)
    recipes = {p.label: point_recipe(recipe, p) for p in points}  # every point's recipe is valid before any work
    model = loaded.model.eval()
    shape = list(input_shape) if input_shape else None
    channels, size = input_geometry(loaded, options.data)
    loader = test_loader(loaded, options.data, options.eval_batch_size)
    example = next(iter(loader))[0][:1]
    shape = shape or [1, *example.shape[1:]]
    check_classes(model, loaded, options.data.name, example)
    settings = {"model": Path(loaded.path).name if loaded.path else "model", "model_path": str(loaded.path),
                "model_sha256": _model_hash(loaded),
                "recipe": Path(recipe_path).name if recipe_path is not None else recipe.source,
                "recipe_path": str(recipe_path) if recipe_path is not None else None, "recipe_sha": _recipe_hash(recipe),
                "recipe_overrides": list(overrides),
                "dataset": options.data.name, "dataset_title": dataset_info(options.data.name).title,
                "limit_test": options.data.limit_test,
                "limit_train": options.data.limit_train, "finetune_epochs": options.finetune_epochs,
                "calibration": options.calibration, "calibration_size": options.calibration_size,
                "input_shape": shape, "seed": options.seed, **_data_settings(loaded, options),
                **_finetune_settings(options)}
    results: dict[str, Any] = {"schema_version": 1, "settings": settings, "baseline": None, "points": []}
    existing = out_dir / "sweep.json"
    if existing.exists():
        try:
            previous = json.loads(existing.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TncompressError(f"{existing}: cannot read the previous results ({exc}); move it away to start afresh") from None
        differs = _changed_settings(previous.get("settings") or {}, settings)
        if differs:
            raise TncompressError(f"{existing} holds a sweep with other settings ({'; '.join(differs)}), so its "
                                  "finished points cannot be reused; use another -o folder (or move it away)")
        results["baseline"], results["points"] = previous.get("baseline"), list(previous.get("points") or [])

    from tncompress.planner import example_batch

    x = example_batch(model, shape)
    base_params, base_macs = count_params(model), count_macs(model, x).total
    if results["baseline"] is None:
        metrics = evaluate(model, loader)
        results["baseline"] = {"params": base_params, "macs": base_macs, "top1": metrics["top1"],
                               "top5": metrics["top5"], "loss": metrics["loss"], "images": metrics["images"]}
    emit("baseline", results["baseline"])

    calibration, source = None, None
    if options.calibration == "data":
        calib = calibration_settings(recipe)
        count = options.calibration_size or calib["batch_size"]
        calibration = calibration_from_dataset(loaded, options.data, count, calib["seed"])
        calibration = calibration.to(dtype=x.dtype)
        source = f"{dataset_info(options.data.name).title} train, {calibration.shape[0]:,} images"
    done = {row["point"] for row in results["points"]}
    for point in points:
        if point.label in done:
            emit("skip", {"point": point.label})
            continue
        emit("start", {"point": point.label})
        started = time.perf_counter()
        result = decompose(model, recipes[point.label], input_shape=shape, calibration_input=calibration,
                           calibration_source=source, allow_error=True)
        small = result.model
        row: dict[str, Any] = {"point": point.label, "kind": point.kind, "value": point.value,
                               "decompose_seconds": round(time.perf_counter() - started, 3),
                               "model_output_error": result.calibration.get("model_output_error"),
                               "calibration": result.calibration.get("kind"),
                               "calibration_images": result.calibration.get("samples"),
                               "ranks": _ranks_summary(result.plan), "finetune_epochs": options.finetune_epochs}
        if result.budget:
            row["budget_achieved_ratio"] = result.budget["achieved_ratio"]
        if options.finetune_epochs:
            row["top1_decomposed"] = evaluate(small, loader)["top1"]
            row["finetune_seconds"] = round(_finetune(small, model, loaded, options, loader, size, channels), 3)
        started = time.perf_counter()
        metrics = evaluate(small, loader)
        row["eval_seconds"] = round(time.perf_counter() - started, 3)
        params, macs = count_params(small), count_macs(small.eval(), x).total
        row.update({"params": params, "params_ratio": params / base_params, "macs": macs,
                    "macs_ratio": macs / base_macs, "top1": metrics["top1"], "top5": metrics["top5"],
                    "loss": metrics["loss"]})
        results["points"].append(row)
        _write_results(out_dir, results, note, plot=False)
        emit("done", row)
    _write_results(out_dir, results, note)
    return results


def _finetune(small: torch.nn.Module, teacher: torch.nn.Module, loaded: LoadedModel, options: SweepOptions,
              loader: Any, size: int | None, channels: int | None) -> float:
    """A short fine-tune of one point with distillation from the dense model; returns seconds."""
    from tncompress.data import load_dataset, make_loader
    from tncompress.train import TrainConfig, train

    data = options.data
    train_set = load_dataset(data.name, "train", data_dir=data.data_dir, image_size=size, channels=channels,
                             augment=data.augment, download=data.download, limit=data.limit_train,
                             **normalization(loaded, data))
    config = TrainConfig(epochs=options.finetune_epochs, batch_size=options.batch_size, lr=options.lr,
                         kd_weight=options.kd_weight, device=options.device, seed=options.seed)
    started = time.perf_counter()
    train(small, lambda epoch: make_loader(train_set, options.batch_size, shuffle=True, seed=options.seed, epoch=epoch),
          loader, config, teacher=teacher)
    small.to("cpu").eval()
    teacher.to("cpu")
    return time.perf_counter() - started
