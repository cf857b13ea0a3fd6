"""Tensor-Train matrix (TT-matrix) for fully-connected layers and embedding tables: ``recipe method: tt``.

For an ``nn.Embedding`` the vocabulary × dim table is the TT-matrix (Hrinchuk et al. 2020,
"Tensorized Embedding Layers"): ``in_modes`` split the vocabulary, ``out_modes`` the embedding
dim, and rows are gathered from the cores without forming the table (:class:`TTEmbedding`)."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from tncompress.decompositions import tt as tt_ops
from tncompress.decompositions.tucker2 import small_lapack
from tncompress.errors import RankError
from tncompress.layers import FactorizedLayer, TTEmbedding, TTLinear
from tncompress.methods import register
from tncompress.methods.base import (
    Ladder,
    Method,
    Planned,
    Settings,
    bad_rank,
    energy,
    fraction,
    is_int,
    meta_macs,
    rank_int,
    setting,
    unchecked,
)


@dataclass(frozen=True)
class TTSettings(Settings):
    rank: Any = setting(8, unchecked, "one bond rank, a list of d − 1, a fraction of params, or {energy: e}")
    in_modes: Any = setting(None, unchecked, "factors of in_features (default: chosen automatically)")
    out_modes: Any = setting(None, unchecked, "factors of out_features (default: chosen automatically)")
    d: Any = setting(None, unchecked, "number of cores when the modes are chosen automatically")


def _round(cores: Sequence[torch.Tensor], caps: Sequence[int]) -> list[torch.Tensor]:
    """Truncate left-orthonormal TT cores (as TT-SVD returns them) to bond ranks ``caps`` by
    right-to-left truncated SVDs (TT rounding): a budget scan then needs one TT-SVD per layer, not
    one per rank."""
    out = list(cores)
    for k in range(len(out) - 1, 0, -1):
        r0, m, n, r1 = out[k].shape
        with small_lapack(r0):
            u, s, vh = torch.linalg.svd(out[k].reshape(r0, m * n * r1), full_matrices=False)
        r = min(int(caps[k - 1]), s.numel())
        out[k] = vh[:r].reshape(r, m, n, r1)
        out[k - 1] = torch.einsum("abcd,de->abce", out[k - 1], u[:, :r] * s[:r])
    return out


class TTMethod(Method):
    name = "tt"
    order = 10
    aliases = ("tensor-train",)
    types = ("Linear", "Embedding")
    settings = TTSettings
    summary = "Tensor-Train matrix (Novikov et al. 2015) of a Linear weight or an embedding table, by TT-SVD"
    supports_budget = True
    costly_ladder_macs = True  # the contraction schedule, hence the MACs, depend on every bond's rank

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return TTEmbedding if isinstance(module, nn.Embedding) else TTLinear

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (TTLinear, TTEmbedding)

    def structure(self, module: nn.Module, s: TTSettings, where: str) -> Planned:
        """The modes (given, or chosen automatically) without the ranks."""
        planned = self._linear_structure(_as_matrix(module), s, where)
        return Planned(_layer_config(module, planned.config), None, planned.notes)

    def _linear_structure(self, module: nn.Linear, s: TTSettings, where: str) -> Planned:
        notes: list[str] = []
        d = s.d
        if d is not None and (not is_int(d) or d < 2):
            raise RankError(f"{where}: d (number of TT cores) must be an integer ≥ 2, got {d!r}")
        in_modes, out_modes = s.in_modes, s.out_modes
        for key, modes, feats in (("in_modes", in_modes, module.in_features),
                                  ("out_modes", out_modes, module.out_features)):
            if modes is None:
                continue
            if not isinstance(modes, list) or not modes or not all(is_int(m) and m >= 1 for m in modes):
                raise RankError(f"{where}: {key} must be a list of positive integers, got {modes!r}")
            if math.prod(modes) < feats:
                raise RankError(f"{where}: {key} {modes} multiply to {math.prod(modes)}, but the layer has {feats} "
                                f"{'input' if key == 'in_modes' else 'output'} features (the product may be larger: "
                                "the TT layer pads)")
        if in_modes is not None and out_modes is not None and len(in_modes) != len(out_modes):
            raise RankError(f"{where}: in_modes has {len(in_modes)} entries and out_modes {len(out_modes)}; "
                            "they must match")
        if in_modes is None or out_modes is None:
            n_cores = len(in_modes or out_modes or []) or d
            auto_in, auto_out = tt_ops.auto_modes(module.in_features, module.out_features, n_cores)
            in_modes = in_modes or auto_in
            out_modes = out_modes or auto_out
            notes.append(f"modes chosen automatically: in {list(in_modes)}, out {list(out_modes)}")
        elif d is not None and d != len(in_modes):
            raise RankError(f"{where}: d = {d} but the given modes have {len(in_modes)} entries")
        for side, modes, feats in (("in", in_modes, module.in_features), ("out", out_modes, module.out_features)):
            if math.prod(modes) > feats:
                notes.append(f"{side} modes {list(modes)} cover {math.prod(modes):,} > {feats:,} features: padded with "
                             f"{math.prod(modes) - feats:,} zero {'inputs' if side == 'in' else 'outputs'} (the "
                             "factors of the size itself are too uneven for a useful TT)")
        config = {"in_features": module.in_features, "out_features": module.out_features,
                  "in_modes": list(in_modes), "out_modes": list(out_modes), "bias": module.bias is not None}
        return Planned(config, None, notes)

    def plan(self, module: nn.Module, s: TTSettings, where: str) -> Planned:
        table = module if isinstance(module, nn.Embedding) else None
        module = _as_matrix(module)
        planned = self._linear_structure(module, s, where)
        in_modes, out_modes, notes = planned.config["in_modes"], planned.config["out_modes"], planned.notes
        rank = s.rank
        frac, share = fraction(rank, where), energy(rank, where)
        if frac is not None:
            ranks = [tt_ops.tt_rank_for_fraction(out_modes, in_modes, frac)] * (len(in_modes) - 1)
            ranks = tt_ops.clip_tt_ranks(ranks[0], out_modes, in_modes)
            notes.append(f"rank {ranks} keeps at most {frac:.0%} of the parameters")
        elif share is not None:
            eps = math.sqrt(max(0.0, 1.0 - share))
            cores = tt_ops.tt_matrix_svd(TTLinear.padded_weight(module.weight.detach(), in_modes, out_modes),
                                         out_modes, in_modes, rel_eps=eps)
            ranks = [int(c.shape[-1]) for c in cores[:-1]]
            notes.append(f"ranks from TT-SVD at relative accuracy {eps:.3g} (energy {share})")
        elif is_int(rank):
            rank_int(rank, where)
            ranks = tt_ops.clip_tt_ranks(rank, out_modes, in_modes)
            if any(r < rank for r in ranks):
                notes.append(f"rank {rank} clipped to the useful maximum at each bond: {ranks}")
        elif isinstance(rank, list):
            for r in rank:
                rank_int(r, where)
            ranks = tt_ops.clip_tt_ranks(rank, out_modes, in_modes)
        else:
            raise bad_rank(rank, where, "an integer, a list of d-1 integers, a fraction in (0, 1], or {energy: 0.9}")
        config = {**planned.config, "ranks": list(ranks)}
        config = {k: config[k] for k in ("in_features", "out_features", "in_modes", "out_modes", "ranks", "bias")}
        reason = f"tt rank {list(ranks)}, modes in {config['in_modes']} out {config['out_modes']}"
        if table is not None:
            config = _layer_config(table, config)
            reason = f"tt rank {list(ranks)}, vocabulary modes {config['vocab_modes']} dim modes {config['dim_modes']}"
        return Planned(config, list(ranks), notes, reason)

    def factorize(self, module: nn.Module, config: dict[str, Any], s: TTSettings) -> nn.Module:
        if isinstance(module, nn.Embedding):
            return TTEmbedding.from_dense(module, config["vocab_modes"], config["dim_modes"], ranks=config["ranks"])
        assert isinstance(module, nn.Linear)
        return TTLinear.from_dense(module, ranks=config["ranks"], in_modes=config["in_modes"],
                                   out_modes=config["out_modes"])

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        """Uniform rank r = 1, 2, … reached one bond at a time, so the steps are small."""
        in_modes, out_modes = _modes_of(config)
        maxima = tt_ops.max_tt_ranks(out_modes, in_modes)
        matrix = _as_matrix(module)
        dense_w = matrix.out_features * matrix.in_features
        bias = matrix.out_features if matrix.bias is not None else 0
        ranks: list[list[int]] = []
        current = [1] * len(maxima)
        if maxima and tt_ops.tt_param_count(out_modes, in_modes, current) < dense_w:
            ranks.append(list(current))
            r = 1
            growing = True
            while growing and current != maxima:
                r += 1
                for k, mx in enumerate(maxima):  # towards uniform rank r, one bond at a time
                    if min(r, mx) > current[k]:
                        trial = list(current)
                        trial[k] = min(r, mx)
                        if tt_ops.tt_param_count(out_modes, in_modes, trial) >= dense_w:
                            growing = False
                            break
                        current = trial
                        ranks.append(list(current))
        params = [tt_ops.tt_param_count(out_modes, in_modes, rk) + bias for rk in ranks]
        cls = self.layer_class(module)
        macs = ([meta_macs(cls, {**config, "ranks": rk}, in_shape) for rk in ranks] if want_macs
                else [0] * len(ranks))
        return list(ranks), params, macs

    def approximations(self, module: nn.Module, config: dict[str, Any], s: TTSettings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        """One TT-SVD at the largest rank of each bond, rounded down to every requested rank (an
        embedding's table is the matrix: vocabulary rows, dim columns)."""
        weight = cast(torch.Tensor, module.weight)
        w = weight.detach().to(torch.float64)
        in_modes, out_modes = _modes_of(config)
        rows_modes, cols_modes = (in_modes, out_modes) if isinstance(module, nn.Embedding) else (out_modes, in_modes)
        padded = TTLinear.padded_weight(w, cols_modes, rows_modes)
        top = [max(rk[k] for rk in ranks) for k in range(len(ranks[0]))]
        cores = tt_ops.tt_matrix_svd(padded, rows_modes, cols_modes, ranks=top)
        rows, cols = w.shape
        for rk in ranks:
            yield tt_ops.tt_matrix_to_full(_round(cores, rk)).reshape(padded.shape)[:rows, :cols]


def _as_matrix(module: nn.Module) -> nn.Linear:
    """The layer as the Linear whose modes the TT plan chooses: an embedding of V ids to D values is
    planned as a V → D map (in modes split the vocabulary, out modes the dim; no bias). Built on the
    meta device: only its sizes (and, for energy ranks, the table itself) are read."""
    if isinstance(module, nn.Linear):
        return module
    assert isinstance(module, nn.Embedding)
    with torch.device("meta"):
        view = nn.Linear(module.num_embeddings, module.embedding_dim, bias=False)
    view.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    return view


def _layer_config(module: nn.Module, linear_config: dict[str, Any]) -> dict[str, Any]:
    """The constructor config of the layer the method builds for ``module`` from the plan's
    Linear-shaped config (TTEmbedding's keys for an embedding)."""
    if not isinstance(module, nn.Embedding):
        return linear_config
    out = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
           "vocab_modes": list(linear_config["in_modes"]), "dim_modes": list(linear_config["out_modes"])}
    if "ranks" in linear_config:
        out["ranks"] = list(linear_config["ranks"])
    out["padding_idx"] = module.padding_idx
    return out


def _modes_of(config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(in modes, out modes) of a TTLinear config, or (vocabulary, dim) modes of a TTEmbedding's."""
    if "vocab_modes" in config:
        return list(config["vocab_modes"]), list(config["dim_modes"])
    return list(config["in_modes"]), list(config["out_modes"])


register(TTMethod())
