"""sizing.py: the depth -> shape/lr/tokens rules against hand-worked GPT-2 figures and the real GPTModel, the epoch
cap, the time-budget choice (the largest fitting depth, monotone in minutes and throughput), the printed plan."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from gpt_model import GPTConfig, GPTModel
from sizing import (Plan, SizingError, SizingRules, flops_throughput, format_plan, model_counts, plan_for_budget,
                    plan_from_depth, shape_from_depth)

RULES = SizingRules(base_lr=6e-3)
GPT2_PARAMETERS = 124_439_808  # hand-worked below; also GPT-2 small's published total with its position table


def test_depth_12_is_gpt2_small_hand_worked():
    """12 blocks of (4 x 768^2 attention + 8 x 768^2 MLP + 13 x 768 biases and norms), the 50257 x 768 tied embedding,
    the 1024 x 768 position table and the final norm; 20 tokens a parameter; 512 x 1024 tokens a step."""
    d = 768
    hand = 12 * (12 * d * d + 13 * d) + 50257 * d + 1024 * d + 2 * d
    assert hand == GPT2_PARAMETERS
    plan = plan_from_depth(12, 50257, 1024, corpus_tokens=10_000_000_000, tokens_per_step=512 * 1024, rules=RULES,
                           tokens_per_sec=1_000_000)
    assert (plan.n_layers, plan.d_model, plan.n_heads, plan.d_ff) == (12, 768, 12, 3072)
    assert plan.parameters == GPT2_PARAMETERS
    assert plan.optimal_tokens == 20 * GPT2_PARAMETERS == 2_488_796_160
    assert plan.steps == 4747  # 2,488,796,160 // 524,288 (4747.002 steps)
    assert plan.tokens == 4747 * 524_288 == 2_488_795_136
    assert plan.batch_size == 512
    assert plan.epochs == pytest.approx(0.2488795136)
    assert not plan.capped_by_epochs
    assert plan.lr == pytest.approx(6e-3 / math.sqrt(6))  # width 768 = 6 x the reference 128
    assert plan.expected_minutes == pytest.approx(2_488_795_136 / 1e6 / 60)


def test_depth_12_parameters_equal_the_real_model():
    config = GPTConfig(vocab_size=50257, max_seq_len=1024, **shape_from_depth(12))
    model = GPTModel(config)
    assert model.num_parameters() == GPT2_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == GPT2_PARAMETERS  # tied head counted once
    assert model_counts(12, 50257, 1024) == (GPT2_PARAMETERS, model.estimate_flops_per_token(1024))


@pytest.mark.parametrize("depth,vocab,context", [(1, 300, 16), (2, 8192, 64), (3, 512, 128), (5, 1000, 32)])
def test_parameters_equal_the_real_models_weights(depth, vocab, context):
    plan = plan_from_depth(depth, vocab, context, corpus_tokens=10**9, tokens_per_step=context * 4, rules=RULES)
    model = GPTModel(GPTConfig(vocab_size=vocab, max_seq_len=context, **plan.shape()))
    assert plan.parameters == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    assert plan.d_model == 64 * depth and plan.d_model // plan.n_heads == 64 and plan.d_ff == 4 * plan.d_model


def test_the_default_run_is_depth_2():
    """The default pretraining model (the tiny preset with 2 blocks of 128, vocab 8192, context 64) has depth 2's
    parameters: only the head count differs (4 of 32 there, 2 of 64 here), which holds no weights."""
    default = GPTModel(GPTConfig.from_preset("tiny", n_layers=2, vocab_size=8192, max_seq_len=64))
    assert plan_from_depth(2, 8192, 64, 10**6, 16 * 64, RULES).parameters == default.num_parameters() == 1_453_568


def test_epoch_cap_limits_the_budget_and_says_so():
    plan = plan_from_depth(2, 8192, 64, corpus_tokens=1_000_000, tokens_per_step=1024, rules=RULES)
    assert plan.optimal_tokens == 20 * 1_453_568  # 29.07M, far beyond 4 passes over 1M tokens
    assert plan.capped_by_epochs
    assert plan.steps == 4_000_000 // 1024 == 3906
    assert plan.tokens == 3906 * 1024 and plan.epochs == pytest.approx(3.999744)
    assert "capped at 4 epochs" in format_plan(plan)
    looser = plan_from_depth(2, 8192, 64, 1_000_000, 1024, SizingRules(base_lr=6e-3, max_epochs=100))
    assert not looser.capped_by_epochs and looser.steps == 20 * 1_453_568 // 1024


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 8), corpus=st.integers(1, 10**9), sequences=st.integers(1, 64),
       max_epochs=st.floats(0.1, 10))
def test_never_more_epochs_than_the_limit(depth, corpus, sequences, max_epochs):
    plan = plan_from_depth(depth, 512, 64, corpus, sequences * 64, SizingRules(base_lr=1e-3, max_epochs=max_epochs))
    assert plan.tokens == plan.steps * plan.tokens_per_step and plan.steps >= 1
    assert plan.tokens <= plan.optimal_tokens or plan.steps == 1
    if plan.steps > 1:  # one step is the least a run can be
        assert plan.epochs <= max_epochs + 1e-9
    assert plan.capped_by_epochs == (int(max_epochs * corpus) < plan.optimal_tokens)


def constant_flops(flops_per_sec: float, vocab: int = 512, context: int = 64):
    """A throughput model: every depth at the same FLOP/s (tokens/s = FLOP/s / training FLOPs per token)."""
    return lambda depth: flops_per_sec / model_counts(depth, vocab, context)[1]


BUDGET_RULES = SizingRules(base_lr=6e-3, max_depth=10)


def budget_plan(minutes: float, flops_per_sec: float, corpus: int = 10**12) -> Plan | None:
    try:
        return plan_for_budget(minutes, constant_flops(flops_per_sec), 512, 64, corpus, 32 * 64, BUDGET_RULES)
    except SizingError:
        return None


def test_budget_picks_the_largest_depth_that_fits():
    plan = budget_plan(5.0, 1e12)
    assert plan is not None and plan.expected_minutes <= 5.0 and not plan.capped_by_epochs
    bigger = plan_from_depth(plan.depth + 1, 512, 64, 10**12, 32 * 64, BUDGET_RULES,
                             constant_flops(1e12)(plan.depth + 1))
    assert bigger.expected_minutes > 5.0
    assert budget_plan(5.0, 1e18).depth == BUDGET_RULES.max_depth  # time to spare: the largest depth considered


@settings(max_examples=30, deadline=None)
@given(minutes=st.floats(0.01, 100), more=st.floats(1.0, 50), flops=st.floats(1e9, 1e13), faster=st.floats(1.0, 50))
def test_budget_depth_is_monotone_in_minutes_and_throughput(minutes, more, flops, faster):
    base = budget_plan(minutes, flops)
    for other in (budget_plan(minutes * more, flops), budget_plan(minutes, flops * faster)):
        if base is not None:
            assert other is not None and other.depth >= base.depth
        if other is not None:
            assert other.expected_minutes <= minutes * more + 1e-9 or other.depth == 1


def test_budget_does_not_grow_the_model_past_the_data():
    """With a small corpus the choice is the largest depth whose compute-optimal tokens fit 4 epochs, not the largest
    that fits the time; a corpus too small even for depth 1 gives depth 1 capped at the limit."""
    corpus = 20_000_000
    plan = plan_for_budget(60, constant_flops(1e15), 512, 64, corpus, 32 * 64, BUDGET_RULES)
    assert not plan.capped_by_epochs and 20 * plan.parameters <= 4 * corpus
    assert 20 * model_counts(plan.depth + 1, 512, 64)[0] > 4 * corpus
    tiny = plan_for_budget(60, constant_flops(1e15), 512, 64, 10_000, 32 * 64, BUDGET_RULES)
    assert tiny.depth == 1 and tiny.capped_by_epochs and tiny.epochs <= 4


def test_budget_too_small_for_any_depth_is_an_error():
    with pytest.raises(SizingError, match="even depth 1 .* more than 0.001"):
        plan_for_budget(0.001, lambda depth: 10.0, 512, 64, 10**9, 32 * 64, BUDGET_RULES)


def test_flops_throughput_scales_by_flops_per_token():
    model = flops_throughput(50_000.0, measured_depth=2, vocab_size=512, max_seq_len=64)
    assert model(2) == pytest.approx(50_000.0)
    flops = {d: GPTModel(GPTConfig(vocab_size=512, max_seq_len=64, **shape_from_depth(d))).estimate_flops_per_token()
             for d in (2, 4)}
    assert model(4) == pytest.approx(50_000.0 * flops[2] / flops[4])


def test_format_plan_lines():
    plan = plan_from_depth(12, 50257, 1024, 10_000_000_000, 512 * 1024, RULES, tokens_per_sec=1_000_000)
    assert format_plan(plan).splitlines() == [
        "model: depth 12 = 12 layers x 768 (12 heads of 64, d_ff 3072), 124.44M parameters (124,439,808; "
        "vocab 50,257, context 1,024)",
        "tokens: 2.49B, 20.0 per parameter (compute-optimal: 20)",
        "steps: 4,747 of 524,288 tokens (512 sequences x 1,024)",
        "epochs over the corpus: 0.25 of 10.00B tokens (limit 4)",
        "learning rate: 0.00245 (0.006 at width 128, x sqrt(128 / 768))",
        "expected time: 41.5 minutes at 1.00M tokens/s",
    ]
    unknown = plan_from_depth(1, 512, 64, 10**6, 64, RULES)
    assert format_plan(unknown).splitlines()[-1] == "expected time: not estimated (no throughput measured)"


@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=0), "depth must be a positive integer"),
    (dict(tokens_per_step=100), "whole number of sequences"),
    (dict(corpus_tokens=0), "corpus_tokens must be a positive integer"),
    (dict(vocab_size=1), "vocab_size must be at least 2"),
    (dict(tokens_per_sec=0.0), "tokens_per_sec must be positive"),
])
def test_bad_inputs_are_one_clear_error(kwargs, message):
    args = dict(depth=2, vocab_size=512, max_seq_len=64, corpus_tokens=10**6, tokens_per_step=64, rules=RULES)
    with pytest.raises(SizingError, match=message):
        plan_from_depth(**{**args, **kwargs})


def test_rules_reject_non_positive_knobs():
    with pytest.raises(SizingError, match="max_epochs"):
        SizingRules(base_lr=1e-3, max_epochs=0)
