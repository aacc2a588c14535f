"""The one place prompts are built: ``<s>`` + text, the chat format with role tokens and the older SFT template, a
record's prompt, training samples (ids + a loss mask on the assistant turns), and the truncation policy.

    ids = encode_prompt(tok, "ROMEO:", limit=63)                       # <s> ROMEO:  (a longer text keeps its tail)
    ids = record_prompt_ids(tok, {"instruction": "计算 1 + 2 = ?"}, CHAT_TEMPLATE)
    prompt = render_prompt(tok, [{"role": "user", "content": "你好"}], CHAT_TEMPLATE, limit=63)  # .ids .dropped_turns
    sample = render_sample(tok, conversation, CHAT_TEMPLATE, max_seq_len=256)   # .input_ids, .labels (or None)

The chat format (``CHAT_TEMPLATE``, a Jinja template as ``transformers``' ``apply_chat_template`` reads it):
``<s><|system|>S<|end|><|user|>U<|end|><|assistant|>A</s><|user|>...<|assistant|>``. An assistant turn ends with
``</s>``, so every caller stops generating at the one end-of-sequence id; its text and that ``</s>`` are the only
scored tokens. Message text is encoded as plain text, so a user who types ``<|assistant|>`` cannot forge a turn.
Models trained before it keep their template (``### 指令:{instruction}\n### 响应:{response}``): each turn is then
``<s> prompt reply </s>``, as its SFT samples were written.

Every caller (the trainers' datasets, RL rollouts, the evaluator, best-of-N, the chat CLI, the server, the
benchmarks) goes through here, so a model always sees at inference exactly the prompt format it was trained on.
Truncation has one rule with two outcomes, chosen by the caller: a conversation first loses its oldest turns (the
system message stays); then ``"truncate"`` keeps ``<s>`` and the end of the text, ``"error"`` raises
``PromptTooLong`` (the server answers 422 with it).

No torch: the tokenizer is any object with ``bos_token_id``, ``eos_token_id`` and ``encode_ordinary``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from loss_labels import IGNORE_INDEX

SFT_TEMPLATE = "### 指令:{instruction}\n### 响应:{response}"  # the format of models trained before role tokens
CHAT_ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"  # closes a system or user message (an assistant message ends with </s>)
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)  # the tokenizer reserves these as special tokens
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ '<|' + role + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
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
    """The longest prompt that leaves room for min(max_new_tokens, max_seq_len // 4) new tokens (at least one): a
    chat keeps three quarters of the context for its history (half dropped a two-turn sum on the 64-token model)."""
    return max_seq_len - max(1, min(max_new_tokens, max_seq_len // 4))


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


def document_ids(tokenizer, ids: Sequence[int]) -> list[int]:
    """``<s> ids </s>``: a whole document, as pretraining packs it, its evaluation scores it and a classifier reads it
    (the final ``</s>``)."""
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def encode_prompt(tokenizer, text: str, limit: int | None = None, on_overflow: Overflow = "truncate") -> list[int]:
    """``<s> text`` as ids, within ``limit`` tokens (see ``fit``)."""
    return fit([tokenizer.bos_token_id, *tokenizer.encode_ordinary(text)], limit, on_overflow)


def record_prompt_ids(tokenizer, record: Mapping, template: str, limit: int | None = None,
                      on_overflow: Overflow = "truncate") -> list[int]:
    """A record's prompt (its conversation up to the answer) as ids, exactly as the model saw prompts in training
    (no default template: the caller passes its model's, as every function here does)."""
    prompt, _ = split_reference(record_messages(record))
    return render_prompt(tokenizer, prompt, template, limit, on_overflow).ids


def prompt_response_ids(tokenizer, prompt_ids: Sequence[int], response: str, max_seq_len: int) -> Sample:
    """The training sample of ``prompt_ids`` (a rendered prompt) + ``response </s>``: labels -100 on the prompt, cut
    to ``max_seq_len`` (``.truncated``). In either format this is ``render_sample``'s sample of that last turn."""
    response_ids = [*tokenizer.encode_ordinary(response), tokenizer.eos_token_id]
    return _cut(list(prompt_ids) + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, max_seq_len)


# ----------------------------------------------------------------------------- chat

@dataclass
class Rendered:
    """A prompt to generate from: its ids, and how many of the oldest turns were dropped to fit."""
    ids: list[int]
    dropped_turns: int = 0


@dataclass
class Sample:
    """A training conversation: ids, labels (-100 except assistant text and its </s>), what was cut to fit."""
    input_ids: list[int]
    labels: list[int]
    dropped_turns: int = 0
    truncated: bool = False


def is_chat_template(template: str) -> bool:
    """Whether ``template`` is the role-token chat format (else the older instruction/response template)."""
    return template == CHAT_TEMPLATE


def has_chat_tokens(tokenizer) -> bool:
    """Whether the tokenizer holds every chat special token (a tokenizer trained before them does not)."""
    specials = set(getattr(tokenizer, "special_tokens", ()))
    return all(token in specials for token in CHAT_TOKENS)


def check_template(template: str, tokenizer=None) -> None:
    """A template this module can render: CHAT_TEMPLATE (with a tokenizer that has its tokens) or a template with
    {instruction} and {response}."""
    if is_chat_template(template):
        if tokenizer is not None and not has_chat_tokens(tokenizer):
            raise PromptError(f"the chat format needs the special tokens {', '.join(CHAT_TOKENS)}, which this "
                              "tokenizer lacks: add them (ByteLevelBPETokenizer.with_special_tokens) or retrain it")
    elif "{response}" not in template or "{instruction}" not in template:
        raise PromptError("a template is prompts.CHAT_TEMPLATE or holds {instruction} and {response} placeholders")


def _message(message) -> tuple[str, str]:
    """(role, content) of a ``{"role", "content"}`` mapping or an object with those attributes."""
    role = message.get("role") if isinstance(message, Mapping) else getattr(message, "role", None)
    content = message.get("content") if isinstance(message, Mapping) else getattr(message, "content", None)
    if role not in CHAT_ROLES:
        raise PromptError(f"unknown chat role {role!r}: use one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise PromptError(f"a {role} message's content must be a string, got {type(content).__name__}")
    return role, content


def check_conversation(messages, need_assistant: bool = True) -> None:
    """A conversation a training or test file may hold: a non-empty list of messages with known roles and string
    content, at most one system message (first), and (``need_assistant``) at least one assistant message."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    roles = [_message(m)[0] for m in messages]
    systems = [i for i, role in enumerate(roles) if role in ("system", "developer")]
    if len(systems) > 1 or systems not in ([], [0]):
        raise PromptError("a conversation has at most one system message, and it comes first")
    if need_assistant and "assistant" not in roles:
        raise PromptError("a conversation needs at least one assistant message to learn from")


def record_messages(record: Mapping) -> list[dict]:
    """A record as a conversation: its "messages", or its instruction (+ input) as a user turn and its response (when
    it has one) as the assistant's."""
    if "messages" in record:
        return [dict(zip(("role", "content"), _message(m))) for m in record["messages"]]
    messages = [{"role": "user", "content": record_instruction(record)}]
    if "response" in record:
        messages.append({"role": "assistant", "content": record["response"]})
    return messages


def record_reference(record: Mapping) -> str | None:
    """A record's reference answer: its "response", or its conversation's last assistant message."""
    return split_reference(record["messages"])[1] if "messages" in record else record.get("response")


def split_reference(messages: Sequence) -> tuple[list[dict], str | None]:
    """(the conversation up to its last assistant message, that message's text): a prompt and its reference answer.
    A conversation that does not end with an assistant message is all prompt (reference None)."""
    messages = [dict(zip(("role", "content"), _message(m))) for m in messages]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def _turns(messages: Sequence) -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """(leading system messages, turns): a turn is a user message and everything up to the next user message."""
    pairs = [_message(m) for m in messages]
    head = []
    while pairs and pairs[0][0] in ("system", "developer"):
        head.append(pairs.pop(0))
    turns: list[list[tuple[str, str]]] = []
    for role, content in pairs:
        if role == "user" or not turns:
            turns.append([])
        turns[-1].append((role, content))
    return head, turns


def _role_blocks(tokenizer, head, turns) -> list[tuple[list[int], list[int]]]:
    """The chat format: per message, (ids, labels); an assistant message is scored on its text and </s>."""
    ids_of = tokenizer.special_token_id
    blocks = []
    for role, content in [*head, *(m for turn in turns for m in turn)]:
        role = "system" if role == "developer" else role
        text = tokenizer.encode_ordinary(content)
        if role == "assistant":
            blocks.append(([ids_of(ROLE_TOKENS[role]), *text, tokenizer.eos_token_id],
                           [IGNORE_INDEX, *text, tokenizer.eos_token_id]))
        else:
            ids = [ids_of(ROLE_TOKENS[role]), *text, ids_of(END_TOKEN)]
            blocks.append((ids, [IGNORE_INDEX] * len(ids)))
    return blocks


def _template_blocks(tokenizer, head, turns, template: str) -> list[tuple[list[int], list[int]]]:
    """The older format: per turn ``<s> prompt(user) reply </s>`` (scored on reply and </s>); the system text opens
    the first user message; messages of one role in a row are joined by a newline."""
    system = "\n".join(content for _, content in head)
    blocks = []
    for n, turn in enumerate(turns):
        users = "\n".join(c for r, c in turn if r in ("user", "system", "developer"))
        user = f"{system}\n{users}" if system and n == 0 else users
        prompt = [tokenizer.bos_token_id, *tokenizer.encode_ordinary(build_sft_prompt(user, template))]
        blocks.append((prompt, [IGNORE_INDEX] * len(prompt)))
        replies = [c for r, c in turn if r == "assistant"]
        if replies:
            reply = [*tokenizer.encode_ordinary("\n".join(replies)), tokenizer.eos_token_id]
            blocks.append((reply, reply))
    return blocks


def _render(tokenizer, head, turns, template: str, generation_prompt: bool) -> tuple[list[int], list[int]]:
    if is_chat_template(template):
        blocks = _role_blocks(tokenizer, head, turns)
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
        cue = [tokenizer.special_token_id(ROLE_TOKENS["assistant"])] if generation_prompt else []
    else:
        blocks, ids, labels, cue = _template_blocks(tokenizer, head, turns, template), [], [], []
    for block_ids, block_labels in blocks:
        ids += block_ids
        labels += block_labels
    return ids + cue, labels + [IGNORE_INDEX] * len(cue)


def render_prompt(tokenizer, messages: Sequence, template: str, limit: int | None = None,
                  on_overflow: Overflow = "truncate") -> Rendered:
    """A conversation to answer next (ending with a user message) as the model was trained to read it.

    Too long for ``limit``: the oldest turns are dropped, the system message kept; if the last turn alone is still
    too long, "truncate" keeps the tail of what is left and "error" raises ``PromptTooLong``."""
    check_template(template, tokenizer)
    head, turns = _turns(messages)
    if not turns or turns[-1][-1][0] == "assistant":
        raise PromptError("a conversation to answer must end with a user message")
    dropped = 0
    while True:
        ids, _ = _render(tokenizer, head, turns, template, generation_prompt=True)
        if limit is None or len(ids) <= limit or len(turns) == 1:
            return Rendered(fit(ids, limit, on_overflow, what="conversation"), dropped)
        turns, dropped = turns[1:], dropped + 1


def render_sample(tokenizer, messages: Sequence, template: str, max_seq_len: int,
                  last_turn_only: bool = False) -> Sample | None:
    """A conversation as a training sample: loss on every assistant turn (``last_turn_only``: on the last one).

    Longer than ``max_seq_len``: the oldest turns are dropped (the system message kept); if the last turn alone is
    still too long, its end is cut. None when no assistant token would be left to learn from."""
    check_template(template, tokenizer)
    head, turns = _turns(messages)
    dropped = 0
    while turns:
        ids, labels = _render(tokenizer, head, turns, template, generation_prompt=False)
        if last_turn_only:
            start = _last_scored_run(labels)
            labels = [IGNORE_INDEX] * start + labels[start:]
        if len(ids) <= max_seq_len or len(turns) == 1:
            break
        turns, dropped = turns[1:], dropped + 1
    if not turns:
        return None
    sample = _cut(ids, labels, max_seq_len, dropped)
    return None if all(label == IGNORE_INDEX for label in sample.labels) else sample


def _cut(ids: list[int], labels: list[int], max_seq_len: int, dropped_turns: int = 0) -> Sample:
    """The one place a Sample is made: ids and labels cut to ``max_seq_len`` (``truncated`` says whether)."""
    return Sample(ids[:max_seq_len], labels[:max_seq_len], dropped_turns, len(ids) > max_seq_len)


def _last_scored_run(labels: list[int]) -> int:
    """Where the final run of scored labels (the last assistant reply) starts."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start

