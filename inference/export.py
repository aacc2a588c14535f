"""Export a checkpoint to where other engines read models: a Hugging Face folder (transformers, vLLM, TGI) or one
GGUF file (llama.cpp, Ollama, LM Studio). The GPT-2 shape exports as GPT-2, the modern shape as Llama (rotary
positions, RMSNorm, SwiGLU, grouped-query attention) or Qwen3 (the same with q/k norms), the architectures every runtime
knows (names and layouts: ``hf_models``); our tokenizer is GPT-2 byte-level BPE, so both exports are exact.

    python -m inference.export --model_path models/sft/sft_best.pth --format hf --output exports/sft
    python -m inference.export --model_path models/sft/sft_best.pth --format gguf --output exports/sft.gguf --type q8_0

Every kind of checkpoint is read through ``checkpoints`` as stored: LoRA adapters are merged into their base first,
INT8 weights are dequantized (a lossy copy of the float model: export the float checkpoint when you have it), a
classifier becomes ``GPT2ForSequenceClassification`` (or Llama's / Qwen3's) with its labels in ``id2label``; a
reward model is refused (its
score adds the answer's likelihood, which no transformers head computes). Nothing is overwritten unless
``--overwrite``; a folder is written whole or not at all, and the temporary files of an export killed mid-write are
removed by the next one.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import checkpoints
import cli
import lora
from atomic_file import atomic_directory, atomic_path, remove_stale_temps
from byte_level_bpe import ByteLevelBPETokenizer
from gpt_model import GPTConfig, GPTModel
from hf_models import HFModelError, model_type, to_hf_config, to_hf_state_dict
from model_heads import GPTClassifier
from quantization import Int8Embedding, Int8Linear, is_quantized
from prompts import is_chat_template

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked, or an output that would overwrite something."""


# ----------------------------------------------------------------------------- a plain float model

def dequantized(model: GPTModel) -> GPTModel:
    """The float GPTModel an INT8 model stands for: each int8 matrix times its per-channel scales."""
    plain = GPTModel(model.config)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            state[f"{name}.weight"] = module.weight.float() * module.scale[:, None]
            if getattr(module, "bias", None) is not None:
                state[f"{name}.bias"] = module.bias.float()
    for name, tensor in model.state_dict().items():
        if not name.endswith(".scale") and name not in state:
            state[name] = tensor
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    plain.load_state_dict(state)
    return plain


def plain_model(path: str, tokenizer_dir: str | None) -> tuple[nn.Module, ByteLevelBPETokenizer, dict[str, Any]]:
    """(the checkpoint's model with plain float weights on CPU, its tokenizer, its metadata)."""
    ckpt = checkpoints.load_checkpoint(path)
    kind = checkpoints.checkpoint_kind(ckpt)
    if kind == "reward":
        raise ExportError(f"{path} is a reward model: its score adds the answer's likelihood under its own LM head "
                          "(--reward_likelihood_weight) and its value head has a bias, which no transformers or "
                          "llama.cpp head computes; export the SFT model it was trained from")
    model = checkpoints.build_model(ckpt, path)
    metadata = checkpoints.metadata_of(ckpt)
    tokenizer = checkpoints.load_tokenizer(path, metadata, model.config.vocab_size, tokenizer_dir)
    if lora.lora_layers(model):
        lora.merge_lora(model)
    if is_quantized(model):
        print(f"note: {path} is INT8: exporting its dequantized weights (export the float checkpoint for the exact "
              "model)", file=sys.stderr)
        model = dequantized(model)
    if isinstance(model, GPTClassifier) and model.head.bias is not None:
        raise ExportError(f"{path} is a classifier whose head has a bias (trained before 2026-12), which "
                          "GPT2ForSequenceClassification lacks: retrain it with `finetune.py --mode classify`")
    return model.eval(), tokenizer, metadata


# ----------------------------------------------------------------------------- Hugging Face

def hf_config(model: nn.Module, tokenizer: ByteLevelBPETokenizer) -> dict[str, Any]:
    """transformers' config of the model (config.json): GPT2Config, LlamaConfig or Qwen3Config."""
    c: GPTConfig = model.config
    try:
        config = to_hf_config(c)
    except HFModelError as err:
        raise ExportError(str(err)) from None
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if isinstance(model, GPTClassifier):
        name = {"gpt2": "GPT2", "llama": "Llama", "qwen3": "Qwen3"}[model_type(c)]
        config.update(architectures=[f"{name}ForSequenceClassification"], num_labels=len(model.labels),
                      id2label={str(i): label for i, label in enumerate(model.labels)},
                      label2id={label: i for i, label in enumerate(model.labels)})
    return config


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' tensors (``hf_models.to_hf_state_dict``); a tied LM head is the token embedding (tied on load),
    a classifier's head is ``score`` (and it has no LM head)."""
    backbone = model.backbone if isinstance(model, GPTClassifier) else model
    state = to_hf_state_dict(backbone.state_dict(), backbone.config)
    if isinstance(model, GPTClassifier):
        state.pop("lm_head.weight", None)
        state["score.weight"] = model.head.weight
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in state.items()}


def tokenizer_json(tokenizer: ByteLevelBPETokenizer) -> dict[str, Any]:
    """The `tokenizers` library's file for our tokenizer: GPT-2's byte-level BPE, the special tokens as added ones."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [{"id": tokenizer.vocab[token], "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for token in tokenizer.special_tokens]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": tokenizer.vocab, "merges": [list(pair) for pair in tokenizer.merges]}}


def jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(template: str) -> str:
    """The model's prompt format as the Jinja ``chat_template`` that transformers' ``apply_chat_template`` renders:
    a chat template itself (prompts.CHAT_TEMPLATE, or the one before tool calls), or an older instruction/response
    template written per turn as its SFT samples
    were (``<s> prompt reply </s>``, the system text opening the first user message)."""
    if is_chat_template(template):  # the tool-call format, or the chat format of before it for the models that had it
        return template
    head, rest = template.split("{instruction}", 1)
    middle = rest.split("{response}", 1)[0]
    return ("{% set ns = namespace(system='') %}{% for message in messages %}"
            "{% if message['role'] in ['system', 'developer'] %}{% set ns.system = message['content'] + '\\n' %}"
            f"{{% elif message['role'] == 'user' %}}{{{{ bos_token + {jinja_string(head)} + ns.system + "
            f"message['content'] + {jinja_string(middle)} }}}}{{% set ns.system = '' %}}"
            "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def tokenizer_config(tokenizer: ByteLevelBPETokenizer, context: int, template: str | None = None) -> dict[str, Any]:
    """tokenizer_config.json as transformers reads it (AutoTokenizer -> a fast GPT-2 tokenizer), with the model's
    ``chat_template`` when it has a prompt template."""
    special = {tokenizer.vocab[t]: t for t in tokenizer.special_tokens}
    decoder = {str(i): {"content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                        "special": True} for i, t in sorted(special.items())}
    names = {role: tokenizer.decode([getattr(tokenizer, f"{role}_token_id")], skip_special_tokens=False)
             for role in ("bos", "eos", "pad", "unk")}
    return {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
            "model_max_length": context, "added_tokens_decoder": decoder, "clean_up_tokenization_spaces": False,
            **{f"{role}_token": name for role, name in names.items()},
            **({"chat_template": chat_template(template)} if template else {})}


def write_hf(model: nn.Module, tokenizer: ByteLevelBPETokenizer, folder: Path, template: str | None = None) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files into ``folder``."""
    from safetensors.torch import save_file

    write_json(folder / "config.json", hf_config(model, tokenizer))
    write_json(folder / "generation_config.json", {"bos_token_id": tokenizer.bos_token_id,
                                                   "eos_token_id": tokenizer.eos_token_id,
                                                   "pad_token_id": tokenizer.pad_token_id})
    weights = folder / "model.safetensors"
    save_file(hf_state_dict(model), weights, metadata={"format": "pt"})
    weights.chmod(0o666 & ~current_umask())  # safetensors writes 0600; other users (a container's) must read it
    write_json(folder / "vocab.json", tokenizer.vocab)  # GPT-2's slow-tokenizer files, as our tokenizer saves them
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges),
                                       encoding="utf-8")
    write_json(folder / "tokenizer.json", tokenizer_json(tokenizer))
    write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer, model.config.max_seq_len, template))
    write_json(folder / "special_tokens_map.json", {k: v for k, v in tokenizer_config(tokenizer, 0).items()
                                                    if k.endswith("_token")})


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")


# ----------------------------------------------------------------------------- GGUF

GGUF_LLAMA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names for the model's architecture; ours are nn.Linear (out, in), ggml's layout already."""
    if model_type(model.config) == "gpt2":
        return gguf_gpt2_tensors(model)
    return gguf_llama_tensors(model)


def gguf_gpt2_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """llama.cpp's GPT-2 tensor names (the fused q/k/v as attn_qkv)."""
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    block = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for name, tensor in model.state_dict().items():
        if name in names:
            out[names[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)  # transformer.h.<i>.<module>.<weight|bias>
        module, kind = rest.rsplit(".", 1)
        out[f"blk.{index}.{block[module]}.{kind}"] = tensor
    return out


def rope_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k rows (or biases) from the half-split rotary layout (ours, Hugging Face Llama's) to the interleaved pairs
    llama.cpp's llama rope rotates: llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def gguf_llama_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """llama.cpp's llama / qwen3 tensor names, from the Hugging Face ones. Llama's q and k rows are permuted to
    interleaved pairs (llama.cpp's llama rope); Qwen3 runs the half-split (NeoX) rope, as ours, unpermuted. A tied
    head has no ``output.weight``: llama.cpp then reads the token embedding."""
    c = model.config
    permute = {"self_attn.q_proj": c.n_heads, "self_attn.k_proj": c.n_kv_heads} if model_type(c) == "llama" else {}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    out = {}
    for name, tensor in to_hf_state_dict(model.state_dict(), c).items():
        if name in names:
            out[names[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
        module, kind = rest.rsplit(".", 1)
        out[f"blk.{index}.{GGUF_LLAMA_BLOCK[module]}.{kind}"] = \
            rope_interleaved(tensor, permute[module]) if module in permute else tensor
    return out


def gguf_vocabulary(tokenizer: ByteLevelBPETokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token strings in GPT-2's byte-to-unicode form, their types), padded to the model's vocabulary."""
    import gguf

    by_id = {i: token for token, i in tokenizer.vocab.items()}
    special = {tokenizer.vocab[t] for t in tokenizer.special_tokens}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else
             gguf.TokenType.UNUSED for i in range(vocab_size)]
    return tokens, [int(t) for t in types]


def write_gguf(model: nn.Module, tokenizer: ByteLevelBPETokenizer, path: Path, kind: str, name: str,
               template: str | None = None) -> None:
    """One GGUF file llama.cpp loads as a GPT-2, Llama or Qwen3 model: hyperparameters, the tokenizer, the tensors."""
    import gguf

    if isinstance(model, GPTClassifier):
        raise ExportError("a classifier has no GGUF equivalent llama.cpp runs: export it with --format hf")
    c = model.config
    try:
        arch = model_type(c)
    except HFModelError as err:
        raise ExportError(str(err)) from None
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    add_gguf_hyperparameters(writer, c, arch)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    tokens, types = gguf_vocabulary(tokenizer, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # our pre-tokenizer regex is GPT-2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in tokenizer.merges])
    for role in ("bos", "eos", "unk", "pad"):  # writer.add_bos_token_id(tokenizer.bos_token_id), ...
        getattr(writer, f"add_{role}_token_id")(getattr(tokenizer, f"{role}_token_id"))
    writer.add_add_bos_token(True)  # llama.cpp tools then start every prompt with <s>, as ours do
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(chat_template(template))  # llama-cpp-python's chat formats read it
    for tensor_name, tensor in gguf_tensors(model).items():
        add_gguf_tensor(writer, tensor_name, tensor.detach().float().numpy(), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_gguf_hyperparameters(writer, c: GPTConfig, arch: str) -> None:
    """The model's shape under llama.cpp's keys for ``arch`` (gpt2, llama, qwen3)."""
    import gguf

    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(c.layer_norm_eps)
        return
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_layer_norm_rms_eps(c.layer_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling)


def add_gguf_tensor(writer, name: str, array, kind: str) -> None:
    """Matrices in the file type (F16, or Q8_0 where a row is whole 32-value blocks); norms, biases and the position
    table in F32, as llama.cpp's own converter keeps them."""
    import gguf

    matrix = array.ndim == 2 and name != "position_embd.weight"
    if kind == "f16" and matrix:
        writer.add_tensor(name, array.astype("float16"))
    elif kind == "q8_0" and matrix and array.shape[1] % 32 == 0:
        data = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, array)


# ----------------------------------------------------------------------------- CLI

def check_output(output: Path, fmt: str, overwrite: bool, model_path: str, tokenizer_dir: str | None) -> None:
    """Fail before any work if the output would replace something the export reads (the checkpoint, its tokenizer,
    a LoRA adapter's base model and its folder: ``checkpoints.checkpoint_inputs``), or an existing path without
    --overwrite, or cannot be written."""
    inputs = checkpoints.checkpoint_inputs("--model_path", model_path, tokenizer_dir)
    cli.check_outputs({"--output": output}, inputs, overwrite)
    if fmt == "hf" and output.is_file():
        raise ExportError(f"--output {output} is a file: --format hf writes a folder")
    if fmt == "gguf" and output.is_dir():
        raise ExportError(f"--output {output} is a folder: --format gguf writes one file, e.g. {output / 'model.gguf'}")
    cli.check_output_folder(output.parent if fmt == "gguf" else output, "--output")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m inference.export",
                                description="Export a checkpoint (float, INT8, LoRA adapters, classifier) to a "
                                            "Hugging Face folder (transformers, vLLM, TGI) or a GGUF file (llama.cpp, "
                                            "Ollama, LM Studio).")
    parser.add_argument("--model_path", required=True, help="the checkpoint (.pth) to export")
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf: a folder; gguf: one file")
    parser.add_argument("--output", required=True, help="the folder (hf) or .gguf file (gguf) to write")
    parser.add_argument("--type", choices=GGUF_TYPES, default="f32",
                        help="gguf: the matrices' type: f32, f16, or q8_0 (llama.cpp's 8-bit blocks)")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: <checkpoint folder>/tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export at --output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def export_checkpoint(model_path: str, fmt: str, output: Path, kind: str = "f32",
                      tokenizer_dir: str | None = None, overwrite: bool = False) -> nn.Module:
    """Write ``model_path`` as ``fmt`` to ``output``, whole or not at all; returns the exported float model."""
    check_output(output, fmt, overwrite, model_path, tokenizer_dir)
    remove_stale_temps(output.parent)  # what an export killed mid-write left (kill -9), as the trainers do
    model, tokenizer, metadata = plain_model(model_path, tokenizer_dir)
    template = metadata.get("sft_template")  # a pretrained model has none: no chat template
    if fmt == "hf":
        with atomic_directory(output) as folder:
            write_hf(model, tokenizer, folder, template)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)  # as a folder export's parents are made
        with atomic_path(output) as tmp:
            write_gguf(model, tokenizer, tmp, kind, Path(model_path).stem, template)
    return model


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.type != "f32" and args.format != "gguf":
        raise cli.UsageError("--type applies to --format gguf")
    model = export_checkpoint(args.model_path, args.format, Path(args.output), args.type, args.tokenizer_dir,
                              args.overwrite)
    print(f"exported {args.model_path} ({type(model).__name__}) as {args.format}"
          f"{'/' + args.type if args.format == 'gguf' else ''}: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
