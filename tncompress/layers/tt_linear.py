"""TT-matrix fully-connected layer (Novikov et al. 2015, "Tensorizing Neural Networks").

``W`` (``out_features × in_features``, as in ``nn.Linear``) is stored as TT cores
``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` (see :mod:`tncompress.decompositions.tt` for the index
convention) and ``y = x Wᵀ + b`` is computed core by core without ever forming ``W``.

Padded modes: the modes may multiply to more than the features (``Π n_k ≥ in_features``,
``Π m_k ≥ out_features``), so that sizes with a large prime factor (a 50,257-word vocabulary) still
get balanced modes. The cores then hold a ``Π m_k × Π n_k`` matrix ``W_pad`` and the layer computes
``y = W_pad[:out_features, :in_features] x + b``: the input is zero-padded and the output sliced.

Pure torch: a compressed model runs where tensorly is not installed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tncompress.decompositions.tt import (
    auto_modes,
    balance_core_norms,
    balanced_modes,
    clip_tt_ranks,
    tt_matrix_to_full,
    zero_padded,
)
from tncompress.errors import RankError
from tncompress.layers.base import FactorizedLayer, linear_unsupported_reason

__all__ = ["TTLinear"]

logger = logging.getLogger(__name__)

# Forward cost model (see ``_Plan`` and ``TTLinear._plan_for``). On a CPU the TT forward is bound by
# the intermediate tensors it writes, not by its MACs, and batched GEMMs whose per-batch matrices are
# small run far below peak. The cost of a plan is therefore
#     MACs + _ELEMENT_COST · (elements written) + _SMALL_GEMM_COST · Σ_bmm MACs / min(R, S, 64)
# (R, S: the per-batch output matrix of a batched step). The constants were fitted on a 2-core x86
# CPU (torch 2.x) over nine layer shapes, batches 1-512, ranks 4-32: the chosen plan was within 12%
# of the fastest of all plans in every case (2.4% on average), while the naive core-by-core chain
# was 1.5-23x slower.
_ELEMENT_COST = 16.0
_SMALL_GEMM_COST = 2.0
# Largest merged core allowed, as a fraction of M·N, so a plan never comes close to forming W.
_MAX_MERGED_FRACTION = 0.5
_PLAN_CACHE_SIZE = 32


@dataclass(frozen=True)
class _Step:
    """One 2-operand contraction of the forward: the state (P, Q, S) times a core (R, Q)."""

    group: int  # index into the plan's groups
    q: int  # contracted size
    r: int  # produced size
    s: int  # trailing size carried along (1: a single folded GEMM)


@dataclass(frozen=True)
class _Plan:
    """A forward schedule: merge contiguous cores into groups, then sweep over the groups.

    ``direction`` is ``"r2l"`` (last group first; the first step is one GEMM with the batch
    folded in) or ``"l2r"`` (first group first; the last step is one GEMM). Between steps the
    state keeps a layout in which the next contracted axes are adjacent, so no permutation of the
    (large) activations is ever needed; only the (small) cores are merged or permuted.
    """

    direction: str
    groups: tuple[tuple[int, int], ...]
    steps: tuple[_Step, ...]
    macs: int  # for the batch size the plan was costed at (its power-of-two bucket), merges included
    cost: float
    merge_macs: int = 0  # of which merging cores into groups (batch independent; cached at inference)


def _core_shape(core: Tensor) -> tuple[int, int, int, int]:
    r0, m, n, r1 = (int(v) for v in core.shape)
    return r0, m, n, r1


def _numel(shape: tuple[int, int, int, int]) -> int:
    return shape[0] * shape[1] * shape[2] * shape[3]


def _group_shape(shapes: Sequence[tuple[int, int, int, int]], a: int, b: int) -> tuple[int, int, int, int]:
    return (shapes[a][0], math.prod(s[1] for s in shapes[a:b]), math.prod(s[2] for s in shapes[a:b]), shapes[b - 1][3])


def _make_plan(
    shapes: Sequence[tuple[int, int, int, int]], groups: tuple[tuple[int, int], ...], direction: str, batch: int
) -> _Plan:
    """Cost one schedule for ``batch`` rows (MACs exactly as the forward runs them)."""
    macs = 0
    elements = 0
    small = 0.0
    gshapes = []
    merge_macs = 0
    for a, b in groups:
        r0, ma, na, r1 = shapes[a]
        for k in range(a + 1, b):
            _, mb, nb, r2 = shapes[k]
            macs += r0 * ma * na * r1 * mb * nb * r2
            merge_macs += r0 * ma * na * r1 * mb * nb * r2
            ma, na, r1 = ma * mb, na * nb, r2
            elements += 2 * r0 * ma * na * r1  # the GEMM output and its permuted copy
        gshapes.append((r0, ma, na, r1))
        if direction == "l2r":
            elements += r0 * ma * na * r1  # the permuted copy of the core
    n_sizes = [g[2] for g in gshapes]
    m_sizes = [g[1] for g in gshapes]
    current = batch * math.prod(n_sizes)
    steps = []
    order = range(len(gshapes) - 1, -1, -1) if direction == "r2l" else range(len(gshapes))
    for k in order:
        r0, mk, nk, r1 = gshapes[k]
        if direction == "r2l":
            q, r, s = nk * r1, r0 * mk, math.prod(m_sizes[k + 1 :])
        else:
            q, r, s = r0 * nk, mk * r1, math.prod(n_sizes[k + 1 :])
        p = current // (q * s)
        step_macs = p * r * s * q
        macs += step_macs
        current = p * r * s
        elements += current
        if s > 1:
            small += step_macs / min(r, s, 64)
        steps.append(_Step(k, q, r, s))
    cost = macs + _ELEMENT_COST * elements + _SMALL_GEMM_COST * small
    return _Plan(direction, groups, tuple(steps), macs, cost, merge_macs)


def _candidate_groupings(d: int) -> list[tuple[tuple[int, int], ...]]:
    """Ways to cut ``d`` cores into contiguous groups, never the single all-in-one group (W).

    All 2^(d-1) - 1 of them up to ``d = 10``; beyond that, runs of equal length (the search
    would otherwise grow too large, and such long chains are rare).
    """
    if d > 10:
        out = []
        for size in range(1, d):
            bounds = [*range(0, d, size), d]
            out.append(tuple((bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)))
        return out
    out = []
    for mask in range(2 ** (d - 1)):
        bounds = [0, *[i + 1 for i in range(d - 1) if mask >> i & 1], d]
        if d > 1 and len(bounds) == 2:
            continue  # that would be W itself
        out.append(tuple((bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)))
    return out


class TTLinear(FactorizedLayer):
    """A linear layer whose weight is a TT matrix; a drop-in replacement for ``nn.Linear``.

    ``in_modes``/``out_modes`` factor ``in_features``/``out_features`` (chosen by
    :func:`~tncompress.decompositions.tt.auto_modes` when omitted), or a padded size at least as large
    (see the module docstring; ``padded_in_features``/``padded_out_features`` are the products);
    ``ranks`` is one rank for every bond (clipped at each bond's useful maximum) or an explicit list
    of ``d - 1`` ranks.
    """

    method = "tt"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.in_modes, self.out_modes = self._resolve_modes(self.in_features, self.out_features, in_modes, out_modes)
        self.padded_in_features = math.prod(self.in_modes)
        self.padded_out_features = math.prod(self.out_modes)
        self.ranks = clip_tt_ranks(ranks, self.out_modes, self.in_modes)
        full = [1, *self.ranks, 1]
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], m, n, full[k + 1], **factory))
            for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes))
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self._plans: dict[int, _Plan] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _resolve_modes(
        in_features: int, out_features: int, in_modes: Sequence[int] | None, out_modes: Sequence[int] | None
    ) -> tuple[list[int], list[int]]:
        """Fill in missing modes (same ``d`` as the given side) and check each side's product covers
        its features (equal, or larger: padded)."""
        if in_modes is None and out_modes is None:
            return auto_modes(in_features, out_features)
        if in_modes is None or out_modes is None:
            given = list(in_modes if in_modes is not None else out_modes)  # type: ignore[arg-type]
            other = balanced_modes(out_features if in_modes is not None else in_features, len(given))
            # Pair the largest of the new modes with the smallest given ones: even core sizes.
            order = sorted(range(len(given)), key=lambda k: given[k])
            filled = [0] * len(given)
            for pos, value in zip(order, sorted(other, reverse=True)):
                filled[pos] = value
            in_modes, out_modes = (given, filled) if in_modes is not None else (filled, given)
        in_m, out_m = [int(v) for v in in_modes], [int(v) for v in out_modes]
        if len(in_m) != len(out_m) or not in_m:
            raise RankError(f"in_modes {in_m} and out_modes {out_m} must be non-empty and of the same length")
        if any(v < 1 for v in in_m + out_m):
            raise RankError(f"TT modes must be positive integers, got in {in_m}, out {out_m}")
        if math.prod(in_m) < in_features or math.prod(out_m) < out_features:
            raise RankError(
                f"TT modes do not fit a {in_features}->{out_features} layer: prod(in_modes={in_m}) = "
                f"{math.prod(in_m)} (need ≥ {in_features}), prod(out_modes={out_m}) = {math.prod(out_m)} "
                f"(need ≥ {out_features})"
            )
        return in_m, out_m

    def reset_parameters(self) -> None:
        """Random init whose materialised W has nn.Linear's default variance.

        nn.Linear draws W ~ U(±1/√in) (kaiming-uniform, a=√5), so Var(W_ij) = 1/(3·in). With i.i.d.
        N(0, σ²) cores, Var(W_ij) = σ^{2d}·Π r_k, hence σ = (std / √Π r_k)^(1/d). Every entry of a
        padded W_pad has that variance, so its real block matches the dense layer (real ``in_features``).
        """
        d = len(self.cores)
        std = 1.0 / math.sqrt(3.0 * self.in_features)
        sigma = (std / math.sqrt(math.prod(self.ranks))) ** (1.0 / d)
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, sigma)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @staticmethod
    def unsupported_reason(linear: nn.Module) -> str | None:
        """Why ``linear`` cannot become a TTLinear (one line), or None."""
        return linear_unsupported_reason(linear, "TT")

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        ranks: int | Sequence[int] | None = 8,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        rel_eps: float | None = None,
    ) -> "TTLinear":
        """A TT layer approximating a trained ``linear`` by TT-SVD (float64, cast back).

        ``ranks`` caps the bond ranks (``None``: no cap); ``rel_eps`` additionally truncates so the
        relative Frobenius error of W is at most ``rel_eps``. The scale is spread evenly over the
        cores (equal Frobenius norms), which keeps gradients balanced when fine-tuning. With padded
        modes the weight is zero-padded first (:meth:`padded_weight`); at full rank the layer is exact.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"TTLinear.from_dense expects an nn.Linear, got {type(linear).__name__}")
        reason = cls.unsupported_reason(linear)
        if reason is not None:
            raise RankError(f"cannot use TT here: {reason}")
        from tncompress.decompositions.tt import tt_matrix_svd  # pure torch; imported where needed

        in_m, out_m = cls._resolve_modes(linear.in_features, linear.out_features, in_modes, out_modes)
        weight = linear.weight.detach()
        cores = tt_matrix_svd(cls.padded_weight(weight, in_m, out_m), out_m, in_m, ranks=ranks, rel_eps=rel_eps)
        cores = balance_core_norms(cores)
        layer = cls(
            linear.in_features,
            linear.out_features,
            in_modes=in_m,
            out_modes=out_m,
            ranks=[int(c.shape[3]) for c in cores[:-1]],
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for param, core in zip(layer.cores, cores):
                param.copy_(core.to(dtype=weight.dtype, device=weight.device))
            if layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @staticmethod
    def padded_weight(weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> Tensor:
        """``weight`` (out × in) zero-padded to ``(Π out_modes, Π in_modes)`` in float64, for TT-SVD; the
        weight itself when the modes multiply out exactly (no copy)."""
        return zero_padded(weight, math.prod(out_modes), math.prod(in_modes))

    @classmethod
    def input_kronecker_modes(cls, module: nn.Module, config: dict[str, Any]) -> list[int] | None:
        """The input modes ``module`` is split into (the cores' ``n_k``), for Kronecker whitening.

        None when the in modes are padded: the input does not reshape into them, so that data-aware
        path is skipped (padded out modes are fine: whitening acts on the input side only).
        """
        if not isinstance(module, nn.Linear):
            return None
        in_m, _ = cls._resolve_modes(module.in_features, module.out_features, config.get("in_modes"),
                                     config.get("out_modes"))
        return in_m if math.prod(in_m) == module.in_features else None

    def map_input_modes(self, maps: list[Tensor]) -> None:
        """``G_k[a, m, j, b] ← Σ_n G_k[a, m, n, b] · maps[k][n, j]`` (float64), then the cores' scale is
        spread evenly again as in :meth:`from_dense`. With padded in modes the maps act on the padded
        input (that is why :meth:`input_kronecker_modes` returns None then)."""
        if len(maps) != len(self.cores):
            raise RankError(f"expected {len(self.cores)} input-mode maps, got {len(maps)}")
        with torch.no_grad():
            mapped = [torch.einsum("amnb,nj->amjb", core.double(), m.to(core.device, torch.float64))
                      for core, m in zip(self.cores, maps)]
            mapped = balance_core_norms(mapped)
            for param, core in zip(self.cores, mapped):
                param.copy_(core.to(param.dtype))

    # ------------------------------------------------------------------ contract helpers

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this structure (JSON-safe)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "ranks": list(self.ranks),
            "bias": self.bias is not None,
        }

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same dtype and device); forms W explicitly (the real block
        of W_pad when the modes are padded)."""
        ref = self.cores[0]
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            dense.weight.copy_(tt_matrix_to_full([c.detach() for c in self.cores])[: self.out_features, : self.in_features])
            if self.bias is not None:
                dense.bias.copy_(self.bias.detach())
        return dense

    def num_core_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """MACs of one inference forward of a single sample, exactly as run with the merged cores
        precomputed by ``merge()`` (see :meth:`merge_macs` for the merge, which every forward of an
        unmerged layer repeats).

        The bias add is not a MAC and is not counted (as in FlopCounterMode), nor are the zero-padding
        of the input and the slicing of the output for padded modes; the contractions run over the
        padded sizes and are counted as such.
        """
        plan = self._plan_for(1)
        return plan.macs - plan.merge_macs

    def macs_for_rows(self, rows: int) -> int:
        """MACs of one merged inference forward of ``rows`` feature vectors (a sequence of tokens, or
        a batch), with the schedule chosen for that many rows: a long sequence may run another
        schedule than a single row (forming W, for large ranks)."""
        rows = max(1, int(rows))
        plan = self._plan_for(rows)
        bucket = 1 << max(0, rows - 1).bit_length()
        return (plan.macs - plan.merge_macs) * rows // bucket

    def merge_macs(self, batch: int = 1) -> int:
        """MACs of merging neighbouring cores for the plan used at ``batch``: done on every forward,
        once after ``merge()``."""
        return self._plan_for(batch).merge_macs

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
            f"params={self.num_core_params()}, bias={self.bias is not None}"
        )
        if self.padded_in_features != self.in_features or self.padded_out_features != self.out_features:
            text += (f", padded=in {self.in_features}→{self.in_modes}={self.padded_in_features}, "
                     f"out {self.out_features}→{self.out_modes}={self.padded_out_features}")
        return text

    # ------------------------------------------------------------------ forward

    def _plan_for(self, batch: int) -> _Plan:
        """The cheapest schedule for ``batch`` rows, cached per power-of-two batch bucket.

        Why not the plain core-by-core chain: at fc6 (25088→4096, modes 2,7,8,8,7,4 / 4^6, rank 4,
        batch 64) it writes ~13M intermediate elements (the second step alone is B·896·4·16) and
        runs many small batched GEMMs. Merging neighbouring cores first (cheap: they are tiny and
        batch independent) gives fewer, larger GEMMs and smaller intermediates. All contiguous
        groupings × both sweep directions are costed (``_make_plan``) and the cheapest is kept;
        at fc6 / batch 64 that is groups (1-2)(3)(4)(5-6), right to left, about 5x faster than the
        plain chain and 20x faster than nn.Linear on 2 CPU threads.
        """
        bucket = 1 << max(0, int(batch) - 1).bit_length()
        plan = self._plans.get(bucket)
        if plan is not None:
            return plan
        shapes = [_core_shape(c) for c in self.cores]
        limit = _MAX_MERGED_FRACTION * self.padded_in_features * self.padded_out_features
        best: _Plan | None = None
        candidates = _candidate_groupings(len(shapes))
        whole = ((0, len(shapes)),)
        if len(shapes) > 1:
            # W itself is a candidate, costed like every schedule (its merge MACs, its elements, one
            # GEMM): with large ranks every chain costs more than forming W once (768→3072 at full TT
            # rank ran 201 G MACs per 197 rows as a chain against 0.47 G through W; at half the
            # parameters, 87 G for 1,576 rows with 0.7 G elements of intermediates per call). For the
            # small ranks TT is meant for, the chain is far cheaper and W is never chosen.
            candidates = [*candidates, whole]
        for groups in candidates:
            if groups != whole and any(b - a > 1 and _numel(_group_shape(shapes, a, b)) > limit for a, b in groups):
                continue
            for direction in ("r2l", "l2r"):
                plan = _make_plan(shapes, groups, direction, bucket)
                if best is None or plan.cost < best.cost:
                    best = plan
        assert best is not None
        if len(self._plans) >= _PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[bucket] = best
        logger.debug("TTLinear %s: plan %s %s for batch %d", self.ranks, best.direction, best.groups, bucket)
        return best

    def _precompute(self) -> dict[Any, list[Tensor]]:
        """``merge()``'s snapshot: merged cores per schedule, filled as batch sizes are met."""
        return {}

    def _merged_cores(self, plan: _Plan) -> list[Tensor]:
        """Each group's cores contracted into one core, laid out as the (R, Q) matrix a step needs.

        Computed from the current cores on every call, unless the layer was ``merge()``d for
        inference and the snapshot is still valid (see :mod:`tncompress.layers.base`): at batch 1
        merging costs about as much as the contraction itself (1024→1024, rank 8).
        """
        cores = list(self.cores)
        if not torch.is_grad_enabled():
            # Views of a Parameter keep requires_grad=True even under no_grad, and then
            # torch.matmul(2-D, 3-D) copies the activations to fold them; detaching avoids that
            # (4x faster at fc6) and changes nothing else when no graph is recorded.
            cores = [c.detach() for c in cores]
        snapshot = self._merged_ops()
        if snapshot is None:
            return self._merge(cores, plan)
        key = (plan.groups, plan.direction)
        if key not in snapshot:
            snapshot[key] = self._merge([c.detach() for c in cores], plan)
        return snapshot[key]

    @staticmethod
    def _merge(cores: list[Tensor], plan: _Plan) -> list[Tensor]:
        out = []
        for a, b in plan.groups:
            core = cores[a]
            for k in range(a + 1, b):
                nxt = cores[k]
                r0, ma, na, r1 = core.shape
                _, mb, nb, r2 = nxt.shape
                core = torch.mm(core.reshape(-1, r1), nxt.reshape(r1, -1))
                core = core.reshape(r0, ma, na, mb, nb, r2).permute(0, 1, 3, 2, 4, 5).reshape(r0, ma * mb, na * nb, r2)
            r0, m, n, r1 = core.shape
            if plan.direction == "r2l":
                out.append(core.reshape(r0 * m, n * r1))  # contract (n, r1), produce (r0, m): a view
            else:
                out.append(core.permute(1, 3, 0, 2).reshape(m * r1, r0 * n))  # contract (r0, n), produce (m, r1)
        return out

    def _forward_with_plan(self, x: Tensor, plan: _Plan) -> Tensor:
        lead = x.shape[:-1]
        t = x.reshape(-1, self.in_features)
        if self.padded_in_features != self.in_features:
            t = F.pad(t, (0, self.padded_in_features - self.in_features))  # zeros meet W_pad's extra columns
        sliced = self.padded_out_features != self.out_features
        mats = self._merged_cores(plan)
        # State layouts (never permuted): r2l before step k: (B, N_1..N_k, r_k, M_{k+1}..M_K);
        # l2r before step k: (B, M_1..M_{k-1}, r_{k-1}, N_k..N_K). The contracted axes (N_k, r_k) /
        # (r_{k-1}, N_k) are adjacent, so each step is a GEMM on a free view: a single folded GEMM
        # when nothing trails (s == 1), else a batched GEMM that broadcasts the core.
        last = len(plan.steps) - 1
        for i, step in enumerate(plan.steps):
            mat = mats[step.group]
            if step.s == 1:
                t = t.reshape(-1, step.q)
                if i == last and self.bias is not None and not sliced and step.r == self.out_features:  # fuse the bias
                    t = torch.addmm(self.bias, t, mat.t())
                    return t.reshape(*lead, self.out_features)
                t = torch.mm(t, mat.t())
            else:
                t = torch.matmul(mat, t.reshape(-1, step.q, step.s))
        if sliced:
            t = t.reshape(-1, self.padded_out_features)[:, : self.out_features]
            if self.bias is None:
                t = t.contiguous()  # as nn.Linear's output: later .view() calls must work
        y = t.reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TTLinear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        numel = x.numel()
        # Under torch.export the batch is symbolic: choosing a schedule by its value would freeze
        # it, so exported graphs use the batch-1 schedule (every schedule is exact at any batch).
        # torch.jit.trace freezes whatever schedule it sees anyway, so it gets the one for the traced
        # rows: the batch-1 schedule of a large-rank layer run on a 394-row trace needed 0.7 GB per call.
        if isinstance(numel, int):
            batch = numel // self.in_features
        else:
            batch = int(numel) // self.in_features if torch.jit.is_tracing() else 1
        return self._forward_with_plan(x, self._plan_for(batch))
