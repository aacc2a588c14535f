"""Pretraining: ``GPTTrainer`` (the shared ``training.Trainer`` on random windows of a packed token stream) and its CLI.

    python pretrain_trainer.py                      # tokenizer (if missing) + ~5 minute CPU run on data/pretrain
    torchrun --standalone --nproc_per_node=2 pretrain_trainer.py --max_steps 1000
"""
from __future__ import annotations

import os

# Sleeping rather than spinning OpenMP threads: on a shared CPU box spinning threads run 3-5x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import cli
import data_loader
import scoring
import token_cache
import training
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import load_model_and_tokenizer
from decoding import SamplingParams, generate
from devices import set_threads
from gpt_model import PRESETS, GPTConfig, GPTModel
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
SAMPLE_PROMPTS = ("LEAR:", "ROMEO:", "《静夜思》 李白：")
SHAPE_FIELDS = ("preset", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len")


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
    preset: str = cli.setting("tiny", "GPTConfig preset the model starts from", choices=sorted(PRESETS))
    n_layers: int | None = cli.setting(None, "override the preset's number of transformer blocks (default: "
                                       f"{DEFAULT_TINY_LAYERS} with the tiny preset, best in the 5-minute CPU run; the "
                                       "preset's own otherwise)", cli.positive_int)
    d_model: int | None = cli.setting(None, "override the preset's hidden size (d_ff follows as 4x unless --d_ff)",
                                      cli.positive_int)
    n_heads: int | None = cli.setting(None, "override the preset's number of attention heads", cli.positive_int)
    d_ff: int | None = cli.setting(None, "override the feed-forward hidden size", cli.positive_int)
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


class GPTTrainer(Trainer):
    """Trains a GPTModel on random windows of a packed token stream; rank 0 evaluates, logs and saves.

    ``requested_shape`` (flag -> value) is what the user asked for; resuming a checkpoint of another shape is an
    error rather than a silent override. By default: the config's explicit (non-None) shape fields.
    """

    def __init__(self, config: TrainConfig, tokenizer: ByteLevelBPETokenizer, resume: str | None = None,
                 start_time: float | None = None, show_progress: bool = True,
                 requested_shape: dict[str, Any] | None = None):
        self.dist, device = init_distributed(config.device)
        self.config, self.tokenizer, self.show_progress = config, tokenizer, show_progress
        checkpoint, resumed_from = find_resume_checkpoint(resume, config.output_dir, "pretrain", tokenizer)
        self.resumed_from = resumed_from
        self.train_stream, self.val_stream = self._token_streams()
        self.byte_lengths = data_loader.token_byte_lengths(tokenizer)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        if checkpoint:
            model_config = GPTConfig.from_dict(checkpoint["config"])
            self._check_shape(model_config, requested_shape, resumed_from)
        else:
            model_config = self._model_config()
        batches = data_loader.RandomWindowBatches(self.train_stream.tokens, model_config.max_seq_len,
                                                  config.batch_size, seed=config.seed, rank=self.dist.rank)
        tokens_per_step = config.batch_size * model_config.max_seq_len * config.grad_accum * self.dist.world_size
        evaluate = self._evaluate if self.val_stream is not None else None
        super().__init__(config, GPTModel(model_config), tokenizer, batches, causal_lm_loss, prefix="pretrain",
                         evaluate_fn=evaluate, steps_per_epoch=len(self.train_stream) / tokens_per_step,
                         checkpoint=checkpoint, resumed_from=resumed_from, start_time=start_time,
                         show_progress=show_progress)

    # -- setup
    def _model_config(self) -> GPTConfig:
        c = self.config
        overrides = {k: v for k, v in {"n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
                                       "d_ff": c.d_ff}.items() if v}
        if c.d_model and not c.d_ff:
            overrides["d_ff"] = 4 * c.d_model
        return GPTConfig.from_preset(c.preset, vocab_size=len(self.tokenizer), max_seq_len=c.max_seq_len,
                                     dropout=c.dropout, pad_token_id=self.tokenizer.pad_token_id, **overrides)

    def _check_shape(self, model_config: GPTConfig, requested: dict[str, Any] | None, source: str) -> None:
        """A resumed run keeps its checkpoint's shape: a flag asking for another one is an error, not ignored."""
        c = self.config
        if requested is None:
            requested = {k: getattr(c, k) for k in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len")
                         if getattr(c, k) is not None}
        for flag, value in requested.items():
            actual = getattr(model_config, flag, None)
            if flag in SHAPE_FIELDS and flag != "preset" and value is not None and value != actual:
                raise TrainError(f"--{flag} {value} differs from the checkpoint's {actual} ({source}): a resumed run "
                                 f"keeps the checkpoint's shape; drop --{flag}, or start a fresh run without --resume")

    def _token_streams(self) -> tuple[token_cache.TokenStream, token_cache.TokenStream | None]:
        """Tokenize (rank 0 first, so the cache is written once) and memmap the train/val streams."""
        streams = None
        c = self.config
        for turn in ("main", "others"):
            if (turn == "main") == self.dist.is_main:
                progress = self.show_progress and self.dist.is_main
                build = lambda src: token_cache.build_token_stream(src, self.tokenizer, c.num_workers,
                                                                   cache_dir=c.cache_dir, show_progress=progress,
                                                                   text_field=c.text_field)
                streams = (build(c.train_data), build(c.val_data) if c.val_data else None)
            barrier(self.dist)
        return streams

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


# ----------------------------------------------------------------------------- CLI

LOOP = [f.name for f in cli.settings_of(training.TrainConfig)]  # in their own group of --help
DEFAULT_NOTES = {  # the defaults that depend on other settings (config_from_args)
    "lr": "default: " + ", ".join(f"{v:g} with --optimizer {k}" for k, v in DEFAULT_LR.items()),
    "max_minutes": f"default: {DEFAULT_MINUTES:g} when neither --max_steps nor --epochs is given"}


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
    config = TrainConfig(**typed)
    derived: dict[str, Any] = {}
    if "lr" not in typed:
        derived["lr"] = DEFAULT_LR[config.optimizer]
    if not {"max_steps", "epochs", "max_minutes"} & typed.keys():
        derived["max_minutes"] = DEFAULT_MINUTES
    if config.preset == "tiny" and config.n_layers is None:
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
    try:
        set_threads(options.num_threads)
        cli.check_output_folder(config.output_dir, "--output_dir")
        info, _ = init_distributed(config.device)
        tokenizer = load_or_train_tokenizer(options, config, info)
        requested = {k: v for k, v in cli.typed_settings(args, TrainConfig).items() if k in SHAPE_FIELDS}
        trainer = GPTTrainer(config, tokenizer, resume=options.resume, start_time=PROCESS_START,
                             requested_shape=requested)
        if info.is_main:
            c = trainer.model.config
            print(f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {c.n_layers} layers x {c.d_model}, "
                  f"context {c.max_seq_len}, vocab {len(tokenizer)}; {len(trainer.train_stream):,} train tokens; "
                  f"device {trainer.device}, {trainer.dtype}, {info.world_size} process(es)")
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
    print(f"checkpoints in {trainer.output_dir} (best: pretrain_best.pth)")
    if samples > 0:
        best = trainer.output_dir / "pretrain_best.pth"
        model = load_model_and_tokenizer(best, device=trainer.device)[0] if best.exists() else trainer.model.eval()
        print_samples(model, trainer.tokenizer, trainer.device, samples, trainer.config.seed)


if __name__ == "__main__":
    sys.exit(main())
