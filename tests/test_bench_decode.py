"""benchmarks/bench_decode.py on a tiny random model: the four-turn chat it replays comes from the committed demo
dialogues, the prefix cache reuses the earlier turns there, and speculative decoding keeps plain decoding's tokens."""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_decode import prefix_figures, spec_prompts, speculative_figures
from gpt_model import GPTModel
from prompts import CHAT_TEMPLATE


def test_the_chat_replay_reuses_earlier_turns_and_drafts_keep_the_plain_tokens(tiny_tokenizer):
    tokenizer = tiny_tokenizer  # trained on the embedded corpus: models/ is empty on a clean clone
    torch.manual_seed(0)
    model = GPTModel(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=512).eval()
    args = argparse.Namespace(repeats=1, reply_tokens=4, new_tokens=8, k=3)
    chat = prefix_figures(model, tokenizer, CHAT_TEMPLATE, args)
    assert chat["turns"] == 4 and len(chat["ttft_ms_by_turn_with_prefix_cache"]) == 4
    assert chat["turn4_reused_tokens"] >= 16  # at least the system message's whole blocks
    assert chat["turn4_reused_tokens"] < chat["turn4_prompt_tokens"]  # the last block is always recomputed
    sets = spec_prompts(tokenizer, CHAT_TEMPLATE, 2)
    assert set(sets) == {"demo_sft", "plain_text"} and all(len(prompts) == 2 for prompts in sets.values())
    assert speculative_figures(model, sets["plain_text"], args)["identical_tokens"]
