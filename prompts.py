"""The one place prompts are built: ``<s>`` + text, the SFT template, a record's prompt, a training sample
(``<s> prompt response </s>`` with the prompt unscored), chat history, and the truncation policy.

    ids = encode_prompt(tok, "ROMEO:", limit=63)                       # <s> ROMEO:  (a longer text keeps its tail)
    ids = record_prompt_ids(tok, {"instruction": "计算 1 + 2 = ?"}, SFT_TEMPLATE)
    ids = render_chat(tok, [{"role": "user", "content": "你好"}], SFT_TEMPLATE, limit=63)

Every caller (the trainers' datasets, RL rollouts, the evaluator, best-of-N, the chat CLI, the server, the
benchmarks) goes through here, so a model always sees at inference exactly the prompt format it was trained on.
Truncation has one rule with two outcomes, chosen by the caller: ``"truncate"`` keeps ``<s>`` and the end of the text
(a chat drops its oldest turns first), ``"error"`` raises ``PromptTooLong`` (the server answers 422 with it).

No torch: the tokenizer is any object with ``bos_token_id``, ``eos_token_id`` and ``encode_ordinary``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

SFT_TEMPLATE = "### 指令:{instruction}\n### 响应:{response}"
IGNORE_INDEX = -100  # labels that are not scored (prompt tokens, padding), as in Hugging Face
CHAT_ROLES = ("system", "developer", "user", "assistant")
Overflow = Literal["truncate", "error"]


class PromptError(ValueError):
    """A prompt that cannot be built: a bad template or chat messages."""


class PromptTooLong(PromptError):
    """A prompt longer than the room it has (``on_overflow="error"``)."""


def record_instruction(record: Mapping) -> str:
    """The instruction text of a record; an optional "input" is appended on its own line."""
    extra = record.get("input") or ""
    return f"{record['instruction']}\n{extra}" if extra else record["instruction"]


def build_sft_prompt(instruction: str, template: str = SFT_TEMPLATE) -> str:
    """The template up to and including the response marker, e.g. "### 指令:...\\n### 响应:"."""
    if "{response}" not in template or "{instruction}" not in template:
        raise PromptError("an SFT template needs both {instruction} and {response} placeholders")
    return template.split("{response}")[0].replace("{instruction}", instruction)


def max_prompt_len(max_seq_len: int, max_new_tokens: int) -> int:
    """The longest prompt that leaves room for min(max_new_tokens, max_seq_len // 2) new tokens (at least one)."""
    return max_seq_len - max(1, min(max_new_tokens, max_seq_len // 2))


def fit(ids: list[int], limit: int | None, on_overflow: Overflow = "truncate", what: str = "prompt") -> list[int]:
    """``ids`` (starting with ``<s>``) within ``limit`` tokens: kept as they are when they fit; otherwise ``<s>`` and
    the last ``limit - 1`` tokens with a warning ("truncate"), or ``PromptTooLong`` ("error")."""
    if limit is None or len(ids) <= limit:
        return ids
    if limit < 1:
        raise PromptTooLong(f"the {what} has no room: the limit is {limit} tokens")
    if on_overflow == "error":
        raise PromptTooLong(f"the {what} has {len(ids)} tokens (with <s>); at most {limit} fit")
    warnings.warn(f"a {what} of {len(ids)} tokens was cut to its last {limit} to leave room to generate in the "
                  "model's context", stacklevel=3)
    return [ids[0]] + ids[len(ids) - limit + 1:]


def encode_prompt(tokenizer, text: str, limit: int | None = None, on_overflow: Overflow = "truncate") -> list[int]:
    """``<s> text`` as ids, within ``limit`` tokens (see ``fit``)."""
    return fit([tokenizer.bos_token_id, *tokenizer.encode_ordinary(text)], limit, on_overflow)


def record_prompt_ids(tokenizer, record: Mapping, template: str = SFT_TEMPLATE, limit: int | None = None,
                      on_overflow: Overflow = "truncate") -> list[int]:
    """``<s>`` + the SFT prompt of a record, exactly as the model saw prompts in training."""
    return encode_prompt(tokenizer, build_sft_prompt(record_instruction(record), template), limit, on_overflow)


def encode_prompt_response(tokenizer, prompt: str, response: str,
                           max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """``<s> prompt response </s>`` ids and labels (-100 on the prompt), truncated; also whether it was truncated.

    Prompt and response are encoded separately so the prompt tokens are exactly what generation sees.
    """
    prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode_ordinary(prompt)]
    response_ids = [*tokenizer.encode_ordinary(response), tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    return input_ids, labels, len(prompt_ids) + len(response_ids) > max_seq_len


# ----------------------------------------------------------------------------- chat

def _message(message) -> tuple[str, str]:
    """(role, content) of a ``{"role", "content"}`` mapping or an object with those attributes."""
    role = message.get("role") if isinstance(message, Mapping) else getattr(message, "role", None)
    content = message.get("content") if isinstance(message, Mapping) else getattr(message, "content", None)
    if role not in CHAT_ROLES:
        raise PromptError(f"unknown chat role {role!r}: use one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise PromptError(f"a {role} message's content must be a string, got {type(content).__name__}")
    return role, content


def chat_turns(messages: Sequence) -> tuple[str, list[tuple[str, str]], str]:
    """(system text, past (user, assistant) turns, the new user message) of a conversation ending with a user turn.

    System (and developer) messages are joined; consecutive user messages are joined by a newline; an assistant
    message closes the turn of the user message before it."""
    system, turns, user = [], [], None
    for role, content in map(_message, messages):
        if role in ("system", "developer"):
            system.append(content)
        elif role == "user":
            user = content if user is None else f"{user}\n{content}"
        elif user is not None:
            turns.append((user, content))
            user = None
    if user is None:
        raise PromptError("a conversation to answer must end with a user message")
    return "\n".join(system), turns, user


def render_chat(tokenizer, messages: Sequence, template: str = SFT_TEMPLATE, limit: int | None = None,
                on_overflow: Overflow = "truncate") -> list[int]:
    """A conversation as the SFT model reads it: ``<s> prompt(user) reply </s>`` per past turn (as SFT samples are
    written), then ``<s> prompt(new user message)``; the system text opens the first user message kept.

    Too long for ``limit``: "truncate" drops the oldest turns (then keeps the tail of what is left), "error" raises
    ``PromptTooLong``."""
    system, turns, user = chat_turns(messages)

    def with_system(text: str, first: bool) -> str:
        return f"{system}\n{text}" if system and first else text

    while True:
        rendered = [[tokenizer.bos_token_id,
                     *tokenizer.encode_ordinary(build_sft_prompt(with_system(u, i == 0), template) + reply),
                     tokenizer.eos_token_id] for i, (u, reply) in enumerate(turns)]
        current = encode_prompt(tokenizer, build_sft_prompt(with_system(user, not turns), template))
        ids = [t for turn in rendered for t in turn] + current
        if limit is None or len(ids) <= limit or not turns or on_overflow == "error":
            return fit(ids, limit, on_overflow, what="conversation")
        turns = turns[1:]
