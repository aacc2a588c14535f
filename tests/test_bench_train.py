"""benchmarks/bench_train: a timed step runs on the training loop's optimizer and reports a rate."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_train
from gpt_model import GPTConfig, GPTModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokens_per_second_times_real_optimizer_steps():
    result = bench_train.tokens_per_second("tiny", torch.device("cpu"), vocab_size=64, seq_len=16, batch_size=2,
                                           steps=1)
    assert result["tokens_per_sec"] > 0 and math.isfinite(result["tokens_per_sec"])
    model = GPTModel(GPTConfig(vocab_size=64, max_seq_len=16, **bench_train.SHAPES["tiny"]))
    assert result["params_M"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)  # tied head: once
    assert result["dtype"] == "float32"
