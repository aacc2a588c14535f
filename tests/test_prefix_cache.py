"""prefix_cache: chained block hashes, the longest held prefix, eviction; and the engine reusing held keys/values with
the tokens and logits of a full prefill (learned and rotary positions, INT8)."""
from __future__ import annotations

import copy

import pytest
import torch

import prefix_cache
from decoding import DecodeEngine, SamplingParams
from gpt_model import GPTModel
from prefix_cache import BLOCK, PrefixIndex, block_hashes
from quantization import fbgemm_available, quantize_model_int8

SHAPES = {"gpt2": {}, "rope": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False)}
GREEDY_LP = SamplingParams(max_new_tokens=10, do_sample=False, logprobs=5)


def ids(n: int, offset: int = 0) -> list[int]:
    return [(7 * i + offset) % 90 + 3 for i in range(n)]


# ----------------------------------------------------------------------------- the index


def test_block_hashes_cover_every_token_before_them():
    a, b = ids(50), ids(50)
    b[3] += 1  # a change in block 0 changes every later hash; one in the partial tail changes none
    assert len(block_hashes(a)) == 50 // BLOCK
    assert all(x != y for x, y in zip(block_hashes(a), block_hashes(b)))
    assert block_hashes(a) == block_hashes(a[:48] + [1, 2])
    assert block_hashes(a[:16] + ids(16, 5))[0] == block_hashes(a)[0]


def test_longest_match_is_block_aligned_and_leaves_a_token_to_compute():
    index = PrefixIndex(n_slots=3)
    index.hold(0, ids(40))      # blocks 0, 1 indexed (32 tokens)
    index.hold(1, ids(20))      # block 0
    index.hold(2, ids(40, 1))   # nothing in common
    assert index.held[0] == ids(32)
    assert index.longest(ids(60)) == (frozenset({0}), 32)
    assert index.longest(ids(33)) == (frozenset({0}), 32)
    assert index.longest(ids(32)) == (frozenset({0, 1}), 16)  # the last token is computed: 31 usable, one block
    assert index.longest(ids(60), exclude={0}) == (frozenset({1}), 16)
    assert index.longest(ids(15)) is None and index.longest(ids(60, 2)) is None
    index.drop(0)
    assert index.longest(ids(60)) == (frozenset({1}), 16)


def test_a_hash_collision_costs_a_miss_never_a_wrong_prefix(monkeypatch):
    monkeypatch.setattr(prefix_cache, "block_hashes", lambda tokens, block=BLOCK: [1] * (len(tokens) // block))
    index = PrefixIndex(n_slots=2)
    index.hold(0, ids(40))
    assert index.longest(ids(40, 1)) is None  # same hashes, other tokens
    assert index.longest(ids(40)) == (frozenset({0}), 32)


def test_victim_is_an_empty_slot_else_the_least_recently_used():
    index = PrefixIndex(n_slots=4)
    for slot in (2, 0, 1):
        index.hold(slot, ids(20, slot))
    assert index.victim([0, 1, 2, 3]) == 3
    assert index.victim([0, 1, 2]) == 2
    index.touch(2)
    assert index.victim([0, 1, 2]) == 0


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(params=SHAPES)
def model(request) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=96, max_seq_len=128,
                    **SHAPES[request.param]).eval()


class CountingModel(torch.nn.Module):
    """The model, counting the tokens each forward pass computes."""

    def __init__(self, inner: GPTModel):
        super().__init__()
        self.inner, self.config, self.widths, self.rows = inner, inner.config, [], []

    def hidden_states(self, input_ids, **kwargs):
        self.widths.append(input_ids.shape[1])
        self.rows.append(input_ids.shape[0])
        return self.inner.hidden_states(input_ids, **kwargs)

    def lm_head(self, hidden):
        return self.inner.lm_head(hidden)


def chat_turns(engine: DecodeEngine, turns: int = 4) -> list:
    """Each turn's request: the previous prompt, its reply and a new user message (the history grows)."""
    prompt, requests = ids(20), []
    for turn in range(turns):
        request = engine.run([prompt], GREEDY_LP)[0]
        requests.append(request)
        prompt = prompt + request.output_ids + ids(7, turn + 11)
    return requests


def assert_same(got: list, expected: list, atol: float) -> None:
    """Equal tokens with top log-probs within atol; under INT8's per-call activation scales a token may differ only
    where the reference had a near-tie (top-2 gap within the noise), and the chats part there."""
    for a, b in zip(got, expected):
        for token, x, y in zip(a.output_ids, a.top_logprobs_seen, b.top_logprobs_seen):
            if atol > 1e-5 and x[0][0] != y[0][0]:
                assert y[0][1] - y[1][1] < atol, "a token changed where the model was not near a tie"
                return
            assert x[0][0] == y[0][0] == token and (atol > 1e-5 or [t for t, _ in x] == [t for t, _ in y])
            torch.testing.assert_close(torch.tensor([v for _, v in x]), torch.tensor([v for _, v in y]),
                                       atol=atol, rtol=0)
        assert a.output_ids == b.output_ids


def recorded(engine: DecodeEngine) -> DecodeEngine:
    """The engine, keeping each request's top log-probs per token (the raw model's, as the logits' log-softmax)."""
    record = engine._record

    def keep(request, token, logprob=None, top=None):
        request.__dict__.setdefault("top_logprobs_seen", []).append(top)
        return record(request, token, logprob, top)
    engine._record = keep
    return engine


# fbgemm's INT8 kernel quantizes activations with one scale per call, so which rows share a forward pass moves its
# logits by ~1e-3 (as batching does without any cache); the weight-only kernel is exact per row
KERNELS = [None, "dequant", pytest.param("fbgemm", marks=pytest.mark.skipif(not fbgemm_available(), reason="x86"))]
TOLERANCE = {None: 1e-5, "dequant": 1e-5, "fbgemm": 2e-2}


@pytest.mark.parametrize("int8", KERNELS)
def test_a_chat_reuses_its_history_with_the_tokens_and_logits_of_a_full_prefill(model, int8):
    if int8 is not None:
        model = quantize_model_int8(copy.deepcopy(model), kernel=int8)
    cached, plain = CountingModel(model), CountingModel(model)
    got = chat_turns(recorded(DecodeEngine(cached, n_slots=2)))
    expected = chat_turns(recorded(DecodeEngine(plain, n_slots=2, prefix_cache=False)))
    assert_same(got, expected, TOLERANCE[int8])
    prefills_cached = [w for w in cached.widths if w > 1]
    prefills_plain = [w for w in plain.widths if w > 1]
    assert prefills_plain == [len(r.prompt_ids) for r in expected]
    assert prefills_cached[0] == prefills_plain[0]  # nothing held yet
    for before, request, width in zip(got, got[1:], prefills_cached[1:]):
        in_cache = len(before.prompt_ids) + len(before.output_ids) - 1  # the last reply token was never fed
        held = min(in_cache, len(request.prompt_ids) - 1) // BLOCK * BLOCK  # whole blocks, the last token computed
        assert held > 0 and width == len(request.prompt_ids) - held
    assert {r.slot for r in got} == {0}  # reused in place


def test_a_shared_system_prefix_is_copied_from_a_running_slot(model):
    system = ids(34)
    prompts = [system + ids(5, 1), system + ids(9, 2), ids(30, 3)]
    engine = DecodeEngine(model, n_slots=3)
    first = engine.add(prompts[0], GREEDY_LP)
    second = engine.add_many(prompts[1:], GREEDY_LP)
    assert engine.prefix.held[second[0].slot][:32] == system[:32] and first.slot != second[0].slot
    while engine.has_work:
        engine.step()
    expected = DecodeEngine(model, n_slots=3, prefix_cache=False).run(prompts, GREEDY_LP)
    assert [r.output_ids for r in [first] + second] == [r.output_ids for r in expected]


def test_continuous_batching_over_held_slots_matches_no_prefix_cache(model):
    """More prompts than slots, sharing prefixes and repeating: slots are evicted and reused, answers unchanged."""
    base = ids(40)
    prompts = [base[:n] + ids(3, n) for n in (17, 33, 20, 40, 17)] + [ids(25, 4), base[:33] + ids(3, 33)]
    params = SamplingParams(max_new_tokens=6, do_sample=True, seed=3, top_k=5)
    got = DecodeEngine(model, n_slots=2).run(prompts, params)
    expected = DecodeEngine(model, n_slots=2, prefix_cache=False).run(prompts, params)
    assert [r.output_ids for r in got] == [r.output_ids for r in expected]


def test_a_sequence_in_a_high_slot_steps_only_the_rows_from_the_first_active_slot(model):
    """Distinct prompts fill slots 0, 1, 2 (each keeps its prefix); the fourth lands in slot 3 and its decode steps
    compute one row, not four; two sequences in slots 1 and 3 step three rows. Tokens as without the cache."""
    prompts = [ids(20, n) for n in range(4)]
    counting = CountingModel(model)
    engine = DecodeEngine(counting, n_slots=4)
    for prompt in prompts[:3]:
        engine.run([prompt], GREEDY_LP)
    counting.rows.clear()
    lone = engine.run([prompts[3]], GREEDY_LP)[0]
    assert lone.slot == 3 and counting.rows == [1] * len(counting.rows) and len(counting.rows) > 1
    expected = DecodeEngine(model, n_slots=4, prefix_cache=False).run(prompts[3:], GREEDY_LP)[0]
    assert lone.output_ids == expected.output_ids

    first = engine.add(prompts[1] + ids(3, 9), GREEDY_LP)  # reuses slot 1's prefix in place
    counting.rows.clear()
    second = engine.add(prompts[3] + ids(3, 8), GREEDY_LP)  # and slot 3's
    while engine.has_work:
        engine.step()
    assert (first.slot, second.slot) == (1, 3) and max(counting.rows) == 3  # slots 1..3, slot 2 a throw-away row
    expected = DecodeEngine(model, n_slots=4, prefix_cache=False).run(
        [prompts[1] + ids(3, 9), prompts[3] + ids(3, 8)], GREEDY_LP)
    assert [first.output_ids, second.output_ids] == [r.output_ids for r in expected]
