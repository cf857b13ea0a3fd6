"""Rank rules for convolution kernels: EVBMF (VBMF with estimated noise), energy, parameter budget.

* :func:`evbmf_rank` — analytic empirical variational Bayesian matrix factorisation (Nakajima,
  Sugiyama, Babacan & Tomioka, JMLR 2013; noise-variance bounds from Nakajima et al., NIPS 2012).
  For an L × M matrix (L ≤ M, α = L/M) with singular values γ_h and noise variance σ², the EVB
  estimate keeps component h iff γ_h² / (M σ²) > x̲ = (1 + τ̲)(1 + α/τ̲), where τ̲ is the positive
  zero of log(τ + 1) + α·log(τ/α + 1) − τ (τ̲ = 2.5129 at α = 1). σ² is estimated by minimising
  the EVB free energy over [σ̲², σ̄²]: Σ_h ψ0(x_h) + Σ_{x_h > x̲} ψ1(x_h), with x_h = γ_h²/(Mσ²),
  ψ0(x) = x − log x, ψ1(x) = log(τ(x) + 1) + α·log(τ(x)/α + 1) − τ(x) and
  τ(x) = ½(x − 1 − α + √((x − 1 − α)² − 4α)).
* :func:`vbmf_tucker2_ranks` — Kim et al. 2016: EVBMF on the mode-0 and mode-1 unfoldings.
* :func:`energy_tucker2_ranks` — smallest ranks keeping a fraction of the squared singular values.
* :func:`cp_rank_for_fraction`, :func:`tucker2_ranks_for_fraction` — the largest ranks whose
  factorized layer has at most a fraction of the dense kernel's parameters (bias not counted).
* :func:`tucker2_split_for_fraction` — within that parameter budget, the (r_out, r_in) split that
  minimises the truncated-HOSVD error bound (the energy the two channel unfoldings discard).
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import Tensor

from tncompress.decompositions.tucker2 import small_lapack
from tncompress.errors import RankError, RecipeError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# EVBMF
# --------------------------------------------------------------------------------------------------


def _evb_tau_bar(alpha: float) -> float:
    """Positive zero of log(τ+1) + α·log(τ/α+1) − τ (positive below it, negative above)."""

    def f(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    lo, hi = math.sqrt(alpha) * 1e-3, max(4.0, 4.0 * math.sqrt(alpha))
    while f(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _evb_free_energy(sigma2: float, gamma2: Tensor, m: int, alpha: float, x_bar: float) -> float:
    """EVB free energy (up to constants) as a function of the noise variance."""
    x = gamma2 / (m * sigma2)
    # ψ0(x) = x − log x; −log x = log(Mσ²) − log γ², and log γ² does not depend on σ².
    value = x.sum().item() + gamma2.numel() * math.log(m * sigma2)
    big = x[x > x_bar]
    if big.numel():
        d = big - (1.0 + alpha)
        tau = 0.5 * (d + torch.sqrt(torch.clamp(d * d - 4.0 * alpha, min=0.0)))
        psi1 = torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau
        value += psi1.sum().item()
    return value


def _squared_singular_values(matrix: Tensor) -> Tensor:
    """Squared singular values (descending) of a float64 matrix, from the eigenvalues of its
    smaller Gram matrix: one GEMM plus a small symmetric eigenproblem, much cheaper than an SVD
    of a wide matrix and accurate to ~1e-16·σ_max², which is all the rank rules need."""
    m = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    gram = m @ m.T
    gram = 0.5 * (gram + gram.T)
    with small_lapack(gram.shape[0]):
        vals = torch.linalg.eigvalsh(gram)
    return vals.flip(0).clamp(min=0.0)


def evbmf_rank(matrix: Tensor) -> int:
    """Rank chosen by analytic empirical VBMF with the noise variance estimated (may be 0).

    The matrix is used in float64; the result does not depend on its orientation.
    """
    if matrix.ndim != 2:
        raise RankError(f"EVBMF needs a matrix, got a tensor of shape {tuple(matrix.shape)}")
    v = matrix.detach().to(torch.float64)
    if v.shape[0] > v.shape[1]:
        v = v.T
    l_dim, m_dim = v.shape
    if not bool(torch.isfinite(v).all()):
        raise RankError(f"EVBMF: the {tuple(matrix.shape)} weight matrix has NaN or infinite values")
    if l_dim == 0:
        return 0
    gamma2 = _squared_singular_values(v)
    total = gamma2.sum().item()
    if total <= 0.0:
        return 0
    alpha = l_dim / m_dim
    tau_bar = _evb_tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    # Bounds of the noise-variance estimate (Nakajima et al. 2012, Theorem 2).
    h_max = min(max(math.ceil(l_dim / (1.0 + alpha)) - 1, 0), l_dim - 1)
    upper = total / (l_dim * m_dim)
    tail = gamma2[h_max:]
    lower = max(gamma2[h_max].item() / (m_dim * x_bar), tail.sum().item() / (m_dim * tail.numel()))
    if not lower < upper:
        sigma2 = upper
    else:
        # Coarse log-grid search, then golden-section refinement around the best grid point
        # (the objective is only piecewise smooth, so a pure local search could stall).
        lo_log, hi_log = math.log(lower), math.log(upper)
        n_grid = 200
        grid = [lo_log + (hi_log - lo_log) * k / (n_grid - 1) for k in range(n_grid)]
        vals = [_evb_free_energy(math.exp(g), gamma2, m_dim, alpha, x_bar) for g in grid]
        k_best = min(range(n_grid), key=vals.__getitem__)
        a = grid[max(k_best - 1, 0)]
        b = grid[min(k_best + 1, n_grid - 1)]
        phi = (math.sqrt(5.0) - 1.0) / 2.0
        c, d = b - phi * (b - a), a + phi * (b - a)
        fc = _evb_free_energy(math.exp(c), gamma2, m_dim, alpha, x_bar)
        fd = _evb_free_energy(math.exp(d), gamma2, m_dim, alpha, x_bar)
        for _ in range(60):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - phi * (b - a)
                fc = _evb_free_energy(math.exp(c), gamma2, m_dim, alpha, x_bar)
            else:
                a, c, fc = c, d, fd
                d = a + phi * (b - a)
                fd = _evb_free_energy(math.exp(d), gamma2, m_dim, alpha, x_bar)
        best_log = min((c, fc), (d, fd), (grid[k_best], vals[k_best]), key=lambda t: t[1])[0]
        sigma2 = math.exp(best_log)
    threshold = m_dim * sigma2 * x_bar  # on γ²
    rank = int((gamma2 > threshold).sum().item())
    log.debug("EVBMF %dx%d: sigma2=%.4g, rank=%d", l_dim, m_dim, sigma2, rank)
    return rank


# --------------------------------------------------------------------------------------------------
# Tucker-2 rank rules
# --------------------------------------------------------------------------------------------------


def _check_kernel(kernel: Tensor) -> tuple[int, int, int, int]:
    if kernel.ndim != 4:
        raise RankError(f"expected a conv kernel (cout, cin, kh, kw), got shape {tuple(kernel.shape)}")
    return tuple(int(s) for s in kernel.shape)  # type: ignore[return-value]


def _unfoldings(kernel: Tensor) -> tuple[Tensor, Tensor]:
    k = kernel.detach().to(torch.float64)
    cout, cin = k.shape[0], k.shape[1]
    return k.reshape(cout, -1), k.transpose(0, 1).reshape(cin, -1)


def vbmf_tucker2_ranks(kernel: Tensor, floor: int = 1, weakening: float = 0.0) -> tuple[int, int]:
    """(r_out, r_in) for Tucker-2 from EVBMF of the mode-0 and mode-1 unfoldings.

    Each rank is at least ``floor`` (≥ 1, so never 0) and at most the unfolding's full rank
    ``min(rows, cols)``. ``weakening`` in [0, 1) moves each EVBMF rank r towards that full rank:
    ``ceil(r + weakening·(full − r))`` (a common remedy for VBMF's conservative ranks).
    """
    cout, cin, kh, kw = _check_kernel(kernel)
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
        raise RankError(f"VBMF rank floor must be an integer >= 1, got {floor!r}")
    if not 0.0 <= float(weakening) < 1.0:
        raise RankError(f"VBMF weakening must be in [0, 1), got {weakening!r}")
    ranks = []
    for unf in _unfoldings(kernel):
        full = min(unf.shape)
        r = evbmf_rank(unf)
        r = math.ceil(r + weakening * (full - r) - 1e-9)
        ranks.append(min(max(r, floor), full))
    log.debug("VBMF Tucker-2 ranks for %s: r_out=%d r_in=%d", (cout, cin, kh, kw), *ranks)
    return ranks[0], ranks[1]


def energy_tucker2_ranks(kernel: Tensor, energy: float) -> tuple[int, int]:
    """Smallest (r_out, r_in) whose leading singular values of the mode-0 / mode-1 unfoldings keep
    at least ``energy`` (in (0, 1]) of the squared Frobenius norm; each at least 1."""
    _check_kernel(kernel)
    if not 0.0 < float(energy) <= 1.0:
        raise RankError(f"energy must be in (0, 1], got {energy!r}")
    ranks = []
    for unf in _unfoldings(kernel):
        s2 = _squared_singular_values(unf)
        total = s2.sum().item()
        if total <= 0.0:
            ranks.append(1)
            continue
        frac = torch.cumsum(s2, 0) / total
        r = int((frac < energy - 1e-12).sum().item()) + 1
        ranks.append(min(max(r, 1), unf.shape[0]))
    return ranks[0], ranks[1]


# --------------------------------------------------------------------------------------------------
# Parameter-budget rules
# --------------------------------------------------------------------------------------------------


def _check_shape_fraction(kernel_shape: tuple[int, ...], fraction: float) -> tuple[int, int, int, int]:
    if len(kernel_shape) != 4 or any(int(s) < 1 for s in kernel_shape):
        raise RankError(f"expected a conv kernel shape (cout, cin, kh, kw), got {tuple(kernel_shape)}")
    if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise RankError(f"parameter fraction must be in (0, 1], got {fraction!r}")
    return tuple(int(s) for s in kernel_shape)  # type: ignore[return-value]


def cp_params(kernel_shape: tuple[int, ...], rank: int, form: str) -> int:
    """Weights of a CP conv layer (bias not counted)."""
    cout, cin, kh, kw = (int(s) for s in kernel_shape)
    spatial = kh * kw if form == "3conv" else kh + kw
    return rank * (cin + spatial + cout)


def tucker2_params(kernel_shape: tuple[int, ...], r_out: int, r_in: int) -> int:
    """Weights of a Tucker-2 conv layer (bias not counted)."""
    cout, cin, kh, kw = (int(s) for s in kernel_shape)
    return cin * r_in + r_in * r_out * kh * kw + r_out * cout


def cp_rank_for_fraction(kernel_shape: tuple[int, ...], fraction: float, form: str) -> int:
    """Largest CP rank whose layer has ≤ ``fraction`` × the dense kernel's weights (≥ 1).

    Rank 1 is returned even when a single component exceeds the budget.
    """
    if form not in ("3conv", "4conv"):
        raise RecipeError(f"unknown CP form {form!r}; choose one of 3conv, 4conv")
    cout, cin, kh, kw = _check_shape_fraction(kernel_shape, fraction)
    budget = float(fraction) * cout * cin * kh * kw
    per_rank = cp_params((cout, cin, kh, kw), 1, form)
    return max(1, int(math.floor(budget / per_rank + 1e-9)))


def tucker2_ranks_for_fraction(kernel_shape: tuple[int, ...], fraction: float) -> tuple[int, int]:
    """Largest (r_out, r_in) with r_out/cout ≈ r_in/cin whose Tucker-2 layer has ≤ ``fraction`` ×
    the dense kernel's weights; each at least 1 and at most cout / cin ((1, 1) when even that
    exceeds the budget).

    Solves for the common ratio ρ (r_out = ρ·cout, r_in = ρ·cin), rounds down, then grows the rank
    that lags in ratio by one while the budget allows.
    """
    cout, cin, kh, kw = _check_shape_fraction(kernel_shape, fraction)
    shape = (cout, cin, kh, kw)
    budget = float(fraction) * cout * cin * kh * kw
    # params(ρ) = ρ²·cout·cin·kh·kw + ρ·(cin² + cout²)
    qa, qb = cout * cin * kh * kw, cin * cin + cout * cout
    rho = (-qb + math.sqrt(qb * qb + 4.0 * qa * budget)) / (2.0 * qa)
    r_out = min(cout, max(1, int(math.floor(rho * cout + 1e-9))))
    r_in = min(cin, max(1, int(math.floor(rho * cin + 1e-9))))
    # Clamping to ≥ 1 can overshoot the budget (a thin mode): shrink the other rank first.
    while tucker2_params(shape, r_out, r_in) > budget and (r_out > 1 or r_in > 1):
        if r_out > 1 and (r_in == 1 or r_out / cout >= r_in / cin):
            r_out -= 1
        else:
            r_in -= 1
    while True:
        grow_out = r_out < cout and tucker2_params(shape, r_out + 1, r_in) <= budget
        grow_in = r_in < cin and tucker2_params(shape, r_out, r_in + 1) <= budget
        if grow_out and (not grow_in or (r_out + 1) / cout <= (r_in + 1) / cin):
            r_out += 1
        elif grow_in:
            r_in += 1
        else:
            break
    return r_out, r_in


class Tucker2Split(NamedTuple):
    """A Tucker-2 rank split chosen within a parameter budget, and how good it and the proportional
    split are: relative errors ‖K − K̂‖ / ‖K‖ of the truncated HOSVD (exact) and its bound."""

    r_out: int
    r_in: int
    error: float                        # truncated-HOSVD relative error at (r_out, r_in)
    bound: float                        # √(discarded energy of the two unfoldings) / ‖K‖
    proportional: tuple[int, int]       # (r_out, r_in) of tucker2_ranks_for_fraction
    proportional_error: float
    proportional_bound: float


def _eig_basis(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(squared singular values, left singular vectors) of a float64 matrix, dominant first, from
    ``eigh`` of its Gram matrix (rows × rows: a conv unfolding is short and wide)."""
    gram = matrix @ matrix.T
    with small_lapack(gram.shape[0]):
        vals, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    return vals.flip(0).clamp(min=0.0), vecs.flip(-1)


def tucker2_split_for_fraction(kernel: Tensor, fraction: float, criterion: str = "error") -> Tucker2Split:
    """The (r_out, r_in) whose Tucker-2 layer has ≤ ``fraction`` × the dense kernel's weights and the
    least truncated-HOSVD error (``criterion="error"``) or error bound (``criterion="bound"``).

    With U_out, U_in the full channel bases (left singular vectors of the output- and input-channel
    unfoldings) and the full core C = K ×₁ U_outᵀ ×₂ U_inᵀ, the truncated HOSVD at (r_out, r_in) is an
    orthogonal projection of K, so its squared error is exactly ‖K‖² − Σ_{a<r_out, b<r_in} ‖C[a, b]‖²:
    one core and a 2-d cumulative sum give the error of every split. The bound is the sum of the
    energies the two unfoldings discard, Σ_{h>r_out} σ_out,h² + Σ_{h>r_in} σ_in,h² (it counts the
    energy both truncations remove twice, so minimising it favours lopsided splits that are worse in
    fact, e.g. on most 3×3 convs of a trained ResNet-20 at a quarter of the parameters).

    Every r_in in 1..cin is tried with the largest r_out that fits the budget (the error falls as
    r_out grows). Ties (within rounding) go to the proportional split of
    :func:`tucker2_ranks_for_fraction`, then to the fewest weights; so the chosen split is never
    worse by the criterion than the proportional one. When no split fits (even (1, 1) exceeds the
    budget) or the kernel is not finite, the proportional split is returned (with NaN errors for a
    kernel that is not finite). A thin mode (an RGB stem's 3 input channels) gets its full rank
    when keeping it costs less error than the output rank it takes.
    """
    if criterion not in ("error", "bound"):
        raise RankError(f"Tucker-2 split criterion must be 'error' or 'bound', got {criterion!r}")
    shape = _check_kernel(kernel)
    cout, cin, kh, kw = _check_shape_fraction(shape, fraction)
    budget = float(fraction) * cout * cin * kh * kw
    prop = tucker2_ranks_for_fraction(shape, fraction)
    k = kernel.detach().to(torch.float64)
    total = float(k.pow(2).sum())
    if not math.isfinite(total):
        return Tucker2Split(prop[0], prop[1], math.nan, math.nan, prop, math.nan, math.nan)
    out_unf, in_unf = _unfoldings(k)
    s2_out, u_out = _eig_basis(out_unf)
    s2_in, u_in = _eig_basis(in_unf)
    # the energy each truncation discards, by rank (index r: keep the first r)
    tail_out = torch.cat([s2_out.flip(0).cumsum(0).flip(0), s2_out.new_zeros(1)]).tolist()
    tail_in = torch.cat([s2_in.flip(0).cumsum(0).flip(0), s2_in.new_zeros(1)]).tolist()
    core = (u_out.T @ k.permute(0, 2, 3, 1).reshape(cout, -1)).reshape(cout, -1, cin) @ u_in  # (out, hw, in)
    kept = core.pow(2).sum(1).cumsum(0).cumsum(1)  # kept[a, b]: energy of the core's leading (a+1)×(b+1) block

    def discarded(r_out: int, r_in: int) -> tuple[float, float]:
        """(squared error, squared bound), absolute."""
        return max(total - float(kept[r_out - 1, r_in - 1]), 0.0), tail_out[r_out] + tail_in[r_in]

    def rel(energy: float) -> float:
        return math.sqrt(energy / total) if total > 0 else 0.0

    which = 0 if criterion == "error" else 1
    candidates: list[tuple[float, int, int, int]] = []  # (criterion, weights, r_out, r_in)
    for r_in in range(1, cin + 1):
        r_out = min(cout, int(math.floor((budget - cin * r_in) / (r_in * kh * kw + cout) + 1e-9)))
        while r_out >= 1 and tucker2_params(shape, r_out, r_in) > budget:
            r_out -= 1
        if r_out >= 1:
            candidates.append((discarded(r_out, r_in)[which], tucker2_params(shape, r_out, r_in), r_out, r_in))
    p_err, p_bound = discarded(*prop)
    if not candidates:
        return Tucker2Split(prop[0], prop[1], rel(p_err), rel(p_bound), prop, rel(p_err), rel(p_bound))
    least = min(c[0] for c in candidates)
    near = [c for c in candidates if c[0] <= least + 1e-12 * total]
    if any((c[2], c[3]) == prop for c in near) or (tucker2_params(shape, *prop) <= budget
                                                   and (p_err, p_bound)[which] <= least + 1e-12 * total):
        r_out, r_in = prop
    else:
        _, _, r_out, r_in = min(near, key=lambda c: (c[1], c[2], c[3]))
    err, bound = discarded(r_out, r_in)
    return Tucker2Split(r_out, r_in, rel(err), rel(bound), prop, rel(p_err), rel(p_bound))
