"""Shared fixtures: a small tokenizer trained on the embedded corpus, and a tiny model config for it."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_TXT = ROOT / "data" / "pretrain" / "train.txt"
VAL_TXT = ROOT / "data" / "pretrain" / "val.txt"
SAMPLE_ZH = ROOT / "data" / "pretrain" / "sample_zh.txt"


def corpus_lines(path: Path = TRAIN_TXT, limit: int = 2000) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for _, line in zip(range(limit), f)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token BPE trained on a slice of the default corpus plus the Chinese samples."""
    from byte_level_bpe import ByteLevelBPETokenizer

    texts = corpus_lines() + SAMPLE_ZH.read_text(encoding="utf-8").splitlines()
    tokenizer = ByteLevelBPETokenizer(vocab_size=512)
    tokenizer.train(texts, min_frequency=2, show_progress=False)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save(path)
    return path


@pytest.fixture()
def tiny_config(tiny_tokenizer):
    from gpt_model import GPTConfig

    return GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64, dropout=0.0)
