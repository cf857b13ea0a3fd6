"""Tucker-2 of convolutions (Kim et al. 2016): ``recipe method: tucker2`` (alias ``tucker``).

The kernel K (out, in, kh, kw) ≈ core ×₁ U_out ×₂ U_in runs as 1×1 (in → r_in), kh×kw (r_in →
r_out), 1×1 (r_out → out).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tncompress.decompositions import ranks as rank_rules
from tncompress.decompositions.ranks import tucker2_params
from tncompress.decompositions.tucker2 import small_lapack
from tncompress.errors import RankError
from tncompress.layers import FactorizedLayer, Tucker2Conv2d
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


class Tucker2Method(Method):
    name = "tucker2"
    order = 40
    aliases = ("tucker",)
    types = ("Conv2d",)
    settings = Tucker2Settings
    summary = "Tucker-2 of the conv kernel's channel modes: 1×1 → k×k core → 1×1"
    supports_budget = True

    def layer_class(self, module: nn.Module) -> type[FactorizedLayer]:
        return Tucker2Conv2d

    def layer_classes(self) -> tuple[type[FactorizedLayer], ...]:
        return (Tucker2Conv2d,)

    def structure(self, module: nn.Module, s: Tucker2Settings, where: str) -> Planned:
        assert isinstance(module, nn.Conv2d)
        return Planned(conv_kwargs(module), None)

    def plan(self, module: nn.Module, s: Tucker2Settings, where: str) -> Planned:
        assert isinstance(module, nn.Conv2d)
        notes: list[str] = []
        cout, cin = module.out_channels, module.in_channels
        shape = tuple(module.weight.shape)
        rank = s.rank
        floor, weakening = int(s.floor), float(s.weakening)
        frac, share = fraction(rank, where), energy(rank, where)
        if frac is not None:
            r_out, r_in = rank_rules.tucker2_ranks_for_fraction(shape, frac)
            notes.append(f"ranks keep at most {frac:.0%} of the parameters")
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
        elif isinstance(rank, (list, dict)):
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
        else:
            raise bad_rank(rank, where, "an integer, [R_in, R_out], a fraction in (0, 1], {energy: 0.9} or vbmf")
        ranks = [int(r_in), int(r_out)]
        return Planned({**conv_kwargs(module), "ranks": ranks}, ranks, notes)

    def factorize(self, module: nn.Module, config: dict[str, Any], s: Tucker2Settings) -> nn.Module:
        assert isinstance(module, nn.Conv2d)
        return Tucker2Conv2d.from_dense(module, ranks=tuple(config["ranks"]), method=s.algorithm, n_iter=s.n_iter)

    # -- budget

    def ladder(self, module: nn.Module, config: dict[str, Any], in_shape: Sequence[int], macs_before: int,
               want_macs: bool) -> Ladder:
        """(r_in, r_out) grown one step at a time, the ranks proportional to the channel counts."""
        assert isinstance(module, nn.Conv2d)
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

    def approximator(self, module: nn.Module, config: dict[str, Any], s: Tucker2Settings, top: Any,
                     cp_iterations: int) -> Callable[[Any], torch.Tensor]:
        """The channel bases of one truncated HOSVD serve every rank pair."""
        assert isinstance(module, nn.Conv2d)
        bases = hosvd_bases(module.weight)
        return lambda ranks: project(module.weight, bases, ranks)

    def approximations(self, module: nn.Module, config: dict[str, Any], s: Tucker2Settings, ranks: Sequence[Any],
                       cp_iterations: int) -> Iterator[torch.Tensor]:
        at = self.approximator(module, config, s, None, cp_iterations)
        for r in ranks:
            yield at(r)


register(Tucker2Method())
