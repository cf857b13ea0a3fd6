"""Product-of-sums fully-connected layer (ProdSumNet, C. W. Wu 2018).

``W = F_1·F_2·…·F_p`` with ``F_j = Σ_k g(a_jk)·M_jk`` (shape ``d_{j-1} × d_j``, ``d_0 = out``,
``d_p = in``): fixed basis matrices ``M_jk`` rebuilt from a seed (see
:mod:`tncompress.decompositions.prodsum`), trainable scalars ``a_jk``. The state dict holds only
the scalars (``coeffs.j``) and the bias; the bases are non-persistent buffers, regenerated at
construction and whenever the dtype changes (so a float64 layer holds float64-exact bases).

Forward: each factor is applied by its cheapest exact route — circulant factors by real FFTs,
Kronecker factors by two GEMMs when that beats the dense factor, the others as a dense factor
assembled from the scalars (one small GEMM) — or, for p > 1, all factors are first multiplied into W
when one GEMM with W is cheaper. Assembled operators are batch independent: they are rebuilt on
every call, or kept by ``merge()`` for inference (see :mod:`tncompress.layers.base`).

Pure torch: a compressed model runs where tensorly is not installed.
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tncompress.decompositions import prodsum as ps
from tncompress.errors import RankError
from tncompress.layers.base import FactorizedLayer, linear_unsupported_reason

__all__ = ["ProdSumLinear", "ProdSumFactors"]

log = logging.getLogger(__name__)


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 FFTs are not supported on CPU (nor for every size on CUDA): use float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _per_factor(value: Any, p: int, name: str, check: Any) -> list[Any]:
    """A scalar setting broadcast to p factors, or a list of exactly p values."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * p
    if len(values) != p:
        raise RankError(f"{name} has {len(values)} entries but p = {p}; give one value or a list of {p}")
    for v in values:
        check(v)
    return values


class ProdSumFactors(FactorizedLayer):
    """The product-of-sums matrix ``rows × cols`` (coefficients, bases, assembly, init, fitting);
    shared by :class:`ProdSumLinear` and :class:`~tncompress.layers.prodsum_conv.ProdSumConv2d`."""

    def _setup(self, rows: int, cols: int, p: int, terms: int | Sequence[int], family: str | Sequence[str],
               seed: int, widths: Sequence[int] | None, g: str, density: float,
               device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        if not _is_int(p) or p < 1:
            raise RankError(f"p (the number of factors) must be a positive integer, got {p!r}")
        p = int(p)

        def check_terms(v: Any) -> None:
            if not _is_int(v) or v < 1:
                raise RankError(f"terms must be positive integers (the number of summed bases per factor), got {v!r}")

        def check_family(v: Any) -> None:
            if v not in ps.FAMILIES:
                raise RankError(f"unknown product-of-sums family {v!r}; known: {', '.join(ps.FAMILIES)}")

        self.terms = [int(t) for t in _per_factor(terms, p, "terms", check_terms)]
        self.families = [str(f) for f in _per_factor(family, p, "family", check_family)]
        if not _is_int(seed):
            raise RankError(f"seed must be an integer, got {seed!r}")
        if g not in ps.G_FUNCTIONS:
            raise RankError(f"unknown g {g!r}; known: {', '.join(ps.G_FUNCTIONS)}")
        if widths is None:
            widths = [min(rows, cols)] * (p - 1)
        if not isinstance(widths, (list, tuple)) or len(widths) != p - 1 or not all(_is_int(w) and w >= 1 for w in widths):
            raise RankError(f"widths must be a list of p − 1 = {p - 1} positive integers (the inner sizes), got {widths!r}")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise RankError(f"density (of sparse bases) must be a number in (0, 1], got {density!r}")
        self.p, self.seed, self.g, self.density = p, int(seed), str(g), float(density)
        self.widths = [int(w) for w in widths]
        dims = [rows, *self.widths, cols]
        self.shapes = [(dims[j], dims[j + 1]) for j in range(p)]
        for j, (fam, (r, c), s) in enumerate(zip(self.families, self.shapes, self.terms)):
            ps.check_family(fam, r, c, s, self.density, where=f"factor {j} ({r}×{c})")
        self.coeffs = nn.ParameterList(
            [nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in self.terms])
        self._basis_names: list[list[str]] = []
        ref = self.coeffs[0]
        for j in range(p):
            bases = self._make_bases(j, ref.dtype, ref.device)
            self._basis_names.append(sorted(bases))
            for name, t in bases.items():
                self.register_buffer(f"basis{j}_{name}", t, persistent=False)
        self._basis_dtype = ref.dtype
        self.fit_error: float = math.nan  # relative weight error, set by from_dense

    def _make_bases(self, j: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        r, c = self.shapes[j]
        return ps.make_bases(self.families[j], r, c, self.terms[j], self.seed, j, self.density,
                             dtype=dtype, device=device)

    def bases(self, j: int) -> dict[str, Tensor]:
        return {name: getattr(self, f"basis{j}_{name}") for name in self._basis_names[j]}

    def _apply(self, fn: Any, recurse: bool = True) -> FactorizedLayer:
        """After ``.to(dtype)`` (or ``.double()``, …), regenerate the bases in the new dtype rather than
        keep cast copies, so they are exact in that precision."""
        out = super()._apply(fn, recurse)
        dtype = self.coeffs[0].dtype
        if dtype != self._basis_dtype and dtype.is_floating_point:
            for j in range(self.p):
                if self.families[j] == "circulant":
                    continue
                for name, t in self._make_bases(j, dtype, self.coeffs[0].device).items():
                    setattr(self, f"basis{j}_{name}", t)
            self._basis_dtype = dtype
        return out

    # ------------------------------------------------------------------ values

    def _g(self, a: Tensor) -> Tensor:
        return torch.tanh(a) if self.g == "tanh" else a

    def factor(self, j: int) -> Tensor:
        """F_j as a dense matrix (differentiable in the scalars)."""
        r, c = self.shapes[j]
        return ps.assemble(self.families[j], self.bases(j), self._g(self.coeffs[j]), r, c)

    def weight_matrix(self) -> Tensor:
        """W = F_1·…·F_p (``rows × cols``), differentiable."""
        w = self.factor(0)
        for j in range(1, self.p):
            w = w @ self.factor(j)
        return w

    def num_trainable_scalars(self) -> int:
        return sum(self.terms)

    def reset_factors(self, fan_in: int) -> None:
        """Random scalars so that W's mean square entry is nn.Linear's/nn.Conv2d's default 1/(3·fan_in).

        With i.i.d. N(0, σ_j²) scalars, F_j's mean square entry is s_j·σ_j²·m_j (m_j: the bases' mean
        square entry) and W's is Π_j v_j · Π(inner widths) for factor variances v_j; all v_j equal
        gives v = (1 / (3·fan_in·Π widths))^(1/p). (With g = tanh this holds for small scalars.)
        """
        v = (1.0 / (3.0 * fan_in * math.prod(self.widths))) ** (1.0 / self.p)
        with torch.no_grad():
            for j in range(self.p):
                r, c = self.shapes[j]
                m = ps.second_moment(self.families[j], self.bases(j), r, c)
                self.coeffs[j].normal_(0.0, math.sqrt(v / (self.terms[j] * max(m, 1e-300))))

    def fit_dense(self, weight: Tensor, sweeps: int = 8) -> float:
        """Set the scalars to fit ``weight`` (``rows × cols``) in float64; returns the relative error.

        p = 1: exact least squares (the best fit in the span of the bases). p > 1: alternating least
        squares from the current (random) scalars. Only for g = identity.
        """
        if self.g != "identity":
            raise RankError(f"from_dense fits g = identity only; with g = {self.g} train from a random init")
        device = torch.device("cpu") if weight.device.type == "mps" else weight.device
        w = weight.detach().to(device=device, dtype=torch.float64)
        bases = [{k: (v.to(device) if not v.is_floating_point() else v.to(device, torch.float64))
                  for k, v in self._make_bases(j, torch.float64, device).items()} for j in range(self.p)]
        if self.p == 1:
            coeffs = [ps.least_squares(self.families[0], bases[0], w, *self.shapes[0])]
            approx = ps.assemble(self.families[0], bases[0], coeffs[0], *self.shapes[0])
            err = float(torch.linalg.norm(approx - w) / torch.linalg.norm(w).clamp_min(1e-300))
        else:
            coeffs, err = ps.fit_product(w, self.families, bases, self.shapes,
                                         [c.detach().to(device) for c in self.coeffs], sweeps=sweeps)
        with torch.no_grad():
            for j in range(self.p):
                self.coeffs[j].copy_(coeffs[j].to(self.coeffs[j]))
        self.unmerge()
        log.info("prodsum fit of a %s×%s weight: relative error %.4g", *self.shapes[0][:1], self.shapes[-1][1], err)
        return err

    def factor_config(self) -> dict[str, Any]:
        fam: str | list[str] = self.families[0] if len(set(self.families)) == 1 else list(self.families)
        return {"p": self.p, "terms": list(self.terms), "family": fam, "seed": self.seed,
                "widths": list(self.widths), "g": self.g, "density": self.density}

    def factor_repr(self) -> str:
        fam = self.families[0] if len(set(self.families)) == 1 else self.families
        return (f"p={self.p}, terms={self.terms}, family={fam}, widths={self.widths}, g={self.g}, "
                f"seed={self.seed}, params={self.num_trainable_scalars()}")


class ProdSumLinear(ProdSumFactors):
    """``y = x·Wᵀ + b`` with ``W = Π_j Σ_k g(a_jk)·M_jk``; a drop-in replacement for ``nn.Linear``.

    ``terms``: s_j per factor (an int for all); ``family``: one of ``gaussian``, ``sparse``,
    ``circulant``, ``kronecker`` (or a list, one per factor); ``widths``: the p − 1 inner sizes
    (default min(in, out)); ``g``: ``identity`` or ``tanh``; ``density``: of ``sparse`` bases.
    Trainable parameters: Σ s_j (+ bias).
    """

    method = "prodsum"

    def __init__(self, in_features: int, out_features: int, p: int = 1, terms: int | Sequence[int] = 16,
                 family: str | Sequence[str] = "gaussian", seed: int = 0, widths: Sequence[int] | None = None,
                 g: str = "identity", density: float = 0.05, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not _is_int(v) or v < 1:
                raise RankError(f"{name} must be a positive integer, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._setup(self.out_features, self.in_features, p, terms, family, seed, widths, g, density, device, dtype)
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random scalars with nn.Linear's weight variance 1/(3·in); bias as nn.Linear's."""
        self.reset_factors(self.in_features)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)
        self.unmerge()

    @staticmethod
    def unsupported_reason(linear: nn.Module) -> str | None:
        """Why ``linear`` cannot become a ProdSumLinear (one line), or None."""
        return linear_unsupported_reason(linear, "product-of-sums")

    @classmethod
    def from_dense(cls, linear: nn.Linear, p: int = 1, terms: int | Sequence[int] = 16,
                   family: str | Sequence[str] = "gaussian", seed: int = 0, widths: Sequence[int] | None = None,
                   g: str = "identity", density: float = 0.05, sweeps: int = 8) -> "ProdSumLinear":
        """Fit a trained ``linear``: least squares for p = 1, alternating least squares for p > 1
        (float64, cast back to the module's dtype). ``fit_error`` holds the relative weight error."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ProdSumLinear.from_dense expects an nn.Linear, got {type(linear).__name__}")
        reason = cls.unsupported_reason(linear)
        if reason is not None:
            raise RankError(f"cannot use product-of-sums here: {reason}")
        weight = linear.weight.detach()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the ALS start (the random init) is reproducible from the seed
        try:
            layer = cls(linear.in_features, linear.out_features, p=p, terms=terms, family=family, seed=seed,
                        widths=widths, g=g, density=density, bias=linear.bias is not None,
                        device=weight.device, dtype=torch.float64)
        finally:
            torch.random.set_rng_state(gen_state)
        layer.fit_error = layer.fit_dense(weight, sweeps=sweeps)
        layer = layer.to(dtype=weight.dtype)
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach())
        return layer

    # ------------------------------------------------------------------ costs

    def _factor_kind(self, j: int) -> str:
        fam, (r, c), s = self.families[j], self.shapes[j], self.terms[j]
        if fam == "circulant":
            return "fft"
        if fam == "kronecker":
            r1, r2 = ps.kron_split(r)
            c1, c2 = ps.kron_split(c)
            if s * r2 * c1 * (c2 + r1) < r * c:
                return "kron"
        return "dense"

    def _sample_macs(self, j: int) -> int:
        """Per-sample MACs of applying factor j by its route (FFT: an estimate)."""
        kind, (r, c), s = self._factor_kind(j), self.shapes[j], self.terms[j]
        if kind == "fft":
            return ps.fft_macs(max(r, c))
        if kind == "kron":
            r1, r2 = ps.kron_split(r)
            c1, c2 = ps.kron_split(c)
            return s * r2 * c1 * (c2 + r1)
        return r * c

    def _assemble_macs(self, j: int) -> int:
        """Batch-independent matmul MACs of assembling factor j densely (gaussian, kronecker)."""
        r, c = self.shapes[j]
        return self.terms[j] * r * c if self.families[j] in ("gaussian", "kronecker") else 0

    def _merge_macs(self) -> int:
        dims = [self.out_features, *self.widths, self.in_features]
        return sum(dims[0] * dims[j] * dims[j + 1] for j in range(1, self.p))

    def _merged(self, batch: int | None) -> bool:
        """Whether to multiply the factors into W first: at inference (batch None) when W costs fewer
        MACs per sample than the chain; with autograd when it costs fewer for the whole batch."""
        if self.p == 1:
            return False
        chain = sum(self._sample_macs(j) for j in range(self.p))
        full = self.in_features * self.out_features
        if batch is None:
            return full < chain
        chain_total = batch * chain + sum(self._assemble_macs(j) for j in range(self.p) if self._factor_kind(j) == "dense")
        merged_total = batch * full + sum(self._assemble_macs(j) for j in range(self.p)) + self._merge_macs()
        return merged_total < chain_total

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """MACs of one inference forward of one sample with the factors assembled by ``merge()`` (see
        :meth:`assemble_macs` for the batch-independent assembly). Circulant factors run as FFTs,
        whose MACs are an estimate (:func:`~tncompress.decompositions.prodsum.fft_macs`) that
        FlopCounterMode does not see; everything else is exactly what FlopCounterMode counts."""
        if self._merged(None):
            return self.in_features * self.out_features
        return sum(self._sample_macs(j) for j in range(self.p))

    def assemble_macs(self, batch: int | None = None) -> int:
        """Matmul MACs of assembling the operators (every forward; once after ``merge()``)."""
        if self._merged(batch):
            return sum(self._assemble_macs(j) for j in range(self.p)) + self._merge_macs()
        return sum(self._assemble_macs(j) for j in range(self.p) if self._factor_kind(j) == "dense")

    # ------------------------------------------------------------------ forward

    def _prepare(self, merged: bool) -> list[tuple[str, Any]]:
        """The operators the forward applies, last factor first."""
        if merged:
            return [("dense", self.weight_matrix())]
        ops: list[tuple[str, Any]] = []
        for j in reversed(range(self.p)):
            kind, (r, c) = self._factor_kind(j), self.shapes[j]
            coeffs = self._g(self.coeffs[j])
            bases = self.bases(j)
            if kind == "fft":
                n = max(r, c)
                full = coeffs.new_zeros(n).index_add(0, bases["offsets"], coeffs)
                ops.append(("fft", (torch.fft.rfft(full.to(_fft_dtype(full.dtype))).conj(), n, r)))
            elif kind == "kron":
                a, b = bases["a"], bases["b"]
                s, r1, c1 = a.shape
                _, r2, c2 = b.shape
                left = (coeffs[:, None, None] * a).permute(1, 0, 2).reshape(r1, s * c1)
                right = b.permute(2, 0, 1).reshape(c2, s * r2)
                ops.append(("kron", (left, right, s, r1, c1, r2, c2)))
            else:
                ops.append(("dense", ps.assemble(self.families[j], bases, coeffs, r, c)))
        return ops

    def _precompute(self) -> list[tuple[str, Any]]:
        return self._prepare(self._merged(None))

    def _operators(self, batch: int) -> list[tuple[str, Any]]:
        ops = self._merged_ops()
        if ops is not None:
            return ops
        return self._prepare(self._merged(batch if torch.is_grad_enabled() else None))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ProdSumLinear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        t = x.reshape(-1, x.shape[-1])
        if t.shape[0] == 0:  # FFT backends refuse empty batches; the answer is known
            y = t @ t.new_zeros(self.in_features, self.out_features)  # empty, and part of the graph
            return (y + self.bias if self.bias is not None else y).reshape(*lead, self.out_features)
        ops = self._operators(t.shape[0])
        for i, (kind, op) in enumerate(ops):
            last = i == len(ops) - 1
            if kind == "dense":
                t = F.linear(t, op, self.bias if last else None)
                continue
            if kind == "fft":
                spec, n, rows = op
                dtype = t.dtype  # half precisions have no CPU FFT (and only power-of-two sizes on CUDA)
                t = torch.fft.irfft(torch.fft.rfft(t.to(spec.real.dtype), n=n) * spec, n=n)[:, :rows].to(dtype)
            else:
                left, right, s, r1, c1, r2, c2 = op
                b = t.shape[0]
                u = (t.reshape(b * c1, c2) @ right).reshape(b, c1, s, r2).permute(0, 2, 1, 3).reshape(b, s * c1, r2)
                t = torch.matmul(left, u).reshape(b, r1 * r2)
            if last and self.bias is not None:
                t = t + self.bias
        return t.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ conversions

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this structure, bases included (JSON-safe)."""
        return {"in_features": self.in_features, "out_features": self.out_features, **self.factor_config(),
                "bias": self.bias is not None}

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same dtype and device)."""
        ref = self.coeffs[0]
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.factor_repr()}, "
                f"bias={self.bias is not None}")
