"""Decoder-only GPT (GPT-2 architecture): config, model, generation, checkpoints and device/precision helpers.

Weights use Hugging Face GPT-2 names (``transformer.h.0.attn.c_attn.weight`` ...) with nn.Linear
layouts, so ``GPTModel.from_hf_gpt2`` only transposes the Conv1D matrices.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic_file import atomic_path
from metrics import IGNORE_INDEX, hidden_logprobs, shifted_cross_entropy, shifted_targets
from transformer_components import ACTIVATIONS, KVCacheView, TransformerDecoderLayer

# ----------------------------------------------------------------------------- device / precision


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" -> cuda if available, else mps, else cpu; otherwise the named device (checked to exist)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu (or auto)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu (or auto)")
    return resolved


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """"auto"/None -> bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 elsewhere; else the named dtype."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32/fp32, bfloat16/bf16 or float16/fp16")
    return _DTYPE_NAMES[dtype]


def autocast_context(device: str | torch.device, dtype: torch.dtype):
    """torch.autocast for bf16/fp16 (weights stay fp32), a no-op context for fp32."""
    device = torch.device(device)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- config


def configure_optimizer(module: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                        device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters: decay on 2-D weights (matmuls, embeddings), none on biases and norms.

    The fused kernel on CPU and CUDA: one pass over each tensor instead of a handful of ops per parameter (on CPU it
    takes 1% off a 6 x 384 training step, what nanoGPT's per-parameter loop costs more)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))


@dataclass
class GPTConfig:
    """Model shape; the defaults are GPT-2 small (124M). pad_token_id fills finished rows in generate."""

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

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named size (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl) with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {', '.join(unknown)}; "
                             f"valid fields: {', '.join(sorted(known))}")
        return cls(**d)


PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=256),
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024),
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=1024),
    "gpt2-large": dict(d_model=1280, n_layers=36, n_heads=20, d_ff=5120, max_seq_len=1024),
    "gpt2-xl": dict(d_model=1600, n_layers=48, n_heads=25, d_ff=6400, max_seq_len=1024),
}

# ----------------------------------------------------------------------------- model


class GPTModel(nn.Module):
    """Token + position embeddings, N pre-LN decoder layers, final LayerNorm, lm_head tied to the token embedding."""

    def __init__(self, config: GPTConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = GPTConfig.from_dict(kwargs)
        elif kwargs:
            config = GPTConfig.from_dict({**config.to_dict(), **kwargs})
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            wpe=nn.Embedding(config.max_seq_len, config.d_model),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(
                TransformerDecoderLayer(config.d_model, config.n_heads, config.d_ff, config.dropout,
                                        config.bias, config.layer_norm_eps, config.activation)
                for _ in range(config.n_layers)
            ),
            ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
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

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, key_len: int) -> None:
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
        self._check_inputs(input_ids, attention_mask, kv_cache.key_len if kv_cache is not None else 0)
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
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        for layer_idx, layer in enumerate(self.transformer.h):
            x = layer(x, attn_mask, kv_cache, layer_idx)
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

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_gen_len: int = 100,
                 temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, do_sample: bool = True, eos_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.LongTensor:
        """Continue left-padded prompts; returns (B, prompt_len + new) with the prompt included.

        At most max_seq_len - prompt_len new tokens are produced (the context window is never exceeded).
        Rows that emitted eos_token_id are filled with pad_token_id; generation stops once all rows did.
        do_sample=False is greedy (temperature/top_k/top_p ignored). use_cache=False recomputes the
        whole sequence each step (slow; for verification and benchmarks). A thin wrapper over
        decoding.DecodeEngine, the project's one decode loop.
        """
        import decoding  # lazy: decoding imports this module

        self._check_inputs(input_ids, attention_mask, 0)
        self._check_generation_args(input_ids, max_gen_len, temperature, top_k, top_p, repetition_penalty, do_sample)
        n_new = min(max_gen_len, self.config.max_seq_len - input_ids.size(1))
        was_training = self.training
        try:
            return decoding.generate_padded(self, input_ids, attention_mask, n_new, temperature=temperature,
                                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                            do_sample=do_sample, eos_token_id=eos_token_id, use_cache=use_cache,
                                            generator=generator)
        finally:
            self.train(was_training)

    def _check_generation_args(self, input_ids: torch.Tensor, max_gen_len: int, temperature: float,
                               top_k: int | None, top_p: float, repetition_penalty: float, do_sample: bool) -> None:
        for name, value in (("max_gen_len", max_gen_len), ("top_k", top_k)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None = no top-k filter), got {top_k}")
        if input_ids.size(1) == 0:
            raise ValueError("generate needs a non-empty prompt; start it with the <s> token (tokenizer.bos_token_id)")
        if input_ids.size(1) >= self.config.max_seq_len:
            raise ValueError(f"prompt length {input_ids.size(1)} leaves no room to generate within max_seq_len "
                             f"{self.config.max_seq_len}; shorten the prompt")
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; "
                             "use do_sample=False for greedy")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")

    # ------------------------------------------------------------------ accounting and optimizer

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied lm_head counted once).

        exclude_embeddings drops the position table (a lookup, no FLOPs); the token table stays
        because it doubles as lm_head, a real matmul (nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layers * d_model * seq_len (PaLM appendix B)."""
        seq_len = seq_len or self.config.max_seq_len
        n = self.num_parameters(exclude_embeddings=True)
        return 6 * n + 12 * self.config.n_layers * self.config.d_model * seq_len

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak (e.g. 989e12 for H100 bf16)."""
        return self.estimate_flops_per_token(seq_len) * tokens_per_sec / peak_flops

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                            device_type: str = "cpu") -> torch.optim.AdamW:
        return configure_optimizer(self, weight_decay, lr, betas, device_type)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "GPTModel":
        """Build the model described by a checkpoint written with save_checkpoint and load its weights."""
        return _model_from_checkpoint(load_checkpoint(path, map_location), path).to(map_location)

    @classmethod
    def from_hf_gpt2(cls, path: str | os.PathLike) -> "GPTModel":
        """Load Hugging Face GPT-2 weights from a local folder (config.json + model.safetensors or
        pytorch_model.bin)."""
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file} not found; point to a local Hugging Face GPT-2 folder "
                                  "(config.json + model.safetensors or pytorch_model.bin)")
        config = config_from_hf_gpt2(json.loads(config_file.read_text(encoding="utf-8")))
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file
            hf_state = load_file(folder / "model.safetensors")
        elif (folder / "pytorch_model.bin").is_file():
            hf_state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {folder}")
        model = cls(config)
        _load_state_dict_checked(model, convert_hf_gpt2_state_dict(hf_state), str(folder))
        return model


# ----------------------------------------------------------------------------- Hugging Face GPT-2 conversion

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPTRewardModel(nn.Module):
    """A GPT backbone with a scalar head: a value for every position (PPO's critic) and a score per sequence, the
    value at its last real token (the reward model). Works with left or right padding.

    With ``likelihood=True`` the score also adds ``likelihood_weight`` (learned) x the answer's mean per-token
    log-prob under the backbone's own LM head, so the answer tokens must be passed as ``labels``. The head reads one
    hidden state at the end; the likelihood is what the SFT model already knows about every answer token (on the
    demo pairs it ranks near-miss sums right 99.8% of the time, the head alone 80%)."""

    def __init__(self, config: GPTConfig, likelihood: bool = False):
        super().__init__()
        self.config = config
        self.likelihood = likelihood
        self.backbone = GPTModel(config)
        self.head = nn.Linear(config.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(config.d_model + 1))
        nn.init.zeros_(self.head.bias)
        if likelihood:
            self.likelihood_weight = nn.Parameter(torch.ones(()))

    @classmethod
    def from_language_model(cls, model: GPTModel, likelihood_weight: float = 0.0) -> "GPTRewardModel":
        """A reward/value model whose backbone starts as a copy of ``model`` (e.g. the SFT model); a positive
        ``likelihood_weight`` adds the answer's likelihood to the score, starting at that weight."""
        reward = cls(model.config, likelihood=likelihood_weight > 0)
        reward.backbone.load_state_dict(model.state_dict())
        if reward.likelihood:
            reward.likelihood_weight.data.fill_(likelihood_weight)
        return reward.to(next(model.parameters()).device)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) scalar per position."""
        return self.head(self.backbone.hidden_states(input_ids, attention_mask)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B,) score of each sequence: the value at its last real token (+ the likelihood term). With ``labels``
        (B, T; the answer's tokens, -100 elsewhere) also the backbone's (B,) summed log-probs of the labelled
        tokens, from the same pass."""
        if self.likelihood and labels is None:
            raise ValueError("this reward model also scores the answer's likelihood: pass labels= (the answer "
                             "tokens, -100 on the prompt and padding)")
        hidden = self.backbone.hidden_states(input_ids, attention_mask)
        scores = at_last_token(self.head(hidden).squeeze(-1).float(), attention_mask)
        if labels is None:
            return scores
        logprobs = hidden_logprobs(self.backbone.lm_head, hidden, labels)
        if self.likelihood:
            scores = scores + self.likelihood_weight * logprobs / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        return scores, logprobs

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              labels: torch.Tensor) -> torch.Tensor:
        """(B,) scores of answers marked by ``labels``: what PPO, best-of-N and the evaluator rank by."""
        return self(input_ids, attention_mask, labels)[0]


def at_last_token(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, ...) -> (B, ...): each row's entry at its last real token (left or right padding; no mask: the last)."""
    if attention_mask is None:
        return x[:, -1]
    positions = torch.arange(x.size(1), device=x.device)
    last = (attention_mask.bool() * positions).argmax(dim=1)
    return x[torch.arange(x.size(0), device=x.device), last]


class GPTClassifier(nn.Module):
    """A GPT backbone with a ``num_classes`` head on the final hidden state of each sequence's last real token
    ("Build a Large Language Model (From Scratch)", ch. 6). ``labels`` names the classes (stored in checkpoints)."""

    def __init__(self, config: GPTConfig, num_classes: int, labels: list[str] | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} label names for {num_classes} classes")
        self.config = config
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.backbone = GPTModel(config)
        self.head = nn.Linear(config.d_model, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_language_model(cls, model: GPTModel, labels: list[str]) -> "GPTClassifier":
        """A classifier whose backbone starts as a copy of ``model`` (the pretrained model) and a fresh head."""
        classifier = cls(model.config, len(labels), labels)
        classifier.backbone.load_state_dict(model.state_dict())
        return classifier.to(next(model.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_classes) logits."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask)
        return self.head(at_last_token(hidden, attention_mask)).float()


def freeze_all_but_last(model: GPTClassifier, n_blocks: int) -> None:
    """Train only the last ``n_blocks`` transformer blocks, the final layer norm and the head; freeze the rest
    (embeddings included; n_blocks >= the number of blocks trains every block)."""
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    model.requires_grad_(False)
    blocks = model.backbone.transformer.h
    for module in [*blocks[max(0, len(blocks) - n_blocks):len(blocks) if n_blocks else 0],
                   model.backbone.transformer.ln_f, model.head]:
        module.requires_grad_(True)


MODEL_CLASSES = {"lm": GPTModel, "reward": GPTRewardModel, "classify": GPTClassifier}


def config_from_hf_gpt2(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig equivalent to a Hugging Face GPT2Config dict (config.json)."""
    hf_activation = hf.get("activation_function", "gelu_new")
    activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(hf_activation)
    if activation is None:
        raise CheckpointError(f"activation_function {hf_activation!r} is not supported; "
                              "GPTModel has GELU tanh (gelu_new, gelu_pytorch_tanh) and exact GELU (gelu)")
    d_model = hf.get("n_embd", 768)
    pad = hf.get("pad_token_id")
    if pad is None:
        pad = hf.get("eos_token_id")
    vocab_size = hf.get("vocab_size", 50257)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab_size else 0
    return GPTConfig(vocab_size=vocab_size, d_model=d_model, n_layers=hf.get("n_layer", 12),
                     n_heads=hf.get("n_head", 12), d_ff=hf.get("n_inner") or 4 * d_model,
                     max_seq_len=hf.get("n_positions", 1024), dropout=0.0, bias=True, pad_token_id=pad,
                     layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=activation)


def convert_hf_gpt2_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT2LMHeadModel / GPT2Model state dict -> GPTModel state dict (Conv1D weights transposed)."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers, not weights
            continue
        if key == "lm_head.weight":  # tied to wte
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        state[name] = tensor.t().contiguous() if name.endswith(_CONV1D_SUFFIXES) else tensor
    state["lm_head.weight"] = state.get("transformer.wte.weight")
    return state


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint (or weights folder) is missing, corrupt, or does not match the model."""


_ALLOWED_EXTRA_TYPES = (torch.Tensor, str, int, float, bool, type(None))


def _check_extra(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"checkpoint extra {where} has a key of type {type(k).__name__}; use str keys")
            _check_extra(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_extra(v, f"{where}[{i}]")
    elif not isinstance(value, _ALLOWED_EXTRA_TYPES):
        raise CheckpointError(f"checkpoint extra {where} is a {type(value).__name__}, which "
                              "torch.load(weights_only=True) cannot read back; store tensors, dicts, lists, str, int, "
                              "float, bool or None")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile (_orig_mod) and DDP (module) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Atomically write {"model_state_dict", "config", **extra} (synced temp file, then rename)."""
    clash = {"model_state_dict", "config"} & set(extra)
    if clash:
        raise CheckpointError(f"checkpoint extra key(s) {', '.join(sorted(clash))} are reserved; rename them")
    for key, value in extra.items():
        _check_extra(value, repr(key))
    model = _unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_state_dict": model.state_dict(), "config": model.config.to_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (weights_only=True); CheckpointError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; "
                              "pass the .pt file written by the trainer or save_checkpoint")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; pass the .pt file, not its folder")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__}); "
                              "re-save it or pick another checkpoint") from exc
    if isinstance(ckpt, dict) and "lora_state_dict" in ckpt and "base_model" in ckpt:
        return ckpt  # LoRA adapters alone: _model_from_checkpoint loads the base model they name, then them
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a GPTModel checkpoint (needs 'model_state_dict' and 'config' keys); "
                              "write checkpoints with gpt_model.save_checkpoint")
    return ckpt


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's non-tensor entries (template, stage, step, ...) without reading its weights (memory-mapped)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__})") from exc
    return {k: v for k, v in ckpt.items() if k not in ("model_state_dict", "optimizer", "critic", "critic_optimizer")}


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes from parameter names."""
    clean = {}
    for key, tensor in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        clean[key] = tensor
    return clean


def _load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one-line errors naming the missing / unexpected / mis-shaped tensor."""
    state = _strip_wrapper_prefixes(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match GPTModel: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                                  f"{tuple(tensor.shape)} in the model built from its config")
    model.load_state_dict(state)


def _model_from_checkpoint(ckpt: dict[str, Any], source: str | os.PathLike) -> GPTModel:
    """The model a checkpoint describes: its class (lm, reward, classify), config, LoRA adapters, then its weights."""
    if "lora_state_dict" in ckpt:  # an adapter file: the base checkpoint it was trained on, plus the adapters
        import lora  # lazy: only LoRA checkpoints need it

        base_path = ckpt["base_model"]
        model = _model_from_checkpoint(load_checkpoint(base_path), base_path)
        try:
            return lora.load_lora_state_dict(model, ckpt)
        except lora.LoRAError as err:
            raise CheckpointError(f"{source}: {err}") from None
    try:
        config = GPTConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: bad config in checkpoint: {exc}") from exc
    quantization = ckpt.get("quantization")
    if quantization == "int8":
        # Lazy import, the one place the model layer reaches into inference/: the INT8 layers live there, and
        # one loading entry point serves both checkpoint formats (evaluator, CLIs and server load either).
        from inference.quantizer import model_from_int8_state

        return model_from_int8_state(config, _strip_wrapper_prefixes(ckpt["model_state_dict"]),
                                     ckpt.get("quantization_config", {}), str(source))
    if quantization is not None:
        raise CheckpointError(f"{source}: unknown quantization {quantization!r} (this version reads 'int8')")
    model_class = ckpt.get("model_class", "lm")
    if model_class not in MODEL_CLASSES:
        raise CheckpointError(f"{source}: unknown model_class {model_class!r}; expected one of {sorted(MODEL_CLASSES)}")
    if model_class == "classify":
        labels = ckpt.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{source}: a classify checkpoint needs 'labels', a list of >= 2 class names")
        model = GPTClassifier(config, len(labels), labels)
    elif model_class == "reward":
        model = GPTRewardModel(config, likelihood=bool(ckpt.get("reward_likelihood", False)))
    else:
        model = MODEL_CLASSES[model_class](config)
    if ckpt.get("lora"):
        import lora  # lazy: only LoRA checkpoints need it; the adapters are part of the saved state

        lora.apply_lora(model, **ckpt["lora"])
    _load_state_dict_checked(model, ckpt["model_state_dict"], str(source))
    return model


def load_model_and_tokenizer(checkpoint_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                             device: str | torch.device | None = None):
    """(model in eval mode on device, tokenizer); tokenizer_dir defaults to <checkpoint folder>/tokenizer."""
    from byte_level_bpe import ByteLevelBPETokenizer  # lazy: the model itself does not need a tokenizer

    ckpt = load_checkpoint(checkpoint_path)
    model = _model_from_checkpoint(ckpt, checkpoint_path)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(checkpoint_path).parent / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"tokenizer folder {tokenizer_dir} not found; pass tokenizer_dir= (--tokenizer_dir) "
                              "pointing to the tokenizer the checkpoint was trained with")
    tokenizer = ByteLevelBPETokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                              f"{model.config.vocab_size}; use the tokenizer the checkpoint was trained with")
    fingerprint = ckpt.get("tokenizer_fingerprint")
    if fingerprint is not None and fingerprint != tokenizer.fingerprint:
        raise CheckpointError(f"tokenizer in {tokenizer_dir} differs from the one {checkpoint_path} was trained with "
                              "(fingerprint mismatch); pass the matching tokenizer_dir")
    model.to(resolve_device(device)).eval()
    return model, tokenizer
