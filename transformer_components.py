"""GPT-2 building blocks: causal self-attention, MLP, pre-LN decoder layer and a preallocated KV cache.

Module and parameter names follow Hugging Face's GPT-2 (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``,
``ln_2``) so real GPT-2 weights map one to one. Every projection is a plain ``nn.Linear`` so INT8
replacements can be swapped in module by module.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Preallocated per-layer keys/values of shape (batch, n_heads, max_len, head_dim) plus a write position.

    One forward call on a chunk of T tokens goes: ``extend_padding(mask)`` (model), ``update(i, k, v)``
    for every layer i (attention), then ``advance(T)`` (model). Buffers are allocated on the first
    ``update`` of each layer, with the dtype and device of the keys written (so autocast just works).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int):
        self.n_layers, self.batch_size, self.max_len = n_layers, batch_size, max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.key_valid: torch.Tensor | None = None  # (batch, max_len) bool: False = padding key
        self.has_padding = False
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (batch, n_heads, T, head_dim) keys/values at the current position; return views of all so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed but the cache holds {self.max_len}; "
                             "create the KVCache with a larger max_len")
        if self.keys[layer_idx] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.keys[layer_idx] = k.new_empty(shape)
            self.values[layer_idx] = v.new_empty(shape)
        cache_k, cache_v = self.keys[layer_idx], self.values[layer_idx]
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]

    def extend_padding(self, attention_mask: torch.Tensor | None, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Record which of the next n_tokens keys are real; return (batch, length + n_tokens) validity, or None if no padding."""
        end = self.length + n_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed but the cache holds {self.max_len}; "
                             "create the KVCache with a larger max_len")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if attention_mask is None and not self.has_padding:
            return None
        if self.key_valid is None:
            self.key_valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=device)
        if not self.has_padding:  # keys written before the first padded chunk were all real
            self.key_valid[:, :self.length] = True
            self.has_padding = True
        self.key_valid[:, self.length:end] = True if attention_mask is None else attention_mask.bool()
        return self.key_valid[:, :end]

    def advance(self, n_tokens: int) -> None:
        """Move the write position past the chunk every layer has just written."""
        self.length += n_tokens

    def reset(self) -> None:
        """Forget the contents (buffers are kept and reused)."""
        self.length = 0
        self.has_padding = False


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a fused q/k/v projection, on F.scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        """x: (B, T, C). attn_mask: boolean (B or 1, 1, T, keys), True = attend; None = plain causal.

        None is only valid when queries and keys start at the same position (no cache, or an empty one)
        or when there is a single query (one decode step), which attends to every cached key.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForwardNetwork(nn.Module):
    """Position-wise MLP: Linear -> GELU (tanh approximation, as GPT-2) -> Linear -> dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class TransformerDecoderLayer(nn.Module):
    """Pre-LayerNorm GPT-2 block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 bias: bool = True, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.mlp = FeedForwardNetwork(d_model, d_ff, dropout, bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer_idx)
        return x + self.mlp(self.ln_2(x))
