"""Tucker-2 of convolutions (Kim et al. 2016): ``recipe method: tucker2`` (alias ``tucker``).

The kernel K (out, in, kh, kw) ≈ core ×₁ U_out ×₂ U_in runs as 1×1 (in → r_in), kh×kw (r_in →
r_out), 1×1 (r_out → out).

A 1×1 conv (groups 1) is a matrix: Tucker-2 would spend its budget on a 1×1 core between two
projections, so it is factorized by truncated SVD instead (:class:`LowRankConv2d`: 1×1 (in → r),
1×1 (r → out)), every rank form mapped to the SVD rank it stands for (see :meth:`Tucker2Method.plan`).

A fraction of the parameters for a k×k conv is split between r_in and r_out to minimise the
truncated-HOSVD error (:func:`~tncompress.decompositions.ranks.tucker2_split_for_fraction`), not in
proportion to the channels (so an RGB stem keeps all 3 input channels when that is better).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress.decompositions import ranks as rank_rules
from tncompress.decompositions import svd as svd_ops
from tncompress.decompositions.ranks import tucker2_params
from tncompress.decompositions.tucker2 import small_lapack
from tncompress.errors import RankError
from tncompress.layers import FactorizedLayer, LowRankConv2d, Tucker2Conv2d
from tncompress.methods import register
from tncompress.methods.base import (
    Ladder,
    Method,
    Planned,
    Settings,
    bad_rank,
    conv_kwargs,
    energy,
    fraction,
    is_int,
    meta_macs,
    one_of,
    positive_int,
    rank_int,
    setting,
    unchecked,
    unit_interval,
)


@dataclass(frozen=True)
class Tucker2Settings(Settings):
    rank: Any = setting("vbmf", unchecked, "an integer, [R_in, R_out], a fraction of params, {energy: e} or vbmf")
    algorithm: Any = setting("hooi", one_of("hooi", "hosvd"), "HOOI iterations, or the truncated HOSVD alone")
    n_iter: Any = setting(20, positive_int, "HOOI iterations")
    floor: Any = setting(1, positive_int, "smallest rank VBMF may choose")
    weakening: Any = setting(0.0, unit_interval, "move the VBMF ranks this far towards full rank")


def _basis(matrix: torch.Tensor) -> torch.Tensor:
    """All left singular vectors of ``matrix`` (rows × anything), dominant first, from its Gram matrix."""
    gram = matrix @ matrix.T
    with small_lapack(gram.shape[0]):
        _, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    return vecs.flip(-1)


def hosvd_bases(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output- and input-channel bases of a truncated HOSVD of a conv weight (layer dtype)."""
    w = weight.detach().to(torch.float64)
    cout, cin = w.shape[0], w.shape[1]
    u_out = _basis(w.reshape(cout, -1))
    u_in = _basis(w.transpose(0, 1).reshape(cin, -1))
    return u_out.to(weight.dtype), u_in.to(weight.dtype)


def project(weight: torch.Tensor, bases: tuple[torch.Tensor, torch.Tensor], ranks: Sequence[int]) -> torch.Tensor:
    """K ≈ U_out·core·U_inᵀ with core = U_outᵀ·K·U_in at ``ranks`` = (r_in, r_out), in the layer's
    dtype (a scan needs no float64): two large products per rank."""
    u_out, u_in = bases
    w = weight.detach()
    cout, cin = w.shape[0], w.shape[1]
    wk = w.permute(0, 2, 3, 1).reshape(cout, -1, cin)          # (o, hw, i)
    r_in, r_out = ranks
    po, pi = u_out[:, :r_out], u_in[:, :r_in]
    core = (po.T @ wk.reshape(cout, -1)).reshape(r_out, -1, cin) @ pi     # (ro, hw, ri)
    k = (po @ (core @ pi.T).reshape(r_out, -1)).reshape(cout, *w.shape[2:], cin)
    return k.permute(0, 3, 1, 2)


def is_pointwise(module: nn.Module) -> bool:
    """A 1×1 conv with groups 1: a matrix, which Tucker-2 factorizes by truncated SVD."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _energy(rank: Any, where: str) -> float | None:
    """The share of an ``{energy: e}`` rank; None for the other forms, ``{in, out}`` included (which
    :func:`~tncompress.methods.base.energy` alone would refuse as a mapping without ``energy``)."""
    if isinstance(rank, dict) and set(rank) == {"in", "out"}:
        return None
    return energy(rank, where)


def _explicit_pair(rank: Any, where: str, cin: int, cout: int) -> tuple[int, int] | None:
    """(R_in, R_out) of a ``[R_in, R_out]`` / ``{in, out}`` rank, checked against the channels;
    None for the other rank forms."""
    if not isinstance(rank, (list, dict)):
        return None
    if isinstance(rank, dict):
        if set(rank) != {"in", "out"}:
            raise bad_rank(rank, where, "{in: R_in, out: R_out}")
        r_in, r_out = rank["in"], rank["out"]
    elif len(rank) != 2:
        raise RankError(f"{where}: a Tucker-2 rank list is [R_in, R_out], got {rank!r}")
    else:
        r_in, r_out = rank
    r_in, r_out = rank_int(r_in, where), rank_int(r_out, where)
    if r_in > cin or r_out > cout:
        raise RankError(f"{where}: Tucker-2 ranks [R_in={r_in}, R_out={r_out}] exceed the channels "
                        f"(in {cin}, out {cout})")
    return r_in, r_out


class Tucker2Method(Method):
    name = "tucker2"
    order = 40
    aliases = ("tucker",)
    types = ("Conv2d",)
    settings = Tucker2Settings
    summary = "Tucker-2 of the conv kernel's channel modes: 1×1 → k×k core → 1×1"
    supports_budget = True

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return LowRankConv2d if is_pointwise(module) else Tucker2Conv2d

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (Tucker2Conv2d, LowRankConv2d)

    def unsupported(self, module: nn.Module) -> str | None:
        return Tucker2Conv2d.unsupported_reason(module)  # the same rules for both layers, named as asked

    def structure(self, module: nn.Module, s: Tucker2Settings, where: str) -> Planned:
        assert isinstance(module, nn.Conv2d)
        return Planned(conv_kwargs(module), None)

    def plan(self, module: nn.Module, s: Tucker2Settings, where: str) -> Planned:
        assert isinstance(module, nn.Conv2d)
        if is_pointwise(module):
            return self._plan_pointwise(module, s, where)
        notes: list[str] = []
        cout, cin = module.out_channels, module.in_channels
        rank = s.rank
        floor, weakening = int(s.floor), float(s.weakening)
        frac, share = fraction(rank, where), _energy(rank, where)
        pair = None if frac is not None or share is not None else _explicit_pair(rank, where, cin, cout)
        if frac is not None:
            split = rank_rules.tucker2_split_for_fraction(module.weight.detach(), frac)
            r_out, r_in = split.r_out, split.r_in
            notes.append(f"ranks keep at most {frac:.0%} of the parameters")
            p_out, p_in = split.proportional
            if math.isnan(split.error):
                notes.append("the weights are not finite: ranks split in proportion to the channels")
            elif (r_out, r_in) == split.proportional:
                notes.append(f"split [R_in={r_in}, R_out={r_out}] (proportional to the channels) has the least "
                             f"truncated-HOSVD error in the budget: {split.error:.3g} (bound {split.bound:.3g})")
            else:
                notes.append(f"split [R_in={r_in}, R_out={r_out}] has the least truncated-HOSVD error in the budget: "
                             f"{split.error:.3g} (bound {split.bound:.3g}); proportional to the channels, "
                             f"[R_in={p_in}, R_out={p_out}]: {split.proportional_error:.3g} "
                             f"(bound {split.proportional_bound:.3g})")
        elif share is not None:
            r_out, r_in = rank_rules.energy_tucker2_ranks(module.weight.detach(), share)
            notes.append(f"ranks keep {share:.0%} of each unfolding's energy")
        elif rank == "vbmf":
            r_out, r_in = rank_rules.vbmf_tucker2_ranks(module.weight.detach(), floor=floor, weakening=weakening)
            notes.append("ranks from empirical VBMF of the two channel unfoldings"
                         + (f", weakened by {s.weakening}" if weakening else ""))
        elif is_int(rank):
            r = rank_int(rank, where)
            r_in, r_out = min(r, cin), min(r, cout)
            if (r_in, r_out) != (r, r):
                notes.append(f"rank {r} clipped to the channel counts: in {r_in}, out {r_out}")
        elif pair is not None:
            r_in, r_out = pair
        else:
            raise bad_rank(rank, where, "an integer, [R_in, R_out], a fraction in (0, 1], {energy: 0.9} or vbmf")
        ranks = [int(r_in), int(r_out)]
        return Planned({**conv_kwargs(module), "ranks": ranks}, ranks, notes)

    def _plan_pointwise(self, module: nn.Conv2d, s: Tucker2Settings, where: str) -> Planned:
        """A 1×1 conv: the truncated-SVD rank each Tucker-2 rank form stands for."""
        cout, cin = module.out_channels, module.in_channels
        m, n = cout, cin  # the (out × in) weight matrix
        full = min(m, n)
        rank = s.rank
        notes: list[str] = []
        frac, share = fraction(rank, where), _energy(rank, where)
        pair = None if frac is not None or share is not None else _explicit_pair(rank, where, cin, cout)
        if frac is not None:
            r = svd_ops.lowrank_rank_for_fraction(m, n, frac)
            why = f"same parameter budget: at most {frac:.0%} of the parameters"
        elif share is not None:
            r = svd_ops.energy_rank(svd_ops.singular_values(module.weight.detach().reshape(m, n)), share)
            why = f"keeps {share:.0%} of the spectral energy"
        elif rank == "vbmf":
            floor, weakening = int(s.floor), float(s.weakening)
            r = rank_rules.evbmf_rank(module.weight.detach().double().reshape(m, n))
            r = min(full, max(floor, math.ceil(r + weakening * (full - r) - 1e-9)))
            why = ("from empirical VBMF of the weight matrix" + (f", weakened by {s.weakening}" if weakening else "")
                   + (f", at least {floor}" if floor > 1 else ""))
        elif is_int(rank):
            asked = rank_int(rank, where)
            r = min(asked, full)
            why = f"rank {asked} clipped to min(in, out) = {full}" if r != asked else "the rank asked for"
        elif pair is not None:
            r_in, r_out = pair
            weights = tucker2_params(tuple(module.weight.shape), r_out, r_in)
            r = max(1, min(full, weights // (m + n)))
            why = (f"same parameter budget as Tucker-2 [R_in={r_in}, R_out={r_out}]: {r * (m + n):,} ≤ {weights:,} "
                   "weights" if r * (m + n) <= weights else f"Tucker-2 [R_in={r_in}, R_out={r_out}] has only "
                   f"{weights:,} weights, below one SVD component")
        else:
            raise bad_rank(rank, where, "an integer, [R_in, R_out], a fraction in (0, 1], {energy: 0.9} or vbmf")
        r = int(r)
        notes.append(f"1×1 conv: a matrix, factorized by truncated SVD (rank {r}) instead of Tucker-2 ({why})")
        if r * (m + n) >= m * n:
            notes.append(f"SVD rank {r} does not compress this layer ({r * (m + n):,} ≥ {m * n:,} weights)")
        return Planned({**conv_kwargs(module), "rank": r}, r, notes,
                       reason=f"{self.name}: 1×1 conv as truncated SVD rank {r}")

    def describe(self, planned: Planned) -> str:
        if "rank" in planned.config:
            return planned.reason or f"{self.name}: 1×1 conv as truncated SVD rank {planned.ranks}"
        return planned.reason or f"{self.name} rank {planned.ranks}"

    def factorize(self, module: nn.Module, config: dict[str, Any], s: Tucker2Settings) -> nn.Module:
        assert isinstance(module, nn.Conv2d)
        if "ranks" not in config:  # a 1×1 conv planned as a truncated SVD
            return LowRankConv2d.from_dense(module, rank=int(config["rank"]))
        return Tucker2Conv2d.from_dense(module, ranks=tuple(config["ranks"]), method=s.algorithm, n_iter=s.n_iter)

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        """(r_in, r_out) grown one step at a time, the ranks proportional to the channel counts; for a
        1×1 conv the SVD ladder: every rank r with r·(in + out) < in·out."""
        assert isinstance(module, nn.Conv2d)
        if is_pointwise(module):
            return self._svd_ladder(module, config, in_shape, want_macs)
        shape = tuple(module.weight.shape)
        cout, cin = shape[0], shape[1]
        dense_w = shape[0] * shape[1] * shape[2] * shape[3]
        bias = cout if module.bias is not None else 0
        pairs: list[tuple[int, int]] = []
        r_in = r_out = 1
        while tucker2_params(shape, r_out, r_in) < dense_w:
            pairs.append((r_in, r_out))
            if r_in == cin and r_out == cout:
                break
            if r_out < cout and (r_in == cin or r_out / cout <= r_in / cin):
                r_out += 1
            else:
                r_in += 1
        macs: list[int] = [0] * len(pairs)
        if want_macs and pairs:
            def at(ri: int, ro: int) -> int:
                return meta_macs(Tucker2Conv2d, {**config, "ranks": [ri, ro]}, in_shape)

            if cin >= 2 and cout >= 2:  # MACs are a·r_in + b·r_in·r_out + c·r_out exactly (three convs)
                m11, m21, m12 = at(1, 1), at(2, 1), at(1, 2)
                b = m21 + m12 - 3 * m11
                a, c = m21 - m11 - b, m12 - m11 - b
                macs = [a * ri + b * ri * ro + c * ro for ri, ro in pairs]
            else:
                macs = [at(ri, ro) for ri, ro in pairs]
        return ([list(p) for p in pairs], [tucker2_params(shape, ro, ri) + bias for ri, ro in pairs], macs)

    def _svd_ladder(self, module: nn.Conv2d, config: dict[str, Any], in_shape: Sequence[int], want_macs: bool) -> Ladder:
        m, n = module.out_channels, module.in_channels
        bias = m if module.bias is not None else 0
        ranks = [r for r in range(1, min(m, n) + 1) if r * (m + n) < m * n]
        macs = [0] * len(ranks)
        if want_macs and ranks:  # two 1×1 convs: MACs are exactly proportional to the rank
            geometry = {k: v for k, v in config.items() if k not in ("rank", "ranks")}
            macs1 = meta_macs(LowRankConv2d, {**geometry, "rank": 1}, in_shape)
            macs = [r * macs1 for r in ranks]
        return list(ranks), [r * (m + n) + bias for r in ranks], macs

    def approximator(self, module: nn.Module, config: dict[str, Any], s: Tucker2Settings, top: Any,
                     cp_iterations: int) -> Callable[[Any], torch.Tensor]:
        """The channel bases of one truncated HOSVD serve every rank pair; for a 1×1 conv one truncated
        SVD at rank ``top`` (full when None), every smaller rank a slice of it (exact)."""
        assert isinstance(module, nn.Conv2d)
        if is_pointwise(module):
            weight = module.weight.detach()
            m, n = module.out_channels, module.in_channels
            r_top = min(m, n) if top is None else max(1, min(int(top), m, n))
            left, right = svd_ops.truncated_svd(weight.to(torch.float64).reshape(m, n), r_top)
            shape = tuple(weight.shape)
            return lambda rank: (left[:, : int(rank)] @ right[: int(rank)]).reshape(shape)
        bases = hosvd_bases(module.weight)
        return lambda ranks: project(module.weight, bases, ranks)

    def approximations(self, module: nn.Module, config: dict[str, Any], s: Tucker2Settings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        top = max((int(r) for r in ranks), default=None) if is_pointwise(module) else None
        at = self.approximator(module, config, s, top, cp_iterations)
        for r in ranks:
            yield at(r)


register(Tucker2Method())
