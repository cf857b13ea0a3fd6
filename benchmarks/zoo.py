"""Model zoo: every torchvision classification model, plus a tiny BERT and a tiny GPT-2, through the
whole pipeline (plan → decompose → save + load → TorchScript export) with two recipes, and a
full-rank exactness check of every layer kind that has an exact full-rank form.

    python benchmarks/zoo.py                                   # the default subset (about 20 models, every family)
    python benchmarks/zoo.py --models all                      # every torchvision classification model too
    python benchmarks/zoo.py --models resnet18,bert-tiny --out /tmp/zoo-dev --skip-export
    python benchmarks/zoo.py --fresh                           # forget the rows of an earlier run

Writes ``<out>.json`` and ``<out>.md`` (default docs/zoo) after every model, atomically. A run resumes:
(model, recipe) pairs already in ``<out>.json`` are kept unless ``--fresh``. Models have random
weights (``weights=None``: no downloads); the calibration batch is the library's own (Gaussian noise,
or random token ids for a model that starts with an embedding). A step that raises is recorded with
its one-line error and the run goes on. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from bench_common import machine_info
from torch import nn

from tncompress.apply import primary_output, rel_error
from tncompress.checkpoint import atomic_write, load_model, save_compressed
from tncompress.compress import decompose, make_plan
from tncompress.errors import TncompressError
from tncompress.export import export_model
from tncompress.measure import count_macs, count_params
from tncompress.models import ModelSpec, build_model
from tncompress.planner import LayerPlan, example_batch
from tncompress.recipe import Recipe, parse_recipe

RECIPES: dict[str, dict[str, Any]] = {
    "lowrank+tucker2": {"version": 1, "defaults": {"Linear": {"method": "lowrank", "rank": 0.5},
                                                   "Conv2d": {"method": "tucker2", "rank": 0.5}}},
    # CP's ALS sweeps are capped low (n_iter_max) so that the big models finish; the default is 100
    "tt+cp": {"version": 1, "defaults": {"Linear": {"method": "tt", "rank": 0.5},
                                         "Conv2d": {"method": "cp", "rank": 0.5, "n_iter_max": 10}}},
}
DEFAULT_MODELS = ["alexnet", "vgg11", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
                  "squeezenet1_0", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
                  "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny",
                  "vit_b_16", "swin_t", "maxvit_t", "bert-tiny", "gpt2-tiny"]
INPUT_SIZE = {"inception_v3": 299}   # torchvision models not meant for 224×224
TOKENS = 32                          # sequence length of the language models' input
TIME_LIMIT_S = 60.0                  # target: a torchvision decompose at 224×224 on 2 cores
EXACT_TOLERANCE = 1e-4               # target: full-rank output error of every layer kind
RELOAD_TOLERANCE = 1e-5              # a reloaded checkpoint must reproduce the compressed model
STEPS = ("plan", "decompose", "save_load", "export")
NOT_RUN = "not run (an earlier step failed)"
BIG_RANK = 1 << 20                   # clipped to the full rank by Tucker-2 and TT


# --- the models ------------------------------------------------------------------------------------

def bert_tiny() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=128))


def gpt2_tiny() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=2, n_positions=128))


HF_MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "bert-tiny": (bert_tiny, "BertModel(hidden 64, 2 layers, 2 heads, FFN 128, vocab 1,000)"),
    "gpt2-tiny": (gpt2_tiny, "GPT2LMHeadModel(n_embd 64, 2 layers, 2 heads, vocab 1,000; lm_head tied to wte)"),
}


@dataclass
class ZooModel:
    """One zoo entry: how to build it (seeded), its input shape and how a checkpoint rebuilds it."""

    name: str
    family: str                       # "torchvision" or "huggingface"
    input_shape: list[int]
    spec: ModelSpec | None            # None: the checkpoint is loaded onto a freshly built base model

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.spec is not None:
            return build_model(self.spec)
        return HF_MODELS[self.name][0]().eval()

    def known_params(self) -> int | None:
        """The parameter count without building the model, where torchvision's weight metadata has it."""
        if self.family != "torchvision":
            return None
        try:
            weights = list(torchvision.models.get_model_weights(self.name))
            return int(weights[0].meta["num_params"]) if weights else None
        except (KeyError, ValueError, IndexError):
            return None


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def zoo_model(name: str) -> ZooModel:
    if name in HF_MODELS:
        return ZooModel(name, "huggingface", [1, TOKENS], None)
    size = INPUT_SIZE.get(name, 224)
    shape = [1, 3, size, size]
    return ZooModel(name, "torchvision", shape, ModelSpec(f"torchvision:{name}", {}, [], shape))


def model_order() -> list[str]:
    """The order rows are listed in: the default subset, then every other model alphabetically."""
    return DEFAULT_MODELS + [n for n in torchvision_names() + list(HF_MODELS) if n not in DEFAULT_MODELS]


# --- helpers ---------------------------------------------------------------------------------------

def progress(message: str) -> None:
    print(f"zoo: {message}", file=sys.stderr, flush=True)


def error_record(exc: BaseException) -> dict[str, Any]:
    """The one-line error of a failed step, whether it is tncompress's own (a refusal with a
    message) or an internal error, and the innermost frame that raised it."""
    first = (str(exc).strip().splitlines() or [""])[0][:400]
    frames = traceback.extract_tb(exc.__traceback__)
    at = next((f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames)
               if "tncompress" in f.filename), None)
    last = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else None
    return {"line": f"{type(exc).__name__}: {first}" if first else type(exc).__name__,
            "type": type(exc).__name__, "tncompress_error": isinstance(exc, TncompressError),
            "at": at, "raised_at": last}


def shorten_reason(kind: str, reason: str, limit: int = 160) -> str:
    """A kept layer's reason with its numbers and layer names taken out, so equal reasons group."""
    text = re.sub(r"tied to \S+", "tied to another layer's", reason)
    text = re.sub(r"(?<![\w.-])\d[\d,.]*(?![\w-])", "N", text).replace("needs groups=N", "needs groups=1")
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return f"{kind}: {text}"


def claimed_params(params_before: int, plan: Sequence[LayerPlan]) -> int:
    """The CLI's rule: model params − Σ params_before + Σ params_after over the plan's entries."""
    return params_before - sum(p.params_before for p in plan) + sum(p.params_after for p in plan)


def max_layer_error(plan: Sequence[LayerPlan]) -> float | None:
    errors = [p.output_rel_error for p in plan if p.action == "decompose" and p.output_rel_error is not None]
    return max(errors) if errors else None


def output_diff(a: nn.Module, b: nn.Module, example: torch.Tensor) -> float:
    """Relative difference of two models' primary outputs on ``example`` (absolute for a zero output)."""
    with torch.no_grad():
        ref, got = primary_output(a(example)), primary_output(b(example))
    if ref is None or got is None:
        raise TncompressError("the model's output holds no tensor to compare")
    rel = rel_error(ref, got)
    return rel if rel is not None else float((ref.double() - got.double()).abs().max())


def macs_per_sample(model: nn.Module, example: torch.Tensor) -> int:
    return count_macs(model, example).total // int(example.shape[0])


def free() -> None:
    gc.collect()


# --- one (model, recipe) run -------------------------------------------------------------------------

def run_pair(entry: ZooModel, base: nn.Module, before: dict[str, int], recipe_name: str, recipe: Recipe,
             workdir: Path, skip_export: bool) -> dict[str, Any]:
    """Plan, decompose, save + load and export ``base`` with one recipe; every step's outcome."""
    shape = entry.input_shape
    row: dict[str, Any] = {"model": entry.name, "recipe": recipe_name, "family": entry.family, "status": "done",
                           "input_shape": shape, "date": time.strftime("%Y-%m-%d"), "torch": str(torch.__version__),
                           "params_before": before["params"], "macs_before": before["macs"],
                           "steps": dict.fromkeys(STEPS, NOT_RUN), "errors": {}}
    started = time.perf_counter()

    def failed(step: str, exc: BaseException) -> None:
        record = error_record(exc)
        row["steps"][step] = record["line"]
        row["errors"][step] = record
        progress(f"  {step} failed: {record['line'][:200]} [{record['at'] or record['raised_at']}]")

    t0 = time.perf_counter()
    try:
        make_plan(base, recipe, shape)
        row["steps"]["plan"] = "ok"
    except Exception as exc:  # every failure is recorded and the run goes on
        failed("plan", exc)
    row["plan_s"] = time.perf_counter() - t0
    if row["steps"]["plan"] != "ok":
        row["total_s"] = time.perf_counter() - started
        return row

    t0 = time.perf_counter()
    result = None
    try:
        result = decompose(base, recipe, input_shape=shape)
        row["steps"]["decompose"] = "ok"
    except Exception as exc:
        failed("decompose", exc)
    row["decompose_s"] = time.perf_counter() - t0
    row["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if result is None:
        row["total_s"] = time.perf_counter() - started
        return row
    plan = list(result.plan)
    kept = [p for p in plan if p.action != "decompose"]
    row.update({
        "layers_decomposed": len(plan) - len(kept), "layers_kept": len(kept),
        "methods": dict(Counter(f"{p.type} {p.method}" for p in plan if p.action == "decompose")),
        "kept_reasons": dict(Counter(shorten_reason(p.type, p.reason) for p in kept)),
        "params_plan": claimed_params(before["params"], plan),
        "model_output_error": result.model_output_error,
        "max_layer_output_error": max_layer_error(plan),
        "calibration": result.calibration.get("kind"),
        "fallbacks": sum(1 for p in plan if any("fell back" in n for n in p.notes)),
        "layers_s": sum(p.seconds or 0.0 for p in plan),
        "slowest_layers": [[p.name, p.method, p.seconds] for p in sorted(
            (p for p in plan if p.seconds is not None), key=lambda p: -(p.seconds or 0.0))[:3]],
    })
    compressed = result.model
    del result
    example = example_batch(compressed, shape)

    loaded = None
    t0 = time.perf_counter()
    path = workdir / f"{entry.name}.{recipe_name}.pt"
    try:
        save_compressed(path, compressed, spec=entry.spec, plan=[p.to_dict() for p in plan], recipe=recipe.raw,
                        metadata={"benchmark": "zoo"})
        row["checkpoint_bytes"] = path.stat().st_size
        base_model = None if entry.spec is not None else entry.build()
        loaded = load_model(path, base_model=base_model).model
        diff = output_diff(compressed, loaded, example)
        row["reload_diff"] = diff
        if not diff <= RELOAD_TOLERANCE:
            raise TncompressError(f"the reloaded model's output differs from the compressed model's by {diff:.3g} "
                                  f"(relative; tolerance {RELOAD_TOLERANCE:g})")
        row["steps"]["save_load"] = "ok"
    except Exception as exc:
        failed("save_load", exc)
        loaded = None
    finally:
        path.unlink(missing_ok=True)
    row["save_load_s"] = time.perf_counter() - t0

    measured = loaded if loaded is not None else compressed
    row["measured_on"] = "loaded checkpoint" if loaded is not None else "in-memory model (the round trip failed)"
    t0 = time.perf_counter()
    row["params_after"] = count_params(measured)
    try:
        row["macs_after"] = macs_per_sample(measured, example)
    except Exception as exc:  # a model that cannot be counted is still recorded
        row["macs_after"] = None
        row["macs_error"] = error_record(exc)["line"]
    row["measure_s"] = time.perf_counter() - t0
    row["larger_than_plan"] = row["params_after"] > row["params_plan"]
    del compressed
    free()

    if skip_export:
        row["steps"]["export"] = "skipped (--skip-export)"
    elif loaded is not None:
        t0 = time.perf_counter()
        try:
            out = export_model(loaded, example, workdir / f"{entry.name}.{recipe_name}.torchscript.pt", "torchscript")
            row["export_max_abs_diff"] = out.max_abs_diff
            out.path.unlink(missing_ok=True)
            row["steps"]["export"] = "ok"
        except Exception as exc:
            failed("export", exc)
        row["export_s"] = time.perf_counter() - t0
    del loaded
    free()
    row["total_s"] = time.perf_counter() - started
    return row


# --- full-rank exactness -------------------------------------------------------------------------------

@dataclass
class ExactCase:
    name: str
    build: Callable[[], nn.Module]
    input_shape: list[int]
    linear: str | None        # "lowrank" or "tt" at full rank, or None (Linears left dense)
    conv: str | None          # "tucker2" at full rank, or None
    note: str = ""


def tiny_vit() -> nn.Module:
    """A two-layer ViT for 64×64 inputs; its head (zero-initialised by torchvision, which would make the
    model output identically zero and its relative error undefined) gets random weights."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    head = model.heads.head
    nn.init.normal_(head.weight, std=0.02)
    nn.init.normal_(head.bias, std=0.02)
    return model.eval()


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory().eval()
    return build


EXACT_CASES = [
    ExactCase("resnet18", _seeded(lambda: torchvision.models.resnet18(weights=None)), [1, 3, 224, 224],
              "lowrank", "tucker2"),
    ExactCase("mobilenet_v3_small", _seeded(lambda: torchvision.models.mobilenet_v3_small(weights=None)),
              [1, 3, 224, 224], "lowrank", "tucker2", "depthwise convs stay dense (Tucker-2 needs groups=1)"),
    ExactCase("vit-tiny (64×64)", tiny_vit, [1, 3, 64, 64], "lowrank", "tucker2",
              "VisionTransformer(image_size=64, patch_size=16, 2 layers, 2 heads, hidden 32, MLP 64), attention "
              "projections included; head re-initialised N(0, 0.02)"),
    ExactCase("bert-tiny lowrank", _seeded(bert_tiny), [1, TOKENS], "lowrank", None),
    ExactCase("bert-tiny tt", _seeded(bert_tiny), [1, TOKENS], "tt", None),
    ExactCase("gpt2-tiny lowrank", _seeded(gpt2_tiny), [1, TOKENS], "lowrank", None),
    ExactCase("gpt2-tiny tt", _seeded(gpt2_tiny), [1, TOKENS], "tt", None),
]


def full_rank_recipe(model: nn.Module, shape: list[int], linear: str | None, conv: str | None) -> dict[str, Any]:
    """A recipe that factorizes every Linear / Conv2d at full rank (``allow_growth``: full rank is larger
    than dense by construction, which the planner otherwise refuses). Tucker-2 and TT clip an integer
    rank to the full rank of each mode or bond, so one large rank does; low-rank refuses a rank above
    min(in, out), so each Linear gets a ``name`` rule with its own min(in, out) (names from a probe plan,
    which already holds the attention projections of an unpacked nn.MultiheadAttention)."""
    data: dict[str, Any] = {"version": 1, "defaults": {}}
    if conv:
        data["defaults"]["Conv2d"] = {"method": conv, "rank": BIG_RANK, "allow_growth": True}
    if linear == "tt":
        data["defaults"]["Linear"] = {"method": "tt", "rank": BIG_RANK, "allow_growth": True}
    elif linear == "lowrank":
        probe = make_plan(model, parse_recipe({"version": 1, "defaults": {"Linear": {"method": "lowrank", "rank": 1}}},
                                              "probe"), shape)
        data["layers"] = [{"name": p.name, "method": "lowrank",
                           "rank": min(p.config["in_features"], p.config["out_features"]), "allow_growth": True}
                          for p in probe if p.type == "Linear" and p.action == "decompose"]
    return data


def run_exact(case: ExactCase, dtype: torch.dtype) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case.name, "dtype": str(dtype).removeprefix("torch."), "note": case.note,
                           "linear": case.linear, "conv": case.conv, "input_shape": case.input_shape,
                           "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    try:
        model = case.build().to(dtype)
        recipe = parse_recipe(full_rank_recipe(model, case.input_shape, case.linear, case.conv), f"full-rank {case.name}")
        result = decompose(model, recipe, input_shape=case.input_shape, allow_error=True)
    except Exception as exc:
        row["error"] = error_record(exc)
        row["decompose_s"] = time.perf_counter() - t0
        return row
    row["decompose_s"] = time.perf_counter() - t0
    kinds: dict[str, dict[str, Any]] = {}
    for p in result.plan:
        if p.action != "decompose":
            continue
        kind = kinds.setdefault(f"{p.type} {p.method}", {"layers": 0, "max_output_error": None, "undefined": 0,
                                                         "worst_layer": None})
        kind["layers"] += 1
        if p.output_rel_error is None:
            kind["undefined"] += 1
        elif kind["max_output_error"] is None or p.output_rel_error > kind["max_output_error"]:
            kind["max_output_error"], kind["worst_layer"] = p.output_rel_error, p.name
    row["kinds"] = kinds
    row["layers_kept"] = sum(1 for p in result.plan if p.action != "decompose")
    row["model_output_error"] = result.model_output_error
    del result, model
    free()
    return row


# --- Markdown --------------------------------------------------------------------------------------------

def _m(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.3g}"


def _g(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e9:.3g}"


def _e(x: float | None, defined: bool = True) -> str:
    if not defined:
        return "undefined"
    return "–" if x is None else f"{x:.3g}"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _step(value: str) -> str:
    if value == "ok":
        return "ok"
    if value.startswith("skipped"):
        return "skip"
    if value == NOT_RUN:
        return "–"
    return "**fail**"


def _verdict_row(target: str, measured: str, met: bool | None) -> str:
    verdict = "–" if met is None else ("met" if met else "**missed**")
    return f"| {target} | {measured} | {verdict} |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def failures(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
    return [(r, step, r["errors"][step]) for r in rows for step in STEPS if step in r.get("errors", {})]


def targets(rows: list[dict[str, Any]], exact: list[dict[str, Any]], prefix: str = "") -> list[str]:
    """The zoo's targets as Markdown table rows (target | measured | verdict), computed from the data."""
    done = [r for r in rows if r["status"] == "done"]
    out: list[str] = []

    def _row(target: str, measured: str, met: bool | None) -> str:
        return _verdict_row(prefix + target, measured, met)

    fails = failures(done)
    internal = sum(1 for _, _, e in fails if not e["tncompress_error"])
    failed_pairs = {(r["model"], r["recipe"]) for r, _, _ in fails}
    measured = (f"{len(fails)} failed step(s) in {len(failed_pairs)} of {len(done)} runs ({internal} internal "
                f"error(s), {len(fails) - internal} tncompress refusal(s); listed under Failures)" if fails
                else f"no failed step in {len(done)} runs" if done else "no run yet")
    out.append(_row("No model fails with a false error (every step of every (model, recipe) run: plan, "
                    "decompose, save + load, export)", measured, not fails if done else None))
    timed = [r for r in done if r["family"] == "torchvision" and r["input_shape"][-1] == 224
             and r["steps"]["decompose"] == "ok"]
    if timed:
        slow = max(timed, key=lambda r: r["decompose_s"])
        over = [r for r in timed if r["decompose_s"] >= TIME_LIMIT_S]
        out.append(_row(f"Every decompose of a torchvision model at 224×224 finishes in under {TIME_LIMIT_S:.0f} s "
                        "on 2 cores",
                        f"{len(timed) - len(over)} of {len(timed)} under; slowest {slow['decompose_s']:.1f} s "
                        f"({slow['model']}, {slow['recipe']})", not over))
    else:
        out.append(_row(f"Every decompose of a torchvision model at 224×224 finishes in under {TIME_LIMIT_S:.0f} s "
                        "on 2 cores", "no successful decompose yet", None))
    sized = [r for r in done if r.get("params_after") is not None]
    larger = [r for r in sized if r["larger_than_plan"]]
    out.append(_row("No compressed model is larger than its plan says",
                    f"{len(larger)} of {len(sized)} larger" + (": " + ", ".join(
                        f"{r['model']} {r['recipe']} (+{r['params_after'] - r['params_plan']:,})" for r in larger)
                        if larger else ""), not larger if sized else None))
    worst: dict[str, tuple[float, str]] = {}
    broken = [e for e in exact if "error" in e]
    undefined = []
    for e in exact:
        for kind, k in e.get("kinds", {}).items():
            if k["max_output_error"] is not None and (kind not in worst or k["max_output_error"] > worst[kind][0]):
                worst[kind] = (k["max_output_error"], f"{e['case']}, {e['dtype']}")
        if "error" not in e and e.get("model_output_error") is None:
            undefined.append(f"{e['case']} ({e['dtype']})")
    model_errs = [(e["model_output_error"], f"{e['case']}, {e['dtype']}") for e in exact
                  if e.get("model_output_error") is not None]
    if exact:
        parts = [f"{kind} {err:.2g} ({case})" for kind, (err, case) in sorted(worst.items())]
        if model_errs:
            err, case = max(model_errs)
            parts.append(f"model outputs ≤ {err:.2g} ({case})")
        parts += [f"{e['case']} ({e['dtype']}) failed" for e in broken] + [f"{c}: model error undefined" for c in undefined]
        met = (not broken and all(err <= EXACT_TOLERANCE for err, _ in worst.values())
               and all(err <= EXACT_TOLERANCE for err, _ in model_errs))
        out.append(_row(f"Full-rank output error ≤ {EXACT_TOLERANCE:g} for every layer kind (CP excluded: it has "
                        "no exact finite rank)", "; ".join(parts), met))
    else:
        out.append(_row(f"Full-rank output error ≤ {EXACT_TOLERANCE:g} for every layer kind", "not run", None))
    return out


def markdown(data: dict[str, Any]) -> str:
    info, rows, exact = data["info"], data["rows"], data.get("exact", [])
    cases = {c.name: i for i, c in enumerate(EXACT_CASES)}
    exact = sorted(exact, key=lambda e: (e["dtype"], cases.get(e["case"], len(cases))))
    order = {n: i for i, n in enumerate(model_order())}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["recipe"]))
    done = [r for r in rows if r["status"] == "done"]
    dates = sorted({r["date"] for r in rows} | {e["date"] for e in exact})
    loads = [r["load_average"] for r in done if r.get("load_average") is not None]
    busy = bool(loads) and max(loads) > (info.get("cores") or 1) + 0.5
    load_note = (f" (1-minute load average after each decompose: {min(loads):.1f} to {max(loads):.1f}"
                 + ("; above the core count, so other processes shared the cores and times may be inflated" if busy
                    else "") + ")" if loads else "")
    lines = [f"# Model zoo: every torchvision classifier, a tiny BERT and a tiny GPT-2 ({info['summary']})", "",
             f"Written by `python benchmarks/zoo.py` (`make bench ARGS=zoo`); rows measured "
             f"{dates[0] if dates else '–'}{f' to {dates[-1]}' if len(dates) > 1 else ''}, torch {info['torch']}, "
             f"torchvision {info['torchvision']}, transformers {info.get('transformers', '–')}.", "",
             "Each model is built with random weights (`weights=None`, `torch.manual_seed(0)`: no downloads) and "
             "run through the library's pipeline with each recipe: **plan** (`make_plan`), **decompose** "
             "(`tncompress.compress.decompose`, which plans again; its wall time is the *decompose s* column), "
             "**save + load** (`save_compressed`, then `load_model` rebuilding the base model from the recorded "
             "`torchvision:<name>` spec, or onto a freshly built model for the Hugging Face ones; the reloaded "
             f"model must reproduce the compressed one to {RELOAD_TOLERANCE:g} relative) and **export** "
             "(`export_model` to TorchScript, checked by the library at batch 1 and 3). A step that raises is "
             "recorded with its one-line error and the later steps are not run.", "",
             "Inputs: 3×224×224 (inception_v3: 3×299×299); the language models take "
             f"{TOKENS} token ids (`[1, {TOKENS}]`). Calibration is the library's default: 8 samples of Gaussian "
             "noise, or random token ids below the vocabulary size for a model whose first parameterised module "
             "is an embedding. Parameters (`count_params`) and MACs per sample (`count_macs` at batch 1) are "
             "measured on the whole **reloaded** model; *plan said* is the CLI's figure (model params − Σ "
             "params before + Σ params after over the plan). Output error: relative error of the model's output "
             "on the calibration batch (undefined where the dense model outputs zeros, e.g. torchvision ViTs' "
             "zero-initialised heads). Errors describe random weights, not trained ones.", "",
             "Recipes: " + "; ".join(f"**{name}** `{json.dumps(r['defaults'])}`" for name, r in RECIPES.items()) + ".",
             "", "## Targets", "", "| target | measured | verdict |", "|---|---|---|", *targets(rows, exact), "",
             "Every failed step counts against the first target: a *tncompress refusal* is the library's own one-line "
             "error (a `TncompressError`), an *internal error* any other exception. Times are wall seconds on "
             f"{info['cores']} cores{load_note}; the time target counts the torchvision models at 224×224 whose "
             "decompose succeeded.", ""]
    for recipe in RECIPES:
        mine = [r for r in rows if r["recipe"] == recipe]
        if not mine:
            continue
        lines += [f"## {recipe}", "",
                  "| model | params M before → after (measured) | plan said | MACs G before → after | "
                  "layers decomposed/kept | decompose s | output err | plan/decompose/load/export |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if r["status"] != "done":
                lines.append(f"| {r['model']} | skipped: {_cell(r.get('skip_reason', ''))} | | | | | | |")
                continue
            flag = " ⚠ larger than its plan says" if r.get("larger_than_plan") else ""
            where = "" if r.get("measured_on", "loaded checkpoint") == "loaded checkpoint" else " (in memory: no reload)"
            defined = r.get("model_output_error") is not None or r["steps"]["decompose"] != "ok"
            steps = "/".join(_step(r["steps"][s]) for s in STEPS)
            decomposed = (f"{r['layers_decomposed']}/{r['layers_kept']}" if "layers_decomposed" in r else "–")
            dec_s = _s(r.get("decompose_s"))
            lines.append(f"| {r['model']} | {_m(r['params_before'])} → {_m(r.get('params_after'))}{where} | "
                         f"{_m(r.get('params_plan'))}{flag} | {_g(r['macs_before'])} → {_g(r.get('macs_after'))} | "
                         f"{decomposed} | {dec_s} | {_e(r.get('model_output_error'), defined)} | {steps} |")
        lines.append("")
    fails = failures(done)
    lines += ["## Failures", ""]
    if fails:
        lines += ["| model | recipe | step | error | kind | raised in |", "|---|---|---|---|---|---|"]
        for r, step, e in fails:
            kind = "tncompress refusal" if e["tncompress_error"] else "internal error"
            lines.append(f"| {r['model']} | {r['recipe']} | {step} | {_cell(e['line'])} | {kind} | "
                         f"{_cell(e.get('at') or e.get('raised_at') or '–')} |")
    else:
        lines.append("None." if done else "No run yet.")
    lines.append("")
    skipped = [r for r in rows if r["status"] != "done"]
    if skipped:
        why = {r["model"]: r.get("skip_reason", "") for r in skipped}
        lines += ["Skipped: " + "; ".join(f"{m} ({reason})" for m, reason in sorted(why.items())) + ".", ""]
    reasons: dict[str, Counter[str]] = {}
    models: dict[str, dict[str, set[str]]] = {}
    for r in done:
        for reason, n in r.get("kept_reasons", {}).items():
            reasons.setdefault(r["recipe"], Counter())[reason] += n
            models.setdefault(r["recipe"], {}).setdefault(reason, set()).add(r["model"])
    lines += ["## Layers kept dense, and why", "",
              "Counted over every run of the recipe (numbers and layer names taken out of the reasons).", ""]
    for recipe, counter in reasons.items():
        lines += [f"**{recipe}**", "", "| layers | models | reason |", "|---|---|---|"]
        for reason, n in counter.most_common():
            names = sorted(models[recipe][reason])
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            lines.append(f"| {n} | {shown} | {_cell(reason)} |")
        lines.append("")
    if not reasons:
        lines += ["No run yet.", ""]
    lines += ["## Full-rank exactness", "",
              "Each case decomposes every Linear (low-rank at rank min(in, out) through one `name` rule per layer, or "
              "TT at a rank the planner clips to the full rank of every bond) and, where marked, every Conv2d "
              "(Tucker-2 at ranks clipped to the channel counts; a 1×1 conv is Tucker-2's low-rank special case) "
              "with random weights, on the default calibration batch. The per-kind figure is the largest relative "
              "output error of any layer of that kind; the model figure is the whole model's. CP is not checked: "
              "a CP rank that reproduces a kernel exactly is not known in general (the tensor rank is NP-hard to "
              "find and can exceed every matrix rank of the kernel), so there is no full-rank CP to test; the zoo's "
              "`tt+cp` runs show its fitted error instead.", "",
              "| case | dtype | layers by kind | max layer output error by kind | model output error | decompose s "
              "| ≤ 1e-4 |", "|---|---|---|---|---|---|---|"]
    for e in exact:
        if "error" in e:
            lines.append(f"| {e['case']} | {e['dtype']} | – | **failed**: {_cell(e['error']['line'])} | – | "
                         f"{_s(e['decompose_s'])} | **no** |")
            continue
        kinds = e["kinds"]
        counts = ", ".join(f"{k}: {v['layers']}" for k, v in kinds.items()) + f"; kept {e['layers_kept']}"
        errs = ", ".join(f"{k}: {_e(v['max_output_error'])}" + (f" ({v['undefined']} undefined)" if v["undefined"] else "")
                         for k, v in kinds.items())
        values = [v["max_output_error"] for v in kinds.values() if v["max_output_error"] is not None]
        values += [e["model_output_error"]] if e["model_output_error"] is not None else []
        ok = bool(values) and all(v <= EXACT_TOLERANCE for v in values) and e["model_output_error"] is not None
        lines.append(f"| {e['case']} | {e['dtype']} | {counts} | {errs} | "
                     f"{_e(e['model_output_error'], e['model_output_error'] is not None)} | {_s(e['decompose_s'])} | "
                     f"{'yes' if ok else '**no**'} |")
    if not exact:
        lines.append("| (not run) | | | | | | |")
    notes = list(dict.fromkeys(f"{e['case']}: {e['note']}" for e in exact if e.get("note")))
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------------

def write(out: Path, data: dict[str, Any]) -> None:
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))
    atomic_write(md_path, lambda tmp: tmp.write_text(markdown(data), encoding="utf-8"))


def pick_models(text: str) -> list[str]:
    everything = torchvision_names() + list(HF_MODELS)
    if text == "all":
        return everything
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in everything]
    if unknown:
        raise SystemExit(f"zoo.py: unknown model(s) {', '.join(unknown)}; choose from {', '.join(everything)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated names, or 'all' (default: a subset covering every family)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--out", type=Path, default=Path("docs/zoo"), help="writes <out>.json and <out>.md")
    parser.add_argument("--skip-export", action="store_true", help="do not export to TorchScript")
    parser.add_argument("--max-params", type=int, default=None, help="skip models with more parameters than this")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows of an earlier run in <out>.json")
    parser.add_argument("--skip-exactness", action="store_true", help="do not run the full-rank exactness check")
    parser.add_argument("--exact-dtypes", default="float32,float64",
                        help="dtypes of the full-rank exactness check, comma-separated (default float32,float64)")
    args = parser.parse_args(argv)
    names = pick_models(args.models)
    recipe_names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in recipe_names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    recipes = {n: parse_recipe(RECIPES[n], n) for n in recipe_names}
    dtypes = [d.strip() for d in args.exact_dtypes.split(",") if d.strip()]
    if any(d not in ("float32", "float64") for d in dtypes):
        parser.error(f"--exact-dtypes {args.exact_dtypes!r}: use float32 and/or float64")

    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    info = {**machine_info("cpu"), "torchvision": torchvision.__version__, "transformers": hf_version}
    json_path = args.out.with_name(args.out.name + ".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else {}
    rows: list[dict[str, Any]] = list(old.get("rows", []))  # skipped pairs are tried again when selected
    exact: list[dict[str, Any]] = list(old.get("exact", []))
    data = {"info": info, "rows": rows, "exact": exact}
    done = {(r["model"], r["recipe"]) for r in rows if r.get("status") == "done"}

    with tempfile.TemporaryDirectory(prefix="tncompress-zoo-") as tmp:
        workdir = Path(tmp)
        for i, name in enumerate(names, 1):
            todo = [n for n in recipe_names if (name, n) not in done]
            if not todo:
                progress(f"[{i}/{len(names)}] {name}: kept from {json_path}")
                continue
            entry = zoo_model(name)
            known = entry.known_params()
            if args.max_params is not None and known is not None and known > args.max_params:
                reason = f"{known:,} parameters > --max-params {args.max_params:,}"
                rows[:] = [r for r in rows if r["model"] != name or r["recipe"] not in todo]
                rows += [{"model": name, "recipe": n, "family": entry.family, "status": "skipped",
                          "skip_reason": reason, "input_shape": entry.input_shape, "date": time.strftime("%Y-%m-%d")}
                         for n in todo]
                progress(f"[{i}/{len(names)}] {name}: skipped ({reason})")
                write(args.out, data)
                continue
            t0 = time.perf_counter()
            base = entry.build()
            params = count_params(base)
            if args.max_params is not None and params > args.max_params:
                reason = f"{params:,} parameters > --max-params {args.max_params:,}"
                rows[:] = [r for r in rows if r["model"] != name or r["recipe"] not in todo]
                rows += [{"model": name, "recipe": n, "family": entry.family, "status": "skipped",
                          "skip_reason": reason, "input_shape": entry.input_shape, "date": time.strftime("%Y-%m-%d")}
                         for n in todo]
                progress(f"[{i}/{len(names)}] {name}: skipped ({reason})")
                del base
                free()
                write(args.out, data)
                continue
            before = {"params": params, "macs": macs_per_sample(base, example_batch(base, entry.input_shape))}
            progress(f"[{i}/{len(names)}] {name}: {params / 1e6:.2f} M params, {before['macs'] / 1e9:.3f} G MACs "
                     f"(built and counted in {time.perf_counter() - t0:.1f} s)")
            for recipe_name in todo:
                row = run_pair(entry, base, before, recipe_name, recipes[recipe_name], workdir, args.skip_export)
                rows[:] = [r for r in rows if (r["model"], r["recipe"]) != (name, recipe_name)]
                rows.append(row)
                steps = ", ".join(f"{s} {'ok' if row['steps'][s] == 'ok' else _step(row['steps'][s])}" for s in STEPS)
                sizes = (f"; params {_m(row['params_before'])} → {_m(row.get('params_after'))} M (plan "
                         f"{_m(row.get('params_plan'))}), output error "
                         f"{_e(row.get('model_output_error'), row.get('model_output_error') is not None)}"
                         if "params_after" in row else "")
                progress(f"  {recipe_name}: {steps}; decompose {row.get('decompose_s', math.nan):.1f} s, "
                         f"total {row['total_s']:.1f} s{sizes}")
                write(args.out, data)
            del base
            free()

    for dtype_name in [] if args.skip_exactness else dtypes:
        for case in EXACT_CASES:
            if any(e["case"] == case.name and e["dtype"] == dtype_name for e in exact):
                progress(f"exactness {case.name} ({dtype_name}): kept from {json_path}")
                continue
            progress(f"exactness {case.name} ({dtype_name}) …")
            row = run_exact(case, getattr(torch, dtype_name))
            exact[:] = [e for e in exact if (e["case"], e["dtype"]) != (case.name, dtype_name)]
            exact.append(row)
            summary = (row["error"]["line"] if "error" in row else
                       ", ".join(f"{k} {_e(v['max_output_error'])}" for k, v in row["kinds"].items())
                       + f"; model {_e(row['model_output_error'])}")
            progress(f"  {summary} ({row['decompose_s']:.1f} s)")
            write(args.out, data)
    write(args.out, data)
    progress(f"wrote {json_path} and {args.out.with_name(args.out.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
