"""Multi-head attention whose q/k/v/out projections are ordinary ``nn.Linear`` children.

``nn.MultiheadAttention`` reads its projection weights directly (the packed ``in_proj_weight`` and
``out_proj.weight``, through ``F.multi_head_attention_forward`` or the native fast path), so none of
its projections can be swapped for a factorized layer. :class:`DecomposableMultiheadAttention` computes
exactly the same function (torch 2.14's semantics: masks, ``is_causal``, ``add_bias_kv``,
``add_zero_attn``, dropout, batched and unbatched input, the returned attention weights) but only
*calls* ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``, so any of them can be replaced by a module
with a Linear's call signature, ``(..., in_features) -> (..., out_features)``.

PyTorch's wrappers (``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``) inspect ``self_attn`` to
choose a fused fast path that reads packed weights; this module exposes ``_qkv_same_embed_dim = False``,
``in_proj_weight = None`` and ``in_proj_bias = None`` so that they decline it and call the forward.
:func:`unpack_attention` swaps every ``nn.MultiheadAttention`` of a model in place.

Counting: the projections are Linear calls (``addmm``/``mm``) and, when attention weights are
returned, ``Q·Kᵀ`` and ``weights·V`` are ``bmm``/``baddbmm``, all counted by ``FlopCounterMode``. With
``need_weights=False`` the core is ``F.scaled_dot_product_attention``, as in torch (same numerics,
same dropout random stream, same treatment of fully masked rows); on CPU it dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which the stock counter does not count but
:func:`tncompress.measure.mac_counter` does.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DecomposableMultiheadAttention", "unpack_attention"]


def _canonical_mask(mask: Tensor | None, mask_name: str, other_type: torch.dtype | None, other_name: str,
                    target_type: torch.dtype, check_other: bool = True) -> Tensor | None:
    """torch's ``F._canonical_mask``: a bool mask becomes an additive float mask (True -> -inf)."""
    if mask is None:
        return None
    is_float = torch.is_floating_point(mask)
    if mask.dtype != torch.bool and not is_float:
        raise AssertionError(f"only bool and floating types of {mask_name} are supported")
    if check_other and other_type is not None and mask.dtype != other_type:
        warnings.warn(f"Support for mismatched {mask_name} and {other_name} is deprecated. Use same type for both instead.",
                      stacklevel=2)
    if not is_float:
        mask = torch.zeros_like(mask, dtype=target_type).masked_fill_(mask, float("-inf"))
    return mask


def _is_batched(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                num_heads: int) -> bool:
    """torch's ``F._mha_shape_check``: True for 3-D (batched) input, False for 2-D; raises otherwise."""
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")
    batched = query.dim() == 3
    kind = "batched (3-D)" if batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D"
                             f" but found {key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise AssertionError(f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D"
                             f" but found {key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                                 f" but found {attn_mask.dim()}-D tensor instead")
        if not batched and attn_mask.dim() == 3:
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.shape != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
    return batched


class DecomposableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with four ``nn.Linear`` projections that the forward only calls.

    Same constructor, forward signature, outputs and parameter initialisation scheme as
    ``nn.MultiheadAttention``; parameters are ``q_proj``, ``k_proj`` (``kdim`` inputs), ``v_proj``
    (``vdim`` inputs), ``out_proj`` (each with a bias iff ``bias``) and ``bias_k``/``bias_v`` (iff
    ``add_bias_kv``). Build one from a trained module with :meth:`from_mha`; go back with :meth:`to_mha`.
    """

    __constants__ = ["batch_first"]

    # Read by nn.TransformerEncoder(Layer) to choose a fused path that uses packed weights: these values
    # make them decline it and call this forward (the projections are separate, possibly factorized, modules).
    _qkv_same_embed_dim: bool = False
    in_proj_weight: Tensor | None = None
    in_proj_bias: Tensor | None = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} instead")
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim: int = int(embed_dim)
        self.num_heads: int = int(num_heads)
        self.head_dim: int = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")
        self.kdim: int = int(kdim) if kdim is not None else self.embed_dim
        self.vdim: int = int(vdim) if vdim is not None else self.embed_dim
        self.dropout: float = float(dropout)
        self.batch_first: bool = bool(batch_first)
        self.add_zero_attn: bool = bool(add_zero_attn)
        self._bias: bool = bool(bias)
        self.q_proj: nn.Module = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **factory)
        self.k_proj: nn.Module = nn.Linear(self.kdim, self.embed_dim, bias=bias, **factory)
        self.v_proj: nn.Module = nn.Linear(self.vdim, self.embed_dim, bias=bias, **factory)
        self.out_proj: nn.Module = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **factory)
        self.bias_k: nn.Parameter | None
        self.bias_v: nn.Parameter | None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, self.embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, self.embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation: Xavier-uniform projections (q/k/v drawn as torch draws
        them: one packed (3E, E) matrix when kdim == vdim == embed_dim, else each on its own), zero biases,
        Linear-default ``out_proj`` weight, Xavier-normal ``bias_k``/``bias_v``."""
        q, k, v, out = self.q_proj, self.k_proj, self.v_proj, self.out_proj
        if not all(isinstance(p, nn.Linear) for p in (q, k, v, out)):
            raise TypeError("reset_parameters needs plain nn.Linear projections (some were replaced)")
        assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
        assert isinstance(out, nn.Linear)
        with torch.no_grad():
            if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
                packed = nn.init.xavier_uniform_(torch.empty((3 * self.embed_dim, self.embed_dim),
                                                             device=q.weight.device, dtype=q.weight.dtype))
                for proj, w in zip((q, k, v), packed.chunk(3)):
                    proj.weight.copy_(w)
            else:
                for proj in (q, k, v):
                    nn.init.xavier_uniform_(proj.weight)
            out.reset_parameters()
            for proj in (q, k, v, out):
                if proj.bias is not None:
                    proj.bias.zero_()
            if self.bias_k is not None:
                nn.init.xavier_normal_(self.bias_k)
            if self.bias_v is not None:
                nn.init.xavier_normal_(self.bias_v)

    # ----------------------------------------------------------------------------------------------
    # conversions

    def config(self) -> dict[str, Any]:
        """JSON-safe constructor keyword arguments (no device/dtype): ``type(m)(**m.config())`` rebuilds
        the same parameter names and shapes (with plain nn.Linear projections)."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "bias": self._bias,
            "add_bias_kv": self.bias_k is not None,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
        }

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> DecomposableMultiheadAttention:
        """The equivalent module of a (trained) ``nn.MultiheadAttention``: same structure, weights copied
        (the packed ``in_proj_weight`` split into q/k/v rows), same dtype, device, requires_grad flags and
        training mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha expects an nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype)
        if mha._qkv_same_embed_dim:
            weights: tuple[Tensor, ...] = tuple(mha.in_proj_weight.chunk(3))
            grads: tuple[bool, ...] = (mha.in_proj_weight.requires_grad,) * 3
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            grads = tuple(w.requires_grad for w in weights)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for proj, w, b, g in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, grads):
                assert isinstance(proj, nn.Linear)
                proj.weight.copy_(w)
                proj.weight.requires_grad_(g)
                if b is not None and proj.bias is not None:
                    proj.bias.copy_(b)
                    proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            out = new.out_proj
            assert isinstance(out, nn.Linear)
            out.weight.copy_(mha.out_proj.weight)
            out.weight.requires_grad_(mha.out_proj.weight.requires_grad)
            if out.bias is not None and mha.out_proj.bias is not None:
                out.bias.copy_(mha.out_proj.bias)
                out.bias.requires_grad_(mha.out_proj.bias.requires_grad)
            for mine, theirs in ((new.bias_k, mha.bias_k), (new.bias_v, mha.bias_v)):
                if mine is not None and theirs is not None:
                    mine.copy_(theirs)
                    mine.requires_grad_(theirs.requires_grad)
        return new.train(mha.training)

    def to_mha(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (same dtype, device, training mode); only while all four
        projections are plain ``nn.Linear`` (merge a factorized projection back to dense first)."""
        projs = {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "out_proj": self.out_proj}
        odd = [f"{name} ({type(p).__name__})" for name, p in projs.items() if not isinstance(p, nn.Linear)]
        if odd:
            raise TypeError("to_mha needs the four projections to be plain nn.Linear, but "
                            f"{', '.join(odd)} {'is' if len(odd) == 1 else 'are'} not; convert them to dense first")
        linears = [p for p in projs.values() if isinstance(p, nn.Linear)]
        expected_in = (self.embed_dim, self.kdim, self.vdim, self.embed_dim)
        for (name, lin), fan_in in zip(projs.items(), expected_in):
            assert isinstance(lin, nn.Linear)
            if (lin.in_features, lin.out_features) != (fan_in, self.embed_dim):
                raise ValueError(f"to_mha: {name} maps {lin.in_features} -> {lin.out_features} features, "
                                 f"expected {fan_in} -> {self.embed_dim}")
        has_bias = {lin.bias is not None for lin in linears}
        if len(has_bias) != 1:
            raise ValueError("to_mha: nn.MultiheadAttention needs a bias on all four projections or on none")
        q, k, v, out = linears
        ref = out.weight
        cfg = self.config()
        cfg["bias"] = has_bias.pop()
        mha = nn.MultiheadAttention(**cfg, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            else:
                mha.q_proj_weight.copy_(q.weight)
                mha.k_proj_weight.copy_(k.weight)
                mha.v_proj_weight.copy_(v.weight)
            if mha.in_proj_bias is not None:
                assert q.bias is not None and k.bias is not None and v.bias is not None
                mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            mha.out_proj.weight.copy_(out.weight)
            if mha.out_proj.bias is not None and out.bias is not None:
                mha.out_proj.bias.copy_(out.bias)
            if self.bias_k is not None and self.bias_v is not None and mha.bias_k is not None and mha.bias_v is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        return mha.train(self.training)

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bias_k is not None:
            parts.append("add_bias_kv=True")
        if self.add_zero_attn:
            parts.append("add_zero_attn=True")
        if self.batch_first:
            parts.append("batch_first=True")
        return ", ".join(parts)

    # ----------------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward`` (its slow path, op for op, with the projections called).

        Shapes as torch's: ``query`` (L, N, E) / (N, L, E) with ``batch_first`` / (L, E) unbatched,
        ``key``/``value`` likewise with S and kdim/vdim; ``key_padding_mask`` (N, S) or (S); ``attn_mask``
        (L, S) or (N·num_heads, L, S); bool masks mean True = not attended, float masks are added.
        Returns the output and, if ``need_weights``, the attention weights (N, L, S) averaged over heads
        or (N, num_heads, L, S) per head (no N when unbatched), else None.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("DecomposableMultiheadAttention does not support NestedTensor input")
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask",
                                           attn_mask.dtype if attn_mask is not None else None, "attn_mask", query.dtype)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
        batched = _is_batched(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if self.batch_first and batched:
            query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        num_heads, head_dim = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                               "`generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch hands the causal hint to SDPA and ignores the mask
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")

        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

        if self.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != bsz:
                raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != src_len:
                raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got "
                                     f"{key_padding_mask.shape[1]}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out)
            out = out.reshape(tgt_len, bsz, out.size(1))
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            elif self.batch_first:
                out = out.transpose(1, 0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.reshape(bsz, num_heads, tgt_len, head_dim)
        k = k.reshape(bsz, num_heads, src_len, head_dim)
        v = v.reshape(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out)
        out = out.reshape(tgt_len, bsz, out.size(1))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def unpack_attention(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (or only those at the qualified ``names``) in
    place with :meth:`DecomposableMultiheadAttention.from_mha`; returns the names replaced, in module order.

    A module shared at several names is converted once and stays shared. An ``nn.TransformerEncoder``
    that now holds one has its nested-tensor fast path turned off (``use_nested_tensor = False``): that
    path reads ``self_attn``'s packed weights and would feed NestedTensors to the layers.
    """
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.MultiheadAttention)]
    if names is not None:
        wanted = list(dict.fromkeys(names))
        available = {name for name, _ in found}
        missing = [n for n in wanted if n not in available]
        if missing:
            modules = dict(model.named_modules(remove_duplicate=False))
            details = [f"{n!r} ({'no such module' if n not in modules else type(modules[n]).__name__})" for n in missing]
            raise ValueError(f"unpack_attention: not an nn.MultiheadAttention in the model: {', '.join(details)}")
        keep = set(wanted)
        found = [(name, m) for name, m in found if name in keep]
    if any(name == "" for name, _ in found):
        raise ValueError("unpack_attention cannot replace the root module in place; "
                         "use DecomposableMultiheadAttention.from_mha(model)")
    converted: dict[int, DecomposableMultiheadAttention] = {}
    for name, mha in found:
        assert isinstance(mha, nn.MultiheadAttention)
        new = converted.get(id(mha))
        if new is None:
            new = converted[id(mha)] = DecomposableMultiheadAttention.from_mha(mha)
        _set_submodule(model, name, new)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(s, DecomposableMultiheadAttention) for s in m.modules()):
            m.use_nested_tensor = False
    return [name for name, _ in found]
