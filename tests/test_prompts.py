"""prompts: the SFT template, <s> + text, a record's prompt, training samples, chat rendering and the one truncation
policy, checked token by token against hand-built expectations."""
from __future__ import annotations

import warnings

import pytest

from prompts import (IGNORE_INDEX, SFT_TEMPLATE, PromptError, PromptTooLong, build_sft_prompt, chat_turns,
                     encode_prompt, encode_prompt_response, fit, max_prompt_len, record_instruction, record_prompt_ids,
                     render_chat)


def test_build_sft_prompt_is_the_template_prefix():
    prompt = build_sft_prompt("写一首诗 {x}")
    assert prompt == "### 指令:写一首诗 {x}\n### 响应:"
    assert SFT_TEMPLATE.format(instruction="写一首诗 {x}", response="好").startswith(prompt)
    with pytest.raises(PromptError, match="placeholders"):
        build_sft_prompt("x", template="no placeholders")


def test_record_prompt_is_bos_plus_the_templated_instruction_and_input(tiny_tokenizer):
    tok = tiny_tokenizer
    record = {"instruction": "Greet", "input": "Bob", "response": "Hi"}
    assert record_instruction(record) == "Greet\nBob"
    assert record_prompt_ids(tok, record, "Q: {instruction}\nA: {response}") == \
        [tok.bos_token_id, *tok.encode_ordinary("Q: Greet\nBob\nA: ")]


def test_fit_keeps_bos_and_the_tail_or_raises():
    ids = [0, 10, 11, 12, 13, 14]
    assert fit(ids, None) == ids and fit(ids, 6) == ids
    with pytest.warns(UserWarning, match="cut to its last 4"):
        assert fit(ids, 4) == [0, 12, 13, 14]
    with pytest.raises(PromptTooLong, match="has 6 tokens .* at most 4 fit"):
        fit(ids, 4, on_overflow="error")
    with pytest.raises(PromptTooLong, match="no room"):
        fit(ids, 0)


def test_encode_prompt_and_its_room(tiny_tokenizer):
    tok = tiny_tokenizer
    assert encode_prompt(tok, "ROMEO:") == [tok.bos_token_id, *tok.encode_ordinary("ROMEO:")]
    assert max_prompt_len(64, 16) == 48 and max_prompt_len(64, 500) == 32 and max_prompt_len(2, 1) == 1
    long = " ".join(["word"] * 80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = encode_prompt(tok, long, limit=10)
    assert len(cut) == 10 and cut[0] == tok.bos_token_id and cut[1:] == encode_prompt(tok, long)[-9:]


def test_training_sample_masks_the_prompt_and_ends_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels, truncated = encode_prompt_response(tok, "Q: hi\nA: ", "hello", 64)
    prompt = [tok.bos_token_id, *tok.encode_ordinary("Q: hi\nA: ")]
    answer = [*tok.encode_ordinary("hello"), tok.eos_token_id]
    assert ids == prompt + answer and labels == [IGNORE_INDEX] * len(prompt) + answer and not truncated
    ids, labels, truncated = encode_prompt_response(tok, "Q: hi\nA: ", "hello", len(prompt) + 1)
    assert truncated and ids == prompt + answer[:1] and labels[-1] == answer[0]


def test_chat_turns_join_system_and_consecutive_user_messages():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "developer", "content": "No rhymes."},
                {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert chat_turns(messages) == ("Be brief.\nNo rhymes.", [("hi", "hello")], "a\nb")
    for bad, message in [([{"role": "tool", "content": "x"}], "unknown chat role 'tool'"),
                         ([{"role": "user", "content": 3}], "content must be a string"),
                         ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "end with a user")]:
        with pytest.raises(PromptError, match=message):
            chat_turns(bad)


def test_render_chat_writes_past_turns_as_sft_samples_with_the_system_text_first(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and you?"}]
    first = [tok.bos_token_id, *tok.encode_ordinary(build_sft_prompt("S\nhi") + "hello"), tok.eos_token_id]
    current = [tok.bos_token_id, *tok.encode_ordinary(build_sft_prompt("and you?"))]
    ids = render_chat(tok, messages, SFT_TEMPLATE)
    assert ids == first + current
    # one token short: the oldest turn goes, and the system text moves to the first turn kept
    assert render_chat(tok, messages, SFT_TEMPLATE, limit=len(ids) - 1) == \
        [tok.bos_token_id, *tok.encode_ordinary(build_sft_prompt("S\nand you?"))]
    with pytest.raises(PromptTooLong, match="conversation has"):
        render_chat(tok, messages, SFT_TEMPLATE, limit=len(ids) - 1, on_overflow="error")
    objects = [type("Message", (), m)() for m in messages]  # pydantic-style objects render the same
    assert render_chat(tok, objects, SFT_TEMPLATE) == ids
