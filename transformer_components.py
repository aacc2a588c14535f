"""Decoder building blocks: causal self-attention (multi-head or grouped-query, optional rotary positions and q/k
RMSNorm), the MLPs (GELU, SwiGLU), the pre-norm decoder layer (LayerNorm or RMSNorm), rotary embeddings with cached
cos/sin, a preallocated KV cache, and the next-token log-prob arithmetic on the LM head that the model's loss needs
(shifted cross-entropy, summed log-probs from hidden states; labels ``IGNORE_INDEX`` are not scored).

Module and parameter names follow Hugging Face's GPT-2 (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``, ``ln_2``) so real
GPT-2 weights map one to one; the modern options keep those names (``c_attn`` stays one fused q/k/v projection, of
width (n_heads + 2 n_kv_heads) head_dim with grouped-query attention; SwiGLU's ``c_fc`` is the gate and up projections
fused). Every projection is a plain ``nn.Linear`` so INT8 replacements can be swapped in module by module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# torch's own label convention (cross_entropy's default ignore_index): a label the loss skips; loss_labels holds
# the same value for the torch-free prompt renderer (a test keeps them equal)
IGNORE_INDEX = nn.CrossEntropyLoss().ignore_index


class KVCache:
    """Preallocated keys/values for n_slots independent sequences, per layer (n_slots, n_kv_heads, max_len, head_dim):
    with grouped-query attention it holds only the key/value heads, n_heads / n_kv_heads times less per token.

    Slots share no length: every forward pass says, through a KVCacheView, which slot each row uses and at
    which positions its new tokens go; keys are written there in place (no torch.cat). Buffers are allocated
    on the first write of each layer with the dtype and device of the keys (so autocast just works) and
    zero-filled: masked-out positions still enter the attention product with weight 0, and 0 * NaN is NaN.
    """

    def __init__(self, n_layers: int, n_slots: int, max_len: int):
        self.n_layers, self.n_slots, self.max_len = n_layers, n_slots, max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def buffers(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (keys, values) buffers, allocated like `like` (batch, n_kv_heads, T, head_dim) on first use."""
        if self.keys[layer_idx] is None:
            shape = (self.n_slots, like.size(1), self.max_len, like.size(3))
            self.keys[layer_idx] = like.new_zeros(shape)
            self.values[layer_idx] = like.new_zeros(shape)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class KVCacheView:
    """Where one forward pass of B rows x T new tokens writes and reads in a KVCache.

    slots: (B,) slot of each row. positions: (B, T) position of each new token in its slot (also its
    position embedding, or its rotary angle: keys are cached rotated). key_len: cached positions attention reads, a
    host int (largest position + 1); 0 means every row starts a new sequence at position 0, so attention runs
    causally over the chunk itself (right padding is then harmless: real tokens never see the padding after them).
    slot_range=(lo, hi) says the rows are slots lo..hi-1 in order, so the cache is read through a view instead of a
    gather.
    causal_only: all rows are at the same length with one new token, so no mask is needed.
    writes: (B,) bool, the rows whose keys/values are written; the others (rows computed only to keep shapes static,
    for free slots) leave their slot as it was. None: every row writes.
    """

    cache: KVCache
    slots: torch.Tensor
    positions: torch.Tensor
    key_len: int
    slot_range: tuple[int, int] | None = None
    causal_only: bool = False
    writes: torch.Tensor | None = None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, n_kv_heads, T, head_dim) keys/values at each row's positions; return the keys/values to read."""
        cache_k, cache_v = self.cache.buffers(layer_idx, k)
        rows = self.slots[:, None]
        new_k, new_v = k.transpose(1, 2).to(cache_k.dtype), v.transpose(1, 2).to(cache_v.dtype)
        if self.writes is not None:  # a row that must not write puts back what its slot holds (no data-dependent shape)
            keep = ~self.writes[:, None, None, None]
            new_k = torch.where(keep, cache_k[rows, :, self.positions], new_k)
            new_v = torch.where(keep, cache_v[rows, :, self.positions], new_v)
        cache_k[rows, :, self.positions] = new_k
        cache_v[rows, :, self.positions] = new_v
        if self.key_len == 0:
            return k, v
        if self.slot_range is not None:
            lo, hi = self.slot_range
            return cache_k[lo:hi, :, :self.key_len], cache_v[lo:hi, :, :self.key_len]
        return cache_k[self.slots, :, :self.key_len], cache_v[self.slots, :, :self.key_len]

    def attention_mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, key_len): a query sees its slot's keys up to its own position; None if causal is exact."""
        if self.key_len == 0 or self.causal_only:
            return None
        key_pos = torch.arange(self.key_len, device=self.positions.device)
        return (key_pos <= self.positions[:, :, None])[:, None]


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned", "rope")


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm computed in float32 whatever the input's dtype (as Llama's and Qwen3's): under bf16 autocast
    the input is bf16 and the gain float32, a mix torch's fused kernel refuses; the result is cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """LayerNorm (GPT-2's, with a bias unless ``bias=False``) or RMSNorm (Llama's: a gain, no mean, no bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) in Llama's half-split layout: dimension i of a head pairs with
    i + head_dim/2 and the pair is rotated by ``position * theta^(-2i/head_dim)``. cos/sin are computed once for every
    position (buffers, not weights: nothing to save); ``scale`` > 1 is linear position interpolation (a model trained
    on n positions reads scale * n: position p is rotated as p / scale)."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0, scale: float = 1.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings rotate pairs of dimensions: head_dim must be even, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim) / scale
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # both halves of a pair share the angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, 1, T, head_dim), of the (B or 1, T) positions: what ``apply_rotary`` takes."""
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys by their positions' angles (``RotaryEmbedding``'s cos, sin)."""
    half = x.size(-1) // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Causal self-attention with a fused q/k/v projection, on F.scaled_dot_product_attention.

    ``n_kv_heads`` < ``n_heads`` is grouped-query attention: each key/value head serves n_heads / n_kv_heads query
    heads, so the projection (and the KV cache) holds n_kv_heads key and value heads. ``qk_norm`` applies an RMSNorm
    over each query and key head before the rotation (Qwen3's). Rotary positions come in as ``rope``=(cos, sin).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 n_kv_heads: int | None = None, qk_norm: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = n_heads, n_kv_heads, d_model // n_heads, dropout
        self.c_attn = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.qk_norm = qk_norm
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCacheView | None = None, layer_idx: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, T, C). attn_mask: boolean (B or 1, 1, T, keys), True = attend; None = plain causal.

        None is only valid when queries and keys start at the same position (no cache, or a new sequence in
        the cache) or when there is a single query that attends to every key the cache returns.
        """
        B, T, C = x.shape
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T > 1, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


ACTIVATIONS = {"gelu_tanh": "tanh", "gelu": "none"}  # GPT-2's tanh approximation; the exact erf GELU (nanoGPT's)


class FeedForwardNetwork(nn.Module):
    """Position-wise MLP: Linear -> GELU (tanh approximation, as GPT-2, or exact) -> Linear -> dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu_tanh"):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.approximate = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class SwiGLUFeedForward(nn.Module):
    """Gated MLP (Shazeer 2020, Llama's): c_proj(silu(gate) * up), with ``c_fc`` the gate (rows 0..d_ff) and up
    (rows d_ff..2 d_ff) projections fused into one matmul."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class TransformerDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); GPT-2's with the defaults, Llama/Qwen3's with
    norm="rmsnorm", mlp="swiglu", grouped-query heads and q/k norms."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 bias: bool = True, layer_norm_eps: float = 1e-5, activation: str = "gelu_tanh", *,
                 n_kv_heads: int | None = None, norm: str = "layernorm", qk_norm: bool = False, mlp: str = "gelu"):
        super().__init__()
        self.ln_1 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout, bias, n_kv_heads, qk_norm, layer_norm_eps)
        self.ln_2 = make_norm(norm, d_model, layer_norm_eps, bias)
        self.mlp = SwiGLUFeedForward(d_model, d_ff, dropout, bias) if mlp == "swiglu" else \
            FeedForwardNetwork(d_model, d_ff, dropout, bias, activation)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCacheView | None = None, layer_idx: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer_idx, rope)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- next-token log-probs


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: ``labels[:, t + 1]``, and -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` (labels aligned with the inputs), -100 ignored.

    The labels are shifted, not the logits: slicing (B, T, V) logits would copy them (and their gradient) once more
    per step; the last position gets label -100 instead.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted_targets(labels).flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def hidden_logprobs(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probs of the labelled tokens from final hidden states (B, T, C), ``labels[:, t + 1]``
    predicted at t, the LM head applied only at those positions (a row with none scored gets 0)."""
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    scored = targets != IGNORE_INDEX
    picked = -F.cross_entropy(lm_head(hidden[scored]).float(), targets[scored], reduction="none")
    return torch.zeros(hidden.size(0), device=picked.device).index_add(0, scored.nonzero()[:, 0], picked)
