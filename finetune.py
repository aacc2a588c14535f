"""The finetuning CLI: one command for every stage, each with its own settings and defaults (``finetune_stages.py``),
all on the one training loop. Ctrl-C or SIGTERM saves a resumable checkpoint (continue with --resume auto).

    python finetune.py --mode sft                  # models/pretrain/pretrain_best.pth -> models/sft/sft_best.pth
    python finetune.py --mode sft --lora_r 8 --merge_lora
    python finetune.py --mode reward               # models/sft/sft_best.pth -> models/reward/reward_best.pth
    python finetune.py --mode rlhf                 # the reward model first (unless --reward_model), then PPO
    python finetune.py --mode dpo                  # DPO on the preference pairs against the frozen SFT model
    python finetune.py --mode rlvf                 # GRPO with automatic verifiers instead of a reward model
    python finetune.py --mode classify             # a classification head on the pretrained model

A flag of another mode is a one-line error (``--group_size applies to --mode rlvf only``), never silently ignored.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in pretrain_trainer: sleeping threads on a shared CPU

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

import torch

import cli
import training
from devices import set_threads
from finetune_stages import (CONFIGS, MODES, FinetuneConfig, exact_match_report, field_names, run_classify, run_dpo,
                             run_reward, run_rlhf, run_rlvf, run_sft)

RUNS = {"sft": run_sft, "reward": run_reward, "rlhf": run_rlhf, "dpo": run_dpo, "rlvf": run_rlvf,
        "classify": run_classify}
REPORTED = ("sft", "rlhf", "dpo", "rlvf")  # language-model stages: greedy exact match on --test_data_path after
CLI_ONLY = {"mode", "resume", "num_threads"}  # flags that are not settings of a mode

FLAGS: dict[str, dict[str, Any]] = {  # each mode setting's flag (the training loop's come from training.py)
    "data_path": dict(help="sft: training records .json/.jsonl [{\"instruction\", \"response\"}] (optional \"input\", "
                           "\"task\"); rlvf: the prompts, same format, the response being what the verifiers check"),
    "test_data_path": dict(help="held-out SFT records: sft picks sft_best.pth on them; the RL stages evaluate on "
                                "them; every language-model stage reports their exact match at the end"),
    "pairwise_data": dict(help="preference pairs [{\"instruction\", \"chosen\", \"rejected\"}]; rlhf takes its "
                               "rollout prompts from their instructions"),
    "pairwise_test_data": dict(help="held-out preference pairs (pick reward_best.pth / dpo_best.pth)"),
    "pretrained_model": dict(help="the pretrained model to start from"),
    "sft_model": dict(help="the SFT model: the policy and reference, and the reward model's backbone"),
    "reward_model": dict(help="a trained reward model (default: train one first into <output_dir>/reward/)"),
    "tokenizer_dir": dict(help="tokenizer folder (default: <model folder>/tokenizer)"),
    "dropout": dict(type=cli.fraction, help="dropout while finetuning"),
    "lora_r": dict(type=cli.nonnegative_int, help="LoRA rank (0 = full finetuning)"),
    "lora_alpha": dict(type=cli.positive_float, help="LoRA scaling alpha (scale = alpha / r)"),
    "lora_dropout": dict(type=cli.fraction, help="dropout on the LoRA input"),
    "lora_targets": dict(help="comma-separated nn.Linear names to adapt (c_attn is the fused q/k/v projection)"),
    "merge_lora": dict(action="store_true", help="write sft_best.pth with the adapters merged (a plain checkpoint "
                                                 "every tool loads); the adapters are saved on their own either way"),
    "max_new_tokens": dict(type=cli.positive_int, help="longest generated answer (rollouts, evaluations, report)"),
    "eval_samples": dict(type=cli.positive_int, help="held-out prompts per evaluation"),
    "rollout_batch_size": dict(type=cli.positive_int, help="prompts sampled per step"),
    "rollout_temperature": dict(type=cli.positive_float, help="sampling temperature of rollouts"),
    "ppo_epochs": dict(type=cli.positive_int, help="passes over each step's rollouts"),
    "ppo_minibatch_size": dict(type=cli.positive_int, help="sequences per gradient update (split into --grad_accum "
                                                           "micro-batches)"),
    "clip_range": dict(type=cli.positive_float, help="policy ratio clip ε"),
    "kl_coef": dict(type=cli.nonnegative_float, help="β of the KL penalty to the reference (SFT) model"),
    "target_kl": dict(type=cli.positive_float, help="adapt β so the per-sequence KL tracks this (Ziegler et al.); "
                                                    "default: fixed β"),
    "kl_horizon": dict(type=cli.positive_int, help="with --target_kl: the horizon (in sequences) of β's control"),
    "gamma": dict(type=cli.probability, help="discount"),
    "lam": dict(type=cli.probability, help="GAE λ"),
    "value_clip_range": dict(type=cli.positive_float, help="value clip around the rollout's values"),
    "vf_coef": dict(type=cli.positive_float, help="weight of the value loss"),
    "critic_lr": dict(type=cli.positive_float, help="critic learning rate (on the policy's schedule)"),
    "reward_nll_weight": dict(type=cli.nonnegative_float,
                              help="add this times the chosen answers' per-token NLL under the backbone's LM head "
                                   "(GRM, Yang et al. 2024): regularises the backbone so the scores generalise"),
    "reward_likelihood_weight": dict(type=cli.nonnegative_float,
                                     help="> 0 adds a learned weight (starting here) times the answer's mean "
                                          "per-token log-prob under the backbone's LM head to the score; 0: the head "
                                          "alone"),
    "dpo_beta": dict(type=cli.positive_float, help="β, how far the policy may move from the reference"),
    "dpo_loss": dict(choices=("sigmoid", "ipo"), help="the DPO loss (sigmoid) or IPO's squared loss"),
    "dpo_nll_weight": dict(type=cli.nonnegative_float,
                           help="add this times the chosen answers' per-token NLL (RPO, Pang et al. 2024): keeps the "
                                "chosen answers likely, which plain DPO lets fall with the rejected ones"),
    "dpop_lambda": dict(type=cli.nonnegative_float,
                        help="DPO-Positive's λ (Pal et al. 2024; they use 50): the margin loses λ times how far a "
                             "chosen answer's log-prob fell below the reference's; 0: off"),
    "group_size": dict(type=cli.int_at_least(2), help="answers sampled per prompt (GRPO's group)"),
    "format_weight": dict(type=cli.nonnegative_float,
                          help="weight of the format verifier's bonus added to the task verifier's reward"),
    "skip_uniform_groups": dict(action=argparse.BooleanOptionalAction,
                                help="train only on groups whose answers scored differently (DAPO's dynamic "
                                     "sampling; a group that is all right or all wrong has zero advantage)"),
    "classify_train": dict(help="training texts, .jsonl of {\"text\", \"label\"} (labels are class names)"),
    "classify_test": dict(help="held-out texts (pick classify_best.pth; accuracy, precision/recall, confusion)"),
    "trainable_blocks": dict(type=cli.nonnegative_int, help="train only the last N transformer blocks + final norm + "
                                                            "head (0 = norm and head only); default: the whole model"),
    "label_smoothing": dict(type=cli.fraction,
                            help="reward and dpo: assumed fraction of flipped preference labels (bounds the margins; "
                                 "the held-out loss stays the plain one); classify: label smoothing of the training "
                                 "cross-entropy"),
}


def modes_of(dest: str) -> tuple[str, ...]:
    return tuple(mode for mode in MODES if dest in field_names(mode))


def defaults_of(dest: str) -> dict[str, Any]:
    """The default of a setting in each mode that has it."""
    out = {}
    for mode in modes_of(dest):
        field = next(f for f in fields(CONFIGS[mode]) if f.name == dest)
        out[mode] = field.default if field.default is not MISSING else None
    return out


def default_note(dest: str) -> str:
    """" (modes ...; default ...)" for --help, per mode where the modes differ."""
    defaults = defaults_of(dest)
    parts = [] if len(defaults) == len(MODES) else ["--mode " + ", ".join(defaults)]
    if len(set(map(repr, defaults.values()))) > 1:
        parts.append("default: " + ", ".join(f"{mode} {value}" for mode, value in defaults.items()))
    elif next(iter(defaults.values())) not in (None, False):
        parts.append(f"default: {next(iter(defaults.values()))}")
    return f" ({'; '.join(parts)})" if parts else ""


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python finetune.py", formatter_class=argparse.HelpFormatter,
                           description="Finetune a pretrained GPT: SFT (optionally LoRA), a reward model, RLHF with "
                                       "PPO, DPO, RLVF (GRPO with verifiers) or a classifier. Each stage's defaults "
                                       "work right after the previous one (pretrain -> sft -> reward -> rlhf / dpo / "
                                       "rlvf). Ctrl-C or SIGTERM saves a resumable checkpoint.")
    p.add_argument("--mode", choices=MODES, default="sft", help="which stage to train (default: sft)")
    training.add_loop_arguments(p.add_argument_group("the training loop (every mode)"), CONFIGS["sft"]())
    groups: dict[tuple[str, ...], Any] = {}
    for dest, options in FLAGS.items():
        modes = modes_of(dest)
        if modes not in groups:
            groups[modes] = p.add_argument_group("every mode" if len(modes) == len(MODES) else
                                                 "--mode " + ", ".join(modes))
        groups[modes].add_argument(f"--{dest}", **options)
    for action in p._actions:  # a mode's own defaults apply after parsing (finetune_stages); --help shows them
        if action.dest not in CLI_ONLY and modes_of(action.dest):
            action.default = None
            action.help = (action.help or "") + default_note(action.dest)
    return p


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Any]:
    """(the CLI namespace, the mode's config from the flags the user typed and the mode's defaults)."""
    args = build_parser().parse_args(argv)
    typed = cli.explicit_flags(build_parser, argv) - CLI_ONLY
    names = field_names(args.mode)
    foreign = sorted(typed - names)
    if foreign:
        modes = " / ".join(modes_of(foreign[0]))
        raise cli.UsageError(f"--{foreign[0]} applies to --mode {modes} only, not --mode {args.mode}")
    values = {name: getattr(args, name) for name in typed}
    if values.get("optimizer") == "muon" and values.get("lora_r"):
        raise cli.UsageError("--optimizer muon trains the blocks' weight matrices, --lora_r only adapters: use "
                             "--optimizer adamw with LoRA")
    if ("max_minutes" in values or "epochs" in values) and "max_steps" not in values:
        values["max_steps"] = None  # an explicit time or epoch budget replaces the default step count
    return args, CONFIGS[args.mode](**values)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, Ctrl-C/SIGTERM save and exit 130/143."""
    return cli.run_cli(_main, argv)


MODEL_INPUTS = ("pretrained_model", "sft_model", "reward_model", "tokenizer_dir")  # the config fields a run starts from


def check_inputs_outside_output(config: FinetuneConfig) -> None:
    """A run takes its --output_dir over (an earlier run's files and a different tokenizer move to previous/), so the
    models it starts from must not live in it: SFT into models/pretrain moved the pretrained model's tokenizer away."""
    out = Path(config.output_dir).resolve()
    for name in MODEL_INPUTS:
        value = getattr(config, name, None)
        source = Path(value).resolve() if value is not None else None
        if name == "reward_model" and source is not None and out / "reward" in source.parents:
            continue  # where rlhf trains its reward model first, and a rerun passes it back: never moved aside
        if source is not None and (source == out or out in source.parents):
            raise cli.UsageError(f"--output_dir {config.output_dir} holds --{name} {value}: a run takes its output "
                                 "folder over, so it must not hold what the run starts from; pass another "
                                 f"--output_dir (e.g. models/{config.mode})")


def _main(argv: Sequence[str] | None) -> int:
    args, config = parse(argv)
    set_threads(args.num_threads)
    cli.check_output_folder(config.output_dir, "--output_dir")
    check_inputs_outside_output(config)
    try:
        summary = RUNS[config.mode](config, args.resume)
        if config.mode in REPORTED and training.DistInfo.from_env().is_main:
            summary["exact_match"] = exact_match_report(summary["checkpoint"], config.test_data_path,
                                                        config.max_new_tokens)
        print(json.dumps(summary, ensure_ascii=False))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
