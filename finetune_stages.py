"""The finetuning stages, each a config (one per mode, holding only that mode's settings and defaults) and a run
function on the one training loop (``training.Trainer``):

    sft       SFT, full or LoRA        models/pretrain/pretrain_best.pth -> models/sft/sft_best.pth
    reward    a reward model           models/sft/sft_best.pth -> models/reward/reward_best.pth
    rlhf      PPO against it           (a reward model is trained first unless --reward_model) -> models/rlhf/
    dpo       DPO against the SFT model                                 -> models/dpo/dpo_best.pth
    rlvf      GRPO with verifiers      (no reward model)                -> models/rlvf/rlvf_best.pth
    classify  a classification head    models/pretrain/pretrain_best.pth -> models/classify/classify_best.pth

The losses are in ``losses.py``, PPO's and GRPO's steps in ``rl_step.py``; ``finetune.py`` is the CLI. Step budgets are
the defaults, so results do not depend on machine load (about 4-7 minutes per stage on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

import checkpoints
import cli
import data_loader
import evaluator
import lora
import scoring
import training
from losses import DPOLoss, causal_lm_loss, classify_loss, reward_loss
from model_heads import GPTClassifier, GPTRewardModel, freeze_all_but_last
from prompts import CHAT_TEMPLATE, CHAT_TOKENS, has_chat_tokens, is_chat_template, record_prompt_ids
from readers import load_preference_records, load_sft_records
from rl_step import GRPOStep, PPOStep
from run_folder import CONFUSION_CHART, step_checkpoints
from training import TrainError
from verifiers import VERIFIERS, check_verifiers

PROCESS_START = time.time()
HELD_OUT_CAP = 500  # records held out of a user's --data_path at most: evaluations stay a few seconds
CHAT_CONTEXT = 256  # SFT's default context for a rotary model (chat_context)

# ----------------------------------------------------------------------------- one config per mode


@dataclass
@cli.with_defaults(batch_size=32)
class FinetuneConfig(training.TrainConfig):
    """What every mode has besides the loop's settings; stored in checkpoints as ``train_args``. Each setting below
    is written once, with its flag's help; a mode's class adds the groups it uses and changes only defaults."""

    mode: str = ""  # the config's identity, chosen with --mode
    tokenizer_dir: str | None = cli.setting(None, "tokenizer folder (default: <model folder>/tokenizer)")


@dataclass
class FromPretrained:
    pretrained_model: str = cli.setting("models/pretrain/pretrain_best.pth", "the pretrained model to start from")


@dataclass
class FromSFT:
    sft_model: str = cli.setting("models/sft/sft_best.pth", "the SFT model: the policy and reference, and the reward "
                                 "model's backbone")


@dataclass
class PromptRecords:
    """SFT's training records, which GRPO samples its prompts from."""

    data_path: str = cli.setting("data/sft/sft_data.json", "sft: training records .json/.jsonl [{\"instruction\", "
                                 "\"response\"}] (optional \"input\", \"task\"); rlvf: the prompts, same format, the "
                                 "response being what the verifiers check")
    val_fraction: float = cli.setting(0.05, "with --data_path and no --test_data_path: the share of --data_path's "
                                      f"records held out for evaluation (at least 1, at most {HELD_OUT_CAP}; chosen "
                                      "by --seed)", cli.proper_fraction)


@dataclass
class HeldOutAnswers:
    """The held-out SFT records whose greedy answers are scored (exact match) after training and in RL evaluations."""

    test_data_path: str | None = cli.setting("data/sft/sft_test.json", "held-out SFT records: sft picks sft_best.pth "
                                             "on them; the RL stages evaluate on them; every language-model stage "
                                             "reports their exact match at the end. With --data_path and without "
                                             "it: a held-out split of --data_path (--val_fraction)")
    max_new_tokens: int = cli.setting(16, "longest generated answer (rollouts, evaluations, report)", cli.positive_int)


@dataclass
class Preferences:
    pairwise_data: str = cli.setting("data/sft/rlhf_pairwise.json", "preference pairs [{\"instruction\", \"chosen\", "
                                     "\"rejected\"}]; rlhf takes its rollout prompts from their instructions")
    pairwise_test_data: str = cli.setting("data/sft/rlhf_pairwise_test.json", "held-out preference pairs (pick "
                                          "reward_best.pth / dpo_best.pth)")


@dataclass
class Dropout:
    dropout: float = cli.setting(0.0, "dropout while finetuning", cli.fraction)


@dataclass
class LabelSmoothing:
    label_smoothing: float = cli.setting(0.0, "reward and dpo: assumed fraction of flipped preference labels (bounds "
                                         "the margins; the held-out loss stays the plain one); classify: label "
                                         "smoothing of the training cross-entropy", cli.fraction)


@dataclass
class Rollouts:
    """What PPO and GRPO share: sampled rollouts, clipped updates in minibatches, a KL to the reference."""

    eval_samples: int = cli.setting(300, "held-out prompts per evaluation", cli.positive_int)
    rollout_batch_size: int = cli.setting(32, "prompts sampled per step", cli.positive_int)
    rollout_temperature: float = cli.setting(1.0, "sampling temperature of rollouts", cli.positive_float)
    ppo_epochs: int = cli.setting(4, "passes over each step's rollouts", cli.positive_int)
    ppo_minibatch_size: int = cli.setting(16, "sequences per gradient update (split into --grad_accum micro-batches)",
                                          cli.positive_int)
    clip_range: float = cli.setting(0.2, "policy ratio clip ε", cli.positive_float)
    kl_coef: float = cli.setting(0.05, "β of the KL penalty to the reference (SFT) model", cli.nonnegative_float)


@dataclass
@cli.with_defaults(mode="sft", output_dir="models/sft", lr=3e-3, warmup_steps=50, eval_interval=500,
                   max_steps=5000)  # held-out sums: EM 0.4-0.9 at 2,500 steps, 0.99 at 5,000
class SFTConfig(Dropout, PromptRecords, HeldOutAnswers, FromPretrained, FinetuneConfig):
    lora_r: int = cli.setting(0, "LoRA rank (0 = full finetuning)", cli.nonnegative_int)
    lora_alpha: float = cli.setting(16.0, "LoRA scaling alpha (scale = alpha / r)", cli.positive_float)
    lora_dropout: float = cli.setting(0.0, "dropout on the LoRA input", cli.fraction)
    lora_targets: str = cli.setting("c_attn,c_proj,c_fc", "comma-separated nn.Linear names to adapt (c_attn is the "
                                    "fused q/k/v projection)")
    merge_lora: bool = cli.setting(False, "write sft_best.pth with the adapters merged (a plain checkpoint every tool "
                                   "loads); the adapters are saved on their own either way")
    max_seq_len: int | None = cli.setting(None, "context to finetune and serve at (default: "
                                          f"{CHAT_CONTEXT} for a rotary model, whose context grows: a multi-turn chat "
                                          "fits; the base model's for learned positions); longer than the base's only "
                                          "for a rotary model (linear position interpolation, kept in the checkpoint "
                                          "and exported)", cli.int_at_least(2))


@dataclass
@cli.with_defaults(mode="reward", output_dir="models/reward", lr=1e-3, warmup_steps=30, max_steps=3000,
                   eval_interval=250, label_smoothing=0.1)
class RewardConfig(LabelSmoothing, Preferences, FromSFT, FinetuneConfig):
    reward_nll_weight: float = cli.setting(  # GRM (Yang et al., 2024): + weight x NLL of the chosen answer
        1.0, "add this times the chosen answers' per-token NLL under the backbone's LM head (GRM, Yang et al. 2024): "
        "regularises the backbone so the scores generalise", cli.nonnegative_float)
    reward_likelihood_weight: float = cli.setting(  # > 0: the score adds (learned weight) x the answer's mean log-prob
        1.0, "> 0 adds a learned weight (starting here) times the answer's mean per-token log-prob under the "
        "backbone's LM head to the score; 0: the head alone", cli.nonnegative_float)


@dataclass
@cli.with_defaults(mode="rlhf", output_dir="models/rlhf", lr=1e-5, warmup_steps=0, max_steps=150, eval_interval=25,
                   weight_decay=0.0, min_lr_ratio=1.0, log_interval=1,
                   kl_coef=0.2)  # TRL's init_kl_coef: at 0.05 the policy drifted from the SFT answers
class PPOConfig(Rollouts, HeldOutAnswers, Preferences, FromSFT, FinetuneConfig):
    reward_model: str | None = cli.setting(None, "a trained reward model (default: train one first into "
                                           "<output_dir>/reward/)")
    target_kl: float | None = cli.setting(None, "adapt β so the per-sequence KL tracks this (Ziegler et al.); "
                                          "default: fixed β", cli.positive_float)
    kl_horizon: int = cli.setting(10000, "with --target_kl: the horizon (in sequences) of β's control",
                                  cli.positive_int)
    gamma: float = cli.setting(1.0, "discount", cli.probability)
    lam: float = cli.setting(0.95, "GAE λ", cli.probability)
    value_clip_range: float = cli.setting(0.2, "value clip around the rollout's values", cli.positive_float)
    vf_coef: float = cli.setting(0.5, "weight of the value loss", cli.positive_float)
    critic_lr: float = cli.setting(1e-4, "critic learning rate (on the policy's schedule)", cli.positive_float)


@dataclass
@cli.with_defaults(mode="dpo", output_dir="models/dpo", lr=3e-4, warmup_steps=20, max_steps=600, eval_interval=100,
                   weight_decay=0.0)  # label_smoothing > 0: conservative DPO
class DPOConfig(LabelSmoothing, HeldOutAnswers, Preferences, FromSFT, FinetuneConfig):
    dpo_beta: float = cli.setting(0.1, "β, how far the policy may move from the reference", cli.positive_float)
    dpo_loss: str = cli.setting("sigmoid", "the DPO loss (sigmoid) or IPO's squared loss", choices=("sigmoid", "ipo"))
    dpo_nll_weight: float = cli.setting(  # RPO (Pang et al., 2024); without it held-out exact match fell 0.671 -> 0.596
        1.0, "add this times the chosen answers' per-token NLL (RPO, Pang et al. 2024): keeps the chosen answers "
        "likely, which plain DPO lets fall with the rejected ones", cli.nonnegative_float)
    dpop_lambda: float = cli.setting(  # DPO-Positive (Pal et al., 2024): penalise the chosen falling below the ref
        0.0, "DPO-Positive's λ (Pal et al. 2024; they use 50): the margin loses λ times how far a chosen answer's "
        "log-prob fell below the reference's; 0: off", cli.nonnegative_float)


@dataclass
@cli.with_defaults(mode="rlvf", output_dir="models/rlvf", lr=2e-5, warmup_steps=0, max_steps=100, eval_interval=20,
                   weight_decay=0.0, min_lr_ratio=1.0, log_interval=1, rollout_batch_size=8)
class GRPOConfig(PromptRecords, Rollouts, HeldOutAnswers, FromSFT, FinetuneConfig):
    group_size: int = cli.setting(8, "answers sampled per prompt (GRPO's group)", cli.int_at_least(2))
    format_weight: float = cli.setting(0.1, "weight of the format verifier's bonus added to the task verifier's "
                                       "reward", cli.nonnegative_float)
    skip_uniform_groups: bool = cli.setting(True, "train only on groups whose answers scored differently (DAPO's "
                                            "dynamic sampling; a group that is all right or all wrong has zero "
                                            "advantage)", action=argparse.BooleanOptionalAction)


@dataclass
@cli.with_defaults(mode="classify", output_dir="models/classify", lr=5e-4, warmup_steps=30, max_steps=400,
                   eval_interval=50, label_smoothing=0.1)
class ClassifyConfig(LabelSmoothing, Dropout, FromPretrained, FinetuneConfig):
    classify_train: str = cli.setting("data/classify/train.jsonl", "training texts, .jsonl of {\"text\", \"label\"} "
                                      "(labels are class names)")
    classify_test: str = cli.setting("data/classify/test.jsonl", "held-out texts (pick classify_best.pth; accuracy, "
                                     "precision/recall, confusion)")
    trainable_blocks: int | None = cli.setting(None, "train only the last N transformer blocks + final norm + head "
                                               "(0 = norm and head only); default: the whole model",
                                               cli.nonnegative_int)


CONFIGS: dict[str, type[FinetuneConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "rlhf": PPOConfig,
                                            "dpo": DPOConfig, "rlvf": GRPOConfig, "classify": ClassifyConfig}
MODES = tuple(CONFIGS)


def field_names(mode: str) -> set[str]:
    return {f.name for f in fields(CONFIGS[mode])}


# ----------------------------------------------------------------------------- shared setup

def last_step_beside(best: Path) -> Path | None:
    """The last ``<stage>_step_N.pth`` beside a missing ``<stage>_best.pth`` (None when there is none)."""
    if not best.name.endswith("_best.pth"):
        return None
    steps = step_checkpoints(best.parent, best.name.removesuffix("_best.pth"))
    return steps[-1] if steps else None


def load_base(path: str, tokenizer_dir: str | None, flag: str) -> checkpoints.Loaded:
    """A language-model checkpoint to train from (plain weights, on CPU, train mode)."""
    if not Path(path).exists():
        last = last_step_beside(Path(path))
        if last is not None:  # a run without validation data writes step checkpoints only
            raise TrainError(f"{flag} {path} does not exist: {Path(path).parent} holds {last.name}, the last "
                             f"checkpoint of a run without validation data (which writes no best one): pass "
                             f"{flag} {last}")
        hint = {"--pretrained_model": "run `python pretrain_trainer.py` first",
                "--sft_model": "run `python finetune.py --mode sft` first"}.get(flag, "pass an existing checkpoint")
        raise TrainError(f"{flag} {path} does not exist: {hint}, or pass {flag} PATH")
    return checkpoints.load(path, tokenizer_dir, device="cpu", trainable=True, expect="lm", flag=flag)


def check_records_fit(dataset, name: str, max_seq_len: int) -> None:
    if getattr(dataset, "num_truncated", 0):
        print(f"note: {dataset.num_truncated} example(s) of {name} exceed the model's context ({max_seq_len} tokens) "
              "and were truncated")


def resume_or(config: FinetuneConfig, resume: str | None, prefix: str, tokenizer,
              build) -> tuple[nn.Module, dict | None, str | None]:
    """(model, checkpoint, its path): the checkpoint's model when resuming, else ``build()`` under ``--seed`` (a new
    head's initialisation, a LoRA adapter's, is the same on every run of the same command)."""
    checkpoint, resumed_from = training.find_resume_checkpoint(resume, config.output_dir, prefix, tokenizer)
    if checkpoint is None:
        torch.manual_seed(config.seed)
        return build(), None, None
    return checkpoints.build_model(checkpoint, resumed_from).train(), checkpoint, resumed_from


def check_same_adapters(checkpoint: dict | None, resumed_from: str | None, lora_r: int) -> None:
    """A resumed SFT run trains what its checkpoint trained: LoRA adapters of the same rank, or the whole model."""
    stored = (checkpoint or {}).get("lora") or {}
    if checkpoint is not None and stored.get("r", 0) != lora_r:
        what = f"LoRA adapters of rank {stored['r']}" if stored else "the whole model (no LoRA)"
        raise TrainError(f"--resume {resumed_from} trains {what}, but this run has --lora_r {lora_r}: resume with "
                         f"--lora_r {stored.get('r', 0)}, or start a fresh run without --resume")


def shuffled(dataset, config: FinetuneConfig, collate) -> data_loader.ShuffledBatches:
    """This rank's endless, reshuffled, resumable batches of a dataset."""
    info = training.DistInfo.from_env()
    return data_loader.ShuffledBatches(dataset, config.batch_size, collate, config.seed, info.rank, info.world_size)


def train(config: FinetuneConfig, model: nn.Module, tokenizer, batches, step, prefix: str, checkpoint: dict | None,
          resumed_from: str | None, show_progress: bool, stop_after: int | None = None,
          **options: Any) -> tuple[training.Trainer, dict[str, float]]:
    """Run the one training loop for a stage: (the trainer, its last held-out figures)."""
    steps_per_epoch = options.pop("steps_per_epoch", batches.batches_per_epoch / config.grad_accum)
    trainer = training.Trainer(config, model, tokenizer, batches, step, prefix=prefix, steps_per_epoch=steps_per_epoch,
                               checkpoint=checkpoint, resumed_from=resumed_from, start_time=PROCESS_START,
                               show_progress=show_progress, **options)
    return trainer, trainer.train(stop_after)


def language_model_eval(dataset, tokenizer, batch_size: int):
    """evaluate_fn: held-out response NLL (prompt tokens are not scored, ``scoring.response_loss``), as val_loss and
    val_ppl."""
    params = scoring.ScoreParams(batch_size=batch_size)

    def evaluate(model: nn.Module) -> dict[str, float]:
        figures = scoring.response_loss(model, dataset, tokenizer.pad_token_id, params)
        return {"val_loss": figures["loss"], "val_ppl": figures["perplexity"]}

    return evaluate


def summary(trainer: training.Trainer, stage: str, **figures: Any) -> dict[str, Any]:
    return {"stage": stage, "steps": trainer.step, "best_val_loss": trainer.best_val_loss,
            "checkpoint": str(trainer.output_dir / f"{trainer.prefix}_best.pth"), **figures}


# ----------------------------------------------------------------------------- SFT

def held_out_split(config: SFTConfig | GRPOConfig) -> tuple[list[dict], list[dict], str | None]:
    """(training records, held-out records, what was held out): --data_path and --test_data_path; or, with no
    --test_data_path (None: the user's own --data_path), --val_fraction of --data_path's records, chosen by --seed,
    kept out of training."""
    records = load_sft_records(config.data_path)
    if config.test_data_path is not None:
        return records, load_sft_records(config.test_data_path), None
    if len(records) < 2:
        raise TrainError(f"--data_path {config.data_path} holds {len(records)} record: holding one out for evaluation "
                         "needs at least 2; pass --test_data_path")
    count = min(HELD_OUT_CAP, len(records) - 1, max(1, round(config.val_fraction * len(records))))
    held = set(random.Random(config.seed).sample(range(len(records)), count))
    note = f"held out {count} of {len(records)} records of {config.data_path} for evaluation"
    return ([r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)], note)


def run_sft(config: SFTConfig, resume: str | None, show_progress: bool = True,
            stop_after: int | None = None) -> dict[str, Any]:
    """Supervised finetuning (prompt tokens masked); best held-out response loss -> <output_dir>/sft_best.pth.

    ``stop_after`` ends the run after that step's checkpoint, as if it were killed there (for tests)."""
    base = load_base(config.pretrained_model, config.tokenizer_dir, "--pretrained_model")
    tokenizer, template = chat_base(base)
    extend_context(base.model, config.max_seq_len or chat_context(base.model))
    max_len = base.model.config.max_seq_len
    train_records, test_records, held_out = held_out_split(config)
    train_set = data_loader.GPTSFTDataset(train_records, tokenizer, max_len, template)
    test_set = data_loader.GPTSFTDataset(test_records, tokenizer, max_len, template)
    check_records_fit(train_set, config.data_path, max_len)
    model, checkpoint, resumed_from = resume_or(config, resume, "sft", tokenizer,
                                                functools.partial(sft_model, base.model, config))
    check_same_adapters(checkpoint, resumed_from, config.lora_r)
    if lora.lora_layers(model):
        lora.mark_only_lora_trainable(model)
    trainable, total = lora.count_parameters(model)
    print(f"sft: {len(train_set)} train / {len(test_set)} held-out examples, context {max_len}; "
          f"trainable parameters {trainable:,} of {total:,}" + (" (LoRA)" if lora.lora_layers(model) else "")
          + (f"; {held_out}" if held_out else ""))
    extra = {"sft_template": template, "base_model": str(config.pretrained_model),
             "lora": lora.lora_config(model) if lora.lora_layers(model) else None}
    collate = functools.partial(data_loader.collate_batch, pad_token_id=tokenizer.pad_token_id)
    trainer, _ = train(config, model, tokenizer, shuffled(train_set, config, collate), causal_lm_loss, "sft",
                       checkpoint, resumed_from, show_progress, stop_after, checkpoint_extra=extra,
                       evaluate_fn=language_model_eval(test_set, tokenizer, config.batch_size))
    if trainer.dist.is_main and extra["lora"]:
        finish_lora(trainer.output_dir / "sft_best.pth", config)
    return summary(trainer, "sft", **({"held_out": held_out} if held_out else {}))


def chat_context(model: nn.Module) -> int:
    """SFT's default context: a rotary model grows to CHAT_CONTEXT (four turns of the demo dialogues with their
    calculator calls fit), a model with learned positions keeps its own."""
    return max(CHAT_CONTEXT, model.config.max_seq_len) if model.rotary is not None else model.config.max_seq_len


def extend_context(model: nn.Module, max_seq_len: int | None) -> None:
    """The base model read at ``max_seq_len`` positions (``GPTModel.extend_context``); a shorter or equal one is the
    base's own context, and a learned position table cannot grow: one line saying so."""
    if max_seq_len is None or max_seq_len == model.config.max_seq_len:
        return
    if max_seq_len < model.config.max_seq_len:
        raise TrainError(f"--max_seq_len {max_seq_len} is shorter than the base model's context "
                         f"({model.config.max_seq_len}): finetune at its context or longer")
    try:
        model.extend_context(max_seq_len)
    except ValueError as err:
        raise TrainError(f"--max_seq_len {max_seq_len}: {err}") from None


def chat_base(base: checkpoints.Loaded) -> tuple[Any, str]:
    """SFT's tokenizer and format. A finetuned model keeps its template; a pretrained one learns the chat format
    (prompts.CHAT_TEMPLATE), and when its tokenizer predates the chat tokens they are appended to it and the model's
    embedding grows by as many rows (GPTModel.grow_vocab)."""
    template = base.metadata.get("sft_template") or CHAT_TEMPLATE
    tokenizer = base.tokenizer
    if is_chat_template(template) and not has_chat_tokens(tokenizer, template):
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
        base.model.grow_vocab(len(tokenizer), seed=0)
        print(f"sft: the tokenizer had no chat tokens: {', '.join(CHAT_TOKENS)} added as ids "
              f"{len(base.tokenizer)}-{len(tokenizer) - 1} (new embedding rows)")
    return tokenizer, template


def sft_model(base: nn.Module, config: SFTConfig) -> nn.Module:
    """A fresh copy of the base model with the run's dropout, and LoRA adapters when --lora_r."""
    model = type(base)(dataclasses.replace(base.config, dropout=config.dropout))
    model.load_state_dict(base.state_dict())
    if config.lora_r:
        lora.apply_lora(model, config.lora_targets.split(","), config.lora_r, config.lora_alpha, config.lora_dropout)
    return model.train()


def finish_lora(best: Path, config: SFTConfig) -> None:
    """Write the adapters alone (small, loadable on the base model); with --merge_lora make sft_best.pth plain."""
    loaded = checkpoints.load(best, device="cpu", trainable=True, keep_adapters=True)
    model, metadata = loaded.model, loaded.metadata
    adapter = best.with_name("sft_lora_adapter.pth")
    base_vocab = checkpoints.load_checkpoint(config.pretrained_model)["config"]["vocab_size"]
    wte = model.transformer.wte.weight
    added = {"added_embeddings": wte[base_vocab:].detach().clone()} if len(wte) > base_vocab else {}
    lora.save_lora(adapter, model, base_model=str(Path(config.pretrained_model).resolve()),
                   config=model.config.to_dict(), tokenizer_fingerprint=metadata["tokenizer_fingerprint"],
                   sft_template=metadata["sft_template"], **added)  # added: rows of tokens the base lacks
    print(f"LoRA adapters: {adapter} ({adapter.stat().st_size / 1e6:.2f} MB)")
    if config.merge_lora:
        lora.merge_lora(model)
        keep = {k: v for k, v in metadata.items() if k not in ("config", "lora")}
        checkpoints.save_checkpoint(best, model, **keep, lora=None)
        print(f"merged the adapters into {best} (a plain checkpoint)")


# ----------------------------------------------------------------------------- reward model and DPO

def reward_eval(dataset, pad_id: int, batch_size: int):
    """evaluate_fn: held-out Bradley-Terry loss (picks reward_best.pth), pairwise accuracy and mean margin
    (``scoring.reward_pairs``)."""
    params = scoring.ScoreParams(batch_size=batch_size)

    def evaluate(model: nn.Module) -> dict[str, float]:
        figures = scoring.reward_pairs(model, dataset, pad_id, params)
        return {"val_loss": figures["loss"], "val_accuracy": figures["pairwise_accuracy"],
                "val_margin": figures["mean_margin"]}

    return evaluate


def load_preference_stage(config: RewardConfig | DPOConfig):
    """(SFT checkpoint, train pairs, held-out pairs) for the stages that learn from preferences."""
    sft = load_base(config.sft_model, config.tokenizer_dir, "--sft_model")
    max_len = sft.model.config.max_seq_len
    train_set = data_loader.PreferencePairDataset(config.pairwise_data, sft.tokenizer, max_len, sft.template)
    test_set = data_loader.PreferencePairDataset(config.pairwise_test_data, sft.tokenizer, max_len, sft.template)
    check_records_fit(train_set, config.pairwise_data, max_len)
    return sft, train_set, test_set


def run_reward(config: RewardConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Reward model on preference pairs -> <output_dir>/reward_best.pth (best held-out Bradley-Terry loss)."""
    sft, train_set, test_set = load_preference_stage(config)
    tokenizer = sft.tokenizer
    build = functools.partial(GPTRewardModel.from_language_model, sft.model, config.reward_likelihood_weight)
    model, checkpoint, resumed_from = resume_or(config, resume, "reward", tokenizer, build)
    print(f"reward: {len(train_set)} train / {len(test_set)} held-out pairs, from {config.sft_model}, "
          f"NLL weight {config.reward_nll_weight}, label smoothing {config.label_smoothing}, answer likelihood "
          f"{'in the score' if model.likelihood else 'not used'}")
    collate = functools.partial(data_loader.collate_pairs, pad_token_id=tokenizer.pad_token_id)
    loss_fn = functools.partial(reward_loss, nll_weight=config.reward_nll_weight,
                                label_smoothing=config.label_smoothing)
    extra = {"model_class": "reward", "reward_likelihood": model.likelihood, "sft_template": sft.template,
             "base_model": str(config.sft_model)}
    trainer, last = train(config, model, tokenizer, shuffled(train_set, config, collate), loss_fn, "reward",
                          checkpoint, resumed_from, show_progress, checkpoint_extra=extra,
                          evaluate_fn=reward_eval(test_set, tokenizer.pad_token_id, 64))
    return summary(trainer, "reward", val_accuracy=last.get("val_accuracy"))


def dpo_eval(loss: DPOLoss, test_set, pad_id: int):
    """evaluate_fn: DPO's held-out preference loss (it picks dpo_best.pth: the NLL term keeps answers likely, it is
    not the goal), implicit-reward accuracy and margin, chosen-answer NLL; pair-weighted means over batches."""
    collate = functools.partial(data_loader.collate_pairs, pad_token_id=pad_id)
    batches = [collate([test_set[i] for i in range(k, min(k + 64, len(test_set)))])
               for k in range(0, len(test_set), 64)]

    @torch.no_grad()
    def evaluate(net: nn.Module) -> dict[str, float]:
        device = next(net.parameters()).device
        rows = [loss(net, training.to_device(b, device)) for b in batches]
        weights = [b["input_ids"].size(0) / 2 for b in batches]
        mean = lambda key: sum(float(r[key]) * w for r, w in zip(rows, weights)) / sum(weights)  # noqa: E731
        return {"val_loss": mean("preference_loss"), "val_accuracy": mean("accuracy"), "val_margin": mean("margin"),
                "val_chosen_nll": mean("chosen_nll")}

    return evaluate


def run_dpo(config: DPOConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Direct Preference Optimization against the frozen SFT model -> <output_dir>/dpo_best.pth."""
    sft, train_set, test_set = load_preference_stage(config)
    tokenizer = sft.tokenizer
    model, checkpoint, resumed_from = resume_or(config, resume, "dpo", tokenizer, lambda: copy.deepcopy(sft.model))
    device = training.init_distributed(config.device)[1]
    reference = copy.deepcopy(sft.model).to(device).eval().requires_grad_(False)
    loss = DPOLoss(reference, config.dpo_beta, config.label_smoothing, config.dpo_loss == "ipo", config.dpop_lambda,
                   config.dpo_nll_weight)
    print(f"dpo: {len(train_set)} train / {len(test_set)} held-out pairs, β={config.dpo_beta}, "
          f"{'IPO' if loss.ipo else 'sigmoid'} loss, label smoothing {config.label_smoothing}, "
          f"NLL weight {config.dpo_nll_weight}, DPOP λ {config.dpop_lambda}")
    collate = functools.partial(data_loader.collate_pairs, pad_token_id=tokenizer.pad_token_id)
    trainer, last = train(config, model, tokenizer, shuffled(train_set, config, collate), loss, "dpo", checkpoint,
                          resumed_from, show_progress, evaluate_fn=dpo_eval(loss, test_set, tokenizer.pad_token_id),
                          checkpoint_extra={"sft_template": sft.template, "base_model": str(config.sft_model)})
    return summary(trainer, "dpo", val_accuracy=last.get("val_accuracy"))


# ----------------------------------------------------------------------------- classification

def classify_eval(dataset, batch_size: int):
    """evaluate_fn: held-out cross-entropy (val_loss, picks classify_best.pth) and accuracy
    (``scoring.classification``)."""
    params = scoring.ScoreParams(batch_size=batch_size)

    def evaluate(model: nn.Module) -> dict[str, float]:
        figures = scoring.classification(model, dataset, params)
        return {"val_loss": figures["loss"], "val_accuracy": figures["accuracy"]}

    return evaluate


def classifier(base: checkpoints.Loaded, config: ClassifyConfig, labels: list[str]) -> nn.Module:
    """A classifier on a copy of the pretrained model, with the run's dropout and a fresh head."""
    model = GPTClassifier(dataclasses.replace(base.model.config, dropout=config.dropout), len(labels), labels)
    model.backbone.load_state_dict(base.model.state_dict())
    return model


def run_classify(config: ClassifyConfig, resume: str | None, show_progress: bool = True) -> dict[str, Any]:
    """Classification finetuning (a class head on the last real token, optionally only the last N blocks trained)
    -> <output_dir>/classify_best.pth (best held-out cross-entropy); then accuracy, per-class precision / recall and
    the confusion matrix of that checkpoint on the test set (printed, and <output_dir>/confusion_matrix.png)."""
    base = load_base(config.pretrained_model, config.tokenizer_dir, "--pretrained_model")
    tokenizer, max_len = base.tokenizer, base.model.config.max_seq_len
    train_set = data_loader.ClassificationDataset(config.classify_train, tokenizer, max_len)
    test_set = data_loader.ClassificationDataset(config.classify_test, tokenizer, max_len, train_set.labels)
    check_records_fit(train_set, config.classify_train, max_len)
    if config.trainable_blocks is not None and config.trainable_blocks > base.model.config.n_layers:
        raise TrainError(f"--trainable_blocks {config.trainable_blocks} exceeds the model's "
                         f"{base.model.config.n_layers} blocks; pass at most that (or leave it out to train "
                         "everything)")
    build = functools.partial(classifier, base, config, train_set.labels)
    model, checkpoint, resumed_from = resume_or(config, resume, "classify", tokenizer, build)
    if model.labels != train_set.labels:
        raise TrainError(f"the checkpoint's classes {model.labels} differ from {config.classify_train}'s "
                         f"{train_set.labels}: resume with the same data or start a fresh run")
    if config.trainable_blocks is not None:
        freeze_all_but_last(model, config.trainable_blocks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"classify: {len(train_set)} train / {len(test_set)} held-out texts, classes {train_set.labels}; trainable "
          f"parameters {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    collate = functools.partial(data_loader.collate_batch, pad_token_id=tokenizer.pad_token_id)
    loss_fn = functools.partial(classify_loss, label_smoothing=config.label_smoothing)
    extra = {"model_class": "classify", "labels": train_set.labels, "base_model": str(config.pretrained_model)}
    trainer, _ = train(config, model, tokenizer, shuffled(train_set, config, collate), loss_fn, "classify",
                       checkpoint, resumed_from, show_progress, checkpoint_extra=extra,
                       evaluate_fn=classify_eval(test_set, 64))
    result = summary(trainer, "classify")
    if trainer.dist.is_main:
        best = trainer.output_dir / "classify_best.pth"
        result.update(classify_report(best, test_set, trainer.device, trainer.output_dir / CONFUSION_CHART))
    return result


def classify_report(checkpoint: Path, test_set, device: torch.device, plot_path: Path) -> dict[str, Any]:
    """Accuracy, per-class precision / recall and the confusion matrix of a classifier checkpoint, printed and
    plotted."""
    model, _ = checkpoints.load_model_and_tokenizer(checkpoint, device=device)
    report = scoring.classification(model, test_set, scoring.ScoreParams(batch_size=64))
    print(f"held-out accuracy {report['accuracy']:.4f} (majority class {report['majority_baseline']:.4f}, "
          f"{report['n_samples']} texts)")
    for label in model.labels:
        print(f"  {label:<14} precision {report[f'precision/{label}']:.3f}  recall {report[f'recall/{label}']:.3f}")
    print("confusion matrix (rows: true class, columns: predicted)\n"
          + evaluator.format_confusion(report["confusion_matrix"], model.labels))
    evaluator.plot_confusion_matrix(report["confusion_matrix"], model.labels, plot_path,
                                    title=f"{checkpoint.name}: accuracy {report['accuracy']:.3f}")
    print(f"confusion matrix plot: {plot_path}")
    return {k: v for k, v in report.items() if k not in ("labels", "loss")}


# ----------------------------------------------------------------------------- PPO and GRPO

def rl_prompts(items: list, context: int, what: str) -> list:
    """Training prompts that leave room for an answer in the policy's context (RL items are ids or (ids, record))."""
    fitting = [item for item in items if len(item[0] if isinstance(item, tuple) else item) < context - 1]
    if not fitting:
        raise TrainError(f"every {what} prompt is too long for the policy's {context}-token context")
    return fitting


REWARD_STAGE_FIELDS = ("mode", "output_dir", "lr", "batch_size", "warmup_steps", "max_steps", "eval_interval",
                       "weight_decay", "min_lr_ratio")


def reward_first(config: PPOConfig, show_progress: bool) -> str:
    """--mode rlhf without --reward_model: train one into <output_dir>/reward/ with the reward stage's own schedule
    and budget, and the PPO run's data, device, precision and seed."""
    shared = {name: getattr(config, name) for name in field_names("reward") & field_names("rlhf")
              if name not in REWARD_STAGE_FIELDS}
    reward_config = RewardConfig(**shared, output_dir=str(Path(config.output_dir) / "reward"))
    print(f"no --reward_model: training one first into {reward_config.output_dir}")
    return run_reward(reward_config, None, show_progress)["checkpoint"]


def run_rlhf(config: PPOConfig, resume: str | None, show_progress: bool = True,
             stop_after: int | None = None) -> dict[str, Any]:
    """PPO against a reward model (trained first into <output_dir>/reward/ when --reward_model is not given)."""
    policy = load_base(config.sft_model, config.tokenizer_dir, "--sft_model")
    tokenizer, template = policy.tokenizer, policy.template
    records = load_preference_records(config.pairwise_data)  # all of PPO's data is checked before the reward stage
    prompts = [list(p) for p in {tuple(record_prompt_ids(tokenizer, r, template)): None for r in records}]
    prompts = rl_prompts(prompts, policy.model.config.max_seq_len, "--pairwise_data")
    eval_records = load_sft_records(config.test_data_path)[:config.eval_samples]
    checkpoint, resumed_from = training.find_resume_checkpoint(resume, config.output_dir, "ppo", tokenizer)
    if not config.reward_model:
        config = dataclasses.replace(config, reward_model=reward_first(config, show_progress))
    reward_model = checkpoints.load(config.reward_model, config.tokenizer_dir, device="cpu", expect="reward",
                                    flag="--reward_model",
                                    same_tokenizer_as=(tokenizer, f"--sft_model {config.sft_model}")).model
    print(f"ppo: {len(prompts)} training prompts, {len(eval_records)} held-out prompts; policy {config.sft_model}, "
          f"reward model {config.reward_model}")
    step = PPOStep(config, tokenizer, reward_model, eval_records, template)
    batches = data_loader.ShuffledBatches(prompts, config.rollout_batch_size, list, config.seed)
    trainer, last = train(config, policy.model, tokenizer, batches, step, "ppo", checkpoint, resumed_from,
                          show_progress, stop_after, evaluate_fn=step.held_out, evaluate_first=True,
                          steps_per_epoch=batches.batches_per_epoch,
                          checkpoint_extra={"sft_template": template, "base_model": str(config.sft_model)})
    return rl_summary(trainer, last)


def run_rlvf(config: GRPOConfig, resume: str | None, show_progress: bool = True,
             stop_after: int | None = None) -> dict[str, Any]:
    """GRPO from the SFT model with verifier rewards on the SFT training prompts -> <output_dir>/rlvf_best.pth."""
    policy = load_base(config.sft_model, config.tokenizer_dir, "--sft_model")
    tokenizer, template = policy.tokenizer, policy.template
    records, held, held_out = held_out_split(config)
    check_verifiers(records, f"--data_path {config.data_path}")
    items = rl_prompts([(record_prompt_ids(tokenizer, r, template), r) for r in records],
                       policy.model.config.max_seq_len, "--data_path")
    eval_records = held[:config.eval_samples]
    check_verifiers(eval_records, f"--test_data_path {config.test_data_path}" if held_out is None
                    else f"--data_path {config.data_path}")
    checkpoint, resumed_from = training.find_resume_checkpoint(resume, config.output_dir, "rlvf", tokenizer)
    print(f"rlvf: {len(records)} training prompts x {config.group_size} samples per group, {len(eval_records)} "
          f"held-out prompts; verifiers {sorted(VERIFIERS)}" + (f"; {held_out}" if held_out else ""))
    step = GRPOStep(config, tokenizer, eval_records, template)
    batches = data_loader.ShuffledBatches(items, config.rollout_batch_size, list, config.seed)
    trainer, last = train(config, policy.model, tokenizer, batches, step, "rlvf", checkpoint, resumed_from,
                          show_progress, stop_after, evaluate_fn=step.held_out, evaluate_first=True,
                          steps_per_epoch=batches.batches_per_epoch,
                          checkpoint_extra={"sft_template": template, "base_model": str(config.sft_model)})
    return {**rl_summary(trainer, last), **({"held_out": held_out} if held_out else {})}


def rl_summary(trainer: training.Trainer, last: dict[str, float]) -> dict[str, Any]:
    """The RL stage's result: steps, best checkpoint and its last held-out figures."""
    return {"stage": trainer.prefix, "steps": trainer.step,
            "checkpoint": str(trainer.output_dir / f"{trainer.prefix}_best.pth"),
            **{k: v for k, v in last.items() if k.startswith("val_")}}


# ----------------------------------------------------------------------------- exact match report

def exact_match_report(checkpoint_path: str | Path, test_data: str | Path | list[dict], max_new_tokens: int = 16,
                       device: str = "cpu", limit: int | None = None) -> dict[str, float]:
    """Greedy exact match of a language-model checkpoint on held-out SFT records (a file, or the records), overall
    and per "task" (``scoring.answer_exact_match``)."""
    loaded = checkpoints.load(checkpoint_path, device=device)
    records = (test_data if isinstance(test_data, list) else load_sft_records(test_data))[:limit]
    return scoring.answer_exact_match(loaded.model, loaded.tokenizer, records, loaded.template, max_new_tokens,
                                      scoring.ScoreParams(batch_size=64))
