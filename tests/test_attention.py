"""DecomposableMultiheadAttention: nn.MultiheadAttention's function with callable (swappable) projections."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tncompress.layers.attention import DecomposableMultiheadAttention, unpack_attention
from tncompress.layers.lowrank_linear import LowRankLinear

E, HEADS, L, S, N = 8, 2, 3, 4, 2
KDIM, VDIM = 5, 6
TOL64 = {"atol": 1e-10, "rtol": 0.0}
TOL32 = {"atol": 1e-5, "rtol": 1e-5}


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (torch initialises biases to zero, which would hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)


def make_pair(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs):
    mha = nn.MultiheadAttention(E, HEADS, dtype=dtype, **kwargs)
    randomize(mha, seed)
    return mha, DecomposableMultiheadAttention.from_mha(mha)


STRUCTURES = {
    "plain": {},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_bf": {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    "cross_kdim_vdim": {"kdim": KDIM, "vdim": VDIM},
    "cross_kdim_vdim_bf_nobias": {"kdim": KDIM, "vdim": VDIM, "batch_first": True, "bias": False},
}


def make_inputs(mha: nn.MultiheadAttention, batched: bool, dtype: torch.dtype, seed: int = 1):
    """query, key, value (the same tensor for self-attention structures) and the source length."""
    g = torch.Generator().manual_seed(seed)
    cross = mha.kdim != E or mha.vdim != E
    src = S if cross else L

    def rand(length: int, dim: int) -> torch.Tensor:
        if not batched:
            shape: tuple[int, ...] = (length, dim)
        else:
            shape = (N, length, dim) if mha.batch_first else (length, N, dim)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    query = rand(L, E)
    if cross:
        return query, rand(src, mha.kdim), rand(src, mha.vdim), src
    return query, query, query, src


def masks(call: str, batched: bool, src: int, dtype: torch.dtype) -> dict:
    """forward kwargs of one call kind; key 0 is never masked unless a row is meant to be fully masked."""
    g = torch.Generator().manual_seed(7)
    n = N if batched else 1
    kw: dict = {}

    def bool_mask(*shape: int) -> torch.Tensor:
        m = torch.rand(shape, generator=g) < 0.4
        m[..., 0] = False
        return m

    def kpm_bool() -> torch.Tensor:
        m = torch.zeros(n, src, dtype=torch.bool)
        m[0, -1] = True
        m[-1, 1] = True
        return m if batched else m[0]

    def to_float(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, dtype=dtype).masked_fill(m, -1e4) + 0.1 * torch.randn(m.shape, generator=g).to(dtype)

    causal = torch.triu(torch.ones(L, src, dtype=torch.bool), diagonal=1)
    if call == "none":
        pass
    elif call == "no_weights":
        kw["need_weights"] = False
    elif call == "per_head":
        kw["average_attn_weights"] = False
    elif call == "bool2d":
        kw["attn_mask"] = bool_mask(L, src)
    elif call == "float2d_no_weights":
        kw.update(attn_mask=to_float(bool_mask(L, src)), need_weights=False)
    elif call == "bool3d_kpm_per_head":
        kw.update(attn_mask=bool_mask(n * HEADS, L, src), key_padding_mask=kpm_bool(), average_attn_weights=False)
    elif call == "float3d_float_kpm":
        kw.update(attn_mask=to_float(bool_mask(n * HEADS, L, src)), key_padding_mask=to_float(kpm_bool()))
    elif call == "float3d_float_kpm_no_weights":
        kw.update(attn_mask=to_float(bool_mask(n * HEADS, L, src)), key_padding_mask=to_float(kpm_bool()),
                  need_weights=False)
    elif call == "bool_kpm_no_weights":
        kw.update(key_padding_mask=kpm_bool(), need_weights=False)
    elif call == "causal_no_weights":
        kw.update(attn_mask=causal, is_causal=True, need_weights=False)
    elif call == "causal_weights":
        kw.update(attn_mask=causal, is_causal=True)
    elif call == "causal_kpm_no_weights":
        kw.update(attn_mask=causal, is_causal=True, key_padding_mask=kpm_bool(), need_weights=False)
    elif call in ("fully_masked_row", "fully_masked_row_no_weights"):
        m = torch.zeros(L, src, dtype=torch.bool)
        m[1] = True  # query 1 may attend nothing: NaN with weights, zeros through SDPA (as torch)
        kw.update(attn_mask=m, need_weights=call == "fully_masked_row")
    else:  # pragma: no cover
        raise AssertionError(call)
    return kw


CALLS = ["none", "no_weights", "per_head", "bool2d", "float2d_no_weights", "bool3d_kpm_per_head", "float3d_float_kpm",
         "float3d_float_kpm_no_weights", "bool_kpm_no_weights", "causal_no_weights", "causal_weights",
         "causal_kpm_no_weights", "fully_masked_row", "fully_masked_row_no_weights"]


def run_both(mha, ours, args, kw):
    ref = mha(*args, **kw)
    got = ours(*args, **kw)
    return ref, got


def assert_same(ref, got, tol) -> None:
    torch.testing.assert_close(got[0], ref[0], equal_nan=True, **tol)
    if ref[1] is None:
        assert got[1] is None
    else:
        assert got[1] is not None and got[1].shape == ref[1].shape
        torch.testing.assert_close(got[1], ref[1], equal_nan=True, **tol)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_matches_nn_multihead_attention_float64(structure, call, batched):
    mha, ours = make_pair(**STRUCTURES[structure])
    query, key, value, src = make_inputs(mha, batched, torch.float64)
    kw = masks(call, batched, src, torch.float64)
    ref, got = run_both(mha, ours, (query, key, value), kw)
    assert_same(ref, got, TOL64)
    assert got[0].shape == query.shape[:-1] + (E,)
    if call.startswith("fully_masked") and mha.bias_k is None and not mha.add_zero_attn:  # (else an added key is left)
        row = got[0][1] if not batched or not mha.batch_first else got[0][:, 1]
        assert bool(torch.isnan(row).all()) == (call == "fully_masked_row")  # torch's behaviour, NaN or not


@pytest.mark.parametrize("call", ["none", "no_weights", "bool3d_kpm_per_head", "float3d_float_kpm_no_weights",
                                  "causal_no_weights"])
@pytest.mark.parametrize("structure", ["batch_first", "bias_kv_zero_attn_bf", "cross_kdim_vdim"])
def test_matches_nn_multihead_attention_float32(structure, call):
    mha, ours = make_pair(torch.float32, **STRUCTURES[structure])
    query, key, value, src = make_inputs(mha, True, torch.float32)
    ref, got = run_both(mha, ours, (query, key, value), masks(call, True, src, torch.float32))
    assert got[0].dtype == torch.float32
    assert_same(ref, got, TOL32)


@pytest.mark.parametrize("need_weights", [True, False])
def test_matches_torch_native_fast_path_in_eval(need_weights):
    """eval + no_grad, batch_first self-attention: torch runs its fused kernel, we run ours."""
    mha, ours = make_pair(batch_first=True)
    mha.eval(), ours.eval()
    query, key, value, _ = make_inputs(mha, True, torch.float64)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        ref, got = run_both(mha, ours, (query, key, value), {"key_padding_mask": kpm, "need_weights": need_weights})
    assert_same(ref, got, TOL64)


def test_is_causal_without_mask_raises_like_torch():
    mha, ours = make_pair()
    x = torch.randn(L, N, E, dtype=torch.float64)
    for module in (mha, ours):
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            module(x, x, x, is_causal=True, need_weights=False)


def test_is_causal_hint_overrides_mask_like_torch():
    """Without key padding and weights torch trusts the hint and ignores the mask; so do we."""
    mha, ours = make_pair()
    x = torch.randn(L, N, E, dtype=torch.float64)
    not_causal = torch.zeros(L, L, dtype=torch.bool)
    ref, got = run_both(mha, ours, (x, x, x), {"attn_mask": not_causal, "is_causal": True, "need_weights": False})
    assert_same(ref, got, TOL64)
    causal = ours(x, x, x, attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1), need_weights=False)[0]
    torch.testing.assert_close(got[0], causal, **TOL64)


@pytest.mark.parametrize("bad", ["int_mask", "wrong_2d_mask", "wrong_3d_mask", "4d_query", "wrong_embed", "kpm_shape"])
def test_bad_inputs_raise_the_same_exception_type(bad):
    mha, ours = make_pair()
    x = torch.randn(L, N, E, dtype=torch.float64)
    args, kw = (x, x, x), {}
    if bad == "int_mask":
        kw["attn_mask"] = torch.zeros(L, L, dtype=torch.int64)
    elif bad == "wrong_2d_mask":
        kw["attn_mask"] = torch.zeros(L, L + 1, dtype=torch.bool)
    elif bad == "wrong_3d_mask":
        kw["attn_mask"] = torch.zeros(HEADS, L, L, dtype=torch.bool)
    elif bad == "4d_query":
        y = x.unsqueeze(0)
        args = (y, y, y)
    elif bad == "wrong_embed":
        y = torch.randn(L, N, E + 2, dtype=torch.float64)
        args = (y, y, y)
    elif bad == "kpm_shape":
        kw["key_padding_mask"] = torch.zeros(N, L + 1, dtype=torch.bool)
    raised = []
    for module in (mha, ours):
        with pytest.raises((AssertionError, RuntimeError)) as info:
            module(*args, **kw)
        raised.append(info.type)
    assert raised[0] is raised[1]


def test_mismatched_mask_types_warn_like_torch():
    mha, ours = make_pair()
    x = torch.randn(L, N, E, dtype=torch.float64)
    kw = {"attn_mask": torch.zeros(L, L, dtype=torch.bool), "key_padding_mask": torch.zeros(N, L, dtype=torch.float64)}
    for module in (mha, ours):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            module(x, x, x, **kw)


# --------------------------------------------------------------------------------------------------
# training mode: dropout and gradients

@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("structure", ["plain", "bias_kv_zero_attn_bf", "cross_kdim_vdim"])
def test_dropout_uses_the_same_random_stream(structure, need_weights):
    """Same seed, same dropout mask: the attention core makes torch's calls (F.dropout / SDPA's dropout)."""
    mha, ours = make_pair(dropout=0.5, **STRUCTURES[structure])
    query, key, value, src = make_inputs(mha, True, torch.float64)
    kw = {"need_weights": need_weights, "key_padding_mask": masks("bool_kpm_no_weights", True, src, torch.float64)[
        "key_padding_mask"]}
    torch.manual_seed(123)
    ref = mha(query, key, value, **kw)
    torch.manual_seed(123)
    got = ours(query, key, value, **kw)
    assert_same(ref, got, TOL64)
    torch.manual_seed(124)
    other = ours(query, key, value, **kw)[0]
    assert not torch.allclose(other, got[0])  # dropout really is active in training
    ours.eval()
    a, b = ours(query, key, value, **kw)[0], ours(query, key, value, **kw)[0]
    assert torch.equal(a, b) and not torch.allclose(a, got[0])  # and off in eval


def _param_grads(mha: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention's parameter gradients named as ours."""
    grads: dict[str, torch.Tensor] = {}
    if mha._qkv_same_embed_dim:
        for name, g in zip(("q_proj", "k_proj", "v_proj"), mha.in_proj_weight.grad.chunk(3)):
            grads[f"{name}.weight"] = g
    else:
        grads.update({"q_proj.weight": mha.q_proj_weight.grad, "k_proj.weight": mha.k_proj_weight.grad,
                      "v_proj.weight": mha.v_proj_weight.grad})
    if mha.in_proj_bias is not None:
        for name, g in zip(("q_proj", "k_proj", "v_proj"), mha.in_proj_bias.grad.chunk(3)):
            grads[f"{name}.bias"] = g
        grads["out_proj.bias"] = mha.out_proj.bias.grad
    grads["out_proj.weight"] = mha.out_proj.weight.grad
    if mha.bias_k is not None:
        grads["bias_k"], grads["bias_v"] = mha.bias_k.grad, mha.bias_v.grad
    return grads


@pytest.mark.parametrize("call", ["none", "float3d_float_kpm_no_weights", "causal_no_weights", "bool3d_kpm_per_head"])
@pytest.mark.parametrize("structure", ["plain", "no_bias", "bias_kv_zero_attn_bf", "cross_kdim_vdim_bf_nobias"])
def test_gradients_match(structure, call):
    mha, ours = make_pair(**STRUCTURES[structure])
    query, key, value, src = make_inputs(mha, True, torch.float64)
    kw = masks(call, True, src, torch.float64)
    g = torch.Generator().manual_seed(3)
    input_grads = []
    for module in (mha, ours):
        inputs = [t.detach().clone().requires_grad_() for t in {id(t): t for t in (query, key, value)}.values()]
        args = inputs * 3 if len(inputs) == 1 else inputs
        out, weights = module(*args, **kw)
        g.manual_seed(3)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
        if weights is not None:
            loss = loss + (weights * torch.randn(weights.shape, generator=g, dtype=weights.dtype)).sum()
        loss.backward()
        input_grads.append([t.grad for t in inputs])
    for a, b in zip(*input_grads):
        torch.testing.assert_close(b, a, **TOL64)
    ref = _param_grads(mha)
    got = {name: p.grad for name, p in ours.named_parameters()}
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL64, msg=name)


# --------------------------------------------------------------------------------------------------
# real torch / torchvision models

class OpLog(TorchDispatchMode):
    """Names of the aten ops run (to see which path a wrapper took)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


FUSED = {"_transformer_encoder_layer_fwd", "_native_multi_head_attention"}


def tiny_encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.TransformerEncoder(layer, num_layers=2)
    randomize(model)
    return model.eval()


def test_transformer_encoder_declines_fast_path_and_matches():
    model = tiny_encoder()
    x = torch.randn(N, L, E)
    with torch.no_grad(), OpLog() as log:
        ref = model(x)
    assert log.ops & FUSED  # the original took a fused path
    unpacked = copy.deepcopy(model)
    assert unpack_attention(unpacked) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(isinstance(layer.self_attn, DecomposableMultiheadAttention) for layer in unpacked.layers)
    with torch.no_grad(), OpLog() as log:
        got = unpacked(x)
    assert not log.ops & FUSED and "_scaled_dot_product_flash_attention_for_cpu" in log.ops
    torch.testing.assert_close(got, ref, **TOL32)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        torch.testing.assert_close(unpacked(x, mask=causal, is_causal=True), model(x, mask=causal, is_causal=True), **TOL32)
    got_grad = unpacked(x)  # grad enabled: the slow path in both
    torch.testing.assert_close(got_grad, model(x), **TOL32)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_with_padding_nested_path_is_turned_off():
    """With a key padding mask the original runs on NestedTensors (zeros at padded positions)."""
    model = tiny_encoder()
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=kpm)
    unpacked = copy.deepcopy(model)
    unpack_attention(unpacked)
    assert unpacked.use_nested_tensor is False
    with torch.no_grad():
        got = unpacked(x, src_key_padding_mask=kpm)
    keep = ~kpm
    torch.testing.assert_close(got[keep], ref[keep], **TOL32)
    got_grad = unpacked(x, src_key_padding_mask=kpm)  # eval with grad enabled does not trip on in_proj_weight=None
    torch.testing.assert_close(got_grad, got, **TOL32)


def test_transformer_decoder_layer_matches():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0)
    randomize(model)
    model.eval()
    tgt, memory = torch.randn(L, N, E), torch.randn(S, N, E)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(L)
    mkpm = torch.zeros(N, S, dtype=torch.bool)
    mkpm[1, 0] = True
    kw = {"tgt_mask": tgt_mask, "tgt_is_causal": True, "memory_key_padding_mask": mkpm}
    with torch.no_grad():
        ref = model(tgt, memory, **kw)
    unpacked = copy.deepcopy(model)
    assert unpack_attention(unpacked) == ["self_attn", "multihead_attn"]
    with torch.no_grad():
        torch.testing.assert_close(unpacked(tgt, memory, **kw), ref, **TOL32)


def test_torchvision_vision_transformer_matches():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=10).eval()
    randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    names = unpack_attention(model)
    assert names == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, **TOL32)


# --------------------------------------------------------------------------------------------------
# the projections are only called

class Recorder(nn.Module):
    """Calls the wrapped module and records the input shapes (no .weight of its own)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def full_rank_pair(linear: nn.Linear) -> nn.Sequential:
    """Two Linears whose composition is ``linear``: x -> Q x -> (W Qᵀ) Q x + b, Q orthogonal."""
    out_f, in_f = linear.weight.shape
    q, _ = torch.linalg.qr(torch.randn(in_f, in_f, dtype=torch.float64))
    first = nn.Linear(in_f, in_f, bias=False, dtype=linear.weight.dtype)
    second = nn.Linear(in_f, out_f, bias=linear.bias is not None, dtype=linear.weight.dtype)
    with torch.no_grad():
        first.weight.copy_(q)
        second.weight.copy_(linear.weight @ q.T)
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return nn.Sequential(first, second)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("structure", ["batch_first", "cross_kdim_vdim"])
def test_projections_are_called_not_read(structure, need_weights):
    mha, ours = make_pair(**STRUCTURES[structure])
    query, key, value, src = make_inputs(mha, True, torch.float64)
    kw = {"need_weights": need_weights, **masks("bool3d_kpm_per_head", True, src, torch.float64)}
    kw["need_weights"] = need_weights
    ref = mha(query, key, value, **kw)
    ours.q_proj = Recorder(ours.q_proj)
    ours.out_proj = full_rank_pair(ours.out_proj)
    assert not hasattr(ours.out_proj, "weight") and not hasattr(ours.q_proj, "weight")
    got = ours(query, key, value, **kw)
    assert_same(ref, got, TOL64)
    assert ours.q_proj.calls == [(L, N, E)]  # one call, on the sequence-first query
    with pytest.raises(TypeError, match=r"q_proj \(Recorder\), out_proj \(Sequential\) are not"):
        ours.to_mha()


def test_low_rank_projections_at_full_rank_match():
    mha, ours = make_pair(batch_first=True, kdim=KDIM, vdim=VDIM)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(ours, name, LowRankLinear.from_dense(getattr(ours, name), rank=E))
    query, key, value, src = make_inputs(mha, True, torch.float64)
    for need_weights in (True, False):
        assert_same(mha(query, key, value, need_weights=need_weights), ours(query, key, value, need_weights=need_weights),
                    TOL64)
    encoder = tiny_encoder()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        ref = encoder(x)
        unpack_attention(encoder)
        attn = encoder.layers[0].self_attn
        attn.v_proj = LowRankLinear.from_dense(attn.v_proj, rank=E)
        torch.testing.assert_close(encoder(x), ref, **TOL32)


# --------------------------------------------------------------------------------------------------
# conversions

@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_config_round_trip_loads_strictly(structure):
    _, ours = make_pair(dropout=0.25, **STRUCTURES[structure])
    config = ours.config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = type(ours)(**config, dtype=torch.float64)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    rebuilt.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), rebuilt.eval()
    query, key, value, _ = make_inputs(ours.to_mha(), True, torch.float64)
    assert_same(ours(query, key, value), rebuilt(query, key, value), TOL64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_to_mha_round_trip(structure, training):
    mha, _ = make_pair(dropout=0.1, **STRUCTURES[structure])
    mha.train(training)
    mha.out_proj.weight.requires_grad_(False)
    ours = DecomposableMultiheadAttention.from_mha(mha)
    assert ours.training == training and not ours.out_proj.weight.requires_grad
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    for attr in ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first", "kdim", "vdim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(mha, attr), attr
    assert (ours.bias_k is None) == (mha.bias_k is None) and (ours.bias_v is None) == (mha.bias_v is None)
    back = ours.to_mha()
    assert type(back) is nn.MultiheadAttention and back.training == training
    ref_state, back_state = mha.state_dict(), back.state_dict()
    assert list(back_state) == list(ref_state)
    for k in ref_state:
        assert torch.equal(back_state[k], ref_state[k]), k
    mha.eval(), back.eval()
    query, key, value, _ = make_inputs(mha, True, torch.float64)
    assert_same(mha(query, key, value), back(query, key, value), TOL64)


def test_from_mha_keeps_float32_and_default_init_looks_like_torch():
    mha = nn.MultiheadAttention(E, HEADS, dtype=torch.float32)
    ours = DecomposableMultiheadAttention.from_mha(mha)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    fresh = DecomposableMultiheadAttention(E, HEADS, add_bias_kv=True)
    assert fresh.q_proj.bias is not None and torch.equal(fresh.q_proj.bias, torch.zeros(E))
    assert fresh.out_proj.bias is not None and torch.equal(fresh.out_proj.bias, torch.zeros(E))
    bound = (6.0 / (E + 3 * E)) ** 0.5  # xavier-uniform on the packed (3E, E) in_proj_weight, as torch
    assert all(p.weight.abs().max() <= bound for p in (fresh.q_proj, fresh.k_proj, fresh.v_proj))
    no_bias = DecomposableMultiheadAttention(E, HEADS, bias=False)
    assert all(getattr(no_bias, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    with pytest.raises(TypeError):
        DecomposableMultiheadAttention.from_mha(nn.Linear(E, E))  # type: ignore[arg-type]


def test_unpack_attention_names_order_sharing_and_errors():
    shared = nn.MultiheadAttention(E, HEADS)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, HEADS)) for _ in range(2)])
            self.a = shared
            self.b = shared

    net = Net()
    with pytest.raises(ValueError, match=r"'blocks.0.0' \(Linear\).*'nope' \(no such module\)"):
        unpack_attention(net, ["blocks.0.0", "nope"])
    assert unpack_attention(net, ["blocks.1.1"]) == ["blocks.1.1"]
    assert isinstance(net.blocks[1][1], DecomposableMultiheadAttention)
    assert isinstance(net.blocks[0][1], nn.MultiheadAttention)
    assert unpack_attention(net) == ["blocks.0.1", "a", "b"]
    assert isinstance(net.a, DecomposableMultiheadAttention) and net.a is net.b
    assert unpack_attention(net) == []
    with pytest.raises(ValueError, match="root"):
        unpack_attention(nn.MultiheadAttention(E, HEADS))


# --------------------------------------------------------------------------------------------------
# FLOP counting

def hand_macs(src: int, kdim: int, vdim: int) -> int:
    projections = N * L * E * E + N * src * kdim * E + N * src * vdim * E + N * L * E * E  # q, k, v, out
    return projections + 2 * N * L * src * E  # Q·Kᵀ and weights·V over all heads


@pytest.mark.parametrize("structure", ["plain", "cross_kdim_vdim"])
def test_flop_counter_counts_projections_and_attention_core(structure):
    from tncompress.measure import countable_attention, mac_counter

    mha, ours = make_pair(torch.float32, **STRUCTURES[structure])
    query, key, value, src = make_inputs(mha, True, torch.float32)
    expected = hand_macs(src, mha.kdim, mha.vdim)
    if structure == "plain":
        assert expected == 4 * N * L * E**2 + 2 * N * L * L * E
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:  # the stock counter: bmm and addmm/mm
            ours(query, key, value, need_weights=True)
        assert counter.get_total_flops() // 2 == expected
        # need_weights=False runs SDPA, whose CPU kernel only the project's counter knows
        with mac_counter() as counter:
            ours(query, key, value, need_weights=False)
        assert counter.get_total_flops() // 2 == expected
        for need_weights in (True, False):
            with countable_attention(), mac_counter() as counter:
                mha(query, key, value, need_weights=need_weights)
            assert counter.get_total_flops() // 2 == expected  # same count as the module it replaces
