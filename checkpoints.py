"""The one checkpoint format and its one loader: every kind of model file the project writes (a float or INT8 language
model, a LoRA adapter on its base, a reward model, a classifier), read once, checked, built, and prepared for what
the caller does with it; and what a file is, in words.

    model, tokenizer = load_model_and_tokenizer("models/sft/sft_best.pth")   # inference: eval mode, fast weights
    loaded = load("models/pretrain/pretrain_best.pth", trainable=True, expect="lm", flag="--pretrained_model")
    loaded.model, loaded.tokenizer, loaded.template, loaded.kind, loaded.metadata
    python checkpoints.py models/sft/sft_best.pth                            # what is this file?
    model = load_model("exports/sft")                                        # a Hugging Face folder, no tokenizer

A checkpoint is one ``torch.save`` dict, read with ``weights_only=True``: ``model_state_dict`` + ``config`` (the
GPTConfig) + metadata (``model_class``, ``stage``, ``step``, ``sft_template``, ``tokenizer_fingerprint``,
``train_args``, ...) and, in the trainers' step checkpoints, the training state. An INT8 file adds
``quantization: "int8"``; a LoRA adapter file holds ``lora_state_dict`` + ``base_model`` (the file it adapts).
A Hugging Face folder (GPT-2, Llama or Qwen3: config.json + weights, read through ``hf_models``) loads wherever a
checkpoint does, as a language model whose tokenizer is the folder's own files.

Every file says what it is, and ``save_checkpoint`` takes that from the model itself, so that no caller can write a
file that loads as something else: ``model_class`` (the head: lm, reward, classify), ``quantization``, ``lora``
(adapters trained in place) and, from the trainers, ``stage``. Each entry point checks it once, up front, here:
``load(expect=..., trainable=..., same_tokenizer_as=...)`` for a model, ``load_resumable(path, stage)`` for --resume.

Its own module, above the model, the heads, LoRA and the INT8 layers, so that none of them imports another to load.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cli
import lora
from atomic_file import atomic_path
from byte_level_bpe import ByteLevelBPETokenizer
from devices import resolve_device, resolve_dtype
from gpt_model import GPTConfig, GPTModel
from hf_models import HFModelError, read_hf_folder
from model_heads import GPTClassifier, GPTRewardModel
from prompts import CHAT_TEMPLATE, SFT_TEMPLATE
from quantization import is_packed, is_quantized, prepare_for_inference, swap_in_int8

MODEL_CLASSES = {"lm": GPTModel, "reward": GPTRewardModel, "classify": GPTClassifier}
# stage (a step checkpoint's "stage", the trainer's prefix) -> the command that writes and resumes it
STAGE_COMMANDS = {"pretrain": "pretrain_trainer.py", "sft": "finetune.py --mode sft",
                  "reward": "finetune.py --mode reward", "dpo": "finetune.py --mode dpo",
                  "ppo": "finetune.py --mode rlhf", "rlvf": "finetune.py --mode rlvf",
                  "classify": "finetune.py --mode classify"}
TRAINING_STATE = ("step", "optimizer", "scaler", "scheduler", "rank_states", "best_val_loss")
KIND_NAMES = {"lm": "a language model", "lm-int8": "an INT8 language model", "lora": "LoRA adapters",
              "reward": "a reward model", "classify": "a classifier"}
KIND_SOURCES = {"lm": "pretrain_trainer.py or finetune.py --mode sft/rlhf/dpo/rlvf", "lm-int8": "inference.quantizer",
                "lora": "finetune.py --mode sft --lora_r N", "reward": "finetune.py --mode reward",
                "classify": "finetune.py --mode classify"}
# Entries that are weights or training state, not metadata.
STATE_KEYS = ("model_state_dict", "lora_state_dict", "optimizer", "scaler", "rank_states", "step_state")
_ALLOWED_EXTRA_TYPES = (torch.Tensor, str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint (or weights folder) is missing, corrupt, of the wrong kind, or does not match the model."""


# ----------------------------------------------------------------------------- writing

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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile (_orig_mod) and DDP (module) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _what_it_is(model: nn.Module) -> dict[str, Any]:
    """The entries that say what a model's file is, from the model (never from the caller, who may be wrong): its
    class, and its LoRA adapters when it has some (a file without them would not load its own weights)."""
    kinds = [kind for kind, cls in MODEL_CLASSES.items() if type(model) is cls]
    layers = lora.lora_layers(model)
    return {**({"model_class": kinds[0]} if kinds else {}), "lora": lora.lora_config(model) if layers else None}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Atomically write {"model_state_dict", "config", **extra} (synced temp file, then rename); an INT8 model also
    records its quantization, so it loads back as INT8."""
    clash = {"model_state_dict", "config"} & set(extra)
    if clash:
        raise CheckpointError(f"checkpoint extra key(s) {', '.join(sorted(clash))} are reserved; rename them")
    model = unwrap(model)
    if is_packed(model):
        raise CheckpointError("this model was prepared for inference (packed weights are not saved): load it with "
                              "trainable=True to save it")
    if is_quantized(model):
        extra = {"quantization": "int8", "quantization_config": dict(model.quantization_config), **extra}
    extra.update(_what_it_is(model))
    for key, value in extra.items():
        _check_extra(value, repr(key))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_state_dict": model.state_dict(), "config": model.config.to_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# ----------------------------------------------------------------------------- reading

def _torch_load(path: Path, **kwargs) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; pass the .pth file written by a trainer")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a folder without config.json; pass the .pth file written by a "
                              "trainer, or a Hugging Face model folder")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__}); "
                              "re-save it or pick another checkpoint") from exc


def _check_format(ckpt: Any, path: Path) -> dict[str, Any]:
    if isinstance(ckpt, dict) and "lora_state_dict" in ckpt and "base_model" in ckpt:
        return ckpt
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (needs 'model_state_dict' and 'config'); "
                              "write checkpoints with checkpoints.save_checkpoint")
    return ckpt


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a folder with config.json) rather than a .pth file."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _hf_checkpoint(folder: Path) -> dict[str, Any]:
    """A Hugging Face folder as the checkpoint dict of the language model it holds (with our chat format when its
    tokenizer_config.json carries it, as our exports do)."""
    try:
        config, state, hf = read_hf_folder(folder)
    except HFModelError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    tokenizer_config = folder / "tokenizer_config.json"
    template = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template") \
        if tokenizer_config.is_file() else None
    return {"model_state_dict": state, "config": config.to_dict(), "model_class": "lm",
            "hf_architectures": list(hf.get("architectures") or []),
            **({"sft_template": CHAT_TEMPLATE} if template == CHAT_TEMPLATE else {})}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The whole checkpoint dict (weights and training state included), checked to be one of ours; a Hugging Face
    folder gives the dict of its weights and config."""
    path = Path(path)
    if is_hf_folder(path):
        return _hf_checkpoint(path)
    return _check_format(_torch_load(path, map_location=map_location), path)


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model a checkpoint file or Hugging Face folder holds, with its weights as stored, on CPU, without its
    tokenizer (a folder straight from transformers' ``save_pretrained`` has none)."""
    return build_model(load_checkpoint(path), path)


def metadata_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's entries that are neither weights nor training state (config, template, stage, step, ...)."""
    return {k: v for k, v in ckpt.items() if k not in STATE_KEYS}


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``metadata_of`` a checkpoint file without reading its weights (memory-mapped)."""
    path = Path(path)
    if is_hf_folder(path):
        return metadata_of(_hf_checkpoint(path))
    return metadata_of(_check_format(_torch_load(path, map_location="cpu", mmap=True), path))


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """"lm", "lm-int8", "lora", "reward" or "classify" (see KIND_NAMES)."""
    if "lora_state_dict" in ckpt:
        return "lora"
    if ckpt.get("quantization") is not None:
        return "lm-int8"
    return ckpt.get("model_class", "lm")


def template_of(ckpt: Mapping[str, Any]) -> str:
    """The SFT template a checkpoint's model was trained with (the default one for a model trained without one)."""
    return ckpt.get("sft_template") or SFT_TEMPLATE


def describe(path: str | os.PathLike) -> str:
    """What a checkpoint file is, in one line: its kind, shape, stage and step, and whether a run can resume from it."""
    path = Path(path)
    ckpt = _hf_checkpoint(path) if is_hf_folder(path) else \
        _check_format(_torch_load(path, map_location="cpu", mmap=True), path)
    meta, kind = metadata_of(ckpt), checkpoint_kind(ckpt)
    parts = [f"{path}: {KIND_NAMES.get(kind, f'an unknown model_class {kind!r}')}"]
    if kind == "lora":
        parts.append(f"for {meta.get('base_model')}")
    else:
        c = meta["config"]
        parts.append(f"{c.get('n_layers')} layers x {c.get('d_model')}, context {c.get('max_seq_len')}, "
                     f"vocab {c.get('vocab_size')}")
        try:
            parts.append(GPTConfig.from_dict(c).architecture())
        except (ValueError, TypeError):
            parts.append("an invalid config")
    if meta.get("hf_architectures"):
        parts.append(f"a Hugging Face {'/'.join(meta['hf_architectures'])} folder")
    if kind == "classify":
        parts.append(f"classes {meta.get('labels')}")
    if meta.get("lora"):
        parts.append(f"with LoRA adapters (r {meta['lora'].get('r')})")
    if "stage" in meta:
        parts.append(f"stage {meta['stage']}, step {meta.get('step')}")
    resumable = all(k in ckpt for k in ("optimizer", "rank_states"))
    parts.append("resumable (--resume)" if resumable else "weights only")
    return "; ".join(parts)


def _adapted_base(path: Path) -> Path | None:
    """The base checkpoint a LoRA adapter file names; None for any other file, or one that does not read (its loader
    says what is wrong with it)."""
    if not path.is_file():
        return None
    try:
        ckpt = _torch_load(path, map_location="cpu", mmap=True)  # memory-mapped: the weights are not read
    except CheckpointError:
        return None
    base = ckpt.get("base_model") if isinstance(ckpt, dict) and "lora_state_dict" in ckpt else None
    return Path(base) if isinstance(base, str) else None


def checkpoint_inputs(flag: str, path: str | os.PathLike | None,
                      tokenizer_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Everything a command reads through the checkpoint ``path`` (given as ``flag``), as ``cli.check_outputs``
    takes its inputs: the checkpoint, its tokenizer folder (``tokenizer_dir`` or the default one) and what it refers
    to: a LoRA adapter file's base checkpoint, with that base's tokenizer folder and, in turn, what the base refers
    to. An output that replaced any of them would leave the checkpoint pointing at nothing."""
    if path is None:
        return []
    found: list[tuple[str, Path]] = []
    current: Path | None = Path(path)
    what, seen = flag, set()
    tokenizer = (("--tokenizer_dir", Path(tokenizer_dir)) if tokenizer_dir is not None else
                 (f"the tokenizer of {flag}", default_tokenizer_dir(current)))
    while current is not None and current.resolve() not in seen:  # a chain of bases, never a loop
        seen.add(current.resolve())
        found += [(what, current), tokenizer]
        what = f"the base model of {flag}"
        current = _adapted_base(current)
        tokenizer = (f"the tokenizer of {what}", default_tokenizer_dir(current)) if current else tokenizer
    return found


# ----------------------------------------------------------------------------- building models

def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes from parameter names."""
    clean = {}
    for key, tensor in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        clean[key] = tensor
    return clean


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one-line errors naming the missing / unexpected / mis-shaped tensor."""
    state = _strip_wrapper_prefixes(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                                  f"{tuple(tensor.shape)} in the model built from its config")
    model.load_state_dict(state)


def _empty_model(ckpt: Mapping[str, Any], config: GPTConfig, source: str) -> nn.Module:
    """The untrained module a checkpoint's weights go into: its class, INT8 layers, LoRA adapters."""
    kind = checkpoint_kind(ckpt)
    if kind == "lm-int8":
        if ckpt["quantization"] != "int8":
            raise CheckpointError(f"{source}: unknown quantization {ckpt['quantization']!r} (this version reads int8)")
        lm_head = bool(ckpt.get("quantization_config", {}).get("lm_head", "lm_head.scale" in ckpt["model_state_dict"]))
        return swap_in_int8(GPTModel(config), lm_head, quantize=False)
    if kind not in MODEL_CLASSES:
        raise CheckpointError(f"{source}: unknown model_class {kind!r}; expected one of {sorted(MODEL_CLASSES)}")
    if kind == "classify":
        labels = ckpt.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{source}: a classify checkpoint needs 'labels', a list of >= 2 class names")
        head_bias = "head.bias" in _strip_wrapper_prefixes(ckpt["model_state_dict"])  # classifiers of before 2026-12
        model = GPTClassifier(config, len(labels), labels, head_bias=head_bias)
    elif kind == "reward":
        model = GPTRewardModel(config, likelihood=bool(ckpt.get("reward_likelihood", False)))
    else:
        model = GPTModel(config)
    if ckpt.get("lora"):  # adapters trained in place (sft_best.pth of a LoRA run): part of the saved state
        lora.apply_lora(model, **ckpt["lora"])
    return model


def build_model(ckpt: Mapping[str, Any], source: str | os.PathLike) -> nn.Module:
    """The model a checkpoint dict describes, with its weights (on CPU, as stored). A LoRA adapter file builds the base
    checkpoint it names, then puts the adapters on it."""
    if checkpoint_kind(ckpt) == "lora":
        base_path = ckpt["base_model"]
        model = build_model(load_checkpoint(base_path), base_path)
        added = ckpt.get("added_embeddings")
        if added is not None:  # tokens SFT added to the base's tokenizer (the chat tokens)
            model.grow_vocab(len(model.transformer.wte.weight) + len(added))
            with torch.no_grad():
                model.transformer.wte.weight[-len(added):] = added
        try:
            return lora.load_lora_state_dict(model, ckpt)
        except lora.LoRAError as err:
            raise CheckpointError(f"{source}: {err}") from None
    try:
        config = GPTConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: bad config in checkpoint: {exc}") from exc
    model = _empty_model(ckpt, config, str(source))
    load_state_dict_checked(model, ckpt["model_state_dict"], str(source))
    return model


# ----------------------------------------------------------------------------- the loader

@dataclass
class Loaded:
    """A checkpoint loaded for use: the model, its tokenizer, its kind, its SFT template and its metadata."""

    model: nn.Module
    tokenizer: ByteLevelBPETokenizer
    kind: str
    template: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def default_tokenizer_dir(checkpoint_path: str | os.PathLike) -> Path:
    """Where a checkpoint's tokenizer is when none is passed: <checkpoint folder>/tokenizer, or a Hugging Face folder
    itself."""
    path = Path(checkpoint_path)
    return path if is_hf_folder(path) else path.parent / "tokenizer"


def load_tokenizer(checkpoint_path: str | os.PathLike, metadata: Mapping[str, Any], vocab_size: int,
                   tokenizer_dir: str | os.PathLike | None = None) -> ByteLevelBPETokenizer:
    """The tokenizer a checkpoint was trained with (default: ``default_tokenizer_dir``), checked against it."""
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir(checkpoint_path)
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"tokenizer folder {tokenizer_dir} not found; pass --tokenizer_dir (tokenizer_dir=) "
                              "pointing to the tokenizer the checkpoint was trained with")
    tokenizer = ByteLevelBPETokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                              f"{vocab_size}; use the tokenizer the checkpoint was trained with")
    fingerprint = metadata.get("tokenizer_fingerprint")
    if fingerprint is not None and fingerprint != tokenizer.fingerprint:
        raise CheckpointError(f"tokenizer in {tokenizer_dir} differs from the one {checkpoint_path} was trained with "
                              "(fingerprint mismatch); pass the matching --tokenizer_dir")
    return tokenizer


def _check_kind(kind: str, expect: str | Sequence[str] | None, path: Path, flag: str, trainable: bool) -> None:
    """The one check of what a file is against what the caller needs: given, expected, and what to pass instead."""
    wanted = (expect,) if isinstance(expect, str) else tuple(expect or ())
    family = {"lm-int8": "lm", "lora": "lm"}.get(kind, kind)
    if wanted and family not in wanted:
        names = " or ".join(KIND_NAMES[w] for w in wanted)
        sources = " / ".join(KIND_SOURCES[w] for w in wanted)
        raise CheckpointError(f"{flag} {path} is {KIND_NAMES.get(kind, kind)} (written by {KIND_SOURCES.get(kind)}), "
                              f"not {names}: pass {names} (written by {sources})")
    if trainable and kind == "lm-int8":
        raise CheckpointError(f"{flag} {path} is an INT8 checkpoint, for inference only: it cannot be trained; pass "
                              "the float checkpoint it was quantized from")


def _check_same_tokenizer(tokenizer: ByteLevelBPETokenizer, metadata: Mapping[str, Any], vocab_size: int,
                          same_as: tuple[ByteLevelBPETokenizer, str], kind: str, path: Path, flag: str) -> None:
    """A model that reads another model's tokens (a reward model scoring a policy's answers) must have been trained
    on the same tokenizer: otherwise every id means another piece of text and its outputs are meaningless."""
    other, what = same_as
    fingerprint = metadata.get("tokenizer_fingerprint") or tokenizer.fingerprint
    if fingerprint != other.fingerprint or len(other) > vocab_size:
        raise CheckpointError(f"{flag} {path} was trained with another tokenizer ({len(tokenizer)} tokens) than "
                              f"{what} ({len(other)} tokens), so it would read that model's tokens as other text: "
                              f"pass {KIND_NAMES.get(kind, kind)} trained from {what}")


def _ready(model: nn.Module, device: torch.device, trainable: bool, quantize: str, dtype: torch.dtype) -> nn.Module:
    """On device, and either trainable (plain weights, train mode) or prepared for inference (eval mode, adapters
    merged, INT8 or packed weights)."""
    model = model.to(device)
    if trainable:
        return model.train()
    if lora.lora_layers(model):
        lora.merge_lora(model)  # fewer matmuls, and a plain model the fast layers can replace
    return prepare_for_inference(model.eval().requires_grad_(False), quantize, dtype)


def load(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
         device: str | torch.device | None = None, *, trainable: bool = False, quantize: str = "none",
         dtype: str | torch.dtype = "float32", expect: str | Sequence[str] | None = None,
         flag: str = "--model_path", same_tokenizer_as: tuple[ByteLevelBPETokenizer, str] | None = None,
         keep_adapters: bool = False) -> Loaded:
    """Load any checkpoint with its tokenizer, reading the file once.

    trainable=False (inference): eval mode, LoRA adapters merged, weights prepared by
    ``quantization.prepare_for_inference`` for ``dtype`` (INT8 when stored or ``quantize="int8"``, else prepacked fp32
    on CPU): the same fast path for every caller. trainable=True: plain float weights in train mode (an INT8 file is an
    error; LoRA adapters are merged into a plain model, whose checkpoints every tool loads, unless ``keep_adapters``).
    ``expect`` ("lm", "reward", "classify") turns the wrong kind of file into a one-line error naming ``flag``;
    ``same_tokenizer_as=(tokenizer, "what it belongs to")`` requires the file to have been trained on that tokenizer.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    _check_kind(kind, expect, path, flag, trainable)
    model = build_model(ckpt, path)
    metadata = metadata_of(ckpt)
    tokenizer = load_tokenizer(path, metadata, model.config.vocab_size, tokenizer_dir)
    if same_tokenizer_as is not None:
        _check_same_tokenizer(tokenizer, metadata, model.config.vocab_size, same_tokenizer_as, kind, path, flag)
    if trainable and not keep_adapters and lora.lora_layers(model):
        lora.merge_lora(model)  # trained on, LoRA-laden weights would be saved as what no loader builds
        kind, metadata = ("lm" if kind == "lora" else kind), {**metadata, "lora": None}
    device = resolve_device(device)
    model = _ready(model, device, trainable, quantize, resolve_dtype(dtype, device))
    return Loaded(model, tokenizer, "lm-int8" if is_quantized(model) else kind, template_of(metadata), path, metadata)


def load_resumable(path: str | os.PathLike, stage: str, flag: str = "--resume") -> dict[str, Any]:
    """A step checkpoint of ``stage`` with its training state (the whole dict), or a one-line error saying what the
    file is and what to pass instead: another stage's step file, a best model, an INT8 or a LoRA adapter file."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    kind, wanted = checkpoint_kind(ckpt), f"a {stage}_step_N.pth (--resume auto finds the latest in --output_dir)"
    if kind in ("lm-int8", "lora"):
        raise CheckpointError(f"{flag} {path} is {KIND_NAMES[kind]}, for inference only, not a step checkpoint of "
                              f"{stage}: pass {wanted}")
    written_by = ckpt.get("stage")
    if written_by is not None and written_by != stage:
        command = STAGE_COMMANDS.get(written_by, written_by)
        raise CheckpointError(f"{flag} {path} is a step checkpoint of {written_by} ({command}), not of {stage} "
                              f"({STAGE_COMMANDS.get(stage, stage)}): "
                              f"continue it with `{command} --resume {path}`, or pass {wanted}")
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        raise CheckpointError(f"{flag} {path} holds weights but no training state (no {', '.join(missing)}): resume "
                              f"from {wanted}")
    return ckpt


def load_model_and_tokenizer(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                             device: str | torch.device | None = None, **options: Any):
    """(model, tokenizer) of ``load`` (eval mode and inference weights unless ``trainable=True``)."""
    loaded = load(path, tokenizer_dir, device, **options)
    return loaded.model, loaded.tokenizer


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """``python checkpoints.py FILE...``: what each checkpoint is; a file that is not one is a one-line error."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = cli.ArgumentParser(prog="python checkpoints.py",
                                description="Say what each checkpoint file is: its kind (language model, INT8, LoRA "
                                            "adapters, reward model, classifier), shape, stage, step, and whether a "
                                            "run can resume from it.")
    parser.add_argument("paths", nargs="+", metavar="FILE", help="checkpoint files (.pth) or Hugging Face folders")
    for path in parser.parse_args(argv).paths:
        print(describe(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
