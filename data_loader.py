"""Data pipeline: batches from the packed token stream, and the finetuning datasets.

Pretraining uses the flat token stream ``<s> doc1 </s> <s> doc2 </s> ...`` that ``token_cache`` builds, sampled
as random windows (training) or walked sequentially (validation, with the exact text bytes covered so bits per
byte is exact). Finetuning uses per-sample datasets
(``GPTSFTDataset``, ``PreferencePairDataset``, ``ClassificationDataset``) padded per batch by ``collate_batch``.
Files are read by ``readers`` and samples formatted by ``prompts``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from loss_labels import IGNORE_INDEX
from prompts import SFT_TEMPLATE, document_ids, prompt_response_ids, record_messages, record_prompt_ids, render_sample
from readers import DataError, load_classification_records, load_preference_records, load_sft_records
from token_cache import TokenStream


# ----------------------------------------------------------------------------- packed token stream

def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: its raw bytes; ``</s>`` = 1 (the newline), other specials 0."""
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    special_ids = {tokenizer.vocab[s] for s in tokenizer.special_tokens}
    for i in range(len(tokenizer)):
        if i not in special_ids:
            lengths[i] = len(tokenizer.decode_bytes([i], skip_special_tokens=False))
    lengths[tokenizer.eos_token_id] = 1
    return lengths


class RandomWindowBatches:
    """Endless training batches of random ``seq_len`` windows of a token stream (labels = input_ids).

    The torch.Generator state is the whole sampling state (``state_dict``), so resuming is exact;
    give each DDP rank its own ``rank`` for an independent stream.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0):
        if len(tokens) < seq_len:
            raise DataError(f"the token stream has {len(tokens)} tokens, fewer than max_seq_len={seq_len}: "
                            "use more data or a shorter --max_seq_len")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.offsets = np.arange(seq_len)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts.numpy()[:, None] + self.offsets]
        input_ids = torch.from_numpy(windows.astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator_state"])


def sequential_windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, end) windows with stride seq_len-1 so every token after the first is predicted exactly once."""
    if seq_len < 2:
        raise DataError("max_seq_len must be at least 2 to predict anything")
    stride = seq_len - 1
    return [(start, min(start + seq_len, n_tokens)) for start in range(0, n_tokens - 1, stride)]


def sequential_batches(tokens: np.ndarray, seq_len: int, batch_size: int, byte_lengths: np.ndarray | None = None,
                       max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """Deterministic validation pass over the whole stream; each batch carries ``n_bytes`` of its predicted tokens.

    Full windows come ``batch_size`` at a time; the shorter final window (if any) comes alone, so no padding.
    """
    windows = sequential_windows(len(tokens), seq_len)
    full = [w for w in windows if w[1] - w[0] == seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if w[1] - w[0] != seq_len]
    for group in groups[:max_batches]:
        input_ids = torch.from_numpy(np.stack([tokens[a:b] for a, b in group]).astype(np.int64))
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": input_ids}
        if byte_lengths is not None:
            batch["n_bytes"] = int(byte_lengths[input_ids[:, 1:].numpy()].sum())
        yield batch


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
    """How often each token id occurs in a stream (chunked, so memory stays flat)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[i:i + chunk], minlength=vocab_size)[:vocab_size]
    return counts


def unigram_bits_per_byte(train_tokens: np.ndarray, val: TokenStream, vocab_size: int) -> float:
    """Baseline: val bits per byte of an add-one-smoothed unigram model of the train token frequencies."""
    counts = token_counts(train_tokens, vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    val_counts = token_counts(val.tokens[1:], vocab_size)  # the first token is never predicted
    total_nll = float(-(val_counts * log_probs).sum())
    return total_nll / (math.log(2) * val.n_bytes)


# ----------------------------------------------------------------------------- per-sample datasets

def _sample(input_ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


class GPTSFTDataset(Dataset):
    """Conversations rendered by ``prompts.render_sample``: labels -100 except on the assistant turns.

    ``source`` is a .json/.jsonl path or a list of records (instruction records are one user + one assistant turn).
    A conversation longer than the context loses its oldest turns (``num_dropped_turns``), then the end of its last
    answer (``num_truncated``); one with no assistant token left to learn is dropped (``num_dropped``).
    """

    def __init__(self, source: str | os.PathLike | list[dict], tokenizer, max_seq_len: int,
                 template: str = SFT_TEMPLATE):
        records = load_sft_records(source) if isinstance(source, (str, os.PathLike)) else source
        self.samples: list[tuple[list[int], list[int]]] = []
        self.num_truncated = self.num_dropped = self.num_dropped_turns = 0
        for record in records:
            sample = render_sample(tokenizer, record_messages(record), template, max_seq_len)
            if sample is None:
                self.num_dropped += 1
                continue
            self.num_truncated += sample.truncated
            self.num_dropped_turns += sample.dropped_turns
            self.samples.append((sample.input_ids, sample.labels))
        if not self.samples:
            raise DataError(f"no usable SFT samples ({self.num_dropped} dropped: "
                            f"prompt longer than max_seq_len={max_seq_len}): "
                            "raise max_seq_len or shorten the instructions")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _sample(*self.samples[index])


def encode_for_classification(tokenizer, text: str, max_seq_len: int) -> tuple[list[int], bool]:
    """``<s> text </s>``, the text cut to fit ``max_seq_len`` (the classifier reads the final ``</s>``); also whether
    it was cut."""
    ids = tokenizer.encode_ordinary(text)
    room = max_seq_len - 2
    return document_ids(tokenizer, ids[:room]), len(ids) > room


class ClassificationDataset(Dataset):
    """``<s> text </s>`` samples with a class id (``label``, a 0-d tensor); ``labels`` fixes the class order
    (default: the sorted label names of the records). A record whose label is not in ``labels`` is a DataError."""

    def __init__(self, source: str | os.PathLike | list[dict], tokenizer, max_seq_len: int,
                 labels: Sequence[str] | None = None):
        records = load_classification_records(source) if isinstance(source, (str, os.PathLike)) else source
        self.labels = list(labels) if labels is not None else sorted({r["label"] for r in records})
        index = {label: i for i, label in enumerate(self.labels)}
        self.samples: list[tuple[list[int], int]] = []
        self.num_truncated = 0
        where = source if isinstance(source, (str, os.PathLike)) else "a record"
        for record in records:
            if record["label"] not in index:
                raise DataError(f"label {record['label']!r} of {where} is not one of the model's classes {self.labels}")
            ids, truncated = encode_for_classification(tokenizer, record["text"], max_seq_len)
            self.num_truncated += truncated
            self.samples.append((ids, index[record["label"]]))
        if not self.samples:
            raise DataError("no classification records: pass a non-empty .jsonl of {\"text\", \"label\"}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, label = self.samples[index]
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.ones(len(ids), dtype=torch.long), "label": torch.tensor(label)}


class PreferencePairDataset(Dataset):
    """Preference pairs: each item holds ``prompt_input_ids`` and ``chosen_*`` / ``rejected_*`` sequences.

    Both sequences are ``<s> prompt answer </s>`` with labels -100 on the prompt (as in ``GPTSFTDataset``).
    """

    def __init__(self, source: str | os.PathLike | list[dict], tokenizer, max_seq_len: int,
                 template: str = SFT_TEMPLATE):
        records = load_preference_records(source) if isinstance(source, (str, os.PathLike)) else source
        self.items: list[dict[str, torch.Tensor]] = []
        self.num_truncated = 0
        for record in records:
            prompt = record_prompt_ids(tokenizer, record, template)
            item = {"prompt_input_ids": torch.tensor(prompt, dtype=torch.long)}
            for side in ("chosen", "rejected"):
                sample = prompt_response_ids(tokenizer, prompt, record[side], max_seq_len)
                self.num_truncated += sample.truncated
                item.update({f"{side}_{k}": v for k, v in _sample(sample.input_ids, sample.labels).items()})
            self.items.append(item)
        if not self.items:
            raise DataError("the preference source holds no records")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class ShuffledBatches:
    """Endless batches from a map-style dataset, reshuffled every epoch; resumable exactly (``state_dict``).

    Each epoch's order is a permutation drawn from (seed, epoch), so the state is just (epoch, position). Under
    DDP each rank takes every ``world_size``-th batch of the same order.
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise DataError("cannot draw batches from an empty dataset")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    @property
    def batches_per_epoch(self) -> int:
        """Optimizer-visible batches per epoch on this rank."""
        return max(1, math.ceil(len(self.dataset) / self.batch_size) // self.world_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = (self.position * self.world_size + self.rank) * self.batch_size
        indices = self._order[start:start + self.batch_size] or self._order[:self.batch_size]
        self.position += 1
        return self.collate([self.dataset[i] for i in indices])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def collate_pairs(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences of preference pairs in ONE right-padded batch: rows [chosen..., rejected...]."""
    sides = [{k.removeprefix(f"{side}_"): v for k, v in item.items() if k.startswith(f"{side}_")}
             for side in ("chosen", "rejected") for item in items]
    return collate_batch(sides, pad_token_id)


def _pad_value(key: str, pad_token_id: int) -> int:
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("attention_mask"):
        return 0
    return pad_token_id


def collate_batch(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each 1-D field to the longest item in the batch (labels with -100, attention_mask with 0); stack
    0-d tensors (a class id per item)."""
    if not items:
        raise DataError("cannot collate an empty batch")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor) and values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        if not (isinstance(values[0], torch.Tensor) and values[0].dim() == 1):
            batch[key] = values
            continue
        longest = max(len(v) for v in values)
        padded = torch.full((len(values), longest), _pad_value(key, pad_token_id), dtype=values[0].dtype)
        for row, value in zip(padded, values):
            row[: len(value)] = value
        batch[key] = padded
    return batch
