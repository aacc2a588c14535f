"""Pretraining: ``GPTTrainer`` (AdamW, warmup + cosine, mixed precision, DDP, exact resume) and its CLI.

    python pretrain_trainer.py                      # tokenizer (if missing) + ~5 minute CPU run on data/pretrain
    torchrun --standalone --nproc_per_node=2 pretrain_trainer.py --max_steps 1000
"""
from __future__ import annotations

import os

# Sleeping rather than spinning OpenMP threads: on a shared CPU box spinning threads run 3-5x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import data_loader
import evaluator
import gpt_model
from byte_level_bpe import ByteLevelBPETokenizer
from decoding import encode_prompt
from gpt_model import GPTConfig, GPTModel

PROCESS_START = time.time()
DEFAULT_TOKENIZER_DIR = "models/bpe_tokenizer"
DEFAULT_MINUTES = 4.75  # leaves ~15 s of a 5-minute run for the final evaluation and the samples
DEFAULT_TINY_LAYERS = 2  # in 2-5 minutes on 2 cores, 2 blocks of 128 beat 1, 3 or 4 (val bpb, measured)
SAMPLE_PROMPTS = ("LEAR:", "ROMEO:", "《静夜思》 李白：")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


class TrainError(ValueError):
    """A training setup that cannot run; the message says how to fix it."""


@dataclass
class TrainConfig:
    """Everything a run needs besides the tokenizer; stored in checkpoints as ``train_args``."""

    train_data: str = "data/pretrain/train.txt"
    val_data: str | None = "data/pretrain/val.txt"
    output_dir: str = "models/pretrain"
    preset: str = "tiny"
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    dropout: float = 0.0
    max_seq_len: int = 64
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float | None = None
    max_minutes: float | None = None
    eval_interval: int = 500
    eval_batches: int | None = None
    log_interval: int = 10
    save_interval: int | None = None
    keep_last: int = 2
    dtype: str = "auto"
    compile: bool = False
    device: str | None = None
    seed: int = 1337
    num_workers: int | None = None


# ----------------------------------------------------------------------------- state helpers

def rng_state() -> dict[str, Any]:
    """All RNG states as weights_only-loadable types (tensors, lists, ints, floats)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_at(progress: float, step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``lr * min_lr_ratio`` as progress goes 0 → 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - min_lr)


def step_checkpoints(output_dir: Path) -> list[Path]:
    """``pretrain_step_{N}.pth`` files in ``output_dir``, oldest step first."""
    found = [(int(p.stem.rsplit("_", 1)[1]), p) for p in output_dir.glob("pretrain_step_*.pth") if p.stem.rsplit("_", 1)[1].isdigit()]
    return [p for _, p in sorted(found)]


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of known GPUs (for MFU), None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    resolved = gpt_model.resolve_device(device)
    if not info.enabled:
        return info, resolved
    if resolved.type == "cuda":
        resolved = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return info, resolved


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------- trainer

class GPTTrainer:
    """Trains a GPTModel on a packed token stream; rank 0 evaluates, logs and saves."""

    def __init__(self, config: TrainConfig, tokenizer: ByteLevelBPETokenizer, resume: str | None = None,
                 start_time: float | None = None, show_progress: bool = True):
        self.config, self.tokenizer, self.show_progress = config, tokenizer, show_progress
        self.start_time = start_time or time.time()
        self.dist, self.device = init_distributed(config.device)
        self.dtype = gpt_model.resolve_dtype(config.dtype, self.device)
        self.output_dir = Path(config.output_dir)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+

        checkpoint = self._load_resume_checkpoint(resume)
        self.train_stream, self.val_stream = self._token_streams()
        self.byte_lengths = data_loader.token_byte_lengths(tokenizer)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model_config = GPTConfig.from_dict(checkpoint["config"]) if checkpoint else self._model_config()
        self.model = GPTModel(model_config).to(self.device)
        self.optimizer = self.model.configure_optimizer(config.weight_decay, config.lr, (config.beta1, config.beta2), self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.batches = data_loader.RandomWindowBatches(self.train_stream.tokens, model_config.max_seq_len, config.batch_size,
                                                       seed=config.seed, rank=self.dist.rank)
        torch.manual_seed(config.seed + self.dist.rank)  # per-rank dropout streams
        self.step, self.train_seconds, self.best_val_loss = 0, 0.0, math.inf
        if checkpoint:
            self._restore(checkpoint)
        self.train_model = torch.compile(self.model) if config.compile else self.model
        if self.dist.enabled:
            self.train_model = DistributedDataParallel(self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.max_steps = self._max_steps()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(self.output_dir / "tokenizer")
            if not checkpoint:
                self._clear_previous_run()
            self._trim_metrics()

    # -- setup
    def _model_config(self) -> GPTConfig:
        c = self.config
        overrides = {k: v for k, v in {"n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads, "d_ff": c.d_ff}.items() if v}
        if c.d_model and not c.d_ff:
            overrides["d_ff"] = 4 * c.d_model
        return GPTConfig.from_preset(c.preset, vocab_size=len(self.tokenizer), max_seq_len=c.max_seq_len, dropout=c.dropout,
                                     pad_token_id=self.tokenizer.pad_token_id, **overrides)

    def _token_streams(self) -> tuple[data_loader.TokenStream, data_loader.TokenStream | None]:
        """Tokenize (rank 0 first, so the cache is written once) and memmap the train/val streams."""
        streams = None
        for turn in ("main", "others"):
            if (turn == "main") == self.dist.is_main:
                build = lambda src: data_loader.build_token_stream(src, self.tokenizer, self.config.num_workers, show_progress=self.show_progress and self.dist.is_main)
                streams = (build(self.config.train_data), build(self.config.val_data) if self.config.val_data else None)
            barrier(self.dist)
        return streams

    def _load_resume_checkpoint(self, resume: str | None) -> dict | None:
        if not resume:
            return None
        if resume == "auto":
            found = step_checkpoints(self.output_dir)
            if not found:
                return None
            resume = str(found[-1])
        checkpoint = gpt_model.load_checkpoint(resume)
        if checkpoint.get("tokenizer_fingerprint") != self.tokenizer.fingerprint:
            raise TrainError(f"{resume} was trained with a different tokenizer: pass the --tokenizer_dir it was trained with ({Path(resume).parent / 'tokenizer'})")
        if "step" not in checkpoint or "optimizer" not in checkpoint:
            raise TrainError(f"{resume} holds weights but no training state: resume from a pretrain_step_N.pth checkpoint")
        self.resumed_from = resume
        return checkpoint

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model_state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.train_seconds = checkpoint["scheduler"]["train_seconds"]
        self.best_val_loss = checkpoint["best_val_loss"]
        rank_states = checkpoint["rank_states"]
        if len(rank_states) != self.dist.world_size:
            raise TrainError(f"the checkpoint was written by {len(rank_states)} processes, this run has {self.dist.world_size}: resume with the same --nproc_per_node")
        own = rank_states[self.dist.rank]
        self.batches.load_state_dict(own["data"])
        set_rng_state(own["rng"])

    def _max_steps(self) -> int | None:
        c = self.config
        if not (c.max_steps or c.epochs or c.max_minutes):
            raise TrainError("no stopping rule: set --max_steps, --epochs or --max_minutes")
        limits = [c.max_steps] if c.max_steps else []
        if c.epochs:
            limits.append(math.ceil(c.epochs * len(self.train_stream) / self.tokens_per_step))
        return min(limits) if limits else None

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.model.config.max_seq_len * self.config.grad_accum * self.dist.world_size

    # -- training
    def _progress(self) -> float:
        """Fraction of the run done: by steps, by the time budget, whichever is further."""
        done = [self.step / self.max_steps] if self.max_steps else []
        if self.config.max_minutes:
            done.append(self.train_seconds / self.time_budget)
        return max(done)

    def _train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (a tensor: no sync per step)."""
        lr = lr_at(self._progress(), self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss = torch.zeros((), device=self.device)
        for micro in range(self.config.grad_accum):
            batch = next(self.batches)
            input_ids = batch["input_ids"].to(self.device, non_blocking=True)
            sync = not self.dist.enabled or micro == self.config.grad_accum - 1
            with (nullcontext() if sync else self.train_model.no_sync()), gpt_model.autocast_context(self.device, self.dtype):
                loss = self.train_model(input_ids, labels=input_ids)["loss"] / self.config.grad_accum
            self.scaler.scale(loss).backward()
            total_loss += loss.detach()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = lr
        return total_loss

    def train(self, stop_after: int | None = None) -> dict[str, float]:
        """Train until the step/epoch/time limit (or ``stop_after`` steps, as if killed there); returns the last eval."""
        c = self.config
        # the time budget covers everything after process start (tokenizer training, tokenization, evals, saves)
        self.time_budget = (c.max_minutes or 0) * 60 - (time.time() - self.start_time)
        if c.max_minutes and self.time_budget <= self.train_seconds:
            raise TrainError(f"--max_minutes {c.max_minutes} is used up before training starts: raise it")
        save_interval = c.save_interval or c.eval_interval
        bar = tqdm(total=self.max_steps, initial=self.step, desc="pretrain", disable=not (self.show_progress and self.dist.is_main))
        last_eval: dict[str, float] = {}
        prior_seconds, loop_start = self.train_seconds, time.time()
        window_start, window_tokens = time.time(), 0
        self.train_model.train()
        finished = self._synced_progress() >= 1.0
        while not finished and (stop_after is None or self.step < stop_after):
            loss = self._train_step()
            self.step += 1
            window_tokens += self.tokens_per_step
            self.train_seconds = prior_seconds + time.time() - loop_start
            finished = self._synced_progress() >= 1.0
            if self.step % c.log_interval == 0 or finished:
                loss_value = self._mean_across_ranks(loss)
                tokens_per_sec = window_tokens / (time.time() - window_start)
                row = {"step": self.step, "train_loss": loss_value, "lr": self.lr, "tokens_per_sec": tokens_per_sec}
                mfu = self._mfu(tokens_per_sec)
                if mfu is not None:
                    row["mfu"] = mfu
                if self.dist.is_main:
                    self._log(row)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{self.lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                window_start, window_tokens = time.time(), 0
            bar.update(1)
            evaluating = self.val_stream is not None and (self.step % c.eval_interval == 0 or finished)
            if evaluating:
                last_eval = self.evaluate()
            if self.step % save_interval == 0 or finished or self.step == stop_after:
                self.save(self.output_dir / f"pretrain_step_{self.step}.pth")
            if evaluating or self.step % save_interval == 0:  # keep evaluation and saving out of tokens/s
                window_start, window_tokens = time.time(), 0
            self.train_seconds = prior_seconds + time.time() - loop_start
        bar.close()
        return last_eval

    def _synced_progress(self) -> float:
        """Progress agreed by all ranks (time-bounded runs would otherwise stop at different steps)."""
        progress = self._progress()
        if self.dist.enabled and self.config.max_minutes:
            value = torch.tensor(progress, dtype=torch.float64, device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            progress = float(value)
        return progress

    def _mean_across_ranks(self, value: torch.Tensor) -> float:
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.dist.world_size
        return float(value)

    def _mfu(self, tokens_per_sec: float) -> float | None:
        peak = peak_flops(self.device)
        return self.model.estimate_mfu(tokens_per_sec, peak) if peak else None

    # -- evaluation
    def evaluate(self) -> dict[str, float]:
        """Exact val loss / perplexity / bits per byte on rank 0 (sequential pass, every token predicted once)."""
        result: dict[str, float] = {}
        if self.dist.is_main:
            result = evaluate_stream(self.model, self.val_stream, self.byte_lengths, self.config.batch_size,
                                     self.device, self.dtype, self.config.eval_batches)
            result = {"step": self.step, **result}
            self._log(result)
            if result["val_loss"] < self.best_val_loss:
                self.best_val_loss = result["val_loss"]
                self.save(self.output_dir / "pretrain_best.pth", training_state=False)
            self._plot()
        barrier(self.dist)
        return result

    # -- checkpoints and logs
    def _gather(self, obj: Any) -> list[Any]:
        if not self.dist.enabled:
            return [obj]
        out = [None] * self.dist.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self, path: Path, training_state: bool = True) -> None:
        """Atomic checkpoint (weights + config + tokenizer fingerprint; plus everything needed to resume exactly)."""
        extra: dict[str, Any] = {"tokenizer_fingerprint": self.tokenizer.fingerprint, "step": self.step,
                                 "best_val_loss": self.best_val_loss, "train_args": asdict(self.config)}
        if training_state:
            rank_states = self._gather({"data": self.batches.state_dict(), "rng": rng_state()})
            extra.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         scheduler={"train_seconds": self.train_seconds, "max_steps": self.max_steps}, rank_states=rank_states)
        if self.dist.is_main:
            gpt_model.save_checkpoint(path, self.model, **extra)
            if training_state and self.config.keep_last > 0:
                for old in step_checkpoints(self.output_dir)[:-self.config.keep_last]:
                    old.unlink(missing_ok=True)
        if training_state:  # a collective save (all ranks are here); the best-model save is rank 0's alone
            barrier(self.dist)

    def _log(self, row: dict[str, Any]) -> None:
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _clear_previous_run(self) -> None:
        """A fresh run owns its output_dir: old checkpoints would confuse --keep_last and --resume auto."""
        old = [*step_checkpoints(self.output_dir), *self.output_dir.glob("pretrain_best.pth")]
        if old:
            print(f"fresh run: removing {len(old)} checkpoint(s) of a previous run in {self.output_dir} (pass --resume auto to continue it instead)")
            for path in old:
                path.unlink()

    def _trim_metrics(self) -> None:
        """On resume, drop rows logged after the checkpoint so the log reads like one uninterrupted run."""
        path = self.output_dir / "metrics.jsonl"
        if path.exists():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.metrics()
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label, style in ((train, "train", "-"), (val, "val", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.output_dir / "loss_curve.png", dpi=100)
        plt.close(fig)


def evaluate_stream(model: GPTModel, stream: data_loader.TokenStream, byte_lengths: np.ndarray, batch_size: int,
                    device: torch.device, dtype: torch.dtype, max_batches: int | None = None) -> dict[str, float]:
    """val_loss (nats/token), val_ppl and val_bpb of ``model`` over a token stream's sequential windows."""
    covered = {"bytes": 0}

    def batches():
        for batch in data_loader.sequential_batches(stream.tokens, model.config.max_seq_len, batch_size, byte_lengths, max_batches):
            covered["bytes"] += batch["n_bytes"]
            yield batch

    with gpt_model.autocast_context(device, dtype):
        total_nll, n_tokens = evaluator.sum_nll(model, batches(), device)
    return {"val_loss": total_nll / n_tokens, "val_ppl": evaluator.perplexity(total_nll, n_tokens),
            "val_bpb": evaluator.bits_per_byte(total_nll, covered["bytes"])}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Pretrain a GPT on text files. With no arguments: train a BPE tokenizer if "
                                "models/bpe_tokenizer is missing, then a small model for ~5 minutes on data/pretrain.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_data_dir", default=d.train_data, help="training text: a .txt (one document per line), .jsonl ({\"text\": ...}) file, or a directory of them")
    p.add_argument("--val_data_dir", default=d.val_data, help="validation text (same formats); 'none' to skip evaluation")
    p.add_argument("--tokenizer_dir", default=DEFAULT_TOKENIZER_DIR, help="tokenizer folder (vocab.json, merges.txt); trained on the training data when missing")
    p.add_argument("--vocab_size", type=int, default=8192, help="vocabulary size of the tokenizer trained when --tokenizer_dir is missing")
    p.add_argument("--output_dir", default=d.output_dir, help="where checkpoints, metrics.jsonl, loss_curve.png and tokenizer/ go")
    p.add_argument("--preset", default="tiny", help="GPTConfig preset the model starts from (tiny, gpt2, gpt2-medium, ...)")
    p.add_argument("--n_layers", type=int, default=None, help=f"override the preset's number of transformer blocks (default: {DEFAULT_TINY_LAYERS} "
                   "with the tiny preset, best in the 5-minute CPU run; the preset's own otherwise)")
    p.add_argument("--d_model", type=int, default=None, help="override the preset's hidden size (d_ff follows as 4x unless --d_ff)")
    p.add_argument("--n_heads", type=int, default=None, help="override the preset's number of attention heads")
    p.add_argument("--d_ff", type=int, default=None, help="override the feed-forward hidden size")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability during training")
    p.add_argument("--max_seq_len", type=int, default=d.max_seq_len, help="context length: tokens per training window")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="windows per micro-batch per process")
    p.add_argument("--grad_accum", type=int, default=d.grad_accum, help="micro-batches accumulated per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (after warmup)")
    p.add_argument("--min_lr_ratio", type=float, default=d.min_lr_ratio, help="the cosine decays the lr to lr * min_lr_ratio")
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay (2-D weights only)")
    p.add_argument("--grad_clip", type=float, default=d.grad_clip, help="clip the global gradient norm to this (0 = off)")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=float, default=None, help="stop after this many passes' worth of training tokens")
    p.add_argument("--max_minutes", type=float, default=None, help="wall-clock budget from process start (tokenizer training and "
                   "tokenization included); the cosine schedule follows it. Default: 4.75 (about 5 minutes with the final evaluation) when no step/epoch limit is given")
    p.add_argument("--eval_interval", type=int, default=d.eval_interval, help="evaluate on the validation data every N steps (and at the end)")
    p.add_argument("--eval_batches", type=int, default=None, help="batches per periodic evaluation (default: the whole validation set)")
    p.add_argument("--log_interval", type=int, default=d.log_interval, help="log train loss / lr / tokens per second every N steps")
    p.add_argument("--save_interval", type=int, default=None, help="write pretrain_step_N.pth every N steps (default: --eval_interval)")
    p.add_argument("--keep_last", type=int, default=d.keep_last, help="keep only the last K pretrain_step_N.pth checkpoints (0 = keep all)")
    p.add_argument("--dtype", default=d.dtype, help="auto (bf16 on capable GPUs, fp16 on other GPUs, fp32 on CPU), float32, bfloat16 or float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data order and dropout")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for the latest pretrain_step_N.pth in --output_dir")
    p.add_argument("--num_workers", type=int, default=None, help="processes for tokenizing the data (default: all cores)")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--samples", type=int, default=100, help="new tokens per sample generation printed at the end (0 = none)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(train_data=args.train_data_dir, val_data=None if str(args.val_data_dir).lower() == "none" else args.val_data_dir)
    if not (args.max_steps or args.epochs or args.max_minutes):
        values["max_minutes"] = DEFAULT_MINUTES
    if args.preset == "tiny" and args.n_layers is None:
        values["n_layers"] = DEFAULT_TINY_LAYERS
    return TrainConfig(**values)


def load_or_train_tokenizer(args: argparse.Namespace, info: DistInfo) -> ByteLevelBPETokenizer:
    """The tokenizer in --tokenizer_dir; trained on the training data first (rank 0) when the folder is missing."""
    directory = Path(args.tokenizer_dir)
    if not (directory / "vocab.json").exists() and info.is_main:
        start = time.time()
        print(f"training a {args.vocab_size}-token BPE tokenizer on {args.train_data_dir} ...")
        tokenizer = ByteLevelBPETokenizer(vocab_size=args.vocab_size)
        tokenizer.train(data_loader.read_documents(args.train_data_dir), show_progress=True)
        tokenizer.save(directory)
        print(f"tokenizer saved to {directory} ({time.time() - start:.1f}s)")
    barrier(info)
    if not (directory / "vocab.json").exists():
        raise TrainError(f"no tokenizer in {directory}: pass an existing --tokenizer_dir")
    return ByteLevelBPETokenizer.from_pretrained(directory)


def print_samples(model: GPTModel, tokenizer: ByteLevelBPETokenizer, device: torch.device, max_new: int, seed: int) -> None:
    generator = torch.Generator(device=device).manual_seed(seed)
    for prompt in SAMPLE_PROMPTS:
        ids = encode_prompt(tokenizer, prompt, max(1, model.config.max_seq_len - 1))  # leaves room for a token
        input_ids = torch.tensor([ids], device=device)
        room = min(max_new, model.config.max_seq_len - input_ids.shape[1])  # stay inside the context window
        out = model.generate(input_ids, max_gen_len=room, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id, generator=generator)
        print(f"--- {tokenizer.decode(out[0].tolist())}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        config = config_from_args(args)
        info, _ = init_distributed(config.device)
        tokenizer = load_or_train_tokenizer(args, info)
        trainer = GPTTrainer(config, tokenizer, resume=args.resume, start_time=PROCESS_START)
        if info.is_main:
            print(f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {trainer.model.config.n_layers} layers x "
                  f"{trainer.model.config.d_model}, context {trainer.model.config.max_seq_len}, vocab {len(tokenizer)}; "
                  f"{len(trainer.train_stream):,} train tokens; device {trainer.device}, {trainer.dtype}, {info.world_size} process(es)")
        result = trainer.train()
        if info.is_main:
            report(trainer, result, args)
    except ValueError as err:  # DataError, TrainError, TokenizerError, CheckpointError and GPTConfig's checks
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def report(trainer: GPTTrainer, result: dict[str, float], args: argparse.Namespace) -> None:
    rows = trainer.metrics()
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    summary = {"steps": trainer.step, "wall_seconds": round(time.time() - PROCESS_START, 1),
               "tokens_per_sec": round(float(np.median(speeds)), 1) if speeds else None, **{k: round(v, 4) for k, v in result.items() if k != "step"}}
    if trainer.val_stream is not None:
        summary["unigram_val_bpb"] = round(data_loader.unigram_bits_per_byte(trainer.train_stream.tokens, trainer.val_stream, len(trainer.tokenizer)), 4)
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    if mfus:
        summary["mfu"] = round(float(np.median(mfus)), 4)
    print(json.dumps(summary))
    print(f"checkpoints in {trainer.output_dir} (best: pretrain_best.pth)")
    if args.samples > 0:
        best = trainer.output_dir / "pretrain_best.pth"
        model = GPTModel.from_pretrained(best, map_location=trainer.device).to(trainer.device) if best.exists() else trainer.model
        print_samples(model.eval(), trainer.tokenizer, trainer.device, args.samples, trainer.config.seed)


if __name__ == "__main__":
    sys.exit(main())
