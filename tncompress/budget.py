"""Global rank budget: choose the rank of every layer a recipe decomposes so that the whole model
meets ``params_ratio`` (or ``macs_ratio``) at the least measured sensitivity.

1. **Ladder.** For each layer, every rank configuration that compresses it, ordered by size:
   low-rank r = 1, 2, …; CP R = 1, 2, …; Tucker-2 (r_in, r_out) grown one step at a time with the
   ranks proportional to the channel counts; TT uniform rank r, reached one bond at a time (so the
   steps are small). Plus "leave dense". Parameters come from closed forms, MACs from the layer
   classes (exactly what the planner reports).
2. **Scan.** On ``candidates`` rungs per layer (geometric in size, always the smallest and the
   largest), the layer's weight is approximated and the *whole model's* output on the calibration
   batch is compared with the dense model's, only that layer replaced: sensitivity
   s = ‖f(x) − f_i(x)‖² / ‖f(x)‖² (``sensitivity: layer`` uses the layer's own output instead:
   cheaper, blind to what follows). One decomposition serves every rank where truncation is exact
   or near it (an SVD for low-rank, the channel bases of a truncated HOSVD for Tucker-2); TT-SVD runs
   per rank (cheap at the small cores); CP-ALS runs per rank with ``cp_iterations`` sweeps and no
   retries. Rungs between measured ones are interpolated linearly in size.
3. **Allocate.** Minimise Σ s_i subject to Σ cost ≤ target: greedy marginal gain on the lower convex
   hull of each layer's (cost, s) curve (the Lagrangian solution), starting from all-dense.
4. **Fix-up.** Fill what is left of the budget with the best sensitivity-per-cost moves on the full
   ladders, so the total — counted over the whole model, layers left alone included — lands within
   2% of the target (below it when possible).
5. **Select and refine.** Measure the greedy allocation, uniform per-layer fractions and the same
   rank everywhere *whole* (every layer replaced at once) by top-1 disagreement with the dense
   model on the calibration batch (KL breaking ties; output error for non-classifiers), start from
   the best that meets the budget, and improve it by a bounded pairwise local search on that same
   measure — so the result is never worse than the uniform baselines on it. Measure the chosen
   ranks exactly.
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tncompress.errors import RecipeError
from tncompress.layers.base import dense_layout
from tncompress.methods import all_methods, method_for_layer
from tncompress.methods.base import Method, Settings
from tncompress.outputs import output_tensor
from tncompress.planner import KEPT_FOR_GROWTH, LayerPlan, Plan, calibration_settings, example_batch, plan_layer
from tncompress.recipe import LayerChoice, Recipe

log = logging.getLogger(__name__)

BUDGET_METHODS = tuple(name for name, m in all_methods().items() if m.supports_budget)  # tt, lowrank, cp, tucker2
TOLERANCE = 0.02          # |achieved / target − 1| allowed
DEFAULT_CANDIDATES = 12
DEFAULT_CP_ITERATIONS = 15
DEFAULT_SCAN_SAMPLES = 128        # the per-layer scan's share of the calibration batch (the selection uses all)
DEFAULT_REFINE_EVALUATIONS = 120   # whole-model evaluations the local search may spend
REFINE_STEPS = (0.2, 0.08, 0.03, 0.01)  # move sizes, as fractions of the decided layers' total cost
REFINE_LAYERS = 4                 # with many layers, moves only between the proxy's best few
KL_TIEBREAK = 1e-5                # KL's weight in the selection score (≤ 1e-4: below one sample in 10,000)


class BudgetError(RecipeError):
    """A budget that cannot be met (one line says why)."""


@dataclass
class Budget:
    """The recipe's ``budget:`` mapping, validated by :func:`tncompress.recipe.parse_recipe`."""

    metric: str                       # "params" or "macs"
    ratio: float                      # compressed / original, counted over the whole model
    sensitivity: str = "model"        # "model" (whole-model output error) or "layer" (layer output error)
    candidates: int = DEFAULT_CANDIDATES
    cp_iterations: int = DEFAULT_CP_ITERATIONS
    refine: int = DEFAULT_REFINE_EVALUATIONS   # whole-model evaluations for the local search (0: none)
    scan_samples: int = DEFAULT_SCAN_SAMPLES   # calibration samples of the per-layer scan (the first ones)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Budget:
        metric = "params" if "params_ratio" in data else "macs"
        return cls(metric, float(data[f"{metric}_ratio"]), str(data.get("sensitivity", "model")),
                   int(data.get("candidates", DEFAULT_CANDIDATES)), int(data.get("cp_iterations", DEFAULT_CP_ITERATIONS)),
                   scan_samples=int(data.get("scan_samples", DEFAULT_SCAN_SAMPLES)))

    @property
    def label(self) -> str:
        return f"{self.metric}_ratio {self.ratio:g}"


@dataclass
class Ladder:
    """One layer's candidate rank configurations, cheapest first; the last rung is "dense"."""

    plan: LayerPlan
    module: nn.Module
    ranks: list[Any]                  # the recipe rank value per rung; None for dense
    params: np.ndarray
    macs: np.ndarray
    sens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    measured: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    seconds: float = 0.0
    dropped: str = ""                 # why every compressing rank was dropped (it would slow the layer)
    trimmed: bool = False             # larger ranks were dropped: they would make the layer slower or larger

    def cost(self, metric: str) -> np.ndarray:
        return self.params if metric == "params" else self.macs

    @property
    def dense(self) -> int:
        return len(self.ranks) - 1

    def span(self) -> str:
        return "–" if self.dense == 0 else f"{self.ranks[0]}..{self.ranks[self.dense - 1]}"


# --- ladders -------------------------------------------------------------------------------------

def _method(plan: LayerPlan) -> Method:
    return method_for_layer(plan.method)


def _settings(plan: LayerPlan) -> Settings:
    return _method(plan).parse(plan.settings, plan.name)


def build_ladder(module: nn.Module, plan: LayerPlan, want_macs: bool = True) -> Ladder:
    """Every compressing rank configuration of one planned layer, plus dense as the last rung."""
    ranks, params, macs = _method(plan).ladder(module, plan.config, plan.input_shape or [], plan.macs_before,
                                               want_macs)
    rungs = [*ranks, None]
    return Ladder(plan, module, rungs, np.array([*params, plan.params_before], dtype=np.int64),
                  np.array([*macs, plan.macs_before], dtype=np.int64), np.full(len(rungs), np.nan),
                  np.zeros(len(rungs), dtype=bool))


def grid_indices(params: np.ndarray, count: int) -> list[int]:
    """About ``count`` rungs to measure, geometric in size, always the smallest and the largest."""
    n = len(params)
    if n <= count:
        return list(range(n))
    targets = np.geomspace(max(1, params[0]), params[-1], count)
    picked = {int(np.argmin(np.abs(params - t))) for t in targets}
    return sorted(picked | {0, n - 1})


# --- sensitivity ---------------------------------------------------------------------------------

def approximations(ladder: Ladder, indices: Sequence[int], budget: Budget) -> Iterator[torch.Tensor]:
    """The approximated dense weight at each requested rung, by the layer's method (which reuses one
    decomposition where truncating it is exact or near it)."""
    plan = ladder.plan
    yield from _method(plan).approximations(ladder.module, plan.config, _settings(plan),
                                            [ladder.ranks[i] for i in indices], budget.cp_iterations)


def _weight(module: nn.Module) -> torch.Tensor:
    """The dense layer's weight (a budget scans Linear, Conv2d and Embedding layers)."""
    assert isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding))
    return module.weight


def _forward_with(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """The layer's output with ``weight`` in place of its own, laid out in memory as the dense
    layer's would be (an approximated weight may be a strided view, and the user's next op may be a
    ``.view`` that only works on that layout)."""
    assert isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding))
    weight = weight.to(dtype=module.weight.dtype, device=module.weight.device).contiguous()
    if isinstance(module, nn.Embedding):  # a lookup: no bias, no layout to keep
        return F.embedding(x, weight, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)
    b = module.bias if bias else None
    if isinstance(module, nn.Conv2d):
        return dense_layout(module._conv_forward(x, weight, b), x)
    return dense_layout(F.linear(x, weight, b), x)


def _flat(output: Any) -> torch.Tensor:
    """The model output's primary tensor (:mod:`tncompress.outputs`) as one float64 vector."""
    return output_tensor(output, "the model").detach().reshape(-1).to(torch.float64)


def _sq_rel(reference: torch.Tensor, approx: torch.Tensor) -> float:
    denom = float(reference.pow(2).sum())
    diff = float((reference - approx).pow(2).sum())
    if not math.isfinite(diff):
        return math.inf
    return diff / denom if denom > 0 else diff


SIGNIFICANCE_Z = 2.0   # a whole-model comparison must beat its own sampling noise by this many standard errors
MIN_RELATIVE_GAIN = 1e-6  # … and gain at least this fraction of the measure (floating-point noise)


@dataclass(frozen=True)
class Scored:
    """A whole allocation measured on the calibration batch: the selection score, its parts, and the
    per-unit values that a paired comparison between two allocations needs."""

    score: float
    disagreement: float               # NaN for a model that is not a classifier
    kl: float                         # NaN likewise
    agree: np.ndarray | None          # per unit: top-1 equals the dense model's (classifiers)
    units: np.ndarray                 # per unit: KL (classifiers) or share of the squared output error

    def as_tuple(self) -> tuple[float, float, float]:
        return self.score, self.disagreement, self.kl


def class_scores(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor | None:
    """The output as (units, classes) logits when it is a classifier's: (batch, classes), or a
    language model's next-token logits (batch, positions, vocabulary) for token-id input, one unit
    per position; None for any other output (a regression, a feature map)."""
    if not output.is_floating_point():
        return None
    if output.ndim == 2 and output.shape[0] == batch.shape[0] and output.shape[1] > 1:
        return output.double()
    if output.ndim == 3 and not batch.is_floating_point() and output.shape[0] == batch.shape[0] and output.shape[2] > 1:
        return output.reshape(-1, output.shape[2]).double()
    return None


def significantly_better(a: Scored, b: Scored) -> bool:
    """Whether allocation ``a`` beats ``b`` by more than the calibration batch's sampling noise.

    Both are measured on the same samples, so the test is paired. Top-1 agreement first: of the
    units where exactly one of the two agrees with the dense model, ``a`` must win by
    ``SIGNIFICANCE_Z``·√(flips) (a sign test); significantly fewer agreements is a loss. When top-1
    does not decide, the per-unit KL (or output error) must fall by ``SIGNIFICANCE_Z`` standard
    errors of the paired differences, and by at least ``MIN_RELATIVE_GAIN`` of ``b``'s value.

    Without this, the search followed noise: on 8 Gaussian-noise samples top-1 flips on near-ties,
    and tiny floating-point differences between CPUs chose a rank-1 layer (error 0.67) over an exact
    rank-4 one."""
    if not math.isfinite(a.score):
        return False
    if not math.isfinite(b.score):
        return True
    if a.agree is not None and b.agree is not None:
        d = a.agree.astype(np.int64) - b.agree.astype(np.int64)
        net, flips = int(d.sum()), int(np.abs(d).sum())
        if flips and abs(net) >= SIGNIFICANCE_Z * math.sqrt(flips):
            return net > 0
    delta = b.units - a.units              # positive where a is better
    if not bool(np.isfinite(delta).all()):
        return False
    gain = float(delta.mean())
    if gain <= MIN_RELATIVE_GAIN * abs(float(b.units.mean())):
        return False
    if delta.size < 2:
        return True
    spread = float(delta.std(ddof=1)) / math.sqrt(delta.size)
    return gain > SIGNIFICANCE_Z * spread


class _Probe:
    """Runs the model with some layers' weights replaced (forward hooks), against the dense output."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, modules: dict[str, nn.Module]) -> None:
        self.model, self.batch = model, batch
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[list[int], list[int]]] = {}  # per sample: batch dimension 1
        handles = []
        for name, module in modules.items():
            def hook(mod: nn.Module, args: tuple, out: Any, _name: str = name) -> None:
                if _name not in self.inputs:
                    self.inputs[_name], self.outputs[_name] = args[0].detach(), out.detach()
                    self.shapes[_name] = ([1, *args[0].shape[1:]], [1, *out.shape[1:]])
            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                primary = output_tensor(model(batch), "the model").detach()
        finally:
            for h in handles:
                h.remove()
        self.reference = primary.reshape(-1).double()
        self.per_sample = primary.reshape(primary.shape[0] if primary.ndim else 1, -1).double()
        self.logits = class_scores(primary, batch)
        self.labels = self.logits.argmax(dim=1) if self.logits is not None else None

    def measure(self, budget: Budget, name: str, module: nn.Module, weight: torch.Tensor) -> float:
        """The budget's sensitivity of one layer replaced by ``weight``."""
        if budget.sensitivity == "layer":
            return self.layer_error(name, module, weight)
        return self.model_error({name: (module, weight)}, kl=budget.sensitivity == "kl")

    def _run(self, replaced: dict[str, tuple[nn.Module, torch.Tensor]]) -> Any:
        """The model's output on the calibration batch with some layers' weights replaced."""
        handles = []
        for name, (module, weight) in replaced.items():
            def hook(mod: nn.Module, args: tuple, out: Any, _w: torch.Tensor = weight) -> torch.Tensor:
                return _forward_with(mod, args[0], _w)
            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                return self.model(self.batch)
        finally:
            for h in handles:
                h.remove()

    def _kl_units(self, logits: torch.Tensor) -> torch.Tensor:
        """KL divergence from the dense model's predicted distribution, per scoring unit."""
        assert self.logits is not None
        ref = F.log_softmax(self.logits, dim=1)
        return (ref.exp() * (ref - F.log_softmax(logits.double(), dim=1))).sum(dim=1)

    def _kl(self, raw: Any) -> float:
        logits = class_scores(output_tensor(raw).detach(), self.batch)
        assert logits is not None
        value = float(self._kl_units(logits).mean())
        return value if math.isfinite(value) else math.inf

    def model_error(self, replaced: dict[str, tuple[nn.Module, torch.Tensor]], kl: bool = False) -> float:
        """Squared relative error of the model's output with some layers replaced, or with ``kl`` the
        mean KL divergence from the dense model's predicted class distribution (classifiers)."""
        raw = self._run(replaced)
        if kl and self.logits is not None:
            return self._kl(raw)
        return _sq_rel(self.reference, _flat(raw))

    @property
    def selection_measure(self) -> str:
        return "top-1 disagreement" if self.logits is not None else "model output error"

    def selection(self, replaced: dict[str, tuple[nn.Module, torch.Tensor]]) -> Scored:
        """The measure the final choice minimises, of a whole allocation, with its per-unit parts.
        Classifiers: the fraction of calibration samples (positions, for next-token logits) whose
        top-1 class differs from the dense model's, KL from its predicted distribution breaking ties
        (weighted so that it never outweighs one sample: the output error tracks accuracy poorly at
        high compression). Other models: the squared relative output error (disagreement and KL are
        NaN). Which of two allocations is better is decided by :func:`significantly_better`."""
        primary = output_tensor(self._run(replaced), "the model").detach()
        logits = class_scores(primary, self.batch) if self.logits is not None else None
        if logits is None or self.logits is None or logits.shape != self.logits.shape:
            out = primary.reshape(primary.shape[0] if primary.ndim else 1, -1).double()
            if out.shape != self.per_sample.shape or not bool(torch.isfinite(out).all()):
                return Scored(math.inf, math.nan, math.nan, None, np.full(self.per_sample.shape[0], np.inf))
            denom = float(self.per_sample.pow(2).sum())
            parts = (self.per_sample - out).pow(2).sum(dim=1) / (denom if denom > 0 else 1.0)
            units = parts.numpy()
            return Scored(float(units.sum()), math.nan, math.nan, None, units)
        if not bool(torch.isfinite(logits).all()):
            n = self.logits.shape[0]
            return Scored(math.inf, 1.0, math.inf, np.zeros(n, dtype=bool), np.full(n, np.inf))
        assert self.labels is not None  # set together with self.logits
        agree = torch.eq(logits.argmax(dim=1), self.labels)
        kl_units = self._kl_units(logits)
        disagree = float((~agree).double().mean())
        kl = float(kl_units.mean())
        kl = kl if math.isfinite(kl) else math.inf
        return Scored(disagree + KL_TIEBREAK * min(kl, 10.0), disagree, kl, agree.numpy(), kl_units.numpy())

    def unchanged(self) -> Scored:
        """The measure of the dense model itself (nothing replaced)."""
        if self.logits is not None:
            n = self.logits.shape[0]
            return Scored(0.0, 0.0, 0.0, np.ones(n, dtype=bool), np.zeros(n))
        return Scored(0.0, math.nan, math.nan, None, np.zeros(self.per_sample.shape[0]))

    def layer_error(self, name: str, module: nn.Module, weight: torch.Tensor) -> float:
        """Squared relative error of the layer's own output, bias left out (a large bias would
        hide the error of the weight)."""
        with torch.no_grad():
            x = self.inputs[name]
            ref = _forward_with(module, x, _weight(module), bias=False)
            y = _forward_with(module, x, weight, bias=False)
        return _sq_rel(ref.reshape(-1).double(), y.reshape(-1).double())


def scan(ladder: Ladder, probe: _Probe, budget: Budget) -> None:
    """Measure the sensitivity on the grid rungs and interpolate the others (in place)."""
    started = time.perf_counter()
    name, module = ladder.plan.name, ladder.module
    compressing = list(range(ladder.dense))
    grid = grid_indices(ladder.params[: ladder.dense], budget.candidates) if compressing else []
    for i, weight in zip(grid, approximations(ladder, grid, budget)):
        s = probe.measure(budget, name, module, weight)
        ladder.sens[i], ladder.measured[i] = s, True
    ladder.sens[ladder.dense], ladder.measured[ladder.dense] = 0.0, True
    known = np.flatnonzero(ladder.measured)
    finite = np.where(np.isfinite(ladder.sens[known]), ladder.sens[known], 1e6)
    ladder.sens = np.interp(ladder.params.astype(np.float64), ladder.params[known].astype(np.float64), finite)
    ladder.seconds = time.perf_counter() - started
    log.info("budget scan %s (%s): %d rungs, %d measured in %.2fs", name, ladder.plan.method, len(ladder.ranks),
             len(grid), ladder.seconds)


# --- allocation ----------------------------------------------------------------------------------

def lower_hull(cost: np.ndarray, sens: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the (cost, sensitivity) points with no dominated point,
    from the cheapest to the most expensive useful one."""
    order = np.lexsort((sens, cost))
    kept: list[int] = []
    best = math.inf
    for i in order:
        if sens[i] < best - 1e-15 or not kept:
            kept.append(int(i))
            best = float(sens[i])
    hull: list[int] = []
    for i in kept:
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (cost[a] - cost[o]) * (sens[i] - sens[o]) - (sens[a] - sens[o]) * (cost[i] - cost[o])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy_allocate(costs: list[np.ndarray], sens: list[np.ndarray], room: float) -> list[int]:
    """Rung per layer with Σ cost ≤ ``room`` (when reachable), by marginal gain on the convex hulls,
    then filled up with the best sensitivity-per-cost moves on the full ladders."""
    hulls = [lower_hull(c, s) for c, s in zip(costs, sens)]
    pos = [len(h) - 1 for h in hulls]
    choice = [h[-1] for h in hulls]
    total = float(sum(c[i] for c, i in zip(costs, choice)))
    heap: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        if pos[layer] > 0:
            h, c, s = hulls[layer], costs[layer], sens[layer]
            cur, prev = h[pos[layer]], h[pos[layer] - 1]
            saved = float(c[cur] - c[prev])
            heapq.heappush(heap, ((float(s[prev] - s[cur])) / max(saved, 1e-12), layer))

    for layer in range(len(hulls)):
        push(layer)
    while total > room and heap:
        _, layer = heapq.heappop(heap)
        h = hulls[layer]
        total -= float(costs[layer][h[pos[layer]]] - costs[layer][h[pos[layer] - 1]])
        pos[layer] -= 1
        choice[layer] = h[pos[layer]]
        push(layer)
    return fill_up(costs, sens, choice, room)


def fill_up(costs: list[np.ndarray], sens: list[np.ndarray], choice: list[int], room: float) -> list[int]:
    """Spend what is left of ``room``: repeatedly take the move (one layer to a larger rung) with the
    largest sensitivity decrease per unit cost that still fits."""
    choice = list(choice)
    total = float(sum(c[i] for c, i in zip(costs, choice)))
    while True:
        gap = room - total
        best: tuple[float, int, int] | None = None
        for layer, (c, s) in enumerate(zip(costs, sens)):
            cur = choice[layer]
            extra = c - c[cur]
            ok = (extra > 0) & (extra <= gap) & (s < s[cur])
            if not ok.any():
                continue
            gain = np.where(ok, (s[cur] - s) / np.maximum(extra, 1), -np.inf)
            j = int(np.argmax(gain))
            if best is None or gain[j] > best[0]:
                best = (float(gain[j]), layer, j)
        if best is None:
            return choice
        _, layer, j = best
        total += float(costs[layer][j] - costs[layer][choice[layer]])
        choice[layer] = j


def uniform_allocate(costs: list[np.ndarray], room: float) -> list[int]:
    """The same fraction f of each layer's dense cost (the largest rung within it), with the largest
    f whose total fits ``room``: the baseline the allocation must beat."""
    def pick(f: float) -> list[int]:
        out = []
        for c in costs:
            fits = np.flatnonzero(c[:-1] <= f * c[-1])
            out.append(int(fits[-1]) if fits.size else 0)
        return out

    def total(ch: list[int]) -> float:
        return float(sum(c[i] for c, i in zip(costs, ch)))

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if total(pick(mid)) <= room:
            lo = mid
        else:
            hi = mid
    return pick(lo)


def objective(sens: list[np.ndarray], choice: list[int]) -> float:
    return float(sum(s[i] for s, i in zip(sens, choice)))


# --- the recipe entry point ----------------------------------------------------------------------

@dataclass
class BudgetScan:
    """Everything measured once per model and calibration batch; :func:`allocate` can then be run
    for any number of targets."""

    model: nn.Module
    plans: list[LayerPlan]
    todo: list[int]                   # indices into ``plans`` of the layers the budget decides
    ladders: list[Ladder]
    totals: dict[str, int]            # whole model: {"params": …, "macs": …}
    probe: _Probe                     # the whole calibration batch: selection and local search
    budget: Budget
    source: str = "<recipe>"
    has_macs: bool = True
    scan_probe: _Probe | None = None  # the per-layer scan's samples (None: the same as ``probe``)

    def fixed(self, metric: str) -> int:
        """Cost of everything the budget does not decide (other layers, norms, biases elsewhere…)."""
        return self.totals[metric] - sum(int(lad.cost(metric)[-1]) for lad in self.ladders)

    _cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _approximators: dict[int, Callable[[Any], torch.Tensor] | None] = field(default_factory=dict, repr=False)
    _scores: dict[tuple[int, ...], Scored] = field(default_factory=dict, repr=False)

    def weight(self, layer: int, rung: int) -> torch.Tensor:
        """The approximated weight of one ladder's rung, cached (the local search revisits rungs;
        low-rank slices one SVD per layer)."""
        key = (layer, rung)
        if key not in self._cache:
            lad = self.ladders[layer]
            if len(self._cache) >= 256:
                self._cache.clear()
            if layer not in self._approximators:
                method, plan = _method(lad.plan), lad.plan
                self._approximators[layer] = method.approximator(lad.module, plan.config, _settings(plan),
                                                                 lad.ranks[lad.dense - 1], self.budget.cp_iterations)
            at = self._approximators[layer]
            w = at(lad.ranks[rung]) if at is not None else next(approximations(lad, [rung], self.budget))
            self._cache[key] = w.to(_weight(lad.module).dtype)
        return self._cache[key]

    def weights(self, choice: Sequence[int]) -> dict[str, tuple[nn.Module, torch.Tensor]]:
        """The approximated weight of every layer the allocation ``choice`` does not leave dense."""
        return {lad.plan.name: (lad.module, self.weight(k, rung))
                for k, (lad, rung) in enumerate(zip(self.ladders, choice)) if rung != lad.dense}

    def scored(self, choice: Sequence[int]) -> Scored:
        """The selection measure with every layer of ``choice`` replaced at once — see
        :meth:`_Probe.selection`; the real objective, which the per-layer sum only approximates."""
        key = tuple(int(i) for i in choice)
        if key not in self._scores:
            weights = self.weights(choice)
            self._scores[key] = self.probe.selection(weights) if weights else self.probe.unchanged()
        return self._scores[key]

    def selection(self, choice: Sequence[int]) -> tuple[float, float, float]:
        """(score, disagreement, KL) of ``choice`` (see :meth:`scored`)."""
        return self.scored(choice).as_tuple()

    def combined(self, choice: Sequence[int], budget: Budget | None = None) -> float:
        """The selection score of ``choice`` (lower is better)."""
        return self.scored(choice).score

    def reset_scores(self) -> None:
        """Forget cached whole-model scores and weights (after a ladder changed)."""
        self._scores.clear()
        self._cache.clear()
        self._approximators.clear()

    def better(self, a: Sequence[int], b: Sequence[int]) -> bool:
        """Whether allocation ``a`` beats ``b`` beyond the calibration batch's noise (:func:`significantly_better`)."""
        return significantly_better(self.scored(a), self.scored(b))


@dataclass
class Allocation:
    """The rung chosen per ladder, and how it compares with uniform fractions."""

    budget: Budget
    choice: list[int]
    achieved: float
    objective: float                  # Σ per-layer sensitivities of the choice (the additive proxy)
    uniform_objective: float          # the same for uniform fractions at the same budget
    used_uniform: bool                # the choice is the uniform per-layer fractions
    combined: float = math.nan        # selection score with all chosen layers replaced at once
    uniform_combined: float = math.nan           # the same for uniform per-layer fractions
    uniform_ranks_combined: float = math.nan     # … for the same rank on every layer
    greedy_combined: float = math.nan            # … for the greedy allocation
    start: str = "greedy"             # where the local search started
    evaluations: int = 0              # whole-model evaluations of the local search
    moves: int = 0                    # moves it accepted
    refine_seconds: float = 0.0
    beaten_by: list[str] = field(default_factory=list)  # baselines significantly better than the choice (none, normally)


def _whole_model_totals(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    from tncompress.measure import count_macs, count_params

    example = example_batch(model, input_shape)
    return {"params": count_params(model), "macs": count_macs(model, example).total}


def scan_model(model: nn.Module, plans: Sequence[LayerPlan], budget: Budget, input_shape: Sequence[int],
               calibration_input: torch.Tensor, source: str = "<recipe>") -> BudgetScan:
    """Build every budget layer's ladder and measure its sensitivities on ``calibration_input``."""
    todo = [i for i, p in enumerate(plans) if p.action == "decompose" and _method(p).supports_budget]
    if not todo:
        raise BudgetError(f"{source}: budget: the recipe decomposes no layer with {', '.join(BUDGET_METHODS)}, so "
                          "there is nothing to allocate; add rules with a method")
    # TT MACs need one layer object per rung (the contraction schedule): only when a MAC budget asks
    has_macs = budget.metric == "macs" or not any(_method(plans[i]).costly_ladder_macs for i in todo)
    ladders = [build_ladder(model.get_submodule(plans[i].name), plans[i], want_macs=has_macs) for i in todo]
    was_training = model.training
    model.eval()
    try:
        modules = {lad.plan.name: lad.module for lad in ladders}
        probe = _Probe(model, calibration_input, modules)
        # the per-layer scan runs hundreds of forwards: on the first scan_samples samples only
        few = calibration_input[: budget.scan_samples]
        scan_probe = probe if few.shape[0] == calibration_input.shape[0] else _Probe(model, few, modules)
        for lad in ladders:
            scan(lad, scan_probe, budget)
    finally:
        model.train(was_training)
    return BudgetScan(model, list(plans), todo, ladders, _whole_model_totals(model, input_shape), probe, budget,
                      source, has_macs, scan_probe=scan_probe)


def allocate(scanned: BudgetScan, budget: Budget) -> Allocation:
    """Meet ``budget`` at the least total sensitivity (see the module docstring), or raise
    :class:`BudgetError` when it cannot be met within 2%."""
    metric, source = budget.metric, scanned.source
    if metric == "macs" and not scanned.has_macs:
        raise ValueError("this scan was built without MACs; scan again with a MAC budget")
    total, fixed = scanned.totals[metric], scanned.fixed(metric)
    target = budget.ratio * total
    unit = "params" if metric == "params" else "MACs"
    costs = [lad.cost(metric).astype(np.float64) for lad in scanned.ladders]
    sens = [lad.sens for lad in scanned.ladders]
    smallest = fixed + sum(c[0] for c in costs)
    if smallest > target * (1 + TOLERANCE) and any(lad.trimmed for lad in scanned.ladders):
        raise BudgetError(f"{source}: budget {budget.label} cannot be met without making layers slower: every rank of "
                          f"{', '.join(lad.plan.name for lad in scanned.ladders if lad.dropped)[:200]} would raise its "
                          "MACs above dense (allow_growth: true in its rule allows that)")
    if smallest > target * (1 + TOLERANCE):
        raise BudgetError(f"{source}: budget {budget.label} cannot be met: the smallest ranks give "
                          f"{smallest / total:.3g} of the model's {unit} ({fixed / total:.3g} in what the budget "
                          f"does not touch); raise the ratio or decompose more layers")
    room = target - fixed
    choice = greedy_allocate(costs, sens, room)
    if sum(c[i] for c, i in zip(costs, choice)) + fixed < target * (1 - TOLERANCE):
        choice = _nudge(costs, sens, choice, fixed, target)
    uniform = uniform_allocate(costs, room)
    uniform_r = uniform_rank_allocate(scanned.ladders, costs, room)
    theirs = objective(sens, uniform)

    def spent(ch: Sequence[int]) -> float:
        return float(sum(c[i] for c, i in zip(costs, ch)))

    # the per-layer sum is only a proxy: measure the candidates whole, start from the greedy one unless
    # another that meets the budget is better beyond the calibration batch's noise, and improve it by a
    # local search on the same whole-model measure (a move must be significantly better too)
    started = time.perf_counter()
    starts = [("greedy", choice), ("uniform fractions", uniform), ("uniform ranks", uniform_r)]
    scores = {name: scanned.combined(ch) for name, ch in starts}
    valid = [(name, ch) for name, ch in starts if _within(spent(ch) + fixed, target)]
    evaluations = moves = 0
    start = "greedy"
    if valid:
        start, choice = valid[0]
        for name, ch in valid[1:]:
            if scanned.better(ch, choice):
                start, choice = name, ch
        hi = max(target, spent(choice) + fixed) - fixed
        lo = target * (1 - TOLERANCE) - fixed
        choice, evaluations, moves = refine(scanned.combined, costs, sens, list(choice), lo, hi, budget.refine,
                                            better=scanned.better)
    combined = scanned.combined(choice)
    used_uniform = list(choice) == list(uniform)
    achieved = fixed + spent(choice)
    if not _within(achieved, target):
        trimmed = [lad.plan.name for lad in scanned.ladders if lad.trimmed]
        why = (f"the larger ranks of {', '.join(trimmed[:3])}{' …' if len(trimmed) > 3 else ''} were left out because "
               "they would raise the layer's MACs above dense (allow_growth: true in its rule keeps them)" if trimmed
               else "the layers' rank steps are too coarse for this model")
        raise BudgetError(f"{source}: budget {budget.label}: the closest allocation found gives "
                          f"{achieved / total:.4g} of the model's {unit}, more than {TOLERANCE:.0%} off; {why} — "
                          "try another ratio")
    seconds = time.perf_counter() - started
    log.info("budget %s: start %s (greedy %.4g, uniform fractions %.4g, uniform ranks %.4g), local search "
             "%d evaluations, %d moves → %.4g in %.2fs", budget.label, start, scores["greedy"],
             scores["uniform fractions"], scores["uniform ranks"], evaluations, moves, combined, seconds)
    beaten_by = [name for name, ch in valid if scanned.better(ch, choice)]
    return Allocation(budget, list(choice), achieved / total, objective(sens, choice), theirs, used_uniform,
                      combined, scores["uniform fractions"], scores["uniform ranks"], scores["greedy"], start,
                      evaluations, moves, seconds, beaten_by)


def rank_size(rank: Any) -> int:
    """One number per rank configuration, for "the same rank on every layer": the rank itself, or
    the largest of a list (TT bonds, Tucker-2 pairs)."""
    return int(max(rank)) if isinstance(rank, (list, tuple)) else int(rank)


def uniform_rank_allocate(ladders: Sequence[Ladder], costs: list[np.ndarray], room: float) -> list[int]:
    """The same rank r on every layer (a layer whose ladder stops below r stays dense), with the
    largest r whose total fits ``room``: the usual hand-made baseline, which uniform fractions miss
    when layers differ in shape (a small classifier layer gets rank 1 from a fraction)."""
    sizes = [np.array([rank_size(r) for r in lad.ranks[: lad.dense]], dtype=np.int64) for lad in ladders]

    def pick(r: int) -> list[int]:
        out = []
        for lad, sz in zip(ladders, sizes):
            fits = np.flatnonzero(sz <= r)
            out.append(lad.dense if not sz.size or r > sz[-1] else int(fits[-1]) if fits.size else 0)
        return out

    best = pick(0)
    for r in sorted({int(v) for sz in sizes for v in sz}):
        ch = pick(r)
        if sum(c[i] for c, i in zip(costs, ch)) <= room:
            best = ch
    return best


def refine(score: Callable[[Sequence[int]], float], costs: list[np.ndarray], sens: list[np.ndarray],
           choice: list[int], lo: float, hi: float, max_evaluations: int,
           better: Callable[[Sequence[int], Sequence[int]], bool] | None = None) -> tuple[list[int], int, int]:
    """Local search on the whole-model ``score``: pairwise moves (one layer up by about a step, another
    down as far as needed to keep the total in [``lo``, ``hi``]), or one layer up where the window
    allows; the best improving move of each round is taken, steps from coarse to fine, at most
    ``max_evaluations`` scores. With many layers only the per-layer proxy's best few raise/lower
    candidates are paired, so a round stays small. A move counts as improving when ``better(candidate,
    current)`` (by default: a lower score). Returns (choice, evaluations, moves)."""
    improves = better or (lambda a, b: score(a) < score(b) - 1e-12)
    current = list(choice)
    evaluations = moves = 0
    n = len(costs)
    for frac in REFINE_STEPS:
        while evaluations < max_evaluations:
            total = float(sum(c[i] for c, i in zip(costs, current)))
            candidates = _moves(costs, sens, current, frac * total, total, lo, hi, n)
            found: tuple[float, list[int]] | None = None
            for cand in candidates:
                if evaluations >= max_evaluations:
                    break
                evaluations += 1
                value = score(cand)
                if improves(cand, current) and (found is None or value < found[0]):
                    found = (value, cand)
            if found is None:
                break
            current = found[1]
            moves += 1
    return current, evaluations, moves


def _moves(costs: list[np.ndarray], sens: list[np.ndarray], current: list[int], step: float, total: float,
           lo: float, hi: float, n: int) -> list[list[int]]:
    """The candidate allocations one move away from ``current`` (see :func:`refine`)."""
    ups: list[tuple[float, int, int]] = []       # (proxy gain per cost, layer, new rung)
    for i, c in enumerate(costs):
        cur = current[i]
        larger = np.flatnonzero(c > c[cur])
        if not larger.size:
            continue
        reach = larger[c[larger] >= c[cur] + step]
        j = int(reach[np.argmin(c[reach])]) if reach.size else int(larger[np.argmax(c[larger])])
        ups.append(((sens[i][cur] - sens[i][j]) / max(float(c[j] - c[cur]), 1.0), i, j))
    downs: list[tuple[float, int]] = []          # (proxy loss per cost at the step, layer)
    for i, c in enumerate(costs):
        cur = current[i]
        smaller = np.flatnonzero(c < c[cur])
        if smaller.size:
            reach = smaller[c[smaller] <= c[cur] - step]
            j = int(reach[np.argmax(c[reach])]) if reach.size else int(smaller[np.argmin(c[smaller])])
            downs.append(((sens[i][j] - sens[i][cur]) / max(float(c[cur] - c[j]), 1.0), i))
    if n > REFINE_LAYERS + 2:
        ups = sorted(ups, key=lambda t: -t[0])[:REFINE_LAYERS]
        downs = sorted(downs)[:REFINE_LAYERS]
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()

    def add(cand: list[int]) -> None:
        key = tuple(cand)
        if key not in seen and key != tuple(current):
            seen.add(key)
            out.append(cand)

    for _, i, up in ups:
        added = float(costs[i][up] - costs[i][current[i]])
        if lo <= total + added <= hi:
            add([up if k == i else r for k, r in enumerate(current)])
        for _, j in downs:
            if j == i:
                continue
            c, cur = costs[j], current[j]
            # the largest rung of layer j that brings the total back under hi
            fits = np.flatnonzero((c < c[cur]) & (total + added - c[cur] + c <= hi))
            if not fits.size:
                continue
            down = int(fits[np.argmax(c[fits])])
            if total + added - c[cur] + c[down] >= lo:
                add([up if k == i else down if k == j else r for k, r in enumerate(current)])
    return out


def _replan(ladder: Ladder, rung: int, shapes: tuple[list[int], list[int]], source: str) -> LayerPlan:
    base = ladder.plan
    if ladder.ranks[rung] is None:
        return LayerPlan(name=base.name, type=base.type, action="keep", method="none", decided_by=base.decided_by,
                         rules=list(base.rules), settings=dict(base.settings), input_shape=base.input_shape,
                         params_before=base.params_before, params_after=base.params_before,
                         macs_before=base.macs_before, macs_after=base.macs_before)
    choice = LayerChoice(base.name, base.type, {**base.settings, "rank": ladder.ranks[rung]}, list(base.rules),
                         base.decided_by)
    return plan_layer(choice, ladder.module, shapes, source)


def finish(scanned: BudgetScan, allocation: Allocation) -> Plan:
    """The plan with the allocated ranks: each budget layer re-planned at its rung (its sensitivity
    measured exactly where it was interpolated), and a summary with the whole allocation's error."""
    budget, probe, source = allocation.budget, scanned.probe, scanned.source
    weights = scanned.weights(allocation.choice)
    for lad, rung in zip(scanned.ladders, allocation.choice):
        if rung == lad.dense:
            continue
        w = weights[lad.plan.name][1]
        if not lad.measured[rung]:
            lad.sens[rung] = (scanned.scan_probe or probe).measure(budget, lad.plan.name, lad.module, w)
            lad.measured[rung] = True
    combined = math.sqrt(probe.model_error(weights)) if weights else 0.0
    _, disagreement, kl_final = scanned.selection(allocation.choice)

    unit = "parameter" if budget.metric == "params" else "MAC"
    out = list(scanned.plans)
    for index, lad, rung in zip(scanned.todo, scanned.ladders, allocation.choice):
        plan = _replan(lad, rung, probe.shapes[lad.plan.name], source)
        kl = budget.sensitivity == "kl"  # KL is reported as is; squared relative errors as their root
        err = float(lad.sens[rung]) if kl else math.sqrt(max(float(lad.sens[rung]), 0.0))
        measured = int(lad.measured[: lad.dense].sum())
        if lad.dropped:
            plan.reason = f"budget: {lad.dropped.removeprefix(KEPT_FOR_GROWTH).strip()}; kept dense"
        elif rung == lad.dense:
            plan.reason = f"budget: more error per {unit} saved than elsewhere (candidates {lad.span()})"
        else:
            plan.reason = (f"budget: {plan.method} rank {lad.ranks[rung]} (of {lad.dense} candidates {lad.span()} "
                           f"and dense), {'ΔKL' if kl else 'Δerr'} {err:.3g}")
        plan.notes = [n for n in plan.notes if not n.startswith("rank ")]
        plan.notes.append(f"budget: {measured} of {lad.dense} ranks measured in {lad.seconds:.2f}s")
        plan.budget = {"rung": int(rung), "candidates": int(lad.dense), "measured": measured, "range": lad.span(),
                       "sensitivity": err, "measure": budget.sensitivity, "scan_seconds": round(lad.seconds, 3)}
        out[index] = plan
    metric = budget.metric
    total = scanned.totals[metric]
    achieved = scanned.fixed(metric) + sum(int(out[i].params_after if metric == "params" else out[i].macs_after)
                                           for i in scanned.todo)
    summary = {"metric": metric, "target_ratio": budget.ratio, "achieved_ratio": achieved / total,
               "total": int(total), "achieved": int(achieved), "fixed": int(scanned.fixed(metric)),
               "sensitivity": budget.sensitivity, "objective": allocation.objective,
               "uniform_objective": allocation.uniform_objective, "used_uniform": allocation.used_uniform,
               "combined": allocation.combined, "uniform_combined": allocation.uniform_combined,
               "uniform_ranks_combined": allocation.uniform_ranks_combined,
               "greedy_combined": allocation.greedy_combined, "selection_measure": probe.selection_measure,
               "disagreement": disagreement, "kl": kl_final, "start": allocation.start,
               "refine_evaluations": allocation.evaluations, "refine_moves": allocation.moves,
               "refine_seconds": round(allocation.refine_seconds, 3), "beaten_by": list(allocation.beaten_by),
               "model_output_error": combined, "layers": len(scanned.ladders),
               "candidates": int(sum(lad.dense for lad in scanned.ladders)),
               "measured": int(sum(int(lad.measured[: lad.dense].sum()) for lad in scanned.ladders)),
               "scan_seconds": round(sum(lad.seconds for lad in scanned.ladders), 3),
               "calibration_samples": int(probe.batch.shape[0]),
               "scan_samples": int((scanned.scan_probe or probe).batch.shape[0])}
    log.info("budget %s: achieved %.4f (%d of %d), Σ sensitivity %.4g (uniform fractions %.4g), scan %.1fs",
             budget.label, summary["achieved_ratio"], achieved, total, allocation.objective,
             allocation.uniform_objective, summary["scan_seconds"])
    return Plan(out, summary)


def apply_budget(model: nn.Module, plans: Sequence[LayerPlan], recipe: Recipe, input_shape: Sequence[int],
                 calibration_input: torch.Tensor | None = None) -> Plan:
    """Give every layer the planner left to the budget (``awaits_budget``) the rank of the allocation
    that meets ``recipe.budget`` at the least total sensitivity."""
    budget = Budget.from_mapping(recipe.budget or {})
    if calibration_input is None:
        calib = calibration_settings(recipe)
        calibration_input = example_batch(model, input_shape, calib["batch_size"], calib["seed"])
    scanned = scan_model(model, plans, budget, input_shape, calibration_input, recipe.source)
    allocation = allocate(scanned, budget)
    for _ in range(8):  # a layer is never made slower: drop the ranks that would, allocate again
        slower = slower_layers(scanned, allocation.choice)
        if not slower:
            break
        for k, why in slower.items():
            first = first_slower_rung(scanned, k, allocation.choice[k])
            scanned.ladders[k] = trim_ladder(scanned.ladders[k], first, why)
        scanned.reset_scores()
        allocation = allocate(scanned, budget)
    return finish(scanned, allocation)


def _slower(scanned: BudgetScan, k: int, rung: int) -> str | None:
    """Why rung ``rung`` of ladder ``k`` would make the layer larger or slower than dense, or None
    (its MACs counted exactly, by planning the layer at that rank)."""
    lad = scanned.ladders[k]
    if rung == lad.dense or lad.plan.settings.get("allow_growth", False):
        return None
    plan = _replan(lad, rung, scanned.probe.shapes[lad.plan.name], scanned.source)
    return plan.reason if plan.action == "keep" and plan.reason.startswith(KEPT_FOR_GROWTH) else None


def slower_layers(scanned: BudgetScan, choice: Sequence[int]) -> dict[int, str]:
    """The ladders whose chosen rank would make the layer larger or slower than dense (a params
    budget does not count MACs per rung), with the reason."""
    out: dict[int, str] = {}
    for k, rung in enumerate(choice):
        why = _slower(scanned, k, rung)
        if why:
            out[k] = why
    return out


def first_slower_rung(scanned: BudgetScan, k: int, slower: int) -> int:
    """The smallest rung of ladder ``k`` that is slower than dense, by bisection below the known
    slower rung ``slower`` (MACs grow with the rank)."""
    lo, hi = -1, slower  # rung lo is fine (or none), rung hi is slower
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _slower(scanned, k, mid):
            hi = mid
        else:
            lo = mid
    return hi


def trim_ladder(ladder: Ladder, rung: int, why: str) -> Ladder:
    """``ladder`` without ``rung`` and every rung at least as large (MACs grow with the rank), so the
    allocation picks a smaller rank or dense; with none left, why is remembered for the plan."""
    keep = [i for i in range(ladder.dense) if ladder.params[i] < ladder.params[rung]] + [ladder.dense]
    cut = Ladder(ladder.plan, ladder.module, [ladder.ranks[i] for i in keep], ladder.params[keep], ladder.macs[keep],
                 ladder.sens[keep], ladder.measured[keep], ladder.seconds)
    cut.dropped = why if len(keep) == 1 else ""
    cut.trimmed = True
    return cut


def _within(achieved: float, target: float) -> bool:
    return abs(achieved / target - 1) <= TOLERANCE + 1e-12 if target > 0 else achieved == 0


def _nudge(costs: list[np.ndarray], sens: list[np.ndarray], choice: list[int], fixed: float,
           target: float) -> list[int]:
    """Still more than 2% under the target (coarse steps): take the single move into the 2% window
    that increases the objective least (moves up lower it)."""
    total = fixed + sum(c[i] for c, i in zip(costs, choice))
    best: tuple[float, int, int] | None = None
    for layer, (c, s) in enumerate(zip(costs, sens)):
        new_total = total - c[choice[layer]] + c
        ok = (new_total >= target * (1 - TOLERANCE)) & (new_total <= target * (1 + TOLERANCE))
        for j in np.flatnonzero(ok):
            value = float(s[j] - s[choice[layer]])
            if best is None or value < best[0]:
                best = (value, layer, int(j))
    if best is None:
        return choice
    out = list(choice)
    out[best[1]] = best[2]
    return out
