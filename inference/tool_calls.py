"""OpenAI function calling for a model without tool tokens: a call is written as the JSON text
``{"name": ..., "arguments": {...}}`` (``json_call_text``); ``answer_schema`` is the JSON schema the answer is held to
(the listed tools' calls for tool_choice required or a named function, a call or the response_format for auto);
``ToolUse`` reads calls back out of generated text, whole (``answer``) or as it streams (``ToolStream``: OpenAI's
tool_call deltas, the first with the call's id and name, then the arguments' text as it comes).

How tools and tool results are shown to the model is openai_format.render_tools_prompt's business, not this module's.
"""
from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

CALL_HEAD = re.compile(r'\s*\{"name":("(?:[^"\\]|\\.)*"),"arguments":')  # the grammar writes compact JSON
DEFS = ("$defs", "definitions")


def json_call_text(name: str, arguments: Any) -> str:
    """A call as the model writes it (and as the grammar of a forced call admits it)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _rewrite_refs(node: Any, key: str) -> None:
    """Local $refs of a schema moved to root $defs[key] point where they pointed before (in place)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                pointer = ref[1:]
                inner = next((pointer[len(d) + 2:] for d in DEFS if pointer.startswith(f"/{d}/")), None)
                item["$ref"] = f"#/$defs/{key}.{inner}" if inner is not None else f"#/$defs/{key}{pointer}"
            stack.extend(v for k, v in item.items() if k != "$ref")


def hoist(schema: dict, key: str) -> tuple[dict, dict]:
    """({"$ref" to it}, the $defs entries) of a schema moved under the root's $defs[key], its own definitions
    beside it as key.NAME: several schemas (a response format, each tool's parameters) then share one root."""
    schema = copy.deepcopy(schema)
    local = {name: body for d in DEFS for name, body in (schema.pop(d, None) or {}).items()}
    defs = {key: schema, **{f"{key}.{name}": body for name, body in local.items()}}
    _rewrite_refs(defs, key)
    return {"$ref": f"#/$defs/{key}"}, defs


def answer_schema(tools: Sequence[tuple[str, dict]], choice: str | None, response: dict | None) -> dict | None:
    """The schema the answer is held to: ``tools`` are (name, parameters); ``choice`` is "none", "auto", "required"
    or a tool's name (None: no tools). A forced call (required, a name) admits only calls; auto with a response
    format admits a call or that format; otherwise the response format alone (None: free text)."""
    forced = choice not in (None, "none", "auto")
    listed = [(n, p) for n, p in tools if choice in ("required", "auto") or n == choice] if choice else []
    if not forced and (choice != "auto" or response is None):
        return response
    defs, options = {}, []
    for i, (name, parameters) in enumerate(listed):
        ref, more = hoist(parameters, f"tool{i}")
        defs.update(more)
        options.append({"type": "object", "properties": {"name": {"const": name}, "arguments": ref},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not forced:
        ref, more = hoist(response, "response")
        defs.update(more)
        options.append(ref)
    return {"$defs": defs, **({"anyOf": options} if len(options) > 1 else options[0])}


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools as its answer is read: their names, and whether a call is forced (the grammar then
    admits only calls) or merely possible (auto: an answer that parses as a call of a listed tool is one)."""

    names: tuple[str, ...]
    forced: bool

    def stream(self) -> ToolStream:
        return ToolStream(self)

    def answer(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool_calls) of a whole answer: one of them is None."""
        stream = self.stream()
        deltas = [*stream.push(text), *stream.finish()]
        return merge(deltas)

    def parse(self, text: str) -> tuple[str, str] | None:
        """(name, arguments JSON) when ``text`` is a call of a listed tool, else None."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or set(value) != {"name", "arguments"} or value["name"] not in self.names \
                or not isinstance(value["arguments"], dict):
            return None
        return value["name"], json.dumps(value["arguments"], ensure_ascii=False, separators=(",", ":"))


def merge(deltas: Sequence[dict]) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) that a list of chat deltas adds up to."""
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    if not calls:
        return "".join(d.get("content", "") for d in deltas), None
    head = calls[0]
    arguments = "".join(c["function"]["arguments"] for c in calls)
    return None, [{"id": head["id"], "type": "function", "function": {"name": head["function"]["name"],
                                                                       "arguments": arguments}}]


class ToolStream:
    """One streamed chat choice under tools: text pieces in, deltas out ({"content"} or {"tool_calls"}).

    A forced call streams as it is generated: a first delta with the call's id and name once `{"name":"...",
    "arguments":` is complete, then the arguments' text (the call's closing brace held back and dropped). Under
    auto an answer starting with "{" may be a call, so it is held until the end and then sent as a call or as text;
    any other answer streams as text."""

    def __init__(self, tools: ToolUse) -> None:
        self.tools, self.held, self.called, self.mode = tools, "", False, "call" if tools.forced else "undecided"

    def push(self, piece: str) -> list[dict]:
        self.held += piece
        if self.mode == "undecided" and self.held.strip():
            self.mode = "whole" if self.held.lstrip().startswith("{") else "text"
        if self.mode == "text":
            out, self.held = self.held, ""
            return [{"content": out}] if out else []
        return list(self._call_deltas()) if self.mode == "call" else []

    def finish(self) -> list[dict]:
        """What is left once generation ended."""
        if self.mode == "call":
            if not self.called:  # cut off before the name was complete: what there is, as text
                return [{"content": self.held}] if self.held else []
            rest = self.held.rstrip()
            rest = rest[:-1] if rest.endswith("}") else rest
            return [self._delta(rest)] if rest else []
        if self.mode == "whole" and (call := self.tools.parse(self.held)):
            self.called = True
            return [self._delta(call[1], name=call[0])]
        return [{"content": self.held}] if self.held else []

    def _call_deltas(self) -> Iterator[dict]:
        if not self.called:
            head = CALL_HEAD.match(self.held)
            if head is None:
                return
            self.called, self.held = True, self.held[head.end():]
            yield self._delta("", name=json.loads(head.group(1)))
        if len(self.held) > 1:  # the last character may be the call's closing brace
            out, self.held = self.held[:-1], self.held[-1:]
            yield self._delta(out)

    def _delta(self, arguments: str, name: str | None = None) -> dict:
        call = {"index": 0, "function": {"arguments": arguments}}
        if name is not None:
            call = {"index": 0, "id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        return {"tool_calls": [call]}
