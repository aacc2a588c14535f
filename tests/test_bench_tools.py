"""benchmarks.bench_tools: dialogues replayed with the model's own replies (calls and results included) as history,
scored on the text after the last result, with the calculator on and off."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

import checkpoints
from benchmarks import bench_tools
from decoding import SamplingParams
from gpt_model import GPTConfig, GPTModel
from prompts import CHAT_TEMPLATE, final_answer
from tests.test_api_service import LiveServer, settings_for
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
    args = bench_tools.build_parser().parse_args(["--sft_model", "any.pth", "--through", "engine", "--max_new_tokens",
                                                  "16", "--batch_size", "2"])
    got = bench_tools.scores(tmp_path / "any.pth", records, args)
    # every reply calls 4+2: the result 6 is forced in and the model answers 6 (right on turns 1 and 2 only)
    assert got["calculator_on"] == {"turn1": 1.0, "turn2": 1.0, "turn3": 0.0}
    assert got["calculator_off"] == {"turn1": 0.0, "turn2": 0.0, "turn3": 0.0}  # it writes "q" after its call
    params = bench_tools.SamplingParams(max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id)
    loaded = checkpoints.load("any")
    assert bench_tools.replay(loaded, records[:1], params, 1) == [["6", "6", "6"]]


def test_the_server_replay_gives_the_engine_replays_answers_and_counts_the_dropped_turns(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), n_layers=1, max_seq_len=48))
    checkpoints.save_checkpoint(tmp_path / "m.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                                sft_template=CHAT_TEMPLATE)
    records = bench_tools.arithmetic_dialogues(bench_tools.CHAT_TEST, 4)
    with LiveServer(settings_for(tmp_path / "m.pth", max_batch_size=4)) as live:
        replies, dropped = asyncio.run(bench_tools.replay_server(live.url, records, 8, True, 4))
    loaded = checkpoints.load(tmp_path / "m.pth", device="cpu")
    params = SamplingParams(max_new_tokens=8, do_sample=False, eos_token_id=tiny_tokenizer.eos_token_id)
    engine = bench_tools.replay(loaded, records, params, 4)  # the prompts rendered here, in one engine
    assert [[final_answer(r).strip() for r in dialogue] for dialogue in replies] == engine
    assert len(dropped) == 4 and dropped[0] == 0 and sum(dropped) > 0  # 48 tokens hold two or three turns
