"""Hugging Face model folders in and out: the one mapping between our ``GPTModel`` and transformers' GPT-2
(``GPT2LMHeadModel``), Llama (``LlamaForCausalLM``) and Qwen3 (``Qwen3ForCausalLM``) configs and tensor names, both
ways, and the one reader of a local folder (config.json + model.safetensors or pytorch_model.bin), dispatching on its
``architectures``.

    config, state = read_hf_folder("path/to/folder")   # our GPTConfig and state dict; no network access
    arch = hf_architecture(config)                     # what a model exports as (or HFModelError: no equivalent)

GPT-2 shares our parameter names: only its Conv1D matrices are transposed. Llama and Qwen3 differ in names only: our
fused ``c_attn`` is their q_proj/k_proj/v_proj, SwiGLU's fused ``c_fc`` their gate_proj/up_proj, and our rotary
layout is theirs (half-split pairs). Its own module, below the checkpoint loader (which reads folders through it) and
the exporter (which writes them through it), above the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gpt_model import GPTConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
CAUSAL_LM = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# our block's module -> Llama's, for the tensors that map one to one
LLAMA_BLOCK = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
               "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.c_proj": "mlp.down_proj"}


class HFModelError(ValueError):
    """A Hugging Face folder or config this project cannot read, or a model with no transformers equivalent."""


# ----------------------------------------------------------------------------- which architecture

def model_type(config: GPTConfig) -> str:
    """"gpt2", "llama" or "qwen3": the transformers architecture that computes exactly what ``config`` does."""
    if config.pos_embedding == "learned" and config.norm == "layernorm" and config.mlp == "gelu" \
            and config.n_kv_heads == config.n_heads and not config.qk_norm and config.tie_embeddings:
        if not config.bias:
            raise HFModelError("a GPT-2 without biases (GPTConfig.bias=False) has no GPT-2 equivalent in transformers")
        return "gpt2"
    mismatched = [name for name, fits in (("pos_embedding='rope'", config.pos_embedding == "rope"),
                                          ("norm='rmsnorm'", config.norm == "rmsnorm"),
                                          ("mlp='swiglu'", config.mlp == "swiglu")) if not fits]
    if mismatched:
        raise HFModelError(f"this shape ({config.architecture()}) is neither GPT-2 nor Llama/Qwen3: Llama and Qwen3 "
                           f"need {', '.join(mismatched)} as well")
    if config.qk_norm and config.bias:
        raise HFModelError("Qwen3 (a model with qk_norm) has no MLP biases: export a model with bias=False")
    return "qwen3" if config.qk_norm else "llama"


def hf_architecture(config: GPTConfig) -> str:
    """transformers' causal-LM class name for ``config`` (HFModelError when none computes the same)."""
    return CAUSAL_LM[model_type(config)]


# ----------------------------------------------------------------------------- configs

def to_hf_config(config: GPTConfig) -> dict[str, Any]:
    """transformers' config.json fields for the model (the tokenizer's ids and heads are the caller's)."""
    c, kind = config, model_type(config)
    if kind == "gpt2":
        return {"architectures": [CAUSAL_LM[kind]], "model_type": kind, "vocab_size": c.vocab_size,
                "n_positions": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads,
                "n_inner": c.d_ff, "activation_function": GPT2_ACTIVATION[c.activation],
                "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": True, "torch_dtype": "float32"}
    scaled = c.rope_scaling != 1.0
    rope = {"rope_type": "linear", "factor": c.rope_scaling} if scaled else {"rope_type": "default"}
    return {"architectures": [CAUSAL_LM[kind]], "model_type": kind, "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.layer_norm_eps,
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.bias, "attention_dropout": 0.0,
            **({"mlp_bias": c.bias} if kind == "llama" else {}),
            "rope_theta": c.rope_theta, "rope_parameters": {**rope, "rope_theta": c.rope_theta},
            "rope_scaling": rope if scaled else None,  # older readers' (vLLM, llama.cpp's converter) field
            "torch_dtype": "float32"}


def hf_pad_id(hf: dict[str, Any], vocab_size: int) -> int:
    """The pad id a Hugging Face config names (its eos when it has none), 0 when neither is a token id."""
    pad = hf.get("pad_token_id")
    if pad is None:
        pad = hf.get("eos_token_id")
    return pad if isinstance(pad, int) and 0 <= pad < vocab_size else 0


def gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig equivalent to a Hugging Face GPT2Config dict (config.json)."""
    hf_activation = hf.get("activation_function", "gelu_new")
    activation = HF_ACTIVATIONS.get(hf_activation)
    if activation is None:
        raise HFModelError(f"activation_function {hf_activation!r} is not supported; "
                           "GPTModel has GELU tanh (gelu_new, gelu_pytorch_tanh) and exact GELU (gelu)")
    d_model, vocab_size = hf.get("n_embd", 768), hf.get("vocab_size", 50257)
    return GPTConfig(vocab_size=vocab_size, d_model=d_model, n_layers=hf.get("n_layer", 12),
                     n_heads=hf.get("n_head", 12), d_ff=hf.get("n_inner") or 4 * d_model,
                     max_seq_len=hf.get("n_positions", 1024), dropout=0.0, bias=True,
                     pad_token_id=hf_pad_id(hf, vocab_size), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     activation=activation)


def rope_of(hf: dict[str, Any]) -> tuple[float, float]:
    """(theta, linear scaling factor) of a Llama/Qwen3 config, from ``rope_parameters`` or the older fields."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise HFModelError(f"rope_type {kind!r} is not supported; GPTModel has plain and linear-scaled rotary "
                           "positions")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), float(rope.get("factor", 1.0)) if kind == "linear" else 1.0


def llama_config(hf: dict[str, Any], kind: str) -> GPTConfig:
    """GPTConfig equivalent to a Hugging Face LlamaConfig / Qwen3Config dict."""
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", d_model // n_heads) * n_heads != d_model:
        raise HFModelError(f"head_dim {hf.get('head_dim')} x {n_heads} heads != hidden_size {d_model}: GPTModel's "
                           "heads split the hidden size")
    if hf.get("hidden_act", "silu") != "silu" or (hf.get("use_sliding_window") and kind == "qwen3"):
        raise HFModelError("only SiLU-gated MLPs without sliding-window attention are supported")
    bias = bool(hf.get("attention_bias", False))
    if kind == "llama" and bool(hf.get("mlp_bias", False)) != bias:
        raise HFModelError("attention_bias and mlp_bias differ; GPTConfig.bias sets both")
    theta, scaling = rope_of(hf)
    vocab_size = hf["vocab_size"]
    return GPTConfig(vocab_size=vocab_size, d_model=d_model, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
                     max_seq_len=hf.get("max_position_embeddings", 2048), dropout=0.0, bias=bias,
                     pad_token_id=hf_pad_id(hf, vocab_size), layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
                     pos_embedding="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
                     qk_norm=kind == "qwen3", mlp="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def model_type_of(hf: dict[str, Any]) -> str:
    """"gpt2", "llama" or "qwen3" of a config.json, from its ``architectures`` (else its ``model_type``)."""
    by_class = {cls: kind for kind, cls in CAUSAL_LM.items()}
    for name in hf.get("architectures") or []:
        if name in by_class:
            return by_class[name]
    if not hf.get("architectures") and hf.get("model_type") in CAUSAL_LM:
        return hf["model_type"]
    raise HFModelError(f"architectures {hf.get('architectures')} is not one this project reads: "
                       f"{', '.join(CAUSAL_LM.values())}")


def from_hf_config(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig equivalent to a transformers config.json of GPT-2, Llama or Qwen3."""
    kind = model_type_of(hf)
    try:
        return gpt2_config(hf) if kind == "gpt2" else llama_config(hf, kind)
    except (KeyError, ValueError, TypeError) as err:
        raise HFModelError(f"config.json of {CAUSAL_LM[kind]} does not describe a model GPTModel builds: "
                           f"{err}") from None


# ----------------------------------------------------------------------------- tensors

def llama_names(config: GPTConfig) -> dict[str, str]:
    """Our tensor name -> Llama/Qwen3's, for every tensor that maps one to one (not the fused c_attn and c_fc)."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layers):
        for ours, theirs in LLAMA_BLOCK.items():
            for kind in ("weight", "bias"):
                names[f"transformer.h.{i}.{ours}.{kind}"] = f"model.layers.{i}.{theirs}.{kind}"
    return names


def fused_parts(config: GPTConfig, i: int) -> dict[str, tuple[str, list[int]]]:
    """Our fused tensors of block i -> (Llama's tensor names of their parts, in order; the parts' sizes)."""
    c, prefix = config, f"model.layers.{i}"
    qkv = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
    parts = {}
    for kind in ("weight", "bias"):
        parts[f"transformer.h.{i}.attn.c_attn.{kind}"] = (
            [f"{prefix}.self_attn.{p}_proj.{kind}" for p in "qkv"], qkv)
        parts[f"transformer.h.{i}.mlp.c_fc.{kind}"] = (
            [f"{prefix}.mlp.gate_proj.{kind}", f"{prefix}.mlp.up_proj.{kind}"], [c.d_ff, c.d_ff])
    return parts


def to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our (backbone) state dict in transformers' names and layouts; the LM head is left out when tied."""
    if model_type(config) == "gpt2":
        return {name: tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor
                for name, tensor in state.items() if name != "lm_head.weight"}
    names, out = llama_names(config), {}
    fused = {k: v for i in range(config.n_layers) for k, v in fused_parts(config, i).items()}
    for name, tensor in state.items():
        if name in fused:
            out.update(zip(fused[name][0], tensor.split(fused[name][1])))
        elif name in names:
            out[names[name]] = tensor
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict of the model ``config`` describes -> ours (missing tensors left for the caller's
    check to name)."""
    if model_type(config) == "gpt2":
        return gpt2_state_dict(hf_state)
    state = {ours: hf_state[theirs] for ours, theirs in llama_names(config).items() if theirs in hf_state}
    for i in range(config.n_layers):
        for ours, (theirs, _) in fused_parts(config, i).items():
            if all(t in hf_state for t in theirs):
                state[ours] = torch.cat([hf_state[t] for t in theirs])
    if config.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def gpt2_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


# ----------------------------------------------------------------------------- a folder

def read_hf_folder(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(our config, our state dict, the folder's config.json) of a local Hugging Face GPT-2, Llama or Qwen3
    folder."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFModelError(f"{config_file} not found; point to a local Hugging Face model folder "
                           "(config.json + model.safetensors or pytorch_model.bin)")
    hf = json.loads(config_file.read_text(encoding="utf-8"))
    config = from_hf_config(hf)
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file  # lazy: a third-party reader only this path needs

        hf_state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        hf_state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise HFModelError(f"no model.safetensors or pytorch_model.bin in {folder} (sharded weights are not read)")
    return config, from_hf_state_dict(hf_state, config), hf
