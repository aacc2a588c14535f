"""What the server writes on the wire: error bodies (OpenAI style, for every route) and `APIError`, readable
validation messages, Server-Sent Events (`sse`, `EventStream`), and the OpenAI-format bodies and streaming chunks
of `/v1/completions` and `/v1/chat/completions` (`OpenAIReply`)."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

DONE = b"data: [DONE]\n\n"


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
    """One Server-Sent Event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish reason: length, else stop (a stop string or </s>)."""
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class OpenAIReply:
    """One OpenAI-format answer (a completion or a chat completion): its id, time and model, its body or chunks."""

    model: str
    chat: bool
    id: str
    created: int

    @classmethod
    def new(cls, model: str, chat: bool) -> OpenAIReply:
        return cls(model, chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def body(self, text: str, finish: str, usage: dict) -> dict:
        """The whole answer (not streamed)."""
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}

    def chunk(self, delta: str | None, finish: str | None, role: bool = False) -> bytes:
        """One streamed piece (or the finish, or, for chat, the opening role chunk)."""
        if self.chat:
            payload = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": payload, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return sse(self._envelope(choices=[choice]))

    def usage_chunk(self, usage: dict) -> bytes:
        """The closing chunk of `stream_options: {"include_usage": true}`."""
        return sse(self._envelope(choices=[], usage=usage))

    def _envelope(self, **rest: Any) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, **rest}
