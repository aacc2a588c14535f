"""The optimizers every training loop can step: AdamW, or Muon for the hidden weight matrices with AdamW for the rest.

Its own module because which parameter an optimizer gets (and how the pair steps, saves and loads as one) is a
concern of its own that the training loop only calls: ``configure_optimizer`` builds either, and ``MuonWithAdamW``
looks to the loop, the loss scaler, gradient clipping and checkpoints like one torch optimizer.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn


class OptimizerError(ValueError):
    """An optimizer that cannot train what it was given; the message says which to use."""


OPTIMIZERS = ("adamw", "muon")
HIDDEN_MATRIX = re.compile(r"(^|\.)h\.\d+\.")  # a transformer block's parameter: transformer.h.3.mlp.c_fc.weight


class MuonWithAdamW:
    """Muon for the hidden weight matrices and AdamW for the rest, stepped as one optimizer: the lr schedule, the
    loss scaler, gradient clipping and checkpoints see one object whose ``param_groups`` are both optimizers'."""

    kind = "muon"

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def optimizer_kind(optimizer_or_state) -> str:
    """"muon" or "adamw", of an optimizer or of the state dict a checkpoint holds."""
    if isinstance(optimizer_or_state, dict):
        return optimizer_or_state.get("kind", "adamw")
    return getattr(optimizer_or_state, "kind", "adamw")


def split_hidden_matrices(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the blocks' trainable 2-D weight matrices, every other trainable parameter): what Muon and AdamW get.

    Embeddings and the tied LM head, biases, norm gains, reward/classifier heads and LoRA adapters stay with AdamW:
    Muon orthogonalises a matrix's update, which suits the hidden layers, not lookups, vectors or low-rank adapters
    (as nanochat and modded-nanogpt split them)."""
    hidden, rest = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            is_hidden = param.dim() == 2 and HIDDEN_MATRIX.search(name) and "lora_" not in name
            (hidden if is_hidden else rest).append(param)
    return hidden, rest


def configure_optimizer(module: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                        device_type: str = "cpu", kind: str = "adamw") -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW over the trainable parameters: decay on 2-D weights (matmuls, embeddings), none on biases and norms; or
    with ``kind="muon"`` Muon for the blocks' matrices (``split_hidden_matrices``) and that AdamW for the rest.

    The fused kernel on CPU and CUDA: one pass over each tensor instead of a handful of ops per parameter (on CPU it
    takes 1% off a 6 x 384 training step, what nanoGPT's per-parameter loop costs more). Muon scales its update to
    AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``), so one ``--lr`` and one schedule serve both."""
    if kind not in OPTIMIZERS:
        raise OptimizerError(f"unknown optimizer {kind!r}: pass one of {', '.join(OPTIMIZERS)}")
    hidden, rest = split_hidden_matrices(module) if kind == "muon" else ([], None)
    if kind == "muon" and not hidden:
        raise OptimizerError("--optimizer muon trains the blocks' weight matrices, and none is trained here (LoRA "
                             "trains only its adapters): use --optimizer adamw")
    params = rest if rest is not None else [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))
    if kind == "adamw":
        return adamw
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw)


Optimizer = torch.optim.Optimizer | MuonWithAdamW
