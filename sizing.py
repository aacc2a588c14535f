"""How big a pretraining run should be: one knob (depth) to a model shape, learning rate, batch and token budget, and
the plan printed before training.

The rules (nanochat's ``--depth``, with a head of 64 for our small models):
  - shape: ``n_layers = depth``, ``d_model = 64 * depth``, ``n_heads = depth`` (head dim 64), ``d_ff = 4 * d_model``;
  - parameters: ``GPTModel.num_parameters()``, every weight counted once (the tied embedding / LM head, the position
    table) -- Chinchilla's convention, which its 20 tokens per parameter was fitted with;
  - tokens: ``tokens_per_param * parameters`` (compute-optimal), capped at ``max_epochs`` passes over the corpus
    (repeating data beyond ~4 epochs is worth little: Muennighoff et al. 2023); steps = tokens // tokens_per_step;
  - learning rate: ``base_lr * sqrt(base_d_model / d_model)``, the width scaling nanochat applies (its lr times
    ``(d_model / 768) ** -0.5``), anchored at the width the project's default lr was swept at;
  - a time budget (``plan_for_budget``): the largest depth whose compute-optimal budget fits the minutes at a given
    throughput and the corpus at the epoch limit.

Pure functions: throughput is an input (a function depth -> tokens/s), measured by the caller. Parameter and FLOP
counts come from the real ``GPTModel``, built on the meta device (no memory, no weights).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from gpt_model import GPTConfig, GPTModel

HEAD_DIM = 64  # nanochat uses 128; 64 keeps a head count >= 1 from depth 1 and matches GPT-2 at depth 12
FF_MULT = 4


class SizingError(ValueError):
    """Inputs no plan can be made from; the message says which and why."""


@dataclass(frozen=True)
class SizingRules:
    """The knobs of the rules. base_lr is the lr that was best at width ``base_d_model`` (pass the trainer's default
    for the chosen optimizer); the other defaults are the published rules of thumb above."""

    base_lr: float
    base_d_model: int = 128  # the tiny preset's width, where the default lrs were swept
    tokens_per_param: float = 20.0  # Chinchilla (Hoffmann et al. 2022)
    max_epochs: float = 4.0  # Muennighoff et al. 2023: up to ~4 epochs of repeated data is almost as good as new
    max_depth: int = 32  # the largest depth plan_for_budget considers

    def __post_init__(self) -> None:
        for name in ("base_lr", "base_d_model", "tokens_per_param", "max_epochs", "max_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SizingError(f"SizingRules.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """A run's size. tokens = steps * tokens_per_step (what trains); optimal_tokens = tokens_per_param * parameters;
    batch_size = sequences per optimizer step (all processes and accumulated micro-batches together)."""

    depth: int
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    parameters: int
    tokens_per_param: float
    optimal_tokens: int
    tokens: int
    tokens_per_step: int
    batch_size: int
    steps: int
    corpus_tokens: int
    epochs: float
    max_epochs: float
    capped_by_epochs: bool
    lr: float
    base_lr: float
    base_d_model: int
    tokens_per_sec: float | None = None
    expected_minutes: float | None = None

    def shape(self) -> dict[str, int]:
        """The model shape under GPTConfig's (and the trainer's flags') names."""
        return {"n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads, "d_ff": self.d_ff}


def shape_from_depth(depth: int) -> dict[str, int]:
    """n_layers, d_model, n_heads, d_ff of a depth: width 64 per layer, heads of 64, a 4x MLP."""
    _check_positive_int("depth", depth)
    d_model = HEAD_DIM * depth
    return {"n_layers": depth, "d_model": d_model, "n_heads": max(1, d_model // HEAD_DIM), "d_ff": FF_MULT * d_model}


@functools.lru_cache(maxsize=512)
def model_counts(depth: int, vocab_size: int, max_seq_len: int) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the real GPTModel of this depth, built on the meta device."""
    return config_counts(GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, pad_token_id=0,
                                   **shape_from_depth(depth)))


def config_counts(config: GPTConfig) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the GPTModel of any config, built on the meta device."""
    with torch.device("meta"):  # shapes only: no memory is allocated, nothing is initialised for real
        model = GPTModel(config)
    return model.num_parameters(), model.estimate_flops_per_token(config.max_seq_len)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SizingError(f"{name} must be a positive integer, got {value!r}")


def _check_inputs(vocab_size: int, max_seq_len: int, corpus_tokens: int, tokens_per_step: int) -> None:
    for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("corpus_tokens", corpus_tokens),
                        ("tokens_per_step", tokens_per_step)):
        _check_positive_int(name, value)
    if vocab_size < 2:
        raise SizingError(f"vocab_size must be at least 2, got {vocab_size}")
    if tokens_per_step % max_seq_len:
        raise SizingError(f"tokens_per_step ({tokens_per_step}) must be a whole number of sequences of max_seq_len "
                          f"({max_seq_len}): batch_size x max_seq_len x grad_accum x processes")


def plan_from_depth(depth: int, vocab_size: int, max_seq_len: int, corpus_tokens: int, tokens_per_step: int,
                    rules: SizingRules, tokens_per_sec: float | None = None) -> Plan:
    """The plan of one depth: shape, parameters, the token budget (capped at ``rules.max_epochs`` over a corpus of
    ``corpus_tokens``), steps of ``tokens_per_step``, the width-scaled lr, and the minutes at ``tokens_per_sec``."""
    _check_inputs(vocab_size, max_seq_len, corpus_tokens, tokens_per_step)
    if tokens_per_sec is not None and not tokens_per_sec > 0:
        raise SizingError(f"tokens_per_sec must be positive, got {tokens_per_sec!r}")
    shape = shape_from_depth(depth)
    parameters, _ = model_counts(depth, vocab_size, max_seq_len)
    optimal = int(rules.tokens_per_param * parameters)
    cap = int(rules.max_epochs * corpus_tokens)
    budget = min(optimal, cap)
    steps = max(1, budget // tokens_per_step)  # whole steps, never past the cap (unless one step already is)
    tokens = steps * tokens_per_step
    minutes = tokens / tokens_per_sec / 60 if tokens_per_sec else None
    return Plan(depth=depth, **shape, vocab_size=vocab_size, max_seq_len=max_seq_len, parameters=parameters,
                tokens_per_param=rules.tokens_per_param, optimal_tokens=optimal, tokens=tokens,
                tokens_per_step=tokens_per_step, batch_size=tokens_per_step // max_seq_len, steps=steps,
                corpus_tokens=corpus_tokens, epochs=tokens / corpus_tokens, max_epochs=rules.max_epochs,
                capped_by_epochs=cap < optimal, lr=rules.base_lr * math.sqrt(rules.base_d_model / shape["d_model"]),
                base_lr=rules.base_lr, base_d_model=rules.base_d_model, tokens_per_sec=tokens_per_sec,
                expected_minutes=minutes)


def plan_for_budget(minutes: float, tokens_per_sec: Callable[[int], float], vocab_size: int, max_seq_len: int,
                    corpus_tokens: int, tokens_per_step: int, rules: SizingRules) -> Plan:
    """The largest depth (up to ``rules.max_depth``) whose compute-optimal budget trains within ``minutes`` at
    ``tokens_per_sec(depth)`` and needs at most ``rules.max_epochs`` over the corpus.

    A model too big for the corpus is not picked even when time is left: past the compute-optimal size for the data,
    extra parameters on repeated tokens are worth little (Muennighoff et al. 2023). When the corpus is too small even
    for depth 1, the plan is depth 1 capped at the epoch limit. SizingError when not even that fits the minutes."""
    if not minutes > 0:
        raise SizingError(f"minutes must be positive, got {minutes!r}")
    plans = [plan_from_depth(depth, vocab_size, max_seq_len, corpus_tokens, tokens_per_step, rules,
                             tokens_per_sec(depth)) for depth in range(1, rules.max_depth + 1)]
    fitting = [p for p in plans if p.expected_minutes <= minutes]
    optimal = [p for p in fitting if not p.capped_by_epochs]
    if optimal:
        return optimal[-1]
    if fitting and fitting[0].depth == 1:  # the corpus caps even the smallest model: train it on what there is
        return fitting[0]
    smallest = plans[0]
    raise SizingError(f"even depth 1 ({count(smallest.parameters)} parameters, {count(smallest.tokens)} tokens) "
                      f"needs {smallest.expected_minutes:.1f} minutes at {count(smallest.tokens_per_sec)} tokens/s, "
                      f"more than {minutes:g}: raise the minutes or choose a depth yourself")


def flops_throughput(tokens_per_sec: float, measured_depth: int, vocab_size: int,
                     max_seq_len: int) -> Callable[[int], float]:
    """A throughput model from one measurement: every depth at the FLOP/s measured at ``measured_depth``, i.e.
    tokens/s scaled by the ratio of training FLOPs per token (6N + attention). Bigger models usually reach a higher
    utilisation, so it errs towards smaller models above the measured depth."""
    _, measured_flops = model_counts(measured_depth, vocab_size, max_seq_len)
    flops_per_sec = tokens_per_sec * measured_flops
    return lambda depth: flops_per_sec / model_counts(depth, vocab_size, max_seq_len)[1]


def count(n: float) -> str:
    """1234 -> 1.23K, 124439808 -> 124.44M, 2.49e9 -> 2.49B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def format_plan(plan: Plan) -> str:
    """The lines printed before training: model and parameters, tokens and steps, epochs, lr, expected minutes."""
    budget = (f"capped at {plan.max_epochs:g} epochs of the corpus (compute-optimal: {count(plan.optimal_tokens)} = "
              f"{plan.tokens_per_param:g} per parameter)" if plan.capped_by_epochs else
              f"{plan.tokens / plan.parameters:.1f} per parameter (compute-optimal: {plan.tokens_per_param:g})")
    timing = (f"{plan.expected_minutes:.1f} minutes at {count(plan.tokens_per_sec)} tokens/s"
              if plan.expected_minutes is not None else "not estimated (no throughput measured)")
    return "\n".join([
        f"model: depth {plan.depth} = {plan.n_layers} layers x {plan.d_model} ({plan.n_heads} heads of "
        f"{plan.d_model // plan.n_heads}, d_ff {plan.d_ff}), {count(plan.parameters)} parameters "
        f"({plan.parameters:,}; vocab {plan.vocab_size:,}, context {plan.max_seq_len:,})",
        f"tokens: {count(plan.tokens)}, {budget}",
        f"steps: {plan.steps:,} of {plan.tokens_per_step:,} tokens ({plan.batch_size:,} sequences x "
        f"{plan.max_seq_len:,})",
        f"epochs over the corpus: {plan.epochs:.2f} of {count(plan.corpus_tokens)} tokens "
        f"(limit {plan.max_epochs:g})",
        f"learning rate: {plan.lr:.3g} ({plan.base_lr:g} at width {plan.base_d_model}, x sqrt({plan.base_d_model} / "
        f"{plan.d_model}))",
        f"expected time: {timing}",
    ])
