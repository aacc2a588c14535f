"""Attention, MLP, decoder layer and KV cache against naive reference implementations."""
from __future__ import annotations

import math

import pytest
import torch

from transformer_components import FeedForwardNetwork, KVCache, KVCacheView, MultiHeadAttention, TransformerDecoderLayer

D_MODEL, N_HEADS = 32, 4


def naive_attention(attn: MultiHeadAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Textbook attention with explicit softmax; allowed: (B, T, T) bool, True = query may see key."""
    B, T, C = x.shape
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=2)
    heads = lambda t: t.view(B, T, N_HEADS, C // N_HEADS).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // N_HEADS)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.c_proj.weight.T + attn.c_proj.bias


@pytest.fixture()
def attention() -> MultiHeadAttention:
    torch.manual_seed(0)
    attn = MultiHeadAttention(D_MODEL, N_HEADS, dropout=0.0).eval()
    for p in attn.parameters():  # non-zero biases so they are exercised too
        torch.nn.init.normal_(p, std=0.2)
    return attn


def test_causal_attention_matches_naive(attention):
    x = torch.randn(2, 7, D_MODEL)
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    torch.testing.assert_close(attention(x), naive_attention(attention, x, causal), atol=1e-5, rtol=1e-5)


def test_explicit_mask_matches_naive(attention):
    x = torch.randn(2, 6, D_MODEL)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril().repeat(2, 1, 1)
    allowed[1, :, :2] = False  # row 1 has two padding keys ...
    allowed[1] |= torch.eye(6, dtype=torch.bool)  # ... but every query still sees itself
    got = attention(x, attn_mask=allowed[:, None])
    torch.testing.assert_close(got, naive_attention(attention, x, allowed), atol=1e-5, rtol=1e-5)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)


def test_all_projections_are_plain_linear():
    layer = TransformerDecoderLayer(D_MODEL, N_HEADS, 4 * D_MODEL)
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert {type(m) for m in linears} == {torch.nn.Linear} and len(linears) == 4


def test_feed_forward_uses_gelu_tanh():
    torch.manual_seed(0)
    ffn = FeedForwardNetwork(D_MODEL, 4 * D_MODEL).eval()
    x = torch.randn(3, 5, D_MODEL)
    h = x @ ffn.c_fc.weight.T + ffn.c_fc.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's gelu_new
    torch.testing.assert_close(ffn(x), gelu @ ffn.c_proj.weight.T + ffn.c_proj.bias, atol=1e-5, rtol=1e-5)


def test_decoder_layer_is_pre_layernorm_residual():
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(D_MODEL, N_HEADS, 4 * D_MODEL, layer_norm_eps=1e-5).eval()
    x = torch.randn(2, 5, D_MODEL)
    h = x + layer.attn(torch.nn.functional.layer_norm(x, (D_MODEL,), layer.ln_1.weight, layer.ln_1.bias, 1e-5))
    expected = h + layer.mlp(torch.nn.functional.layer_norm(h, (D_MODEL,), layer.ln_2.weight, layer.ln_2.bias, 1e-5))
    torch.testing.assert_close(layer(x), expected)


def test_layer_without_bias_has_no_bias_parameters():
    layer = TransformerDecoderLayer(D_MODEL, N_HEADS, 4 * D_MODEL, bias=False)
    assert not [n for n, _ in layer.named_parameters() if n.endswith("bias")]


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(D_MODEL, N_HEADS, 4 * D_MODEL, dropout=0.5)
    x = torch.randn(2, 5, D_MODEL)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_writes_each_row_at_its_own_slot_and_positions():
    cache = KVCache(n_layers=2, n_slots=3, max_len=8)
    k, v = torch.randn(2, N_HEADS, 1, 5), torch.randn(2, N_HEADS, 1, 5)
    view = KVCacheView(cache, slots=torch.tensor([2, 0]), positions=torch.tensor([[5], [1]]), key_len=6)
    k_all, v_all = view.update(0, k, v)
    assert cache.keys[0].shape == (3, N_HEADS, 8, 5) and cache.keys[1] is None  # allocated per layer on first write
    assert torch.equal(cache.keys[0][2, :, 5], k[0, :, 0]) and torch.equal(cache.values[0][0, :, 1], v[1, :, 0])
    written = torch.zeros(3, 8, dtype=torch.bool)
    written[2, 5] = written[0, 1] = True
    assert (cache.keys[0].abs().sum(dim=(1, 3)) > 0).equal(written)  # nothing else touched (buffers start at zero)
    assert k_all.shape == (2, N_HEADS, 6, 5) and torch.equal(k_all[0], cache.keys[0][2, :, :6])  # rows in view order
    assert view.attention_mask()[:, 0, 0].tolist() == [[True] * 6, [True, True] + [False] * 4]


def test_kv_cache_slot_range_reads_a_view_without_copying():
    cache = KVCache(n_layers=1, n_slots=2, max_len=4)
    view = KVCacheView(cache, torch.arange(2), torch.tensor([[0], [0]]), key_len=1, slot_range=(0, 2), causal_only=True)
    k_all, _ = view.update(0, torch.randn(2, N_HEADS, 1, 3), torch.randn(2, N_HEADS, 1, 3))
    assert k_all.data_ptr() == cache.keys[0].data_ptr() and view.attention_mask() is None


def test_kv_cache_takes_dtype_of_keys():
    cache = KVCache(n_layers=1, n_slots=1, max_len=4)
    k = torch.randn(1, 2, 1, 3, dtype=torch.bfloat16)
    KVCacheView(cache, torch.tensor([0]), torch.tensor([[0]]), key_len=1).update(0, k, k)
    assert cache.keys[0].dtype == torch.bfloat16


def test_incremental_attention_with_cache_matches_full(attention):
    x = torch.randn(2, 6, D_MODEL)
    full = attention(x)
    cache = KVCache(n_layers=1, n_slots=2, max_len=6)
    slots = torch.tensor([1, 0])
    fresh = KVCacheView(cache, slots, torch.arange(4).expand(2, 4), key_len=0)  # new sequences: causal over the chunk
    prefill = attention(x[:, :4], fresh.attention_mask(), kv_cache=fresh)
    steps = []
    for t in (4, 5):
        view = KVCacheView(cache, slots, torch.tensor([[t], [t]]), key_len=t + 1)
        steps.append(attention(x[:, t:t + 1], view.attention_mask(), kv_cache=view))
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
