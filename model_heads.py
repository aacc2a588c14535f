"""The heads that turn a GPT backbone into another kind of model: ``GPTRewardModel`` (a scalar per position: PPO's
critic, and a score per sequence: the reward model) and ``GPTClassifier`` (class logits at the last real token).

Its own module, above ``gpt_model``: the language model knows nothing of them; the checkpoint loader builds either from
a checkpoint's ``model_class``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt_model import GPTConfig, GPTModel
from loss_labels import IGNORE_INDEX
from transformer_components import hidden_logprobs


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
    ("Build a Large Language Model (From Scratch)", ch. 6). ``labels`` names the classes (stored in checkpoints).

    The head has no bias by default, as Hugging Face's ``GPT2ForSequenceClassification`` (``score``), so a classifier
    exports exactly; ``head_bias=True`` builds the head of classifiers trained before that."""

    def __init__(self, config: GPTConfig, num_classes: int, labels: list[str] | None = None, head_bias: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} label names for {num_classes} classes")
        self.config = config
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.backbone = GPTModel(config)
        self.head = nn.Linear(config.d_model, num_classes, bias=head_bias)
        nn.init.normal_(self.head.weight, std=0.02)
        if head_bias:
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
