"""The RL step: PPO (RLHF against a reward model) and GRPO (verifiable rewards) as step strategies of the one training
loop (``training.Trainer``): each step samples rollouts through the decode engine, scores them, and updates the policy
(and PPO's critic) in minibatches with ``trainer.update``, so both stages get the loop's stopping rule, schedule,
precision, compile, accumulation, checkpoints, resume and signals. Also the rollout tensors (``Samples``), per-token
log-probs and exact KL of responses, and the held-out figures of a policy.

    step = GRPOStep(config, tokenizer, eval_records, template)
    Trainer(config, policy, tokenizer, prompt_batches, step, prefix="rlvf", evaluate_fn=step.held_out,
            evaluate_first=True, ...).train()

Its own module, above the loop and the scoring functions, below the stages that build it (``finetune_stages.py``).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import metrics
import scoring
from decoding import SamplingParams, cut_at_eos, generate_responses, left_pad, sampled_mask, visible_text
from loss_labels import IGNORE_INDEX
from losses import gae, grpo_advantages, kl_penalized_rewards, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from model_heads import GPTRewardModel
from prompts import final_answer
from training import StepStrategy, Trainer
from verifiers import verifiable_reward

# ----------------------------------------------------------------------------- rollout tensors


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


def sample_responses(policy: nn.Module, prompts: list[list[int]], sampling: SamplingParams, tokenizer,
                     generator: torch.Generator | None = None, batch_size: int = 64) -> Samples:
    """Responses through the decode engine as ``sampling`` says, each ended by the tokenizer's EOS (kept in the
    response) and each prompt with its own room in the context. A model trained with tool calls runs its calculator
    calls; the results the engine forced in are left out of ``response_mask`` (the policy did not sample them)."""
    params = replace(sampling, eos_token_id=tokenizer.eos_token_id)
    responses = generate_responses(policy, prompts, params, batch_size, generator, tokenizer=tokenizer)
    rows = [p + r for p, r in zip(prompts, responses)]
    width, n = max(map(len, rows)), max(map(len, responses))
    sequences, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    response_mask = torch.zeros(len(rows), n)
    for i, response in enumerate(responses):
        response_mask[i, n - len(response):] = torch.tensor(sampled_mask(tokenizer, response), dtype=torch.float)
    device = next(policy.parameters()).device
    return Samples(sequences.to(device), attention_mask.to(device), width - n, response_mask.to(device), responses)


def response_logprobs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(token | prefix), entropy of π there) over the response window, both (B, N), via metrics.token_logprobs."""
    logits = model(sequences, attention_mask=attention_mask)["logits"]
    labels = sequences.masked_fill(attention_mask == 0, IGNORE_INDEX)
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
    labels = torch.full_like(samples.sequences, IGNORE_INDEX)
    window = samples.sequences[:, samples.response_start:]
    labels[:, samples.response_start:] = window.masked_fill(~samples.response_mask.bool(), IGNORE_INDEX)
    return labels


@torch.no_grad()
def evaluate_policy(policy: nn.Module, reference: nn.Module, reward_model: GPTRewardModel, tokenizer,
                    records: list[dict], template: str, max_new_tokens: int, batch_size: int = 64) -> dict[str, float]:
    """Greedy held-out responses (``scoring.answer_prompts``) scored by the reward model, their KL to the reference,
    and exact match (``scoring.exact_match_by_task``)."""
    greedy = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    was_training = policy.training
    policy.eval()
    scores, kls, predictions = [], [], []
    for i in range(0, len(records), batch_size):
        prompts = scoring.answer_prompts(tokenizer, records[i:i + batch_size], template, policy.config.max_seq_len)
        samples = sample_responses(policy, prompts, greedy, tokenizer, batch_size=batch_size)
        kls += response_kl(policy, reference, samples).tolist()
        scores += reward_model.score(samples.sequences, samples.attention_mask, response_labels(samples)).tolist()
        predictions += [visible_text(tokenizer, cut_at_eos(ids, tokenizer.eos_token_id)) for ids in samples.responses]
    policy.train(was_training)
    return {"val_reward": sum(scores) / len(scores), "val_kl": sum(kls) / len(kls),
            "val_exact_match": scoring.exact_match_by_task(predictions, records)["exact_match"]}


class AdaptiveKLController:
    """Ziegler et al. (2019): move β so the measured KL tracks a target (proportional control, clipped ±20%)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- the step strategies


def chunks(idx: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``idx`` split into ``n`` (or fewer) nearly equal chunks: one minibatch's micro-batches (--grad_accum)."""
    return [part for part in idx.chunk(min(n, len(idx))) if len(part)]


def rollout_sampling(config: Any) -> SamplingParams:
    """How rollouts sample, from the stage's settings: the rollout temperature over the policy's whole
    distribution (no top-k), the one whose log-probs the PPO ratios and KL are computed from."""
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.rollout_temperature, top_k=0)


class RLStep(StepStrategy):
    """What PPO and GRPO share: the frozen reference (the starting policy), the rollout generator, sampling, and the
    held-out prompts. The trainer's ``batches`` yield the prompts of one step. One process (no DDP)."""

    distributed = False

    def __init__(self, config, tokenizer, eval_records: list[dict], template: str):
        self.config, self.tokenizer, self.eval_records, self.template = config, tokenizer, eval_records, template
        self.sampling = rollout_sampling(config)

    def setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.reference = copy.deepcopy(trainer.model).eval().requires_grad_(False)
        self.generator = torch.Generator(device=trainer.device).manual_seed(self.config.seed)

    def sample(self, prompts: list[list[int]]) -> Samples:
        """The rollout: one sampled response per prompt (``rollout_sampling``), under the run's precision."""
        with self.trainer.autocast():
            return sample_responses(self.trainer.model, prompts, self.sampling, self.tokenizer, self.generator,
                                    batch_size=len(prompts))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


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


class PPOStep(RLStep):
    """RLHF with PPO as TRL and DeepSpeed-Chat do it: a policy and a critic (initialised from the reward model),
    frozen reference and reward models, KL-penalised per-token rewards, GAE, clipped policy and value losses."""

    def __init__(self, config, tokenizer, reward_model: GPTRewardModel, eval_records: list[dict], template: str):
        super().__init__(config, tokenizer, eval_records, template)
        self.reward_model = reward_model
        self.kl = AdaptiveKLController(config.kl_coef, config.target_kl or 1.0, config.kl_horizon)

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self.reward_model = self.reward_model.to(trainer.device).eval().requires_grad_(False)
        self.critic = copy.deepcopy(self.reward_model).train().requires_grad_(True)
        self.critic_optimizer = trainer.add_optimizer(self.critic, self.config.critic_lr)
        self.critic_scaler = trainer.new_scaler()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "critic": self.critic.state_dict(), "kl_coef": self.kl.value,
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "critic_scaler": self.critic_scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.critic_scaler.load_state_dict(state["critic_scaler"])
        self.kl.value = float(state["kl_coef"])

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        c, trainer = self.config, self.trainer
        s = self.sample(prompts)
        sequences, full_mask, start, mask = s.sequences, s.attention_mask, s.response_start, s.response_mask
        with trainer.autocast():
            logprobs, _ = response_logprobs(trainer.model, sequences, full_mask, start)
            ref_logprobs, _ = response_logprobs(self.reference, sequences, full_mask, start)
            values = self.critic.values(sequences, full_mask)[:, start - 1:-1].float()
            scores = self.reward_model.score(sequences, full_mask, response_labels(s)).float()
        rewards, _ = kl_penalized_rewards(logprobs, ref_logprobs, scores, mask, self.kl.value)
        advantages, returns = gae(rewards, values * mask, mask, c.gamma, c.lam)
        return Rollout(sequences, full_mask, start, mask, logprobs * mask, ref_logprobs * mask, values * mask,
                       scores, whiten(advantages, mask), returns)

    def _policy_loss(self, batch: Rollout, idx: torch.Tensor, stats: dict[str, list[float]]):
        """The clipped surrogate of one micro-batch (a callable for trainer.update)."""
        def compute() -> torch.Tensor:
            seqs, attn, mask = batch.sequences[idx], batch.attention_mask[idx], batch.response_mask[idx]
            logprobs, entropy = response_logprobs(self.trainer.train_model, seqs, attn, batch.response_start)
            loss, clip_fraction = ppo_policy_loss(logprobs, batch.logprobs[idx], batch.advantages[idx], mask,
                                                  self.config.clip_range)
            stats["policy_loss"].append(loss.item())
            stats["clip_fraction"].append(clip_fraction.item())
            stats["entropy"].append(masked_mean(entropy.detach(), mask).item())
            return loss
        return compute

    def _value_loss(self, batch: Rollout, idx: torch.Tensor, stats: dict[str, list[float]]):
        """vf_coef x the clipped value loss of one micro-batch (a callable for trainer.update)."""
        def compute() -> torch.Tensor:
            seqs, attn, mask = batch.sequences[idx], batch.attention_mask[idx], batch.response_mask[idx]
            values = self.critic.values(seqs, attn)[:, batch.response_start - 1:-1]
            loss = ppo_value_loss(values, batch.values[idx], batch.returns[idx], mask, self.config.value_clip_range)
            stats["value_loss"].append(loss.item())
            return self.config.vf_coef * loss
        return compute

    def update(self, batch: Rollout) -> dict[str, float]:
        """ppo_epochs passes of clipped policy and value updates over shuffled minibatches (each split into
        --grad_accum micro-batches)."""
        c, trainer = self.config, self.trainer
        stats: dict[str, list[float]] = defaultdict(list)
        n = batch.sequences.size(0)
        for _ in range(c.ppo_epochs):
            order = torch.randperm(n, device=trainer.device)
            for start in range(0, n, c.ppo_minibatch_size):
                parts = chunks(order[start:start + c.ppo_minibatch_size], c.grad_accum)
                trainer.update([self._policy_loss(batch, idx, stats) for idx in parts])
                trainer.update([self._value_loss(batch, idx, stats) for idx in parts], self.critic_optimizer,
                               self.critic_scaler, self.critic)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def __call__(self, trainer: Trainer) -> tuple[torch.Tensor, dict[str, Any], int]:
        batch = self.rollout(next(trainer.batches))
        stats = self.update(batch)
        kl_per_sequence = float((batch.logprobs - batch.ref_logprobs).sum(1).mean())
        if self.config.target_kl:
            self.kl.update(kl_per_sequence, batch.sequences.size(0))
        row = {"reward": float(batch.scores.mean()), "kl": kl_per_sequence, "kl_coef": self.kl.value,
               "response_length": float(batch.response_mask.sum(1).mean()), **stats}
        return torch.tensor(stats["policy_loss"]).mean(), row, batch.sequences.numel()

    @torch.no_grad()
    def held_out(self, policy: nn.Module) -> dict[str, float]:
        """Greedy held-out responses: reward-model score, KL to the reference, exact match.

        val_loss = −(score − β·KL), the PPO objective on held-out prompts, picks ppo_best.pth."""
        result = evaluate_policy(policy, self.reference, self.reward_model, self.tokenizer, self.eval_records,
                                 self.template, self.config.max_new_tokens)
        return {**result, "val_loss": -(result["val_reward"] - self.kl.value * result["val_kl"])}


class GRPOStep(RLStep):
    """RL from verifiable rewards, GRPO-style (Shao et al., 2024): a group of sampled answers per prompt, rewards from
    verifiers, group-normalised advantages on every token, the clipped surrogate, and an optional KL to the
    reference (the k3 estimator). No reward model and no critic. The trainer's batches yield (prompt ids, record)."""

    @torch.no_grad()
    def rollout(self, items: list[tuple[list[int], dict]]) -> tuple[Samples, torch.Tensor]:
        """(the group_size samples of every prompt, their verifier rewards as (n_prompts, group_size))."""
        c, tok = self.config, self.tokenizer
        samples = self.sample([ids for ids, _ in items for _ in range(c.group_size)])
        texts = [final_answer(visible_text(tok, cut_at_eos(ids, tok.eos_token_id))) for ids in samples.responses]
        records = [record for _, record in items for _ in range(c.group_size)]
        rewards = torch.tensor([verifiable_reward(t, r, c.format_weight) for t, r in zip(texts, records)],
                               device=self.trainer.device)
        return samples, rewards.view(len(items), c.group_size)

    def _loss(self, rows: dict[str, torch.Tensor], start: int, idx: torch.Tensor, stats: dict[str, list[float]]):
        """Clipped surrogate + kl_coef x k3 KL of one micro-batch (a callable for trainer.update)."""
        def compute() -> torch.Tensor:
            mask = rows["mask"][idx]
            logprobs, entropy = response_logprobs(self.trainer.train_model, rows["sequences"][idx],
                                                  rows["attention_mask"][idx], start)
            advantages = rows["advantages"][idx].unsqueeze(1).expand_as(logprobs)
            policy_loss, clip_fraction = ppo_policy_loss(logprobs, rows["old_logprobs"][idx], advantages, mask,
                                                         self.config.clip_range)
            log_ratio = rows["ref_logprobs"][idx] - logprobs
            kl = masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)  # k3: unbiased, always >= 0
            for name, value in (("policy_loss", policy_loss), ("kl", kl), ("clip_fraction", clip_fraction),
                                ("entropy", masked_mean(entropy.detach(), mask))):
                stats[name].append(value.item())
            return policy_loss + self.config.kl_coef * kl
        return compute

    @torch.no_grad()
    def informative_rows(self, samples: Samples, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows trained on, with their advantages and old / reference log-probs. DAPO's dynamic sampling: a group
        whose answers all score the same has zero advantage and teaches nothing, so only the other groups' rows are
        kept (the step's batch shrinks instead)."""
        c, trainer = self.config, self.trainer
        advantages = grpo_advantages(groups).flatten()
        keep = (groups.std(1) > 0).repeat_interleave(c.group_size) if c.skip_uniform_groups else \
            torch.ones_like(advantages, dtype=torch.bool)
        index = keep.nonzero().flatten()
        rows = {"sequences": samples.sequences[index], "attention_mask": samples.attention_mask[index],
                "mask": samples.response_mask[index], "advantages": advantages[index]}
        with trainer.autocast():
            for key, net in (("old_logprobs", trainer.model), ("ref_logprobs", self.reference)):
                rows[key] = response_logprobs(net, rows["sequences"], rows["attention_mask"],
                                              samples.response_start)[0].float()
        return rows

    def __call__(self, trainer: Trainer) -> tuple[torch.Tensor, dict[str, Any], int]:
        c = self.config
        samples, groups = self.rollout(next(trainer.batches))
        rows = self.informative_rows(samples, groups)
        n = len(rows["advantages"])
        stats: dict[str, list[float]] = defaultdict(list)
        for _ in range(c.ppo_epochs if n else 0):
            order = torch.randperm(n, device=trainer.device)
            for start in range(0, n, c.ppo_minibatch_size):
                parts = chunks(order[start:start + c.ppo_minibatch_size], c.grad_accum)
                trainer.update([self._loss(rows, samples.response_start, idx, stats) for idx in parts])
        row = {"reward": float(groups.flatten().mean()),
               "solved_groups": float((groups.max(1).values >= 1).float().mean()),
               "zero_advantage_groups": float((groups.std(1) == 0).float().mean()), "trained_rows": n,
               "response_length": float(rows["mask"].sum(1).mean()) if n else 0.0,
               **{k: sum(v) / len(v) for k, v in stats.items()}}
        return torch.tensor(stats["policy_loss"] or [0.0]).mean(), row, samples.sequences.numel()

    @torch.no_grad()
    def held_out(self, policy: nn.Module) -> dict[str, float]:
        """Greedy held-out answers (``scoring.greedy_answers``): mean verifier reward (val_loss = −reward), exact
        match overall and per task."""
        predictions = scoring.greedy_answers(policy, self.tokenizer, self.eval_records, self.template,
                                             self.config.max_new_tokens, scoring.ScoreParams(batch_size=64))
        reward = sum(verifiable_reward(p, r, self.config.format_weight)
                     for p, r in zip(predictions, self.eval_records)) / len(predictions)
        matches = scoring.exact_match_by_task(predictions, self.eval_records)
        return {"val_loss": -reward, "val_reward": reward, **{f"val_{k}": v for k, v in matches.items()}}
