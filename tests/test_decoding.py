"""The decode engine (slots joining and leaving, per-sequence sampling, stop strings, streaming) and prompt helpers."""
from __future__ import annotations

import copy

import pytest
import torch

import decoding

from decoding import (COMPILE_MODES, DecodeEngine, DecodingError, IncrementalDetokenizer, SamplingParams,
                      StopStringMatcher, apply_repetition_penalty, apply_top_p, cut_at_eos, generate, key_bucket,
                      left_pad, sampled_mask, top_k_candidates, visible_text)
from devices import autocast_context
from gpt_model import GPTConfig, GPTModel
from prompts import (CHAT_TOKENS, TOOL_CALL, TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END, encode_prompt,
                     max_prompt_len)
from quantization import quantize_model_int8

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=48)
GREEDY = SamplingParams(max_new_tokens=12, do_sample=False)
PROMPTS = [[0, 3, 4, 5, 6, 7], [0, 8], [0, 9, 10, 11], [0, 12, 13, 14, 15, 16, 17, 18]]


# GPT-2's shape, and the modern one: rotary positions (cached keys rotated at their own slot positions, left-padded
# rows at their real-token positions), RMSNorm, q/k norms, SwiGLU, grouped-query attention (a 2-head KV cache).
SHAPES = {"gpt2": {}, "modern": dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2,
                                     bias=False, tie_embeddings=False)}


@pytest.fixture(params=SHAPES)
def model(request) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(**SMALL, **SHAPES[request.param]).eval()


@pytest.fixture()
def text_model(tiny_tokenizer) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64).eval()


def alone(model: GPTModel, prompt: list[int], params: SamplingParams, tokenizer=None) -> list[int]:
    engine = DecodeEngine(model, tokenizer, n_slots=1)
    return engine.run([prompt], params)[0].output_ids


def reference_greedy(model: GPTModel, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens by full recomputation, and the top-1 minus top-2 logit gap at each step."""
    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            top = model(torch.tensor([ids]))["logits"][0, -1].topk(2)
            ids.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
    return ids[len(prompt):], gaps


def assert_same_greedy(got: list[int], expected: list[int], gaps: list[float]) -> None:
    """Equal tokens; a difference is only allowed where the reference had a near-tie (batched rounding)."""
    for step, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert gaps[step] < 1e-4, f"step {step}: {a} != {b} with a top-2 gap of {gaps[step]}"
            return
    assert len(got) == len(expected)


# ----------------------------------------------------------------------------- sampling processors


def test_sampling_processors_match_transformers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    history = torch.randint(0, 50, (4, 12))
    values, ids = top_k_candidates(logits, 7)  # the engine samples among these: as if the rest were masked to -inf
    masked = torch.full_like(logits, float("-inf")).scatter(-1, ids, values)
    assert torch.equal(masked, TopKLogitsWarper(7)(history, logits.clone()))
    assert torch.equal(apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(history, logits.clone()))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)
    per_row = torch.tensor([[1.3], [1.0], [2.0], [1.3]])  # one penalty per sequence
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, per_row)[1], logits[1])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, per_row)[3], expected[3])


def test_sampling_params_validation():
    for bad in (dict(max_new_tokens=0), dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                dict(repetition_penalty=0.0)):
        with pytest.raises(DecodingError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0.0, do_sample=False).stop == ()
    assert SamplingParams(stop="\n").stop == ("\n",)


# ----------------------------------------------------------------------------- engine


def test_greedy_matches_full_recomputation(model):
    expected, gaps = reference_greedy(model, PROMPTS[0], 12)
    assert_same_greedy(alone(model, PROMPTS[0], GREEDY), expected, gaps)


def test_sequences_joining_a_busy_batch_mid_way_match_running_alone(model):
    engine = DecodeEngine(model, n_slots=3)
    requests = [engine.add(PROMPTS[0], GREEDY)]
    for step in range(30):
        if step == 2:
            requests.append(engine.add(PROMPTS[1], SamplingParams(max_new_tokens=3, do_sample=False)))
        if step == 4:
            requests += engine.add_many(PROMPTS[2:], GREEDY)  # one batched prefill into slots 1 (freed) and 2
        engine.step()
    assert not engine.has_work and all(r.finish_reason == "length" for r in requests)
    for request in requests:
        expected, gaps = reference_greedy(model, request.prompt_ids, request.params.max_new_tokens)
        assert_same_greedy(request.output_ids, expected, gaps)


def test_a_freed_slot_is_reused_at_once(model):
    engine = DecodeEngine(model, n_slots=2)
    short = engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2, do_sample=False))
    long = engine.add(PROMPTS[1], GREEDY)
    engine.step()  # returns both first tokens, decodes the second ones: short is done
    assert short.finished and engine.free_slots == [short.slot]
    late = engine.add(PROMPTS[3], GREEDY)
    assert late.slot == short.slot
    while engine.has_work:
        engine.step()
    assert late.output_ids == alone(model, PROMPTS[3], GREEDY) and long.output_ids == alone(model, PROMPTS[1], GREEDY)
    with pytest.raises(DecodingError, match="free slots"):
        DecodeEngine(model, n_slots=1).add_many(PROMPTS[:2], GREEDY)


def test_per_sequence_seeds_reproduce_whatever_shares_the_batch(model):
    params = SamplingParams(max_new_tokens=15, temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7)
    solo = alone(model, PROMPTS[2], params)
    engine = DecodeEngine(model, n_slots=4)
    engine.add_many(PROMPTS[:2], [SamplingParams(seed=1), SamplingParams(temperature=0.7, seed=2)])
    engine.step()
    busy = engine.add(PROMPTS[2], params)
    engine.add(PROMPTS[3], GREEDY)
    while engine.has_work:
        engine.step()
    assert busy.output_ids == solo
    assert alone(model, PROMPTS[2], SamplingParams(max_new_tokens=15, temperature=1.5, seed=8)) != solo


def test_eos_and_context_end_finish_a_sequence(model):
    free = alone(model, PROMPTS[0], GREEDY)
    eos = free[3]
    params = SamplingParams(max_new_tokens=12, do_sample=False, eos_token_id=eos)
    stopped = DecodeEngine(model).run([PROMPTS[0]], params)[0]
    assert stopped.output_ids == free[:free.index(eos) + 1] and stopped.finish_reason == "eos"
    engine = DecodeEngine(model, n_slots=1, max_len=10)
    full = engine.run([PROMPTS[0]], GREEDY)[0]
    assert len(full.prompt_ids) + len(full.output_ids) == 10 and full.finish_reason == "length"
    with pytest.raises(DecodingError, match="no room"):
        engine.add(list(range(10)), GREEDY)
    with pytest.raises(DecodingError, match="at least one token"):
        engine.add([], GREEDY)


def test_uncached_engine_matches_cached(model):
    cached = DecodeEngine(model, n_slots=4).run(PROMPTS, GREEDY)
    uncached = DecodeEngine(model, n_slots=4, use_cache=False).run(PROMPTS, GREEDY)
    assert [r.output_ids for r in cached] == [r.output_ids for r in uncached]


def test_run_queues_more_prompts_than_slots(model):
    queued = DecodeEngine(model, n_slots=2).run(PROMPTS, GREEDY)
    assert [r.output_ids for r in queued] == [alone(model, p, GREEDY) for p in PROMPTS]


# ----------------------------------------------------------------------------- text: stop strings and streaming


def test_stop_string_matcher_holds_back_possible_starts():
    matcher = StopStringMatcher(["</end>", "\n\n"])
    assert matcher.push("Hello </") == ("Hello ", False)  # "</" may start "</end>"
    assert matcher.push("b>") == ("</b>", False)
    assert matcher.push(" bye\n") == (" bye", False)
    assert matcher.push("\nrest") == ("", True)  # "\n\n" spans two pieces; nothing after it is emitted
    matcher = StopStringMatcher(["xyz"])
    assert matcher.push("ab") == ("ab", False) and matcher.push("x") == ("", False) and matcher.flush() == "x"


def test_incremental_detokenizer_never_splits_a_character(tiny_tokenizer):
    text = "床前明月光，疑是地上霜。😀 Hamlet 🎭 舉頭望明月"
    ids = tiny_tokenizer.encode_ordinary(text)
    detok = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    split = [i for i in ids if len(tiny_tokenizer.decode_bytes([i])) and not tiny_tokenizer.decode_bytes([i]).decode(
        "utf-8", errors="ignore")]
    assert split, "the test needs tokens that hold part of a character"


def test_detokenizer_pieces_join_to_the_full_decode_for_any_ids(tiny_tokenizer):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, len(tiny_tokenizer), (40,), generator=generator).tolist()
        detok = IncrementalDetokenizer(tiny_tokenizer)
        assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == tiny_tokenizer.decode(ids)


def test_stop_strings_cut_the_text(text_model, tiny_tokenizer):
    prompt = encode_prompt(tiny_tokenizer, "ROMEO:", 16)
    params = SamplingParams(max_new_tokens=30, seed=3, temperature=1.0)
    free = DecodeEngine(text_model, tiny_tokenizer).run([prompt], params)[0]
    assert free.text == tiny_tokenizer.decode(free.output_ids)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    assert len(stop) == 2
    params = SamplingParams(max_new_tokens=30, seed=3, stop=(stop,))
    cut = DecodeEngine(text_model, tiny_tokenizer).run([prompt], params)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    assert cut.output_ids == free.output_ids[:len(cut.output_ids)]


def test_stream_pieces_join_to_the_full_text(text_model, tiny_tokenizer):
    prompt = encode_prompt(tiny_tokenizer, "床前明月光", 16)
    params = SamplingParams(max_new_tokens=40, seed=5, temperature=1.5, top_k=0)  # random bytes: split characters
    pieces = list(DecodeEngine(text_model, tiny_tokenizer, n_slots=1).stream(prompt, params))
    full = DecodeEngine(text_model, tiny_tokenizer).run([prompt], params)[0]
    assert "".join(pieces) == full.text == tiny_tokenizer.decode(full.output_ids)
    # a U+FFFD only where the generated bytes themselves are invalid UTF-8, never from splitting
    assert sum(p.count("\ufffd") for p in pieces) == full.text.count("\ufffd")


# ----------------------------------------------------------------------------- prompt helpers


def test_prompt_helpers(tiny_tokenizer):
    ids = encode_prompt(tiny_tokenizer, "To be, or not to be", 100)
    assert ids == [tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode_ordinary("To be, or not to be")
    with pytest.warns(UserWarning, match="was cut"):
        cut = encode_prompt(tiny_tokenizer, "To be, or not to be", 4)
    assert cut == [tiny_tokenizer.bos_token_id] + ids[-3:]
    assert max_prompt_len(64, 100) == 48 and max_prompt_len(64, 5) == 59 and max_prompt_len(64, 0) == 63
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=1)
    assert input_ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos([4, 5, 2, 6, 2], 2) == [4, 5] and cut_at_eos([4, 5], 2) == [4, 5] and cut_at_eos([4], None) == [4]


def test_top_k_sampling_draws_from_the_top_k_softmax(model):
    """Drawing among the k candidates must give the distribution of the masked full-vocabulary softmax."""
    prompt = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        logits = model(prompt)["logits"][0, -1]
    top = torch.topk(logits, 3)
    expected = top.values.softmax(-1)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=1, top_k=3, temperature=1.0)
    first = [int(generate(model, prompt, params, generator=generator)[0, -1]) for _ in range(600)]
    assert set(first) <= set(top.indices.tolist())
    counts = torch.tensor([first.count(int(i)) for i in top.indices], dtype=torch.float) / len(first)
    assert torch.allclose(counts, expected, atol=0.06), (counts, expected)


def test_samples_of_one_prompt_share_one_prefill_and_match_running_alone(model, monkeypatch):
    engine = DecodeEngine(model, n_slots=4)
    rows = []
    original = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda slots, prompts: rows.append(len(prompts)) or original(slots, prompts))
    seeds = [SamplingParams(max_new_tokens=12, temperature=1.3, repetition_penalty=1.1, seed=s) for s in (3, 4, 5)]
    requests = engine.add_many([PROMPTS[1]] * 3 + [PROMPTS[2]], [*seeds, GREEDY])
    while engine.has_work:
        engine.step()
    assert rows == [2]  # two distinct prompts computed, the other two samples copied their keys and values
    for request, params in zip(requests, seeds):
        assert request.output_ids == alone(model, PROMPTS[1], params)
    assert requests[3].output_ids == alone(model, PROMPTS[2], GREEDY)
    assert len({tuple(r.output_ids) for r in requests[:3]}) > 1  # the seeds differ, so do the samples


def test_logprobs_are_the_raw_models_log_softmax_at_each_step(model):
    params = SamplingParams(max_new_tokens=6, temperature=1.7, top_k=5, seed=0, logprobs=3)
    engine = DecodeEngine(model, n_slots=2)
    request = engine.add(PROMPTS[0], params)
    engine.add(PROMPTS[1], GREEDY)  # a neighbour without logprobs gets none
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    mine = [o for o in outputs if o.request is request]
    assert all(o.logprob is None and o.top_logprobs is None for o in outputs if o.request is not request)
    ids = list(PROMPTS[0]) + request.output_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids]))["logits"][0].log_softmax(-1)
    for i, out in enumerate(mine):
        row = logp[len(PROMPTS[0]) - 1 + i]
        assert out.logprob == pytest.approx(float(row[out.token_id]), abs=1e-4)
        values, top = row.topk(3)
        assert [t for t, _ in out.top_logprobs] == top.tolist()
        assert [v for _, v in out.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    with pytest.raises(DecodingError, match="logprobs"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("extreme", [dict(temperature=1e-45), dict(top_p=1e-300), dict(temperature=1e-45, top_k=5),
                                     dict(top_p=1e-300, top_k=0, temperature=1e-30)])
def test_degenerate_sampling_values_sample_like_greedy_instead_of_failing(model, extreme):
    params = SamplingParams(max_new_tokens=6, seed=0, **extreme)
    assert alone(model, PROMPTS[0], params) == alone(model, PROMPTS[0], GREEDY)[:6]  # the limit of the distribution
    with pytest.raises(DecodingError, match="repetition_penalty must be >= 0.01"):
        SamplingParams(repetition_penalty=1e-45)


def test_a_prefill_that_fails_leaves_no_slot_taken(model, monkeypatch):
    engine = DecodeEngine(model, n_slots=2)
    monkeypatch.setattr(engine, "_sample", lambda requests, logits: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        engine.add_many([PROMPTS[0], PROMPTS[1]], GREEDY)
    assert engine.slots == [None, None] and not engine.has_work
    monkeypatch.undo()
    assert engine.run([PROMPTS[0]], GREEDY)[0].output_ids == alone(model, PROMPTS[0], GREEDY)


def test_a_character_cut_off_at_the_end_is_left_out_not_shown_as_u_fffd(tiny_tokenizer):
    tok = tiny_tokenizer
    raw = "静夜思".encode("utf-8")
    ids = [tok._byte_ids[b] for b in raw[:-1]]  # the last character's final byte never came
    assert tok.decode(ids) == "静夜" and tok.decode(ids[:-1]) == "静夜"
    assert tok.decode([tok._byte_ids[0xFF], *ids[:3]]) == "\ufffd静"  # invalid bytes elsewhere stay visible
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == "静夜" == tok.decode(ids)


# ----------------------------------------------------------------------------- the static-shape and compiled step


def staggered(engine: DecodeEngine, prompts: list[list[int]], params: SamplingParams, every: int = 3) -> list:
    """Each prompt's output ids, the prompts joining one every ``every`` steps (so the active count changes)."""
    waiting, requests, step = list(prompts), [], 0
    while waiting or engine.has_work:
        if waiting and step % every == 0:
            requests.append(engine.add(waiting.pop(0), params))
        engine.step()
        step += 1
    return [r.output_ids for r in requests]


def test_key_buckets_are_powers_of_two_from_64_within_the_cache():
    assert [key_bucket(n, 1024) for n in (1, 63, 64, 65, 128, 129, 600, 1024)] == [64, 64, 64, 128, 128, 256, 1024,
                                                                                   1024]
    assert key_bucket(10, 48) == 48 and key_bucket(100, 100) == 100  # a cache shorter than a bucket is one


@pytest.mark.parametrize("shape", SHAPES)
def test_static_shape_steps_give_full_recomputations_greedy_tokens_across_key_buckets(shape):
    """Every slot a row (free ones masked), keys over a 64- then 128-position bucket: sequences joining mid-way get
    the tokens full recomputation gives (a difference allowed only at a near-tie, as for the eager step)."""
    torch.manual_seed(0)
    model = GPTModel(**{**SMALL, "max_seq_len": 160}, **SHAPES[shape]).eval()
    prompts = [list(range(1, 50)), [0, 5, 6], list(range(20, 80))]
    params = SamplingParams(max_new_tokens=30, do_sample=False)
    engine = DecodeEngine(model, n_slots=4, compile="static")
    for got, prompt in zip(staggered(engine, prompts, params), prompts):
        assert_same_greedy(got, *reference_greedy(model, prompt, 30))


def test_free_slots_keep_their_keys_and_values_under_static_shapes(model):
    """A free slot between active ones is a row of the step, but writes nothing: what the slot held stays."""
    engine = DecodeEngine(model, n_slots=3, compile="static")
    first, middle, last = (engine.add(p, GREEDY) for p in PROMPTS[:3])
    engine.step()
    engine.abort(middle)
    held = [(k[middle.slot].clone(), v[middle.slot].clone()) for k, v in zip(engine.cache.keys, engine.cache.values)]
    while not (first.finished and last.finished):
        engine.step()
    for (k, v), layer_k, layer_v in zip(held, engine.cache.keys, engine.cache.values):
        assert torch.equal(layer_k[middle.slot], k) and torch.equal(layer_v[middle.slot], v)


def test_compile_modes_are_checked_and_auto_compiles_only_where_it_measured_faster(model, monkeypatch):
    with pytest.raises(DecodingError, match="compile must be one of off, static, on, auto"):
        DecodeEngine(model, compile="fast")
    with pytest.raises(DecodingError, match="needs the KV cache"):
        DecodeEngine(model, compile="static", use_cache=False)
    assert set(COMPILE_MODES) == {"off", "static", "on", "auto"}
    assert (DecodeEngine(model, compile=True).compile, DecodeEngine(model, compile=False).compile) == ("on", "off")
    int8 = quantize_model_int8(GPTModel(**SMALL).eval())
    monkeypatch.setattr("decoding.COMPILE_PAYS", frozenset({("cpu", True)}))
    assert DecodeEngine(int8, compile="auto").compile == "off"  # a small model: its compile would not pay
    with torch.device("meta"):  # the 124M shape, INT8: large enough
        big = quantize_model_int8(GPTModel(GPTConfig.from_preset("gpt2", vocab_size=8192)).eval())
    assert decoding.resolve_compile("auto", big, torch.device("cpu")) == "on"
    monkeypatch.setattr("decoding.COMPILE_MIN_WEIGHTS", 0)
    assert (DecodeEngine(int8, compile="auto").compile, DecodeEngine(model, compile="auto").compile) == ("on", "off")
    monkeypatch.setattr("decoding.COMPILE_PAYS", frozenset())
    assert DecodeEngine(int8, compile="auto").compile == "off"


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold compile: about a minute on an idle 2-core machine, five on a busy one
def test_the_compiled_step_gives_the_static_steps_tokens_and_compiles_nothing_after_its_warm_up():
    """INT8 (FBGEMM's direct kernel in the graph where present), slots joining and leaving across three key buckets:
    the compiled step's greedy tokens are the eager static step's, from the graphs warm_up() compiled before the
    first request (the requests then compile nothing, whatever their number and length)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = quantize_model_int8(GPTModel(**{**SMALL, "n_layers": 1, "max_seq_len": 160}).eval())
    prompts = [list(range(1, 70)), PROMPTS[1], list(range(20, 50))]
    params = SamplingParams(max_new_tokens=70, do_sample=False)  # up to 139 positions: buckets 64, 128, 160
    expected = staggered(DecodeEngine(model, n_slots=3, compile="static"), prompts, params)
    assert DecodeEngine(model, n_slots=3, compile="static").warm_up() == []  # nothing to compile
    graphs = counters["stats"]["unique_graphs"]
    engine = DecodeEngine(model, n_slots=3, compile="on")
    assert engine.warm_up() == [(1, 64), (3, 64), (1, 128), (3, 128), (1, 160), (3, 160)]
    assert counters["stats"]["unique_graphs"] - graphs == 6
    with torch.compiler.set_stance("fail_on_recompile"):
        assert staggered(engine, prompts, params) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the compiled step's CUDA path "
                    "(the same static shapes under CUDA graphs, mode='reduce-overhead') is not exercised")
def test_the_compiled_step_on_cuda_gives_full_recomputations_greedy_tokens():
    torch.manual_seed(0)
    model = GPTModel(**SMALL).eval()
    engine = DecodeEngine(copy.deepcopy(model).cuda(), n_slots=2, compile="on")
    for got, prompt in zip(staggered(engine, PROMPTS[:2], GREEDY), PROMPTS[:2]):
        assert_same_greedy(got, *reference_greedy(model, prompt, GREEDY.max_new_tokens))


# ----------------------------------------------------------------------------- generate (left-padded tensors)


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False, **kwargs)


def test_cached_and_uncached_greedy_generate_agree(model):
    ids, mask = left_pad([[0, 3, 4, 5, 6], [0, 7]], pad_id=1)
    cached = generate(model, ids, greedy(25), attention_mask=mask)
    uncached = generate(model, ids, greedy(25), attention_mask=mask, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 30)


def test_generate_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [[0, 3, 4, 5, 6, 7], [0, 8], [0, 9, 10, 11]]
    ids, mask = left_pad(prompts, pad_id=model.config.pad_token_id)
    batch = generate(model, ids, greedy(15, repetition_penalty=1.2), attention_mask=mask)
    for row, prompt in enumerate(prompts):
        one = generate(model, torch.tensor([prompt]), greedy(15, repetition_penalty=1.2))
        assert batch[row, ids.size(1) - len(prompt):].tolist() == one[0].tolist()


def test_generate_seeded_sampling_is_reproducible(model):
    ids = torch.tensor([[0, 5, 6]])
    params = SamplingParams(max_new_tokens=20, temperature=1.5, top_k=20, top_p=0.9)
    a = generate(model, ids, params, generator=torch.Generator().manual_seed(7))
    b = generate(model, ids, params, generator=torch.Generator().manual_seed(7))
    c = generate(model, ids, params, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_top_k_one_sampling_is_greedy(model):
    ids = torch.tensor([[0, 5, 6]])
    generator = torch.Generator().manual_seed(0)
    sampled = generate(model, ids, SamplingParams(max_new_tokens=10, top_k=1), generator=generator)
    assert torch.equal(sampled, generate(model, ids, greedy(10)))


def test_generate_eos_stops_rows_and_pads_them(model):
    ids = torch.tensor([[0, 5, 6], [0, 9, 10]])
    free = generate(model, ids, greedy(12))
    eos = int(free[0, 5])  # the third token row 0 generates becomes the stop token
    out = generate(model, ids, greedy(12, eos_token_id=eos))
    for row in range(2):
        new = out[row, 3:].tolist()
        if eos in new:
            stop = new.index(eos)
            assert new[:stop + 1] == free[row, 3:3 + stop + 1].tolist()
            assert all(t == model.config.pad_token_id for t in new[stop + 1:])
    if all(eos in r for r in out[:, 3:].tolist()):  # everyone finished: stopped early
        assert out.size(1) < free.size(1)


def test_generate_never_exceeds_context(model):
    ids = torch.randint(0, 97, (1, 40))
    out = generate(model, ids, greedy(100))
    assert out.shape == (1, SMALL["max_seq_len"])
    with pytest.raises(ValueError, match="no room to generate"):
        generate(model, torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a 2-D integer tensor"):
        generate(model, torch.zeros(5, dtype=torch.long))


def test_generate_restores_mode_and_returns_autograd_usable_tensor(model):
    model.train()
    out = generate(model, torch.tensor([[0, 5]]), greedy(4))
    assert model.training and not out.is_inference()
    model(out, labels=out)["loss"].backward()  # PPO feeds generated sequences back with gradients


def test_generate_under_bf16_autocast(model):
    with autocast_context("cpu", torch.bfloat16):
        out = generate(model, torch.tensor([[0, 5, 6, 7]]), greedy(5))
    assert out.shape == (1, 9)


def test_generation_lives_above_the_model():
    """The model has no generate of its own: decoding is the engine's, from above (nanochat's engine.py layout)."""
    assert not hasattr(GPTModel, "generate")


@pytest.mark.parametrize("kwargs", [dict(top_k=-1), dict(top_p=0.0), dict(top_p=2.0), dict(temperature=0.0),
                                    dict(max_new_tokens=-1), dict(top_k="5"), dict(temperature=float("nan")),
                                    dict(repetition_penalty=0.0)], ids=str)
def test_generate_rejects_bad_settings_with_a_value_error(kwargs):
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=300, max_seq_len=16, n_layers=1))
    with pytest.raises(ValueError):
        generate(model, torch.tensor([[0, 5]]), SamplingParams(**{"max_new_tokens": 3, **kwargs}))
    with pytest.raises(ValueError):
        generate(model, None)


# ----------------------------------------------------------------------------- the built-in calculator


class Scripted(torch.nn.Module):
    """A model whose next token is a function of the current one (``table``), run on a real GPTModel's layers so the
    KV cache is written as for any model: scripts a calculator call without training one."""

    def __init__(self, inner: GPTModel, table: dict[int, int]):
        super().__init__()
        self.inner, self.config = inner, inner.config
        vocab = inner.config.vocab_size
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for current, following in table.items():
                self.lm_head.weight[following, current] = 100.0

    def hidden_states(self, input_ids, attention_mask=None, kv_cache=None):
        self.inner.hidden_states(input_ids, kv_cache=kv_cache)  # fills the cache as a real model does
        return torch.nn.functional.one_hot(input_ids, self.config.vocab_size).float()


def chain(*ids: int) -> dict[int, int]:
    return dict(zip(ids, ids[1:]))


@pytest.fixture()
def calling(text_model, tiny_tokenizer):
    """(scripted model, ids): slot A calls the calculator on "4+2" and writes "x" after the result; slot B never
    calls; after <|/tool_call|> the model itself would write "q" (what a run without the calculator shows)."""
    tok = tiny_tokenizer
    ids = {name: tok.special_token_id(token) for name, token in
           [("call", "<|tool_call|>"), ("call_end", "<|/tool_call|>"), ("result", "<|tool_result|>"),
            ("result_end", "<|/tool_result|>"), ("user", "<|user|>"), ("system", "<|system|>")]}
    (four,), (plus,), (two,) = tok.encode_ordinary("4"), tok.encode_ordinary("+"), tok.encode_ordinary("2")
    (x,), (q,), (a,), (b,) = (tok.encode_ordinary(c) for c in "xqab")
    eos = tok.eos_token_id
    table = {**chain(ids["user"], ids["call"], four, plus, two, ids["call_end"], q, eos),
             **chain(ids["result_end"], x, eos), **chain(ids["system"], a, b, eos)}
    return Scripted(text_model, table).eval(), ids, eos


def test_a_call_gets_its_result_forced_in_and_decoding_goes_on_beside_a_slot_that_does_not_call(
        calling, tiny_tokenizer):
    model, ids, eos = calling
    tok = tiny_tokenizer
    params = SamplingParams(max_new_tokens=20, do_sample=False, eos_token_id=eos)
    prompts = [[tok.bos_token_id, ids["user"]], [tok.bos_token_id, ids["system"]]]
    for use_cache in (True, False):
        engine = DecodeEngine(model, tok, n_slots=2, use_cache=use_cache)
        pieces: dict[int, list[str]] = {0: [], 1: []}
        calls, other = engine.run(prompts, params, on_output=lambda out: pieces[out.request.slot].append(out.text))
        assert calls.output_ids == [ids["call"], *tok.encode_ordinary("4+2"), ids["call_end"], ids["result"],
                                    *tok.encode_ordinary("6"), ids["result_end"], *tok.encode_ordinary("x"), eos]
        assert other.output_ids == [*tok.encode_ordinary("ab"), eos] and other.finish_reason == "eos"
        trace = "<|tool_call|>4+2<|/tool_call|><|tool_result|>6<|/tool_result|>x"
        assert calls.text == trace and "".join(pieces[0]) == trace  # streamed with the call and its result
    # the result was written into the slot's cache exactly as a prefill of the whole sequence writes it
    engine = DecodeEngine(model, tok, n_slots=2)
    calls = engine.run(prompts, params)[0]
    sequence = calls.prompt_ids + calls.output_ids[:-1]  # the last token is never fed back
    fresh = DecodeEngine(model, tok, n_slots=1)
    fresh.prefill([0], [sequence])
    for cached, expected in zip(engine.cache.keys, fresh.cache.keys):
        torch.testing.assert_close(cached[calls.slot, :, :len(sequence)], expected[0, :, :len(sequence)])


def test_with_the_calculator_off_nothing_is_evaluated(calling, tiny_tokenizer, monkeypatch):
    model, ids, eos = calling
    tok = tiny_tokenizer
    monkeypatch.setattr("calculator.evaluate", lambda expression: pytest.fail("the calculator ran"))
    params = SamplingParams(max_new_tokens=20, do_sample=False, eos_token_id=eos, calculator=False)
    request = DecodeEngine(model, tok, n_slots=1).run([[tok.bos_token_id, ids["user"]]], params)[0]
    assert request.output_ids == [ids["call"], *tok.encode_ordinary("4+2"), ids["call_end"],
                                  *tok.encode_ordinary("q"), eos]  # the model's own continuation


def test_a_result_cut_by_max_new_tokens_ends_the_sequence(calling, tiny_tokenizer):
    model, ids, eos = calling
    tok = tiny_tokenizer
    params = SamplingParams(max_new_tokens=7, do_sample=False, eos_token_id=eos)  # call (5) + 2 of the result
    request = DecodeEngine(model, tok, n_slots=1).run([[tok.bos_token_id, ids["user"]]], params)[0]
    assert request.output_ids == [ids["call"], *tok.encode_ordinary("4+2"), ids["call_end"], ids["result"],
                                  *tok.encode_ordinary("6")] and request.finish_reason == "length"


def test_a_broken_call_gets_an_error_result(text_model, tiny_tokenizer):
    tok = tiny_tokenizer
    call, call_end = tok.special_token_id("<|tool_call|>"), tok.special_token_id("<|/tool_call|>")
    (one,), (slash,), (zero,) = (tok.encode_ordinary(c) for c in "1/0")
    user, eos = tok.special_token_id("<|user|>"), tok.eos_token_id
    model = Scripted(text_model, {**chain(user, call, one, slash, zero, call_end),
                                  tok.special_token_id("<|/tool_result|>"): eos}).eval()
    request = DecodeEngine(model, tok, n_slots=1).run([[tok.bos_token_id, user]],
                                                      SamplingParams(max_new_tokens=40, do_sample=False,
                                                                     eos_token_id=eos))[0]
    assert request.text == "<|tool_call|>1/0<|/tool_call|><|tool_result|>error: division by zero<|/tool_result|>"


def tool_trace(tok) -> list[int]:
    """A reply with a calculator call, its (forced) result and the answer: what the engine writes for a tool model."""
    ids_of = tok.special_token_id
    return [ids_of(TOOL_CALL), *tok.encode_ordinary("12+30"), ids_of(TOOL_CALL_END), ids_of(TOOL_RESULT),
            *tok.encode_ordinary("42"), ids_of(TOOL_RESULT_END), *tok.encode_ordinary("42"), tok.eos_token_id]


def test_visible_text_writes_tool_tokens_out_and_sampled_mask_leaves_out_the_forced_result(tiny_tokenizer):
    tok = tiny_tokenizer.with_special_tokens(CHAT_TOKENS)
    trace = tool_trace(tok)
    assert visible_text(tok, trace) == "<|tool_call|>12+30<|/tool_call|><|tool_result|>42<|/tool_result|>42"
    call, result = len(tok.encode_ordinary("12+30")), len(tok.encode_ordinary("42"))
    assert sampled_mask(tok, trace) == [True] * (call + 2) + [False] * (result + 2) + [True] * (result + 1)
    plain = tiny_tokenizer.encode_ordinary("no tools") + [tiny_tokenizer.eos_token_id]
    assert visible_text(tiny_tokenizer, plain) == "no tools"
    assert sampled_mask(tiny_tokenizer, plain) == [True] * len(plain)
