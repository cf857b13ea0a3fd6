"""Product-of-sums matrices (ProdSumNet, C. W. Wu 2018): W = Π_j Σ_k g(a_jk)·M_jk.

The matrices M_jk are fixed and rebuilt from a seed, never stored; only the scalars a_jk are
trained. This module holds the basis families, the assembly of one factor F_j = Σ_k c_k·M_jk from
its coefficients, the structured products (FFT for circulant, two GEMMs for Kronecker), and the
least-squares fits (one factor exactly, several by alternating least squares). Pure torch.

Families (each basis is a ``rows × cols`` matrix; basis ``k`` of factor ``j`` depends only on
``(family, rows, cols, seed, j, k)``, so a layer with more terms keeps the first bases of one with
fewer):

* ``gaussian``: i.i.d. N(0, 1) entries. Stored densely (s·rows·cols values), so capped in size.
* ``sparse``: ``round(density·rows·cols)`` N(0, 1) entries at random positions (indices + values).
* ``circulant``: cyclic shifts cropped to ``rows × cols``: M_k[i, j] = 1 where (j − i) mod n = o_k,
  n = max(rows, cols), offsets o = 0, 1, −1, 2, −2, … (a centred band, like a 1-d convolution
  with wrap-around). Needs no random numbers; applied with real FFTs.
* ``kronecker``: A_k ⊗ B_k with Gaussian A_k (r1 × c1), B_k (r2 × c2), rows = r1·r2 and
  cols = c1·c2 the most balanced factorisations. Stores s·(r1·c1 + r2·c2) values.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tncompress.errors import RankError

__all__ = ["FAMILIES", "G_FUNCTIONS", "MAX_DENSE_BASIS_ELEMENTS", "make_bases", "assemble", "basis_chunk",
           "second_moment", "least_squares", "fit_product", "kron_split", "circulant_offsets", "fft_macs"]

log = logging.getLogger(__name__)

FAMILIES = ("gaussian", "sparse", "circulant", "kronecker")
G_FUNCTIONS = ("identity", "tanh")
# Stored basis values above this many elements (gaussian: s·rows·cols; sparse: s·nnz) are refused:
# 2^26 float32 values are 256 MiB for one factor.
MAX_DENSE_BASIS_ELEMENTS = 1 << 26
_CHUNK_ELEMENTS = 1 << 23  # dense basis chunks used by the generic least-squares route


def _seed_for(family: str, rows: int, cols: int, seed: int, factor: int, index: int) -> int:
    """A platform-independent 63-bit seed for one basis matrix."""
    text = f"tncompress.prodsum/{family}/{rows}x{cols}/seed={seed}/factor={factor}/k={index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def kron_split(n: int) -> tuple[int, int]:
    """The most balanced factorisation n = a·b with a ≤ b (a = 1 for a prime n)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def circulant_offsets(s: int, n: int) -> list[int]:
    """Shift offsets 0, 1, −1, 2, −2, … taken mod n (s ≤ n distinct values)."""
    out = [0]
    step = 1
    while len(out) < s:
        out.append(step % n)
        if len(out) < s:
            out.append((-step) % n)
        step += 1
    return out[:s]


def sparse_nnz(rows: int, cols: int, density: float) -> int:
    return max(1, int(round(density * rows * cols)))


def check_family(family: Any, rows: int, cols: int, s: int, density: float, where: str = "") -> str:
    """Validate one factor's family and size (one-line :class:`RankError` otherwise)."""
    prefix = f"{where}: " if where else ""
    if family not in FAMILIES:
        raise RankError(f"{prefix}unknown product-of-sums family {family!r}; known: {', '.join(FAMILIES)}")
    if family == "circulant" and s > max(rows, cols):
        raise RankError(f"{prefix}a {rows}×{cols} circulant factor has {max(rows, cols)} distinct shifts, "
                        f"but {s} terms were asked for; use at most {max(rows, cols)} or another family")
    if family == "sparse" and not (isinstance(density, (int, float)) and not isinstance(density, bool)
                                   and 0.0 < float(density) <= 1.0):
        raise RankError(f"{prefix}density must be a number in (0, 1], got {density!r}")
    stored = {"gaussian": s * rows * cols, "sparse": s * sparse_nnz(rows, cols, float(density)) if family == "sparse" else 0}
    if stored.get(family, 0) > MAX_DENSE_BASIS_ELEMENTS:
        raise RankError(f"{prefix}{s} {family} bases of {rows}×{cols} would hold {stored[family]:,} values "
                        f"(limit {MAX_DENSE_BASIS_ELEMENTS:,}); use family kronecker or circulant, or fewer terms")
    return family


def make_bases(family: str, rows: int, cols: int, s: int, seed: int, factor: int, density: float = 0.05,
               dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """The tensors that define ``s`` bases of one factor (generated in float64 on the CPU, then cast)."""
    check_family(family, rows, cols, s, density)
    out: dict[str, Tensor]
    if family == "circulant":
        out = {"offsets": torch.tensor(circulant_offsets(s, max(rows, cols)), dtype=torch.long)}
        return {k: v.to(device=device) for k, v in out.items()}

    def gen(k: int) -> torch.Generator:
        return torch.Generator().manual_seed(_seed_for(family, rows, cols, seed, factor, k))

    if family == "gaussian":
        out = {"m": torch.stack([torch.randn(rows, cols, generator=gen(k), dtype=torch.float64) for k in range(s)])}
    elif family == "sparse":
        nnz = sparse_nnz(rows, cols, density)
        idx, val = [], []
        for k in range(s):
            g = gen(k)
            idx.append(torch.randint(0, rows * cols, (nnz,), generator=g))
            val.append(torch.randn(nnz, generator=g, dtype=torch.float64))
        out = {"idx": torch.stack(idx), "val": torch.stack(val)}
    else:  # kronecker
        r1, r2 = kron_split(rows)
        c1, c2 = kron_split(cols)
        a, b = [], []
        for k in range(s):
            g = gen(k)
            a.append(torch.randn(r1, c1, generator=g, dtype=torch.float64))
            b.append(torch.randn(r2, c2, generator=g, dtype=torch.float64))
        out = {"a": torch.stack(a), "b": torch.stack(b)}
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
            for k, v in out.items()}


def assemble(family: str, bases: dict[str, Tensor], coeffs: Tensor, rows: int, cols: int) -> Tensor:
    """F = Σ_k coeffs[k]·M_k as a dense ``rows × cols`` matrix (differentiable in ``coeffs``),
    without forming the bases one by one."""
    s = coeffs.shape[0]
    if family == "gaussian":
        return (coeffs[None] @ bases["m"].reshape(s, rows * cols)).reshape(rows, cols)
    if family == "sparse":
        flat = coeffs.new_zeros(rows * cols)
        return flat.index_add(0, bases["idx"].reshape(-1), (coeffs[:, None] * bases["val"]).reshape(-1)).reshape(rows, cols)
    if family == "circulant":
        n = max(rows, cols)
        c = coeffs.new_zeros(n).index_add(0, bases["offsets"], coeffs)
        # row i of the n×n circulant is c rotated left by −i: windows of [c, c] in reverse order
        return torch.cat([c, c]).unfold(0, n, 1).flip(0)[:rows, :cols]
    a, b = bases["a"], bases["b"]
    _, r1, c1 = a.shape
    _, r2, c2 = b.shape
    scaled = (coeffs[:, None] * a.reshape(s, r1 * c1)).t()            # (r1·c1, s)
    full = scaled @ b.reshape(s, r2 * c2)                              # (r1·c1, r2·c2)
    return full.reshape(r1, c1, r2, c2).permute(0, 2, 1, 3).reshape(rows, cols)


def basis_chunk(family: str, bases: dict[str, Tensor], start: int, stop: int, rows: int, cols: int) -> Tensor:
    """Bases ``start:stop`` as dense ``(stop − start, rows, cols)`` float tensors (least squares only)."""
    ref = next(v for v in bases.values() if v.is_floating_point()) if family != "circulant" else None
    dtype = ref.dtype if ref is not None else torch.float64
    device = next(iter(bases.values())).device
    s = next(iter(bases.values())).shape[0]
    out = []
    for k in range(start, stop):
        one = torch.zeros(s, dtype=dtype, device=device)
        one[k] = 1.0
        out.append(assemble(family, bases, one, rows, cols))
    return torch.stack(out)


def second_moment(family: str, bases: dict[str, Tensor], rows: int, cols: int) -> float:
    """Mean square entry over all bases, Σ_k ‖M_k‖²_F / (s·rows·cols): sets the random-init scale."""
    if family == "gaussian":
        return float(bases["m"].double().pow(2).mean())
    if family == "sparse":
        s = bases["val"].shape[0]
        return float(bases["val"].double().pow(2).sum()) / (s * rows * cols)
    if family == "circulant":
        return min(rows, cols) / (rows * cols)
    a, b = bases["a"].double(), bases["b"].double()
    return float((a.pow(2).sum((1, 2)) * b.pow(2).sum((1, 2))).mean()) / (rows * cols)


def fft_macs(n: int) -> int:
    """Estimated MACs of one circulant product by real FFTs of length n, per sample: forward and
    inverse rFFT at 1.25·n·log2(n) each plus 4 per complex spectral product (FlopCounterMode does not
    count FFTs, so this is an estimate, not a measurement)."""
    return int(math.ceil(2.5 * n * math.log2(max(n, 2)))) + 4 * (n // 2 + 1)


# --------------------------------------------------------------------------------------------------
# Least squares


def _gram_rhs_one(family: str, bases: dict[str, Tensor], target: Tensor, rows: int, cols: int
                  ) -> tuple[Tensor, Tensor]:
    """Gram matrix G_kl = ⟨M_k, M_l⟩ and b_k = ⟨M_k, target⟩ in float64, using each family's structure."""
    t = target.double()
    if family == "gaussian":
        m = bases["m"].double().reshape(bases["m"].shape[0], -1)
        return m @ m.t(), m @ t.reshape(-1)
    if family == "circulant":
        n = max(rows, cols)
        offsets = bases["offsets"]
        i = torch.arange(rows, device=t.device)[:, None]
        j = torch.arange(cols, device=t.device)[None, :]
        diag = ((j - i) % n).reshape(-1)
        b = t.new_zeros(n).index_add(0, diag, t.reshape(-1))[offsets]
        return torch.eye(len(offsets), dtype=t.dtype, device=t.device) * float(min(rows, cols)), b
    if family == "kronecker":
        a, bb = bases["a"].double(), bases["b"].double()
        s, r1, c1 = a.shape
        _, r2, c2 = bb.shape
        af, bf = a.reshape(s, -1), bb.reshape(s, -1)
        gram = (af @ af.t()) * (bf @ bf.t())
        w4 = t.reshape(r1, r2, c1, c2).permute(0, 2, 1, 3).reshape(r1 * c1, r2 * c2)
        rhs = ((af @ w4) * bf).sum(1)
        return gram, rhs
    return _gram_rhs_generic(family, bases, t, rows, cols, None, None)


def _gram_rhs_generic(family: str, bases: dict[str, Tensor], target: Tensor, rows: int, cols: int,
                      left: Tensor | None, right: Tensor | None) -> tuple[Tensor, Tensor]:
    """G_kl = ⟨L·M_k·R, L·M_l·R⟩ and b_k = ⟨L·M_k·R, target⟩ with dense basis chunks (bounded memory).

    With P = LᵀL and Q = R·Rᵀ: G_kl = ⟨M_k, P·M_l·Q⟩ and b_k = ⟨M_k, Lᵀ·target·Rᵀ⟩.
    """
    s = next(iter(bases.values())).shape[0]
    dev = target.device
    p = left.t() @ left if left is not None else None
    q = right @ right.t() if right is not None else None
    proj = target
    if left is not None:
        proj = left.t() @ proj
    if right is not None:
        proj = proj @ right.t()
    step = max(1, _CHUNK_ELEMENTS // max(1, rows * cols))
    chunks = [(a, min(s, a + step)) for a in range(0, s, step)]
    gram = torch.zeros(s, s, dtype=torch.float64, device=dev)
    rhs = torch.zeros(s, dtype=torch.float64, device=dev)
    for a0, a1 in chunks:
        ma = basis_chunk(family, bases, a0, a1, rows, cols).double()
        rhs[a0:a1] = (ma.reshape(a1 - a0, -1) @ proj.reshape(-1))
        pmq = ma
        if p is not None:
            pmq = p @ pmq
        if q is not None:
            pmq = pmq @ q
        pmq = pmq.reshape(a1 - a0, -1)
        for b0, b1 in chunks:
            mb = ma if (b0, b1) == (a0, a1) else basis_chunk(family, bases, b0, b1, rows, cols).double()
            gram[b0:b1, a0:a1] = mb.reshape(b1 - b0, -1) @ pmq.t()
    return 0.5 * (gram + gram.t()), rhs


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """Minimum-norm solution of G·a = b (G symmetric positive semi-definite)."""
    vals, vecs = torch.linalg.eigh(gram)
    cutoff = vals.abs().max().clamp_min(1e-300) * gram.shape[0] * torch.finfo(torch.float64).eps
    inv = torch.where(vals > cutoff, 1.0 / vals, torch.zeros_like(vals))
    return vecs @ (inv * (vecs.t() @ rhs))


def least_squares(family: str, bases: dict[str, Tensor], target: Tensor, rows: int, cols: int,
                  left: Tensor | None = None, right: Tensor | None = None) -> Tensor:
    """argmin_a ‖target − L·(Σ_k a_k·M_k)·R‖_F in float64 (L, R optional), the minimum-norm one when
    the bases are linearly dependent."""
    if left is None and right is None:
        gram, rhs = _gram_rhs_one(family, bases, target, rows, cols)
    else:
        gram, rhs = _gram_rhs_generic(family, bases, target.double(), rows, cols,
                                      None if left is None else left.double(), None if right is None else right.double())
    return _solve(gram, rhs)


def fit_product(target: Tensor, families: Sequence[str], bases: Sequence[dict[str, Tensor]],
                shapes: Sequence[tuple[int, int]], init: Sequence[Tensor], sweeps: int = 8) -> tuple[list[Tensor], float]:
    """Alternating least squares for W ≈ F_1·…·F_p, F_j = Σ_k a_jk·M_jk: each factor's coefficients in
    turn by exact least squares with the others fixed. Returns the coefficients (float64) and the
    relative error. Starts from ``init`` (e.g. a random init); never increases the error."""
    t = target.double()
    coeffs = [c.detach().double().clone() for c in init]
    norm = float(torch.linalg.norm(t)) or 1.0

    def factor(j: int) -> Tensor:
        return assemble(families[j], bases[j], coeffs[j], *shapes[j]).double()

    def product(mats: list[Tensor], size: int) -> Tensor:
        out = torch.eye(size, dtype=torch.float64, device=t.device)
        for m in mats:
            out = out @ m
        return out

    p = len(coeffs)
    err = float("inf")
    for sweep in range(max(1, sweeps)):
        for j in range(p):
            mats = [factor(i) for i in range(p)]
            left = product(mats[:j], shapes[0][0]) if j > 0 else None
            right = product(mats[j + 1:], shapes[j][1]) if j < p - 1 else None
            coeffs[j] = least_squares(families[j], bases[j], t, *shapes[j], left=left, right=right)
        approx = product([factor(i) for i in range(p)], shapes[0][0])
        new_err = float(torch.linalg.norm(approx - t)) / norm
        log.debug("prodsum ALS sweep %d: relative error %.4g", sweep, new_err)
        if err - new_err < 1e-6 * max(err, 1e-12) and sweep > 0:
            err = new_err
            break
        err = new_err
    return coeffs, err
