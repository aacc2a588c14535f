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

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

import checkpoints
import cli
import training
from devices import set_threads
from finetune_stages import (CONFIGS, MODES, FinetuneConfig, exact_match_report, field_names, held_out_split,
                             run_classify, run_dpo, run_reward, run_rlhf, run_rlvf, run_sft)

RUNS = {"sft": run_sft, "reward": run_reward, "rlhf": run_rlhf, "dpo": run_dpo, "rlvf": run_rlvf,
        "classify": run_classify}
REPORTED = ("sft", "rlhf", "dpo", "rlvf")  # language-model stages: greedy exact match on --test_data_path after
LOOP = [f.name for f in cli.settings_of(training.TrainConfig)]  # every mode's, in the loop's group of --help


def modes_of(dest: str) -> tuple[str, ...]:
    return tuple(mode for mode in MODES if dest in field_names(mode))


def mode_settings() -> list[str]:
    """Each mode's own settings (not the loop's), in the order the modes and their fields come."""
    names = (f.name for mode in MODES for f in cli.settings_of(CONFIGS[mode]) if f.name not in LOOP)
    return list(dict.fromkeys(names))


def mode_default_note(dest: str) -> str:
    """"--mode ...; default ..." for --help: the modes that have the setting (unless all do), and its default in
    each, per mode where the modes differ."""
    defaults = {mode: getattr(CONFIGS[mode](), dest) for mode in modes_of(dest)}
    parts = [] if len(defaults) == len(MODES) else ["--mode " + ", ".join(defaults)]
    if len(set(map(repr, defaults.values()))) > 1:
        parts.append("default: " + ", ".join(f"{mode} {value}" for mode, value in defaults.items()))
    elif cli.default_note(next(iter(defaults.values()))):
        parts.append(cli.default_note(next(iter(defaults.values()))))
    return "; ".join(parts)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python finetune.py",
                           description="Finetune a pretrained GPT: SFT (optionally LoRA), a reward model, RLHF with "
                                       "PPO, DPO, RLVF (GRPO with verifiers) or a classifier. Each stage's defaults "
                                       "work right after the previous one (pretrain -> sft -> reward -> rlhf / dpo / "
                                       "rlvf). Ctrl-C or SIGTERM saves a resumable checkpoint.")
    p.add_argument("--mode", choices=MODES, default="sft", help="which stage to train (default: sft)")
    loop = p.add_argument_group("the training loop (every mode)")
    cli.add_settings(loop, training.TrainConfig, notes={name: mode_default_note(name) for name in LOOP})
    cli.add_settings(loop, training.RunOptions)
    groups: dict[tuple[str, ...], Any] = {}
    for dest in mode_settings():  # a group per set of modes; the help names each mode's default
        modes = modes_of(dest)
        if modes not in groups:
            groups[modes] = p.add_argument_group("every mode" if len(modes) == len(MODES) else
                                                 "--mode " + ", ".join(modes))
        cli.add_settings(groups[modes], CONFIGS[modes[0]], [dest], notes={dest: mode_default_note(dest)})
    return p


def parse(argv: Sequence[str] | None) -> tuple[training.RunOptions, FinetuneConfig]:
    """(how to run, the mode's config from the flags the user typed and the mode's defaults)."""
    args = build_parser().parse_args(argv)
    options = training.RunOptions(**cli.typed_settings(args, training.RunOptions))
    values = {name: value for name, value in vars(args).items() if name not in {"mode", *vars(options)}}
    foreign = sorted(set(values) - field_names(args.mode))
    if foreign:
        modes = " / ".join(modes_of(foreign[0]))
        raise cli.UsageError(f"--{foreign[0]} applies to --mode {modes} only, not --mode {args.mode}")
    if values.get("optimizer") == "muon" and values.get("lora_r"):
        raise cli.UsageError("--optimizer muon trains the blocks' weight matrices, --lora_r only adapters: use "
                             "--optimizer adamw with LoRA")
    if "val_fraction" in values and ("test_data_path" in values or "data_path" not in values):
        raise cli.UsageError("--val_fraction holds out part of your --data_path: pass --data_path, and no "
                             "--test_data_path")
    if "data_path" in values and "test_data_path" not in values:
        values["test_data_path"] = None  # the user's own data is judged on a held-out split of it, not the demo's
    if ("max_minutes" in values or "epochs" in values) and "max_steps" not in values:
        values["max_steps"] = None  # an explicit time or epoch budget replaces the default step count
    return options, CONFIGS[args.mode](**values)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, Ctrl-C/SIGTERM save and exit 130/143."""
    return cli.run_cli(_main, argv)


MODEL_INPUTS = ("pretrained_model", "sft_model", "reward_model")  # the config fields of the models a run starts from


def check_inputs_outside_output(config: FinetuneConfig) -> None:
    """A run takes its --output_dir over (an earlier run's files and a different tokenizer move to previous/), so
    nothing it starts from may live in it: the models, their tokenizer, what they refer to (a LoRA adapter's base
    model). SFT into models/pretrain moved the pretrained model's tokenizer away."""
    out = Path(config.output_dir).resolve()
    inputs = []
    for name in MODEL_INPUTS:
        value = getattr(config, name, None)
        if name == "reward_model" and value is not None and out / "reward" in Path(value).resolve().parents:
            continue  # where rlhf trains its reward model first, and a rerun passes it back: never moved aside
        inputs += checkpoints.checkpoint_inputs(f"--{name}", value, config.tokenizer_dir)
    cli.check_outputs({"--output_dir": config.output_dir}, inputs, own=lambda path: True)  # earlier runs: previous/


def _main(argv: Sequence[str] | None) -> int:
    options, config = parse(argv)
    set_threads(options.num_threads)
    cli.check_output_folder(config.output_dir, "--output_dir")
    check_inputs_outside_output(config)
    try:
        summary = RUNS[config.mode](config, options.resume)
        if config.mode in REPORTED and training.DistInfo.from_env().is_main:
            test = config.test_data_path if config.test_data_path is not None else held_out_split(config)[1]
            summary["exact_match"] = exact_match_report(summary["checkpoint"], test,
                                                        config.max_new_tokens)
        print(json.dumps(summary, ensure_ascii=False))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
