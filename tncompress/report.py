"""Build size / MACs / latency reports for one or more models and render them as a rich table,
JSON or Markdown. The first model is the baseline that ratios are taken against."""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress._version import __version__
from tncompress.checkpoint import LoadedModel
from tncompress.measure import MAC_RULE, count_macs, count_params, file_bytes, measure_latency
from tncompress.planner import example_batch
from tncompress.surgery import candidate_layers

REPORT_SCHEMA_VERSION = 1


@dataclass
class ReportOptions:
    input_shape: list[int]
    latency: bool = False
    latency_batch: int = 1
    device: str = "cpu"
    data: Any = None            # a tncompress.finetune.DataOptions: evaluate accuracy on its test split
    eval_batch_size: int = 256
    channels_last: bool = False  # measure latency with model and input in channels-last layout


def _layer_rows(loaded: LoadedModel, per_module: dict[str, int]) -> list[dict[str, Any]]:
    """Per-layer rows: the plan of a compressed checkpoint, else every Linear / Conv2d."""
    rows = []
    plan = loaded.header.get("plan") or []
    if plan:
        for entry in plan:
            rows.append({
                "name": entry["name"], "type": entry["type"], "method": entry["method"],
                "ranks": entry.get("ranks"), "params_before": entry.get("params_before"),
                "params": entry.get("params_after"), "macs": per_module.get(entry["name"], 0),
                "weight_rel_error": entry.get("weight_rel_error"),
                "output_rel_error": entry.get("output_rel_error"),
                "note": entry.get("reason", ""),
            })
        return rows
    for name, module, _ in candidate_layers(loaded.model):
        rows.append({"name": name, "type": type(module).__name__, "method": "dense", "ranks": None,
                     "params_before": count_params(module), "params": count_params(module),
                     "macs": per_module.get(name, 0), "weight_rel_error": None, "output_rel_error": None,
                     "note": ""})
    return rows


def measure_model(loaded: LoadedModel, options: ReportOptions) -> dict[str, Any]:
    """Everything the report says about one model."""
    model: nn.Module = loaded.model.to(options.device).eval()
    one = example_batch(model, options.input_shape, 1, 0)
    macs = count_macs(model, one)
    entry: dict[str, Any] = {
        "path": loaded.path,
        "kind": loaded.kind,
        "arch": loaded.spec.arch if loaded.spec else None,
        "params": count_params(model),
        "bytes_on_disk": file_bytes(loaded.path),
        "sha256": _sha256(loaded.path),
        "macs": macs.total,
        "layers": _layer_rows(loaded, macs.per_module),
    }
    meta = loaded.header.get("metadata") or {}
    if meta:
        entry["metadata"] = meta
    if options.data is not None:
        from tncompress.finetune import test_loader
        from tncompress.train import evaluate

        loader = test_loader(loaded, options.data, options.eval_batch_size, torch.device(options.device))
        metrics = evaluate(model, loader, torch.device(options.device))
        entry["accuracy"] = {"dataset": options.data.name, "top1": metrics["top1"], "top5": metrics["top5"],
                             "images": metrics["images"]}
    if options.latency:
        batch = example_batch(model, options.input_shape, options.latency_batch, 0)
        if options.channels_last and batch.dim() == 4:
            # Factorized convs are chains of small convs; oneDNN runs them (1×1 and depthwise
            # especially) much faster in NHWC. The report states the layout with the figure.
            model = model.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        entry["latency"] = {**measure_latency(model, batch),
                            "layout": "channels_last" if options.channels_last and batch.dim() == 4 else "default",
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    return entry


REPORT_SEED = 0  # seed of the Gaussian input used for MACs and latency


def library_versions() -> dict[str, str | None]:
    """Versions of the tool and the libraries behind the numbers, for reproducible CI records."""
    from importlib import metadata

    versions: dict[str, str | None] = {"tncompress": __version__, "python": platform.python_version(),
                                       "torch": str(torch.__version__)}
    for dist in ("torchvision", "tensorly", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _sha256(path: str) -> str | None:
    from tncompress.checkpoint import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """What a compressed checkpoint records about how it was made (recipe hash, seeds, source hash)."""
    renamed = {"recipe_path": "recipe", "recipe_sha256": "recipe_sha256", "recipe_overrides": "recipe_overrides",
               "seed": "calibration_seed", "source_sha256": "decomposed_from_sha256",
               "model_output_error": "model_output_error"}
    out = {new: meta[old] for old, new in renamed.items() if old in meta}
    training = meta.get("training") or {}
    seed = (training.get("config") or {}).get("seed") if isinstance(training, dict) else None
    if seed is not None:
        out["training_seed"] = seed
    return out


def _ratio(base: float, value: float) -> float | None:
    return base / value if value else None


def build_report(models: Sequence[LoadedModel], options: ReportOptions) -> dict[str, Any]:
    """A JSON-ready report; ratios (baseline / model, so > 1 means smaller or faster) against the first."""
    entries = [measure_model(m, options) for m in models]
    base = entries[0]
    for e in entries:
        e["params_ratio"] = _ratio(base["params"], e["params"])
        e["macs_ratio"] = _ratio(base["macs"], e["macs"])
        e["bytes_ratio"] = _ratio(base["bytes_on_disk"], e["bytes_on_disk"])
        e["params_reduction_pct"] = 100.0 * (1 - e["params"] / base["params"]) if base["params"] else None
        e["macs_reduction_pct"] = 100.0 * (1 - e["macs"] / base["macs"]) if base["macs"] else None
        if "latency" in e and "latency" in base:
            e["speedup"] = _ratio(base["latency"]["median_ms"], e["latency"]["median_ms"])
        if "accuracy" in e and "accuracy" in base:
            e["top1_drop"] = base["accuracy"]["top1"] - e["accuracy"]["top1"]
            e["top5_drop"] = base["accuracy"]["top5"] - e["accuracy"]["top5"]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tncompress_version": __version__,
        "torch_version": str(torch.__version__),
        "versions": library_versions(),
        "seed": REPORT_SEED,
        "inputs": [{"path": e["path"], "sha256": e["sha256"], **_provenance(e.get("metadata") or {})} for e in entries],
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "threads": torch.get_num_threads(), "device": options.device},
        "input_shape": list(options.input_shape),
        "mac_rule": MAC_RULE,
        "params_rule": "parameters of the module (buffers such as batch-norm statistics not counted)",
        "models": entries,
    }


# --- rendering -----------------------------------------------------------------------------------

def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _fmt_err(e: float | None) -> str:
    return "–" if e is None else f"{e:.3g}"


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "params", "size on disk", "MACs", "params ×", "MACs ×", "size ×"]
    has_latency = any("latency" in m for m in report["models"])
    if has_latency:
        headers += ["latency", "speed-up"]
    has_accuracy = any("accuracy" in m for m in report["models"])
    if has_accuracy:
        headers += ["top-1", "top-5", "Δ top-1"]
    rows = []
    for index, m in enumerate(report["models"]):
        row = [m["path"], f"{m['params']:,}", human(m["bytes_on_disk"], "B"), human(m["macs"]),
               _fmt_ratio(m["params_ratio"]), _fmt_ratio(m["macs_ratio"]), _fmt_ratio(m["bytes_ratio"])]
        if has_accuracy:
            acc = m.get("accuracy")
            drop = m.get("top1_drop")
            row += [f"{acc['top1']:.2f}%" if acc else "–", f"{acc['top5']:.2f}%" if acc else "–",
                    "baseline" if index == 0 else "–" if drop is None else f"{-drop:+.2f}"]
        if has_latency:
            lat = m.get("latency")
            row += [f"{lat['median_ms']:.2f} ms" if lat else "–", _fmt_ratio(m.get("speedup"))]
        rows.append(row)
    return headers, rows


LAYER_HEADERS = ["layer", "method", "ranks", "params", "MACs", "weight err", "output err"]


def layer_rows(model_entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in model_entry["layers"]:
        ranks = row["ranks"]
        rows.append([row["name"], row["method"], "–" if ranks is None else str(ranks),
                     f"{row['params_before']:,} → {row['params']:,}" if row["params"] != row["params_before"]
                     else f"{row['params']:,}", human(row["macs"]), _fmt_err(row["weight_rel_error"]),
                     _fmt_err(row["output_rel_error"])])
    return rows


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)


def to_markdown(report: dict[str, Any], layers: bool = True) -> str:
    def table(headers: list[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return out

    lines = ["# tncompress report", "",
             f"Input shape {report['input_shape']}; tncompress {report['tncompress_version']}, "
             f"torch {report['torch_version']}, {report['machine']['device']}, "
             f"{report['machine']['threads']} threads. Ratios are baseline / model (the first row is the baseline).", ""]
    lines += table(*summary_rows(report))
    accuracy = next((m["accuracy"] for m in report["models"] if "accuracy" in m), None)
    if accuracy:
        lines += ["", f"Accuracy on the {accuracy['dataset']} test split ({accuracy['images']:,} images); "
                      "Δ top-1 is in percentage points against the baseline."]
    lines += ["", f"_{report['mac_rule']}._"]
    if report.get("gates"):
        lines += ["", "## Gates", ""]
        lines += table(["gate", "model", "value", "result"],
                       [[g["expr"], g["model"], "–" if g["value"] is None else f"{g['value']:.4g}",
                         "pass" if g["passed"] else "**FAIL**"] for g in report["gates"]])
    if layers:
        for m in report["models"][1:] if len(report["models"]) > 1 else report["models"]:
            lines += ["", f"## Layers of {m['path']}", ""]
            lines += table(LAYER_HEADERS, layer_rows(m))
    return "\n".join(lines) + "\n"
