"""Tensor-train embedding table (Hrinchuk et al. 2020, "Tensorized Embedding Layers").

The ``V × D`` table is a TT matrix with vocabulary modes ``v_1..v_d`` (rows, ``Π v_k ≥ V``) and
dimension modes ``e_1..e_d`` (columns, ``Π e_k ≥ D``), cores ``G_k`` of shape ``(r_{k-1}, v_k, e_k, r_k)``
as in :mod:`tncompress.decompositions.tt`. Rows ``≥ V`` are padding that is never looked up, columns
``≥ D`` are sliced off. A lookup splits each id into its mode indices and contracts only that row's
core slices, so the table is never formed: per token, ``Σ`` of a few tiny matrix products.

Pure torch: a compressed model runs where tensorly is not installed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tncompress.decompositions.tt import balance_core_norms, clip_tt_ranks, tt_matrix_to_full, zero_padded
from tncompress.errors import RankError
from tncompress.layers.base import FactorizedLayer
from tncompress.layers.lowrank_embedding import (
    embedding_unsupported_reason,
    flat_ids,
    positive_size,
    resolve_padding_idx,
)

__all__ = ["TTEmbedding"]


def _modes(values: Sequence[int], what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise RankError(f"{what} must be a non-empty list of positive integers, got {values!r}")
    try:
        return [positive_size(v, f"every entry of {what}") for v in values]
    except ValueError as exc:
        raise RankError(str(exc)) from None


class TTEmbedding(FactorizedLayer):
    """An embedding whose table is a TT matrix; a drop-in replacement for ``nn.Embedding``.

    Id ``i`` is row ``(i_1..i_d)`` of the TT matrix in C order (row-major, ``i_1`` most significant):
    ``i = ((i_1·v_2 + i_2)·v_3 + i_3)···``, so ``i_k = (i // Π_{j>k} v_j) mod v_k``, and its embedding
    is ``G_1[:, i_1] · G_2[:, i_2] ··· G_d[:, i_d]`` flattened over ``(e_1..e_d)`` in C order, first
    ``embedding_dim`` entries. ``ranks`` is one rank for every bond (clipped at each bond's useful
    maximum) or an explicit list of ``d - 1`` ranks. At ``padding_idx`` the output is exactly zero.
    """

    method = "tt_embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        vocab_modes: Sequence[int],
        dim_modes: Sequence[int],
        ranks: int | Sequence[int] = 8,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings: int = positive_size(num_embeddings, "num_embeddings")
        self.embedding_dim: int = positive_size(embedding_dim, "embedding_dim")
        self.padding_idx: int | None = resolve_padding_idx(padding_idx, self.num_embeddings)
        self.vocab_modes: list[int] = _modes(vocab_modes, "vocab_modes")
        self.dim_modes: list[int] = _modes(dim_modes, "dim_modes")
        if len(self.vocab_modes) != len(self.dim_modes):
            raise RankError(f"vocab_modes {self.vocab_modes} and dim_modes {self.dim_modes} must have the same length")
        if math.prod(self.vocab_modes) < self.num_embeddings or math.prod(self.dim_modes) < self.embedding_dim:
            raise RankError(
                f"TT modes do not cover a {self.num_embeddings}x{self.embedding_dim} table: "
                f"prod(vocab_modes={self.vocab_modes}) = {math.prod(self.vocab_modes)}, "
                f"prod(dim_modes={self.dim_modes}) = {math.prod(self.dim_modes)}"
            )
        self.ranks: list[int] = clip_tt_ranks(ranks, self.vocab_modes, self.dim_modes)
        full = [1, *self.ranks, 1]
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], v, e, full[k + 1], **factory))
            for k, (v, e) in enumerate(zip(self.vocab_modes, self.dim_modes))
        )
        # Divisors that split an id into its mode indices (row-major: the first mode is the slowest).
        self._strides: list[int] = [math.prod(self.vocab_modes[k + 1:]) for k in range(len(self.vocab_modes))]
        self._left_to_right: bool = self._chain_macs(True) <= self._chain_macs(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose table has nn.Embedding's N(0, 1) variance.

        Each table entry is a sum over Π r_k products of d entries (one per core), so with i.i.d.
        N(0, σ²) cores Var(T_ij) = σ^{2d}·Π r_k = 1, hence σ = (Π r_k)^(-1/(2d)).
        """
        d = len(self.cores)
        sigma = (1.0 / math.sqrt(math.prod(self.ranks))) ** (1.0 / d)
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, sigma)

    @staticmethod
    def unsupported_reason(embedding: nn.Module) -> str | None:
        """Why ``embedding`` cannot become a TTEmbedding (one line), or None."""
        return embedding_unsupported_reason(embedding, "TT embedding")

    @classmethod
    def from_dense(
        cls,
        embedding: nn.Embedding,
        vocab_modes: Sequence[int],
        dim_modes: Sequence[int],
        ranks: int | Sequence[int] | None = 8,
        rel_eps: float | None = None,
    ) -> TTEmbedding:
        """A TT embedding approximating a trained table by TT-SVD (float64, cast back).

        The table is zero-padded to ``Π vocab_modes × Π dim_modes`` first. ``ranks`` caps the bond
        ranks (``None``: no cap, exact); ``rel_eps`` additionally truncates so the relative Frobenius
        error of the padded table is at most ``rel_eps``. The scale is spread evenly over the cores
        (equal Frobenius norms), which keeps gradients balanced when fine-tuning.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"TTEmbedding.from_dense expects an nn.Embedding, got {type(embedding).__name__}")
        reason = cls.unsupported_reason(embedding)
        if reason is not None:
            raise RankError(f"cannot use a TT embedding here: {reason}")
        from tncompress.decompositions.tt import tt_matrix_svd  # pure torch; imported where needed

        weight = embedding.weight.detach()
        # Validates the modes (and that they cover the table) before any work.
        probe = cls(embedding.num_embeddings, embedding.embedding_dim, vocab_modes, dim_modes,
                    ranks=ranks if ranks is not None else 1, device="meta")
        table = zero_padded(weight.double(), math.prod(probe.vocab_modes), math.prod(probe.dim_modes))
        cores = tt_matrix_svd(table, probe.vocab_modes, probe.dim_modes, ranks=ranks, rel_eps=rel_eps)
        cores = balance_core_norms(cores)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, probe.vocab_modes, probe.dim_modes,
                    ranks=[int(c.shape[3]) for c in cores[:-1]], padding_idx=embedding.padding_idx,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores):
                param.copy_(core.to(dtype=weight.dtype, device=weight.device))
        return layer

    # ------------------------------------------------------------------ contract helpers

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this structure (JSON-safe)."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "vocab_modes": list(self.vocab_modes),
            "dim_modes": list(self.dim_modes),
            "ranks": list(self.ranks),
            "padding_idx": self.padding_idx,
        }

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding`` (same dtype and device, zero padding row); forms the table."""
        ref = self.cores[0]
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                             device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            full = tt_matrix_to_full([c.detach() for c in self.cores])
            dense.weight.copy_(full[: self.num_embeddings, : self.embedding_dim])
            if self.padding_idx is not None:
                dense.weight[self.padding_idx].zero_()
        return dense

    def num_core_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def _chain_macs(self, left_to_right: bool) -> int:
        """MACs per token of contracting the d row slices in one direction.

        Left to right, step k multiplies the (Π_{j<k} e_j × r_{k-1}) partial row by the
        (r_{k-1} × e_k·r_k) slice; right to left, the (r_{k-1}·e_k × r_k) slice by the
        (r_k × Π_{j>k} e_j) partial row.
        """
        e, full = self.dim_modes, [1, *self.ranks, 1]
        d = len(e)
        if left_to_right:
            return sum(math.prod(e[:k]) * full[k] * e[k] * full[k + 1] for k in range(1, d))
        return sum(full[k] * e[k] * full[k + 1] * math.prod(e[k + 1:]) for k in range(d - 1))

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """MACs per looked-up token: the cheaper contraction order of the row slices (the lookup of
        the slices and the padding mask are no MACs, as in FlopCounterMode)."""
        return self._chain_macs(self._left_to_right)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"vocab_modes={self.vocab_modes}, dim_modes={self.dim_modes}, ranks={self.ranks}, "
            f"params={self.num_core_params()}{pad}"
        )

    # ------------------------------------------------------------------ forward

    def _slices(self, flat: Tensor) -> list[Tensor]:
        """Per token and core, the slice ``G_k[:, i_k, :, :]``: a list of (N, r_{k-1}, e_k, r_k)."""
        out = []
        for k, (core, v, stride) in enumerate(zip(self.cores, self.vocab_modes, self._strides)):
            idx = torch.div(flat, stride, rounding_mode="floor") if stride > 1 else flat
            if k > 0:  # ids < Π v_j, so the first mode index needs no remainder
                idx = torch.remainder(idx, v)
            out.append(core.permute(1, 0, 2, 3)[idx])  # a gather of N small slices, contiguous
        return out

    def forward(self, ids: Tensor) -> Tensor:
        flat = flat_ids(ids, self.num_embeddings, "TTEmbedding")
        n = flat.shape[0]
        slices = self._slices(flat)
        e, full = self.dim_modes, [1, *self.ranks, 1]
        d = len(e)
        if self._left_to_right:
            # state (N, Π_{j<k} e_j, r_{k-1}) @ slice (N, r_{k-1}, e_k·r_k), viewed as (N, Π_{j≤k} e_j, r_k)
            state, width = slices[0].reshape(n, e[0], full[1]), e[0]
            for k in range(1, d):
                step = torch.bmm(state, slices[k].reshape(n, full[k], e[k] * full[k + 1]))
                width *= e[k]
                state = step.reshape(n, width, full[k + 1])
        else:
            # slice (N, r_{k-1}·e_k, r_k) @ state (N, r_k, Π_{j>k} e_j), viewed as (N, r_{k-1}, Π_{j≥k} e_j)
            state, width = slices[-1].reshape(n, full[d - 1], e[-1]), e[-1]
            for k in range(d - 2, -1, -1):
                step = torch.bmm(slices[k].reshape(n, full[k] * e[k], full[k + 1]), state)
                width *= e[k]
                state = step.reshape(n, full[k], width)
        out = state.reshape(n, width)[:, : self.embedding_dim]
        if self.padding_idx is not None:
            out = out.masked_fill((flat == self.padding_idx).unsqueeze(-1), 0.0)
        return out.reshape(*ids.shape, self.embedding_dim)
