"""Rank rules for conv kernels: EVBMF, energy and parameter budgets."""
from __future__ import annotations

import pytest
import torch

from tncompress.decompositions.ranks import (
    cp_params,
    cp_rank_for_fraction,
    energy_tucker2_ranks,
    evbmf_rank,
    tucker2_params,
    tucker2_ranks_for_fraction,
    vbmf_tucker2_ranks,
)
from tncompress.decompositions.tucker2 import tucker2_to_kernel
from tncompress.errors import RankError, RecipeError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=F64))[0]
    # Signal singular values 3-6x the noise's bulk edge σ(√rows + √cols).
    edge = noise * (rows**0.5 + cols**0.5)
    s = torch.linspace(3.0, 6.0, rank, dtype=F64) * edge
    return (u * s) @ v.T + noise * torch.randn(rows, cols, generator=g, dtype=F64)


def low_multilinear_rank_kernel(cout, cin, r_out, r_in, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, 3, 3, generator=g, dtype=F64)
    u = torch.linalg.qr(torch.randn(cout, r_out, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(cin, r_in, generator=g, dtype=F64))[0]
    k = tucker2_to_kernel(core, u, v)
    return k + noise * k.norm() / k.numel() ** 0.5 * torch.randn(k.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("rows, cols, rank", [(60, 100, 5), (100, 60, 5), (64, 576, 8), (40, 40, 3)])
def test_evbmf_recovers_true_rank(rows, cols, rank):
    for seed in range(3):
        assert evbmf_rank(low_rank_plus_noise(rows, cols, rank, 0.1, seed)) == rank


def test_evbmf_on_noise_and_degenerate_inputs():
    g = torch.Generator().manual_seed(0)
    assert evbmf_rank(torch.randn(50, 80, generator=g, dtype=F64)) == 0  # pure noise
    assert evbmf_rank(torch.zeros(5, 7)) == 0
    assert evbmf_rank(torch.randn(1, 9, generator=g)) == 0
    m = low_rank_plus_noise(30, 50, 4, 0.05, 1)
    assert evbmf_rank(m) == evbmf_rank(m.T) == evbmf_rank(m.float()) == 4
    with pytest.raises(RankError):
        evbmf_rank(torch.randn(2, 3, 4))
    with pytest.raises(RankError, match="NaN"):
        evbmf_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_vbmf_tucker2_ranks_recover_and_respect_floor():
    kernel = low_multilinear_rank_kernel(48, 32, 6, 4, noise=0.05)
    assert vbmf_tucker2_ranks(kernel) == (6, 4)
    noise = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert evbmf_rank(noise.reshape(16, -1)) == 0
    assert vbmf_tucker2_ranks(noise) == (1, 1)  # never 0
    assert vbmf_tucker2_ranks(noise, floor=3) == (3, 3)
    assert vbmf_tucker2_ranks(noise, floor=100) == (16, 12)  # capped at full rank


def test_vbmf_weakening_moves_towards_full_rank():
    kernel = low_multilinear_rank_kernel(48, 32, 6, 4, noise=0.05)
    assert vbmf_tucker2_ranks(kernel, weakening=0.5) == (6 + 21, 4 + 14)
    r_prev = (0, 0)
    for w in (0.0, 0.25, 0.5, 0.9):
        r = vbmf_tucker2_ranks(kernel, weakening=w)
        assert r[0] >= r_prev[0] and r[1] >= r_prev[1] and r[0] <= 48 and r[1] <= 32
        r_prev = r
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(RankError):
            vbmf_tucker2_ranks(kernel, weakening=bad)
    for bad in (0, -1, 1.5):
        with pytest.raises(RankError):
            vbmf_tucker2_ranks(kernel, floor=bad)  # type: ignore[arg-type]


def test_energy_ranks():
    kernel = low_multilinear_rank_kernel(20, 16, 5, 3, noise=0.0)
    assert energy_tucker2_ranks(kernel, 1.0 - 1e-9) == (5, 3)
    assert energy_tucker2_ranks(kernel, 1e-6) == (1, 1)
    full = torch.randn(20, 16, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert energy_tucker2_ranks(full, 1.0) == (20, 16)
    r_half = energy_tucker2_ranks(full, 0.5)
    assert 1 <= r_half[0] < 20 and 1 <= r_half[1] < 16
    s2 = torch.linalg.svdvals(full.reshape(20, -1)) ** 2
    kept = s2[: r_half[0]].sum() / s2.sum()
    assert kept >= 0.5 and s2[: r_half[0] - 1].sum() / s2.sum() < 0.5
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(RankError):
            energy_tucker2_ranks(full, bad)


@pytest.mark.parametrize("shape", [(512, 512, 3, 3), (64, 3, 7, 7), (128, 64, 1, 1), (10, 20, 3, 5)])
@pytest.mark.parametrize("form", ["3conv", "4conv"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
def test_cp_rank_for_fraction_respects_budget(shape, form, fraction):
    dense = shape[0] * shape[1] * shape[2] * shape[3]
    r = cp_rank_for_fraction(shape, fraction, form)
    assert r >= 1
    if cp_params(shape, 1, form) <= fraction * dense:
        assert cp_params(shape, r, form) <= fraction * dense < cp_params(shape, r + 1, form)
    else:
        assert r == 1


def test_cp_rank_examples_and_errors():
    assert cp_rank_for_fraction((512, 512, 3, 3), 0.3, "3conv") == 685  # 0.3·2359296 / 1033
    assert cp_rank_for_fraction((512, 512, 3, 3), 0.3, "4conv") == 687  # … / 1030
    assert cp_rank_for_fraction((4, 4, 1, 1), 0.01, "3conv") == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(RankError):
            cp_rank_for_fraction((8, 8, 3, 3), bad, "3conv")
    with pytest.raises(RecipeError):
        cp_rank_for_fraction((8, 8, 3, 3), 0.5, "5conv")
    with pytest.raises(RankError):
        cp_rank_for_fraction((8, 8, 3), 0.5, "3conv")


@pytest.mark.parametrize("shape", [(512, 512, 3, 3), (256, 128, 3, 3), (64, 3, 7, 7),
                                   (128, 64, 1, 1), (10, 20, 3, 5)])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 1.0])
def test_tucker2_ranks_for_fraction(shape, fraction):
    cout, cin = shape[0], shape[1]
    dense = cout * cin * shape[2] * shape[3]
    r_out, r_in = tucker2_ranks_for_fraction(shape, fraction)
    assert 1 <= r_out <= cout and 1 <= r_in <= cin
    if tucker2_params(shape, 1, 1) <= fraction * dense:
        assert tucker2_params(shape, r_out, r_in) <= fraction * dense
        # largest: growing both ranks in proportion no longer fits (unless already full)
        if r_out < cout and r_in < cin:
            assert tucker2_params(shape, r_out + 1, r_in + 1) > fraction * dense
    # balanced ratios (within rounding of one rank step)
    assert abs(r_out / cout - r_in / cin) <= 1.0 / min(cout, cin) + 1e-9 or r_in == cin or r_out == cout


def test_tucker2_fraction_errors():
    with pytest.raises(RankError):
        tucker2_ranks_for_fraction((8, 8, 3, 3), 0.0)
    with pytest.raises(RankError):
        tucker2_ranks_for_fraction((8, 8, 3, 3), 2.0)
