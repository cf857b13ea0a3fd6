"""Every architecture a user brings: attention (nn.MultiheadAttention is planned through an
equivalent module), Hugging Face Conv1D as a Linear, embeddings, tied weights, token inputs, layers
no method handles listed with their reason, MACs of what really runs, undefined errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tncompress.checkpoint import load, save_compressed
from tncompress.compress import decompose, make_plan
from tncompress.decompositions.tt import DEGENERATE_RATIO, auto_modes, padded_modes
from tncompress.layers import LowRankEmbedding, LowRankLinear, TTEmbedding
from tncompress.layers.attention import DecomposableMultiheadAttention
from tncompress.measure import count_macs, count_params
from tncompress.planner import example_batch, token_vocabulary
from tncompress.recipe import parse_recipe

E, HEADS, FF, L = 16, 2, 32, 5


def recipe(defaults: dict, **extra) -> object:
    return parse_recipe({"version": 1, "defaults": defaults, **extra}, "r.yaml")


def encoder(batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()


# ---------------------------------------------------------------------------------- attention


def test_attention_projections_are_planned_and_decomposed():
    model = encoder()
    result = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": 4}}), input_shape=[1, L, E])
    names = {p.name: p for p in result.plan}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        entry = names[f"layers.0.self_attn.{proj}"]
        assert entry.action == "decompose" and entry.macs_before == L * E * E
        assert isinstance(result.model.get_submodule(f"layers.0.self_attn.{proj}"), LowRankLinear)
    assert isinstance(result.model.layers[0].self_attn, DecomposableMultiheadAttention)
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)  # the input model is untouched


def test_attention_at_full_rank_is_exact_and_reloads(tmp_path):
    model = encoder(batch_first=False)
    x = torch.randn(L, 2, E)
    result = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": E}}), input_shape=[L, 1, E])
    with torch.no_grad():
        want, got = model(x), result.model(x)
    assert (got - want).norm() / want.norm() < 1e-5
    path = tmp_path / "enc.pt"
    save_compressed(path, result.model, spec=None, plan=[p.to_dict() for p in result.plan], recipe={})
    again = load(path, base_model=encoder(batch_first=False))
    with torch.no_grad():
        torch.testing.assert_close(again(x), got, rtol=1e-6, atol=1e-6)


def test_untouched_attention_is_put_back():
    model = encoder()
    rec = recipe({"Linear": {"method": "lowrank", "rank": 4}}, exclude=["*self_attn*"])
    result = decompose(model, rec, input_shape=[1, L, E])
    # the feed-forward Linears are factorized: the layer's fast-path check would read linear1.weight, so
    # the equivalent attention module stays (it declines the fast path first)
    assert isinstance(result.model.layers[0].self_attn, DecomposableMultiheadAttention)
    with torch.no_grad():
        assert torch.isfinite(result.model(torch.randn(2, L, E))).all()
    only_mlp_kept = recipe({"Linear": {"method": "lowrank", "rank": 4}}, exclude=["*self_attn*", "*linear*"])
    vit_like = nn.Sequential(nn.Linear(E, E), encoder().layers[0].self_attn)
    del vit_like[1]
    result = decompose(encoder(), only_mlp_kept, input_shape=[1, L, E], allow_error=True)
    assert type(result.model.layers[0].self_attn) is nn.MultiheadAttention  # nothing decomposed: put back
    assert "layers.0.self_attn.in_proj_weight" in result.model.state_dict()


def test_macs_of_a_tiny_encoder_match_a_hand_count():
    """PyTorch's fused attention fast path is invisible to FlopCounterMode; the count must see it."""
    model = encoder()
    hand = 4 * L * E * E + 2 * L * L * E + 2 * L * E * FF  # q, k, v, out; scores and weighted sum; the MLP
    assert count_macs(model, torch.randn(1, L, E)).total == hand


def test_a_linear_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = Twice().eval()
    result = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": 3}}), input_shape=[1, 12])
    (entry,) = result.plan
    assert entry.calls == 2 and entry.macs_before == 2 * 144 and entry.macs_after == 2 * 3 * 24
    assert count_macs(result.model, torch.randn(1, 12)).total == entry.macs_after


# ---------------------------------------------------------------------------------- tied weights, Conv1D


class TinyLM(nn.Module):
    """An embedding and an output head sharing one tensor, like GPT-2."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_tied_weights_stay_tied_and_the_plan_is_honest():
    torch.manual_seed(0)
    model = TinyLM().eval()
    rec = recipe({"Linear": {"method": "lowrank", "rank": 2}, "Embedding": {"method": "lowrank", "rank": 2}})
    result = decompose(model, rec, input_shape=[1, 6])
    by_name = {p.name: p for p in result.plan}
    for name, other in (("embed", "head.weight"), ("head", "embed.weight")):
        assert by_name[name].action == "keep" and "tied to " + other in by_name[name].reason
    assert by_name["body"].action == "decompose"
    claimed = count_params(model) - sum(p.params_before - p.params_after for p in result.plan)
    assert count_params(result.model) == claimed
    assert result.model.head.weight is result.model.embed.weight


class Conv1D(nn.Module):
    """Hugging Face transformers' Conv1D as it is defined there: y = x·W + b with W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_hugging_face_conv1d_is_a_linear():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 10), nn.Tanh(), Conv1D(6, 12)).eval()
    x = torch.randn(3, 4, 10)
    full = recipe({"Linear": {"method": "lowrank", "rank": {"energy": 1.0}, "allow_growth": True}})
    result = decompose(model, full, input_shape=[1, 4, 10])
    assert [p.type for p in result.plan] == ["Linear", "Linear"] and all(p.action == "decompose" for p in result.plan)
    assert result.plan[0].macs_before == 4 * 10 * 12
    with torch.no_grad():
        assert (result.model(x) - model(x)).norm() / model(x).norm() < 1e-5
    low = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": 2}}), input_shape=[1, 4, 10])
    assert isinstance(low.model[0], LowRankLinear) and low.plan[0].weight_rel_error is not None


# ---------------------------------------------------------------------------------- tokens and embeddings


def test_a_model_that_starts_with_an_embedding_gets_token_ids():
    torch.manual_seed(0)
    model = TinyLM().eval()
    assert token_vocabulary(model) == 50
    ids = example_batch(model, [1, 6], 4, 0)
    assert ids.dtype == torch.int64 and ids.shape == (4, 6) and 0 <= int(ids.min()) and int(ids.max()) < 50
    assert token_vocabulary(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Embedding(5, 2))) is None
    factorized = nn.Sequential(TTEmbedding(50, 8, [5, 10], [2, 4], ranks=2), nn.Linear(8, 2))
    assert token_vocabulary(factorized) == 50  # its cores live in a child ParameterList
    result = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": 2}}), input_shape=[1, 6])
    assert result.calibration["kind"] == "random token ids below 50"


@pytest.mark.parametrize("method", ["tt", "lowrank"])
def test_embeddings_decompose_exactly_at_full_rank(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(60, 12), nn.Linear(12, 3)).eval()
    rank = {"energy": 1.0} if method == "tt" else 12
    rec = recipe({"Embedding": {"method": method, "rank": rank, "allow_growth": True}})
    result = decompose(model, rec, input_shape=[1, 7])
    layer = result.model[0]
    assert isinstance(layer, TTEmbedding if method == "tt" else LowRankEmbedding)
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        assert (result.model(ids) - model(ids)).norm() / model(ids).norm() < 1e-5
    assert result.plan[0].weight_rel_error < 1e-5


def test_degenerate_sizes_get_padded_balanced_modes():
    modes = padded_modes(50257, 4)  # 29 · 1733: its own factors give [1, 1, 29, 1733]
    assert math.prod(modes) >= 50257 and math.prod(modes) <= 50257 * 1.03
    assert max(modes) / min(modes) <= DEGENERATE_RATIO
    assert padded_modes(4096, 4) == [8, 8, 8, 8]  # balanced sizes are left alone
    in_modes, out_modes = auto_modes(768, 50257)
    assert math.prod(out_modes) >= 50257 and max(out_modes) < 100


def test_tt_of_a_padded_linear_is_exact_at_full_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 58)).eval()  # 58 = 2 · 29
    rec = recipe({"Linear": {"method": "tt", "rank": {"energy": 1.0}, "out_modes": [4, 4, 4], "allow_growth": True}})
    result = decompose(model, rec, input_shape=[1, 16])
    assert any("padded" in n for n in result.plan[0].notes)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert (result.model(x) - model(x)).norm() / model(x).norm() < 1e-5


# ---------------------------------------------------------------------------------- nothing skipped silently


def test_layers_no_method_handles_are_listed_with_a_reason():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Conv1d(3, 4, 3)
            self.rnn = nn.LSTM(4, 4, batch_first=True)
            self.up = nn.ConvTranspose2d(1, 1, 2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.seq(x).transpose(1, 2)
            out, _ = self.rnn(h)
            img = self.up(out[:, :1, :4].reshape(-1, 1, 2, 2))
            return self.fc(out[:, -1]) + img.mean()

    plan = make_plan(Mixed().eval(), recipe({"Linear": {"method": "lowrank", "rank": 1}}), [1, 3, 10])
    by_name = {p.name: p for p in plan}
    assert by_name["seq"].type == "Conv1d" and "1-D convolutions" in by_name["seq"].reason
    assert by_name["rnn"].type == "LSTM" and "recurrent" in by_name["rnn"].reason
    assert by_name["up"].type == "ConvTranspose2d" and "transposed" in by_name["up"].reason
    assert by_name["fc"].action == "decompose"
    assert [p.name for p in plan] == ["seq", "rnn", "up", "fc"]  # model order


def test_a_weight_read_by_its_parent_is_kept_with_the_true_reason():
    class ReadsWeight(nn.Module):  # as torchvision's Swin attention does with qkv
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.qkv.weight, self.qkv.bias)

    plan = make_plan(ReadsWeight().eval(), recipe({"Linear": {"method": "lowrank", "rank": 2}}), [1, 8])
    by_name = {p.name: p for p in plan}
    assert by_name["qkv"].action == "keep" and "reads its weight directly" in by_name["qkv"].reason
    assert by_name["unused"].action == "keep" and "never called" in by_name["unused"].reason


def test_a_zero_reference_output_gives_an_undefined_error_not_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    result = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": 2}}), input_shape=[1, 8])
    head = result.plan[1]
    assert head.output_rel_error is None and head.weight_rel_error is None
    assert any("undefined" in n for n in head.notes)
    assert result.model_output_error is None


# ---------------------------------------------------------------------------------- Hugging Face models


def _hf():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def test_tiny_gpt2_from_its_config():
    tf = _hf()
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=101, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    rec = recipe({"Linear": {"method": "lowrank", "rank": {"energy": 1.0}, "allow_growth": True},
                  "Embedding": {"method": "tt", "rank": {"energy": 1.0}, "allow_growth": True}})
    result = decompose(model, rec, input_shape=[1, 8])
    by_name = {p.name: p for p in result.plan}
    assert by_name["transformer.h.0.attn.c_attn"].action == "decompose"  # a Conv1D, as a Linear
    assert by_name["lm_head"].action == "keep" and "tied" in by_name["lm_head"].reason
    assert by_name["transformer.wte"].action == "keep" and "tied" in by_name["transformer.wte"].reason
    assert by_name["transformer.wpe"].action == "decompose"
    assert result.model_output_error is not None and result.model_output_error < 1e-4
    claimed = count_params(model) - sum(p.params_before - p.params_after for p in result.plan)
    assert count_params(result.model) == claimed


def test_tiny_bert_from_its_config():
    tf = _hf()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32)
    model = tf.BertModel(config).eval()
    rec = recipe({"Linear": {"method": "tt", "rank": {"energy": 1.0}, "allow_growth": True},
                  "Embedding": {"method": "lowrank", "rank": 2}}, exclude=["*token_type_embeddings"])
    result = decompose(model, rec, input_shape=[1, 8])
    assert result.calibration["kind"] == "random token ids below 97"
    assert sum(p.action == "decompose" for p in result.plan) >= 8
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        out = result.model(ids).last_hidden_state
    assert out.shape == (2, 8, 16) and torch.isfinite(out).all()


def test_a_hugging_face_model_exports_its_logits(tmp_path):
    tf = _hf()
    from tncompress.export import export_model

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=101, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    result = export_model(model, example_batch(model, [1, 8]), tmp_path / "gpt2.ts", "torchscript")
    assert result.output == "logits" and result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    ids = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "gpt2.ts"))(ids)
    torch.testing.assert_close(got, model(ids).logits, rtol=1e-4, atol=1e-4)


class Versioned(nn.Module):
    """Checks its state-dict version on load, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_model_that_checks_its_state_dict_version_reloads(tmp_path):
    torch.manual_seed(0)
    model = Versioned().eval()
    result = decompose(model, recipe({"Linear": {"method": "lowrank", "rank": 2}}), input_shape=[1, 3, 8, 8])
    path = tmp_path / "v.pt"
    save_compressed(path, result.model, spec=None, plan=[p.to_dict() for p in result.plan], recipe={})
    again = load(path, base_model=Versioned())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), result.model(x))


def test_a_large_rank_tt_runs_through_w_when_that_is_cheaper():
    """At full TT rank every core-by-core chain costs more than forming W once (768→3072 at full rank
    ran 201 G MACs per 197 rows as a chain); the schedule search costs W like any other schedule."""
    from tncompress.layers import TTLinear
    from tncompress.measure import LargestTensorMode

    torch.manual_seed(0)
    dense = nn.Linear(96, 128)
    layer = TTLinear.from_dense(dense, ranks=None, in_modes=[4, 4, 6], out_modes=[4, 4, 8]).eval()
    rows = torch.randn(2, 50, 96)
    assert layer._plan_for(100).groups == ((0, 3),)
    with torch.no_grad(), LargestTensorMode() as seen:
        out = layer(rows)
    torch.testing.assert_close(out, dense(rows), rtol=1e-4, atol=1e-5)
    assert seen.largest <= 100 * 128 + 96 * 128 * 2  # the output and W, never a chain's (rows × rank) blow-up
    traced = torch.jit.trace(layer, (rows,), check_trace=False)
    torch.testing.assert_close(traced(rows), out, rtol=1e-5, atol=1e-6)
    small = TTLinear.from_dense(dense, ranks=2, in_modes=[4, 4, 6], out_modes=[4, 4, 8])
    assert small._plan_for(100).groups != ((0, 3),)  # TT-sized ranks keep the chain
