"""Grammar-constrained decoding: a JSON schema compiled (by llguidance) into a grammar, and each sequence's place in
it as the token constraint ``decoding.DecodeEngine`` applies when it samples (the tokens allowed next; the token
taken). Also the limits that keep a hostile schema from stalling the compiler (``check_schema_limits``).

    vocab = GrammarVocabulary(tokenizer)                     # once per tokenizer (the token byte strings)
    grammar = compile_json_schema('{"type": "object"}', vocab)   # GrammarError: a schema it cannot serve
    params = SamplingParams(max_new_tokens=64, eos_token_id=tokenizer.eos_token_id, constraint=grammar.start)

The library needs each token's bytes: our tokenizer is byte-level BPE, so a token is the bytes ``decode_bytes`` gives
it (the GPT-2 byte-to-unicode strings of vocab.json decoded back); special tokens are marked as such (llguidance's
leading 0xFF byte), so a grammar never admits ``<|user|>`` as text. The allowed set includes ``</s>`` only where the
grammar may end. JSON is compact (no free whitespace): a small model cannot wander off into blank lines.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Any

import llguidance
import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_SCHEMA_BYTES = 64 * 1024  # serialized; a 7,000-value enum fits and compiles in ~50 ms
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in the schema document itself
# llguidance's own budgets (its defaults are for 100k-token vocabularies and long prompts; these bound one mask
# step to milliseconds); verbose_errors=False keeps parser state out of the messages a client sees.
LIMITS = dict(max_grammar_size=200_000, step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: "," and ":" with no spaces


class GrammarError(ValueError):
    """A schema the server cannot constrain decoding to: too large or deep, unsupported, or unsatisfiable."""


def check_schema_limits(schema: Any) -> None:
    """GrammarError when a schema is larger than MAX_SCHEMA_BYTES or nests deeper than MAX_SCHEMA_DEPTH (checked
    before compiling, so a hostile schema costs a walk over a bounded document, not a compile)."""
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    stack = [(schema, 1)]
    while stack:  # iterative: a deep document must not overflow Python's stack
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


class _TokenizerAdapter:
    """What llguidance.TokenizerWrapper reads: token bytes, eos/bos ids, special ids and an encoder."""

    def __init__(self, tokenizer) -> None:
        special = {tokenizer.special_token_id(t) for t in tokenizer.special_tokens}
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self.tokens = [b"\xff" + tokenizer.decode_bytes([i], False) if i in special  # llguidance's special marker
                       else tokenizer.decode_bytes([i], False) for i in range(len(tokenizer))]
        self._encode = tokenizer.encode_ordinary

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


class GrammarVocabulary:
    """The tokenizer as the grammar library sees it (built once per served tokenizer: ~50 ms at 8k tokens)."""

    def __init__(self, tokenizer) -> None:
        self.size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.library = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerAdapter(tokenizer)))


class GrammarState:
    """One sequence's place in a grammar: ``allowed()`` the next tokens (a bool row over the tokenizer's ids),
    ``accept(id)`` the one sampled. A matcher in an error state (a budget exceeded mid-answer) allows only </s>."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: GrammarVocabulary) -> None:
        self._matcher, self._vocab = matcher, vocab

    def allowed(self) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), np.uint8), bitorder="little")
        bits = bits[:self._vocab.size]
        if self._matcher.is_error() or not bits.any():
            log.warning("grammar matcher failed: %s", one_line(self._matcher.get_error()))
            mask = torch.zeros(self._vocab.size, dtype=torch.bool)
            mask[self._vocab.eos_token_id] = True  # end the sequence rather than sample from nothing
            return mask
        return torch.from_numpy(bits).view(torch.bool)  # unpackbits gives 0/1 bytes: the same memory as bools

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)  # never raises: a refused token puts the matcher in its error state

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a complete sentence of the grammar."""
        return self._matcher.is_accepting()


class Grammar:
    """A compiled grammar; ``start()`` is a fresh state for one sequence (the callable SamplingParams.constraint
    takes: the n choices of one request share the grammar, each has its own state, a copy of a matcher built once)."""

    def __init__(self, prototype: llguidance.LLMatcher, vocab: GrammarVocabulary) -> None:
        self._prototype, self.vocab = prototype, vocab

    def start(self) -> GrammarState:
        return GrammarState(self._prototype.deep_copy(), self.vocab)


@functools.lru_cache(maxsize=128)  # a client repeats its schemas (the SDK's parse helper, agent loops)
def compile_json_schema(schema_json: str, vocab: GrammarVocabulary) -> Grammar:
    """The grammar of the JSON values a schema (given as JSON text) admits; GrammarError naming the problem when
    the schema is over the limits, malformed, unsupported by the compiler, or admits no value."""
    schema = json.loads(schema_json)
    check_schema_limits(schema)
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as err:
        raise GrammarError(f"invalid schema: {err}") from None
    prototype = llguidance.LLMatcher(vocab.library, text, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
    if prototype.is_error():
        raise GrammarError(f"unsupported schema: {one_line(prototype.get_error())}")
    probe = prototype.deep_copy()
    first = np.frombuffer(probe.compute_bitmask(), np.uint8)
    if probe.is_error() or not first.any():  # e.g. a $ref that only refers to itself
        raise GrammarError("the schema admits no JSON value")
    return Grammar(prototype, vocab)


def one_line(message: str, limit: int = 300) -> str:
    """A library message as one line of at most ``limit`` characters."""
    text = " ".join(message.split()) or "unknown error"
    return text if len(text) <= limit else text[:limit - 3] + "..."
