"""Shared fixtures: a small tokenizer trained on the embedded corpus, a tiny model config for it, a tiny checkpoint,
an earlier run's output folder and the files the CLI tests read."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_TXT = ROOT / "data" / "pretrain" / "train.txt"
VAL_TXT = ROOT / "data" / "pretrain" / "val.txt"
SAMPLE_ZH = ROOT / "data" / "pretrain" / "sample_zh.txt"


class BigramModel(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: a model whose predictions a test can compute by hand (``bigram_nll``)."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, input_ids, attention_mask=None, **_):
        return {"logits": self.table[input_ids]}


def bigram_nll(table, prev: int, nxt: int) -> float:
    """-log softmax(table[prev])[nxt], written out with math (independent of F.cross_entropy)."""
    row = table[prev].tolist()
    return math.log(sum(math.exp(x) for x in row)) - row[nxt]


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


@pytest.fixture()
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads crawl on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(folder: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """train.txt / val.txt slices of the embedded corpus in folder."""
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_text("\n".join(corpus_lines(limit=n_train)) + "\n", encoding="utf-8")
    val.write_text("\n".join(corpus_lines(VAL_TXT, limit=n_val)) + "\n", encoding="utf-8")
    return train, val


@pytest.fixture()
def files(tiny_tokenizer, tiny_tokenizer_dir, tmp_path) -> dict[str, Path]:
    """A tiny 'pretrained' checkpoint laid out as the trainer writes it, and slices of the finetuning demo data."""
    import json
    import shutil

    from checkpoints import save_checkpoint
    from gpt_model import GPTConfig, GPTModel

    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64, n_layers=1,
                                           d_model=32, n_heads=2))
    pretrained = tmp_path / "pre" / "pretrain_best.pth"
    save_checkpoint(pretrained, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    shutil.copytree(tiny_tokenizer_dir, pretrained.parent / "tokenizer")
    out = {"pretrained": pretrained}
    for name, count in (("sft_data", 48), ("sft_test", 16), ("rlhf_pairwise", 48), ("rlhf_pairwise_test", 16)):
        records = json.loads((ROOT / "data" / "sft" / f"{name}.json").read_text(encoding="utf-8"))
        # the stages here also run models of the older template, which has no tool calls (test_finetune_stages
        # trains on the calculator dialogues on its own)
        records = [r for r in records if not any(m.get("tool_calls") for m in r.get("messages", ()))][:count]
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


def stage_config(files: dict[str, Path], tmp_path: Path, mode: str, **overrides):
    """A small, fast config of one finetuning mode on ``files`` (the test's overrides must be settings of the mode)."""
    from finetune_stages import CONFIGS, field_names

    base = dict(data_path=str(files["sft_data"]), test_data_path=str(files["sft_test"]),
                pairwise_data=str(files["rlhf_pairwise"]), pairwise_test_data=str(files["rlhf_pairwise_test"]),
                pretrained_model=str(files["pretrained"]), output_dir=str(tmp_path / mode), device="cpu",
                dtype="float32", batch_size=8, max_steps=4, eval_interval=2, log_interval=1, warmup_steps=1,
                lr=1e-3, seed=0, eval_samples=8, max_new_tokens=4)
    return CONFIGS[mode](**{**{k: v for k, v in base.items() if k in field_names(mode)}, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A small train/val pair for pretraining runs (a test file may define its own)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), 400, 30)


def tiny_checkpoint(path: Path, tokenizer) -> Path:
    """A one-layer model for ``tokenizer`` saved at ``path``, as the trainer saves its best model."""
    from checkpoints import save_checkpoint
    from gpt_model import GPTConfig, GPTModel

    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=32, n_layers=1, d_model=32,
                                           n_heads=2))
    save_checkpoint(path, model, tokenizer_fingerprint=tokenizer.fingerprint)
    return path


@pytest.fixture()
def earlier_run(tiny_tokenizer, tmp_path) -> Path:
    """An output folder holding a finished earlier run: best + step checkpoints, metrics, curve, tokenizer."""
    folder = tmp_path / "earlier"
    tiny_checkpoint(folder / "pretrain_best.pth", tiny_tokenizer)
    (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "val_loss": 4.0}\n')
    (folder / "loss_curve.png").write_bytes(b"\x89PNG earlier")
    tiny_tokenizer.save(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def shared(tiny_tokenizer, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """What the commands read: a tiny checkpoint with its tokenizer, an SFT file, a small corpus, a plain file (in a
    folder that tests check is left as it was)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("shared")
    tiny_checkpoint(folder / "model.pth", tiny_tokenizer)
    shutil.copytree(tiny_tokenizer_dir, folder / "tokenizer")
    (folder / "sft.json").write_text(json.dumps([{"instruction": "a", "response": "b"}]), encoding="utf-8")
    (folder / "text.txt").write_text("\n".join(corpus_lines(limit=50)) + "\n", encoding="utf-8")
    (folder / "a_file").write_text("x")
    base, adapter = lora_adapter(folder / "lora" / "adapters.pth", folder / "base" / "base.pth", tiny_tokenizer)
    return {"ckpt": folder / "model.pth", "sft": folder / "sft.json", "text": folder / "text.txt",
            "afile": folder / "a_file", "folder": folder, "base": base, "adapter": adapter}


def lora_adapter(path: Path, base_path: Path, tokenizer) -> tuple[Path, Path]:
    """(a base checkpoint, a LoRA adapter file on it), each with its tokenizer folder, as SFT with --lora_r writes
    them: the adapter names its base by path."""
    import lora
    from checkpoints import load_model

    tokenizer.save(base_path.parent / "tokenizer")
    tokenizer.save(path.parent / "tokenizer")
    adapted = lora.apply_lora(load_model(tiny_checkpoint(base_path, tokenizer)), ["c_attn"], r=2, alpha=4.0)
    lora.save_lora(path, adapted, base_model=str(base_path.resolve()), tokenizer_fingerprint=tokenizer.fingerprint)
    return base_path, path
