"""Generation helpers, streaming, the chat loop and the CLI of inference.kv_cache_infer."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from checkpoints import save_checkpoint
from decoding import SamplingParams, cut_at_eos, generate
from gpt_model import GPTModel
from inference.kv_cache_infer import (chat, generate_batch_with_kv_cache, generate_with_kv_cache, main,
                                      stream_with_kv_cache)
from prompts import SFT_TEMPLATE, build_sft_prompt


@pytest.fixture()
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


@pytest.fixture()
def checkpoint(model, tiny_tokenizer, tmp_path) -> Path:
    tiny_tokenizer.save(tmp_path / "run" / "tokenizer")
    path = tmp_path / "run" / "sft.pth"
    save_checkpoint(path, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                    sft_template="Q: {instruction}\nA: {response}")
    return path


def test_greedy_text_equals_generate(model, tiny_tokenizer):
    prompt = [tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode_ordinary("ROMEO:")
    eos = tiny_tokenizer.eos_token_id
    greedy = SamplingParams(max_new_tokens=20, do_sample=False)
    out = generate(model, torch.tensor([prompt]), dataclasses.replace(greedy, eos_token_id=eos))
    expected = tiny_tokenizer.decode(cut_at_eos(out[0, len(prompt):].tolist(), eos))
    assert generate_with_kv_cache(model, tiny_tokenizer, "ROMEO:", greedy) == expected  # </s> ends it by default


def test_batch_and_stream_agree_with_single_prompts(model, tiny_tokenizer):
    prompts = ["ROMEO:", "床前明月光", "LEAR: Attend the lords"]
    params = SamplingParams(max_new_tokens=15, temperature=0.8, seed=10)
    batch = generate_batch_with_kv_cache(model, tiny_tokenizer, prompts, params, n_slots=2)
    singles = [generate_with_kv_cache(model, tiny_tokenizer, p, dataclasses.replace(params, seed=10 + i))
               for i, p in enumerate(prompts)]
    assert batch == singles
    pieces = list(stream_with_kv_cache(model, tiny_tokenizer, prompts[1], dataclasses.replace(params, seed=11)))
    assert "".join(pieces) == singles[1]


def test_chat_loop_streams_resets_and_exits_cleanly(model, tiny_tokenizer):
    def scripted(lines):
        lines = iter(lines)

        def read(_prompt: str) -> str:
            line = next(lines)
            if isinstance(line, BaseException):
                raise line
            return line
        return read

    params = SamplingParams(max_new_tokens=8, do_sample=False, eos_token_id=tiny_tokenizer.eos_token_id)
    for ending in ("/quit", EOFError(), KeyboardInterrupt()):
        written: list[str] = []
        chat(model, tiny_tokenizer, SFT_TEMPLATE, params, read=scripted(["hi", "/reset", "hi", ending]),
             write=written.append)
        before, after = "".join(written).split("(conversation reset)\n")
        if ending != "/quit":
            assert after.endswith("\n\n")  # Ctrl-C / Ctrl-D end the line they interrupted
            after = after[:-1]
        assert before.split("\n", 1)[1] == after  # after /reset the same message gets the same (greedy) reply
    expected = generate_with_kv_cache(model, tiny_tokenizer, build_sft_prompt("hi"), params)
    assert after == expected + "\n"


def test_cli_generates_and_chats(checkpoint, capsys, monkeypatch):
    assert main(["--model_path", str(checkpoint), "--prompt", "ROMEO:", "--prompt", "LEAR:", "--greedy",
                 "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and "--- ROMEO:" in out
    assert main(["--model_path", str(checkpoint), "--prompt", "ROMEO:", "--stream", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    lines = iter(["/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    assert main(["--model_path", str(checkpoint), "--interactive"]) == 0


def test_cli_speculative_decoding_prints_the_plain_greedy_text(checkpoint, capsys):
    argv = ["--model_path", str(checkpoint), "--prompt", "ROMEO: ROMEO: ROMEO:", "--greedy", "--max_new_tokens", "24"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--speculative", "3"]) == 0  # a repeated prompt: lookup drafts to check
    assert capsys.readouterr().out == plain


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    good = ["--model_path", str(checkpoint)]
    cases = [(["--model_path", str(tmp_path / "missing.pth"), "--prompt", "x"], "missing.pth"),
             (good, "--prompt"),
             ([*good, "--prompt", "x", "--interactive"], "do not combine"),
             ([*good, "--prompt", "x", "--top_p", "2"], "top_p"),
             ([*good, "--prompt", "x", "--max_new_tokens", "0"], "max_new_tokens"),
             ([*good, "--prompt", "x", "--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
             ([*good, "--prompt", "x", "--no_such_flag"], "no_such_flag")]
    for argv, fragment in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and fragment in err and err.count("\n") == 1, (argv, err)


def test_chat_says_when_old_turns_no_longer_fit(model, tiny_tokenizer):
    from prompts import CHAT_TEMPLATE

    params = SamplingParams(max_new_tokens=8, do_sample=False, eos_token_id=tiny_tokenizer.eos_token_id)
    lines = iter(["word " * 9] * 4 + ["/quit"])  # each turn ~20 tokens of a 64-token context with 8 to generate
    written: list[str] = []
    chat(model, tiny_tokenizer, CHAT_TEMPLATE, params, read=lambda _: next(lines), write=written.append)
    notes = [w for w in written if w.startswith("(the oldest")]
    assert notes and notes[0].startswith("(the oldest 1 turn(s)")


def test_a_chat_message_over_the_bound_is_not_sent_and_the_chat_goes_on(model, tiny_tokenizer):
    """A pasted 200,000-character line gets a note instead of being rendered into every later turn."""
    params = SamplingParams(max_new_tokens=2, do_sample=False, eos_token_id=tiny_tokenizer.eos_token_id)
    lines = iter(["床" * 200_000, "hi", "/quit"])
    written: list[str] = []
    chat(model, tiny_tokenizer, SFT_TEMPLATE, params, read=lambda _: next(lines), write=written.append,
         max_message_chars=1000)
    notes = [w for w in written if w.startswith("(a message of 200,000 characters is over --max_message_chars 1000")]
    assert len(notes) == 1
    assert written[written.index(notes[0]) + 1:]  # "hi" was answered after the note
