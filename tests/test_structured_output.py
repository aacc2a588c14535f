"""Structured output and function calling: grammar_constraint (schemas to token constraints), the engine's masked
sampling, inference/tool_calls.py, and the server's response_format / tools / tool_choice.

References: `jsonschema` validates every answer against its schema; GPT-2's byte table (transformers' copy) maps the
saved vocab.json back to token bytes; the official `openai` client drives the server (function calling and the
SDK's Pydantic `parse` helper). The model is random, so its text is garbage: only the grammar makes it JSON.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import pytest
import torch

from tests.test_api_service import LiveServer, settings_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "color"], "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "name": {"type": "string", "minLength": 1, "maxLength": 6}},
     "required": ["age", "name"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["id", "tags"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"enum": ["yes", "no", 3, None]},
    {"type": "boolean"},
]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["a", "b"], "additionalProperties": False}}}]


def nested(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


HOSTILE = {
    "nested too deep": nested(40),
    "too large": {"enum": [f"value number {i}" for i in range(10_000)]},
    "recursive $ref with no value": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "a $ref to nothing": {"$ref": "#/$defs/missing"},
    "an unknown type": {"type": "banana"},
    "an unsupported pattern": {"type": "string", "pattern": "(?=a)b"},
    "an empty range": {"type": "integer", "minimum": 10, "maximum": 1},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine_parts(tiny_tokenizer):
    """A random tiny model, the tokenizer, and the tokenizer as the grammar library sees it."""
    from gpt_model import GPTConfig, GPTModel
    from grammar_constraint import GrammarVocabulary

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=256, dropout=0.0))
    return model.eval(), tiny_tokenizer, GrammarVocabulary(tiny_tokenizer)


@pytest.fixture(scope="module")
def padded_parts(engine_parts):
    """The same with the model's vocabulary padded past the tokenizer's (ids a grammar must never admit)."""
    from gpt_model import GPTConfig, GPTModel

    _, tok, vocab = engine_parts
    torch.manual_seed(1)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tok) + 8, max_seq_len=256, dropout=0.0))
    return model.eval(), tok, vocab


def grammar(schema, vocab):
    from grammar_constraint import compile_json_schema

    return compile_json_schema(json.dumps(schema), vocab)


def run_engine(engine_parts, schemas, n_slots: int, seed: int = 0, max_new_tokens: int = 120):
    from decoding import DecodeEngine, SamplingParams

    model, tok, vocab = engine_parts
    params = [SamplingParams(max_new_tokens=max_new_tokens, seed=seed + i, eos_token_id=tok.eos_token_id,
                             constraint=None if s is None else grammar(s, vocab).start) for i, s in enumerate(schemas)]
    prompt = [tok.bos_token_id, *tok.encode_ordinary("ROMEO:")]
    return DecodeEngine(model, tok, n_slots=n_slots).run([prompt] * len(schemas), params)


def assert_valid(requests, schemas) -> int:
    """Every answer that ended by </s> parses and matches its schema; how many did."""
    done = 0
    for request, schema in zip(requests, schemas):
        assert request.finish_reason in ("eos", "length")
        if request.finish_reason == "eos":
            jsonschema.validate(json.loads(request.text), schema)
            done += 1
    return done


# ----------------------------------------------------------------------------- the engine and the grammar


@pytest.mark.parametrize("n_slots, padded", [(1, False), (32, False), (32, True)])
def test_the_grammar_makes_a_random_model_write_json_that_matches(engine_parts, padded_parts, n_slots, padded):
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(32)]
    done = assert_valid(run_engine(padded_parts if padded else engine_parts, schemas, n_slots), schemas)
    assert done >= 28, f"only {done} of 32 answers ended before max_new_tokens"


def test_a_constrained_row_leaves_its_batch_neighbours_unchanged(engine_parts):
    alone = run_engine(engine_parts, [None, None], n_slots=2)
    mixed = run_engine(engine_parts, [None, SCHEMAS[0]], n_slots=2)
    assert mixed[0].output_ids == alone[0].output_ids  # same seed: the grammar of slot 1 does not touch slot 0
    assert mixed[1].output_ids != alone[1].output_ids
    json.loads(mixed[1].text)


class EvenIds:
    """A hand-made constraint: only even ids below `limit` (less than the model's vocabulary); records its tokens."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, []

    def allowed(self) -> torch.Tensor:
        return torch.arange(self.limit) % 2 == 0

    def accept(self, token_id: int) -> None:
        self.seen.append(token_id)


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(top_k=0), dict(top_k=5, top_p=0.5),
                                      dict(temperature=0.3, repetition_penalty=1.3)], ids=str)
def test_every_sampling_path_draws_only_what_the_constraint_allows(engine_parts, sampling):
    from decoding import DecodeEngine, SamplingParams

    model, tok, _ = engine_parts
    states = []

    def constraint() -> EvenIds:
        states.append(EvenIds(100))
        return states[-1]

    params = [SamplingParams(max_new_tokens=12, seed=i, constraint=constraint if i % 2 else None, **sampling)
              for i in range(6)]
    requests = DecodeEngine(model, tok, n_slots=6).run([[tok.bos_token_id]] * 6, params)
    for request, state in zip(requests[1::2], states):
        assert request.output_ids == state.seen and all(t % 2 == 0 and t < 100 for t in request.output_ids)
    assert any(t % 2 or t >= 100 for r in requests[::2] for t in r.output_ids)  # the free rows are free


def test_eos_is_allowed_exactly_when_the_grammar_can_end(engine_parts):
    model, tok, vocab = engine_parts
    state = grammar({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, vocab).start()
    for piece in ["[", "true", ",", "false", "]"]:
        assert bool(state.allowed()[tok.eos_token_id]) is False, piece
        for token in tok.encode_ordinary(piece):
            state.accept(token)
    allowed = state.allowed()
    assert allowed[tok.eos_token_id] and allowed.sum() == 1 and state.accepting


def test_token_bytes_come_from_the_saved_vocab_json_through_gpt2s_byte_table(engine_parts, tmp_path):
    """The first step of `"ROMEO"` admits exactly the tokens whose bytes start that text: bytes read back from
    vocab.json with GPT-2's byte decoder (transformers' copy); special tokens (<|user|> ...) never."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    _, tok, vocab = engine_parts
    tok.save(tmp_path)
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    specials = set(json.loads((tmp_path / "tokenizer_config.json").read_text())["special_tokens"])
    text = b'"ROMEO"'
    expected = {i for token, i in json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")).items()
                if token not in specials and text.startswith(bytes(decoder[c] for c in token))}
    allowed = grammar({"enum": ["ROMEO"]}, vocab).start().allowed()
    assert set(torch.nonzero(allowed).flatten().tolist()) == expected


@pytest.mark.parametrize("problem", sorted(HOSTILE))
def test_a_hostile_or_impossible_schema_is_refused_quickly(engine_parts, problem):
    from grammar_constraint import GrammarError

    start = time.perf_counter()
    with pytest.raises(GrammarError) as err:
        grammar(HOSTILE[problem], engine_parts[2])
    assert time.perf_counter() - start < 2.0
    assert str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- tool calls


def test_the_forced_call_schema_admits_exactly_calls_of_the_listed_tools_with_their_definitions():
    from inference.tool_calls import answer_schema

    node = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/Node"}}}, "required": ["v", "kids"], "additionalProperties": False}
    tree = {"$defs": {"Node": node}, "$ref": "#/$defs/Node"}  # a recursive Pydantic-style parameters schema
    schema = answer_schema([("tree", tree), ("get_weather", WEATHER)], "required", None)
    good = {"name": "tree", "arguments": {"v": 1, "kids": [{"v": 2, "kids": []}]}}
    jsonschema.validate(good, schema)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, schema)
    for bad in ({"name": "tree", "arguments": {"v": 1, "kids": [{"v": "x", "kids": []}]}},
                {"name": "nope", "arguments": {}}, {"name": "tree"}, {**good, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    only = answer_schema([("tree", tree), ("get_weather", WEATHER)], "get_weather", None)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, only)
    answer = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
    either = answer_schema([("tree", tree)], "auto", answer)
    jsonschema.validate({"x": True}, either)
    jsonschema.validate(good, either)
    assert answer_schema([("tree", tree)], "auto", None) is None and answer_schema([], None, answer) == answer


def test_a_streamed_call_adds_up_to_the_whole_answer():
    from inference.tool_calls import ToolUse, merge

    text = '{"name":"add","arguments":{"a":1,"b":{"c":"}"}}}'
    for tools in (ToolUse(("add",), forced=True), ToolUse(("add",), forced=False)):
        for size in (1, 3, 100):
            stream = tools.stream()
            deltas = [d for i in range(0, len(text), size) for d in stream.push(text[i:i + size])] + stream.finish()
            content, calls = merge(deltas)
            assert content is None and calls[0]["function"] == {"name": "add", "arguments": '{"a":1,"b":{"c":"}"}}'}
            assert "id" in deltas[0]["tool_calls"][0] and all("id" not in d["tool_calls"][0] for d in deltas[1:])
    auto = ToolUse(("add",), forced=False)
    assert auto.answer('{"name":"other","arguments":{}}') == ('{"name":"other","arguments":{}}', None)
    assert auto.answer("plain text") == ("plain text", None)


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    """A random tiny model in the role-token chat format, with room (1024 tokens) for tool definitions as text."""
    from checkpoints import save_checkpoint
    from gpt_model import GPTConfig, GPTModel
    from prompts import CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("structured")
    tiny_tokenizer.save(folder / "tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=1024, dropout=0.0))
    save_checkpoint(folder / "model.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                    sft_template=CHAT_TEMPLATE)
    return folder / "model.pth"


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(settings_for(checkpoint, max_batch_size=32, max_new_tokens=200)) as live:
        yield live


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def chat_body(schema: dict | None, seed: int, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 150, "seed": seed, **extra}
    return {**body, "response_format": response_format(schema)} if schema is not None else body


def test_response_format_on_chat_and_completions_streamed_or_not(server):
    for i, schema in enumerate(SCHEMAS):
        chat = httpx.post(server.url + "/v1/chat/completions", json=chat_body(schema, i), timeout=60).json()
        choice = chat["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**chat_body(schema, i), "stream": True},
                          timeout=60) as response:
            pieces = [line for line in response.iter_lines() if line.startswith("data: {")]
        deltas = [json.loads(p[6:])["choices"][0]["delta"].get("content") or "" for p in pieces]
        assert "".join(deltas) == choice["message"]["content"]  # the same seed: the same JSON, streamed
        text = httpx.post(server.url + "/v1/completions", json={
            "prompt": "ROMEO:", "max_tokens": 150, "seed": i, "response_format": response_format(schema)},
            timeout=60).json()["choices"][0]
        assert text["finish_reason"] == "stop"
        jsonschema.validate(json.loads(text["text"]), schema)
    any_object = httpx.post(server.url + "/v1/chat/completions",
                            json={**chat_body(None, 0), "response_format": {"type": "json_object"}}, timeout=60).json()
    if any_object["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(any_object["choices"][0]["message"]["content"]), dict)


def test_an_answer_cut_by_max_tokens_says_length(server):
    body = chat_body(SCHEMAS[3], 0, max_tokens=3)
    choice = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])


async def _post_all(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
    return [r.json() for r in responses]


def test_32_concurrent_requests_with_different_schemas_all_match_theirs(server):
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(31)] + [None]  # and one free-text neighbour
    steps = server.metric("gpt_batch_size_count")
    total = server.metric("gpt_batch_size_sum")
    answers = asyncio.run(_post_all(server.url + "/v1/chat/completions",
                                    [chat_body(s, 100 + i) for i, s in enumerate(schemas)]))
    stopped = 0
    for answer, schema in zip(answers[:-1], schemas):
        choice = answer["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            stopped += 1
    assert stopped >= 28, f"only {stopped} of 31 answers ended before max_tokens"
    mean_batch = (server.metric("gpt_batch_size_sum") - total) / (server.metric("gpt_batch_size_count") - steps)
    assert mean_batch > 4, f"mean sequences per decode step {mean_batch:.2f}"


def test_a_schema_the_library_cannot_serve_is_a_quick_422_and_the_server_serves_on(server):
    for problem, schema in HOSTILE.items():
        start = time.perf_counter()
        response = httpx.post(server.url + "/v1/chat/completions", json=chat_body(schema, 0), timeout=30)
        assert response.status_code == 422, (problem, response.text)
        assert "response_format" in response.json()["error"]["message"]
        assert time.perf_counter() - start < 5
    assert httpx.post(server.url + "/v1/chat/completions", json=chat_body(SCHEMAS[0], 0)).status_code == 200
    assert httpx.get(server.url + "/health").json()["active_sequences"] == 0


# ----------------------------------------------------------------------------- the official client


def arguments_of(call, tools=TOOLS) -> dict:
    parameters = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters)
    return arguments


def test_openai_client_function_calling_round_trip(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    for choice, names in (("required", {"get_weather", "add"}), ({"type": "function", "function": {"name": "add"}},
                                                                  {"add"})):
        for seed in range(3):
            answer = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice=choice,
                                                    max_tokens=80, seed=seed)
            first = answer.choices[0]
            assert first.finish_reason == "tool_calls" and first.message.content is None
            call = first.message.tool_calls[0]
            assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
            arguments_of(call)
    # the client sends the call back with the tool's result; the model answers (free text here: tool_choice none)
    follow = messages + [answer.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "7 C"}]
    reply = client.chat.completions.create(model="m", messages=follow, tools=TOOLS, tool_choice="none",
                                           max_tokens=5, seed=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")
    rendered = httpx.post(server.url + "/tokenize", json={"messages": [
        m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in follow]}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": rendered}).json()["prompt"]
    assert f"Result of add (call {call.id}):\n7 C" in text and call.function.arguments in text


def test_openai_client_streams_a_tool_call_in_openais_chunk_shape(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    body = dict(model="m", messages=[{"role": "user", "content": "add 2 and 3"}], tools=TOOLS, max_tokens=80, seed=4,
                tool_choice={"type": "function", "function": {"name": "add"}})
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].function.name == "add"
    assert all(c.id is None and c.function.name is None for c in calls[1:])
    assert "".join(c.function.arguments or "" for c in calls) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not any(d.content for d in deltas)


def test_auto_returns_a_call_of_a_listed_tool_or_text(server):
    answer_format = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
                     "additionalProperties": False}
    kinds = set()
    for seed in range(6):  # auto with a response_format: the grammar admits a call or the format
        body = {**chat_body(answer_format, seed, max_tokens=100), "tools": TOOLS, "tool_choice": "auto"}
        choice = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        message = choice["message"]
        if message.get("tool_calls"):
            assert choice["finish_reason"] == "tool_calls" and message["content"] is None
            call = message["tool_calls"][0]["function"]
            jsonschema.validate(json.loads(call["arguments"]), next(
                t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["name"]))
            kinds.add("call")
        elif choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(message["content"]), answer_format)
            kinds.add("text")
    assert kinds  # (which one a random model picks is its own business)
    free = httpx.post(server.url + "/v1/chat/completions", json={**chat_body(None, 0, max_tokens=10), "tools": TOOLS})
    assert free.json()["choices"][0]["message"].get("tool_calls") is None  # garbage text is no call


def test_openai_client_parse_helper_with_a_pydantic_model(server):
    openai = pytest.importorskip("openai")
    from typing import Literal

    from pydantic import BaseModel, Field

    class Item(BaseModel):
        name: str = Field(max_length=5)
        count: int = Field(ge=0, le=9)

    class Answer(BaseModel):
        ok: bool
        color: Literal["red", "green"]
        items: list[Item] = Field(max_length=2)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    parsed = 0
    for seed in range(3):
        try:
            answer = client.chat.completions.parse(model="m", messages=[{"role": "user", "content": "x"}],
                                                   response_format=Answer, max_tokens=150, seed=seed)
        except openai.LengthFinishReasonError:
            continue
        assert isinstance(answer.choices[0].message.parsed, Answer)
        parsed += 1
    assert parsed >= 2
