"""Every training objective, as functions of tensors (hand-checked in tests/test_losses.py): the causal LM loss
(pretraining and SFT), the reward model's Bradley-Terry loss, DPO / IPO / conservative DPO / DPO-Positive with the RPO
NLL term, classification's cross-entropy, and PPO's and GRPO's pieces (KL-penalised rewards, GAE, whitening, the
clipped policy and value losses, group-normalised advantages).

Its own module (torch and ``metrics`` only) so that the stages, the RL step strategies and the benchmarks share one
definition of each, and none of them imports another for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import metrics
from loss_labels import IGNORE_INDEX

# ----------------------------------------------------------------------------- language modelling


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy; ``labels`` (-100 = not scored, e.g. SFT prompts) default to the input ids."""
    labels = batch.get("labels", batch["input_ids"])
    sparse = "labels" in batch  # SFT-style labels score a few positions: apply the LM head only there
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                 loss_only=sparse)["loss"]


def chosen_answer_nll(sequence_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of the chosen answers: the first half of a pair batch (RPO's and GRM's SFT term)."""
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    return -(sequence_logprobs / tokens).chunk(2)[0].mean()


# ----------------------------------------------------------------------------- preferences

def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """-log σ(r_chosen − r_rejected), averaged: the reward model's pairwise loss. ``label_smoothing`` ε assumes a
    fraction ε of the labels flipped, -(1-ε)·log σ(Δ) - ε·log σ(-Δ), which bounds the margins at log((1-ε)/ε)."""
    margin = chosen_scores - rejected_scores
    if not label_smoothing:
        return -F.logsigmoid(margin).mean()
    return -((1 - label_smoothing) * F.logsigmoid(margin) + label_smoothing * F.logsigmoid(-margin)).mean()


def reward_loss(model: nn.Module, batch: dict[str, torch.Tensor], nll_weight: float = 0.0,
                label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Bradley-Terry on one padded batch whose first half is the chosen answers and second half the rejected; with
    ``nll_weight``, plus that times the chosen answers' per-token NLL under the backbone's LM head (GRM's
    regulariser: the backbone keeps what the SFT model knows while the head learns to score)."""
    scores, logprobs = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    chosen, rejected = scores.chunk(2)
    preference = bradley_terry_loss(chosen, rejected, label_smoothing)
    out = {"loss": preference, "accuracy": (chosen > rejected).float().mean()}
    if nll_weight:
        nll = chosen_answer_nll(logprobs, batch["labels"])
        out.update(loss=preference + nll_weight * nll, preference_loss=preference.detach(), chosen_nll=nll.detach())
    return out


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             ipo: bool = False, dpop_lambda: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al.) on sequence log-probs: (mean loss, implicit reward of chosen, of rejected).

    h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l)); DPO: −log σ(βh); label smoothing ε:
    (conservative DPO) −(1−ε)·log σ(βh) − ε·log σ(−βh); IPO (Azar et al.): (h − 1/(2β))². DPO-Positive (Pal et
    al., 2024) subtracts λ·max(0, log π_ref(y_w) − log π(y_w)) from h: a chosen answer may not become less likely
    than under the reference. The implicit rewards are β·(log π − log π_ref) of each answer.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if dpop_lambda:
        h = h - dpop_lambda * (ref_chosen - policy_chosen).clamp(min=0)
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()

@dataclass(eq=False)
class DPOLoss:
    """DPO's loss on a pair batch (chosen rows first, rejected rows second) against a frozen reference, plus the RPO
    term (``nll_weight`` x the chosen answers' per-token NLL): the loss_fn of ``finetune.py --mode dpo``."""

    reference: nn.Module
    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo: bool = False
    dpop_lambda: float = 0.0
    nll_weight: float = 0.0

    @staticmethod
    def logps(net: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return metrics.scored_logprobs(net, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def __call__(self, net: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        with torch.no_grad():  # the reference's log-probs: once per batch, no graph
            ref_chosen, ref_rejected = (self.logps(self.reference, batch) / (tokens if self.ipo else 1)).chunk(2)
        total = self.logps(net, batch)
        chosen, rejected = (total / (tokens if self.ipo else 1)).chunk(2)  # IPO uses per-token means
        loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                        self.label_smoothing, self.ipo, self.dpop_lambda)
        nll = chosen_answer_nll(total, batch["labels"])
        return {"loss": loss + self.nll_weight * nll, "preference_loss": loss.detach(),
                "accuracy": (chosen_reward > rejected_reward).float().mean(),
                "margin": (chosen_reward - rejected_reward).mean(), "chosen_nll": nll.detach()}


# ----------------------------------------------------------------------------- classification

def classify_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                  label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Cross-entropy of the class logits at each sequence's last real token; also the batch accuracy."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return metrics.class_scores(logits, batch["label"], label_smoothing)


# ----------------------------------------------------------------------------- PPO and GRPO

def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −β·(log π − log π_ref), plus the sequence's score at its last response token; the KL.

    All (B, N) over response positions; ``mask`` marks real response tokens (at least one per row, contiguous).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.bool() * torch.arange(1, mask.size(1) + 1, device=mask.device)).argmax(1)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, N) response steps: (advantages, returns = advantages + values).

    δ_t = r_t + γ V_{t+1} − V_t with V = 0 after the last real token; A_t = δ_t + γλ A_{t+1}.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        valid = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * valid
        advantages[:, t] = next_advantage
        next_value = values[:, t] * valid
    return advantages, advantages + values * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate, −min(ρA, clip(ρ, 1±ε)A), masked mean; and the fraction of tokens clipped."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float) -> torch.Tensor:
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²), masked mean: the critic may not move far per update."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each reward normalised within its group, (r − mean) / (std + ε); rewards (n_groups, group_size).

    A group whose rewards are all equal teaches nothing and gets zero advantages.
    """
    std = rewards.std(1, keepdim=True)
    centred = rewards - rewards.mean(1, keepdim=True)
    return torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred))  # exact zeros, not rounding noise
