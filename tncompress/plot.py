"""Plots of accuracy against compression (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tncompress.checkpoint import atomic_write

KIND_STYLE = {"rank": ("o", "tab:blue", "rank"), "params": ("s", "tab:green", "params_ratio budget"),
              "macs": ("^", "tab:purple", "macs_ratio budget")}


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def plot_sweep(results: dict[str, Any], path: str | Path, *, note: str | None = None) -> Path:
    """Two panels — top-1 against parameters and against MACs per sample (log scales) — one marker
    per sweep point (labelled with its point and compression), the dense baseline marked, written
    atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results.get("points", [])
    base = results["baseline"]
    dataset = results["settings"].get("dataset_title") or results["settings"].get("dataset", "")
    images = base.get("images")
    finetuned = any(p.get("finetune_epochs") for p in points)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for ax, key, xlabel in ((axes[0], "params", "parameters (count, log scale)"),
                            (axes[1], "macs", "MACs per sample (multiply-accumulates, log scale)")):
        for kind, (marker, color, name) in KIND_STYLE.items():
            group = sorted((p for p in points if p["kind"] == kind), key=lambda p: p[key])
            if not group:
                continue
            xs = [p[key] for p in group]
            if finetuned:
                pre = [p.get("top1_decomposed") for p in group]
                if all(v is not None for v in pre):
                    ax.plot(xs, pre, marker=marker, color=color, alpha=0.45, linestyle=":",
                            label=f"{name}: straight after decomposition")
            label = (f"{name}: after {group[0].get('finetune_epochs')} fine-tune epoch(s)" if finetuned
                     else f"{name}: after decomposition (no fine-tuning)")
            ax.plot(xs, [p["top1"] for p in group], marker=marker, color=color, label=label)
            for i, p in enumerate(group):  # staggered: neighbouring points often share a size
                ratio = p[f"{key}_ratio"]
                ax.annotate(f"{p['point']} ({1 / ratio:.3g}×)" if ratio > 0 else p["point"], (p[key], p["top1"]),
                            textcoords="offset points", xytext=(6, 4 - 11 * (i % 4)), fontsize=8)
        ax.axhline(base["top1"], color="black", linestyle="--", linewidth=1)
        ax.plot([base[key]], [base["top1"]], marker="*", markersize=14, color="black", linestyle="none",
                label=f"dense baseline: {base['top1']:.2f}%, {_human(base[key])} {'params' if key == 'params' else 'MACs'}")
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.08)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"top-1 accuracy on the {dataset} test set (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    title = f"{results['settings'].get('model', 'model')} with {results['settings'].get('recipe', 'recipe')}"
    sub = f"{dataset}, {images:,} test images" if images else dataset
    fig.suptitle(f"{title}: accuracy against size ({note or sub})", fontsize=11)
    fig.tight_layout()
    path = Path(path)

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)
    return path
