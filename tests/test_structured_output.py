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

from tests.test_api_service import LiveServer, checkpoint, settings_for  # noqa: F401  (checkpoint: a fixture)

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
