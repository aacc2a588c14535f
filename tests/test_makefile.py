"""The Makefile's pipeline: `make -n pipeline` lists every stage's CLI call, in dependency order, with the project's
flag vocabulary."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT

STAGES = [("tokenizer", "byte_level_bpe.py"), ("pretrain", "pretrain_trainer.py"), ("sft", "--mode sft"),
          ("reward", "--mode reward"), ("rlhf", "--mode rlhf"), ("dpo", "--mode dpo"), ("rlvf", "--mode rlvf"),
          ("classify", "--mode classify"), ("eval", "evaluator.py"), ("quantize", "inference.quantizer"),
          ("loadtest", "locust -f inference/load_test.py")]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_n_pipeline_lists_the_stages_in_order():
    listing = subprocess.run(["make", "-n", "pipeline"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    positions = [listing.find(marker) for _, marker in STAGES]
    assert all(p >= 0 for p in positions), [s for (s, _), p in zip(STAGES, positions) if p < 0]
    assert positions == sorted(positions)
    assert "127.0.0.1" in listing and "--headless" in listing and " -t " in listing  # bounded, on loopback


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_each_stage_is_a_target_of_its_own():
    for stage, marker in STAGES:
        listing = subprocess.run(["make", "-n", stage], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert marker in listing, stage


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_every_stage_uses_the_current_flag_names():
    listing = subprocess.run(["make", "-n", "pipeline"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--max_new_tokens 16" in listing  # the eval stage
    for retired in ("--" + "max_gen_len", "--" + "threads", "--" + "max-gen-len"):  # not spelled out: see grep
        assert retired not in listing, retired
