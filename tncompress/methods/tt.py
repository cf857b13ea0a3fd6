"""Tensor-Train matrix (TT-matrix) for fully-connected layers: ``recipe method: tt``."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress.decompositions import tt as tt_ops
from tncompress.decompositions.tucker2 import small_lapack
from tncompress.errors import RankError
from tncompress.layers import FactorizedLayer, TTLinear
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
    types = ("Linear",)
    settings = TTSettings
    summary = "Tensor-Train matrix (Novikov et al. 2015) of a Linear weight, by TT-SVD"
    supports_budget = True
    costly_ladder_macs = True  # the contraction schedule, hence the MACs, depend on every bond's rank

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return TTLinear

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (TTLinear,)

    def structure(self, module: nn.Module, s: TTSettings, where: str) -> Planned:
        """The modes (given, or chosen automatically) without the ranks."""
        assert isinstance(module, nn.Linear)
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
            if math.prod(modes) != feats:
                raise RankError(f"{where}: {key} {modes} multiply to {math.prod(modes)}, but the layer has {feats} "
                                f"{'input' if key == 'in_modes' else 'output'} features")
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
        config = {"in_features": module.in_features, "out_features": module.out_features,
                  "in_modes": list(in_modes), "out_modes": list(out_modes), "bias": module.bias is not None}
        return Planned(config, None, notes)

    def plan(self, module: nn.Module, s: TTSettings, where: str) -> Planned:
        assert isinstance(module, nn.Linear)
        planned = self.structure(module, s, where)
        in_modes, out_modes, notes = planned.config["in_modes"], planned.config["out_modes"], planned.notes
        rank = s.rank
        frac, share = fraction(rank, where), energy(rank, where)
        if frac is not None:
            ranks = [tt_ops.tt_rank_for_fraction(out_modes, in_modes, frac)] * (len(in_modes) - 1)
            ranks = tt_ops.clip_tt_ranks(ranks[0], out_modes, in_modes)
            notes.append(f"rank {ranks} keeps at most {frac:.0%} of the parameters")
        elif share is not None:
            eps = math.sqrt(max(0.0, 1.0 - share))
            cores = tt_ops.tt_matrix_svd(module.weight.detach(), out_modes, in_modes, rel_eps=eps)
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
        return Planned(config, list(ranks), notes,
                       f"tt rank {list(ranks)}, modes in {config['in_modes']} out {config['out_modes']}")

    def factorize(self, module: nn.Module, config: dict[str, Any], s: TTSettings) -> nn.Module:
        assert isinstance(module, nn.Linear)
        return TTLinear.from_dense(module, ranks=config["ranks"], in_modes=config["in_modes"],
                                   out_modes=config["out_modes"])

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        """Uniform rank r = 1, 2, … reached one bond at a time, so the steps are small."""
        assert isinstance(module, nn.Linear)
        out_modes, in_modes = config["out_modes"], config["in_modes"]
        maxima = tt_ops.max_tt_ranks(out_modes, in_modes)
        dense_w = module.out_features * module.in_features
        bias = module.out_features if module.bias is not None else 0
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
        macs = ([meta_macs(TTLinear, {**config, "ranks": rk}, in_shape) for rk in ranks] if want_macs
                else [0] * len(ranks))
        return list(ranks), params, macs

    def approximations(self, module: nn.Module, config: dict[str, Any], s: TTSettings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        """One TT-SVD at the largest rank of each bond, rounded down to every requested rank."""
        assert isinstance(module, nn.Linear)
        w = module.weight.detach().to(torch.float64)
        top = [max(rk[k] for rk in ranks) for k in range(len(ranks[0]))]
        cores = tt_ops.tt_matrix_svd(w, config["out_modes"], config["in_modes"], ranks=top)
        for rk in ranks:
            yield tt_ops.tt_matrix_to_full(_round(cores, rk)).reshape(w.shape)


register(TTMethod())
