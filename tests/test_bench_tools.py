"""benchmarks.bench_tools: dialogues replayed with the model's own replies (calls and results included) as history,
scored on the text after the last result, with the calculator on and off."""
from __future__ import annotations

import json

import pytest
import torch

import checkpoints
from benchmarks import bench_tools
from gpt_model import GPTModel
from prompts import CHAT_TEMPLATE
from tests.test_decoding import Scripted, chain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calls_are_run_and_scored_on_the_answer_after_the_result(tiny_tokenizer, tmp_path, monkeypatch):
    tok = tiny_tokenizer
    special = tok.special_token_id
    (four,), (plus,), (two,), (six,), (q,) = (tok.encode_ordinary(c) for c in "4+26q")
    script = {**chain(special("<|assistant|>"), special("<|tool_call|>"), four, plus, two, special("<|/tool_call|>"),
                      q, tok.eos_token_id), **chain(special("<|/tool_result|>"), six, tok.eos_token_id)}
    torch.manual_seed(0)
    inner = GPTModel(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    model = Scripted(inner, script).eval()
    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: checkpoints.Loaded(model, tok, "lm", CHAT_TEMPLATE,
                                                                                 None, {}))
    turns = [("计算 2 + 4 = ?", "6"), ("再加 0 呢？", "6"), ("再减 1 呢？", "5")]
    record = {"task": "arithmetic_chat", "messages": [m for user, answer in turns for m in (
        {"role": "user", "content": user}, {"role": "assistant", "content": answer})]}
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([record, record]), encoding="utf-8")
    records = bench_tools.arithmetic_dialogues(data, None)
    got = bench_tools.scores(tmp_path / "any.pth", records, max_new_tokens=16, batch_size=2)
    # every reply calls 4+2: the result 6 is forced in and the model answers 6 (right on turns 1 and 2 only)
    assert got["calculator_on"] == {"turn1": 1.0, "turn2": 1.0, "turn3": 0.0}
    assert got["calculator_off"] == {"turn1": 0.0, "turn2": 0.0, "turn3": 0.0}  # it writes "q" after its call
    params = bench_tools.SamplingParams(max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id)
    loaded = checkpoints.load("any")
    assert bench_tools.replay(loaded, records[:1], params, 1) == [["6", "6", "6"]]
