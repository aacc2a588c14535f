"""Finetuning on the shared training loop: SFT (full or LoRA), a reward model, and RLHF with PPO.

    python finetune.py --mode sft                  # models/pretrain/pretrain_best.pth -> models/sft/sft_best.pth
    python finetune.py --mode sft --lora_r 8 --merge_lora
    python finetune.py --mode reward               # models/sft/sft_best.pth -> models/reward/reward_best.pth
    python finetune.py --mode rlhf                 # the reward model first (unless --reward_model), then PPO
    python finetune.py --mode dpo                  # DPO on the preference pairs against the frozen SFT model
    python finetune.py --mode rlvf                 # GRPO with automatic verifiers instead of a reward model

SFT and the reward model are ``training.Trainer`` with a batch source and a loss. PPO has its own rollout loop
(generate with the decode engine, score, GAE, clipped updates) built from the same pieces: the optimizer, the
checkpoint format, ``RunFolder`` (metrics.jsonl, curve, safe output folder), signals and the time budget.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in pretrain_trainer: sleeping threads on a shared CPU

import abc
import argparse
import copy
import functools
import json
import math
import signal
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import checkpoints
import cli
import data_loader
import lora
import metrics
import training
from checkpoints import CheckpointError
from cli import Interrupted
from decoding import SamplingParams, cut_at_eos, generate_responses, left_pad
from devices import set_threads
from gpt_model import GPTModel
from model_heads import GPTClassifier, GPTRewardModel, freeze_all_but_last
from prompts import build_sft_prompt, record_instruction, record_prompt_ids
from readers import load_preference_records, load_sft_records
from training import TrainError
from verifiers import VERIFIERS, verifiable_reward

PROCESS_START = time.time()
MODES = ("sft", "reward", "rlhf", "dpo", "rlvf", "classify")
STAGE_DEFAULTS = {  # step budgets, so results do not depend on machine load; ~4-5 minutes each on 2 CPU cores
    "sft": dict(output_dir="models/sft", lr=3e-3, batch_size=32, warmup_steps=50, max_steps=5000,  # held-out sums:
                eval_interval=500, weight_decay=0.1, min_lr_ratio=0.1),  # EM 0.4-0.9 at 2,500 steps, 0.99 at 5,000
    "reward": dict(output_dir="models/reward", lr=1e-3, batch_size=32, warmup_steps=30, max_steps=3000,
                   eval_interval=250, weight_decay=0.1, min_lr_ratio=0.1,  # held-out pairwise accuracy: 0.72
                   reward_nll_weight=1.0, label_smoothing=0.1,  # (lr 3e-4, no terms), 0.77 (both regularisers),
                   reward_likelihood_weight=1.0),  # and the answer's likelihood in the score
    "rlhf": dict(output_dir="models/rlhf", lr=1e-5, batch_size=32, warmup_steps=0, max_steps=150,
                 eval_interval=25, weight_decay=0.0, min_lr_ratio=1.0, log_interval=1, rollout_batch_size=32,
                 kl_coef=0.2),  # TRL's init_kl_coef: at 0.05 the policy drifted from the SFT answers
    "dpo": dict(output_dir="models/dpo", lr=3e-4, batch_size=32, warmup_steps=20, max_steps=600,
                eval_interval=100, weight_decay=0.0, min_lr_ratio=0.1, label_smoothing=0.0,
                dpo_nll_weight=1.0),  # without it held-out exact match fell 0.671 -> 0.596; with it 0.665
    "rlvf": dict(output_dir="models/rlvf", lr=2e-5, batch_size=32, warmup_steps=0, max_steps=100,
                 eval_interval=20, weight_decay=0.0, min_lr_ratio=1.0, log_interval=1, rollout_batch_size=8,
                 kl_coef=0.05),
    "classify": dict(output_dir="models/classify", lr=5e-4, batch_size=32, warmup_steps=30, max_steps=400,
                     eval_interval=50, weight_decay=0.1, min_lr_ratio=0.1, label_smoothing=0.1),
}


@dataclass
class FinetuneConfig(training.TrainConfig):
    """Every finetuning setting: the loop's, the data and models', LoRA's and PPO's; stored as ``train_args``."""

    mode: str = "sft"
    data_path: str = "data/sft/sft_data.json"
    test_data_path: str = "data/sft/sft_test.json"
    pairwise_data: str = "data/sft/rlhf_pairwise.json"
    pairwise_test_data: str = "data/sft/rlhf_pairwise_test.json"
    pretrained_model: str = "models/pretrain/pretrain_best.pth"
    sft_model: str = "models/sft/sft_best.pth"
    reward_model: str | None = None
    tokenizer_dir: str | None = None
    dropout: float = 0.0
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "c_attn,c_proj,c_fc"
    merge_lora: bool = False
    eval_samples: int = 300
    # classification
    classify_train: str = "data/classify/train.jsonl"
    classify_test: str = "data/classify/test.jsonl"
    trainable_blocks: int | None = None
    label_smoothing: float = 0.0  # classify: of the cross-entropy; dpo: conservative DPO (per-mode defaults)
    # PPO
    ppo_epochs: int = 4
    rollout_batch_size: int = 32
    ppo_minibatch_size: int = 16
    max_new_tokens: int = 16
    rollout_temperature: float = 1.0
    kl_coef: float = 0.05
    target_kl: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.5
    critic_lr: float = 1e-4
    # reward model
    reward_nll_weight: float = 0.0  # GRM (Yang et al., 2024): + weight x NLL of the chosen answer
    reward_likelihood_weight: float = 0.0  # > 0: the score adds (learned weight) x the answer's mean log-prob
    # DPO
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    dpo_nll_weight: float = 0.0  # RPO (Pang et al., 2024): + weight x NLL of the chosen answer (dpo default: 1)
    dpop_lambda: float = 0.0  # DPO-Positive (Pal et al., 2024): penalise the chosen answer falling below the reference
    # GRPO
    group_size: int = 8
    format_weight: float = 0.1
    skip_uniform_groups: bool = True


# ----------------------------------------------------------------------------- losses (pure functions, tested)

def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """-log σ(r_chosen − r_rejected), averaged: the reward model's pairwise loss. ``label_smoothing`` ε assumes a
    fraction ε of the labels flipped, -(1-ε)·log σ(Δ) - ε·log σ(-Δ), which bounds the margins at log((1-ε)/ε)."""
    margin = chosen_scores - rejected_scores
    if not label_smoothing:
        return -F.logsigmoid(margin).mean()
    return -((1 - label_smoothing) * F.logsigmoid(margin) + label_smoothing * F.logsigmoid(-margin)).mean()


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


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each reward normalised within its group, (r − mean) / (std + ε); rewards (n_groups, group_size).

    A group whose rewards are all equal teaches nothing and gets zero advantages.
    """
    std = rewards.std(1, keepdim=True)
    centred = rewards - rewards.mean(1, keepdim=True)
    return torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred))  # exact zeros, not rounding noise


class AdaptiveKLController:
    """Ziegler et al. (2019): move β so the measured KL tracks a target (proportional control, clipped ±20%)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- shared setup

def load_base(path: str, tokenizer_dir: str | None, flag: str):
    """(model on CPU in train mode, tokenizer, checkpoint dict) of a language-model checkpoint."""
    if not Path(path).exists():
        hint = {"--pretrained_model": "run `python pretrain_trainer.py` first",
                "--sft_model": "run `python finetune.py --mode sft` first"}.get(flag, "pass an existing checkpoint")
        raise TrainError(f"{flag} {path} does not exist: {hint}, or pass {flag} PATH")
    loaded = checkpoints.load(path, tokenizer_dir, device="cpu", trainable=True, expect="lm", flag=flag)
    return loaded.model, loaded.tokenizer, loaded.metadata


def check_records_fit(dataset, name: str, max_seq_len: int) -> None:
    if getattr(dataset, "num_truncated", 0):
        print(f"note: {dataset.num_truncated} example(s) of {name} exceed the model's context ({max_seq_len} tokens) "
              "and were truncated")


def language_model_eval(dataset, tokenizer, batch_size: int, device: torch.device):
    """evaluate_fn: held-out response NLL (prompt tokens are not scored), as val_loss and val_ppl."""
    collate = functools.partial(data_loader.collate_batch, pad_token_id=tokenizer.pad_token_id)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    batches = [collate([dataset[i] for i in order[k:k + batch_size]]) for k in range(0, len(order), batch_size)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        total, n_tokens = metrics.sum_nll(model, batches, device)
        return {"val_loss": total / n_tokens, "val_ppl": metrics.perplexity(total, n_tokens)}

    return evaluate


def resume_or(config: FinetuneConfig, resume: str | None, prefix: str, tokenizer,
              build) -> tuple[nn.Module, dict | None, str | None]:
    """(model, checkpoint, its path): the checkpoint's model when resuming, else ``build()`` under ``--seed`` (a new
    head's initialisation, a LoRA adapter's, is the same on every run of the same command)."""
    checkpoint, resumed_from = training.find_resume_checkpoint(resume, config.output_dir, prefix, tokenizer)
    if checkpoint is None:
        torch.manual_seed(config.seed)
        return build(), None, None
    return checkpoints.build_model(checkpoint, resumed_from).train(), checkpoint, resumed_from


# ----------------------------------------------------------------------------- SFT

def run_sft(config: FinetuneConfig, resume: str | None, show_progress: bool = True,
            stop_after: int | None = None) -> dict[str, Any]:
    """Supervised finetuning (prompt tokens masked); best held-out response loss -> <output_dir>/sft_best.pth.

    ``stop_after`` ends the run after that step's checkpoint, as if it were killed there (for tests)."""
    base, tokenizer, base_checkpoint = load_base(config.pretrained_model, config.tokenizer_dir, "--pretrained_model")
    template = checkpoints.template_of(base_checkpoint)
    max_len = base.config.max_seq_len
    train_set = data_loader.GPTSFTDataset(config.data_path, tokenizer, max_len, template)
    test_set = data_loader.GPTSFTDataset(config.test_data_path, tokenizer, max_len, template)
    check_records_fit(train_set, config.data_path, max_len)

    def build() -> nn.Module:
        base.config.dropout = config.dropout
        model = GPTModel(base.config)
        model.load_state_dict(base.state_dict())
        if config.lora_r:
            lora.apply_lora(model, config.lora_targets.split(","), config.lora_r, config.lora_alpha,
                            config.lora_dropout)
        return model

    model, checkpoint, resumed_from = resume_or(config, resume, "sft", tokenizer, build)
    if lora.lora_layers(model):
        lora.mark_only_lora_trainable(model)
    trainable, total = lora.count_parameters(model)
    print(f"sft: {len(train_set)} train / {len(test_set)} held-out examples, context {max_len}; "
          f"trainable parameters {trainable:,} of {total:,}" + (" (LoRA)" if lora.lora_layers(model) else ""))
    info, device = training.init_distributed(config.device)
    collate = functools.partial(data_loader.collate_batch, pad_token_id=tokenizer.pad_token_id)
    batches = data_loader.ShuffledBatches(train_set, config.batch_size, collate, config.seed, info.rank,
                                          info.world_size)
    extra = {"sft_template": template, "base_model": str(config.pretrained_model),
             "lora": lora.lora_config(model) if lora.lora_layers(model) else None}
    trainer = training.Trainer(config, model, tokenizer, batches, training.causal_lm_loss, prefix="sft",
                               evaluate_fn=language_model_eval(test_set, tokenizer, config.batch_size, device),
                               steps_per_epoch=batches.batches_per_epoch / config.grad_accum, checkpoint=checkpoint,
                               resumed_from=resumed_from, checkpoint_extra=extra, start_time=PROCESS_START,
                               show_progress=show_progress)
    trainer.train(stop_after)
    best = Path(config.output_dir) / "sft_best.pth"
    if info.is_main and extra["lora"]:
        finish_lora(best, config)
    return {"stage": "sft", "steps": trainer.step, "best_val_loss": trainer.best_val_loss, "checkpoint": str(best)}


def finish_lora(best: Path, config: FinetuneConfig) -> None:
    """Write the adapters alone (small, loadable on the base model); with --merge_lora make sft_best.pth plain."""
    loaded = checkpoints.load(best, device="cpu", trainable=True)
    model, checkpoint = loaded.model, loaded.metadata
    adapter = best.with_name("sft_lora_adapter.pth")
    lora.save_lora(adapter, model, base_model=str(Path(config.pretrained_model).resolve()),
                   config=model.config.to_dict(), tokenizer_fingerprint=checkpoint["tokenizer_fingerprint"],
                   sft_template=checkpoint["sft_template"])
    print(f"LoRA adapters: {adapter} ({adapter.stat().st_size / 1e6:.2f} MB)")
    if config.merge_lora:
        lora.merge_lora(model)
        keep = {k: v for k, v in checkpoint.items() if k not in ("config", "lora")}
        checkpoints.save_checkpoint(best, model, **keep, lora=None)
        print(f"merged the adapters into {best} (a plain checkpoint)")


# ----------------------------------------------------------------------------- reward model

def chosen_answer_nll(sequence_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of the chosen answers: the first half of a pair batch (RPO's and GRM's SFT term)."""
    tokens = (labels[:, 1:] != metrics.IGNORE_INDEX).sum(-1).clamp(min=1)
    return -(sequence_logprobs / tokens).chunk(2)[0].mean()


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


@torch.no_grad()
def score_pairs(model: nn.Module, dataset, pad_id: int, batch_size: int,
                device: torch.device) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of every pair in a preference dataset."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        batch = data_loader.collate_pairs([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                          pad_id)
        scores = model.score(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
        c, r = scores.chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    model.train(was_training)
    return chosen, rejected


def reward_eval(dataset, pad_id: int, batch_size: int, device: torch.device):
    def evaluate(model: nn.Module) -> dict[str, float]:
        chosen, rejected = score_pairs(model, dataset, pad_id, batch_size, device)
        c, r = torch.tensor(chosen), torch.tensor(rejected)
        return {"val_loss": float(bradley_terry_loss(c, r)),
                "val_accuracy": metrics.pairwise_accuracy(chosen, rejected), "val_margin": float((c - r).mean())}

    return evaluate


def load_preference_stage(config: FinetuneConfig):
    """(SFT model, tokenizer, its template, train pairs, held-out pairs) for the stages that learn from preferences."""
    sft, tokenizer, sft_checkpoint = load_base(config.sft_model, config.tokenizer_dir, "--sft_model")
    template = checkpoints.template_of(sft_checkpoint)
    max_len = sft.config.max_seq_len
    train_set = data_loader.PreferencePairDataset(config.pairwise_data, tokenizer, max_len, template)
    test_set = data_loader.PreferencePairDataset(config.pairwise_test_data, tokenizer, max_len, template)
    check_records_fit(train_set, config.pairwise_data, max_len)
    return sft, tokenizer, template, train_set, test_set


def run_reward(config: FinetuneConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Reward model on preference pairs -> <output_dir>/reward_best.pth (best held-out Bradley-Terry loss)."""
    sft, tokenizer, template, train_set, test_set = load_preference_stage(config)
    model, checkpoint, resumed_from = resume_or(config, resume, "reward", tokenizer,
                                                lambda: GPTRewardModel.from_language_model(
                                                    sft, config.reward_likelihood_weight))
    print(f"reward: {len(train_set)} train / {len(test_set)} held-out pairs, from {config.sft_model}, "
          f"NLL weight {config.reward_nll_weight}, label smoothing {config.label_smoothing}, answer likelihood "
          f"{'in the score' if model.likelihood else 'not used'}")
    info, device = training.init_distributed(config.device)
    collate = functools.partial(data_loader.collate_pairs, pad_token_id=tokenizer.pad_token_id)
    batches = data_loader.ShuffledBatches(train_set, config.batch_size, collate, config.seed, info.rank,
                                          info.world_size)
    loss_fn = functools.partial(reward_loss, nll_weight=config.reward_nll_weight,
                                label_smoothing=config.label_smoothing)
    trainer = training.Trainer(config, model, tokenizer, batches, loss_fn, prefix="reward",
                               evaluate_fn=reward_eval(test_set, tokenizer.pad_token_id, 64, device),
                               steps_per_epoch=batches.batches_per_epoch / config.grad_accum, checkpoint=checkpoint,
                               resumed_from=resumed_from, start_time=PROCESS_START, show_progress=show_progress,
                               checkpoint_extra={"model_class": "reward", "reward_likelihood": model.likelihood,
                                                 "sft_template": template,
                                                 "base_model": str(config.sft_model)})
    last = trainer.train()
    best = Path(config.output_dir) / "reward_best.pth"
    return {"stage": "reward", "steps": trainer.step, "best_val_loss": trainer.best_val_loss,
            "val_accuracy": last.get("val_accuracy"), "checkpoint": str(best)}


# ----------------------------------------------------------------------------- classification

def classify_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                  label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Cross-entropy of the class logits at each sequence's last real token; also the batch accuracy."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return {"loss": F.cross_entropy(logits, batch["label"], label_smoothing=label_smoothing),
            "accuracy": (logits.argmax(-1) == batch["label"]).float().mean()}


def classify_eval(dataset, batch_size: int, device: torch.device):
    """evaluate_fn: held-out cross-entropy (val_loss, picks classify_best.pth) and accuracy."""
    import evaluator  # lazy: the classification inference lives with the other evaluations

    def evaluate(model: nn.Module) -> dict[str, float]:
        logits, targets = evaluator.classify_logits(model, dataset, batch_size, device)
        return {"val_loss": float(F.cross_entropy(logits, targets)),
                "val_accuracy": float((logits.argmax(-1) == targets).float().mean())}

    return evaluate


def run_classify(config: FinetuneConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Classification finetuning (a class head on the last real token, optionally only the last N blocks trained)
    -> <output_dir>/classify_best.pth (best held-out cross-entropy); then accuracy, per-class precision / recall and
    the confusion matrix of that checkpoint on the test set (printed, and <output_dir>/confusion_matrix.png)."""
    base, tokenizer, _ = load_base(config.pretrained_model, config.tokenizer_dir, "--pretrained_model")
    max_len = base.config.max_seq_len
    train_set = data_loader.ClassificationDataset(config.classify_train, tokenizer, max_len)
    test_set = data_loader.ClassificationDataset(config.classify_test, tokenizer, max_len, train_set.labels)
    check_records_fit(train_set, config.classify_train, max_len)
    if config.trainable_blocks is not None and config.trainable_blocks > base.config.n_layers:
        raise TrainError(f"--trainable_blocks {config.trainable_blocks} exceeds the model's {base.config.n_layers} "
                         "blocks; pass at most that (or leave it out to train everything)")
    base.config.dropout = config.dropout
    build = functools.partial(GPTClassifier.from_language_model, base, train_set.labels)
    model, checkpoint, resumed_from = resume_or(config, resume, "classify", tokenizer, build)
    if model.labels != train_set.labels:
        raise TrainError(f"the checkpoint's classes {model.labels} differ from {config.classify_train}'s "
                         f"{train_set.labels}: resume with the same data or start a fresh run")
    if config.trainable_blocks is not None:
        freeze_all_but_last(model, config.trainable_blocks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"classify: {len(train_set)} train / {len(test_set)} held-out texts, classes {train_set.labels}; trainable "
          f"parameters {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    info, device = training.init_distributed(config.device)
    collate = functools.partial(data_loader.collate_batch, pad_token_id=tokenizer.pad_token_id)
    batches = data_loader.ShuffledBatches(train_set, config.batch_size, collate, config.seed, info.rank,
                                          info.world_size)
    loss_fn = functools.partial(classify_loss, label_smoothing=config.label_smoothing)
    trainer = training.Trainer(config, model, tokenizer, batches, loss_fn, prefix="classify",
                               evaluate_fn=classify_eval(test_set, 64, device),
                               steps_per_epoch=batches.batches_per_epoch / config.grad_accum, checkpoint=checkpoint,
                               resumed_from=resumed_from, start_time=PROCESS_START, show_progress=show_progress,
                               checkpoint_extra={"model_class": "classify", "labels": train_set.labels,
                                                 "base_model": str(config.pretrained_model)})
    trainer.train()
    best = Path(config.output_dir) / "classify_best.pth"
    summary = {"stage": "classify", "steps": trainer.step, "best_val_loss": trainer.best_val_loss,
               "checkpoint": str(best)}
    if info.is_main:
        summary.update(classify_report(best, test_set, device, Path(config.output_dir) / "confusion_matrix.png"))
    return summary


def classify_report(checkpoint: Path, test_set, device: torch.device, plot_path: Path) -> dict[str, Any]:
    """Accuracy, per-class precision / recall and the confusion matrix of a classifier checkpoint, printed and
    plotted."""
    import evaluator

    model, _ = checkpoints.load_model_and_tokenizer(checkpoint, device=device)
    logits, targets = evaluator.classify_logits(model, test_set, 64, device)
    report = evaluator.classification_metrics(targets, logits.argmax(-1), model.labels)
    print(f"held-out accuracy {report['accuracy']:.4f} (majority class {report['majority_baseline']:.4f}, "
          f"{report['n_samples']} texts)")
    for label in model.labels:
        print(f"  {label:<14} precision {report[f'precision/{label}']:.3f}  recall {report[f'recall/{label}']:.3f}")
    print("confusion matrix (rows: true class, columns: predicted)\n"
          + evaluator.format_confusion(report["confusion_matrix"], model.labels))
    evaluator.plot_confusion_matrix(report["confusion_matrix"], model.labels, plot_path,
                                    title=f"{checkpoint.name}: accuracy {report['accuracy']:.3f}")
    print(f"confusion matrix plot: {plot_path}")
    return {k: v for k, v in report.items() if k != "labels"}


def classify_text(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 64) -> list[str]:
    """The predicted label of each text (see evaluator.classify_text)."""
    import evaluator

    return evaluator.classify_text(model, tokenizer, texts, batch_size)


def add_classify_arguments(p: argparse.ArgumentParser, d: FinetuneConfig) -> None:
    """--mode classify's flags."""
    p.add_argument("--classify_train", default=d.classify_train,
                   help="classify: training texts, .jsonl of {\"text\", \"label\"} (labels are class names)")
    p.add_argument("--classify_test", default=d.classify_test,
                   help="classify: held-out texts (picks classify_best.pth; accuracy, precision/recall, confusion)")
    p.add_argument("--trainable_blocks", type=cli.nonnegative_int, default=None,
                   help="classify: train only the last N transformer blocks + final norm + head (0 = norm and head "
                        "only); default: the whole model")
    p.add_argument("--label_smoothing", type=cli.fraction, default=d.label_smoothing,
                   help="dpo and reward: assumed fraction of flipped preference labels (conservative DPO / "
                        "Bradley-Terry: bounds the margins; held-out loss stays the plain one); classify: label "
                        "smoothing of the training cross-entropy (keeps the model from growing "
                        "overconfident on a small training set, so held-out cross-entropy, which picks "
                        "classify_best.pth, keeps tracking accuracy); evaluation uses the plain cross-entropy")


# ----------------------------------------------------------------------------- PPO

@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them; response tensors are (B, N)."""

    sequences: torch.Tensor  # (B, T) prompt + response, left-padded (see Samples)
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


@dataclass
class Samples:
    """Responses to prompts as one tensor. Each row is prompt + response, left-padded so that every response ends in
    the last column; the response window is the last N columns (N: the longest response), where ``response_mask``
    marks each row's own tokens (its EOS included)."""

    sequences: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    response_start: int  # T - N: the window's first column
    response_mask: torch.Tensor  # (B, N) float
    responses: list[list[int]]


def sample_responses(policy: GPTModel, prompts: list[list[int]], max_new_tokens: int, tokenizer,
                     do_sample: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None,
                     batch_size: int = 64) -> Samples:
    """Responses through the decode engine (no top-k), each prompt with its own room in the context."""
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=0,
                            eos_token_id=tokenizer.eos_token_id)
    responses = generate_responses(policy, prompts, params, batch_size, generator)
    rows = [p + r for p, r in zip(prompts, responses)]
    width, n = max(map(len, rows)), max(map(len, responses))
    sequences, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    response_mask = torch.zeros(len(rows), n)
    for i, response in enumerate(responses):
        response_mask[i, n - len(response):] = 1
    device = next(policy.parameters()).device
    return Samples(sequences.to(device), attention_mask.to(device), width - n, response_mask.to(device), responses)


def response_logprobs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(token | prefix), entropy of π there) over the response window, both (B, N), via metrics.token_logprobs."""
    logits = model(sequences, attention_mask=attention_mask)["logits"]
    labels = sequences.masked_fill(attention_mask == 0, metrics.IGNORE_INDEX)
    logprobs, _ = metrics.token_logprobs(logits, labels)
    window = logits[:, response_start - 1:-1].float()
    entropy = -(window.softmax(-1) * window.log_softmax(-1)).sum(-1)
    return logprobs[:, response_start - 1:], entropy


def response_kl(policy: nn.Module, reference: nn.Module, samples: Samples) -> torch.Tensor:
    """(B,) exact KL(π ‖ π_ref) summed over each response's tokens (full distributions, not a sampled estimate)."""
    window = slice(samples.response_start - 1, -1)
    log_p, log_q = (net(samples.sequences, attention_mask=samples.attention_mask)["logits"][:, window].float()
                    .log_softmax(-1) for net in (policy, reference))
    return ((log_p.exp() * (log_p - log_q)).sum(-1) * samples.response_mask).sum(1)


def response_labels(samples: Samples) -> torch.Tensor:
    """(B, T) labels of the response tokens, -100 elsewhere: what a reward model scores."""
    labels = torch.full_like(samples.sequences, metrics.IGNORE_INDEX)
    window = samples.sequences[:, samples.response_start:]
    labels[:, samples.response_start:] = window.masked_fill(~samples.response_mask.bool(), metrics.IGNORE_INDEX)
    return labels


class RLTrainer(abc.ABC):
    """What PPO and GRPO share: a trainable policy and a frozen reference, the prompt stream, the step/time budget,
    signals, ``RunFolder`` logging, best/step checkpoints and exact resume. Subclasses add their models and
    implement ``train_step`` (rollouts + updates -> a log row) and ``held_out`` (metrics with a val_loss)."""

    prefix = "rl"

    def __init__(self, config: FinetuneConfig, policy: GPTModel, tokenizer, prompts: list, eval_records: list[dict],
                 template: str, show_progress: bool = True):
        self.config, self.tokenizer, self.template, self.show_progress = config, tokenizer, template, show_progress
        self.info, self.device = training.init_distributed(config.device)
        if self.info.enabled:
            raise TrainError(f"{self.prefix} runs in one process: launch it without torchrun")
        torch.manual_seed(config.seed)
        self.policy = policy.to(self.device).train()
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.policy_optimizer = training.configure_optimizer(self.policy, config.weight_decay, config.lr,
                                                              (config.beta1, config.beta2), self.device.type)
        self.scheduled = [(self.policy_optimizer, config.lr)]  # (optimizer, peak lr) pairs the schedule sets
        self.prompts = data_loader.ShuffledBatches(prompts, config.rollout_batch_size, list, config.seed)
        self.eval_records = eval_records
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.step, self.train_seconds, self.best_val_loss, self.last_saved = 0, 0.0, math.inf, None
        self.output_dir = Path(config.output_dir)

    def start(self, checkpoint: dict | None, resumed_from: str | None) -> None:
        """Restore a checkpoint (after the subclass built its models) and open the output folder."""
        self.last_saved = resumed_from
        if checkpoint:
            self._restore(checkpoint, resumed_from)
        self.run = training.RunFolder(self.output_dir, self.prefix, self.tokenizer, resumed_from, self.step)

    # -- what a subclass provides
    @abc.abstractmethod
    def train_step(self) -> dict[str, float]:
        """One step: rollouts and updates; returns the row to log."""

    @abc.abstractmethod
    def held_out(self) -> dict[str, float]:
        """Held-out metrics, with a val_loss (lower is better) that picks <prefix>_best.pth."""

    def extra_state(self) -> dict[str, Any]:
        """Tensors/state besides the policy and its optimizer that a resumable checkpoint needs."""
        return {}

    def load_extra_state(self, checkpoint: dict) -> None:
        pass

    # -- shared pieces
    def sample(self, prompts: list[list[int]]) -> Samples:
        """The rollout: one sampled response per prompt at the rollout temperature."""
        return sample_responses(self.policy, prompts, self.config.max_new_tokens, self.tokenizer,
                                temperature=self.config.rollout_temperature, generator=self.generator,
                                batch_size=len(prompts))

    def optimize(self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not torch.isfinite(loss):
            raise TrainError(f"the {self.prefix} loss became non-finite at step {self.step + 1}: lower --lr or "
                             f"raise --kl_coef; the last good checkpoint is {self.last_saved or 'none'}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.grad_clip)
        optimizer.step()

    def apply_schedule(self) -> float:
        """The training loop's warmup + cosine (``training.lr_at``) for this step, on every optimizer (each scaled
        from its own peak lr); returns the policy's lr."""
        c = self.config
        progress = training.run_progress(self.step, c.max_steps, self.train_seconds,
                                         self.time_budget if c.max_minutes else None)
        scale = training.lr_at(progress, self.step, c) / c.lr
        for optimizer, peak in self.scheduled:
            for group in optimizer.param_groups:
                group["lr"] = peak * scale
        return c.lr * scale

    def train(self) -> dict[str, float]:
        c = self.config
        self.time_budget = (c.max_minutes or 0) * 60 - (time.time() - PROCESS_START)
        if c.max_minutes and self.time_budget <= self.train_seconds:
            raise TrainError(f"--max_minutes {c.max_minutes} is used up before {self.prefix} starts: raise it")
        last_eval: dict[str, float] = {}
        if self.step == 0:
            last_eval = self.evaluate()  # the starting (SFT) policy's own held-out figures, for comparison
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.prefix, disable=not self.show_progress)
        prior, start = self.train_seconds, time.time()
        with training.StopSignals() as stop:
            while not self._finished() and stop.signum is None:
                lr = self.apply_schedule()
                row = {"step": self.step + 1, "lr": lr, **self.train_step()}
                self.step += 1
                self.run.log(row)
                bar.update(1)
                bar.set_postfix(reward=f"{row.get('reward', 0):.3f}")
                self.train_seconds = prior + time.time() - start
                finished = self._finished()
                if self.step % c.eval_interval == 0 or finished:
                    last_eval = self.evaluate()
                if self.step % (c.save_interval or c.eval_interval) == 0 or finished or stop.signum is not None:
                    self.save(self.output_dir / f"{self.prefix}_step_{self.step}.pth")
        bar.close()
        self.run.plot()
        if stop.signum is not None:
            raise Interrupted(stop.signum, f"stopped by {signal.Signals(stop.signum).name} at step {self.step}: "
                                           f"saved {self.last_saved}; continue with --resume auto")
        return last_eval

    def _finished(self) -> bool:
        c = self.config
        return bool((c.max_steps and self.step >= c.max_steps) or
                    (c.max_minutes and self.train_seconds >= self.time_budget))

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics; the lowest val_loss writes ``<prefix>_best.pth`` (the policy, a plain LM checkpoint)."""
        result = {"step": self.step, **self.held_out()}
        self.run.log(result)
        if result["val_loss"] < self.best_val_loss:
            self.best_val_loss = result["val_loss"]
            self.run.commit()
            checkpoints.save_checkpoint(self.output_dir / f"{self.prefix}_best.pth", self.policy, **self._extra())
        return result

    def _extra(self) -> dict[str, Any]:
        return {"tokenizer_fingerprint": self.tokenizer.fingerprint, "step": self.step, "stage": self.prefix,
                "best_val_loss": self.best_val_loss, "sft_template": self.template,
                "train_args": asdict(self.config)}

    def save(self, path: Path) -> None:
        """A resumable checkpoint: the policy as the model, plus its optimizer, the subclass's state and the RNG."""
        self.run.commit()
        checkpoints.save_checkpoint(path, self.policy, **self._extra(), **self.extra_state(),
                                  optimizer=self.policy_optimizer.state_dict(), scaler={},
                                  scheduler={"train_seconds": self.train_seconds},
                                  rank_states=[{"data": self.prompts.state_dict(), "rng": training.rng_state(),
                                                "generator": self.generator.get_state()}])
        self.last_saved = str(path)
        for old in training.step_checkpoints(self.output_dir, self.prefix)[:-self.config.keep_last or None]:
            old.unlink(missing_ok=True)

    def _restore(self, checkpoint: dict, source: str) -> None:
        try:
            checkpoints.load_state_dict_checked(self.policy, checkpoint["model_state_dict"], source)
            self.policy_optimizer.load_state_dict(checkpoint["optimizer"])
            self.step, self.best_val_loss = int(checkpoint["step"]), float(checkpoint["best_val_loss"])
            self.train_seconds = float(checkpoint["scheduler"]["train_seconds"])
            self.load_extra_state(checkpoint)
            state = checkpoint["rank_states"][0]
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{source}: not a {self.prefix} checkpoint of this setup ({type(err).__name__}); "
                                  f"resume from a {self.prefix}_step_N.pth") from None
        self.prompts.load_state_dict(state["data"])
        training.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])


class PPOTrainer(RLTrainer):
    """RLHF with PPO as TRL and DeepSpeed-Chat do it: a policy and a critic (initialised from the reward model),
    frozen reference and reward models, KL-penalised per-token rewards, GAE, clipped policy and value losses."""

    prefix = "ppo"

    def __init__(self, config: FinetuneConfig, policy: GPTModel, reward_model: GPTRewardModel, tokenizer,
                 prompts: list[list[int]], eval_records: list[dict], template: str, checkpoint: dict | None = None,
                 resumed_from: str | None = None, show_progress: bool = True):
        prompts = [p for p in prompts if len(p) < policy.config.max_seq_len - 1]  # room for an answer
        if not prompts:
            raise TrainError(f"every prompt is too long for the policy's {policy.config.max_seq_len}-token context")
        super().__init__(config, policy, tokenizer, prompts, eval_records, template, show_progress)
        self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        self.critic = copy.deepcopy(self.reward_model).train().requires_grad_(True)
        self.critic_optimizer = training.configure_optimizer(self.critic, config.weight_decay, config.critic_lr,
                                                              (config.beta1, config.beta2), self.device.type)
        self.scheduled.append((self.critic_optimizer, config.critic_lr))
        self.kl = AdaptiveKLController(config.kl_coef, config.target_kl or 1.0, config.kl_horizon)
        self.start(checkpoint, resumed_from)

    def extra_state(self) -> dict[str, Any]:
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
                "kl_coef": self.kl.value}

    def load_extra_state(self, checkpoint: dict) -> None:
        self.critic.load_state_dict(checkpoint["critic"])
        self.critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
        self.kl.value = float(checkpoint["kl_coef"])

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        c = self.config
        s = self.sample(prompts)
        sequences, full_mask, start, mask = s.sequences, s.attention_mask, s.response_start, s.response_mask
        logprobs, _ = response_logprobs(self.policy, sequences, full_mask, start)
        ref_logprobs, _ = response_logprobs(self.reference, sequences, full_mask, start)
        values = self.critic.values(sequences, full_mask)[:, start - 1:-1]
        scores = self.reward_model.score(sequences, full_mask, response_labels(s))
        rewards, _ = kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, self.kl.value)
        advantages, returns = gae(rewards, values * mask, mask, c.gamma, c.lam)
        return Rollout(sequences, full_mask, start, mask, logprobs * mask, ref_logprobs * mask, values * mask,
                       scores, whiten(advantages, mask), returns)

    def update(self, batch: Rollout) -> dict[str, float]:
        """ppo_epochs passes of clipped policy and value updates over shuffled minibatches."""
        c = self.config
        stats: dict[str, list[float]] = defaultdict(list)
        n = batch.sequences.size(0)
        for _ in range(c.ppo_epochs):
            order = torch.randperm(n, device=self.device)
            for start in range(0, n, c.ppo_minibatch_size):
                idx = order[start:start + c.ppo_minibatch_size]
                seqs, attn, mask = batch.sequences[idx], batch.attention_mask[idx], batch.response_mask[idx]
                logprobs, entropy = response_logprobs(self.policy, seqs, attn, batch.response_start)
                values = self.critic.values(seqs, attn)[:, batch.response_start - 1:-1]
                policy_loss, clip_fraction = ppo_policy_loss(logprobs, batch.logprobs[idx], batch.advantages[idx],
                                                             mask, c.clip_range)
                value_loss = ppo_value_loss(values, batch.values[idx], batch.returns[idx], mask, c.value_clip_range)
                self.optimize(policy_loss, self.policy, self.policy_optimizer)
                self.optimize(c.vf_coef * value_loss, self.critic, self.critic_optimizer)
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["clip_fraction"].append(clip_fraction.item())
                stats["entropy"].append(masked_mean(entropy.detach(), mask).item())
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def train_step(self) -> dict[str, float]:
        batch = self.rollout(next(self.prompts))
        stats = self.update(batch)
        kl_per_sequence = float((batch.logprobs - batch.ref_logprobs).sum(1).mean())
        if self.config.target_kl:
            self.kl.update(kl_per_sequence, batch.sequences.size(0))
        return {"reward": float(batch.scores.mean()), "kl": kl_per_sequence, "kl_coef": self.kl.value,
                "response_length": float(batch.response_mask.sum(1).mean()), **stats}

    @torch.no_grad()
    def held_out(self) -> dict[str, float]:
        """Greedy held-out responses: reward-model score, KL to the reference, exact match.

        val_loss = −(score − β·KL), the PPO objective on held-out prompts, picks ppo_best.pth."""
        result = evaluate_policy(self.policy, self.reference, self.reward_model, self.tokenizer, self.eval_records,
                                 self.template, self.config.max_new_tokens)
        return {**result, "val_loss": -(result["val_reward"] - self.kl.value * result["val_kl"])}


@torch.no_grad()
def evaluate_policy(policy: GPTModel, reference: GPTModel, reward_model: GPTRewardModel, tokenizer,
                    records: list[dict], template: str, max_new_tokens: int, batch_size: int = 64) -> dict[str, float]:
    """Greedy held-out responses scored by the reward model, their KL to the reference, and exact match."""
    was_training = policy.training
    policy.eval()
    scores, kls, predictions = [], [], []
    for i in range(0, len(records), batch_size):
        prompts = [record_prompt_ids(tokenizer, r, template) for r in records[i:i + batch_size]]
        samples = sample_responses(policy, prompts, max_new_tokens, tokenizer, do_sample=False, batch_size=batch_size)
        kls += response_kl(policy, reference, samples).tolist()
        scores += reward_model.score(samples.sequences, samples.attention_mask, response_labels(samples)).tolist()
        predictions += [tokenizer.decode(cut_at_eos(ids, tokenizer.eos_token_id)) for ids in samples.responses]
    policy.train(was_training)
    return {"val_reward": sum(scores) / len(scores), "val_kl": sum(kls) / len(kls),
            "val_exact_match": metrics.exact_match(predictions, [r["response"] for r in records])}


def run_rlhf(config: FinetuneConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """PPO against a reward model (trained first into <output_dir>/reward/ when --reward_model is not given)."""
    if not config.reward_model:
        reward_config = copy.deepcopy(config)
        for key, value in STAGE_DEFAULTS["reward"].items():
            setattr(reward_config, key, value)
        reward_config.output_dir = str(Path(config.output_dir) / "reward")
        print(f"no --reward_model: training one first into {reward_config.output_dir}")
        config.reward_model = run_reward(reward_config, None, show_progress)["checkpoint"]
    policy, tokenizer, sft_checkpoint = load_base(config.sft_model, config.tokenizer_dir, "--sft_model")
    template = checkpoints.template_of(sft_checkpoint)
    reward_model = checkpoints.load(config.reward_model, config.tokenizer_dir, device="cpu", expect="reward",
                                    flag="--reward_model").model
    records = load_preference_records(config.pairwise_data)
    prompts = [list(p) for p in {tuple(record_prompt_ids(tokenizer, r, template)): None for r in records}]
    eval_records = load_sft_records(config.test_data_path)[:config.eval_samples]
    checkpoint, resumed_from = training.find_resume_checkpoint(resume, config.output_dir, "ppo", tokenizer)
    print(f"ppo: {len(prompts)} training prompts, {len(eval_records)} held-out prompts; policy {config.sft_model}, "
          f"reward model {config.reward_model}")
    trainer = PPOTrainer(config, policy, reward_model, tokenizer, prompts, eval_records, template, checkpoint,
                         resumed_from, show_progress)
    last = trainer.train()
    return {"stage": "ppo", "steps": trainer.step, "checkpoint": str(Path(config.output_dir) / "ppo_best.pth"),
            **{k: v for k, v in last.items() if k.startswith("val_")}}


# ----------------------------------------------------------------------------- DPO

def run_dpo(config: FinetuneConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Direct Preference Optimization against the frozen SFT model -> <output_dir>/dpo_best.pth."""
    sft, tokenizer, template, train_set, test_set = load_preference_stage(config)
    model, checkpoint, resumed_from = resume_or(config, resume, "dpo", tokenizer, lambda: copy.deepcopy(sft))
    info, device = training.init_distributed(config.device)
    reference = copy.deepcopy(sft).to(device).eval().requires_grad_(False)
    ipo = config.dpo_loss == "ipo"

    def logps(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return metrics.scored_logprobs(net, batch["input_ids"], batch["attention_mask"], batch["labels"])

    def loss_fn(net: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = (batch["labels"][:, 1:] != metrics.IGNORE_INDEX).sum(-1).clamp(min=1)
        with torch.no_grad():  # the reference's log-probs: once per batch, no graph
            ref_chosen, ref_rejected = (logps(reference, batch) / (tokens if ipo else 1)).chunk(2)
        total = logps(net, batch)
        chosen, rejected = (total / (tokens if ipo else 1)).chunk(2)  # IPO uses per-token means
        loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config.dpo_beta,
                                                        config.label_smoothing, ipo, config.dpop_lambda)
        nll = chosen_answer_nll(total, batch["labels"])
        return {"loss": loss + config.dpo_nll_weight * nll, "preference_loss": loss.detach(),
                "accuracy": (chosen_reward > rejected_reward).float().mean(),
                "margin": (chosen_reward - rejected_reward).mean(), "chosen_nll": nll.detach()}

    collate = functools.partial(data_loader.collate_pairs, pad_token_id=tokenizer.pad_token_id)
    test_batches = [collate([test_set[i] for i in range(k, min(k + 64, len(test_set)))])
                    for k in range(0, len(test_set), 64)]

    @torch.no_grad()
    def evaluate(net: nn.Module) -> dict[str, float]:
        rows = [loss_fn(net, training.to_device(b, device)) for b in test_batches]
        weights = [b["input_ids"].size(0) / 2 for b in test_batches]
        mean = lambda key: sum(float(r[key]) * w for r, w in zip(rows, weights)) / sum(weights)
        # dpo_best.pth by the held-out preference loss alone: the NLL term keeps answers likely, it is not the goal
        return {"val_loss": mean("preference_loss"), "val_accuracy": mean("accuracy"), "val_margin": mean("margin"),
                "val_chosen_nll": mean("chosen_nll")}

    print(f"dpo: {len(train_set)} train / {len(test_set)} held-out pairs, β={config.dpo_beta}, "
          f"{'IPO' if ipo else 'sigmoid'} loss, label smoothing {config.label_smoothing}, "
          f"NLL weight {config.dpo_nll_weight}, DPOP λ {config.dpop_lambda}")
    batches = data_loader.ShuffledBatches(train_set, config.batch_size, collate, config.seed, info.rank,
                                          info.world_size)
    trainer = training.Trainer(config, model, tokenizer, batches, loss_fn, prefix="dpo", evaluate_fn=evaluate,
                               steps_per_epoch=batches.batches_per_epoch / config.grad_accum, checkpoint=checkpoint,
                               resumed_from=resumed_from, start_time=PROCESS_START, show_progress=show_progress,
                               checkpoint_extra={"sft_template": template, "base_model": str(config.sft_model)})
    last = trainer.train()
    return {"stage": "dpo", "steps": trainer.step, "best_val_loss": trainer.best_val_loss,
            "val_accuracy": last.get("val_accuracy"), "checkpoint": str(Path(config.output_dir) / "dpo_best.pth")}


# ----------------------------------------------------------------------------- GRPO (verifiers: verifiers.py)

class GRPOTrainer(RLTrainer):
    """RL from verifiable rewards, GRPO-style (Shao et al., 2024): a group of sampled answers per prompt, rewards from
    verifiers, group-normalised advantages on every token, the clipped surrogate, and an optional KL to the
    reference (the k3 estimator). No reward model and no critic."""

    prefix = "rlvf"

    def __init__(self, config: FinetuneConfig, policy: GPTModel, tokenizer, records: list[dict],
                 eval_records: list[dict], template: str, checkpoint: dict | None = None,
                 resumed_from: str | None = None, show_progress: bool = True):
        items = [(record_prompt_ids(tokenizer, r, template), r) for r in records]
        items = [item for item in items if len(item[0]) < policy.config.max_seq_len - 1]
        super().__init__(config, policy, tokenizer, items, eval_records, template, show_progress)
        self.start(checkpoint, resumed_from)

    def train_step(self) -> dict[str, float]:
        c, tok = self.config, self.tokenizer
        items = next(self.prompts)
        prompts = [ids for ids, _ in items for _ in range(c.group_size)]
        with torch.no_grad():
            samples = self.sample(prompts)
            sequences, attn, mask = samples.sequences, samples.attention_mask, samples.response_mask
            texts = [tok.decode(cut_at_eos(ids, tok.eos_token_id)) for ids in samples.responses]
            records = [record for _, record in items for _ in range(c.group_size)]
            rewards = torch.tensor([verifiable_reward(t, r, c.format_weight) for t, r in zip(texts, records)],
                                   device=self.device)
            groups = rewards.view(len(items), c.group_size)
            advantages = grpo_advantages(groups).flatten()
            # DAPO's dynamic sampling: a group whose answers all score the same has zero advantage and teaches
            # nothing, so only the other groups' rows are trained on (the step's batch shrinks instead).
            informative = (groups.std(1) > 0).repeat_interleave(c.group_size) if c.skip_uniform_groups else \
                torch.ones_like(rewards, dtype=torch.bool)
            rows = informative.nonzero().flatten()
            sequences, attn, mask, advantages = sequences[rows], attn[rows], mask[rows], advantages[rows]
            old_logprobs, _ = response_logprobs(self.policy, sequences, attn, samples.response_start)
            ref_logprobs, _ = response_logprobs(self.reference, sequences, attn, samples.response_start)
        stats: dict[str, list[float]] = defaultdict(list)
        for _ in range(c.ppo_epochs if len(rows) else 0):
            order = torch.randperm(len(rows), device=self.device)
            for start in range(0, len(rows), c.ppo_minibatch_size):
                idx = order[start:start + c.ppo_minibatch_size]
                logprobs, entropy = response_logprobs(self.policy, sequences[idx], attn[idx],
                                                      samples.response_start)
                token_advantages = advantages[idx].unsqueeze(1).expand_as(logprobs)
                policy_loss, clip_fraction = ppo_policy_loss(logprobs, old_logprobs[idx], token_advantages, mask[idx],
                                                             c.clip_range)
                log_ratio = ref_logprobs[idx] - logprobs
                kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask[idx])  # k3: unbiased, always >= 0
                self.optimize(policy_loss + c.kl_coef * kl, self.policy, self.policy_optimizer)
                stats["policy_loss"].append(policy_loss.item())
                stats["kl"].append(kl.item())
                stats["clip_fraction"].append(clip_fraction.item())
                stats["entropy"].append(masked_mean(entropy.detach(), mask[idx]).item())
        return {"reward": float(rewards.mean()), "solved_groups": float((groups.max(1).values >= 1).float().mean()),
                "zero_advantage_groups": float((groups.std(1) == 0).float().mean()), "trained_rows": len(rows),
                "response_length": float(mask.sum(1).mean()) if len(rows) else 0.0,
                **{k: sum(v) / len(v) for k, v in stats.items()}}

    @torch.no_grad()
    def held_out(self) -> dict[str, float]:
        """Greedy held-out answers: mean verifier reward (val_loss = −reward), exact match overall and per task."""
        import evaluator  # lazy: only the held-out report needs it

        ev = evaluator.GPTEvaluator(self.policy, self.tokenizer, show_progress=False, template=self.template)
        prompts = [build_sft_prompt(record_instruction(r), self.template) for r in self.eval_records]
        predictions = ev.generate_predictions(prompts, max_gen_len=self.config.max_new_tokens, do_sample=False,
                                              batch_size=64, min_new_tokens=1)  # a prompt that fits is never cut
        self.policy.train()
        reward = sum(verifiable_reward(p, r, self.config.format_weight)
                     for p, r in zip(predictions, self.eval_records)) / len(predictions)
        matches = evaluator.exact_match_by_task(predictions, self.eval_records)
        return {"val_loss": -reward, "val_reward": reward, **{f"val_{k}": v for k, v in matches.items()}}


def run_rlvf(config: FinetuneConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """GRPO from the SFT model with verifier rewards on the SFT training prompts -> <output_dir>/rlvf_best.pth."""
    policy, tokenizer, sft_checkpoint = load_base(config.sft_model, config.tokenizer_dir, "--sft_model")
    template = checkpoints.template_of(sft_checkpoint)
    records = load_sft_records(config.data_path)
    eval_records = load_sft_records(config.test_data_path)[:config.eval_samples]
    checkpoint, resumed_from = training.find_resume_checkpoint(resume, config.output_dir, "rlvf", tokenizer)
    print(f"rlvf: {len(records)} training prompts x {config.group_size} samples per group, {len(eval_records)} "
          f"held-out prompts; verifiers {sorted(VERIFIERS)}")
    trainer = GRPOTrainer(config, policy, tokenizer, records, eval_records, template, checkpoint, resumed_from,
                          show_progress)
    last = trainer.train()
    return {"stage": "rlvf", "steps": trainer.step, "checkpoint": str(Path(config.output_dir) / "rlvf_best.pth"),
            **{k: v for k, v in last.items() if k.startswith("val_")}}


# ----------------------------------------------------------------------------- exact match report

def exact_match_report(checkpoint_path: str | Path, test_data_path: str, max_new_tokens: int = 16,
                       device: str = "cpu", limit: int | None = None) -> dict[str, float]:
    """Greedy exact match of a language-model checkpoint on held-out SFT records, overall and per "task"."""
    import evaluator  # lazy: only the report needs the evaluator

    loaded = checkpoints.load(checkpoint_path, device=device)
    ev = evaluator.GPTEvaluator(loaded.model, loaded.tokenizer, show_progress=False, template=loaded.template)
    return ev.exact_match_by_task(test_data_path, max_gen_len=max_new_tokens, max_samples=limit)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(description="Finetune a pretrained GPT: SFT (optionally LoRA), a reward model, or RLHF "
                                "with PPO. Each stage's defaults work right after the previous one (pretrain -> sft "
                                "-> reward -> rlhf). Ctrl-C or SIGTERM saves a resumable checkpoint.",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--mode", choices=MODES, default="sft", help="which stage to train")
    p.add_argument("--data_path", default=d.data_path, help="sft: training records .json/.jsonl "
                   "[{\"instruction\", \"response\"}] (optional \"input\", \"task\"); rlvf: the prompts, same "
                   "format, the response being the reference the verifiers check")
    p.add_argument("--test_data_path", default=d.test_data_path,
                   help="sft: held-out records (picks sft_best.pth); rlhf: held-out prompts for the reward/KL/exact-"
                        "match evaluation")
    p.add_argument("--pairwise_data", default=d.pairwise_data,
                   help="reward/rlhf: preference pairs [{\"instruction\", \"chosen\", \"rejected\"}]; rlhf takes its "
                        "rollout prompts from their instructions")
    p.add_argument("--pairwise_test_data", default=d.pairwise_test_data, help="reward: held-out preference pairs")
    p.add_argument("--pretrained_model", default=d.pretrained_model, help="sft: the model to start from")
    p.add_argument("--sft_model", default=d.sft_model, help="reward/rlhf: the SFT model (policy and reward backbone)")
    p.add_argument("--reward_model", default=None, help="rlhf: a trained reward model (default: train one first)")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer folder (default: <model folder>/tokenizer)")
    p.add_argument("--dropout", type=cli.fraction, default=d.dropout, help="dropout while finetuning")
    p.add_argument("--lora_r", type=cli.nonnegative_int, default=0, help="sft: LoRA rank (0 = full finetuning)")
    p.add_argument("--lora_alpha", type=cli.positive_float, default=d.lora_alpha, help="LoRA scaling alpha (scale = "
                   "alpha / r)")
    p.add_argument("--lora_dropout", type=cli.fraction, default=d.lora_dropout, help="dropout on the LoRA input")
    p.add_argument("--lora_targets", default=d.lora_targets,
                   help="comma-separated nn.Linear names to adapt (c_attn is the fused q/k/v projection)")
    p.add_argument("--merge_lora", action="store_true", help="sft with LoRA: write sft_best.pth with the adapters "
                   "merged (a plain checkpoint every tool loads); the adapters are saved on their own either way")
    p.add_argument("--eval_samples", type=cli.positive_int, default=d.eval_samples,
                   help="rlhf: held-out prompts per evaluation")
    p.add_argument("--ppo_epochs", type=cli.positive_int, default=d.ppo_epochs, help="rlhf: passes over each rollout "
                   "batch")
    p.add_argument("--rollout_batch_size", type=cli.positive_int, default=d.rollout_batch_size,
                   help="rlhf: prompts sampled per PPO step")
    p.add_argument("--ppo_minibatch_size", type=cli.positive_int, default=d.ppo_minibatch_size,
                   help="rlhf: sequences per gradient update")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=d.max_new_tokens,
                   help="rlhf: longest sampled response")
    p.add_argument("--rollout_temperature", type=cli.positive_float, default=d.rollout_temperature,
                   help="rlhf: sampling temperature of rollouts")
    p.add_argument("--kl_coef", type=cli.nonnegative_float, default=d.kl_coef,
                   help="rlhf/rlvf: β of the KL penalty to the reference (SFT) model")
    p.add_argument("--target_kl", type=cli.positive_float, default=None,
                   help="rlhf: adapt β so the per-sequence KL tracks this (Ziegler et al.); default: fixed β")
    p.add_argument("--gamma", type=cli.probability, default=d.gamma, help="rlhf: discount")
    p.add_argument("--lam", type=cli.probability, default=d.lam, help="rlhf: GAE λ")
    p.add_argument("--clip_range", type=cli.positive_float, default=d.clip_range, help="rlhf: policy ratio clip ε")
    p.add_argument("--value_clip_range", type=cli.positive_float, default=d.value_clip_range,
                   help="rlhf: value clip around the rollout's values")
    p.add_argument("--vf_coef", type=cli.positive_float, default=d.vf_coef, help="rlhf: weight of the value loss")
    p.add_argument("--critic_lr", type=cli.positive_float, default=d.critic_lr, help="rlhf: critic learning rate")
    p.add_argument("--reward_nll_weight", type=cli.nonnegative_float, default=d.reward_nll_weight,
                   help="reward: add this times the chosen answers' per-token NLL under the backbone's LM head "
                        "(GRM, Yang et al. 2024): regularises the backbone so the scores generalise")
    p.add_argument("--reward_likelihood_weight", type=cli.nonnegative_float, default=d.reward_likelihood_weight,
                   help="reward: > 0 adds a learned weight (starting here) times the answer's mean per-token "
                        "log-prob under the backbone's LM head to the score; 0: the head alone")
    p.add_argument("--dpo_beta", type=cli.positive_float, default=d.dpo_beta,
                   help="dpo: β, how far the policy may move from the reference")
    p.add_argument("--dpo_loss", choices=("sigmoid", "ipo"), default=d.dpo_loss,
                   help="dpo: the DPO loss (sigmoid) or IPO's squared loss")
    p.add_argument("--dpo_nll_weight", type=cli.nonnegative_float, default=d.dpo_nll_weight,
                   help="dpo: add this times the chosen answers' per-token NLL (RPO, Pang et al. 2024): keeps the "
                        "chosen answers likely, which plain DPO lets fall with the rejected ones")
    p.add_argument("--dpop_lambda", type=cli.nonnegative_float, default=d.dpop_lambda,
                   help="dpo: DPO-Positive's λ (Pal et al. 2024; they use 50): the margin loses λ times how far a "
                        "chosen answer's log-prob fell below the reference's; 0: off")
    p.add_argument("--group_size", type=cli.int_at_least(2), default=d.group_size,
                   help="rlvf: answers sampled per prompt (GRPO's group)")
    p.add_argument("--format_weight", type=cli.nonnegative_float, default=d.format_weight,
                   help="rlvf: weight of the format verifier's bonus added to the task verifier's reward")
    p.add_argument("--skip_uniform_groups", action=argparse.BooleanOptionalAction, default=d.skip_uniform_groups,
                   help="rlvf: train only on groups whose answers scored differently (DAPO's dynamic sampling; "
                        "a group that is all right or all wrong has zero advantage)")
    add_classify_arguments(p, d)
    training.add_loop_arguments(p, d)
    per_stage = {key for defaults in STAGE_DEFAULTS.values() for key in defaults}
    for action in p._actions:  # stage-dependent defaults are filled in after parsing
        if action.dest in per_stage:
            action.default = None
            action.help = (action.help or "") + " (default: per --mode, see the README)"
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    names = {f.name for f in fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key, value in STAGE_DEFAULTS[args.mode].items():
        values.setdefault(key, value)
    if args.max_minutes is not None or args.epochs is not None:
        values["max_steps"] = args.max_steps  # an explicit time or epoch budget replaces the default step count
    return FinetuneConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, Ctrl-C/SIGTERM save and exit 130/143."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    config = config_from_args(args)
    cli.check_output_folder(config.output_dir, "--output_dir")
    if config.lora_r and config.mode != "sft":
        raise cli.UsageError("--lora_r applies to --mode sft only")
    run = {"sft": run_sft, "reward": run_reward, "rlhf": run_rlhf, "dpo": run_dpo, "rlvf": run_rlvf,
           "classify": run_classify}[config.mode]
    try:
        summary = run(config, args.resume)
        if config.mode in ("sft", "rlhf", "dpo", "rlvf") and training.DistInfo().is_main:
            report = exact_match_report(summary["checkpoint"], config.test_data_path, config.max_new_tokens,
                                        limit=None)
            summary["exact_match"] = report
        print(json.dumps(summary, ensure_ascii=False))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
