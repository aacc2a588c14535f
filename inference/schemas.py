"""The HTTP request and response bodies (pydantic), where text enters the server: every request body is a `Body`,
which refuses unknown fields and text that is not Unicode (a JSON-escaped lone surrogate such as "\\ud800", which
UTF-8 cannot encode) with a 422 naming the field, alike on every endpoint. `/generate`'s GenerateRequest and
GenerateResponse, the OpenAI routes' CompletionRequest and ChatRequest (with ChatMessage, tool calls, tools and
tool_choice, and response_format), the stop-string check, and `build_schemas`, which makes one app's request classes
with its bounds (--max_new_tokens, --max_best_of) in them, so /docs shows the server's real limits.
"""
from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from decoding import MAX_LOGPROBS, MIN_REPETITION_PENALTY
from grammar_constraint import check_schema_limits
from readers import lone_surrogate

MAX_STOP, MAX_STOP_LEN = 4, 64
BEST_OF_DOC = ("sample this many answers together and return the one scored highest (the reward model, else the mean "
               "token log-prob); costs best_of times the tokens; not with stream; greedy (temperature 0) samples once")
TEMPERATURE_DOC = "0 = greedy; 0 to 5"
STOP_DOC = f"up to {MAX_STOP} strings of 1-{MAX_STOP_LEN} characters; generation ends before the first one"
SEED_DOC = "makes sampling reproducible, alone or in a batch; 0 to 2^63-1"
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and response-format names
MAX_TOOLS = 128  # OpenAI's limit
TOP_K_DOC = "keep the k most likely tokens; 0 = all; at most the vocabulary size (/health)"


def unicode_only(value: Any) -> Any:
    """``value`` unchanged; ValueError (a 422) when a string anywhere in it holds a lone surrogate
    (``readers.lone_surrogate``: the one finder, for data files too); the message names the code point, never holds
    it."""
    found = lone_surrogate(value)
    if found is not None:
        where, code, index = found
        at = f" at {where}" if where else ""
        raise ValueError(f"not Unicode text{at}: a lone surrogate U+{code:04X} at character {index}; send valid UTF-8")
    return value


class Body(BaseModel):
    """A request body, or a part of one: unknown fields and text that is not Unicode (unicode_only) are a 422."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def unicode_text(cls, value: Any) -> Any:
        return unicode_only(value)


def stop_list(value: str | list[str] | None) -> list[str]:
    """The stop strings of a request, as a list; ValueError (a 422 naming `stop`) beyond the limits."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    if any(not 1 <= len(s) <= MAX_STOP_LEN for s in stops):
        raise ValueError(f"each stop string must have 1 to {MAX_STOP_LEN} characters")
    return stops


class GenerateRequest(Body):
    """Continue `prefix` (the model sees `<s> prefix`)."""

    prefix: str = Field(min_length=1, description="the text to continue (non-empty)")
    max_gen_len: int = Field(100, ge=1, description="most new tokens; prompt + this must fit the context")
    top_k: int = Field(50, ge=0, description=TOP_K_DOC)
    temperature: float = Field(0.8, ge=0.0, le=5.0, description=TEMPERATURE_DOC)
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass, in (0, 1]; 1 = off")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0,
                                      description="CTRL penalty in [0.01, 10]; 1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description=SEED_DOC)
    stop: str | list[str] | None = Field(None, description=STOP_DOC)
    stream: bool = Field(False, description="Server-Sent Events: one `data: {\"text\"}` event per piece, "
                                            "then `data: {\"finish_reason\", \"num_tokens\"}`")
    best_of: int = Field(1, ge=1, description=BEST_OF_DOC)

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value: str | list[str] | None) -> list[str]:
        return stop_list(value)


class JSONSchemaFormat(Body):
    """`response_format.json_schema`: the schema the answer is held to (always enforced; `strict` is accepted)."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN, description="the format's name: letters, digits, _ and -, up to 64")
    description: str | None = Field(None, description="accepted, not shown to the model")
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                    description="a JSON schema (object); {} admits any JSON value")
    strict: bool | None = Field(None, description="accepted: the schema is always enforced")

    @field_validator("schema_")
    @classmethod
    def bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_schema_limits(value)
        return value


class ResponseFormat(Body):
    """OpenAI's `response_format`: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema")
    json_schema: JSONSchemaFormat | None = Field(None, description="with type json_schema: name and schema")

    @model_validator(mode="after")
    def schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    @property
    def wanted_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.schema_ if self.json_schema is not None else None


class OpenAIRequest(Body):
    """Fields shared by the OpenAI routes. A parameter this server cannot serve is a 422 that names it: an unknown
    one (functions, audio, ...) or a known one set to what it does not do (frequency_penalty 0.5, ...)."""

    model: str | None = Field(None, description="ignored: this server serves one model (/v1/models)")
    user: str | None = Field(None, description="the end user's id: accepted, not used")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description=TEMPERATURE_DOC)
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass, in (0, 1]")
    top_k: int = Field(0, ge=0, description=TOP_K_DOC + " (extension)")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0,
                                      description="CTRL penalty in [0.01, 10] (extension)")
    frequency_penalty: float = Field(0.0, description="only 0 (use repetition_penalty)")
    presence_penalty: float = Field(0.0, description="only 0 (use repetition_penalty)")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (null or {} only)")
    n: int = Field(1, ge=1, description="choices to sample (each with its own seed; one prefill)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description=SEED_DOC)
    stop: str | list[str] | None = Field(None, description=STOP_DOC)
    stream: bool = Field(False, description="OpenAI chunks as Server-Sent Events, ending with `data: [DONE]`")
    stream_options: dict[str, Any] | None = Field(None, description="{\"include_usage\": true} adds a usage chunk")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the answer is "
                                                   "JSON held to it token by token (text: free text)")
    calculator: bool = Field(True, description="(extension) run the built-in calculator when a model trained with "
                                               "tool calls calls it (--calculator on); its call and result are "
                                               "part of the text")

    @field_validator("stop")
    @classmethod
    def check_stop(cls, value: str | list[str] | None) -> list[str]:
        return stop_list(value)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def only_zero(cls, value: float) -> float:
        if value != 0:
            raise ValueError("only 0 is supported; use repetition_penalty (the CTRL penalty) instead")
        return value

    @field_validator("logit_bias")
    @classmethod
    def no_logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported")
        return None


class CompletionRequest(OpenAIRequest):
    """OpenAI `POST /v1/completions`."""

    prompt: str | list[str] = Field(description="the text to continue (a list must hold exactly one string)")
    max_tokens: int = Field(16, ge=1, description="most new tokens")
    echo: bool = Field(False, description="not supported (false only)")
    best_of: int = Field(1, ge=1, description=BEST_OF_DOC)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description=f"each token's log-prob and the 0 to {MAX_LOGPROBS} most likely")
    suffix: str | None = Field(None, description="not supported (null only)")

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            value = value[0]
        if not value:
            raise ValueError("the prompt must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return None

    @property
    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class FunctionCall(Body):
    name: str = Field(description="the function called")
    arguments: str = Field(description="its arguments: a JSON object, as text")

    @field_validator("arguments")
    @classmethod
    def json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as err:
            raise ValueError(f"arguments must be a JSON object as text; this is not JSON ({err})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"arguments must be a JSON object, got {type(parsed).__name__}")
        return value


class ToolCall(Body):
    """One call in an assistant message's `tool_calls` (as this server returned it)."""

    id: str = Field(min_length=1, max_length=256, description="the call's id, which the tool message answers")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = Field(None, description="a participant's name: accepted, not used")
    content: str | list[dict[str, Any]] | None = Field(
        None, description="text, or OpenAI content parts of type text (null only for an assistant's tool calls)")
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS, description="an assistant's tool calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    refusal: str | None = Field(None, description="accepted (as the SDK sends back an answer), not used")

    @field_validator("content")
    @classmethod
    def text_only(cls, value: str | list[dict[str, Any]] | None) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
            raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
        return "".join(part["text"] for part in value)

    @model_validator(mode="after")
    def fields_of_its_role(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers), and only it")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (null only for an assistant's tool calls)")
        return self


class FunctionSpec(Body):
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, _ and -, up to 64")
    description: str | None = Field(None, max_length=4096, description="what it does (shown to the model)")
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description="a JSON schema of its arguments (an object)")
    strict: bool | None = Field(None, description="accepted: a forced call always matches the parameters")

    @field_validator("parameters")
    @classmethod
    def bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_schema_limits(value)
        return value


class Tool(Body):
    type: Literal["function"] = Field(description="function (the only kind)")
    function: FunctionSpec


class ToolName(Body):
    name: str = Field(description="a tool in tools")


class NamedToolChoice(Body):
    type: Literal["function"] = Field(description="function")
    function: ToolName


class ChatRequest(OpenAIRequest):
    """OpenAI `POST /v1/chat/completions`: messages rendered with the checkpoint's SFT template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256,
                                        description="system/user/assistant/tool turns, ending with a user or tool turn")
    max_tokens: int | None = Field(None, ge=1, description="most new tokens (default: what fits)")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = Field(False, description="each answer token's log-prob (choices[].logprobs.content)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description=f"with logprobs: the 0 to {MAX_LOGPROBS} most likely tokens too")
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS,
                                     description=f"functions the model may call, 1 to {MAX_TOOLS}")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or {type: function, function: {name}}")
    parallel_tool_calls: bool | None = Field(None, description="accepted: an answer holds at most one call")

    @model_validator(mode="after")
    def top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def tools_agree(self) -> "ChatRequest":
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: each function name may appear once")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools ({', '.join(names)})")
        calls = set()
        for message in self.messages:
            calls |= {c.id for c in message.tool_calls or []}
            if message.role == "tool" and message.tool_call_id not in calls:
                raise ValueError(f"a tool message answers tool_call_id {message.tool_call_id!r}, which no earlier "
                                 "assistant message made")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools), "none", "auto", "required", or the name of the one function to call."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        return choice.function.name if isinstance(choice, NamedToolChoice) else choice

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def ends_with_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if value[-1].role not in ("user", "tool"):
            raise ValueError("the last message must be the user's (or a tool's result)")
        return value


class TokenizeRequest(Body):
    """vLLM's `POST /tokenize`: a prompt (with <s> when add_special_tokens) or messages (as chat renders them)."""

    model: str | None = Field(None, description="ignored: this server serves one model")
    prompt: str | None = Field(None, description="text to tokenize (or messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256, description="a conversation")
    add_special_tokens: bool = Field(True, description="a prompt starts with <s>, as generation sees it")
    add_generation_prompt: bool = Field(True, description="messages end with the assistant's cue")

    @model_validator(mode="after")
    def one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(Body):
    """vLLM's `POST /detokenize`: token ids back to text (special tokens shown)."""

    model: str | None = Field(None, description="ignored: this server serves one model")
    tokens: list[int] = Field(max_length=1_000_000, description="token ids")


class GenerateResponse(BaseModel):
    prefix: str
    generated_text: str
    num_tokens: int = Field(description="tokens generated (a closing </s> not counted)")
    finish_reason: str = Field(description="eos (</s>), stop (a stop string), length (max_gen_len or the context)")
    latency_ms: float


class Schemas(NamedTuple):
    """One app's request classes, bounded by its settings."""

    generate: type[GenerateRequest]
    completion: type[CompletionRequest]
    chat: type[ChatRequest]


def build_schemas(max_new_tokens: int, max_best_of: int) -> Schemas:
    """The request classes with this server's bounds in their fields (so /docs shows the real limits)."""
    def tokens(default: int | None, doc: str) -> tuple[Any, Any]:
        kind = int if default is not None else int | None
        return kind, Field(default, ge=1, le=max_new_tokens, description=doc)

    def best_of() -> tuple[Any, Any]:
        return int, Field(1, ge=1, le=max_best_of, description=f"1 to {max_best_of}: {BEST_OF_DOC}")

    def choices() -> tuple[Any, Any]:
        return int, Field(1, ge=1, le=max_best_of, description=f"1 to {max_best_of} choices, each with its own seed")

    def bounded(base: type[BaseModel], **overrides: tuple[Any, Any]) -> Any:
        return create_model(base.__name__, __base__=base, __doc__=base.__doc__, __module__=__name__, **overrides)

    up_to = f"most new tokens, 1 to {max_new_tokens}"
    return Schemas(
        bounded(GenerateRequest, best_of=best_of(), max_gen_len=tokens(
            min(100, max_new_tokens), f"{up_to}; prompt + this must fit the context")),
        bounded(CompletionRequest, max_tokens=tokens(min(16, max_new_tokens), up_to), best_of=best_of(), n=choices()),
        bounded(ChatRequest, max_tokens=tokens(None, f"{up_to} (default: what fits)"), n=choices(),
                max_completion_tokens=tokens(None, "alias of max_tokens")))
