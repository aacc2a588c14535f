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

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from loss_labels import IGNORE_INDEX

SFT_TEMPLATE = "### 指令:{instruction}\n### 响应:{response}"  # the format of models trained before role tokens
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"  # closes a system or user message (an assistant message ends with </s>)
TOOL_CALL, TOOL_CALL_END = "<|tool_call|>", "<|/tool_call|>"  # the model writes a call between these
TOOL_RESULT, TOOL_RESULT_END = "<|tool_result|>", "<|/tool_result|>"  # the result, forced in: never scored
TOOL_TOKENS = (TOOL_CALL, TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END)
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN, *TOOL_TOKENS)  # the tokenizer reserves these as special tokens
CALCULATOR = "calculator"  # the built-in tool: {"expression": "42+8"}, written in a call as the expression alone
CALL_WITH_NAME = re.compile(r"([A-Za-z_][\w.-]*) (\{.*\})", re.DOTALL)  # another tool's call: name {json arguments}
CHAT_TEMPLATE_NO_TOOLS = (  # the chat format of models trained before tool calls (their checkpoints store it)
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ '<|' + role + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
_JINJA_CALL = (  # one tool call's text: a calculator call is its expression, another tool's is `name {arguments}`
    "{% set f = call['function'] %}{% set a = f['arguments'] %}{{ '<|tool_call|>' }}"
    "{% if f['name'] == 'calculator' %}{{ a.split('\"expression\"', 1)[1].split(':', 1)[1].strip()[1:].split('\"')[0] "
    "if a is string else a['expression'] }}"
    "{% else %}{{ f['name'] + ' ' + (a if a is string else a | tojson) }}{% endif %}{{ '<|/tool_call|>' }}")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(previous='') %}{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role == 'assistant' %}{% if ns.previous != 'tool' %}{{ '<|assistant|>' }}{% endif %}"
    "{{ message['content'] or '' }}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}" + _JINJA_CALL + "{% endfor %}"
    "{% else %}{{ eos_token }}{% endif %}"
    "{% elif role == 'tool' %}{{ '<|tool_result|>' + message['content'] + '<|/tool_result|>' }}"
    "{% else %}{{ '<|' + role + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% set ns.previous = role %}{% endfor %}"
    "{% if add_generation_prompt and ns.previous != 'tool' %}{{ '<|assistant|>' }}{% endif %}")
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
    """Whether ``template`` is the role-token chat format, with or without tool calls (else the older
    instruction/response template)."""
    return template in (CHAT_TEMPLATE, CHAT_TEMPLATE_NO_TOOLS)


def knows_tools(template: str) -> bool:
    """Whether a model trained with ``template`` reads and writes tool calls (the built-in calculator is then on)."""
    return template == CHAT_TEMPLATE


def has_chat_tokens(tokenizer, template: str = CHAT_TEMPLATE) -> bool:
    """Whether the tokenizer holds every special token of ``template``'s chat format (a tokenizer trained before
    them does not: SFT appends them, ``ByteLevelBPETokenizer.with_special_tokens``)."""
    needed = CHAT_TOKENS if knows_tools(template) else CHAT_TOKENS[:len(ROLE_TOKENS) + 1]
    specials = set(getattr(tokenizer, "special_tokens", ()))
    return all(token in specials for token in needed)


def check_template(template: str, tokenizer=None) -> None:
    """A template this module can render: a chat template (with a tokenizer that has its tokens) or a template with
    {instruction} and {response}."""
    if is_chat_template(template):
        if tokenizer is not None and not has_chat_tokens(tokenizer, template):
            raise PromptError(f"the chat format needs the special tokens {', '.join(CHAT_TOKENS)}, which this "
                              "tokenizer lacks: add them (ByteLevelBPETokenizer.with_special_tokens) or retrain it")
    elif "{response}" not in template or "{instruction}" not in template:
        raise PromptError("a template is prompts.CHAT_TEMPLATE or holds {instruction} and {response} placeholders")


def _field(message, name: str):
    return message.get(name) if isinstance(message, Mapping) else getattr(message, name, None)


def _message(message) -> dict:
    """A message as a dict: role, content (a string; "" for an assistant message of tool calls alone), and its
    ``tool_calls`` (OpenAI's), ``tool_call_id`` and ``weight`` (0: not trained on) when it has them."""
    role, content, calls = _field(message, "role"), _field(message, "content"), _field(message, "tool_calls")
    if role not in CHAT_ROLES:
        raise PromptError(f"unknown chat role {role!r}: use one of {', '.join(CHAT_ROLES)}")
    if content is None and role == "assistant" and calls:
        content = ""
    if not isinstance(content, str):
        raise PromptError(f"a {role} message's content must be a string, got {type(content).__name__}")
    out = {"role": role, "content": content}
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise PromptError("tool_calls must be a list, on an assistant message")
        out["tool_calls"] = [_plain_call(call) for call in calls]
    for name in ("tool_call_id", "weight"):
        if _field(message, name) is not None:
            out[name] = _field(message, name)
    if out.get("weight", 1) not in (0, 1):
        raise PromptError(f"a message's weight is 0 (not trained on) or 1, got {out['weight']!r}")
    return out


def _plain_call(call) -> dict:
    """One OpenAI tool call as plain dicts: {"id", "type": "function", "function": {"name", "arguments"}}."""
    function = _field(call, "function")
    name, arguments = _field(function, "name"), _field(function, "arguments")
    if not isinstance(name, str) or not isinstance(arguments, (str, Mapping)):
        raise PromptError('a tool call is {"type": "function", "function": {"name": str, "arguments": str}}')
    plain = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": _field(call, "id"), **plain} if _field(call, "id") is not None else plain


def call_text(call: Mapping) -> str:
    """What the model writes between <|tool_call|> and <|/tool_call|> for an OpenAI tool call: a calculator call's
    expression ("42+8"), or ``name {arguments}`` for another tool."""
    name, arguments = call["function"]["name"], call["function"]["arguments"]
    if name != CALCULATOR:
        return f"{name} {arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}"
    if isinstance(arguments, str):  # the exported Jinja template reads the string as it is: keep to what it can
        if "\\" in arguments:
            raise PromptError("a calculator call's arguments hold no escapes: {\"expression\": \"42+8\"}")
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise PromptError(f"a tool call's arguments must be JSON, got {arguments!r}") from None
    if not isinstance(arguments, Mapping) or set(arguments) != {"expression"} \
            or not isinstance(arguments["expression"], str) or '"' in arguments["expression"]:
        raise PromptError('a calculator call\'s arguments are {"expression": "<arithmetic>"}')
    return arguments["expression"]


def parse_call(text: str) -> tuple[str, dict]:
    """(tool name, arguments) of the text of a call as the model wrote it (``call_text``'s inverse)."""
    match = CALL_WITH_NAME.fullmatch(text.strip())
    if match:
        try:
            return match.group(1), json.loads(match.group(2))
        except json.JSONDecodeError:
            pass
    return CALCULATOR, {"expression": text}


def final_answer(text: str) -> str:
    """The answer in an assistant reply written with its tool calls (``<|tool_call|>42+8<|/tool_call|><|tool_result|>
    50<|/tool_result|>50``): the text after the last result ("50"); the whole text when no tool was called."""
    return text.rsplit(TOOL_RESULT_END, 1)[-1]


def check_conversation(messages, need_assistant: bool = True) -> None:
    """A conversation a training or test file may hold: a non-empty list of messages with known roles and string
    content, at most one system message (first), tool results right after the calls they answer, and
    (``need_assistant``) at least one assistant message."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    plain = [_message(m) for m in messages]
    roles = [m["role"] for m in plain]
    systems = [i for i, role in enumerate(roles) if role in ("system", "developer")]
    if len(systems) > 1 or systems not in ([], [0]):
        raise PromptError("a conversation has at most one system message, and it comes first")
    _check_tool_order(plain)
    if need_assistant and "assistant" not in roles:
        raise PromptError("a conversation needs at least one assistant message to learn from")


def _check_tool_order(messages: Sequence[dict]) -> None:
    """Each tool call is answered by a tool message right after it, and a tool message answers a call."""
    waiting = 0  # calls not yet answered
    for message in messages:
        if message["role"] == "tool":
            if not waiting:
                raise PromptError("a tool message must follow the assistant message whose tool call it answers")
            waiting -= 1
        elif waiting:
            raise PromptError("an assistant message's tool calls must each be answered by a tool message next")
        waiting += len(message.get("tool_calls", ()))


def record_messages(record: Mapping) -> list[dict]:
    """A record as a conversation: its "messages", or its instruction (+ input) as a user turn and its response (when
    it has one) as the assistant's."""
    if "messages" in record:
        return [_message(m) for m in record["messages"]]
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
    messages = [_message(m) for m in messages]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def _turns(messages: Sequence) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, turns): a turn is a user message and everything up to the next user message."""
    plain = [_message(m) for m in messages]
    _check_tool_order(plain)
    head = []
    while plain and plain[0]["role"] in ("system", "developer"):
        head.append(plain.pop(0))
    turns: list[list[dict]] = []
    for message in plain:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return head, turns


def _role_blocks(tokenizer, messages: Sequence[dict], tools: bool) -> list[tuple[list[int], list[int]]]:
    """The chat format: per message, (ids, labels). An assistant message is scored on its text, its tool calls and
    its </s> (none after calls: the results follow); a tool result is never scored."""
    ids_of = tokenizer.special_token_id
    blocks, previous = [], ""
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        if not tools and (role == "tool" or "tool_calls" in message):
            raise PromptError("this model's chat format has no tool calls (it was trained before them)")
        if role == "assistant":
            ids = [ids_of(ROLE_TOKENS[role])] if previous != "tool" else []
            ids += _reply_ids(tokenizer, message["content"], tools)
            for call in message.get("tool_calls", ()):
                ids += [ids_of(TOOL_CALL), *tokenizer.encode_ordinary(call_text(call)), ids_of(TOOL_CALL_END)]
            ids += [] if message.get("tool_calls") else [tokenizer.eos_token_id]
            blocks.append((ids, _reply_labels(tokenizer, ids, previous != "tool", message.get("weight", 1))))
        elif role == "tool":
            ids = [ids_of(TOOL_RESULT), *tokenizer.encode_ordinary(message["content"]), ids_of(TOOL_RESULT_END)]
            blocks.append((ids, [IGNORE_INDEX] * len(ids)))
        else:
            ids = [ids_of(ROLE_TOKENS[role]), *tokenizer.encode_ordinary(message["content"]), ids_of(END_TOKEN)]
            blocks.append((ids, [IGNORE_INDEX] * len(ids)))
        previous = role
    return blocks


def _reply_ids(tokenizer, text: str, tools: bool) -> list[int]:
    """An assistant message's text; with tools, a trace written out in it (as the engine streams one,
    ``<|tool_call|>42+8<|/tool_call|><|tool_result|>50<|/tool_result|>50``) is read as its tool tokens, as
    transformers' tokenizer reads it from the exported template."""
    if not tools:
        return tokenizer.encode_ordinary(text)
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, TOOL_TOKENS)) + ")", text):
        ids += [tokenizer.special_token_id(part)] if part in TOOL_TOKENS else tokenizer.encode_ordinary(part)
    return ids


def _reply_labels(tokenizer, ids: list[int], opened: bool, weight: int) -> list[int]:
    """An assistant message's labels: its ids but the <|assistant|> opening it and every tool result span."""
    labels, in_result = [], False
    result, result_end = tokenizer.special_token_id(TOOL_RESULT), tokenizer.special_token_id(TOOL_RESULT_END)
    for n, token in enumerate(ids):
        in_result = in_result or token == result
        labels.append(IGNORE_INDEX if in_result or (opened and n == 0) or not weight else token)
        in_result = in_result and token != result_end
    return labels


def _template_blocks(tokenizer, head, turns, template: str) -> list[tuple[list[int], list[int]]]:
    """The older format: per turn ``<s> prompt(user) reply </s>`` (scored on reply and </s>); the system text opens
    the first user message; messages of one role in a row are joined by a newline."""
    if any(m["role"] == "tool" or "tool_calls" in m for turn in turns for m in turn):
        raise PromptError("tool calls need the chat format (prompts.CHAT_TEMPLATE); this model has an older template")
    system = "\n".join(m["content"] for m in head)
    blocks = []
    for n, turn in enumerate(turns):
        users = "\n".join(m["content"] for m in turn if m["role"] in ("user", "system", "developer"))
        user = f"{system}\n{users}" if system and n == 0 else users
        prompt = [tokenizer.bos_token_id, *tokenizer.encode_ordinary(build_sft_prompt(user, template))]
        blocks.append((prompt, [IGNORE_INDEX] * len(prompt)))
        replies = [m["content"] for m in turn if m["role"] == "assistant"]
        if replies:
            reply = [*tokenizer.encode_ordinary("\n".join(replies)), tokenizer.eos_token_id]
            blocks.append((reply, reply))
    return blocks


def _render(tokenizer, head, turns, template: str, generation_prompt: bool) -> tuple[list[int], list[int]]:
    if is_chat_template(template):
        blocks = _role_blocks(tokenizer, [*head, *(m for turn in turns for m in turn)], knows_tools(template))
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
        continues = turns and turns[-1][-1]["role"] == "tool"  # the model goes on after a tool's result
        cue = [tokenizer.special_token_id(ROLE_TOKENS["assistant"])] if generation_prompt and not continues else []
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
    if not turns or turns[-1][-1]["role"] == "assistant":
        raise PromptError("a conversation to answer must end with a user message (or a tool's result)")
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

