"""Log-probabilities and scores shared by the model, the trainers, the evaluator, PPO and DPO: the one place where
shifted next-token cross-entropy, per-token log-probs, NLL / perplexity / bits per byte, exact match, pairwise
accuracy and the classification scores (cross-entropy and accuracy, confusion matrix, precision, recall) are computed.
What is scored, in which batches, is ``scoring.py``'s.

Its own module because every training stage and the evaluator use the same functions, and none of them should import
another for it. The arithmetic the model's own loss needs (shifted cross-entropy, log-probs from hidden states) sits
below the model, in ``transformer_components``; the label convention in ``loss_labels``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from loss_labels import IGNORE_INDEX
from transformer_components import shifted_cross_entropy


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(labels[:, t+1] | prefix), mask), both (B, T-1); masked positions (label -100) hold 0.

    Computed as logit - logsumexp in float32, so it equals -cross_entropy token by token without a (B, T, V)
    log-softmax copy.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprobs = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logprobs, mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B,) sum (or mean, ``average=True``) of each row's scored token log-probs."""
    logprobs, mask = token_logprobs(logits, labels)
    total = logprobs.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def scored_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B,) ``sequence_logprobs`` of a GPT's logits, with its LM head applied only where a label is scored.

    Preference batches score a few answer tokens per row; the (B, T, V) head over the prompts is most of a small
    model's work, so DPO's policy and reference go through here (same values, tested). It calls the model's forward
    (``loss_only=True``), so a DDP-wrapped model synchronises its gradients as usual."""
    total = model(input_ids, attention_mask=attention_mask, labels=labels, loss_only=True)["sequence_logprobs"]
    return total / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1) if average else total


@torch.no_grad()
def sum_nll(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
            device: torch.device | str | None = None) -> tuple[float, int]:
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
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        logits = model(input_ids, attention_mask=attention_mask)["logits"]
        total_nll += shifted_cross_entropy(logits, labels, reduction="sum").item()
        total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
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


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("exact_match needs at least one prediction")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Fraction of pairs whose chosen answer scores strictly above the rejected one."""
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError("pairwise_accuracy needs equally many (>= 1) chosen and rejected scores")
    return sum(c > r for c, r in zip(chosen_scores, rejected_scores)) / len(chosen_scores)


def class_scores(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Cross-entropy of (N, num_classes) class logits against (N,) class ids, and the accuracy of their argmax."""
    return {"loss": F.cross_entropy(logits, targets, label_smoothing=label_smoothing),
            "accuracy": (logits.argmax(-1) == targets).float().mean()}


def confusion_matrix(targets: Sequence[int] | torch.Tensor, predictions: Sequence[int] | torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    targets, predictions = torch.as_tensor(targets, dtype=torch.long), torch.as_tensor(predictions, dtype=torch.long)
    if targets.shape != predictions.shape or targets.dim() != 1:
        raise ValueError(f"confusion_matrix needs two equally long 1-D sequences, got {tuple(targets.shape)} and "
                         f"{tuple(predictions.shape)}")
    both = torch.cat([targets, predictions])
    if both.numel() and (both.min() < 0 or both.max() >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes}), got {both.min().item()}..{both.max().item()}")
    counts = torch.bincount(targets * num_classes + predictions, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def precision_recall(confusion: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-class precision (correct / predicted as the class) and recall (correct / truly the class) of a confusion
    matrix; a class never predicted (or never present) gets 0."""
    correct = confusion.diagonal().double()
    predicted, actual = confusion.sum(0).double(), confusion.sum(1).double()
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), torch.zeros_like(correct))
    recall = torch.where(actual > 0, correct / actual.clamp(min=1), torch.zeros_like(correct))
    return precision.tolist(), recall.tolist()
