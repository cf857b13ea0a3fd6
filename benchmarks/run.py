"""make bench: run the benchmark suite (or the parts named), then write docs/benchmarks.md — the
issue's targets checked against the figures just measured, followed by every part's tables.

    python benchmarks/run.py                 # all parts
    python benchmarks/run.py layers convs    # a subset; benchmarks.md is rebuilt from whatever JSON exists
    python benchmarks/run.py --report        # only rebuild docs/benchmarks.md
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tncompress.checkpoint import atomic_write

HERE = Path(__file__).parent
DOCS = HERE.parent / "docs"
PARTS = {
    "layers": [sys.executable, str(HERE / "layer_speed.py"), "--device", "cpu", "--out", "docs/layer-speed-cpu"],
    "convs": [sys.executable, str(HERE / "conv_speed.py"), "--device", "cpu", "--out", "docs/conv-speed-cpu"],
    "recipes": [sys.executable, str(HERE / "recipes.py"), "--out", "docs/results"],
    "decompose": [sys.executable, str(HERE / "decompose_time.py"), "--out", "docs/decompose-time"],
    # needs MNIST under $TNCOMPRESS_DATA (the Makefile points it at ../shared/data); about 25 minutes
    "mnist": [sys.executable, str(HERE / "mnist_tt.py"), "--augment", "--epochs-ft", "20", "--lr-ft", "0.02",
              "--out", "docs/mnist-tt"],
    # needs MNIST under $TNCOMPRESS_DATA; about 3 minutes
    "aware": [sys.executable, str(HERE / "mnist_data_aware.py"), "--out", "docs/mnist-data-aware"],
    # needs MNIST under $TNCOMPRESS_DATA; uniform fractions against budgets on the tutorial CNN; about 3 minutes
    "cnn-budget": [sys.executable, str(HERE / "mnist_cnn_budget.py"), "--out", "docs/mnist-cnn-budget"],
    # needs ../shared (the published ResNets and the CIFAR-10 JPEG copy); about 25 (ResNet-20) + 40 (ResNet-32) minutes
    "real": [sys.executable, str(HERE / "real_models.py"), "--out", "docs/real-models", "--finetune-epochs", "1",
             "--finetune-images", "10000"],
    # needs ../shared; the tool's training loop against a plain loop, per OpenMP policy; about 15 minutes
    "train": [sys.executable, str(HERE / "train_speed.py"), "--out", "docs/train-speed"],
    # every torchvision classifier of the default subset plus a tiny BERT and GPT-2, two recipes each, and
    # the full-rank exactness check; resumes from docs/zoo.json (pass --fresh to zoo.py to start over)
    "zoo": [sys.executable, str(HERE / "zoo.py"), "--out", "docs/zoo"],
}
# Part → the Markdown file it writes (embedded in benchmarks.md in this order).
SECTIONS = [("layers", "layer-speed-cpu.md"), ("layers", "layer-speed-cuda.md"), ("convs", "conv-speed-cpu.md"),
            ("convs", "conv-speed-cuda.md"), ("recipes", "results.md"), ("decompose", "decompose-time.md"),
            ("mnist", "mnist-tt.md"), ("aware", "mnist-data-aware.md"), ("cnn-budget", "mnist-cnn-budget.md"),
            ("real", "real-models.md"), ("train", "train-speed.md"), ("zoo", "zoo.md")]


# Latency parts run with OpenMP's default wait policy, as a deployed model does; the Makefile's
# OMP_WAIT_POLICY=PASSIVE (robust for decomposition and training on shared machines) would add the
# cost of waking sleeping threads to every small op. Each table states the policy it ran under.
LATENCY_PARTS = {"layers", "convs", "recipes"}


def part_env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    if name in LATENCY_PARTS and env.get("OMP_WAIT_POLICY") == "PASSIVE" and not env.get("TNCOMPRESS_BENCH_KEEP_OMP"):
        del env["OMP_WAIT_POLICY"]
    return env


def _load(name: str) -> dict | None:
    path = DOCS / name
    return json.loads(path.read_text()) if path.exists() else None


def _row(target: str, measured: str, met: bool | None) -> str:
    verdict = "–" if met is None else ("met" if met else "**missed**")
    return f"| {target} | {measured} | {verdict} |"


def tt_targets(data: dict) -> list[str]:
    rows = {(r["layer"], r["rank"], r["batch"]): r for r in data["linear"]}
    gemm = data["info"]["gemm_gflops"]
    out = []
    r4, dense64 = rows.get(("fc6 TTLinear", 4, 64)), rows.get(("fc6 nn.Linear", None, 64))
    if r4 and dense64:
        floor = 2 * r4["macs"] / (gemm * 1e9) * 1e3
        if "peer_fwd_ms" in r4:
            vs_peer = r4["peer_fwd_ms"] / r4["fwd_ms"]
            out.append(_row("TT rank 4, batch 64: ≥ 6× faster than tensorly-torch", f"{vs_peer:.1f}×", vs_peer >= 6))
        out.append(_row("TT rank 4, batch 64: ≥ 10× faster than nn.Linear", f"{r4['speedup_fwd']:.1f}×",
                        r4["speedup_fwd"] >= 10))
        out.append(_row("TT rank 4, batch 64: within 3× of the arithmetic floor",
                        f"{r4['fwd_ms'] / floor:.1f}× the floor ({floor:.2f} ms at {gemm} GFLOP/s)",
                        r4["fwd_ms"] / floor <= 3))
        r8 = rows.get(("fc6 TTLinear", 8, 64))
        if r8 and "peer_fwd_ms" in r4:
            peer_margin = dense64["fwd_ms"] / r4["peer_fwd_ms"]
            out.append(_row("TT rank 8, batch 64: faster than dense by at least the peer's rank-4 margin",
                            f"{r8['speedup_fwd']:.1f}× vs the peer's {peer_margin:.1f}×", r8["speedup_fwd"] >= peer_margin))
    fb = [r for r in data["linear"] if "peer_fwd_bwd_ms" in r]
    if fb:
        worst = min(fb, key=lambda r: r["peer_fwd_bwd_ms"] / r["fwd_bwd_ms"])
        ratio = worst["peer_fwd_bwd_ms"] / worst["fwd_bwd_ms"]
        out.append(_row("TT forward+backward ahead of the peer (every rank and batch)",
                        f"worst {ratio:.1f}× (rank {worst['rank']}, batch {worst['batch']})", ratio > 1))
    b1 = [r for r in data["linear"] if r["layer"] == "fc6 TTLinear" and r["batch"] == 1]
    if b1:
        worst = min(b1, key=lambda r: r["speedup_fwd"])
        out.append(_row("Batch 1: TT faster than dense at every rank ≤ 8",
                        f"slowest rank {worst['rank']}: {worst['speedup_fwd']:.1f}×", worst["speedup_fwd"] > 1))
    b1m = [r for r in data["linear"] if r["layer"] == "fc6 TTLinear merged" and r["batch"] == 1]
    if b1m:
        worst = min(b1m, key=lambda r: r["speedup_fwd"])
        out.append(_row("Batch 1, merged for inference (`merge()`): TT faster than dense at every rank ≤ 8",
                        f"slowest rank {worst['rank']}: {worst['speedup_fwd']:.1f}× ({worst['fwd_ms']:.3f} ms)",
                        worst["speedup_fwd"] > 1))
    return out


def recipe_targets(data: dict) -> list[str]:
    out = []
    for e in data["results"]:
        if e["recipe"] is None or "resnet18" not in e["recipe"]:
            continue
        out.append(_row(f"{e['model']}, `{e['recipe']}`: latency cut ≥ half the MAC cut ({100 * e['macs_removed']:.1f}% → "
                        f"≥ {100 * e['target_latency_cut']:.1f}%)",
                        f"batch 1: {100 * e['latency_cut_b1']:.1f}%; batch {e['batch_n']}: "
                        f"{100 * e['latency_cut_bn']:.1f}%", e["target_met_b1"] and e["target_met_bn"]))
    return out


def decompose_targets(data: list | dict) -> list[str]:
    rows = data["recipes"] if isinstance(data, dict) and "recipes" in data else []
    out = []
    for r in rows:
        ok = r["ours_layer_s"] <= r["peer_s"] and r["ours_err"] <= r["peer_err"] * 1.001
        out.append(_row(f"Decomposing `{r['recipe']}`: as fast as the peer on the same layers, error no higher",
                        f"{r['ours_layer_s']:.1f} s vs {r['peer_s']:.1f} s (whole `decompose` {r['ours_s']:.1f} s); "
                        f"median error {r['ours_err']:.4f} vs {r['peer_err']:.4f}", ok))
    return out


def train_targets(data: dict) -> list[str]:
    """Issue 12: the tool's loop at ≥ 0.95× a plain loop, under the policy the CLI runs training with."""
    out = []
    for policy, part in data.get("policies", {}).items():
        for r in part["rows"]:
            plain = max(r["plain"], r.get("plain channels-last", 0.0))
            ratio = r["tool"] / plain
            out.append(_row(f"Training loop ≥ 0.95× a plain PyTorch loop: {r['model']}, "
                            f"{'with' if r['teacher'] else 'no'} teacher (OMP_WAIT_POLICY={policy})",
                            f"{r['tool']:.0f} vs {plain:.0f} img/s: {ratio:.2f}×", ratio >= 0.95))
    return out


def zoo_targets(data: dict) -> list[str]:
    """The zoo's own verdicts, as benchmarks/zoo.py computed them from its rows."""
    import zoo

    return zoo.targets(data.get("rows", []), data.get("exact", []), prefix="Zoo: ")


def write_report() -> Path:
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`benchmarks/run.py`): every part's figures come from the run that wrote "
             "its file, and each table states its machine, threads, torch version and OpenMP settings. Timings "
             "are medians after warm-up; speed-ups are ratios measured in the same run. `make bench ARGS=\"convs "
             "recipes\"` runs some parts; `python benchmarks/run.py --report` only rebuilds this page.", "",
             "## Targets of issue 4", "", "| target | measured | verdict |", "|---|---|---|"]
    checks = []
    if (d := _load("layer-speed-cpu.json")):
        checks += tt_targets(d)
    if (d := _load("results.json")):
        checks += recipe_targets(d)
    if (d := _load("decompose-time.json")):
        checks += decompose_targets(d)
    if (d := _load("train-speed.json")):
        checks += train_targets(d)
    if (d := _load("zoo.json")):
        checks += zoo_targets(d)
    lines += checks or ["| (no part has been run yet) | – | – |"]
    lines += ["", "Where a target is missed, the part's own section and [performance.md](performance.md) say why. "
              "Latency parts run with OpenMP's default wait policy (as a deployed model does); decomposition and "
              "other training parts with `OMP_WAIT_POLICY=PASSIVE`; the training-throughput part runs each policy it "
              "names in its own process (the CLI trains under OpenMP's default since issue 12).", ""]
    lines += ["Outside `make bench` (they need a trained model or take long): `python benchmarks/budget_mlp.py mlp.pt` "
              "compares the global rank budget with uniform ranks at equal parameter budgets "
              "([budget-mlp.md](budget-mlp.md), discussed in [budget.md](budget.md)); "
              "`python benchmarks/mnist_prodsum.py` trains the product-of-sums MNIST networks of "
              "[prodsum.md](prodsum.md); the sweep figure in [sweep.md](sweep.md) comes from `tncompress sweep`; "
              "`python benchmarks/cache_cost.py` (needs the git history) measures what removing TTLinear's hidden "
              "cache cost ([cache-cost-cpu.md](cache-cost-cpu.md), discussed in [performance.md](performance.md)).",
              ""]
    for part, name in SECTIONS:
        path = DOCS / name
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8").strip().splitlines()
        # Demote the part's headings one level so they sit under this page's title.
        lines += ["#" + line if line.startswith("#") else line for line in text] + [""]
    out = DOCS / "benchmarks.md"
    atomic_write(out, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return out


def main(argv: list[str]) -> int:
    if argv == ["--report"]:
        print(f"wrote {write_report()}")
        return 0
    names = argv or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"error: unknown benchmark part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}", flush=True)
        code = subprocess.call(PARTS[name], env=part_env(name))
        if code:
            return code
    print(f"wrote {write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
