"""Build size / MACs / latency reports for one or more models and render them as a rich table,
JSON or Markdown. The first model is the baseline: ``*_ratio`` are model / baseline (≤ 1 when
smaller, as a recipe's ``budget: {params_ratio: 0.5}``), ``*_reduction`` and ``speedup`` are
baseline / model (the "×" factor, > 1 when smaller or faster)."""
from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress._version import __version__
from tncompress.checkpoint import LoadedModel
from tncompress.finetune import normalization_source
from tncompress.measure import (
    LATENCY_RULE,
    MAC_RULE,
    NOISY_IQR,
    compare_latency,
    count_macs,
    count_params,
    file_bytes,
    measure_latencies,
)
from tncompress.planner import example_batch
from tncompress.surgery import candidate_layers

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 1
AT_DECOMPOSE = "at decompose (before fine-tuning)"


@dataclass
class ReportOptions:
    input_shape: list[int]
    latency: bool = False
    latency_batch: int = 1
    device: str = "cpu"
    data: Any = None            # a tncompress.finetune.DataOptions: evaluate accuracy on its test split
    eval_batch_size: int = 256
    channels_last: bool = False  # measure latency with model and input in channels-last layout
    latency_seconds: float | None = None  # time budget of the interleaved timing; None: 10 s per model


def fine_tuned(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's metadata says it was trained after it was written by decompose
    (``finetune`` records a ``training`` mapping; decompose writes fresh metadata without one)."""
    return isinstance(meta.get("training"), dict)


def _layer_rows(loaded: LoadedModel, per_module: dict[str, int]) -> list[dict[str, Any]]:
    """Per-layer rows: the plan of a compressed checkpoint, else every Linear / Conv2d.

    The errors of a plan were measured at decompose time. They stay under ``*_at_decompose``; the
    plain ``weight_rel_error`` / ``output_rel_error`` hold them only while they still describe the
    weights, and are None after a fine-tune changed the weights."""
    rows = []
    plan = loaded.header.get("plan") or []
    current = not fine_tuned(loaded.header.get("metadata") or {})
    if plan:
        for entry in plan:
            weight, output = entry.get("weight_rel_error"), entry.get("output_rel_error")
            rows.append({
                "name": entry["name"], "type": entry["type"], "method": entry["method"],
                "ranks": entry.get("ranks"), "params_before": entry.get("params_before"),
                "params": entry.get("params_after"), "macs": per_module.get(entry["name"], 0),
                "weight_rel_error": weight if current else None,
                "output_rel_error": output if current else None,
                "weight_rel_error_at_decompose": weight, "output_rel_error_at_decompose": output,
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
    """Everything the report says about one model, except latency (timed for all models together
    by :func:`build_report`)."""
    model: nn.Module = loaded.model.to(options.device).eval()
    one = example_batch(model, options.input_shape, 1, 0)
    macs = count_macs(model, one)
    meta = loaded.header.get("metadata") or {}
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
    if loaded.header.get("plan"):
        entry["fine_tuned"] = fine_tuned(meta)
        entry["layer_errors"] = AT_DECOMPOSE if entry["fine_tuned"] else "current (measured at decompose)"
    if meta:
        entry["metadata"] = meta
    if options.data is not None:
        entry["accuracy"] = _accuracy(loaded, model, options)
    return entry


def _accuracy(loaded: LoadedModel, model: nn.Module, options: ReportOptions) -> dict[str, Any]:
    """Top-1 / top-5 on the test split, with what was scored: the split, how many of its images
    (a ``--limit-test`` run is flagged ``partial``) and where the normalisation came from."""
    from tncompress.finetune import test_loader
    from tncompress.train import evaluate

    data = options.data
    loader = test_loader(loaded, data, options.eval_batch_size, torch.device(options.device))
    metrics = evaluate(model, loader, torch.device(options.device))
    dataset = getattr(loader, "dataset", None)
    images = int(metrics["images"])
    available = int(getattr(dataset, "available", images))
    return {"dataset": data.name, "split": str(getattr(dataset, "split", "test")), "top1": metrics["top1"],
            "top5": metrics["top5"], "images": images, "split_images": available,
            "partial": images < available, "limit_test": data.limit_test,
            "normalization": normalization_source(loaded, data, dataset)}


def _time_models(models: Sequence[LoadedModel], entries: list[dict[str, Any]], options: ReportOptions) -> None:
    """Latency of every model of the report, timed together in interleaved rounds (so that a busy
    moment hits all of them alike), each with its speed-up against the baseline and its verdict."""
    nets, batches = [], []
    for loaded in models:
        model: nn.Module = loaded.model
        batch = example_batch(model, options.input_shape, options.latency_batch, 0)
        if options.channels_last and batch.dim() == 4:
            # Factorized convs are chains of small convs; oneDNN runs them (1×1 and depthwise
            # especially) much faster in NHWC. The report states the layout with the figure.
            model = model.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        nets.append(model)
        batches.append(batch)
    budget = options.latency_seconds if options.latency_seconds is not None else 10.0 * len(nets)
    stats = measure_latencies(nets, batches, max_seconds=budget)
    for entry, stat, batch in zip(entries, stats, batches):
        entry["latency"] = {**stat.to_dict(), "threads": torch.get_num_threads(), "batch": int(batch.shape[0]),
                            "layout": "channels_last" if options.channels_last and batch.dim() == 4 else "default",
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    base = entries[0]["latency"]
    for index, entry in enumerate(entries):
        if index == 0:
            verdict = "noisy machine" if stats[0].noisy() else "baseline"
            entry.update(speedup=1.0, speedup_low=None, speedup_high=None, speedup_significant=False,
                         speedup_verdict=verdict)
        else:
            entry.update(compare_latency(base, entry["latency"]))
    log.info("latency: %s", ", ".join(f"{e['path']} {e['latency']['median_ms']:.3f} ms ({e['speedup_verdict']})"
                                     for e in entries))


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


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


RATIO_RULE = ("params_ratio, macs_ratio and bytes_ratio are model / baseline (≤ 1 when smaller, as in a recipe "
              "budget); params_reduction, macs_reduction and bytes_reduction are baseline / model (the × factor, "
              "> 1 when smaller); speedup is baseline / model latency")


def build_report(models: Sequence[LoadedModel], options: ReportOptions) -> dict[str, Any]:
    """A JSON-ready report against the first model: ``*_ratio`` model / baseline, ``*_reduction``
    and ``speedup`` baseline / model (:data:`RATIO_RULE`)."""
    entries = [measure_model(m, options) for m in models]
    if options.latency:
        _time_models(models, entries, options)
    base = entries[0]
    for e in entries:
        for key, value in (("params", "params"), ("macs", "macs"), ("bytes", "bytes_on_disk")):
            e[f"{key}_ratio"] = _ratio(e[value], base[value])
            e[f"{key}_reduction"] = _ratio(base[value], e[value])
        e["params_reduction_pct"] = 100.0 * (1 - e["params"] / base["params"]) if base["params"] else None
        e["macs_reduction_pct"] = 100.0 * (1 - e["macs"] / base["macs"]) if base["macs"] else None
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
        "ratio_rule": RATIO_RULE,
        **({"latency_rule": LATENCY_RULE} if options.latency else {}),
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


def fmt_speedup(entry: dict[str, Any]) -> str:
    """The speed-up cell: "1.42× (±0.05)" when significant (± half the width of the interval
    [base p25 / model p75, base p75 / model p25]), else the verdict instead of a figure."""
    verdict = entry.get("speedup_verdict")
    speedup = entry.get("speedup")
    if verdict in (None, "faster", "slower") and speedup is not None:
        low, high = entry.get("speedup_low"), entry.get("speedup_high")
        spread = f" (±{(high - low) / 2:.2f})" if low is not None and high is not None else ""
        return f"{speedup:.2f}×{spread}"
    return verdict or "–"


def fmt_latency(latency: dict[str, Any] | None) -> str:
    """The latency cell: median and IQR, or "noisy machine" when the spread is too wide to quote."""
    if not latency:
        return "–"
    if latency.get("noisy"):
        return "noisy machine"
    iqr = latency.get("iqr_ms")
    return f"{latency['median_ms']:.2f} ms" + (f" (IQR {iqr:.2f})" if iqr is not None else "")


def accuracy_scope(accuracy: dict[str, Any], split: bool = True) -> str:
    """What a top-1 figure was scored on, e.g. "test, 50 of 10,000 images, partial"."""
    images, total = accuracy["images"], accuracy.get("split_images", accuracy["images"])
    count = f"{images:,} of {total:,} images, partial" if accuracy.get("partial") else f"{images:,} images"
    return f"{accuracy.get('split', 'test')}, {count}" if split else count


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "params", "size on disk", "MACs", "params reduction", "MACs reduction", "size reduction"]
    has_latency = any("latency" in m for m in report["models"])
    if has_latency:
        headers += ["latency (median)", "speed-up"]
    scored = [m["accuracy"] for m in report["models"] if "accuracy" in m]
    scopes = {accuracy_scope(a) for a in scored}
    if scored:
        scope = f" ({next(iter(scopes))})" if len(scopes) == 1 else ""
        headers += [f"top-1{scope}", "top-5", "Δ top-1"]
    rows = []
    for index, m in enumerate(report["models"]):
        row = [m["path"], f"{m['params']:,}", human(m["bytes_on_disk"], "B"), human(m["macs"]),
               _fmt_ratio(m.get("params_reduction")), _fmt_ratio(m.get("macs_reduction")),
               _fmt_ratio(m.get("bytes_reduction"))]
        if has_latency:  # the same order as the headers
            row += [fmt_latency(m.get("latency")), fmt_speedup(m) if "latency" in m else "–"]
        if scored:
            acc = m.get("accuracy")
            drop = m.get("top1_drop")
            top1 = f"{acc['top1']:.2f}%" if acc else "–"
            if acc and len(scopes) > 1:
                top1 += f" ({accuracy_scope(acc)})"
            row += [top1, f"{acc['top5']:.2f}%" if acc else "–",
                    "baseline" if index == 0 else "–" if drop is None else f"{-drop:+.2f}"]
        rows.append(row)
    return headers, rows


LAYER_HEADERS = ["layer", "method", "ranks", "params", "MACs", "weight err", "output err"]


def layer_headers(model_entry: dict[str, Any]) -> list[str]:
    """The per-layer table's headers; a fine-tuned model's errors are marked as from before it."""
    if not model_entry.get("fine_tuned"):
        return list(LAYER_HEADERS)
    return [*LAYER_HEADERS[:-2], f"weight err {AT_DECOMPOSE}", f"output err {AT_DECOMPOSE}"]


def layer_rows(model_entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in model_entry["layers"]:
        ranks = row["ranks"]
        weight = row.get("weight_rel_error_at_decompose", row.get("weight_rel_error"))
        output = row.get("output_rel_error_at_decompose", row.get("output_rel_error"))
        rows.append([row["name"], row["method"], "–" if ranks is None else str(ranks),
                     f"{row['params_before']:,} → {row['params']:,}" if row["params"] != row["params_before"]
                     else f"{row['params']:,}", human(row["macs"]), _fmt_err(weight), _fmt_err(output)])
    return rows


def report_notes(report: dict[str, Any]) -> list[str]:
    """Sentences that say what the figures are: the ratios, what accuracy was scored on and with
    which normalisation (and a partial evaluation, loudly), how latency was timed, and which
    models' layer errors predate their fine-tuning."""
    notes = ["Reductions (×) are baseline / model (> 1 when smaller; JSON `*_reduction`); the JSON's `*_ratio` are "
             "model / baseline (≤ 1 when smaller, as a recipe budget's `params_ratio`). The first row is the baseline."]
    models = report["models"]
    scored = [(m["path"], m["accuracy"]) for m in models if "accuracy" in m]
    if scored:
        first = scored[0][1]
        notes.append(f"Accuracy on the {first['dataset']} {first.get('split', 'test')} split "
                     f"({'; '.join(sorted({accuracy_scope(a, split=False) for _, a in scored}))}); Δ top-1 is in percentage "
                     "points against the baseline.")
        partial = [a for _, a in scored if a.get("partial")]
        if partial:
            a = partial[0]
            notes.append(f"PARTIAL EVALUATION: only {a['images']:,} of the {a['split_images']:,} {a.get('split', 'test')} "
                         f"images were scored (--limit-test {a.get('limit_test') or a['images']}); these are not "
                         "full-split accuracies.")
        sources = [(path, a["normalization"]["source"]) for path, a in scored if a.get("normalization")]
        if sources and len({text for _, text in sources}) == 1:
            notes.append(f"Normalisation: {sources[0][1]}.")
        elif sources:
            notes.append("Normalisation: " + "; ".join(f"{path}: {text}" for path, text in sources) + ".")
    if any("latency" in m for m in models):
        lat = next(m["latency"] for m in models if "latency" in m)
        counts = ", ".join(f"{m['latency']['measurements']}" for m in models if "latency" in m)
        notes.append(f"Latency at batch {lat['batch']}, {lat['threads']} threads, layout {lat['layout']}: "
                     f"{lat['rounds']} interleaved rounds, measurements per model {counts}"
                     f"{'' if lat.get('stable') else ' (time budget spent before the spread settled)'}; "
                     f"a speed-up is shown only when significant (IQRs do not overlap); 'noisy machine' means an "
                     f"IQR above {NOISY_IQR:.0%} of the median.")
    before = [m["path"] for m in models if m.get("fine_tuned")]
    if before:
        notes.append(f"Layer errors of {', '.join(before)} were measured {AT_DECOMPOSE}; they do not describe the "
                     "fine-tuned weights (JSON: `*_rel_error_at_decompose`).")
    return notes


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
             f"{report['machine']['threads']} threads.", ""]
    lines += table(*summary_rows(report))
    for note in report_notes(report):
        lines += ["", f"**{note}**" if note.startswith("PARTIAL") else note]
    lines += ["", f"_{report['mac_rule']}._"]
    if report.get("gates"):
        lines += ["", "## Gates", ""]
        lines += table(["gate", "model", "value", "result"],
                       [[g["expr"], g["model"], ("–" if g["value"] is None else f"{g['value']:.4g}")
                         + (f" ({g['note']})" if g.get("note") else ""),
                         "pass" if g["passed"] else "**FAIL**"] for g in report["gates"]])
    if layers:
        for m in report["models"][1:] if len(report["models"]) > 1 else report["models"]:
            lines += ["", f"## Layers of {m['path']}", ""]
            if m.get("fine_tuned"):
                lines += [f"Errors {AT_DECOMPOSE}: they do not describe the fine-tuned weights.", ""]
            lines += table(layer_headers(m), layer_rows(m))
    return "\n".join(lines) + "\n"
