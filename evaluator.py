"""Evaluation: perplexity, bits per byte, BLEU and ROUGE for GPTModel checkpoints."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F


@torch.no_grad()
def sum_nll(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str | None = None) -> tuple[float, int]:
    """Total next-token negative log-likelihood (nats) and the number of predicted tokens.

    Each batch holds ``input_ids`` and optionally ``attention_mask`` and ``labels`` (aligned with
    input_ids, shifted here as in causal LM; -100 and padding are not predicted).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch.get("attention_mask")
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        labels = batch.get("labels")
        labels = labels.to(device) if labels is not None else input_ids.clone()
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        logits = model(input_ids, attention_mask=attention_mask)["logits"]
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    model.train(was_training)
    return total_nll, total_tokens


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp of the token-weighted mean NLL (never a mean of batch means)."""
    if n_tokens == 0:
        raise ValueError("no tokens were predicted: the evaluation set is empty or fully masked")
    return math.exp(total_nll / n_tokens)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Tokenizer-independent loss: total NLL in bits divided by the UTF-8 bytes of the text it covers."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a positive number of text bytes")
    return total_nll / (math.log(2) * n_bytes)
