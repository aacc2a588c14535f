"""A reward model's scores of responses: each rendered prompt + ``response </s>`` (as reward models are trained), in
batches. The evaluator (mean reward, best-of-N picks) and the server's best_of scorer use it."""
from __future__ import annotations

from typing import Sequence

import torch

from data_loader import collate_batch
from prompts import prompt_response_ids


@torch.no_grad()
def reward_scores(reward_model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                  responses: Sequence[str], device: torch.device, batch_size: int = 32) -> list[float]:
    """The reward model's score of each rendered prompt + ``response </s>`` (as reward models are trained)."""
    reward_model.eval()
    items = []
    for prompt, response in zip(prompts, responses):
        sample = prompt_response_ids(tokenizer, prompt, response, reward_model.config.max_seq_len)
        items.append({"input_ids": torch.tensor(sample.input_ids),
                      "attention_mask": torch.ones(len(sample.input_ids), dtype=torch.long),
                      "labels": torch.tensor(sample.labels)})
    scores = []
    for start in range(0, len(items), batch_size):
        batch = collate_batch(items[start:start + batch_size], tokenizer.pad_token_id)
        scores += reward_model.score(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))).tolist()
    return scores
