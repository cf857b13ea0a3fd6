"""TT-matrix (Tensor-Train) format for fully-connected weights: modes, ranks, TT-SVD.

Pure torch (layers import the mode/rank helpers, and layers must run without tensorly).

Conventions (Novikov et al. 2015): ``W`` is ``out_features × in_features`` like
``nn.Linear.weight``, with ``M = m_1···m_d`` (out modes) and ``N = n_1···n_d`` (in modes). Row
index ``(i_1..i_d)`` and column index ``(j_1..j_d)`` are C-order multi-indices, and

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] · G_2[:, i_2, j_2, :] ··· G_d[:, i_d, j_d, :]

with cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` and ``r_0 = r_d = 1``. "Ranks" in the public
API are the ``d - 1`` inner bond ranks ``r_1..r_{d-1}``; bond ``k`` (1-based) joins cores ``k`` and
``k + 1``.
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from tncompress.errors import RankError

__all__ = [
    "balanced_modes",
    "padded_modes",
    "auto_modes",
    "balance_core_norms",
    "zero_padded",
    "default_tt_order",
    "max_tt_ranks",
    "clip_tt_ranks",
    "tt_param_count",
    "tt_rank_for_fraction",
    "tt_matrix_svd",
    "tt_matrix_to_full",
]

logger = logging.getLogger(__name__)


def _prime_factors(n: int) -> list[int]:
    factors: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise RankError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def balanced_modes(features: int, d: int) -> list[int]:
    """Split ``features`` into ``d`` integer factors that are as equal as possible (ascending).

    Prime factors, largest first, each go into the currently smallest group (greedy LPT), so
    25088 = 2^9·7^2 over 6 groups gives [4, 4, 4, 7, 7, 8]. When ``features`` has fewer than ``d``
    prime factors the remaining groups are 1.
    """
    features = _positive_int(features, "features")
    d = _positive_int(d, "number of TT cores d")
    groups = [1] * d
    for p in sorted(_prime_factors(features), reverse=True):
        i = min(range(d), key=lambda k: groups[k])
        groups[i] *= p
    return sorted(groups)


DEGENERATE_RATIO = 4.0
"""Modes whose largest is more than this many times the smallest are degenerate (50,257 = 29·1733
split over 4 cores is [1, 1, 29, 1733]): :func:`padded_modes` then pads the size."""

PAD_SLACK = 0.03
"""At most this share of extra (zero) rows or columns :func:`padded_modes` adds."""


def _spread(modes: Sequence[int]) -> float:
    return max(modes) / min(modes)


def padded_modes(features: int, d: int, slack: float = PAD_SLACK) -> list[int]:
    """:func:`balanced_modes` of ``features``, or of the smallest size up to ``slack`` larger whose
    modes are the most even, when those of ``features`` itself are degenerate (spread above
    :data:`DEGENERATE_RATIO`). The product may then exceed ``features``: a TT layer pads the input
    with zeros or drops the extra outputs."""
    modes = balanced_modes(features, d)
    extra = int(features * slack)
    if d < 2 or extra < 1 or _spread(modes) <= DEGENERATE_RATIO:
        return modes
    best, best_key = modes, (_spread(modes), 0)
    for size in range(features + 1, features + extra + 1):
        trial = balanced_modes(size, d)
        key = (_spread(trial), size - features)
        if key < best_key:
            best, best_key = trial, key
            if key[0] <= 1.5:
                break
    return best


def balance_core_norms(cores: Sequence[Tensor]) -> list[Tensor]:
    """The same TT with every core rescaled to the geometric mean of their Frobenius norms (the
    product is unchanged), which keeps the cores' gradients balanced when fine-tuning."""
    norms = [float(torch.linalg.norm(c)) for c in cores]
    if not all(n > 0.0 for n in norms):
        return list(cores)
    target = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [c * (target / n) for c, n in zip(cores, norms)]


def zero_padded(matrix: Tensor, rows: int, cols: int) -> Tensor:
    """``matrix`` in float64 with zero rows and columns added up to ``rows × cols`` (the matrix itself,
    no copy, when it already has that shape): what TT-SVD of padded modes decomposes."""
    if (rows, cols) == tuple(matrix.shape):
        return matrix
    padded = matrix.new_zeros(rows, cols, dtype=torch.float64)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix.detach()
    return padded


def default_tt_order(features: int) -> int:
    """The default number of TT cores ``d`` for a layer whose larger side has ``features``.

    Rule: 2 below 32 features, 3 below 256, otherwise 4 (modes of roughly 4–16 for layers of a
    few hundred to tens of thousands of features, where TT layers are both small and fast).
    """
    if features < 32:
        return 2
    if features < 256:
        return 3
    return 4


def auto_modes(
    in_features: int, out_features: int, d: int | None = None
) -> tuple[list[int], list[int]]:
    """Default ``(in_modes, out_modes)`` for a TT layer of ``in_features → out_features``.

    ``d`` defaults to :func:`default_tt_order` of the larger side, reduced to the larger number of
    prime factors of the two sides (at least 2) so that no core is a useless 1×1 slice. Each side is
    split by :func:`balanced_modes`; large in-modes are paired with small out-modes so the
    per-core sizes ``m_k·n_k`` are even, and the largest cores go to the two ends of the chain
    (V-shaped), which makes the bond maxima ``min(Π_{j≤k} m_j n_j, Π_{j>k} m_j n_j)`` as large
    as possible, so that the requested ranks are not clipped needlessly.
    """
    in_features = _positive_int(in_features, "in_features")
    out_features = _positive_int(out_features, "out_features")
    if d is None:
        d = default_tt_order(max(in_features, out_features))
        most = max(len(_prime_factors(in_features)), len(_prime_factors(out_features)), 2)
        d = min(d, most)
    d = _positive_int(d, "number of TT cores d")
    n_sorted = padded_modes(in_features, d)  # ascending
    m_sorted = padded_modes(out_features, d)[::-1]  # descending
    pairs = sorted(zip(m_sorted, n_sorted), key=lambda mn: (-mn[0] * mn[1], -mn[1]))
    slots: list[tuple[int, int] | None] = [None] * d
    left, right = 0, d - 1
    for i, pair in enumerate(pairs):
        if i % 2 == 0:
            slots[left] = pair
            left += 1
        else:
            slots[right] = pair
            right -= 1
    out_modes = [s[0] for s in slots if s is not None]
    in_modes = [s[1] for s in slots if s is not None]
    return in_modes, out_modes


def _check_modes(out_modes: Sequence[int], in_modes: Sequence[int]) -> tuple[list[int], list[int]]:
    out_m = [_positive_int(v, "every out mode") for v in out_modes]
    in_m = [_positive_int(v, "every in mode") for v in in_modes]
    if len(out_m) != len(in_m) or not out_m:
        raise RankError(
            f"out_modes {out_m} and in_modes {in_m} must be non-empty and of the same length"
        )
    return out_m, in_m


def max_tt_ranks(out_modes: Sequence[int], in_modes: Sequence[int]) -> list[int]:
    """The ``d - 1`` inner bond maxima ``min(Π_{j≤k} m_j n_j, Π_{j>k} m_j n_j)``.

    A bond rank above its maximum adds parameters without adding expressiveness.
    """
    out_m, in_m = _check_modes(out_modes, in_modes)
    sizes = [m * n for m, n in zip(out_m, in_m)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def clip_tt_ranks(
    ranks: int | Sequence[int], out_modes: Sequence[int], in_modes: Sequence[int]
) -> list[int]:
    """Resolve ``ranks`` into ``d - 1`` valid inner bond ranks.

    A scalar means "this rank everywhere" and is clipped silently at each bond's maximum. An
    explicit list must have ``d - 1`` entries, each between 1 and its bond's maximum, otherwise a
    :class:`RankError` names the offending bond.
    """
    maxima = max_tt_ranks(out_modes, in_modes)
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        r = int(ranks)
        if r < 1:
            raise RankError(f"TT rank must be at least 1, got {r}")
        return [min(r, mx) for mx in maxima]
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise RankError(f"TT ranks must be an integer or a list of {len(maxima)} integers, got {ranks!r}")
    if len(ranks) != len(maxima):
        raise RankError(
            f"expected {len(maxima)} TT ranks for {len(maxima) + 1} cores, got {len(ranks)}: {list(ranks)}"
        )
    out: list[int] = []
    for k, (r, mx) in enumerate(zip(ranks, maxima), start=1):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise RankError(f"TT rank at bond {k} must be an integer, got {r!r}")
        if r < 1 or r > mx:
            raise RankError(
                f"TT rank {int(r)} at bond {k} (between cores {k} and {k + 1}) is outside 1..{mx}"
            )
        out.append(int(r))
    return out


def tt_param_count(
    out_modes: Sequence[int], in_modes: Sequence[int], ranks: int | Sequence[int]
) -> int:
    """Number of TT-core parameters, ``Σ_k r_{k-1}·m_k·n_k·r_k`` (ranks resolved by clip_tt_ranks)."""
    out_m, in_m = _check_modes(out_modes, in_modes)
    full = [1, *clip_tt_ranks(ranks, out_m, in_m), 1]
    return sum(full[k] * out_m[k] * in_m[k] * full[k + 1] for k in range(len(out_m)))


def tt_rank_for_fraction(
    out_modes: Sequence[int], in_modes: Sequence[int], fraction: float
) -> int:
    """Largest uniform TT rank (clipped per bond) whose core parameters are ≤ ``fraction``·M·N.

    Returns at least 1 even when rank 1 is already over budget.
    """
    if not float(fraction) > 0.0 or not math.isfinite(float(fraction)):
        raise RankError(f"parameter fraction must be a positive number, got {fraction!r}")
    out_m, in_m = _check_modes(out_modes, in_modes)
    maxima = max_tt_ranks(out_m, in_m)
    if not maxima:
        return 1
    budget = float(fraction) * math.prod(out_m) * math.prod(in_m)
    lo, hi = 1, max(maxima)  # parameter count is non-decreasing in the uniform rank
    if tt_param_count(out_m, in_m, lo) > budget:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tt_param_count(out_m, in_m, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo



def _truncated_step(unfolding: Tensor, cap: int, delta: float | None) -> tuple[Tensor, Tensor]:
    """One TT-SVD step: ``C ≈ U·P`` with orthonormal ``U`` (rows × r) and ``P`` (r × cols).

    ``r`` is at most ``cap``; with ``delta`` it is the smallest rank whose discarded part has
    Frobenius norm ≤ ``delta`` (at least 1).

    Why not ``torch.linalg.svd``: LAPACK's SVD of a large matrix is very slow on a CPU (a
    4096 × 25088 float64 matrix took 200 s on 2 cores; its Gram matrix and ``eigh`` 18 s), and TT
    unfoldings are usually very short-and-wide (8 × 12.8M at fc6). So the eigenvectors of the
    smaller Gram matrix give the dominant subspace, and the factors are then recomputed from ``C``
    itself (a projection GEMM; a thin QR for tall matrices). ``U`` stays orthonormal (which the
    TT-SVD error bound needs), and the component norms, hence the discarded error and exact-rank
    detection, are accurate to machine precision rather than to ``sqrt(eps)`` as the square roots
    of Gram eigenvalues would be.
    """
    rows, cols = unfolding.shape
    tall = rows > cols
    _, vecs = torch.linalg.eigh(unfolding.T @ unfolding if tall else unfolding @ unfolding.T)
    vecs = vecs.flip(-1)  # dominant first
    if delta is None:
        vecs = vecs[:, :cap]  # no accuracy target: form only what is kept
    # Tall: C·V = U·S (columns); wide: Uᵀ·C = S·Vᵀ (rows). Their norms are the singular values.
    comps = unfolding @ vecs if tall else vecs.T @ unfolding
    energy = comps.pow(2).sum(dim=0 if tall else 1)
    r = min(cap, energy.numel())
    if delta is not None:
        tail = torch.cumsum(energy.flip(0), 0).flip(0).sqrt()  # tail[i]: error of keeping i
        ok = torch.nonzero(tail <= delta).flatten()
        r = min(r, max(1, int(ok[0]) if ok.numel() else energy.numel()))
    if tall:
        q, upper = torch.linalg.qr(comps[:, :r])
        return q, upper @ vecs[:, :r].T
    return vecs[:, :r], comps[:r].clone() if r < comps.shape[0] else comps


def tt_matrix_svd(
    matrix: Tensor,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: int | Sequence[int] | None = None,
    rel_eps: float | None = None,
) -> list[Tensor]:
    """TT-SVD (Oseledets 2011) of a weight matrix into TT-matrix cores, in float64.

    ``ranks`` caps the bond ranks (resolved by :func:`clip_tt_ranks`); ``rel_eps`` truncates each
    of the ``d - 1`` SVDs at ``δ = rel_eps·‖W‖_F/√(d−1)``, which bounds the total relative
    Frobenius error by ``rel_eps``. With both, the smaller rank wins at each bond; with neither,
    the decomposition is exact. When only ``ranks`` is given and a bond cannot reach its requested
    rank (an explicit list whose neighbouring ranks are smaller), the core is padded with zeros so
    the returned ranks are exactly the requested ones.
    """
    if matrix.dim() != 2:
        raise RankError(f"expected a 2-D weight matrix, got shape {tuple(matrix.shape)}")
    out_m, in_m = _check_modes(out_modes, in_modes)
    rows, cols = matrix.shape
    if math.prod(out_m) != rows or math.prod(in_m) != cols:
        raise RankError(
            f"TT modes do not fit a {rows}x{cols} weight: prod(out_modes={out_m}) = "
            f"{math.prod(out_m)} (need {rows}), prod(in_modes={in_m}) = {math.prod(in_m)} (need {cols})"
        )
    if rel_eps is not None and (not math.isfinite(float(rel_eps)) or float(rel_eps) < 0.0):
        raise RankError(f"rel_eps must be a non-negative number, got {rel_eps!r}")
    d = len(out_m)
    caps = clip_tt_ranks(ranks, out_m, in_m) if ranks is not None else max_tt_ranks(out_m, in_m)
    pad = ranks is not None and rel_eps is None

    # (m_1..m_d, n_1..n_d) -> (m_1, n_1, m_2, n_2, ...): core k then owns the merged index (m_k, n_k).
    # One contiguous float64 copy (the only W-sized float64 buffer besides the first projection).
    perm = [ax for k in range(d) for ax in (k, d + k)]
    sizes = [m * n for m, n in zip(out_m, in_m)]
    rest = matrix.detach().reshape(*out_m, *in_m).permute(*perm)
    rest = rest.to(torch.float64, memory_format=torch.contiguous_format).reshape(-1)
    delta: float | None = None
    if rel_eps is not None and d > 1:
        delta = float(rel_eps) * float(torch.linalg.norm(rest)) / math.sqrt(d - 1)

    cores: list[Tensor] = []
    r_prev = 1
    for k in range(d - 1):
        core, rest = _truncated_step(rest.reshape(r_prev * sizes[k], -1), caps[k], delta)
        r = core.shape[1]
        if pad and r < caps[k]:
            logger.debug("TT-SVD bond %d reaches rank %d only; padding to %d", k + 1, r, caps[k])
            core = torch.cat([core, core.new_zeros(core.shape[0], caps[k] - r)], 1)
            rest = torch.cat([rest, rest.new_zeros(caps[k] - r, rest.shape[1])], 0)
            r = caps[k]
        cores.append(core.reshape(r_prev, out_m[k], in_m[k], r))
        r_prev = r
    cores.append(rest.reshape(r_prev, out_m[-1], in_m[-1], 1))
    return cores


def tt_matrix_to_full(cores: Sequence[Tensor]) -> Tensor:
    """The dense ``M × N`` matrix of TT-matrix ``cores`` (in the cores' dtype)."""
    if not cores:
        raise RankError("a TT matrix needs at least one core")
    for k, core in enumerate(cores):
        if core.dim() != 4:
            raise RankError(f"TT core {k + 1} must be 4-D (r, m, n, r'), got shape {tuple(core.shape)}")
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise RankError("the first core must start and the last core must end with rank 1")
    full = cores[0]
    for k, core in enumerate(cores[1:], start=2):
        r0, ma, na, r1 = full.shape
        if core.shape[0] != r1:
            raise RankError(f"TT core {k} starts with rank {core.shape[0]}, but core {k - 1} ends with {r1}")
        _, mb, nb, r2 = core.shape
        full = (full.reshape(-1, r1) @ core.reshape(r1, -1)).reshape(r0, ma, na, mb, nb, r2)
        full = full.permute(0, 1, 3, 2, 4, 5).reshape(r0, ma * mb, na * nb, r2)
    return full.reshape(full.shape[1], full.shape[2])
