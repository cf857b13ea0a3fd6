"""Terminal rendering of a plan (tables, notes, totals, the budget's outcome) and its JSON form."""
from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from tncompress.cli.common import console


def plan_table(plan, title: str) -> Table:
    """The plan as a rich table; ``title`` and every cell are plain text (escaped, not markup)."""
    from tncompress.report import human

    table = Table(title=escape(title), title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("rule", overflow="fold")
    table.add_column("method / ranks", overflow="fold")
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("MACs", justify="right", no_wrap=True)
    table.add_column("weight err", justify="right")
    table.add_column("output err", justify="right")
    for p in plan:
        if p.action == "keep":
            table.add_row(escape(p.name), escape(p.decided_by or "–"), escape(f"dense: {p.reason}"), f"{p.params_before:,}",
                          human(p.macs_before), "–", "–", style="dim")
            continue
        table.add_row(escape(p.name), escape(p.decided_by or "–"), escape(p.reason or f"{p.method} {p.ranks}"),
                      f"{p.params_before:,} → {p.params_after:,}", f"{human(p.macs_before)} → {human(p.macs_after)}",
                      fmt(p.weight_rel_error), fmt(p.output_rel_error))
    return table


def print_notes(plan) -> None:
    for p in plan:
        for note in p.notes:
            console.print(f"[dim]{escape(p.name)}:[/] {escape(note)}", highlight=False)


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def totals_line(plan, model_params_before: int, model_params_after: int | None = None) -> str:
    """The plan's totals; ``model_params_after`` is the written model's count where it exists (the
    plan's own arithmetic otherwise)."""
    before = sum(p.params_before for p in plan)
    after = sum(p.params_after for p in plan)
    macs_b = sum(p.macs_before for p in plan)
    macs_a = sum(p.macs_after for p in plan)
    n = sum(p.action == "decompose" for p in plan)
    total_after = model_params_before - before + after if model_params_after is None else model_params_after
    params_change = 100 * (total_after / model_params_before - 1) if model_params_before else 0.0
    macs_change = 100 * (macs_a / macs_b - 1) if macs_b else 0.0
    return (f"{n} of {len(plan)} layers factorized; model params {model_params_before:,} → {total_after:,} "
            f"({params_change:+.1f}%); MACs per sample of the planned layers {macs_b:,} → {macs_a:,} "
            f"({macs_change:+.1f}%)")


_SENSITIVITY = {"model": "squared relative model-output error", "kl": "KL divergence from the dense model's predictions",
                "layer": "squared relative layer-output error"}


def print_budget(summary: dict[str, Any] | None) -> None:
    """The recipe budget's outcome: target against achieved, and what the allocation gained."""
    if not summary:
        return
    unit = "params" if summary["metric"] == "params" else "MACs"
    console.print(escape(f"budget {summary['metric']}_ratio {summary['target_ratio']:g}: achieved "
                  f"{summary['achieved_ratio']:.4f} ({summary['achieved']:,} of {summary['total']:,} {unit}, whole model); "
                  f"ranks by measured sensitivity (a rank in the recipe is ignored; Δ = "
                  f"{_SENSITIVITY[summary['sensitivity']]} with only that layer replaced), then a local search from "
                  f"the best of greedy / uniform fractions / uniform ranks (started from {summary['start']}: "
                  f"{summary['refine_moves']} moves, {summary['refine_evaluations']} evaluations); all layers together, "
                  f"{summary['selection_measure']}: {summary['combined']:.4g} against greedy "
                  f"{summary['greedy_combined']:.4g}, uniform fractions {summary['uniform_combined']:.4g}, uniform ranks "
                  f"{summary['uniform_ranks_combined']:.4g}; model output error {summary['model_output_error']:.3g}; "
                  f"scan {summary['scan_seconds']:.1f} s ({summary['measured']} of {summary['candidates']} candidate "
                  f"ranks measured over {summary['layers']} layers, {summary['calibration_samples']} calibration samples"
                  f"{_scan_note(summary)})"),
                  highlight=False)


def plan_json(plan, extra: dict[str, Any]) -> str:
    return json.dumps({**extra, "layers": [p.to_dict() for p in plan]}, indent=2, default=str)


def _scan_note(summary: dict) -> str:
    """', the scan on the first N' when the per-layer scan used fewer samples than the selection."""
    scanned = summary.get("scan_samples")
    return f", the per-layer scan on the first {scanned}" if scanned and scanned != summary["calibration_samples"] else ""
