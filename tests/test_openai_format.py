"""inference.openai_format: OpenAI's error body, usage, finish reasons, Server-Sent Events and logprobs shapes."""
from __future__ import annotations

import json

import pytest

from inference.openai_format import (completion_logprobs, error_body, error_event, finish_reason, sse, token_text,
                                     usage, validation_message)


def test_error_body_has_openais_type_for_each_status_and_fastapis_detail():
    kinds = {status: error_body(status, "m")["error"]["type"] for status in (400, 401, 404, 422, 429, 500, 503)}
    assert kinds == {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
    assert error_body(422, "bad")["detail"] == "bad" and error_body(422, "bad")["error"]["code"] == 422


def test_validation_errors_are_one_line_naming_each_field():
    errors = [{"loc": ("body", "max_tokens"), "msg": "must be >= 1"}, {"loc": ("body", "messages", 0, "role"),
                                                                      "msg": "bad role"},
              {"type": "json_invalid", "loc": ("body", 3), "ctx": {"error": "Expecting value"}}]
    assert validation_message(errors) == ("max_tokens: must be >= 1; messages.0.role: bad role; "
                                          "body: malformed JSON (Expecting value)")


def test_sse_frames_are_data_lines_of_json_and_an_error_event_carries_the_error():
    frame = sse({"text": "静"})
    assert frame.endswith(b"\n\n") and json.loads(frame.decode()[len("data: "):]) == {"text": "静"}
    assert json.loads(error_event(504, "timeout").decode()[6:]) == {"error": error_body(504, "timeout")["error"]}


@pytest.mark.parametrize("text", ["next\x85line", "a\u2028b", "a\u2029b", "静\u2028", "\x1c\x1d\x1e\x0b\x0c", "\r\n\r"])
def test_an_event_is_one_line_for_every_line_reader_whatever_its_text(text):
    """httpx's aiter_lines, and any reader using str.splitlines(), split at more line ends than the CR / LF of the
    SSE format: an event must not hold any of them raw."""
    frames = (sse({"text": text}) + sse({"finish_reason": "stop"})).decode()
    events = [json.loads(line[len("data: "):]) for line in frames.splitlines() if line]
    assert events == [{"text": text}, {"finish_reason": "stop"}]


def test_usage_and_finish_reason():
    assert usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert usage(3, 4, dropped_turns=2)["dropped_turns"] == 2
    assert [finish_reason(r) for r in ("length", "eos", "stop", None)] == ["length", "stop", "stop", "stop"]


def test_completion_logprobs_offsets_follow_the_token_texts(tiny_tokenizer):
    ids = tiny_tokenizer.encode_ordinary("ROMEO: hello")
    entries = [(t, -0.5 * i, ((t, -0.1),)) for i, t in enumerate(ids)]
    out = completion_logprobs(tiny_tokenizer, entries, offset=10)
    assert "".join(out["tokens"]) == "ROMEO: hello"
    assert out["text_offset"] == [10 + len("".join(out["tokens"][:i])) for i in range(len(ids))]
    assert out["token_logprobs"] == [-0.5 * i for i in range(len(ids))]
    assert bytes(sum((token_text(tiny_tokenizer, t)[1] for t in ids), [])) == "ROMEO: hello".encode()
