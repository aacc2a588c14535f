"""Hugging Face GPT-2 weights in: a local ``transformers`` GPT-2 folder (config.json + model.safetensors or
pytorch_model.bin) becomes a ``GPTModel``. Our parameter names are Hugging Face's, so the conversion only transposes
GPT-2's Conv1D matrices (ours are ``nn.Linear``, (out, in)).

    model = load_hf_gpt2("path/to/gpt2")        # real GPT-2 weights, no network access

Its own module, above the model and the checkpoint loader (whose checked state-dict load it uses).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from checkpoints import CheckpointError, load_state_dict_checked
from gpt_model import GPTConfig, GPTModel

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf_gpt2(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig equivalent to a Hugging Face GPT2Config dict (config.json)."""
    hf_activation = hf.get("activation_function", "gelu_new")
    activation = HF_ACTIVATIONS.get(hf_activation)
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
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    state["lm_head.weight"] = state.get("transformer.wte.weight")
    return state


def load_hf_gpt2(path: str | os.PathLike) -> GPTModel:
    """A GPTModel holding the weights of a local Hugging Face GPT-2 folder."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found; point to a local Hugging Face GPT-2 folder "
                              "(config.json + model.safetensors or pytorch_model.bin)")
    config = config_from_hf_gpt2(json.loads(config_file.read_text(encoding="utf-8")))
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file  # lazy: a third-party reader only this path needs

        hf_state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        hf_state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {folder}")
    model = GPTModel(config)
    load_state_dict_checked(model, convert_hf_gpt2_state_dict(hf_state), str(folder))
    return model
