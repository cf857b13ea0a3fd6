"""Data-aware factors: what calibration images change in a decomposition.

Three steps, each a plain function of tensors and modules (the apply step calls them):

* **input whitening** — the second moment ``C = E[x xᵀ]`` of a layer's input features (channels of
  a conv, features of a Linear), accumulated in float64 over the calibration batch in chunks
  (never all activations at once), with a ridge when it is singular. With ``C = L Lᵀ`` the layer's
  output error on those inputs is the Frobenius error of ``W L`` (for a conv, per pixel under the
  channel model), so the method decomposes the *whitened* weight and the first factor is mapped
  back through ``L⁻¹`` (as SVD-LLM's truncation-aware whitening, here for any method whose layer
  starts with a linear map of the inputs);
* **Kronecker whitening** (TT) — the same for layers whose input side is a chain of per-mode maps:
  the second moment approximated by a Kronecker product of mode-wise moments, one Cholesky factor
  per TT core;
* **core refit** (Tucker-2) — the core and the subspace of its outputs re-solved together as a
  reduced-rank regression from the core's input patches to the dense layer's output;
* **output refit** — the last linear map and bias re-solved by ridge least squares so the layer's
  output on the *compressed* model's own inputs matches the *dense* layer's output on the dense
  model's inputs (the asymmetric reconstruction of Zhang et al. 2015), which also absorbs the
  drift left by the layers decomposed before it;
* **BatchNorm re-estimation** — running statistics recomputed on the calibration images after
  decomposition (cumulative averages, other modules in eval mode).

Pipeline position: used by the apply step; imports only the layers.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tncompress.layers import FactorizedLayer

log = logging.getLogger(__name__)

CHUNK = 64
"""Calibration samples per forward pass while statistics are accumulated."""
RIDGE = 1e-6
"""Ridge added to a second moment, relative to its mean eigenvalue."""


class _Stop(Exception):
    """Raised by a hook once the layer of interest has been seen: the rest of the forward is skipped."""


def chunks(batch: Tensor, size: int = CHUNK) -> Iterator[Tensor]:
    for start in range(0, batch.shape[0], size):
        yield batch[start:start + size]


def layer_io(model: nn.Module, name: str, batch: Tensor, *, want: str) -> Tensor:
    """The input (``want="input"``) or output of submodule ``name`` when ``model`` runs on ``batch``;
    the forward stops right after that layer."""
    module = model.get_submodule(name)
    seen: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        if want == "input":
            seen.append(args[0].detach())
            raise _Stop

    def post(mod: nn.Module, args: tuple, out: Tensor) -> None:
        seen.append(out.detach())
        raise _Stop

    handle = module.register_forward_pre_hook(pre) if want == "input" else module.register_forward_hook(post)
    try:
        with torch.no_grad():
            model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"layer {name} was not reached by the model's forward")
    return seen[0]


def supports(cls: type[FactorizedLayer]) -> bool:
    """Whether layers of ``cls`` expose a linear input map to whiten (and an output map to refit)."""
    return cls.input_projection is not FactorizedLayer.input_projection


def _features(x: Tensor, conv: bool) -> Tensor:
    """Rows = samples (pixels for a conv), columns = features, in float64."""
    if conv:
        return x.double().transpose(0, 1).reshape(x.shape[1], -1).T
    return x.double().reshape(-1, x.shape[-1])


@dataclass
class Whitening:
    """``C + ridge = L Lᵀ`` of a layer's input features, and what it was measured on."""

    factor: Tensor        # L, lower triangular, float64
    samples: int
    ridge: float


def input_whitening(model: nn.Module, name: str, batch: Tensor, conv: bool) -> Whitening:
    """The whitening of the input features that ``model``'s layer ``name`` sees on ``batch``."""
    second: Tensor | None = None
    count = 0
    for part in chunks(batch):
        f = _features(layer_io(model, name, part, want="input"), conv)
        second = f.T @ f if second is None else second + f.T @ f
        count += f.shape[0]
    assert second is not None
    return _cholesky(second / max(count, 1), count)


def _cholesky(second: Tensor, count: int) -> Whitening:
    """``second + ridge = L Lᵀ``, the ridge grown from RIDGE × mean eigenvalue until it factors."""
    n = second.shape[0]
    scale = float(torch.trace(second)) / n if n else 1.0
    ridge = RIDGE * (scale if scale > 0 else 1.0)
    eye = torch.eye(n, dtype=second.dtype, device=second.device)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(second + ridge * eye)
        if int(info) == 0:
            return Whitening(factor, count, ridge)
        ridge *= 100.0
    return Whitening(torch.linalg.cholesky(second + ridge * eye), count, ridge)


def whitened_copy(module: nn.Module, whitening: Whitening) -> nn.Module:
    """A copy of the dense ``module`` whose weight acts on whitened inputs: ``W L`` (Linear) or the
    kernel multiplied by ``L`` along its input channels (conv)."""
    copy_ = copy.deepcopy(module)
    weight = copy_.weight
    assert isinstance(weight, Tensor)
    L = whitening.factor.to(weight.device)
    with torch.no_grad():
        w = weight.double()
        if w.dim() == 4:
            w = torch.einsum("oikl,ij->ojkl", w, L)
        else:
            w = w @ L
        weight.copy_(w.to(weight.dtype))
    return copy_


def unwhiten(layer: FactorizedLayer, whitening: Whitening) -> None:
    """Map the first factor of a layer decomposed from a :func:`whitened_copy` back: ``P → P L⁻¹``."""
    first = layer.input_projection()
    assert first is not None
    L = whitening.factor.to(first.device)
    with torch.no_grad():
        back = torch.linalg.solve_triangular(L.T, first.double().T, upper=True).T  # P L⁻¹
        first.copy_(back.to(first.dtype))


def kronecker_whitening(model: nn.Module, name: str, batch: Tensor, modes: list[int]) -> list[Whitening]:
    """Per-mode whitenings of a Linear layer's inputs split into ``modes`` (C order): the second
    moment is approximated by the Kronecker product ``C_1 ⊗ … ⊗ C_d`` of the mode-wise moments
    ``C_k = E[X_(k) X_(k)ᵀ]`` (X_(k): the input reshaped to ``modes`` and unfolded along mode k), so
    its Cholesky factor ``L_1 ⊗ … ⊗ L_d`` maps into each TT core separately. The overall scale of
    the product is irrelevant: it cancels when the factors are mapped back."""
    seconds: list[Tensor] | None = None
    count = 0
    for part in chunks(batch):
        f = _features(layer_io(model, name, part, want="input"), False)
        if f.shape[1] != math.prod(modes):
            raise RuntimeError(f"layer {name}: {f.shape[1]} input features do not split into modes {modes}")
        x = f.reshape(f.shape[0], *modes)
        moments = []
        for k in range(len(modes)):
            unfolded = x.movedim(k + 1, 1).reshape(f.shape[0], modes[k], -1)
            moments.append(torch.einsum("bip,bjp->ij", unfolded, unfolded))
        seconds = moments if seconds is None else [a + b for a, b in zip(seconds, moments)]
        count += f.shape[0]
    assert seconds is not None
    return [_cholesky(second / max(count, 1), count) for second in seconds]


def kronecker_whitened_copy(linear: nn.Module, factors: list[Whitening], modes: list[int]) -> nn.Module:
    """A copy of ``linear`` whose weight acts on Kronecker-whitened inputs: ``W (L_1 ⊗ … ⊗ L_d)``."""
    copy_ = copy.deepcopy(linear)
    weight = copy_.weight
    assert isinstance(weight, Tensor)
    with torch.no_grad():
        w = weight.double().reshape(weight.shape[0], *modes)
        for k, whitening in enumerate(factors):
            L = whitening.factor.to(w.device)
            w = torch.tensordot(w, L, dims=([k + 1], [0])).movedim(-1, k + 1)
        weight.copy_(w.reshape(weight.shape).to(weight.dtype))
    return copy_


def kronecker_unwhiten(layer: FactorizedLayer, factors: list[Whitening]) -> None:
    """Map each input mode of a layer decomposed from a :func:`kronecker_whitened_copy` back: ``× L_k⁻¹``."""
    inverses = []
    for whitening in factors:
        L = whitening.factor
        inverses.append(torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device),
                                                      upper=False))
    layer.map_input_modes(inverses)


def refit_output(layer: FactorizedLayer, model: nn.Module, dense_model: nn.Module, name: str, batch: Tensor,
                 conv: bool) -> int:
    """Re-solve ``layer``'s last linear map and bias (ridge least squares, float64) so that, on the
    inputs ``model`` gives layer ``name``, its output matches the dense model's layer output on the
    dense model's inputs. Returns the number of samples (pixels for a conv) fitted."""
    projection = layer.output_projection()
    assert projection is not None
    weight, bias = projection
    rank = weight.shape[1]
    gram: Tensor | None = None
    cross: Tensor | None = None
    count = 0
    for part in chunks(batch):
        x = layer_io(model, name, part, want="input")
        target = _features(layer_io(dense_model, name, part, want="output"), conv)
        with torch.no_grad():
            z = _features(layer.output_features(x), conv)
        if bias is not None:
            z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)
        if target.shape[0] != z.shape[0]:
            raise RuntimeError(f"layer {name}: the factorized layer's output has another shape than the dense one")
        gram = z.T @ z if gram is None else gram + z.T @ z
        cross = z.T @ target if cross is None else cross + z.T @ target
        count += z.shape[0]
    assert gram is not None and cross is not None
    n = gram.shape[0]
    ridge = RIDGE * max(float(torch.trace(gram)) / n, 1e-30)
    solution = torch.linalg.solve(gram + ridge * torch.eye(n, dtype=gram.dtype, device=gram.device), cross)
    with torch.no_grad():
        weight.copy_(solution[:rank].T.to(weight.dtype))
        if bias is not None:
            bias.copy_(solution[rank].to(bias.dtype))
    return count


def refit_core(layer: FactorizedLayer, model: nn.Module, dense_model: nn.Module, name: str,
               batch: Tensor) -> int | None:
    """Re-solve the middle factor of a layer that exposes :meth:`FactorizedLayer.core_patches`
    (Tucker-2's core) together with the subspace of its outputs, as a reduced-rank regression
    (float64): the full least-squares map ``B`` from the core's input patches (on the compressed
    model's own inputs) to the dense layer's outputs, then the ``r_out`` leading principal directions
    ``P`` of the fitted outputs ``Bᵀ G B``; the core becomes ``Pᵀ B``. The caller then refits the last
    map and bias (:func:`refit_output`). Returns the number of pixels fitted, or None when the layer
    has no such core."""
    gram: Tensor | None = None
    cross: Tensor | None = None
    count = 0
    core_weight: Tensor | None = None
    for part in chunks(batch):
        x = layer_io(model, name, part, want="input")
        with torch.no_grad():
            found = layer.core_patches(x)
        if found is None:
            return None
        rows, core_weight = found
        z = rows.double()
        z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)
        target = _features(layer_io(dense_model, name, part, want="output"), True)
        if target.shape[0] != z.shape[0]:
            raise RuntimeError(f"layer {name}: the factorized layer's output has another shape than the dense one")
        gram = z.T @ z if gram is None else gram + z.T @ z
        cross = z.T @ target if cross is None else cross + z.T @ target
        count += z.shape[0]
    if gram is None or cross is None or core_weight is None:
        return None
    n = gram.shape[0]
    ridge = RIDGE * max(float(torch.trace(gram)) / n, 1e-30)
    full = torch.linalg.solve(gram + ridge * torch.eye(n, dtype=gram.dtype, device=gram.device), cross)
    fitted = full.T @ gram @ full  # second moment of the fitted outputs, (cout, cout)
    _, vectors = torch.linalg.eigh((fitted + fitted.T) / 2)
    rank = core_weight.shape[0]
    directions = vectors[:, -rank:]  # (cout, r_out), leading eigenvectors
    with torch.no_grad():
        core_weight.copy_((full[:-1] @ directions).T.to(core_weight.dtype))
    return count


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def reestimate_batchnorm(model: nn.Module, batch: Tensor) -> int:
    """Recompute every BatchNorm's running mean and variance on ``batch``: the forward runs chunk by
    chunk with the norms in training mode (normalising by the chunk's statistics, as in training;
    every other module stays in eval mode) while each norm's input is pooled over all samples, so
    the stored statistics are exact whatever the chunk sizes. Returns how many layers were updated."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    sums: dict[nn.Module, list[Tensor | int]] = {}

    def pool(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        acc = sums.setdefault(mod, [torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                                    torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 0])
        acc[0] = acc[0] + x.sum(dim=dims)
        acc[1] = acc[1] + (x * x).sum(dim=dims)
        acc[2] = int(acc[2]) + x.numel() // x.shape[1]

    handles = [m.register_forward_pre_hook(pool) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.train()
        with torch.no_grad():
            for part in chunks(batch):
                if part.shape[0] > 1:
                    model(part)
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode
    updated = 0
    for m in norms:
        if m not in sums:
            continue
        total, squares, count = sums[m]
        assert isinstance(total, Tensor) and isinstance(squares, Tensor) and isinstance(count, int)
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0) * (count / max(count - 1, 1))
        assert m.running_mean is not None and m.running_var is not None
        with torch.no_grad():
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
        updated += 1
    return updated
