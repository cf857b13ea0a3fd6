"""Low-rank embedding table: W = first · secondᵀ (a truncated SVD of a trained ``nn.Embedding``).

A lookup of ``first`` (num_embeddings × rank) followed by one ``F.linear`` (rank → embedding_dim), so
the table is never formed and the layer exports and compiles like an embedding plus a linear layer.
Pure torch: a compressed model runs where tensorly is not installed.

The helpers shared by the embedding layers (what an ``nn.Embedding`` must satisfy, padding index
normalisation, the id range check) live here too.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tncompress.errors import RankError
from tncompress.layers.base import FactorizedLayer

__all__ = ["LowRankEmbedding", "embedding_unsupported_reason"]


def embedding_unsupported_reason(embedding: nn.Module, what: str) -> str | None:
    """Why ``embedding`` cannot be replaced by a ``what`` embedding layer (one line), or None if it can."""
    if not isinstance(embedding, nn.Embedding):
        return f"{type(embedding).__name__} is not an nn.Embedding; {what} only replaces embedding tables"
    if embedding.max_norm is not None:
        return (f"max_norm={embedding.max_norm} renormalises looked-up rows in place, which a factorized "
                f"table cannot express")
    if embedding.scale_grad_by_freq:
        return "scale_grad_by_freq=True is not supported by factorized embeddings"
    if embedding.sparse:
        return "sparse=True (sparse gradients) is not supported by factorized embeddings"
    weight = embedding.weight
    if weight.is_complex():
        return f"complex weights are not supported by {what} (its factors are real)"
    if not weight.is_floating_point():
        return f"{weight.dtype} weights are not supported by {what} (its factors are floating point)"
    pad = embedding.padding_idx
    if pad is not None and bool(weight.detach()[pad].any()):
        return (f"the padding row {pad} is not zero; nn.Embedding's convention (a zero padding row) is "
                f"what {what} reproduces")
    return None


def resolve_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` in ``0..num_embeddings-1`` (negative values count from the end, as in nn.Embedding)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise ValueError(f"padding_idx must be an integer or None, got {padding_idx!r}")
    pad = int(padding_idx)
    if not -num_embeddings <= pad < num_embeddings:
        raise ValueError(f"padding_idx {pad} is outside the table of {num_embeddings} embeddings")
    return pad + num_embeddings if pad < 0 else pad


def positive_size(value: object, what: str) -> int:
    """``value`` as an int, or ValueError naming ``what`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def flat_ids(ids: Tensor, num_embeddings: int, what: str) -> Tensor:
    """``ids`` flattened to int64, after checking their dtype and (outside tracing/compiling) their range.

    Out-of-range ids raise :class:`IndexError` like ``nn.Embedding`` on a CPU (on a GPU nn.Embedding
    fails with a device-side assert instead); the check costs one min/max reduction.
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what} expects integer ids (torch.long or torch.int), got {ids.dtype}")
    flat = ids.reshape(-1).to(torch.int64)
    checkable = not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
    if checkable and flat.device.type != "meta" and flat.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= num_embeddings:
            raise IndexError(f"{what}: ids must be in [0, {num_embeddings}), got values in [{lo}, {hi}]")
    return flat


class LowRankEmbedding(FactorizedLayer):
    """``out = first[ids] · secondᵀ`` with ``first`` (num_embeddings × rank) and ``second``
    (embedding_dim × rank); a drop-in replacement for ``nn.Embedding``.

    A ``rank`` above ``min(num_embeddings, embedding_dim)`` adds nothing and is clipped to it; a rank
    below 1 raises :class:`RankError`. At ``padding_idx`` the output is exactly zero (masked), as
    nn.Embedding's zero padding row gives.
    """

    method = "lowrank_embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise RankError(f"low-rank embedding rank must be a positive integer, got {rank!r}")
        self.num_embeddings: int = positive_size(num_embeddings, "num_embeddings")
        self.embedding_dim: int = positive_size(embedding_dim, "embedding_dim")
        self.padding_idx: int | None = resolve_padding_idx(padding_idx, self.num_embeddings)
        self.rank: int = min(int(rank), self.num_embeddings, self.embedding_dim)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first: nn.Parameter = nn.Parameter(torch.empty(self.num_embeddings, self.rank, **factory))
        self.second: nn.Parameter = nn.Parameter(torch.empty(self.embedding_dim, self.rank, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose table ``first·secondᵀ`` has nn.Embedding's N(0, 1) variance.

        With i.i.d. N(0, σ²) factors, Var(W_ij) = rank·σ⁴, so σ = rank^(-1/4) on both (equal scales
        keep the two factors' gradients balanced).
        """
        sigma = 1.0 / math.sqrt(math.sqrt(self.rank))
        with torch.no_grad():
            self.first.normal_(0.0, sigma)
            self.second.normal_(0.0, sigma)

    @staticmethod
    def unsupported_reason(embedding: nn.Module) -> str | None:
        """Why ``embedding`` cannot become a LowRankEmbedding (one line), or None."""
        return embedding_unsupported_reason(embedding, "low-rank embedding")

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
        """The best rank-``rank`` approximation of a trained table (SVD in float64, cast back)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"LowRankEmbedding.from_dense expects an nn.Embedding, got {type(embedding).__name__}")
        reason = cls.unsupported_reason(embedding)
        if reason is not None:
            raise RankError(f"cannot use a low-rank embedding here: {reason}")
        from tncompress.decompositions.svd import truncated_svd  # pure torch; imported where needed

        weight = embedding.weight.detach()
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, rank, padding_idx=embedding.padding_idx,
                    device=weight.device, dtype=weight.dtype)
        left, right = truncated_svd(weight.to(torch.float64), layer.rank)
        with torch.no_grad():
            layer.first.copy_(left.to(dtype=weight.dtype, device=weight.device))
            layer.second.copy_(right.T.to(dtype=weight.dtype, device=weight.device))
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        flat = flat_ids(ids, self.num_embeddings, "LowRankEmbedding")
        out = F.linear(F.embedding(flat, self.first), self.second)
        if self.padding_idx is not None:
            out = out.masked_fill((flat == self.padding_idx).unsqueeze(-1), 0.0)
        return out.reshape(*ids.shape, self.embedding_dim)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this structure (JSON-safe)."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx}

    def to_dense(self) -> nn.Embedding:
        """The equivalent ``nn.Embedding`` (same dtype and device, zero padding row); forms the table."""
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                             device=self.first.device, dtype=self.first.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.first @ self.second.T)
            if self.padding_idx is not None:
                dense.weight[self.padding_idx].zero_()
        return dense

    def num_params(self) -> int:
        return self.rank * (self.num_embeddings + self.embedding_dim)

    def macs_per_sample(self, input_hw: tuple[int, int] | None = None) -> int:
        """rank·embedding_dim MACs per looked-up token (the lookup itself is no MAC)."""
        return self.rank * self.embedding_dim

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}, "
                f"params={self.num_params()}{pad}")
