"""LoRA (Hu et al. 2021): low-rank adapters on a GPTModel's nn.Linear projections, saved on their own and mergeable.

Its own module because LoRA is a model transformation used by several tools (SFT, reward model, PPO, merging for
serving) and changes no model code: ``apply_lora`` swaps chosen ``nn.Linear`` modules for ``LoRALinear`` wrappers,
``merge_lora`` swaps them back for plain ``nn.Linear`` modules with ``W + (alpha / r) B A``, so a merged model is an
ordinary GPTModel that every other tool loads.

Layout: every projection here is ``nn.Linear`` with weight (out, in) (not GPT-2's Conv1D (in, out)), so
``A`` is (r, in) and ``B`` is (out, r). The fused ``c_attn`` (q, k, v stacked along out: rows 0..d, d..2d, 2d..3d)
gets one adapter over the whole (3d, d) matrix, as Hugging Face peft does for GPT-2: q, k and v share ``A`` and
each gets its own rows of ``B``, so its own update ``(alpha / r) B[rows] A``.

    model = apply_lora(model, targets=("c_attn", "c_proj", "c_fc"), r=8, alpha=16, dropout=0.05)
    mark_only_lora_trainable(model)
    ... train ...
    save_lora("adapters.pth", model)                        # small file: adapters + LoRA config
    load_lora_state_dict(base_model, torch.load("adapters.pth", weights_only=True))
    plain = merge_lora(model)                               # nn.Linear again, ready for save_checkpoint
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from atomic_file import atomic_path

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")


class LoRAError(ValueError):
    """A LoRA setting or adapter file that does not fit the model."""


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(dropout(x)))`` with the base nn.Linear frozen, A random and B zero at init."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise LoRAError(f"LoRA alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.r, self.alpha, self.dropout_p, self.scaling = r, float(alpha), float(dropout), alpha / r
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, loralib and peft
        self.lora_dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return self.base_layer(x) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update the adapter adds to the base weight: (alpha / r) B A."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear computing what this module computes in eval mode."""
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout_p:g}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _short_name(name: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``attn.c_attn`` (what targets are usually written as)."""
    parts = name.split(".")
    return ".".join(parts[3:]) if name.startswith("transformer.h.") and len(parts) > 3 else name


def _tied_linears(model: nn.Module) -> set[str]:
    """Linear modules whose weight is also used elsewhere (lm_head tied to the token embedding)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and owners[id(m.weight)] > 1}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of a model by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> nn.Module:
    """Replace (in place) every nn.Linear whose name ends with a target by a LoRALinear; returns the model.

    Targets match whole name components: ``c_proj`` matches ``attn.c_proj`` and ``mlp.c_proj``, ``attn.c_proj``
    only the first. Only the wrapped base weights are frozen; call ``mark_only_lora_trainable`` to freeze the rest.
    """
    targets = [t.strip() for t in ([targets] if isinstance(targets, str) else targets) if t.strip()]
    if not targets:
        raise LoRAError("no LoRA targets given; name nn.Linear modules, e.g. c_attn,c_proj,c_fc")
    if lora_layers(model):
        raise LoRAError("the model already has LoRA adapters; merge_lora it first or load adapters into a plain model")
    tied = _tied_linears(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in tied}
    chosen = {name for name in linears if any(_matches(name, t) for t in targets)}
    missing = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if missing:
        bad_tied = [t for t in missing if any(_matches(name, t) for name in tied)]
        if bad_tied:
            raise LoRAError(f"LoRA target(s) {', '.join(bad_tied)} share their weight with another module (lm_head is "
                            "tied to the token embedding), so an adapter there cannot be merged; pick other targets")
        available = sorted({_short_name(name) for name in linears})
        raise LoRAError(f"LoRA target(s) {', '.join(missing)} match no nn.Linear in the model; "
                        f"available: {', '.join(available)}")
    for name in sorted(chosen):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linears[name], r, alpha, dropout))
    return model


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the adapters' A and B; returns the model."""
    if not lora_layers(model):
        raise LoRAError("the model has no LoRA adapters; call apply_lora first")
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    return model


def lora_config(model: nn.Module) -> dict[str, Any]:
    """{"r", "alpha", "dropout", "targets"} of a model's adapters (targets: the full module names)."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters; call apply_lora first")
    settings = {(m.r, m.alpha, m.dropout_p) for m in layers.values()}
    if len(settings) > 1:
        raise LoRAError(f"adapters with different (r, alpha, dropout) {sorted(settings)} "
                        "cannot be described by one config")
    r, alpha, dropout = settings.pop()
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": sorted(layers)}


def lora_state_dict(model: nn.Module) -> dict[str, Any]:
    """The adapters alone: {"lora_config": ..., "lora_state_dict": {"<module>.lora_A": tensor, ...}} (CPU tensors)."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().cpu().clone()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().cpu().clone()
    return {"lora_config": lora_config(model), "lora_state_dict": tensors}


def load_lora_state_dict(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Load adapters written by ``lora_state_dict``; a plain model first gets ``apply_lora`` with the saved config."""
    if not isinstance(state, dict) or not {"lora_config", "lora_state_dict"} <= set(state):
        raise LoRAError("not a LoRA adapter file: expected the 'lora_config' and 'lora_state_dict' keys "
                        "written by lora_state_dict()")
    config, tensors = state["lora_config"], state["lora_state_dict"]
    if not lora_layers(model):
        apply_lora(model, config["targets"], config["r"], config["alpha"], config["dropout"])
    layers = lora_layers(model)
    if sorted(layers) != sorted(config["targets"]):
        raise LoRAError(f"the adapters are for modules {config['targets'][:3]}... but the model's LoRA layers are "
                        f"{sorted(layers)[:3]}...; load them into a model with the same targets (or a plain one)")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                key = f"{name}.{part}"
                if key not in tensors:
                    raise LoRAError(f"adapter tensor {key} is missing from the LoRA state")
                target = getattr(layer, part)
                if tensors[key].shape != target.shape:
                    raise LoRAError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)} but the model needs "
                                    f"{tuple(target.shape)}: the adapters were trained on another model shape or rank")
                target.copy_(tensors[key])
    return model


def save_lora(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Atomically write ``lora_state_dict(model)`` (plus ``extra``) for ``torch.load(weights_only=True)``."""
    payload = {**lora_state_dict(model), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain nn.Linear back (in place); returns the model.

    All parameters are trainable again afterwards, as in a freshly built model.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters to merge")
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged_linear())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a tied weight counted once."""
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
