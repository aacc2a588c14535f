"""The one training loop. ``Trainer`` runs every stage: pretraining, SFT, the reward model, DPO and classification
with a ``SupervisedStep`` (a loss on batches), PPO and GRPO with their step strategies (``rl_step.py``: a rollout and
its updates per step).

Its own module because every stage shares it and none should import another stage for it. What it guarantees
for all of them: AdamW or Muon + AdamW (``optimizers.py``) with warmup + cosine (every optimizer of the stage), one
stopping rule (steps, epochs, a time budget), mixed precision, torch.compile, gradient accumulation and clipping,
DDP where the stage allows it, exact resume, atomic checkpoints with rotation, metrics.jsonl + loss_curve.png,
Ctrl-C/SIGTERM saving, a non-finite loss stopping the run, and a run never making an output folder worse than it
found it (``run_folder.RunFolder``).
"""
from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import checkpoints
import cli
from cli import Interrupted
from devices import DTYPE_CHOICES, autocast_context, resolve_device, resolve_dtype
from optimizers import OPTIMIZERS, Optimizer, configure_optimizer, optimizer_kind
from run_folder import RunFolder, step_checkpoints

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
              "3090": 71e12, "V100": 125e12, "T4": 65e12}
LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], "torch.Tensor | dict[str, torch.Tensor]"]


class TrainError(ValueError):
    """A training setup that cannot run; the message says how to fix it."""


@dataclass
class TrainConfig:
    """The loop's settings, each with its flag's help (each stage adds its data and model fields, and changes defaults
    with ``cli.with_defaults``); stored in checkpoints as ``train_args``."""

    output_dir: str = cli.setting("models/pretrain", "where checkpoints, metrics.jsonl, loss_curve.png and tokenizer/ "
                                  "go (an earlier run there is moved to previous/ at this run's first checkpoint, "
                                  "never deleted)")
    batch_size: int = cli.setting(16, "sequences per micro-batch per process", cli.positive_int)
    grad_accum: int = cli.setting(1, "micro-batches accumulated per optimizer step", cli.positive_int)
    lr: float = cli.setting(3e-3, "peak learning rate (after warmup)", cli.positive_float)
    min_lr_ratio: float = cli.setting(0.1, "the cosine decays the lr to lr * min_lr_ratio (1: a constant lr after the "
                                      "warmup)", cli.unit_interval)
    warmup_steps: int = cli.setting(50, "linear warmup steps", cli.nonnegative_int)
    weight_decay: float = cli.setting(0.1, "weight decay (2-D weights only)", cli.nonnegative_float)
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = cli.setting("adamw", "adamw, or muon: Muon for the blocks' weight matrices and AdamW for "
                                 "embeddings, biases, norms and heads (docs/pretraining.md)", choices=OPTIMIZERS)
    grad_clip: float = cli.setting(1.0, "clip the global gradient norm to this (0 = off)", cli.nonnegative_float)
    max_steps: int | None = cli.setting(None, "stop after this many optimizer steps", cli.positive_int)
    epochs: float | None = cli.setting(None, "stop after this many passes over the training data", cli.positive_float)
    max_minutes: float | None = cli.setting(None, "wall-clock budget from process start; the cosine schedule follows "
                                            "it", cli.positive_float)
    eval_interval: int = cli.setting(500, "evaluate on the held-out data every N steps (and at the end)",
                                     cli.positive_int)
    eval_batches: int | None = cli.setting(None, "batches per periodic evaluation (default: the whole held-out set)",
                                           cli.positive_int)
    log_interval: int = cli.setting(10, "log train loss / lr / tokens per second every N steps", cli.positive_int)
    save_interval: int | None = cli.setting(None, "write <stage>_step_N.pth every N steps (default: --eval_interval)",
                                            cli.positive_int)
    keep_last: int = cli.setting(2, "keep only the last K <stage>_step_N.pth checkpoints (0 = keep all)",
                                 cli.nonnegative_int)
    dtype: str = cli.setting("auto", "auto (bf16 on capable GPUs, fp16 on other GPUs, fp32 on CPU) or an explicit "
                             "precision", choices=DTYPE_CHOICES)
    compile: bool = cli.setting(False, "torch.compile the model")
    device: str | None = cli.setting(None, "cpu, cuda, cuda:1, mps or auto (default: auto)")
    seed: int = cli.setting(1337, "seed of weights, data order and dropout", int)


@dataclass
class RunOptions:
    """How a training command starts and runs, besides its config (not stored in checkpoints): every stage's
    --resume and --num_threads."""

    resume: str | None = cli.setting(None, "checkpoint to resume from, or 'auto' for the latest <stage>_step_N.pth in "
                                     "--output_dir (a fresh run when there is none)")
    num_threads: int | None = cli.setting(None, "torch CPU threads (default: torch's choice)", cli.positive_int)


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
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` as progress goes 0 → 1.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - min_lr)


def step_limit(config: TrainConfig, steps_per_epoch: float | None) -> int | None:
    """The run's last step from --max_steps and --epochs (the smaller), None when only the clock stops it."""
    if not (config.max_steps or config.epochs or config.max_minutes):
        raise TrainError("no stopping rule: set --max_steps, --epochs or --max_minutes")
    limits = [config.max_steps] if config.max_steps else []
    if config.epochs:
        if not steps_per_epoch:
            raise TrainError("--epochs needs a data set of known size; use --max_steps instead")
        limits.append(max(1, math.ceil(config.epochs * steps_per_epoch)))
    return min(limits) if limits else None


def run_progress(step: int, max_steps: int | None, train_seconds: float, time_budget: float | None) -> float:
    """Fraction of a run done: by steps, by the time budget (seconds), whichever is further."""
    done = [step / max_steps] if max_steps else []
    if time_budget:
        done.append(train_seconds / time_budget)
    return max(done, default=0.0)


def eval_line(prefix: str, result: Mapping[str, Any]) -> str:
    """An evaluation as one console line: "sft step 500: val_loss 1.234, val_ppl 3.435"."""
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                        for k, v in result.items() if k != "step")
    return f"{prefix} step {result['step']}: {figures}"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of known GPUs (for MFU), None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "DistInfo":
        """What torchrun's RANK / LOCAL_RANK / WORLD_SIZE say (a plain process is rank 0 of 1)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    info = DistInfo.from_env()
    resolved = resolve_device(device)
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


# ----------------------------------------------------------------------------- signals

class StopSignals:
    """While active, the first SIGINT/SIGTERM only records a stop request (the loop saves, then stops);
    a second one stops at once (the checkpoint being written is atomic, so nothing is corrupted)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker inherited the handler: end it as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            raise Interrupted(signum, f"interrupted again by {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def find_resume_checkpoint(resume: str | None, output_dir: str | os.PathLike, prefix: str,
                           tokenizer) -> tuple[dict | None, str | None]:
    """(checkpoint, its path) for ``--resume PATH|auto``; (None, None) for a fresh run."""
    if not resume:
        return None, None
    if resume == "auto":
        found = step_checkpoints(Path(output_dir), prefix)
        if not found:
            print(f"--resume auto: no {prefix}_step_N.pth in {output_dir}, starting a fresh run")
            return None, None
        resume = str(found[-1])
    checkpoint = checkpoints.load_resumable(resume, prefix)
    if checkpoint.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise TrainError(f"{resume} was trained with a different tokenizer: pass the --tokenizer_dir it was trained "
                         f"with ({Path(resume).parent / 'tokenizer'})")
    return checkpoint, resume


# ----------------------------------------------------------------------------- the loop

# ----------------------------------------------------------------------------- what one step does

class StepStrategy:
    """What one optimizer step of a stage does; ``Trainer`` calls it once per step and owns everything else (stopping
    rule, lr schedule, precision, compile, accumulation, DDP, evaluation, checkpoints, signals, the output folder).

    ``__call__(trainer)`` returns (loss tensor, scalars to log, tokens processed) and updates the weights through
    ``trainer.update``. A strategy with models or optimizers of its own creates them in ``setup`` (after the trainer
    has placed the model on its device, before a checkpoint is restored) and saves them in ``state_dict``."""

    distributed = True  # whether it can run under torchrun (DDP)

    def setup(self, trainer: "Trainer") -> None:
        pass

    def __call__(self, trainer: "Trainer") -> tuple[torch.Tensor, dict[str, Any], int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SupervisedStep(StepStrategy):
    """A loss on batches: ``grad_accum`` micro-batches from ``trainer.batches``, then one optimizer step (pretraining,
    SFT, the reward model, DPO, classification)."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn

    def __call__(self, trainer: "Trainer") -> tuple[torch.Tensor, dict[str, Any], int]:
        tokens = 0

        def micro_loss():
            nonlocal tokens
            batch = to_device(next(trainer.batches), trainer.device)
            tokens += batch["input_ids"].numel() if "input_ids" in batch else 0
            return self.loss_fn(trainer.train_model, batch)

        loss, extras = trainer.update([micro_loss] * trainer.config.grad_accum)
        return loss, extras, tokens * trainer.dist.world_size


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """Trains ``model`` with a ``StepStrategy`` (or a loss function: a ``SupervisedStep``); rank 0 evaluates, logs and
    saves ``{prefix}_*.pth``.

    batches: an endless iterator of batches (for RL: of prompts), ideally with ``state_dict()`` / ``load_state_dict()``
      so that a resumed run sees exactly the batches it would have.
    evaluate_fn(model): held-out metrics with a "val_loss" (lower is better: it picks ``{prefix}_best.pth``);
      ``evaluate_first`` also runs it before the first step (RL: the starting policy's figures).
    """

    def __init__(self, config: TrainConfig, model: nn.Module, tokenizer, batches: Iterator,
                 step: StepStrategy | LossFn, *, prefix: str,
                 evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None, evaluate_first: bool = False,
                 steps_per_epoch: float | None = None, checkpoint: dict | None = None, resumed_from: str | None = None,
                 checkpoint_extra: dict[str, Any] | None = None, start_time: float | None = None,
                 show_progress: bool = True):
        self.config, self.tokenizer, self.prefix, self.show_progress = config, tokenizer, prefix, show_progress
        self.batches, self.evaluate_fn, self.evaluate_first = batches, evaluate_fn, evaluate_first
        self.strategy = step if isinstance(step, StepStrategy) else SupervisedStep(step)
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.start_time = start_time or time.time()
        self.dist, self.device = init_distributed(config.device)
        if self.dist.enabled and not self.strategy.distributed:
            raise TrainError(f"{prefix} runs in one process: launch it without torchrun")
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.output_dir = Path(config.output_dir)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+
        self.model = model.to(self.device)
        self.optimizer = configure_optimizer(self.model, config.weight_decay, config.lr,
                                             (config.beta1, config.beta2), self.device.type, config.optimizer)
        self.scaler = self.new_scaler()
        self.scheduled: list[tuple[Optimizer, float]] = []  # other optimizers the schedule scales
        torch.manual_seed(config.seed + self.dist.rank)  # per-rank dropout streams
        self.step, self.train_seconds, self.best_val_loss = 0, 0.0, math.inf
        self.lr, self.last_saved = 0.0, resumed_from
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.strategy.setup(self)
        if checkpoint:
            self._restore(checkpoint, resumed_from or "the checkpoint")
        self.train_model = torch.compile(self.model) if config.compile else self.model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=device_ids)
        self.max_steps = self._max_steps(steps_per_epoch)
        self.run = RunFolder(self.output_dir, prefix, tokenizer, resumed_from, self.step, self.dist.is_main)

    # -- what step strategies use
    def new_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for an optimizer: on for fp16 (whose gradients underflow without it), a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def add_optimizer(self, module: nn.Module, peak_lr: float) -> torch.optim.AdamW:
        """An AdamW for another trained module (PPO's critic), on the run's schedule scaled to ``peak_lr``."""
        c = self.config
        optimizer = configure_optimizer(module, c.weight_decay, peak_lr, (c.beta1, c.beta2), self.device.type)
        self.scheduled.append((optimizer, peak_lr))
        return optimizer

    def autocast(self):
        """The run's precision (bf16/fp16 autocast, or nothing for fp32), for passes outside ``update`` (rollouts)."""
        return autocast_context(self.device, self.dtype)

    def update(self, micro_losses: list[Callable[[], Any]], optimizer: Optimizer | None = None,
               scaler: torch.amp.GradScaler | None = None,
               module: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over micro-batches: each callable returns a loss (or a dict with "loss" and scalars),
        computed under the run's precision; their mean is backpropagated (DDP synchronises on the last), the gradients
        clipped and the optimizer stepped. Returns (mean loss, the last micro-batch's scalars); no host sync."""
        optimizer, scaler = optimizer or self.optimizer, scaler or self.scaler
        total, extras = torch.zeros((), device=self.device), {}
        for i, compute in enumerate(micro_losses):
            sync = not self.dist.enabled or i == len(micro_losses) - 1
            with (nullcontext() if sync else self.train_model.no_sync()), self.autocast():
                out = compute()
            loss = (out["loss"] if isinstance(out, dict) else out) / len(micro_losses)
            if isinstance(out, dict):
                extras = {k: v.detach() for k, v in out.items() if k != "loss"}
            scaler.scale(loss).backward()
            total += loss.detach()
        if self.config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_((module or self.model).parameters(), self.config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self._all_finite &= torch.isfinite(total)
        return total, extras

    # -- setup
    def _restore(self, checkpoint: dict, source: str) -> None:
        checkpoints.load_state_dict_checked(self.model, checkpoint["model_state_dict"], source)
        saved, current = optimizer_kind(checkpoint.get("optimizer", {})), optimizer_kind(self.optimizer)
        if saved != current:
            raise TrainError(f"{source} was trained with --optimizer {saved}, this run has --optimizer {current}: "
                             f"resume with --optimizer {saved}, or start a fresh run")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            self.step = int(checkpoint["step"])
            self.train_seconds = float(checkpoint["scheduler"]["train_seconds"])
            self.best_val_loss = float(checkpoint["best_val_loss"])
            rank_states = checkpoint["rank_states"]
            self.strategy.load_state_dict(checkpoint.get("step_state", {}))
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise checkpoints.CheckpointError(
                f"{source}: its training state does not fit this run ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160] if str(err) else ''}); resume with the settings it was written with "
                "or start a fresh run") from None
        if len(rank_states) != self.dist.world_size:
            raise TrainError(f"the checkpoint was written by {len(rank_states)} processes, this run has "
                             f"{self.dist.world_size}: resume with the same --nproc_per_node")
        own = rank_states[self.dist.rank]
        if hasattr(self.batches, "load_state_dict") and "data" in own:
            self.batches.load_state_dict(own["data"])
        set_rng_state(own["rng"])

    def _max_steps(self, steps_per_epoch: float | None) -> int | None:
        return step_limit(self.config, steps_per_epoch)

    # -- training
    def _progress(self) -> float:
        return run_progress(self.step, self.max_steps, self.train_seconds,
                            self.time_budget if self.config.max_minutes else None)

    def _apply_schedule(self) -> None:
        """This step's lr (warmup + cosine) on the optimizer, and scaled from their own peaks on the others."""
        self.lr = lr_at(self._progress(), self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        for optimizer, peak in self.scheduled:
            for group in optimizer.param_groups:
                group["lr"] = peak * (self.lr / self.config.lr)

    def train(self, stop_after: int | None = None) -> dict[str, float]:
        """Train until the step/epoch/time limit (or ``stop_after`` steps, as if killed there); returns the last eval.

        SIGINT/SIGTERM save a resumable checkpoint and raise ``cli.Interrupted``.
        """
        c = self.config
        # the time budget covers everything after process start (tokenizer training, tokenization, evals, saves)
        self.time_budget = (c.max_minutes or 0) * 60 - (time.time() - self.start_time)
        if c.max_minutes and self.time_budget <= self.train_seconds:
            raise TrainError(f"--max_minutes {c.max_minutes} is used up before {self.prefix} starts: raise it")
        with StopSignals() as stop:
            return self._loop(stop, stop_after)

    def _loop(self, stop: StopSignals, stop_after: int | None) -> dict[str, float]:
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.prefix,
                   disable=not (self.show_progress and self.dist.is_main))
        try:  # a failure (a full disk) prints its one line after the bar, not glued to its end
            return self._steps(stop, stop_after, bar)
        finally:
            bar.close()

    def _steps(self, stop: StopSignals, stop_after: int | None, bar: tqdm) -> dict[str, float]:
        c = self.config
        save_interval = c.save_interval or c.eval_interval
        last_eval = self.evaluate() if self.evaluate_first and self.step == 0 and self.evaluate_fn else {}
        prior_seconds, loop_start = self.train_seconds, time.time()
        window_start, window_tokens = time.time(), 0
        self.train_model.train()
        finished, stopping = self._synced_flags(stop)
        while not finished and not stopping and (stop_after is None or self.step < stop_after):
            self._apply_schedule()
            loss, extras, tokens = self.strategy(self)
            self.step += 1
            window_tokens += tokens
            self.train_seconds = prior_seconds + time.time() - loop_start
            finished, stopping = self._synced_flags(stop)
            if self.step % c.log_interval == 0 or finished:
                self._log_step(loss, extras, window_tokens / (time.time() - window_start), bar)
                window_start, window_tokens = time.time(), 0
            bar.total = self._bar_total()  # a time budget's total is known only from the speed so far
            bar.update(1)
            evaluating = self.evaluate_fn is not None and (self.step % c.eval_interval == 0 or finished)
            if evaluating:
                last_eval = self.evaluate()
            if self.step % save_interval == 0 or finished or stopping or self.step == stop_after:
                self.save(self.output_dir / f"{self.prefix}_step_{self.step}.pth")
            if evaluating or self.step % save_interval == 0:  # keep evaluation and saving out of tokens/s
                window_start, window_tokens = time.time(), 0
            self.train_seconds = prior_seconds + time.time() - loop_start
        bar.close()  # before the end-of-run lines
        self.run.plot()
        if stopping:
            name = signal.Signals(stop.signum).name if stop.signum else "a signal"
            raise Interrupted(stop.signum or signal.SIGINT, f"stopped by {name} at step {self.step}: "
                              f"{self._saved_note()}")
        return last_eval

    def _bar_total(self) -> int | None:
        """The progress bar's total: the step limit or, under --max_minutes, the steps the budget allows at the
        speed so far (so the bar shows an ETA; the run stops on the clock, not on this estimate)."""
        progress = self._progress()
        if not self.config.max_minutes or self.step == 0 or progress <= 0:
            return self.max_steps
        estimate = max(self.step, math.ceil(self.step / progress))
        return min(estimate, self.max_steps) if self.max_steps else estimate

    def _saved_note(self) -> str:
        """Where to continue from, naming only a file that exists (a message must not point at a deleted one)."""
        if self.last_saved and Path(self.last_saved).is_file():
            return f"saved {self.last_saved}; continue with --resume auto"
        return "no checkpoint saved yet (it stopped before the first step); run the command again to start over"

    def _synced_flags(self, stop: StopSignals) -> tuple[bool, bool]:
        """(finished, stop requested), agreed by all ranks (time budgets and signals reach ranks at other steps)."""
        progress, stopping = self._progress(), float(stop.signum is not None)
        if self.dist.enabled:
            value = torch.tensor([progress, stopping], dtype=torch.float64, device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            progress, stopping = float(value[0]), float(value[1])
        return progress >= 1.0, stopping > 0

    def _log_step(self, loss: torch.Tensor, extras: dict[str, Any], tokens_per_sec: float, bar) -> None:
        loss_value = self._mean_across_ranks(loss)
        self.check_finite(loss_value)
        row = {"step": self.step, "train_loss": loss_value, "lr": self.lr, "tokens_per_sec": tokens_per_sec}
        row.update({k: self._mean_across_ranks(v) for k, v in extras.items()})
        peak = peak_flops(self.device)
        if peak and hasattr(self.model, "estimate_mfu"):
            row["mfu"] = self.model.estimate_mfu(tokens_per_sec, peak)
        self.run.log(row)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{self.lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")

    def check_finite(self, loss_value: float | None = None) -> None:
        """A non-finite loss ends the run with the step and the usual fixes; the last good checkpoint stays."""
        if (loss_value is None or math.isfinite(loss_value)) and bool(self._all_finite):
            return
        kept = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written"
        raise TrainError(f"the training loss became non-finite (NaN/inf) by step {self.step}: lower --lr (now "
                         f"{self.config.lr:g}), keep --grad_clip on, or check the data for broken records; {kept}")

    def _mean_across_ranks(self, value: torch.Tensor | float) -> float:
        """A logged scalar, averaged over the ranks when it is a tensor."""
        if not isinstance(value, torch.Tensor):  # already a host number (RL statistics)
            return value
        value = value.float()
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.dist.world_size
        return float(value)

    # -- evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics on rank 0; a better val_loss writes ``{prefix}_best.pth``."""
        result: dict[str, float] = {}
        if self.dist.is_main:
            self.check_finite()
            was_training = self.model.training
            self.model.eval()
            with self.autocast():
                result = {"step": self.step, **self.evaluate_fn(self.model)}
            self.model.train(was_training)
            self.run.log(result)
            if self.show_progress:  # one console line per evaluation, above the bar
                tqdm.write(eval_line(self.prefix, result))
            if result["val_loss"] < self.best_val_loss:
                self.best_val_loss = result["val_loss"]
                self.save(self.output_dir / f"{self.prefix}_best.pth", training_state=False)
            self.run.plot()
        barrier(self.dist)
        return result

    # -- checkpoints
    def _gather(self, obj: Any) -> list[Any]:
        if not self.dist.enabled:
            return [obj]
        out = [None] * self.dist.world_size
        dist.all_gather_object(out, obj)
        return out

    def _training_state(self) -> dict[str, Any]:
        data_state = self.batches.state_dict() if hasattr(self.batches, "state_dict") else {}
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": {"train_seconds": self.train_seconds, "max_steps": self.max_steps},
                "rank_states": self._gather({"data": data_state, "rng": rng_state()}),
                "step_state": self.strategy.state_dict()}

    def save(self, path: Path, training_state: bool = True) -> None:
        """Atomic checkpoint: weights + config + tokenizer fingerprint (+ everything needed to resume exactly);
        keeps the last ``keep_last`` step checkpoints (0: all)."""
        extra: dict[str, Any] = {"tokenizer_fingerprint": self.tokenizer.fingerprint, "step": self.step,
                                 "best_val_loss": self.best_val_loss, "train_args": asdict(self.config),
                                 "stage": self.prefix, **self.checkpoint_extra}
        if training_state:
            extra.update(self._training_state())
        if self.dist.is_main:
            self.check_finite()
            self.run.commit()
            checkpoints.save_checkpoint(path, self.model, **extra)
            if training_state:
                self.last_saved = str(path)
                if self.config.keep_last > 0:  # the file just written is kept, whatever else the folder holds
                    others = [p for p in step_checkpoints(self.output_dir, self.prefix) if p != path]
                    for old in others[:max(0, len(others) - (self.config.keep_last - 1))]:
                        old.unlink(missing_ok=True)
        if training_state:  # a collective save (all ranks are here); the best-model save is rank 0's alone
            barrier(self.dist)

    def metrics(self) -> list[dict[str, Any]]:
        return self.run.metrics()
