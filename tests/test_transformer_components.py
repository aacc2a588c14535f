"""Attention (multi-head, grouped-query, q/k norms), rotary positions, RMSNorm, the MLPs, the decoder layer and the KV
cache against naive reference implementations and hand-worked examples."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_components import (FeedForwardNetwork, KVCache, KVCacheView, MultiHeadAttention, RotaryEmbedding,
                                    SwiGLUFeedForward, TransformerDecoderLayer, apply_rotary, make_norm)

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


# ----------------------------------------------------------------------------- rotary positions, RMSNorm, GQA

def test_rotary_rotates_each_pair_by_theta_times_position():
    """head_dim 4, theta 100: dims (0, 2) turn by pos rad, dims (1, 3) by pos / 10 rad (100^(-2/4)); hand-worked."""
    rotary = RotaryEmbedding(head_dim=4, max_len=8, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    for pos in (0, 1, 5):
        got = apply_rotary(x, *rotary(torch.tensor([[pos]])))[0, 0, 0]
        a, b = pos, pos / 10
        expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                    3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
        torch.testing.assert_close(got, torch.tensor(expected))


def test_rotary_scores_depend_only_on_the_distance_and_scaling_interpolates_positions():
    torch.manual_seed(0)
    rotary, q, k = RotaryEmbedding(16, 64), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int, emb: RotaryEmbedding = rotary) -> torch.Tensor:
        rq, rk = apply_rotary(q, *emb(torch.tensor([[m]]))), apply_rotary(k, *emb(torch.tensor([[n]])))
        return (rq * rk).sum()

    for shift in (1, 7, 40):
        torch.testing.assert_close(score(9 + shift, 3 + shift), score(9, 3), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(9, 3), score(9, 4))
    stretched = RotaryEmbedding(16, 64, scale=2.0)
    torch.testing.assert_close(score(18, 6, stretched), score(9, 3), atol=1e-5, rtol=1e-5)


def test_rmsnorm_is_the_textbook_formula():
    torch.manual_seed(0)
    norm = make_norm("rmsnorm", 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    reference = torch.nn.RMSNorm(8, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), reference(x))
    assert norm(x.bfloat16()).dtype == torch.bfloat16 and isinstance(make_norm("layernorm", 8, 1e-5), nn.LayerNorm)


def gqa_reference(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Textbook causal attention whose key/value heads are repeated for each query head of their group."""
    B, T, C = x.shape
    hd, n_kv = attn.head_dim, attn.n_kv_heads
    q, k, v = (x @ attn.c_attn.weight.T).split([C, n_kv * hd, n_kv * hd], dim=2)
    q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
    group = attn.n_heads // n_kv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ attn.c_proj.weight.T


def test_grouped_query_attention_equals_multi_head_attention_with_repeated_key_value_heads():
    torch.manual_seed(0)
    grouped = MultiHeadAttention(D_MODEL, N_HEADS, bias=False, n_kv_heads=2).eval()
    assert grouped.c_attn.weight.shape == ((N_HEADS + 2 * 2) * 8, D_MODEL)
    x = torch.randn(2, 7, D_MODEL)
    torch.testing.assert_close(grouped(x), gqa_reference(grouped, x), atol=1e-5, rtol=1e-5)
    full = MultiHeadAttention(D_MODEL, N_HEADS, bias=False).eval()  # n_kv_heads == n_heads: plain MHA
    q, k, v = grouped.c_attn.weight.split([32, 16, 16])
    with torch.no_grad():
        full.c_attn.weight.copy_(torch.cat([q, k.view(2, 8, -1).repeat_interleave(2, 0).reshape(32, -1),
                                            v.view(2, 8, -1).repeat_interleave(2, 0).reshape(32, -1)]))
        full.c_proj.weight.copy_(grouped.c_proj.weight)
    torch.testing.assert_close(full(x), grouped(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full(x), naive_attention_without_bias(full, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=3)


def naive_attention_without_bias(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    return gqa_reference(attn, x)  # with n_kv_heads == n_heads the repeat is the identity


def test_qk_norm_normalises_each_head_of_queries_and_keys_before_the_rotation():
    torch.manual_seed(0)
    attn = MultiHeadAttention(D_MODEL, N_HEADS, bias=False, n_kv_heads=2, qk_norm=True, norm_eps=1e-6).eval()
    torch.nn.init.normal_(attn.q_norm.weight)
    torch.nn.init.normal_(attn.k_norm.weight)
    x = torch.randn(1, 5, D_MODEL)
    rope = RotaryEmbedding(8, 16)(torch.arange(5)[None])
    q, k, v = attn.c_attn(x).split([32, 16, 16], dim=2)
    rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    q = apply_rotary(rms(q.view(1, 5, 4, 8), attn.q_norm.weight).transpose(1, 2), *rope)
    k = apply_rotary(rms(k.view(1, 5, 2, 8), attn.k_norm.weight).transpose(1, 2), *rope)
    v = v.view(1, 5, 2, 8).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    expected = attn.c_proj(y.transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(attn(x, rope=rope), expected, atol=1e-5, rtol=1e-5)


def test_swiglu_is_silu_gate_times_up():
    torch.manual_seed(0)
    mlp = SwiGLUFeedForward(D_MODEL, 48, bias=False)
    x = torch.randn(2, 3, D_MODEL)
    gate, up = mlp.c_fc.weight[:48], mlp.c_fc.weight[48:]
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ mlp.c_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_the_kv_cache_holds_only_the_key_value_heads(n_kv_heads):
    """Bytes per token per slot: 2 (keys, values) x n_kv_heads x head_dim x 4 bytes, n_heads / n_kv_heads less."""
    attn = MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads).eval()
    cache = KVCache(n_layers=1, n_slots=3, max_len=10)
    view = KVCacheView(cache, torch.tensor([0, 2]), torch.arange(4).expand(2, 4), key_len=0)
    attn(torch.randn(2, 4, D_MODEL), kv_cache=view)
    per_token_per_slot = (cache.keys[0].nbytes + cache.values[0].nbytes) / (3 * 10)
    assert per_token_per_slot == 2 * n_kv_heads * (D_MODEL // N_HEADS) * 4


def test_the_ignored_label_is_torchs_and_the_prompt_renderers():
    """The model's loss skips torch's ignore_index; the torch-free renderer labels prompt tokens with the same value."""
    import loss_labels
    import transformer_components

    assert transformer_components.IGNORE_INDEX == loss_labels.IGNORE_INDEX == -100
