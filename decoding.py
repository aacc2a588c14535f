"""The project's one decode loop: a KV-cache engine that sequences join and leave, per-sequence sampling (and the one
check of sampling settings; each sequence may carry a token constraint, e.g. a JSON grammar), stop strings and
UTF-8-safe streaming, and its two batch entry points: ``generate`` (left-padded tensors in and out) and
``generate_responses`` (lists of prompt ids in, each one's new ids out).

    engine = DecodeEngine(model, tokenizer, n_slots=8)
    engine.add(prompts.encode_prompt(tokenizer, "ROMEO:", 200), SamplingParams(max_new_tokens=50, seed=0))
    while engine.has_work:
        for out in engine.step():           # one batched forward pass for every active sequence
            print(out.text, end="")          # whole characters only

Iteration-level scheduling as in Orca / vLLM / TGI: the cache has fixed slots, each with its own length and
positions; `add` prefills new prompts into free slots (one forward pass for several), `step` decodes one token
for every active slot, and a finished sequence frees its slot at once. `generate`, the evaluator, the trainer's
samples and `inference/` all run through `DecodeEngine`. It sits above the model (as nanochat's engine.py): the model
knows nothing of decoding.

    out = generate(model, input_ids, SamplingParams(max_new_tokens=20, do_sample=False), attention_mask=mask)
"""
from __future__ import annotations

import codecs
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch

import calculator
from byte_level_bpe import incomplete_tail
from prefix_cache import PrefixIndex
from prompts import CALCULATOR, TOOL_CALL, TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END, TOOL_TOKENS, parse_call
from quantization import is_quantized
from speculative import DraftParams, accept, accept_greedy, propose
from transformer_components import KVCache, KVCacheView


MAX_LOGPROBS = 20  # OpenAI's most top_logprobs
MIN_TEMPERATURE = 1e-6  # a lower temperature samples as this one: logits / 1e-45 overflow float32 to inf and NaN
MIN_REPETITION_PENALTY = 0.01  # below it the penalty multiplies logits past float32 (and means nothing)


class DecodingError(ValueError):
    """Bad generation input: sampling settings, prompts, or more sequences than free slots."""


# ----------------------------------------------------------------------------- the compiled decode step

# off: eager, shaped by the active slots; static: eager over key buckets (what "on" compiles); on: compiled;
# auto: on where it measured faster (benchmarks/bench_inference.py --compiled_only, bench_peers), else off
COMPILE_MODES = ("off", "static", "on", "auto")
MIN_KEY_BUCKET = 64  # the shortest key length a static step attends over; then powers of two up to max_len
RECOMPILE_LIMIT = 64  # compiled steps kept per engine code: (slot count, key bucket) pairs, a handful each
INDUCTOR_CACHE_DIR = Path.home() / ".cache" / "gpt_framework" / "inductor"  # unless TORCHINDUCTOR_CACHE_DIR is set


def key_bucket(key_len: int, max_len: int) -> int:
    """The static key length a step reading ``key_len`` cached positions attends over (masked past each slot's own):
    the next power of two, at least MIN_KEY_BUCKET, at most max_len. Few buckets: few compiled graphs."""
    return min(max_len, max(MIN_KEY_BUCKET, 1 << (key_len - 1).bit_length()))


# Where "auto" compiles: (device type, INT8 model) pairs whose compiled step measured faster than the eager one where
# auto is used (the server), for models of at least COMPILE_MIN_WEIGHTS weights (a model of a few million weights
# decodes 1,000+ tokens/s eagerly: its compile, minutes on a cold cache, would not be earned back). Empty: on the
# 2-core AVX2 CPU the 124M INT8 step ran 1.2x eager at batch 1 through the Python API (2 threads), but the server
# (1 engine thread, 32 slots) streamed 0.86-0.93x eager at 1-32 users (results.md), so the server stays eager.
COMPILE_PAYS: frozenset[tuple[str, bool]] = frozenset()
COMPILE_MIN_WEIGHTS = 50_000_000


def resolve_compile(mode: str | bool, model: torch.nn.Module, device: torch.device) -> str:
    """The mode an engine runs: a bool reads as on/off; auto is on only where compiling measured faster
    (COMPILE_PAYS, COMPILE_MIN_WEIGHTS), else off."""
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode not in COMPILE_MODES:
        raise DecodingError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto":
        weights = sum(t.numel() for t in model.state_dict().values())  # an INT8 model's weights are buffers
        pays = (device.type, is_quantized(model)) in COMPILE_PAYS and weights >= COMPILE_MIN_WEIGHTS
        return "on" if pays else "off"
    return mode


def compile_step(step: Callable, device: torch.device) -> Callable:
    """``step`` under torch.compile: C++ wrapper code on CPU (no Python between the kernels), CUDA graphs on CUDA;
    the code kept on disk for the next process (TORCHINDUCTOR_CACHE_DIR, default INDUCTOR_CACHE_DIR). Shapes are
    torch's automatic dynamic ones: the first call compiles its exact shapes, and a call with another row count or
    key bucket compiles one graph where that size is symbolic (one row is always a graph of its own), so a handful
    of graphs serve every (rows, bucket): DecodeEngine.warm_up compiles them all before the first request."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if device.type == "cuda":
        return torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
    return torch.compile(step, fullgraph=True, dynamic=None, options={"cpp_wrapper": device.type == "cpu"})



# ----------------------------------------------------------------------------- batch helpers


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left to the longest, as ``generate`` takes them."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def cut_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The ids before the first eos_id (all of them when there is none)."""
    ids = list(ids)
    return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


# ----------------------------------------------------------------------------- sampling processors


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens seen: positive logits divided, negative multiplied (per row if a tensor)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_candidates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) of the top_k largest logits per row: sampling among these k is top-k sampling, the same
    distribution as masking every other logit to -inf, with the softmax and the draw over k values instead of V."""
    return torch.topk(logits, top_k, dim=-1)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution each row is sampled from (temperature, top-k, top-p; no penalty or constraint) over the whole
    vocabulary: what speculative sampling checks a draft against."""
    scaled = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k and params.top_k < scaled.size(-1):
        kth = top_k_candidates(scaled, params.top_k)[0][..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return apply_top_p(scaled, params.top_p).softmax(dim=-1)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p
    drop[..., 0] = False  # the most likely token always survives (a top_p below float32's range rounds to 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


class TokenConstraint(Protocol):
    """One sequence's constraint on its next token (e.g. its place in a grammar: grammar_constraint.GrammarState)."""

    def allowed(self) -> torch.Tensor:
        """Bool (n,) over token ids 0..n-1, n <= the model's vocabulary (ids past n are refused); at least one True."""

    def accept(self, token_id: int) -> None:
        """The token sampled (always one allowed() admitted)."""


def apply_constraints(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> torch.Tensor:
    """Logits with every token a row's constraint refuses at -inf (a new tensor; rows without one unchanged)."""
    rows = [row for row, c in enumerate(constraints) if c is not None]
    masks = [constraints[row].allowed() for row in rows]
    width = logits.size(-1)
    allowed = torch.stack([m if m.numel() == width else torch.nn.functional.pad(m, (0, width - m.numel()))
                           for m in masks])  # ids past a constraint's vocabulary are refused
    refused = ~allowed.to(logits.device, non_blocking=True)
    if len(rows) < len(constraints):  # a mixed batch: unconstrained rows refuse nothing
        every = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        every[torch.tensor(rows, device=logits.device)] = refused
        refused = every
    return logits.masked_fill(refused, float("-inf"))


def check_max_new_tokens(value, name: str = "max_new_tokens", minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodingError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise DecodingError(f"{name} must be at least {minimum}, got {value}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DecodingError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence settings. do_sample=False is greedy (temperature/top_k/top_p ignored); seed makes one
    sequence reproducible whatever else shares the batch; stop strings end it (and are not part of its text)."""

    max_new_tokens: int = 100
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each token's log-prob and the k most likely (raw model)
    constraint: Callable[[], TokenConstraint] | None = None  # a fresh constraint per sequence (e.g. Grammar.start)
    calculator: bool = True  # run the built-in calculator on the model's calls (needs the engine's tokenizer)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        check_max_new_tokens(self.max_new_tokens)
        for name in ("temperature", "top_p", "repetition_penalty"):
            _check_number(name, getattr(self, name))
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise DecodingError(f"top_k must be an int, got {self.top_k!r}")
        if self.do_sample and not self.temperature > 0:
            raise DecodingError(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy decoding")
        if self.top_k is not None and self.top_k < 0:
            raise DecodingError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise DecodingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty >= MIN_REPETITION_PENALTY:
            raise DecodingError(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} (1.0 = off), "
                                f"got {self.repetition_penalty}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise DecodingError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


# ----------------------------------------------------------------------------- streaming text


class IncrementalDetokenizer:
    """Token ids in, text out in whole UTF-8 characters: the bytes of a character split across tokens are held
    back until it is complete, so pieces never contain a U+FFFD the full decode lacks and join to the full decode."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()):
        self._tokenizer, self._skip, self._keep = tokenizer, skip_special_tokens, keep  # keep: specials written out
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        skip = self._skip and token_id not in self._keep
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id], skip))

    def flush(self) -> str:
        """The end of the text: a character still incomplete there is left out (as in tokenizer.decode)."""
        held, _ = self._decoder.getstate()
        self._decoder.reset()
        return "" if held and incomplete_tail(held) == len(held) else self._decoder.decode(held, final=True)


class StopStringMatcher:
    """Finds stop strings in streamed text; text that may be the start of a stop string is held back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached: the text before it is then all that is left)."""
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return held[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# ----------------------------------------------------------------------------- the engine


@dataclass(eq=False)
class Request:
    """One sequence in the engine: its prompt, settings, generated ids and the text emitted so far."""

    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos", "stop", "length" or "aborted"
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    constraint: TokenConstraint | None = None  # what it may sample next (a grammar state), from params.constraint

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StepOutput(NamedTuple):
    """One new token of one request: its id, the text it completed (may be empty) and whether the request ended;
    with ``SamplingParams.logprobs``, its log-prob and the most likely (id, log-prob) pairs under the raw model."""

    request: Request
    token_id: int
    text: str
    finished: bool
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass
class SpeculationStats:
    """Speculative decoding so far: verifying forward passes, draft tokens proposed and draft tokens accepted
    (each pass also yields one token of the model's own)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_step(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


class DecodeEngine:
    """Fixed-slot KV-cache decoding with iteration-level scheduling; puts the model in eval mode.

    n_slots sequences at most run together; max_len (default: the model's context) bounds prompt + output.
    use_cache=False recomputes every sequence in full each step (slow; for verification and benchmarks).
    compile (COMPILE_MODES) "on" runs the decode step with keys over a power-of-two bucket of positions under
    torch.compile (``compile_step``; ``warm_up()`` compiles every graph, else each compiles at its first use);
    "static" runs the same shapes eagerly; "auto" is "on" where that measured faster; "off" (the default) is the
    eager step shaped by the active slots and their exact key length. Prefill is eager in every mode. A tokenizer
    is needed for text, streaming and stop strings. prefix_cache=True (with the cache) reuses the keys/values of a
    prompt's leading blocks that a slot holds or held (an earlier turn of a chat, a shared system message): a
    finished sequence's slot keeps them until it is needed. speculative=DraftParams(...) decodes a lone sequence by
    prompt-lookup drafts verified in one pass.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, n_slots: int = 8, max_len: int | None = None,
                 use_cache: bool = True, compile: str | bool = "off", prefix_cache: bool = True,
                 speculative: DraftParams | None = None):
        if n_slots < 1:
            raise DecodingError(f"n_slots must be at least 1, got {n_slots}")
        config = model.config
        if max_len is not None and not 1 < max_len:
            raise DecodingError(f"max_len must be at least 2 (a prompt token and a new one), got {max_len}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.n_slots, self.max_len = n_slots, min(max_len or config.max_seq_len, config.max_seq_len)
        self.device = next(model.parameters()).device
        self.cache = KVCache(config.n_layers, n_slots, self.max_len) if use_cache else None
        self.compile = resolve_compile(compile, model, self.device)
        if self.compile != "off" and not use_cache:
            raise DecodingError(f"compile={self.compile!r} needs the KV cache (use_cache=True)")
        if speculative is not None and not use_cache:
            raise DecodingError("speculative decoding verifies drafts in the KV cache: it needs use_cache=True")
        self.static_shapes = self.compile in ("static", "on")
        self.prefix = PrefixIndex(n_slots) if use_cache and prefix_cache else None
        self.speculative = speculative
        self.speculation = SpeculationStats()
        self.slots: list[Request | None] = [None] * n_slots
        self.lengths = [0] * n_slots  # tokens of each slot already in the cache
        self._slot_ids = torch.arange(n_slots, device=self.device)
        self._last_tokens = torch.zeros(n_slots, dtype=torch.long, device=self.device)  # what each slot feeds next
        self._seen: torch.Tensor | None = None  # (n_slots, vocab) bool, for repetition penalties
        self._pending: list[StepOutput] = []  # first tokens sampled at prefill, returned by the next step()
        self._decode = compile_step(self._decode_logits, self.device) if self.compile == "on" else self._decode_logits
        self._tools = tool_token_ids(tokenizer)  # None: the tokenizer has no tool tokens (no model of it calls tools)

    # -- state

    @property
    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def free_slots(self) -> list[int]:
        return [slot for slot, r in enumerate(self.slots) if r is None]

    @property
    def has_work(self) -> bool:
        """Sequences still decoding, or outputs not yet returned by step()."""
        return bool(self._pending) or any(r is not None for r in self.slots)

    def abort(self, request: Request) -> None:
        """Stop a request now (e.g. its client left) and free its slot."""
        if not request.finished:
            request.finish_reason = "aborted"
            self._free(request)

    def _free(self, request: Request) -> None:
        if self.prefix is not None:  # the slot keeps the keys/values of its sequence for a later prompt to reuse
            self.prefix.hold(request.slot, (request.prompt_ids + request.output_ids)[:self.lengths[request.slot]])
        self.slots[request.slot] = None
        self.lengths[request.slot] = 0

    # -- joining

    def add(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
            generator: torch.Generator | None = None) -> Request:
        """Prefill one prompt into a free slot and sample its first token (returned by the next step())."""
        return self.add_many([prompt_ids], params, generator)[0]

    @torch.inference_mode()
    def add_many(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 generator: torch.Generator | None = None) -> list[Request]:
        """Prefill several prompts in one forward pass into the lowest free slots.

        A request with a seed gets its own generator; the others draw from `generator` (or torch's global RNG).
        """
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise DecodingError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        free = self.free_slots
        if len(prompts) > len(free):
            raise DecodingError(f"{len(prompts)} new sequences but only {len(free)} free slots; "
                                "wait for running ones to finish or create the engine with more n_slots")
        for ids in prompts:
            self._check_prompt(ids)
        if any(p.stop for p in params) and self.tokenizer is None:
            raise DecodingError("stop strings need the engine's tokenizer: DecodeEngine(model, tokenizer)")
        slots, reuse = self._place(prompts)
        requests = [self._new_request(ids, p, slot, generator) for ids, p, slot in zip(prompts, params, slots)]
        if not requests:
            return []
        try:
            logits = self._prefill_distinct(requests, reuse)
            self._pending.extend(self._emit(requests, logits))
        except Exception:  # the engine stays as it was: no slot is left to a request nobody tracks
            for request in requests:
                if not request.finished:
                    request.finish_reason = "aborted"
                    self._free(request)
            raise
        return requests

    def _place(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, int] | None]]:
        """A free slot per prompt, and per prompt the (slot, n tokens) whose cached keys/values it reuses (None: it
        is prefilled whole). Without the prefix cache: the lowest free slots. With it: the free slot that holds the
        longest match itself if one does (reused in place), else an empty slot, else the least recently used."""
        free = self.free_slots
        if self.prefix is None:
            return free[:len(prompts)], [None] * len(prompts)
        claimed: set[int] = set()  # slots given to this batch: overwritten, so no one's source
        seen: set[tuple[int, ...]] = set()
        slots, reuse = [], []
        for ids in prompts:
            key = tuple(ids)
            match = None if key in seen else self.prefix.longest(ids, exclude=claimed)  # a repeat copies the first
            seen.add(key)
            in_place = sorted(s for s in match.slots if self.slots[s] is None) if match else []
            slot = in_place[0] if in_place else self.prefix.victim([s for s in free if s not in claimed])
            claimed.add(slot)
            slots.append(slot)
            reuse.append(None if match is None else (slot if in_place else min(match.slots), match.n_tokens))
        return slots, reuse

    def _prefill_distinct(self, requests: list[Request], reuse: list[tuple[int, int] | None]) -> torch.Tensor:
        """``prefill`` computing each distinct prompt once: a request whose prompt equals an earlier one's (the n
        samples of one prompt) gets a copy of that slot's keys and values, one with a cached prefix (``reuse``)
        computes only the rest; logits (B, V) in request order."""
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(r.prompt_ids), i) for i, r in enumerate(requests)]
        unique = sorted(set(source))
        whole = [i for i in unique if reuse[i] is None]
        rest = [i for i in unique if reuse[i] is not None]
        parts = []
        if whole:
            parts.append(self.prefill([requests[i].slot for i in whole], [requests[i].prompt_ids for i in whole]))
        if rest:
            parts.append(self._prefill_after_prefix([requests[i] for i in rest], [reuse[i] for i in rest]))
        logits = torch.cat(parts)
        for i, src in enumerate(source):
            if src != i:
                self._copy_slot(requests[src].slot, requests[i].slot)
        if self.prefix is not None:
            for request in requests:
                self.prefix.hold(request.slot, request.prompt_ids)
        row = {i: n for n, i in enumerate(whole + rest)}
        return logits[torch.tensor([row[src] for src in source], device=logits.device)]

    def _prefill_after_prefix(self, requests: list[Request], reuse: list[tuple[int, int]]) -> torch.Tensor:
        """Logits (B, V) of each prompt's last token, its first n tokens' keys/values taken from the source slot
        (copied unless it is the request's own) and only the rest computed."""
        for request, (source, n) in zip(requests, reuse):
            if source != request.slot:
                for keys, values in zip(self.cache.keys, self.cache.values):
                    if keys is not None:
                        keys[request.slot, :, :n] = keys[source, :, :n]
                        values[request.slot, :, :n] = values[source, :, :n]
            self.prefix.touch(source)
        chunks = [r.prompt_ids[n:] for r, (_, n) in zip(requests, reuse)]
        hidden = self._extend([r.slot for r in requests], [n for _, n in reuse], chunks)
        for request in requests:
            self.lengths[request.slot] = len(request.prompt_ids)
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.device)
        return self.model.lm_head(hidden[torch.arange(len(chunks), device=self.device), last]).float()

    def _extend(self, slots: Sequence[int], starts: Sequence[int], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Hidden states (B, T, C) of token chunks appended to the slots' cached sequences (chunk i at positions
        starts[i]...), right-padded; the padding is written at the scratch position no sequence holds."""
        width = max(map(len, chunks))
        scratch = self.max_len - 1  # never a cached token: a sequence ends when it reaches max_len tokens
        ids = torch.tensor([list(c) + [0] * (width - len(c)) for c in chunks], dtype=torch.long, device=self.device)
        positions = torch.tensor([[start + j if j < len(c) else scratch for j in range(width)]
                                  for start, c in zip(starts, chunks)], device=self.device)
        key_len = max(start + len(c) for start, c in zip(starts, chunks))
        view = KVCacheView(self.cache, torch.tensor(list(slots), device=self.device), positions, key_len)
        return self.model.hidden_states(ids, kv_cache=view)

    def _copy_slot(self, src: int, dst: int) -> None:
        if self.cache is not None:
            for keys, values in zip(self.cache.keys, self.cache.values):
                if keys is not None:
                    keys[dst] = keys[src]
                    values[dst] = values[src]
        self.lengths[dst] = self.lengths[src]

    def _check_prompt(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise DecodingError("a prompt needs at least one token; start it with <s> (tokenizer.bos_token_id)")
        if len(ids) >= self.max_len:
            raise DecodingError(f"a prompt of {len(ids)} tokens leaves no room to generate within {self.max_len} "
                                "positions; shorten it (prompts.encode_prompt keeps its tail)")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise DecodingError(f"prompt token ids must be ints in [0, {vocab}); "
                                "the tokenizer does not match the model")

    def _new_request(self, ids: Sequence[int], params: SamplingParams, slot: int,
                     generator: torch.Generator | None) -> Request:
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(list(ids), params, slot, generator)
        if params.constraint is not None:
            request.constraint = params.constraint()
        if self.tokenizer is not None:
            keep = frozenset(self._tools.values()) if self._tools else frozenset()  # a tool call's trace is text
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, keep=keep)
            request.stop_matcher = StopStringMatcher(params.stop)
        self.slots[slot] = request
        if params.repetition_penalty != 1.0 and self._seen is None:
            self._seen = torch.zeros(self.n_slots, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        if self._seen is not None:
            self._seen[slot] = False
            self._seen[slot, torch.tensor(request.prompt_ids, device=self.device)] = True
        return request

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write the prompts' keys/values into the given slots from position 0; logits (B, V) of their last tokens.

        Prompts are right-padded to one chunk: attention is causal within it, so padding after a prompt
        never reaches its real tokens, and decoding later overwrites those positions.
        """
        lengths = [len(ids) for ids in prompts]
        width = max(lengths)
        ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        view = None
        if self.cache is not None:
            positions = torch.arange(width, device=self.device).expand(len(prompts), width)
            view = KVCacheView(self.cache, torch.tensor(list(slots), device=self.device), positions, key_len=0)
        hidden = self.model.hidden_states(ids, kv_cache=view)
        last = torch.tensor(lengths, device=self.device) - 1
        for slot, n in zip(slots, lengths):
            self.lengths[slot] = n
        return self.model.lm_head(hidden[torch.arange(len(prompts), device=self.device), last]).float()

    # -- decoding

    @torch.inference_mode()
    def warm_up(self) -> list[int]:
        """Compile the decode step's graphs now (loaded from the disk cache when an earlier process compiled them),
        so no request waits for a compile; a no-op unless compile is "on". One row, then every slot, at the first
        key bucket and the second (after them the row count and the bucket are symbolic: the buckets between reuse
        a graph) and the last (keys over the whole cache, a graph of their own). Every row runs as a free slot:
        nothing is written. Returns the (rows, bucket) pairs run."""
        if self.compile != "on" or self.cache is None:
            return []
        buckets = sorted({key_bucket(n, self.max_len) for n in range(1, self.max_len + 1)})
        buckets = buckets[:2] + buckets[-1:] if len(buckets) > 2 else buckets
        shapes = [(rows, bucket) for bucket in buckets for rows in sorted({1, self.n_slots})]
        self._decode_logits(*self._idle_step_inputs(1, buckets[0]))  # eager first: allocates the cache, packs weights
        for rows, bucket in shapes:
            self._decode(*self._idle_step_inputs(rows, bucket))
        return shapes

    def _idle_step_inputs(self, rows: int, bucket: int) -> tuple[torch.Tensor, KVCacheView]:
        """A decode step's inputs as _cached_step_logits builds them, for ``rows`` free slots (no row writes)."""
        positions = torch.full((rows, 1), self.max_len - 1, dtype=torch.long, device=self.device)
        writes = torch.zeros(rows, dtype=torch.bool, device=self.device)
        view = KVCacheView(self.cache, self._slot_ids[:rows], positions, bucket, slot_range=(0, rows), writes=writes)
        return self._last_tokens[:rows, None], view

    def _decode_logits(self, tokens: torch.Tensor, view: KVCacheView) -> torch.Tensor:
        """One cached forward step: (B, 1) tokens -> float logits (B, V). No host sync: compilable."""
        return self.model.lm_head(self.model.hidden_states(tokens, kv_cache=view)[:, -1]).float()

    def _cached_step_logits(self, active: list[int]) -> torch.Tensor:
        # Rows are the slot range lo..hi-1, so the cache is read through views; free slots inside the range
        # compute a throw-away row (cheaper than gathering the cache of the active ones). Eager, the range starts at
        # the first active slot: the prefix cache places a new prompt in any free slot, and a lone sequence in slot
        # 20 must not pay for 21 rows. With static shapes it starts at 0 (the row count is a graph's symbolic size,
        # the start is not), keys span a bucket and free rows write nothing. Otherwise a free row writes at the
        # scratch position no sequence holds: free slots keep their keys for the prefix cache.
        lo, hi = (0 if self.static_shapes else active[0]), active[-1] + 1
        positions = [self.lengths[s] if self.slots[s] is not None else self.max_len - 1 for s in range(lo, hi)]
        longest = max(self.lengths[s] for s in active) + 1
        key_len = key_bucket(longest, self.max_len) if self.static_shapes else longest
        causal_only = not self.static_shapes and len(active) == hi - lo and min(positions) == key_len - 1
        writes = torch.tensor([r is not None for r in self.slots[:hi]], device=self.device) if self.static_shapes \
            else None
        view = KVCacheView(self.cache, self._slot_ids[lo:hi], torch.tensor(positions, device=self.device)[:, None],
                           key_len, slot_range=(lo, hi), causal_only=causal_only, writes=writes)
        logits = self._decode(self._last_tokens[lo:hi, None], view)
        if len(active) == hi - lo:
            return logits
        return logits[torch.tensor(active, device=self.device) - lo]

    # -- speculative decoding

    def _speculative_step(self, request: Request) -> list[StepOutput] | None:
        """One to k + 1 tokens of a lone sequence from one forward pass: a prompt-lookup draft of up to k tokens,
        fed after the last token and checked against the model (greedy: its argmax; sampling: the acceptance rule);
        the positions refused are left past the slot's length, to be overwritten. None when there is no draft (or
        a penalty or constraint applies, which a draft cannot see): the plain step runs."""
        params, slot = request.params, request.slot
        if params.repetition_penalty != 1.0 or request.constraint is not None:
            return None
        sequence = request.prompt_ids + request.output_ids
        room = min(params.max_new_tokens - len(request.output_ids), self.max_len - len(sequence))
        draft = propose(sequence, self.speculative, limit=room - 1)  # every token fed is one plain decoding feeds
        if not draft:
            return None
        chunk = [request.output_ids[-1]] + draft
        logits = self.model.lm_head(self._extend([slot], [self.lengths[slot]], [chunk])[0]).float()
        if params.do_sample:
            tokens = accept(draft, sampling_probs(logits, params), generator=request.generator)
        else:
            tokens = accept_greedy(draft, logits)
        self.speculation.steps += 1
        self.speculation.drafted += len(draft)
        self.speculation.accepted += len(tokens) - 1
        return self._record_accepted(request, tokens, logits)

    def _record_accepted(self, request: Request, tokens: list[int], logits: torch.Tensor) -> list[StepOutput]:
        """Record verified tokens one by one (as plain steps would: each one's predecessor enters the cache), up to
        the one that ends the sequence or closes a calculator call (its result is then forced in)."""
        outputs, slot = [], request.slot
        for row, token in enumerate(tokens):
            self.lengths[slot] += 1
            scored = requested_logprobs([request], logits[row:row + 1], torch.tensor([token], device=self.device))
            outputs.append(self._record(request, token, *scored[0]))
            if self._seen is not None:
                self._seen[slot, token] = True
            if request.finished:
                return outputs
            self._last_tokens[slot] = token
            forced = self._tool_result(request) if self._tools else None
            if forced:
                return outputs + self._force(request, forced)
        return outputs

    def _recomputed_logits(self, requests: list[Request]) -> torch.Tensor:
        sequences = [r.prompt_ids + r.output_ids for r in requests]
        width = max(map(len, sequences))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids)  # right padding: causal attention is exact for real tokens
        last = torch.tensor([len(s) - 1 for s in sequences], device=self.device)
        return self.model.lm_head(hidden[torch.arange(len(sequences), device=self.device), last]).float()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Decode one token for every active sequence in one batched forward pass; finished ones free their slot."""
        outputs, self._pending = self._pending, []
        active = [slot for slot, r in enumerate(self.slots) if r is not None]
        if not active:
            return outputs
        requests = [self.slots[s] for s in active]
        if self.speculative is not None and len(requests) == 1:
            drafted = self._speculative_step(requests[0])
            if drafted is not None:
                return outputs + drafted
        if self.cache is None:
            logits = self._recomputed_logits(requests)
        else:
            logits = self._cached_step_logits(active)
            for slot in active:
                self.lengths[slot] += 1
        return outputs + self._emit(requests, logits)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """One token per row with each request's own settings; rows drawing from the same generator share one draw."""
        penalties = [r.params.repetition_penalty for r in requests]
        if any(p != 1.0 for p in penalties):
            seen = self._seen[torch.tensor([r.slot for r in requests], device=self.device)]
            logits = apply_repetition_penalty(logits, seen, torch.tensor(penalties, device=self.device)[:, None])
        if any(r.constraint is not None for r in requests):  # grammars: only their tokens (none: no cost)
            logits = apply_constraints(logits, [r.constraint for r in requests])
        tokens = logits.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for row, r in enumerate(requests):
            if r.params.do_sample:
                p = r.params
                groups.setdefault((p.temperature, p.top_k, p.top_p, id(r.generator)), []).append(row)
        for (temperature, top_k, top_p, _), rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            scaled = logits[index] / max(temperature, MIN_TEMPERATURE)
            generator = requests[rows[0]].generator
            if top_k and top_k < scaled.size(-1):  # the softmax over V is most of a small model's step time
                values, candidates = top_k_candidates(scaled, top_k)
                choice = torch.multinomial(apply_top_p(values, top_p).softmax(dim=-1), 1, generator=generator)
                tokens[index] = candidates.gather(1, choice).squeeze(1)
            else:
                filtered = apply_top_p(scaled, top_p)
                tokens[index] = torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(1)
        return tokens

    def _emit(self, requests: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        tokens = self._sample(requests, logits)
        slots = torch.tensor([r.slot for r in requests], device=self.device)
        self._last_tokens[slots] = tokens
        if self._seen is not None:
            self._seen[slots, tokens] = True
        scored = requested_logprobs(requests, logits, tokens)
        # The one host sync per step: EOS, stop strings and streaming need the ids on the host.
        outputs = [self._record(r, token, *lp) for r, token, lp in zip(requests, tokens.tolist(), scored)]
        return self._run_tools(outputs) if self._tools else outputs

    # -- tools

    def _run_tools(self, outputs: list[StepOutput]) -> list[StepOutput]:
        """The outputs, each calculator call that one of them ended followed by its result (forced into the
        sequence) and the token sampled after it: the slot goes on decoding, in the same batch from the next step."""
        out = []
        for output in outputs:
            out.append(output)
            forced = None if output.finished else self._tool_result(output.request)
            if forced:
                out += self._force(output.request, forced)
        return out

    def _tool_result(self, request: Request) -> list[int] | None:
        """``<|tool_result|> result <|/tool_result|>`` ids when the request's last token closed a call it opened
        (and its calculator is on); None otherwise. The result of a broken call is an error the model reads."""
        ids = request.output_ids
        if not request.params.calculator or ids[-1] != self._tools[TOOL_CALL_END] \
                or self._tools[TOOL_CALL] not in ids:
            return None
        start = len(ids) - 1 - ids[::-1].index(self._tools[TOOL_CALL])
        if self._tools[TOOL_CALL_END] in ids[start + 1:-1]:  # a stray end after an answered call: no new call
            return None
        name, arguments = parse_call(self.tokenizer.decode(ids[start + 1:-1], skip_special_tokens=True))
        expression = arguments.get("expression") if isinstance(arguments, dict) else None
        result = calculator.evaluate(expression) if name == CALCULATOR else f"error: no tool named {name!r}"
        return [self._tools[TOOL_RESULT], *self.tokenizer.encode_ordinary(result), self._tools[TOOL_RESULT_END]]

    def _force(self, request: Request, forced: list[int]) -> list[StepOutput]:
        """Record ``forced`` as the request's next tokens (text, stop strings and limits as any token), write them
        into its cache after the call's last token in one forward pass (a prompt continuation), and sample on."""
        outputs = []
        for token in forced:
            outputs.append(self._record(request, token))
            if request.finished:  # out of room, or a stop string: the result is cut there
                return outputs
        chunk = request.output_ids[-len(forced) - 1:]  # the call's end (not yet in the cache) and the result
        if self._seen is not None:
            self._seen[request.slot, torch.tensor(forced, device=self.device)] = True
        return outputs + self._emit([request], self._continue_logits(request, chunk))

    def _continue_logits(self, request: Request, chunk: list[int]) -> torch.Tensor:
        """Logits (1, V) after ``chunk`` appended to the request's cached sequence (recomputed without a cache)."""
        if self.cache is None:
            return self._recomputed_logits([request])
        slot, start = request.slot, self.lengths[request.slot]
        hidden = self._extend([slot], [start], [chunk])
        self.lengths[slot] = start + len(chunk)
        return self.model.lm_head(hidden[:, -1]).float()

    def _record(self, request: Request, token: int, logprob: float | None = None,
                top: tuple[tuple[int, float], ...] | None = None) -> StepOutput:
        params = request.params
        request.output_ids.append(token)
        if request.constraint is not None:
            request.constraint.accept(token)
        text, reason = "", None
        if request.detokenizer is not None:
            text, stopped = request.stop_matcher.push(request.detokenizer.push(token))
            reason = "stop" if stopped else None
        if reason is None:
            if params.eos_token_id is not None and token == params.eos_token_id:
                reason = "eos"
            elif len(request.output_ids) >= params.max_new_tokens \
                    or len(request.prompt_ids) + len(request.output_ids) >= self.max_len:
                reason = "length"
            if reason is not None and request.detokenizer is not None:
                tail, stopped = request.stop_matcher.push(request.detokenizer.flush())
                text += tail if stopped else tail + request.stop_matcher.flush()
                reason = "stop" if stopped else reason
        request.text += text
        if reason is not None:
            request.finish_reason = reason
            self._free(request)
        return StepOutput(request, token, text, reason is not None, logprob, top)

    # -- drivers

    def run(self, prompts: Sequence[Sequence[int]],
            params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
            generator: torch.Generator | None = None,
            on_output: Callable[[StepOutput], None] | None = None) -> list[Request]:
        """Decode every prompt, admitting waiting ones as slots free up (continuous batching); in input order."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        waiting = list(zip(prompts, params))
        done: list[Request] = []
        while waiting or self.has_work:
            admit = min(len(waiting), len(self.free_slots))
            if admit:
                batch, waiting = waiting[:admit], waiting[admit:]
                done += self.add_many([ids for ids, _ in batch], [p for _, p in batch], generator)
            for out in self.step():
                if on_output is not None:
                    on_output(out)
        return done

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
               generator: torch.Generator | None = None) -> Iterator[str]:
        """Text of one new sequence as it is generated (whole characters; the pieces join to the full text)."""
        if self.tokenizer is None:
            raise DecodingError("streaming text needs the engine's tokenizer: DecodeEngine(model, tokenizer)")
        request = self.add(prompt_ids, params, generator)
        while not request.finished or self._pending:
            for out in self.step():
                if out.request is request and out.text:
                    yield out.text


def tool_token_ids(tokenizer) -> dict[str, int] | None:
    """The ids of the tool-call tokens (``prompts.TOOL_TOKENS``) in ``tokenizer``; None when it lacks any."""
    lookup = getattr(tokenizer, "special_token_id", None)
    ids = {token: lookup(token) for token in TOOL_TOKENS} if lookup is not None else {}
    return ids if ids and None not in ids.values() else None


def visible_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids as the engine streams it: tool-call tokens written out (a call and its result stay
    readable, and render back into the same tokens), every other special token dropped."""
    tools = {i: token for token, i in (tool_token_ids(tokenizer) or {}).items()}
    pieces, run = [], []
    for token in ids:
        if token in tools:
            pieces += [tokenizer.decode(run), tools[token]]
            run = []
        else:
            run.append(token)
    return "".join([*pieces, tokenizer.decode(run)])


def sampled_mask(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Per generated token, whether the model sampled it: False inside a tool result the engine forced in
    (``<|tool_result|>`` … ``<|/tool_result|>``), which a policy-gradient loss must not score."""
    tools = tool_token_ids(tokenizer)
    if tools is None:
        return [True] * len(ids)
    mask, forced = [], False
    for token in ids:
        forced = forced or token == tools[TOOL_RESULT]
        mask.append(not forced)
        forced = forced and token != tools[TOOL_RESULT_END]
    return mask


def requested_logprobs(requests: Sequence[Request], logits: torch.Tensor,
                       tokens: torch.Tensor) -> list[tuple[float | None, tuple[tuple[int, float], ...] | None]]:
    """(log-prob of the chosen token, its top-k (id, log-prob)) per row under the raw model (temperature 1, no
    filter, as OpenAI reports them); (None, None) for the rows that did not ask. Computed only when one did."""
    wanted = [r.params.logprobs for r in requests]
    if all(k is None for k in wanted):
        return [(None, None)] * len(requests)
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    k = max(w for w in wanted if w is not None)
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], tokens[:, None][:, :0])
    values, ids = values.tolist(), ids.tolist()
    return [(None, None) if w is None else (chosen[i], tuple(zip(ids[i][:w], values[i][:w])))
            for i, w in enumerate(wanted)]


# ----------------------------------------------------------------------------- batch helpers


def generate_responses(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       batch_size: int = 64, generator: torch.Generator | None = None,
                       on_finish: Callable[[], None] | None = None, max_len: int | None = None,
                       use_cache: bool = True, tokenizer=None) -> list[list[int]]:
    """Each prompt's new ids (its EOS included when one was emitted), in input order, with continuous batching over
    ``batch_size`` slots. Every prompt has its own room, min(max_new_tokens, max_len (default: the context) − its
    length): in one left-padded tensor the longest prompt would cap every row's answer. With the ``tokenizer`` of a
    model trained with tool calls, its calculator calls run (``params.calculator``) and their results are in the ids."""
    if not prompts:
        return []
    was_training = model.training
    try:
        engine = DecodeEngine(model, tokenizer, n_slots=min(batch_size, len(prompts)), max_len=max_len,
                              use_cache=use_cache)
        report = None if on_finish is None else (lambda out: on_finish() if out.finished else None)
        return [request.output_ids for request in engine.run(prompts, params, generator, report)]
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, params: SamplingParams = SamplingParams(),
             attention_mask: torch.Tensor | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue left-padded prompts; returns (B, prompt_len + new) with the prompt included.

    At most max_seq_len - prompt_len new tokens are produced (the context window is never exceeded). Rows that
    emitted ``params.eos_token_id`` are filled with the model's pad_token_id; generation stops once all rows did.
    use_cache=False recomputes the whole sequence each step (slow; for verification and benchmarks). The model's
    training mode is restored; the result is a plain tensor (PPO feeds it back with gradients).
    """
    model.check_inputs(input_ids, attention_mask, 0)
    batch, width = input_ids.shape
    context = model.config.max_seq_len
    if width == 0:
        raise DecodingError("generate needs a non-empty prompt; start it with the <s> token (tokenizer.bos_token_id)")
    if width >= context:
        raise DecodingError(f"prompt length {width} leaves no room to generate within max_seq_len {context}; "
                            "shorten the prompt")
    n_new = min(params.max_new_tokens, context - width)
    rows = input_ids.tolist()
    masks = attention_mask.tolist() if attention_mask is not None else [[1] * width] * batch
    prompts = [[t for t, m in zip(row, mask) if m] for row, mask in zip(rows, masks)]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise DecodingError(f"row {empty[0]} of attention_mask has no real token; every prompt needs at least <s>")
    outputs = generate_responses(model, prompts, dataclasses.replace(params, max_new_tokens=n_new), batch, generator,
                                 max_len=max(map(len, prompts)) + n_new, use_cache=use_cache)
    steps = max(map(len, outputs))
    out = torch.full((batch, width + steps), model.config.pad_token_id, dtype=torch.long)
    out[:, :width] = input_ids.cpu()
    for row, ids in enumerate(outputs):
        out[row, width:width + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out.to(input_ids.device)
