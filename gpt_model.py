"""Decoder-only GPT: ``GPTConfig`` (+ presets) and ``GPTModel`` (forward, loss, FLOP accounting). GPT-2's shape by
default (learned positions, LayerNorm, GELU, multi-head attention, biases, tied head); the config's options give the
modern decoder shape of Llama / Qwen3 / nanochat (rotary positions, RMSNorm, q/k norms, SwiGLU, grouped-query
attention, no biases, an untied head) in the same class. Nothing else, and it imports only torch,
``transformer_components``: generation is the decode engine's (``decoding.generate``, above the
model, as nanochat's engine.py), checkpoints live in ``checkpoints.py``, the reward/classifier heads in
``model_heads.py``, Hugging Face conversion in ``hf_models.py``, devices and precision in ``devices.py``.

Weights use Hugging Face GPT-2 names (``transformer.h.0.attn.c_attn.weight`` ...) with nn.Linear layouts, so real
GPT-2 weights load with only the Conv1D matrices transposed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn

from transformer_components import (ACTIVATIONS, IGNORE_INDEX, MLPS, NORMS, POSITION_EMBEDDINGS, KVCacheView,
                                    RotaryEmbedding, TransformerDecoderLayer, hidden_logprobs, make_norm,
                                    shifted_cross_entropy, shifted_targets)

# ----------------------------------------------------------------------------- config


@dataclass
class GPTConfig:
    """Model shape; the defaults are GPT-2 small (124M). pad_token_id fills finished rows in decoding.generate.

    The architecture options (defaults: GPT-2's): pos_embedding "learned" (a position table) or "rope" (rotary, base
    rope_theta; rope_scaling > 1 stretches a trained context by linear position interpolation); norm "layernorm" or
    "rmsnorm" (layer_norm_eps is either's epsilon); qk_norm (RMSNorm on each query and key head, Qwen3's); mlp
    "gelu" (``activation`` picks the GELU) or "swiglu" (d_ff is then the gated hidden width); n_kv_heads < n_heads
    for grouped-query attention (None: n_heads); bias on every projection and LayerNorm; tie_embeddings (the LM head
    is the token embedding).
    """

    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_seq_len: int = 1024
    dropout: float = 0.0
    bias: bool = True
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2's; "gelu" is the exact GELU (nanoGPT's, a little cheaper on CPU)
    pos_embedding: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    n_kv_heads: int | None = None
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"GPTConfig.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size "
                             f"({self.vocab_size})")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        self._check_architecture()

    def _check_architecture(self) -> None:
        for name, choices in (("pos_embedding", POSITION_EMBEDDINGS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads  # full multi-head attention, stored explicitly
        if isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0 \
                or self.n_heads % self.n_kv_heads:
            raise ValueError(f"GPTConfig.n_kv_heads must be a positive divisor of n_heads ({self.n_heads}), "
                             f"got {self.n_kv_heads!r}")
        for name in ("rope_theta", "rope_scaling"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)) \
                    or not getattr(self, name) > 0:
                raise ValueError(f"GPTConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions rotate pairs: d_model / n_heads ({self.head_dim}) must be even")
        for name in ("qk_norm", "tie_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def architecture(self) -> str:
        """The shape in words: "GPT-2", or the options that differ from it (what ``checkpoints.describe`` says)."""
        parts = [part for part, on in (
            ("rope", self.pos_embedding == "rope"), ("rmsnorm", self.norm == "rmsnorm"), ("qk_norm", self.qk_norm),
            ("swiglu", self.mlp == "swiglu"), (f"gqa {self.n_heads}q/{self.n_kv_heads}kv heads",
                                               self.n_kv_heads != self.n_heads),
            ("no bias", not self.bias), ("untied head", not self.tie_embeddings)) if on]
        if self.rope_scaling != 1.0:
            parts.append(f"rope x{self.rope_scaling:g} positions")
        return " + ".join(parts) if parts else "GPT-2"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named shape (``PRESETS``: tiny, gpt2..gpt2-xl, modern-tiny, modern..modern-large) with any field
        overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields, less the architecture options left at GPT-2's values: a GPT-2 file reads as it always did,
        also by code older than the options (``from_dict`` fills them back in)."""
        gpt2 = {**{k: GPTConfig.__dataclass_fields__[k].default for k in ARCHITECTURE_OPTIONS},
                "n_kv_heads": self.n_heads}  # full attention: as many kv heads as query heads
        return {k: v for k, v in asdict(self).items() if not (k in ARCHITECTURE_OPTIONS and v == gpt2[k])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {', '.join(unknown)}; "
                             f"valid fields: {', '.join(sorted(known))}")
        return cls(**d)


def swiglu_hidden(d_model: int) -> int:
    """SwiGLU's hidden width for a GPT-2-sized MLP budget: three d x f matrices ~ two d x 4d ones, f ~ 8/3 d, rounded
    up to a multiple of 32 (Llama's rule, at a finer multiple)."""
    return -(-8 * d_model // 3 // 32) * 32


# Llama / Qwen3's decoder shape: rotary positions, RMSNorm, q/k norms, SwiGLU, half as many key/value heads, no biases.
# the options added to GPT-2's shape (each GPT-2's by default)
ARCHITECTURE_OPTIONS = ("pos_embedding", "rope_theta", "rope_scaling", "norm", "qk_norm", "mlp", "n_kv_heads",
                        "tie_embeddings")
MODERN = dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=256),
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024),
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=1024),
    "gpt2-large": dict(d_model=1280, n_layers=36, n_heads=20, d_ff=5120, max_seq_len=1024),
    "gpt2-xl": dict(d_model=1600, n_layers=48, n_heads=25, d_ff=6400, max_seq_len=1024),
    "modern-tiny": dict(MODERN, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=swiglu_hidden(128),
                        max_seq_len=256),
    "modern": dict(MODERN, d_model=768, n_layers=12, n_heads=12, n_kv_heads=6, d_ff=swiglu_hidden(768),
                   max_seq_len=1024),
    "modern-medium": dict(MODERN, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, d_ff=swiglu_hidden(1024),
                          max_seq_len=1024),
    "modern-large": dict(MODERN, d_model=1280, n_layers=36, n_heads=20, n_kv_heads=10, d_ff=swiglu_hidden(1280),
                         max_seq_len=1024),
}

# ----------------------------------------------------------------------------- model


def grown_rows(weight: torch.Tensor, rows: int, generator: torch.Generator) -> nn.Parameter:
    """``weight`` (n, d) with rows appended up to ``rows``, drawn around the existing rows' mean and per-dim std."""
    noise = torch.randn(rows - weight.size(0), weight.size(1), generator=generator).to(weight)
    grown = torch.cat([weight, weight.mean(0) + noise * weight.std(0)])
    return nn.Parameter(grown, requires_grad=weight.requires_grad)


class GPTModel(nn.Module):
    """Token embedding (+ learned positions, or rotary positions inside attention), N pre-norm decoder layers, a final
    norm, and the LM head (tied to the token embedding unless ``tie_embeddings=False``)."""

    def __init__(self, config: GPTConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = GPTConfig.from_dict(kwargs)
        elif kwargs:
            config = GPTConfig.from_dict({**config.to_dict(), **kwargs})
        self.config = config
        learned = config.pos_embedding == "learned"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            **({"wpe": nn.Embedding(config.max_seq_len, config.d_model)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(
                TransformerDecoderLayer(config.d_model, config.n_heads, config.d_ff, config.dropout,
                                        config.bias, config.layer_norm_eps, config.activation,
                                        n_kv_heads=config.n_kv_heads, norm=config.norm, qk_norm=config.qk_norm,
                                        mlp=config.mlp)
                for _ in range(config.n_layers)
            ),
            ln_f=make_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias),
        ))
        self.rotary = None if learned else \
            RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)  # GPT-2: keep the residual stream's variance flat
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int, seed: int = 0) -> None:
        """Add token rows (new special tokens) to the token embedding and LM head (one table when tied). Each new row
        is drawn from a normal with the existing rows' mean and per-dimension std: distinct, and as likely as a
        typical token at first."""
        old = self.transformer.wte.weight
        if vocab_size < old.size(0):
            raise ValueError(f"grow_vocab cannot shrink the vocabulary from {old.size(0)} to {vocab_size}")
        generator = torch.Generator().manual_seed(seed)
        wte = nn.Embedding(vocab_size, old.size(1)).to(old)
        wte.weight = grown_rows(old, vocab_size, generator)
        self.transformer.wte = wte
        head = self.lm_head.weight
        self.lm_head = nn.Linear(old.size(1), vocab_size, bias=False).to(old)
        self.lm_head.weight = wte.weight if self.config.tie_embeddings else grown_rows(head, vocab_size, generator)
        self.config = replace(self.config, vocab_size=vocab_size)

    @torch.no_grad()
    def extend_context(self, max_seq_len: int) -> None:
        """Read ``max_seq_len`` positions with a rotary model trained on fewer: linear position interpolation
        (Chen et al. 2023), positions scaled by old / new, the factor kept in ``rope_scaling``; the weights are
        unchanged. A learned position table has no rows to interpolate: that is an error."""
        old = self.config.max_seq_len
        if max_seq_len <= old:
            return
        if self.rotary is None:
            raise ValueError(f"a model with learned positions reads at most its {old} positions (its position table); "
                             f"only a rotary model (pos_embedding='rope') extends to {max_seq_len}")
        scaling = self.config.rope_scaling * max_seq_len / old
        self.config = replace(self.config, max_seq_len=max_seq_len, rope_scaling=scaling)
        device = self.rotary.cos.device
        self.rotary = RotaryEmbedding(self.config.head_dim, max_seq_len, self.config.rope_theta, scaling).to(device)

    # ------------------------------------------------------------------ forward

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, key_len: int) -> None:
        """ValueError unless input_ids is a 2-D integer tensor of in-vocabulary ids that fits the context after
        ``key_len`` cached positions, with an attention_mask of the same shape (the engine checks prompts here too)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool or input_ids.is_complex():
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            dtype = input_ids.dtype if isinstance(input_ids, torch.Tensor) else None
            raise ValueError(f"input_ids must be a 2-D integer tensor (batch, seq_len), got {shape} {dtype}; "
                             "add a batch dimension with input_ids.unsqueeze(0)")
        total = max(key_len, input_ids.size(1))
        if total > self.config.max_seq_len:
            raise ValueError(f"sequence length {total} exceeds max_seq_len {self.config.max_seq_len}; "
                             "truncate the input (tokenizer max_seq_len) or use a model with a longer context")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        # On CUDA this check would force a sync per call; a compiled decode step feeds back the model's own tokens.
        if not input_ids.is_cuda and input_ids.numel() > 0 and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token id {high if high >= self.config.vocab_size else low} is outside the "
                                 f"vocabulary [0, {self.config.vocab_size}); the tokenizer does not match this model")

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, kv_cache: KVCacheView | None = None) -> torch.Tensor:
        """Final (post-ln_f) hidden states (B, T, d_model).

        With a kv_cache (a KVCacheView, see decoding.py) each row's keys go to its own cache slot and the
        view's positions are the position ids; rows are never padded on the left there, so no attention_mask.
        """
        self.check_inputs(input_ids, attention_mask, kv_cache.key_len if kv_cache is not None else 0)
        B, T = input_ids.shape
        device = input_ids.device
        if kv_cache is not None:
            if attention_mask is not None:
                raise ValueError("with a kv_cache the view's per-row positions replace the attention_mask; pass none")
            position_ids, attn_mask = kv_cache.positions, kv_cache.attention_mask()
        else:
            key_valid = self._padding_to_mask(attention_mask)
            if position_ids is None:
                if key_valid is None:
                    position_ids = torch.arange(T, device=device).unsqueeze(0)
                else:  # left padding: each row counts its own real tokens
                    position_ids = (key_valid.long().cumsum(dim=1) - 1).clamp(min=0)
            attn_mask = self._attention_mask(key_valid, T, device)
        x = self.transformer.wte(input_ids)
        rope = None
        if self.rotary is None:
            x = x + self.transformer.wpe(position_ids)
        else:  # rotated inside attention; cached keys were rotated at their own positions
            rope = self.rotary(position_ids)
        x = self.transformer.drop(x)
        for layer_idx, layer in enumerate(self.transformer.h):
            x = layer(x, attn_mask, kv_cache, layer_idx, rope)
        return self.transformer.ln_f(x)

    @staticmethod
    def _padding_to_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The key validity to enforce, or None when plain causal attention is already exact for real tokens.

        That is the case without padding and with right padding (real tokens first): causal attention
        never lets a real token see the padding after it, and SDPA keeps its fast is_causal kernel.
        """
        if attention_mask is None:
            return None
        valid = attention_mask.bool()
        if bool(valid[:, 0].all() & ~(valid[:, 1:] & ~valid[:, :-1]).any()):
            return None
        return valid

    @staticmethod
    def _attention_mask(key_valid: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (B, 1, T, T) causal mask that also hides padding keys, or None when SDPA's causal path is exact."""
        if key_valid is None:
            return None
        pos = torch.arange(T, device=device)
        # Every query may see itself, so padding rows never get an all-masked row (NaN in softmax).
        mask = (pos[None, :] <= pos[:, None]) & key_valid[:, None, :] | (pos[None, :] == pos[:, None])
        return mask[:, None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCacheView | None = None, output_hidden_states: bool = False,
                loss_only: bool = False) -> dict[str, torch.Tensor | None]:
        """logits (B, T, V); loss = mean CE of logits[:, t] vs labels[:, t + 1] over labels != -100
        (None without labels).

        ``loss_only=True`` (with labels) applies the LM head only at the scored positions and returns no logits: the
        same loss, but SFT-style batches, where a few answer tokens are scored, skip most of the (B, T, V) work; it
        also returns ``sequence_logprobs``, each row's summed log-probs of its labelled tokens (DPO's quantity).
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if loss_only and labels is not None:
            sequence_logprobs = hidden_logprobs(self.lm_head, hidden, labels)
            loss = -sequence_logprobs.sum() / (shifted_targets(labels) != IGNORE_INDEX).sum()
            out = {"logits": None, "loss": loss, "sequence_logprobs": sequence_logprobs}
        else:
            logits = self.lm_head(hidden)
            out = {"logits": logits, "loss": shifted_cross_entropy(logits, labels) if labels is not None else None}
        if output_hidden_states:
            out["hidden_states"] = hidden
        return out

    # ------------------------------------------------------------------ accounting

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """The model's weights (a tied lm_head counted once), from its shape, so a model whose layers were prepacked
        or quantized for inference reports the same number; adapters (LoRA) are not counted.

        exclude_embeddings drops the lookups (no FLOPs): the position table, and the token table when the head is
        untied; a tied token table stays because it doubles as lm_head, a real matmul (nanoGPT's convention).
        """
        c, bias = self.config, int(self.config.bias)
        d, f = c.d_model, c.d_ff
        norm = d * (1 + bias) if c.norm == "layernorm" else d  # RMSNorm: a gain only
        qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        attention = (qkv * d + qkv * bias) + (d * d + d * bias) + (2 * c.head_dim if c.qk_norm else 0)
        up = 2 * f if c.mlp == "swiglu" else f  # SwiGLU's gate and up projections
        mlp = (up * d + up * bias) + (d * f + d * bias)
        token_table = c.vocab_size * d
        n = token_table + c.n_layers * (2 * norm + attention + mlp) + norm
        if not c.tie_embeddings:
            n += c.vocab_size * d  # the head's own matrix
        if exclude_embeddings:
            return n if c.tie_embeddings else n - token_table
        return n + (c.max_seq_len * d if c.pos_embedding == "learned" else 0)

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layers * d_model * seq_len (PaLM appendix B).
        The attention term counts the query heads (n_heads x head_dim = d_model): grouped-query attention shares
        key/value heads, not the score and weighted-sum products."""
        seq_len = seq_len or self.config.max_seq_len
        n = self.num_parameters(exclude_embeddings=True)
        return 6 * n + 12 * self.config.n_layers * self.config.d_model * seq_len

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak (e.g. 989e12 for H100 bf16)."""
        return self.estimate_flops_per_token(seq_len) * tokens_per_sec / peak_flops
