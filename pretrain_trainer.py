"""Pretraining: ``GPTTrainer`` (the shared ``training.Trainer`` on random windows of a packed token stream) and its CLI.

    python pretrain_trainer.py                      # tokenizer (if missing) + ~5 minute CPU run on data/pretrain
    python pretrain_trainer.py --depth 6 --print_plan   # the run one number sizes (sizing.py), without training
    torchrun --standalone --nproc_per_node=2 pretrain_trainer.py --max_steps 1000
"""
from __future__ import annotations

import os

# Sleeping rather than spinning OpenMP threads: on a shared CPU box spinning threads run 3-5x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import cli
import data_loader
import scoring
import sizing
import token_cache
import training
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import load_model_and_tokenizer
from decoding import SamplingParams, generate
from devices import set_threads
from gpt_model import PRESETS, GPTConfig, GPTModel, swiglu_hidden
from losses import causal_lm_loss
from prompts import encode_prompt
from readers import DEFAULT_TEXT_FIELD, read_documents
from training import DistInfo, Trainer, TrainError, barrier, find_resume_checkpoint, init_distributed

PROCESS_START = time.time()
DEFAULT_TOKENIZER_DIR = "models/bpe_tokenizer"
DEFAULT_MINUTES = 4.75  # leaves ~15 s of a 5-minute run for the final evaluation and the samples
# the default optimizer and each one's lr: the best of an lr sweep each, Muon ahead on the default run
# (benchmarks/bench_optimizer.py, docs/results.md); finetuning keeps AdamW
DEFAULT_OPTIMIZER, DEFAULT_LR = "muon", {"adamw": 3e-3, "muon": 6e-3}
DEFAULT_TINY_LAYERS = 2  # in 2-5 minutes on 2 cores, 2 blocks of 128 beat 1, 3 or 4 (val bpb, measured)
# rotary positions, RMSNorm, QK-norm, SwiGLU, grouped kv heads: lower val bpb than GPT-2's blocks at equal time
# (benchmarks/bench_architecture.py, docs/results.md), and a context that grows at SFT
DEFAULT_PRESET, TINY_PRESETS = "modern-tiny", ("modern-tiny", "tiny")
SIZED_PRESET = "tiny"  # a sized run (--depth, CUDA auto-sizing) trains GPT-2's blocks: sizing's shapes and counts
SAMPLE_PROMPTS = ("LEAR:", "ROMEO:", "《静夜思》 李白：")
SHAPE_FIELDS = ("preset", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len")
DEPTH_EXCLUDES = ("preset", "n_layers", "d_model", "n_heads", "d_ff")  # what --depth sets itself
BUDGET_FIELDS = ("max_steps", "epochs", "max_minutes")  # a typed one wins over the plan's token budget
RULE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(sizing.SizingRules)}
PROBE_STEPS, PROBE_WARMUP = 10, 3  # the automatic sizing's throughput measurement (CUDA): steps timed, after these


@dataclass
@cli.with_defaults(optimizer=DEFAULT_OPTIMIZER, lr=DEFAULT_LR[DEFAULT_OPTIMIZER])
class TrainConfig(training.TrainConfig):
    """Pretraining's data and model fields on top of the loop's settings, each with its flag's help."""

    train_data: str = cli.setting("data/pretrain/train.txt", "training text: a .txt (one document per line), .jsonl / "
                                  ".jsonl.gz / .jsonl.zst ({\"text\": ...} per line) or .parquet file, or a folder of "
                                  "any mix", flag="train_data_dir")
    val_data: str | None = cli.setting("data/pretrain/val.txt", "validation text (same formats); 'none' to skip "
                                       "evaluation", cli.path_or_none, flag="val_data_dir")
    cache_dir: str | None = cli.setting(None, "where tokenized data is cached (default: <data folder>/.cache; set it "
                                        "when that is read-only)")
    text_field: str = cli.setting(DEFAULT_TEXT_FIELD, "the field (.jsonl*) or column (.parquet) that holds each "
                                  "document's text, in both the training and the validation data", cli.field_name)
    preset: str = cli.setting(DEFAULT_PRESET, "GPTConfig preset the model starts from (tiny: GPT-2's blocks at the "
                              "same size)", choices=sorted(PRESETS))
    n_layers: int | None = cli.setting(None, "override the preset's number of transformer blocks (default: "
                                       f"{DEFAULT_TINY_LAYERS} with the {' and '.join(TINY_PRESETS)} presets, best "
                                       "in the 5-minute CPU run; the preset's own otherwise)", cli.positive_int)
    d_model: int | None = cli.setting(None, "override the preset's hidden size (d_ff follows: 4x, ~8/3x with "
                                            "SwiGLU, unless --d_ff)",
                                      cli.positive_int)
    n_heads: int | None = cli.setting(None, "override the preset's number of attention heads", cli.positive_int)
    d_ff: int | None = cli.setting(None, "override the feed-forward hidden size", cli.positive_int)
    depth: int | None = cli.setting(None, "size the run from one number (docs/pretraining.md, Sizing a run): depth "
                                    "layers of width 64 x depth, heads of 64, d_ff 4 x width; the lr scaled to the "
                                    "width (unless --lr) and the steps from --tokens_per_param, at most --max_epochs "
                                    "over the corpus (unless --max_steps, --max_minutes or --epochs); not with "
                                    "--preset, --n_layers, --d_model, --n_heads or --d_ff", cli.positive_int)
    tokens_per_param: float = cli.setting(RULE_DEFAULTS["tokens_per_param"], "a sized run's (--depth, or automatic "
                                          "on a GPU) training tokens per parameter (20: compute-optimal, Chinchilla)",
                                          cli.positive_float)
    max_epochs: float = cli.setting(RULE_DEFAULTS["max_epochs"], "a sized run trains at most this many passes over "
                                    "the training data (repeats past ~4 are worth little)", cli.positive_float)
    dropout: float = cli.setting(0.0, "dropout probability during training", cli.fraction)
    max_seq_len: int = cli.setting(64, "context length: tokens per training window", cli.int_at_least(2))
    num_workers: int | None = cli.setting(None, "processes for tokenizing the data (default: all cores)",
                                          cli.positive_int)


@dataclass
class PretrainOptions(training.RunOptions):
    """The command's settings besides the config: the tokenizer it uses (or trains) and the samples it prints."""

    tokenizer_dir: str = cli.setting(DEFAULT_TOKENIZER_DIR, "tokenizer folder (vocab.json, merges.txt); trained on the "
                                     "training data when missing")
    vocab_size: int = cli.setting(8192, "vocabulary size of the tokenizer trained when --tokenizer_dir is missing",
                                  cli.int_at_least(260))
    samples: int = cli.setting(100, "new tokens per sample generation printed at the end (0 = none)",
                               cli.nonnegative_int)
    print_plan: bool = cli.setting(False, "print the run's plan (model, parameters, tokens, steps, epochs, lr) and "
                                   "exit without training; it tokenizes the data (cached for the run), trains the "
                                   "tokenizer first when --tokenizer_dir is missing, and on a GPU with no size or "
                                   "budget flags times a few steps, as the run would")


class GPTTrainer(Trainer):
    """Trains a GPTModel on random windows of a packed token stream; rank 0 evaluates, logs and saves.

    ``requested_shape`` (flag -> value) is what the user asked for; resuming a checkpoint of another shape is an
    error rather than a silent override. By default: the config's explicit (non-None) shape fields. ``streams`` and
    ``found`` (``find_resume_checkpoint``'s answer) are what the caller already has, else made here.
    """

    def __init__(self, config: TrainConfig, tokenizer: ByteLevelBPETokenizer, resume: str | None = None,
                 start_time: float | None = None, show_progress: bool = True,
                 requested_shape: dict[str, Any] | None = None, streams: tuple | None = None,
                 found: tuple[dict | None, str | None] | None = None):
        self.dist, device = init_distributed(config.device)
        self.config, self.tokenizer, self.show_progress = config, tokenizer, show_progress
        checkpoint, resumed_from = found or find_resume_checkpoint(resume, config.output_dir, "pretrain", tokenizer)
        self.resumed_from = resumed_from
        self.train_stream, self.val_stream = streams or token_streams(config, tokenizer, self.dist, show_progress)
        self.byte_lengths = data_loader.token_byte_lengths(tokenizer)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        if checkpoint:
            model_config = GPTConfig.from_dict(checkpoint["config"])
            self._check_shape(model_config, requested_shape, resumed_from)
        else:
            model_config = model_config_of(config, tokenizer)
        batches = data_loader.RandomWindowBatches(self.train_stream.tokens, model_config.max_seq_len,
                                                  config.batch_size, seed=config.seed, rank=self.dist.rank)
        tokens_per_step = config.batch_size * model_config.max_seq_len * config.grad_accum * self.dist.world_size
        evaluate = self._evaluate if self.val_stream is not None else None
        super().__init__(config, GPTModel(model_config), tokenizer, batches, causal_lm_loss, prefix="pretrain",
                         evaluate_fn=evaluate, steps_per_epoch=len(self.train_stream) / tokens_per_step,
                         checkpoint=checkpoint, resumed_from=resumed_from, start_time=start_time,
                         show_progress=show_progress)

    # -- setup
    def _check_shape(self, model_config: GPTConfig, requested: dict[str, Any] | None, source: str) -> None:
        """A resumed run keeps its checkpoint's shape: a flag asking for another one is an error, not ignored."""
        c = self.config
        if requested is None:
            requested = {k: getattr(c, k) for k in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len")
                         if getattr(c, k) is not None}
        asked = [(f"--{flag} {value}", flag, flag, value) for flag, value in requested.items()
                 if flag in SHAPE_FIELDS and flag != "preset" and value is not None]
        if requested.get("depth"):  # --depth asks for every field of its shape
            depth = requested["depth"]
            asked += [(f"--depth {depth} ({k} {v})", "depth", k, v) for k, v in sizing.shape_from_depth(depth).items()]
        for what, flag, field, value in asked:
            actual = getattr(model_config, field, None)
            if value != actual:
                raise TrainError(f"{what} differs from the checkpoint's {actual} ({source}): a resumed run keeps the "
                                 f"checkpoint's shape; drop --{flag}, or start a fresh run without --resume")

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.model.config.max_seq_len * self.config.grad_accum * self.dist.world_size

    def _evaluate(self, model: GPTModel) -> dict[str, float]:
        """val_loss (nats/token), val_ppl and val_bpb over the validation stream's sequential windows: the one rule
        of ``scoring.stream_loss``, so ``python evaluator.py`` gives the same bits per byte for the checkpoint."""
        params = scoring.ScoreParams(batch_size=self.config.batch_size, dtype=self.dtype)
        figures = scoring.stream_loss(model, self.val_stream.tokens, self.byte_lengths, params,
                                      self.config.eval_batches)
        return {"val_loss": figures["loss"], "val_ppl": figures["perplexity"], "val_bpb": figures["bits_per_byte"]}


def model_config_of(config: TrainConfig, tokenizer: ByteLevelBPETokenizer) -> GPTConfig:
    """The model a fresh run builds: the preset with the config's shape fields over it."""
    c = config
    overrides = {k: v for k, v in {"n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
                                   "d_ff": c.d_ff}.items() if v}
    if c.d_model and not c.d_ff:  # the preset's MLP budget at the new width: 4x, or SwiGLU's ~8/3x
        overrides["d_ff"] = swiglu_hidden(c.d_model) if PRESETS[c.preset].get("mlp") == "swiglu" else 4 * c.d_model
    return GPTConfig.from_preset(c.preset, vocab_size=len(tokenizer), max_seq_len=c.max_seq_len,
                                 dropout=c.dropout, pad_token_id=tokenizer.pad_token_id, **overrides)


def token_streams(config: TrainConfig, tokenizer: ByteLevelBPETokenizer, info: DistInfo,
                  show_progress: bool = True) -> tuple[token_cache.TokenStream, token_cache.TokenStream | None]:
    """Tokenize (rank 0 first, so the cache is written once) and memmap the train/val streams."""
    streams = None
    for turn in ("main", "others"):
        if (turn == "main") == info.is_main:
            build = lambda src: token_cache.build_token_stream(src, tokenizer, config.num_workers,
                                                               cache_dir=config.cache_dir,
                                                               show_progress=show_progress and info.is_main,
                                                               text_field=config.text_field)
            streams = (build(config.train_data), build(config.val_data) if config.val_data else None)
        barrier(info)
    return streams


# ----------------------------------------------------------------------------- sizing the run

def sizing_rules(config: TrainConfig) -> sizing.SizingRules:
    """The rules of a sized run: the optimizer's default lr as the base, the config's tokens and epoch limit."""
    return sizing.SizingRules(base_lr=DEFAULT_LR[config.optimizer], tokens_per_param=config.tokens_per_param,
                              max_epochs=config.max_epochs)


@dataclass(frozen=True)
class Corpus:
    """What a plan is made for: the training tokens, the vocabulary, and the tokens of one optimizer step."""

    tokens: int
    vocab: int
    tokens_per_step: int


def apply_plan(config: TrainConfig, plan: sizing.Plan, typed: set[str]) -> TrainConfig:
    """The config of a planned run: its shape, its lr (unless --lr was typed) and its steps (unless a budget was)."""
    values: dict[str, Any] = {**plan.shape(), "depth": plan.depth, "preset": SIZED_PRESET}
    if "lr" not in typed:
        values["lr"] = plan.lr
    if not typed & set(BUDGET_FIELDS):
        values["max_steps"] = plan.steps
    return dataclasses.replace(config, **values)


def probe_depth(config: TrainConfig, corpus: Corpus) -> int:
    """The depth whose throughput the automatic sizing measures: the largest the corpus supports uncapped (the
    largest the budget can pick), or 1."""
    rules = sizing_rules(config)
    supported = [d for d in range(1, rules.max_depth + 1)
                 if not sizing.plan_from_depth(d, corpus.vocab, config.max_seq_len, corpus.tokens,
                                               corpus.tokens_per_step, rules).capped_by_epochs]
    return supported[-1] if supported else 1


def auto_plan(config: TrainConfig, corpus: Corpus, measured_depth: int, tokens_per_sec: float,
              minutes: float) -> sizing.Plan:
    """The largest depth that trains compute-optimally in ``minutes`` at the FLOP/s measured at ``measured_depth``
    (``sizing.plan_for_budget``); a pure function of the measured figures."""
    speed = sizing.flops_throughput(tokens_per_sec, measured_depth, corpus.vocab, config.max_seq_len)
    return sizing.plan_for_budget(minutes, speed, corpus.vocab, config.max_seq_len, corpus.tokens,
                                  corpus.tokens_per_step, sizing_rules(config))


def size_run(config: TrainConfig, typed: set[str], corpus: Corpus, measured: tuple[int, float] | None = None,
             minutes_left: float = 0.0) -> tuple[TrainConfig, sizing.Plan | None]:
    """(the run's config, its plan): --depth's plan; or, given ``measured`` (depth, tokens/s), the depth that fits
    ``minutes_left``; or the config as it is (no plan). Pure: the measurement is the caller's."""
    if config.depth:
        plan = sizing.plan_from_depth(config.depth, corpus.vocab, config.max_seq_len, corpus.tokens,
                                      corpus.tokens_per_step, sizing_rules(config))
    elif measured is not None:
        depth, speed = measured
        try:
            plan = auto_plan(config, corpus, depth, speed, minutes_left)
        except sizing.SizingError as err:  # nothing was asked for: fall back to the default run, saying why
            print(f"automatic sizing: {err}; training the default model instead")
            return config, None
        print(f"automatic sizing: {sizing.count(speed)} tokens/s measured at depth {depth}; the largest depth "
              f"that fits {minutes_left:.1f} minutes is {plan.depth}")
    else:
        return config, None
    return apply_plan(config, plan, typed), plan


def auto_sizing_applies(typed: set[str], device: torch.device, info: DistInfo, resuming: bool) -> bool:
    """Whether the run sizes itself: a single CUDA process, a fresh run, and no shape or budget typed."""
    asked = typed & {*DEPTH_EXCLUDES, "depth", *BUDGET_FIELDS}
    return device.type == "cuda" and not info.enabled and not resuming and not asked


def measure_throughput(config: TrainConfig, tokenizer: ByteLevelBPETokenizer, train_stream, depth: int) -> float:
    """Training tokens/s of the depth's model: PROBE_STEPS of the run's own optimizer step (after PROBE_WARMUP),
    in a scratch folder that is removed afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = dataclasses.replace(config, **sizing.shape_from_depth(depth), preset=SIZED_PRESET,
                                    output_dir=scratch, val_data=None,
                                    max_steps=PROBE_WARMUP + PROBE_STEPS, max_minutes=None, epochs=None)
        trainer = GPTTrainer(probe, tokenizer, show_progress=False, streams=(train_stream, None))
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda *_: None)
        tokens, start = 0, time.perf_counter()
        for step in range(PROBE_WARMUP + PROBE_STEPS):
            if step == PROBE_WARMUP:  # compile, allocator and kernel choice are behind us
                sync(trainer.device)
                tokens, start = 0, time.perf_counter()
            tokens += trainer.strategy(trainer)[2]
        sync(trainer.device)
        seconds = time.perf_counter() - start
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return tokens / seconds


def plan_lines(config: TrainConfig, model_config: GPTConfig, corpus: Corpus, plan: sizing.Plan | None) -> str:
    """The lines printed before training: the plan's (``sizing.format_plan``) when it sets the budget, else the
    same figures for the run as configured (a time budget's tokens and steps follow the speed)."""
    if plan is not None and config.max_steps == plan.steps and not config.epochs:  # the clock may stay, as a guard
        return sizing.format_plan(plan)
    parameters, _ = sizing.config_counts(model_config)
    m, count = model_config, sizing.count
    step = (f"{corpus.tokens_per_step:,} tokens ({corpus.tokens_per_step // m.max_seq_len:,} sequences x "
            f"{m.max_seq_len:,})")
    lines = [f"model: {m.n_layers} layers x {m.d_model} ({m.n_heads} heads of {m.d_model // m.n_heads}, d_ff "
             f"{m.d_ff}), {count(parameters)} parameters ({parameters:,}; vocab {m.vocab_size:,}, context "
             f"{m.max_seq_len:,})"]
    steps = training.step_limit(config, corpus.tokens / corpus.tokens_per_step)
    if steps:
        tokens = steps * corpus.tokens_per_step
        lines += [f"tokens: {count(tokens)}, {tokens / parameters:.1f} per parameter (compute-optimal: "
                  f"{config.tokens_per_param:g})", f"steps: {steps:,} of {step}",
                  f"epochs over the corpus: {tokens / corpus.tokens:.2f} of {count(corpus.tokens)} tokens"]
    else:
        lines += [f"tokens: as many as {config.max_minutes:g} minutes allow (compute-optimal: "
                  f"{count(config.tokens_per_param * parameters)})", f"steps: as many as fit, of {step}",
                  f"epochs over the corpus: as many as fit, {corpus.tokens / corpus.tokens_per_step:,.0f} steps "
                  f"each ({count(corpus.tokens)} tokens)"]
    lines.append(f"learning rate: {config.lr:.3g}")
    clock = f"at most {config.max_minutes:g} minutes (the time budget, from the start)" if config.max_minutes else ""
    lines.append(f"expected time: {clock or 'not estimated (no throughput measured)'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

LOOP = [f.name for f in cli.settings_of(training.TrainConfig)]  # in their own group of --help
DEFAULT_NOTES = {  # the defaults that depend on other settings (config_from_args)
    "lr": "default: " + ", ".join(f"{v:g} with --optimizer {k}" for k, v in DEFAULT_LR.items()),
    "max_minutes": f"default: {DEFAULT_MINUTES:g} when neither --max_steps nor --epochs nor --depth is given, and "
                   "on a GPU the depth that fits it"}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python pretrain_trainer.py",
                           description="Pretrain a GPT on text files. With no arguments: train a BPE tokenizer if "
                                       "models/bpe_tokenizer is missing, then a small model for ~5 minutes on "
                                       "data/pretrain. Ctrl-C or SIGTERM saves a resumable checkpoint (continue with "
                                       "--resume auto).")
    run = [f.name for f in cli.settings_of(training.RunOptions)]
    cli.add_settings(p, TrainConfig, [f.name for f in cli.settings_of(TrainConfig) if f.name not in LOOP])
    cli.add_settings(p, PretrainOptions, [f.name for f in cli.settings_of(PretrainOptions) if f.name not in run])
    loop = p.add_argument_group("the training loop")
    cli.add_settings(loop, TrainConfig, LOOP, notes=DEFAULT_NOTES)
    cli.add_settings(loop, training.RunOptions)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the settings the user typed, the config's defaults, then the defaults that depend on other
    settings (the optimizer's lr, the time budget when no other stopping rule is given, the tiny preset's depth)."""
    typed = cli.typed_settings(args, TrainConfig)
    clash = [name for name in DEPTH_EXCLUDES if name in typed]
    if "depth" in typed and clash:
        raise cli.UsageError(f"--depth sets the model's shape, --{clash[0]} too: pass one of them")
    config = TrainConfig(**typed)
    derived: dict[str, Any] = {}
    if "lr" not in typed:
        derived["lr"] = DEFAULT_LR[config.optimizer]
    if not set(BUDGET_FIELDS) & typed.keys() and config.depth is None:
        derived["max_minutes"] = DEFAULT_MINUTES
    if config.preset in TINY_PRESETS and config.n_layers is None and config.depth is None:
        derived["n_layers"] = DEFAULT_TINY_LAYERS
    return dataclasses.replace(config, **derived)


def load_or_train_tokenizer(options: PretrainOptions, config: TrainConfig, info: DistInfo) -> ByteLevelBPETokenizer:
    """The tokenizer in --tokenizer_dir; trained on the training data first (rank 0) when the folder is missing."""
    directory = Path(options.tokenizer_dir)
    if not (directory / "vocab.json").exists() and info.is_main:
        start = time.time()
        print(f"training a {options.vocab_size}-token BPE tokenizer on {config.train_data} ...")
        tokenizer = ByteLevelBPETokenizer(vocab_size=options.vocab_size)
        tokenizer.train(read_documents(config.train_data, config.text_field), show_progress=True)
        tokenizer.save(directory)
        print(f"tokenizer saved to {directory} ({time.time() - start:.1f}s)")
    barrier(info)
    if not (directory / "vocab.json").exists():
        raise TrainError(f"no tokenizer in {directory}: pass an existing --tokenizer_dir")
    return ByteLevelBPETokenizer.from_pretrained(directory)


def print_samples(model: GPTModel, tokenizer: ByteLevelBPETokenizer, device: torch.device, max_new: int,
                  seed: int) -> None:
    generator = torch.Generator(device=device).manual_seed(seed)
    for prompt in SAMPLE_PROMPTS:
        ids = encode_prompt(tokenizer, prompt, max(1, model.config.max_seq_len - 1))  # leaves room for a token
        input_ids = torch.tensor([ids], device=device)
        room = min(max_new, model.config.max_seq_len - input_ids.shape[1])  # stay inside the context window
        params = SamplingParams(max_new_tokens=room, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id)
        out = generate(model, input_ids, params, generator=generator)
        print(f"--- {tokenizer.decode(out[0].tolist())}")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, Ctrl-C/SIGTERM save and exit 130/143."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    options, config = PretrainOptions(**cli.typed_settings(args, PretrainOptions)), config_from_args(args)
    typed = set(cli.typed_settings(args, TrainConfig))
    if options.print_plan and options.resume:
        raise cli.UsageError("--print_plan describes a fresh run: drop --resume")
    try:
        set_threads(options.num_threads)
        if not options.print_plan:
            cli.check_output_folder(config.output_dir, "--output_dir")
        info, device = init_distributed(config.device)
        tokenizer = load_or_train_tokenizer(options, config, info)
        found = find_resume_checkpoint(options.resume, config.output_dir, "pretrain", tokenizer)  # before tokenizing
        streams = token_streams(config, tokenizer, info)
        corpus = Corpus(len(streams[0]), len(tokenizer),
                        config.batch_size * config.max_seq_len * config.grad_accum * info.world_size)
        measured = None
        if auto_sizing_applies(typed, device, info, found[0] is not None):  # a few steps of one depth, timed
            depth = probe_depth(config, corpus)
            measured = (depth, measure_throughput(config, tokenizer, streams[0], depth))
        minutes_left = (config.max_minutes or 0) - (time.time() - PROCESS_START) / 60
        config, plan = size_run(config, typed, corpus, measured, minutes_left)
        if options.print_plan:
            print(plan_lines(config, model_config_of(config, tokenizer), corpus, plan))
            return 0
        requested = {k: v for k, v in cli.typed_settings(args, TrainConfig).items() if k in (*SHAPE_FIELDS, "depth")}
        trainer = GPTTrainer(config, tokenizer, resume=options.resume, start_time=PROCESS_START,
                             requested_shape=requested, streams=streams, found=found)
        if info.is_main:
            print(plan_lines(config, trainer.model.config, corpus, plan))
            print(f"data: {len(trainer.train_stream):,} train tokens; device {trainer.device}, {trainer.dtype}, "
                  f"{info.world_size} process(es)")
        result = trainer.train()
        if info.is_main:
            report(trainer, result, options.samples)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def report(trainer: GPTTrainer, result: dict[str, float], samples: int) -> None:
    rows = trainer.metrics()
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    summary = {"steps": trainer.step, "wall_seconds": round(time.time() - PROCESS_START, 1),
               "tokens_per_sec": round(float(np.median(speeds)), 1) if speeds else None,
               **{k: round(v, 4) for k, v in result.items() if k != "step"}}
    if trainer.val_stream is not None:
        unigram = data_loader.unigram_bits_per_byte(trainer.train_stream.tokens, trainer.val_stream,
                                                    len(trainer.tokenizer))
        summary["unigram_val_bpb"] = round(unigram, 4)
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    if mfus:
        summary["mfu"] = round(float(np.median(mfus)), 4)
    print(json.dumps(summary))
    best = trainer.output_dir / "pretrain_best.pth"
    if best.is_file():
        print(f"checkpoints in {trainer.output_dir} (best: {best.name})")
    else:  # no validation data: nothing chose a best model, so name the file the next stage can start from
        print(f"checkpoints in {trainer.output_dir} (no validation data, so no {best.name}: the last is "
              f"{trainer.last_saved}; finetune from it with --pretrained_model {trainer.last_saved})")
    if samples > 0:
        model = load_model_and_tokenizer(best, device=trainer.device)[0] if best.exists() else trainer.model.eval()
        print_samples(model, trainer.tokenizer, trainer.device, samples, trainer.config.seed)


if __name__ == "__main__":
    sys.exit(main())
