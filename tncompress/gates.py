"""CI gates on a report: ``top1_drop<=1.0``, ``params_reduction>=4``.

A gate is ``metric OP number`` with OP one of ``<=``, ``>=``, ``<``, ``>``, ``==``. Each gate is
checked against every compared model (every model after the baseline; the only model when there is
one). Bad syntax, an unknown metric or a metric the report did not measure is a user error (exit 2);
a gate that does not hold is a :class:`~tncompress.errors.GateError` (exit 3).

``*_ratio`` are model / baseline (≤ 1 when smaller, as a recipe budget) and ``*_reduction`` /
``speedup`` baseline / model. ``params_ratio`` once meant baseline / model, so a ratio gate that
asks for more than 1 (``params_ratio>=4``) is refused with the reduction to write instead: silently
flipping a CI gate's meaning would pass or fail it for the wrong reason.

Latency gates do not trust a noisy measurement: on a "noisy machine" verdict they fail, and a
speed-up gate compares the end of the speed-up interval on the side of its claim
(``speedup>=1.2`` passes only when even the interval's lower end is at least 1.2).
"""
from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tncompress.errors import TncompressError

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq,
}
_GATE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*%?\s*$")


def _max_layer(key: str) -> Callable[[dict[str, Any]], float | None]:
    """The largest per-layer error recorded at decomposition (kept under ``*_at_decompose`` by the
    report, also after a fine-tune; the gate's result then says so)."""
    def get(entry: dict[str, Any]) -> float | None:
        values = [row.get(f"{key}_at_decompose", row.get(key)) for row in entry.get("layers", [])]
        values = [v for v in values if isinstance(v, (int, float))]
        return max(values) if values else None

    return get


def _acc(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda entry: (entry.get("accuracy") or {}).get(key)


def _inverse(value: float | None) -> float | None:
    return 1.0 / value if value else None


# metric → (how to read it from a report's model entry, what it needs when missing)
METRICS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "params": (lambda e: e.get("params"), ""),
    "macs": (lambda e: e.get("macs"), ""),
    "bytes_on_disk": (lambda e: e.get("bytes_on_disk"), ""),
    "params_ratio": (lambda e: e.get("params_ratio"), ""),
    "macs_ratio": (lambda e: e.get("macs_ratio"), ""),
    "bytes_ratio": (lambda e: e.get("bytes_ratio"), ""),
    "params_reduction": (lambda e: e.get("params_reduction"), ""),
    "macs_reduction": (lambda e: e.get("macs_reduction"), ""),
    "bytes_reduction": (lambda e: e.get("bytes_reduction"), ""),
    "params_reduction_pct": (lambda e: e.get("params_reduction_pct"), ""),
    "macs_reduction_pct": (lambda e: e.get("macs_reduction_pct"), ""),
    "top1": (_acc("top1"), "--dataset"),
    "top5": (_acc("top5"), "--dataset"),
    "top1_drop": (lambda e: e.get("top1_drop"), "--dataset"),
    "top5_drop": (lambda e: e.get("top5_drop"), "--dataset"),
    "latency_ms": (lambda e: (e.get("latency") or {}).get("median_ms"), "--latency"),
    "speedup": (lambda e: e.get("speedup"), "--latency"),
    "latency_ratio": (lambda e: _inverse(e.get("speedup")), "--latency"),
    "max_output_error": (_max_layer("output_rel_error"), "a compressed checkpoint (per-layer errors)"),
    "max_weight_error": (_max_layer("weight_rel_error"), "a compressed checkpoint (per-layer errors)"),
}
ALIASES = {"compression": "params_reduction", "size_ratio": "bytes_ratio", "size_reduction": "bytes_reduction"}
# model / baseline metrics (≤ 1 when smaller or faster) → the baseline / model metric to gate a factor on
RATIO_FACTORS = {"params_ratio": "params_reduction", "macs_ratio": "macs_reduction", "bytes_ratio": "bytes_reduction",
                 "latency_ratio": "speedup"}
LATENCY_METRICS = ("latency_ms", "speedup", "latency_ratio")


@dataclass(frozen=True)
class Gate:
    """One parsed gate expression."""

    expr: str
    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return OPS[self.op](value, self.threshold)


@dataclass
class GateResult:
    """A gate checked against one model."""

    expr: str
    metric: str
    op: str
    threshold: float
    model: str
    value: float | None
    passed: bool
    note: str = ""  # what the value is when it is not the plain figure (interval end, noisy, before fine-tuning)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        shown = "–" if self.value is None else f"{self.value:.6g}"
        note = f" ({self.note})" if self.note else ""
        return (f"gate {'passed' if self.passed else 'failed'}: {self.expr} — {self.model}: "
                f"{self.metric} = {shown}{note}")


def parse_gate(expr: str) -> Gate:
    """``"top1_drop<=1.0"`` → :class:`Gate`; one-line error for anything else."""
    match = _GATE.match(expr)
    if not match:
        raise TncompressError(f"--gate {expr!r}: expected METRIC OP NUMBER, e.g. 'top1_drop<=1.0' or "
                              f"'params_reduction>=4' (OP is one of {', '.join(OPS)})")
    name, op, number = match.groups()
    metric = ALIASES.get(name, name)
    if metric not in METRICS:
        hint = difflib.get_close_matches(name, [*METRICS, *ALIASES], n=1)
        raise TncompressError(f"--gate {expr!r}: unknown metric {name!r}"
                              f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; known: {', '.join(METRICS)}")
    threshold = float(number)
    if not math.isfinite(threshold):
        raise TncompressError(f"--gate {expr!r}: the threshold must be a finite number")
    if metric in RATIO_FACTORS and threshold > 1 and op in (">=", ">", "=="):
        raise TncompressError(f"--gate {expr!r}: {name} is model / baseline (≤ 1 when smaller, as in a recipe budget); "
                              f"for the × factor write '{RATIO_FACTORS[metric]}{op}{number}' instead")
    return Gate(expr.strip(), metric, op, threshold)


def parse_gates(exprs: Sequence[str]) -> list[Gate]:
    return [parse_gate(e) for e in exprs]


def evaluate_gates(gates: Sequence[Gate], report: dict[str, Any]) -> list[GateResult]:
    """Check every gate against every compared model of ``report`` (built by ``build_report``).

    A metric the report lacks (``top1`` without ``--dataset``) is a user error naming the option.
    """
    models = report["models"][1:] or report["models"][:1]
    results = []
    for gate in gates:
        read, needs = METRICS[gate.metric]
        for entry in models:
            value = read(entry)
            if value is None:
                raise TncompressError(f"--gate {gate.expr!r}: {entry['path']} has no {gate.metric}"
                                      f"{f'; it needs {needs}' if needs else ''}")
            value, note, trusted = _gated_value(gate, entry, float(value))
            passed = trusted and math.isfinite(value) and gate.holds(value)
            results.append(GateResult(gate.expr, gate.metric, gate.op, gate.threshold, entry["path"], value, passed,
                                      note))
    return results


def _gated_value(gate: Gate, entry: dict[str, Any], value: float) -> tuple[float, str, bool]:
    """The value a gate compares, a note saying what it is, and whether it may pass at all.

    Latency: a "noisy machine" measurement never passes; a speed-up (or latency ratio) claim is
    checked on the end of its interval on the side of the claim. Layer errors of a fine-tuned model
    are the ones recorded at decompose, and the note says so."""
    if gate.metric.startswith("max_") and entry.get("fine_tuned"):
        return value, "at decompose, before fine-tuning", True
    if gate.metric not in LATENCY_METRICS:
        return value, "", True
    noisy = entry.get("speedup_verdict") == "noisy machine" or (entry.get("latency") or {}).get("noisy")
    if noisy:
        return value, "noisy machine: not a measurement to gate on", False
    low, high = entry.get("speedup_low"), entry.get("speedup_high")
    if gate.metric == "latency_ratio":
        low, high = _inverse(high), _inverse(low)
    if gate.metric == "latency_ms" or gate.op == "==" or low is None or high is None:
        return value, "", True
    if gate.op in (">=", ">"):
        return low, f"lower end of the interval; median {value:.4g}", True
    return high, f"upper end of the interval; median {value:.4g}", True


def check_options(gates: Sequence[Gate], *, dataset: bool, latency: bool) -> None:
    """Fail before any work when a gate needs a measurement the command line does not ask for."""
    for gate in gates:
        needs = METRICS[gate.metric][1]
        if (needs == "--dataset" and not dataset) or (needs == "--latency" and not latency):
            raise TncompressError(f"--gate {gate.expr!r}: {gate.metric} is measured only with {needs}")
