"""CI gates on a report: ``top1_drop<=1.0``, ``params_ratio>=4``.

A gate is ``metric OP number`` with OP one of ``<=``, ``>=``, ``<``, ``>``, ``==``. Each gate is
checked against every compared model (every model after the baseline; the only model when there is
one). Bad syntax, an unknown metric or a metric the report did not measure is a user error (exit 2);
a gate that does not hold is a :class:`~tncompress.errors.GateError` (exit 3).
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
    def get(entry: dict[str, Any]) -> float | None:
        values = [row.get(key) for row in entry.get("layers", [])]
        values = [v for v in values if isinstance(v, (int, float))]
        return max(values) if values else None

    return get


def _acc(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda entry: (entry.get("accuracy") or {}).get(key)


# metric → (how to read it from a report's model entry, what it needs when missing)
METRICS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "params": (lambda e: e.get("params"), ""),
    "macs": (lambda e: e.get("macs"), ""),
    "bytes_on_disk": (lambda e: e.get("bytes_on_disk"), ""),
    "params_ratio": (lambda e: e.get("params_ratio"), ""),
    "macs_ratio": (lambda e: e.get("macs_ratio"), ""),
    "bytes_ratio": (lambda e: e.get("bytes_ratio"), ""),
    "params_reduction_pct": (lambda e: e.get("params_reduction_pct"), ""),
    "macs_reduction_pct": (lambda e: e.get("macs_reduction_pct"), ""),
    "top1": (_acc("top1"), "--dataset"),
    "top5": (_acc("top5"), "--dataset"),
    "top1_drop": (lambda e: e.get("top1_drop"), "--dataset"),
    "top5_drop": (lambda e: e.get("top5_drop"), "--dataset"),
    "latency_ms": (lambda e: (e.get("latency") or {}).get("median_ms"), "--latency"),
    "speedup": (lambda e: e.get("speedup"), "--latency"),
    "max_output_error": (_max_layer("output_rel_error"), "a compressed checkpoint (per-layer errors)"),
    "max_weight_error": (_max_layer("weight_rel_error"), "a compressed checkpoint (per-layer errors)"),
}
ALIASES = {"latency_ratio": "speedup", "compression": "params_ratio", "size_ratio": "bytes_ratio"}


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        shown = "–" if self.value is None else f"{self.value:.6g}"
        return f"gate {'passed' if self.passed else 'failed'}: {self.expr} — {self.model}: {self.metric} = {shown}"


def parse_gate(expr: str) -> Gate:
    """``"top1_drop<=1.0"`` → :class:`Gate`; one-line error for anything else."""
    match = _GATE.match(expr)
    if not match:
        raise TncompressError(f"--gate {expr!r}: expected METRIC OP NUMBER, e.g. 'top1_drop<=1.0' or "
                              f"'params_ratio>=4' (OP is one of {', '.join(OPS)})")
    name, op, number = match.groups()
    metric = ALIASES.get(name, name)
    if metric not in METRICS:
        hint = difflib.get_close_matches(name, [*METRICS, *ALIASES], n=1)
        raise TncompressError(f"--gate {expr!r}: unknown metric {name!r}"
                              f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; known: {', '.join(METRICS)}")
    threshold = float(number)
    if not math.isfinite(threshold):
        raise TncompressError(f"--gate {expr!r}: the threshold must be a finite number")
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
            value = float(value)
            passed = math.isfinite(value) and gate.holds(value)
            results.append(GateResult(gate.expr, gate.metric, gate.op, gate.threshold, entry["path"], value, passed))
    return results


def check_options(gates: Sequence[Gate], *, dataset: bool, latency: bool) -> None:
    """Fail before any work when a gate needs a measurement the command line does not ask for."""
    for gate in gates:
        needs = METRICS[gate.metric][1]
        if (needs == "--dataset" and not dataset) or (needs == "--latency" and not latency):
            raise TncompressError(f"--gate {gate.expr!r}: {gate.metric} is measured only with {needs}")
