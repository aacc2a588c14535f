"""What the server writes on the wire: error bodies (OpenAI style, for every route) and `APIError`, readable
validation messages, Server-Sent Events (`sse`, `EventStream`), and the OpenAI-format bodies and streaming chunks
of `/v1/completions` and `/v1/chat/completions` (`OpenAIReply`, tool calls included); and the one place tools and
tool messages enter a chat prompt (`render_tools_prompt`)."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from inference.tool_calls import ToolUse, json_call_text

DONE = b"data: [DONE]\n\n"
LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}  # Unicode line ends JSON does not escape
TOOLS_INTRO = ("You can call the functions below. To call one, answer with only a JSON object "
               '{"name": <its name>, "arguments": <an object matching its parameters>}.')


class APIError(HTTPException):
    """An HTTP error with an OpenAI-style body; extra headers (Retry-After, WWW-Authenticate) allowed."""


def error_body(status: int, message: str) -> dict:
    """`{"error": {message, type, code}, "detail": message}`: OpenAI's shape, FastAPI's `detail` too."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": status}, "detail": message}


def validation_message(errors: Sequence[dict]) -> str:
    """pydantic's errors in one line: `field: problem; ...` (malformed JSON named as such)."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        message = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            message = f"malformed JSON ({e.get('ctx', {}).get('error', 'decode error')})"
            where = "body"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def sse(obj: Any) -> bytes:
    """One Server-Sent Event carrying `obj` as JSON, on one line for every client: U+0085, U+2028 and U+2029, which
    readers splitting like str.splitlines() (httpx's aiter_lines) take for line ends, go out as JSON escapes
    (json.dumps leaves them raw with ensure_ascii=False; they occur only inside strings)."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(LINE_BREAKS)}\n\n".encode()


def error_event(status: int, message: str) -> bytes:
    """An error in the middle of a stream (the status line has already gone out)."""
    return sse({"error": error_body(status, message)["error"]})


class EventStream(StreamingResponse):
    """Server-Sent Events; however the response ends (done, client gone, shutdown), `on_close` runs."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def usage(prompt_tokens: int, completion_tokens: int, dropped_turns: int | None = None) -> dict:
    """OpenAI's usage; a chat's also says how many of its oldest turns were dropped to fit the context."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    return out if dropped_turns is None else {**out, "dropped_turns": dropped_turns}


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as OpenAI's logprobs show it: its text (a partial UTF-8 character as U+FFFD) and its bytes."""
    raw = tokenizer.decode_bytes([token_id], skip_special_tokens=False)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, entries: Sequence[tuple[int, float, tuple]]) -> dict:
    """choices[].logprobs of a chat completion: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    def item(token_id: int, logprob: float) -> dict:
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]}


def completion_logprobs(tokenizer, entries: Sequence[tuple[int, float, tuple]], offset: int = 0) -> dict:
    """choices[].logprobs of a text completion: tokens, token_logprobs, top_logprobs and text_offset."""
    texts = [token_text(tokenizer, t)[0] for t, _, _ in entries]
    offsets = [offset + sum(map(len, texts[:i])) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries], "text_offset": offsets,
            "top_logprobs": [{token_text(tokenizer, i)[0]: v for i, v in top} for _, _, top in entries]}


def finish_reason(reason: str | None, called: bool = False) -> str:
    """OpenAI's finish reason: length, else tool_calls (an answer that is a tool call), else stop (a stop string or
    </s>)."""
    return "length" if reason == "length" else "tool_calls" if called else "stop"


def render_tools_prompt(messages: Sequence, tools: Sequence | None) -> list[dict]:
    """A chat request's messages (schemas.ChatMessage) as the {"role", "content"} turns prompts.render_prompt reads:
    the tool definitions as text at the end of the system message (one is added when there is none), an assistant's
    tool calls as the JSON text a call is written as (tool_calls.json_call_text), and a tool's result as a user turn
    naming its call. The one place tools reach the prompt: a model trained with tool tokens is served by
    rendering them here instead."""
    called = {c.id: c.function.name for m in messages for c in m.tool_calls or []}
    turns = []
    for m in messages:
        if m.role == "tool":
            name = called.get(m.tool_call_id, "a tool")
            turns.append({"role": "user", "content": f"Result of {name} (call {m.tool_call_id}):\n{m.content}"})
        elif m.tool_calls:
            calls = [json_call_text(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls]
            turns.append({"role": "assistant", "content": "\n".join([m.content, *calls] if m.content else calls)})
        else:
            turns.append({"role": m.role, "content": m.content})
    if tools:
        listing = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                        "parameters": t.function.parameters}, ensure_ascii=False,
                                       separators=(",", ":")) for t in tools)
        text = f"{TOOLS_INTRO}\n{listing}"
        if turns and turns[0]["role"] in ("system", "developer"):
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{text}"}
        else:
            turns.insert(0, {"role": "system", "content": text})
    return turns


@dataclass(frozen=True)
class OpenAIReply:
    """One OpenAI-format answer (a completion or a chat completion): its id, time and model, its body or chunks."""

    model: str
    chat: bool
    id: str
    created: int
    tools: ToolUse | None = None  # a chat answer may be a tool call (read by tools.answer / tools.stream)

    @classmethod
    def new(cls, model: str, chat: bool, tools: ToolUse | None = None) -> OpenAIReply:
        return cls(model, chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), tools)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        """One choice of a whole answer (``reason``: the engine's finish reason); under tools, a call or text."""
        content, calls = self.tools.answer(text) if self.tools is not None else (text, None)
        choice = {"index": index, "finish_reason": finish_reason(reason, calls is not None), "logprobs": logprobs}
        message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        choice.update({"message": message} if self.chat else {"text": text})
        return choice

    def body(self, choices: list[dict], usage: dict) -> dict:
        """The whole answer (not streamed)."""
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, delta: str | dict | None, finish: str | None, role: bool = False, index: int = 0,
              logprobs: dict | None = None) -> bytes:
        """One streamed piece of choice ``index``: text, a chat delta (a tool_calls one), its finish, or, for chat,
        the opening role chunk."""
        if self.chat:
            payload = {"role": "assistant", "content": ""} if role else (
                delta if isinstance(delta, dict) else {"content": delta} if delta else {})
            choice = {"index": index, "delta": payload, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
        return sse(self._envelope(choices=[choice]))

    def usage_chunk(self, usage: dict) -> bytes:
        """The closing chunk of `stream_options: {"include_usage": true}`."""
        return sse(self._envelope(choices=[], usage=usage))

    def _envelope(self, **rest: Any) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, **rest}
