"""speculative: prompt-lookup drafts, the greedy and sampled acceptance rules (the sampled one's tokens distributed as
the target, whatever the draft), and the engine decoding with drafts exactly as without."""
from __future__ import annotations

import pytest
import torch

from decoding import DecodeEngine, SamplingParams, sampling_probs
from gpt_model import GPTModel
from speculative import DraftParams, accept, accept_greedy, propose

SHAPES = {"gpt2": {}, "rope": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False)}


def test_propose_takes_what_followed_the_latest_longest_match():
    history = [5, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2]
    assert propose(history, DraftParams(k=2, max_ngram=3)) == [4, 7]  # [1, 2] last seen before 4 7
    assert propose(history, DraftParams(k=9, max_ngram=3)) == [4, 7, 1, 2, 4, 7, 1, 2, 4]  # the copy runs on
    assert propose(history, DraftParams(k=9), limit=1) == [4]
    assert propose([5, 8, 6, 3, 8, 6], DraftParams(k=3, max_ngram=2)) == [3, 8, 6]
    assert propose([1, 2, 3], DraftParams()) == [] and propose([1], DraftParams()) == []
    assert propose([4, 4, 4], DraftParams(k=3, max_ngram=2, min_ngram=2)) == [4, 4, 4]
    assert propose(history, DraftParams(k=4), limit=0) == []


@pytest.mark.parametrize("bad", [dict(k=0), dict(max_ngram=0), dict(min_ngram=3, max_ngram=2), dict(k=True)])
def test_draft_params_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        DraftParams(**bad)


def test_accept_greedy_keeps_the_draft_while_it_is_the_argmax():
    logits = torch.tensor([[0.0, 5, 1], [3, 0, 1], [0, 0, 9]])  # argmaxes 1, 0, 2
    assert accept_greedy([1, 0], logits) == [1, 0, 2]  # both kept, then the model's next
    assert accept_greedy([1, 2], logits) == [1, 0]  # the second refused: the model's own token instead
    assert accept_greedy([2, 0], logits) == [1]


def first_tokens(p: torch.Tensor, q: torch.Tensor | None, draws: int, seed: int) -> torch.Tensor:
    """Counts of the first token speculative sampling emits, the draft token drawn from q (None: always token 0,
    a one-hot lookup draft)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.numel())
    probs = torch.stack([p, torch.full_like(p, 1 / p.numel())])  # the second row is the bonus, after an accepted one
    for _ in range(draws):
        token = 0 if q is None else int(torch.multinomial(q, 1, generator=generator))
        counts[accept([token], probs, None if q is None else q[None], generator)[0]] += 1
    return counts


@pytest.mark.parametrize("draft", ["model", "lookup"])
def test_speculative_sampling_emits_the_target_distribution(draft):
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15, 0.0])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1]) if draft == "model" else None
    draws = 20_000
    counts = first_tokens(p, q, draws, seed=0)
    expected = p * draws
    support = expected > 0
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    assert counts[~support].sum() == 0  # never a token the target excludes, though the draft proposes it
    assert chi2 < 20.5  # 4 degrees of freedom: P(chi2 > 18.5) = 0.001
    assert (counts / draws - p).abs().sum() / 2 < 0.015  # total variation


def test_a_fully_accepted_draft_adds_a_token_from_the_last_distribution():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert accept([1, 2], probs) == [1, 2, 0]
    assert accept([1, 0], probs) == [1, 2]  # token 0 has probability 0 after [1]: refused, 2 drawn instead


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(params=SHAPES)
def model(request) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=96, max_seq_len=96,
                    **SHAPES[request.param]).eval()


PROMPTS = [[0] + [3, 4, 5, 6, 7] * 4, [0, 9, 10, 9, 10, 9, 10, 11, 12], [0, 20]]


def decode(model: GPTModel, params: SamplingParams, speculative: DraftParams | None, prompt: list[int]):
    engine = DecodeEngine(model, n_slots=1, speculative=speculative)
    return engine.run([prompt], params)[0], engine.speculation


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_drafts_gives_the_tokens_and_logprobs_of_plain_greedy(model, prompt):
    params = SamplingParams(max_new_tokens=40, do_sample=False, logprobs=3)
    outputs = []
    plain_engine = DecodeEngine(model, n_slots=1)
    plain_engine._record = spy(plain_engine._record, outputs)
    plain = plain_engine.run([prompt], params)[0]
    drafted_outputs = []
    engine = DecodeEngine(model, n_slots=1, speculative=DraftParams(k=4))
    engine._record = spy(engine._record, drafted_outputs)
    drafted = engine.run([prompt], params)[0]
    assert drafted.output_ids == plain.output_ids and drafted.finish_reason == plain.finish_reason
    for a, b in zip(drafted_outputs, outputs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    stats = engine.speculation
    assert stats.steps > 0 and 0 < stats.accepted <= stats.drafted  # drafts were made, some kept
    assert stats.steps + stats.accepted <= len(plain.output_ids) - 1  # the first token comes from the prefill


def spy(record, log: list):
    def logged(request, token, logprob=None, top=None):
        log.append([logprob] + [v for _, v in top])
        return record(request, token, logprob, top)
    return logged


def test_sampling_with_drafts_at_top_k_one_is_greedy_and_respects_the_limits(model):
    prompt = PROMPTS[0]
    greedy = decode(model, SamplingParams(max_new_tokens=30, do_sample=False), None, prompt)[0]
    sampled, stats = decode(model, SamplingParams(max_new_tokens=30, top_k=1, seed=1), DraftParams(k=5), prompt)
    assert sampled.output_ids == greedy.output_ids and stats.accepted > 0
    for n in (1, 2, 7):  # a draft never runs past max_new_tokens
        short = decode(model, SamplingParams(max_new_tokens=n, do_sample=False), DraftParams(k=5), prompt)[0]
        assert short.output_ids == greedy.output_ids[:n]
    near_end = DecodeEngine(model, n_slots=1, max_len=len(prompt) + 3, speculative=DraftParams(k=5))
    assert near_end.run([prompt], SamplingParams(do_sample=False))[0].output_ids == greedy.output_ids[:3]


def test_sampling_probs_is_the_distribution_the_engine_samples(model):
    """Top-k, top-p and temperature over the whole vocabulary: its support is what the engine can draw."""
    logits = torch.randn(2, 61, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
    probs = sampling_probs(logits, params)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    top5 = logits.topk(5).indices
    assert ((probs > 0).sum(-1) <= 5).all() and all(set(probs[r].nonzero().flatten().tolist()) <= set(top5[r].tolist())
                                                     for r in range(2))
    full = (logits / 0.7).softmax(-1)
    kept = probs[0] > 0
    torch.testing.assert_close(probs[0][kept], full[0][kept] / full[0][kept].sum())
