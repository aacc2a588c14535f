"""data_loader: window sampling, SFT / preference datasets, collation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import data_loader as dl
import token_cache
from prompts import build_sft_prompt, record_instruction
from readers import DataError

DOCS = ["HAMLET: To be, or not to be.", "《静夜思》 李白：床前明月光，疑是地上霜。", "ROMEO: But, soft! what light?"]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- packed stream


def test_token_byte_lengths_account_for_every_text_byte(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "docs.txt", "\n".join(DOCS) + "\n")
    stream = token_cache.build_token_stream(source, tiny_tokenizer, num_workers=1, show_progress=False)
    lengths = dl.token_byte_lengths(tiny_tokenizer)
    assert lengths[tiny_tokenizer.eos_token_id] == 1 and lengths[tiny_tokenizer.bos_token_id] == 0
    assert lengths[300] == len(tiny_tokenizer.decode_bytes([300]))
    assert int(lengths[np.asarray(stream.tokens)].sum()) == stream.n_bytes


# ----------------------------------------------------------------------------- window sampling


@pytest.mark.parametrize("n_tokens, seq_len", [(100, 8), (9, 8), (8, 8), (57, 2), (1000, 64)])
def test_sequential_windows_predict_every_token_once(n_tokens, seq_len):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    lengths = np.arange(n_tokens, dtype=np.int64) % 3
    batches = list(dl.sequential_batches(tokens, seq_len, batch_size=3, byte_lengths=lengths))
    predicted = torch.cat([b["labels"][:, 1:].flatten() for b in batches])
    assert sorted(predicted.tolist()) == list(range(1, n_tokens))
    for b in batches:
        assert b["input_ids"].shape[1] <= seq_len
        assert torch.equal(b["input_ids"][:, 1:] - b["input_ids"][:, :-1], torch.ones_like(b["input_ids"][:, 1:]))
    assert sum(b["n_bytes"] for b in batches) == int(lengths[1:].sum())


def test_random_windows_are_contiguous_resumable_and_per_rank():
    tokens = np.arange(5000, dtype=np.uint16)
    batches = dl.RandomWindowBatches(tokens, seq_len=16, batch_size=4, seed=3)
    for _ in range(20):
        batch = next(batches)
        x = batch["input_ids"]
        assert x.shape == (4, 16) and x.dtype == torch.long and batch["labels"] is x
        assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # one contiguous slice each
    state = batches.state_dict()
    expected = [next(batches)["input_ids"] for _ in range(3)]
    resumed = dl.RandomWindowBatches(tokens, seq_len=16, batch_size=4, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["input_ids"], e) for e in expected)
    rank0 = next(dl.RandomWindowBatches(tokens, 16, 4, seed=3, rank=0))["input_ids"]
    rank1 = next(dl.RandomWindowBatches(tokens, 16, 4, seed=3, rank=1))["input_ids"]
    assert not torch.equal(rank0, rank1)
    with pytest.raises(DataError, match="fewer than max_seq_len"):
        dl.RandomWindowBatches(tokens[:10], seq_len=16, batch_size=2)


def test_unigram_bits_per_byte_hand_computed():
    train = np.array([0, 5, 5, 6, 2], dtype=np.uint16)
    val = token_cache.TokenStream(np.array([0, 5, 6, 2], dtype=np.uint16), n_documents=1, n_bytes=3, path=None)
    counts = np.bincount(train, minlength=8) + 1.0  # add-one smoothing over vocab 8
    p = counts / counts.sum()
    expected = -(math.log(p[5]) + math.log(p[6]) + math.log(p[2])) / (math.log(2) * 3)
    assert dl.unigram_bits_per_byte(train, val, vocab_size=8) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- per-sample datasets


def test_sft_labels_mask_exactly_prompt_and_padding(tiny_tokenizer):
    records = [{"instruction": "写诗", "response": "床前明月光"},
               {"instruction": "Greet", "input": "Bob", "response": "Hello Bob, how are you today?"}]
    ds = dl.GPTSFTDataset(records, tiny_tokenizer, max_seq_len=64)
    batch = dl.collate_batch([ds[0], ds[1]], tiny_tokenizer.pad_token_id)
    for row, record in enumerate(records):
        prompt_ids = [tiny_tokenizer.bos_token_id,
                      *tiny_tokenizer.encode_ordinary(build_sft_prompt(record_instruction(record)))]
        response_ids = [*tiny_tokenizer.encode_ordinary(record["response"]), tiny_tokenizer.eos_token_id]
        n = len(prompt_ids) + len(response_ids)
        assert batch["input_ids"][row, :n].tolist() == prompt_ids + response_ids
        expected_labels = [-100] * len(prompt_ids) + response_ids + [-100] * (batch["labels"].shape[1] - n)
        assert batch["labels"][row].tolist() == expected_labels
        assert batch["input_ids"][row, n:].eq(tiny_tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert tiny_tokenizer.decode(batch["labels"][row][batch["labels"][row] != -100].tolist()) == record["response"]


def test_sft_truncates_long_and_drops_hopeless_samples(tiny_tokenizer):
    records = [{"instruction": "hi", "response": "word " * 50}, {"instruction": "long " * 40, "response": "x"}]
    ds = dl.GPTSFTDataset(records, tiny_tokenizer, max_seq_len=48)
    assert len(ds) == 1 and ds.num_truncated == 1 and ds.num_dropped == 1
    assert len(ds[0]["input_ids"]) == 48 and ds[0]["labels"][-1] != -100
    with pytest.raises(DataError, match="no usable SFT samples"):
        dl.GPTSFTDataset(records[1:], tiny_tokenizer, max_seq_len=48)


def test_sft_dataset_custom_template_and_batches(tiny_tokenizer, tmp_path):
    path = write(tmp_path / "sft.jsonl",
                 "\n".join(json.dumps({"instruction": f"q{i}", "response": "a" * (i + 1)}) for i in range(5)))
    ds = dl.GPTSFTDataset(path, tiny_tokenizer, 64, template="Q: {instruction}\nA: {response}")
    prompt = [tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode_ordinary("Q: q0\nA: ")]
    assert ds[0]["input_ids"][: len(prompt)].tolist() == prompt
    batches = dl.ShuffledBatches(ds, 2, lambda items: dl.collate_batch(items, tiny_tokenizer.pad_token_id), seed=0)
    epoch = [next(batches) for _ in range(batches.batches_per_epoch)]
    assert [b["input_ids"].shape[0] for b in epoch] == [2, 2, 1]
    assert (sum(int((b["labels"] != -100).sum()) for b in epoch)
            == sum(int((ds[i]["labels"] != -100).sum()) for i in range(5)))


def test_preference_dataset_gives_prompt_masked_chosen_and_rejected(tiny_tokenizer):
    records = [{"instruction": "Greet", "chosen": "Good morrow, friend.", "rejected": "Go away."}]
    item = dl.PreferencePairDataset(records, tiny_tokenizer, max_seq_len=64)[0]
    prompt = [tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode_ordinary(build_sft_prompt("Greet"))]
    assert item["prompt_input_ids"].tolist() == prompt
    for side in ("chosen", "rejected"):
        answer = [*tiny_tokenizer.encode_ordinary(records[0][side]), tiny_tokenizer.eos_token_id]
        assert item[f"{side}_input_ids"].tolist() == prompt + answer
        assert item[f"{side}_labels"].tolist() == [-100] * len(prompt) + answer
    batch = dl.collate_batch([item, item], tiny_tokenizer.pad_token_id)
    assert batch["chosen_input_ids"].shape == (2, len(item["chosen_input_ids"]))
    assert batch["rejected_labels"].shape == (2, len(item["rejected_input_ids"]))


def test_collate_pads_to_longest_item_not_context():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
              "labels": torch.tensor([-100, 6, 7])},
             {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
              "labels": torch.tensor([8])}]
    batch = dl.collate_batch(items, pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(DataError, match="empty batch"):
        dl.collate_batch([], pad_token_id=1)
