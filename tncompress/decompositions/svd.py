"""Truncated SVD and rank selection for plain low-rank (W = A·B) factorizations.

Pure torch. Everything is computed in float64 (DESIGN.md: decompose in float64, cast back in the
layer), so results do not depend on the dtype the trained model happens to use.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from tncompress.errors import RankError

__all__ = ["truncated_svd", "singular_values", "energy_rank", "lowrank_rank_for_fraction"]


def _as_matrix64(matrix: Tensor) -> Tensor:
    if matrix.dim() != 2:
        raise RankError(f"expected a 2-D matrix, got a tensor of shape {tuple(matrix.shape)}")
    return matrix.detach().to(torch.float64)


#: Above this much work (min(M, N)² · max(M, N)), use the Gram-matrix route instead of LAPACK's SVD.
#: LAPACK's SVD is very slow on a CPU for large weights (4096 × 25088 in float64: 200 s on 2 cores;
#: its Gram matrix plus ``eigh``: 18 s).
_EXACT_SVD_WORK = 2**27


def _use_gram(m: int, n: int) -> bool:
    return min(m, n) ** 2 * max(m, n) > _EXACT_SVD_WORK


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation of ``matrix`` (M×N) as ``left @ right``.

    Returns ``left`` (M×rank) and ``right`` (rank×N), both float64, with the singular values split
    evenly (``sqrt(S)`` on each side) so both factors have the same scale, which keeps a two-layer
    replacement well conditioned for fine-tuning. By Eckart–Young the Frobenius error equals the
    root-sum-square of the discarded singular values.

    Large matrices take the dominant singular subspace from ``eigh`` of the smaller Gram matrix and
    recompute the factors from the matrix itself (one GEMM), so the singular values (the norms of
    those factors) stay accurate to machine precision relative to the largest one.
    """
    w = _as_matrix64(matrix)
    m, n = w.shape
    max_rank = min(m, n)
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise RankError(f"rank {rank!r} is invalid for a {m}x{n} matrix; use 1..{max_rank}")
    rank = int(rank)
    if not _use_gram(m, n):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]
    if m <= n:
        _, vecs = torch.linalg.eigh(w @ w.T)  # ascending
        u = vecs[:, -rank:].flip(-1)
        svt = u.T @ w  # S·Vᵀ
        root = svt.norm(dim=1).sqrt()
        return u * root, svt / torch.where(root > 0, root, 1.0)[:, None]
    _, vecs = torch.linalg.eigh(w.T @ w)
    v = vecs[:, -rank:].flip(-1)
    us = w @ v  # U·S
    root = us.norm(dim=0).sqrt()
    return us / torch.where(root > 0, root, 1.0), root[:, None] * v.T


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of ``matrix`` in float64, in descending order.

    Large matrices use the eigenvalues of the smaller Gram matrix (see ``_EXACT_SVD_WORK``): each
    value is then accurate to about 1e-8 of the largest, ample for energy and noise-level rank rules.
    """
    w = _as_matrix64(matrix)
    m, n = w.shape
    if not _use_gram(m, n):
        return torch.linalg.svdvals(w)
    gram = w @ w.T if m <= n else w.T @ w
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0).sqrt()


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r with ``sum(s[:r]**2) >= energy * sum(s**2)`` (at least 1).

    ``energy`` is the fraction of the squared Frobenius norm to keep, in (0, 1].
    """
    if not 0.0 < float(energy) <= 1.0:
        raise RankError(f"energy must be in (0, 1], got {energy!r}")
    s = singular_values.detach().to(torch.float64).flatten()
    if s.numel() == 0:
        return 1
    cumulative = torch.cumsum(s * s, dim=0)
    total = float(cumulative[-1])
    if total <= 0.0:
        return 1
    # Compare against the cumulative sum's own last entry so energy=1.0 cannot miss by rounding.
    target = float(energy) * total
    reached = torch.nonzero(cumulative >= target * (1.0 - 1e-12)).flatten()
    r = int(reached[0]) + 1 if reached.numel() else int(s.numel())
    return max(1, r)


def lowrank_rank_for_fraction(out_features: int, in_features: int, fraction: float) -> int:
    """Largest r with ``r·(M+N) <= fraction·M·N`` (at least 1, at most min(M, N)).

    ``fraction`` is the share of the dense weight's parameter count to keep (bias not counted).
    """
    if not float(fraction) > 0.0 or not math.isfinite(float(fraction)):
        raise RankError(f"parameter fraction must be a positive number, got {fraction!r}")
    m, n = int(out_features), int(in_features)
    if m < 1 or n < 1:
        raise RankError(f"layer shape {m}x{n} is invalid")
    budget = float(fraction) * m * n
    r = int(budget // (m + n))
    # Guard against float rounding at exact boundaries.
    while r > 0 and r * (m + n) > budget:
        r -= 1
    while (r + 1) * (m + n) <= budget and r + 1 <= min(m, n):
        r += 1
    return max(1, min(r, min(m, n)))
