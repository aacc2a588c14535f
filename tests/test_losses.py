"""losses: every training objective against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

import data_loader
import gpt_model
import losses
import metrics
import model_heads
from prompts import build_sft_prompt


def test_bradley_terry_loss_against_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2  # -log σ(1), -log σ(-2)
    assert losses.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert losses.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    # smoothing ε = 0.1: 0.9·(-log σ(Δ)) + 0.1·(-log σ(-Δ)) per pair; its minimum sits at Δ = log(0.9 / 0.1)
    smoothed = (0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
                + 0.9 * math.log(1 + math.exp(2.0)) + 0.1 * math.log(1 + math.exp(-2.0))) / 2
    assert losses.bradley_terry_loss(chosen, rejected, 0.1).item() == pytest.approx(smoothed, rel=1e-6)
    margins = torch.tensor([math.log(9) - 0.01, math.log(9), math.log(9) + 0.01])
    values = [losses.bradley_terry_loss(m.view(1), torch.zeros(1), 0.1).item() for m in margins]
    assert values[1] < values[0] and values[1] < values[2]


def test_gae_against_a_hand_worked_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.9]])  # the 4th step is padding: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = losses.gae(rewards, values * mask, mask, gamma=1.0, lam=0.9)
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.9·0.3 = 0.37; δ0 = 0.1, A0 = 0.1 + 0.9·0.37 = 0.433
    assert advantages.tolist()[0] == pytest.approx([0.433, 0.37, 0.3, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.933, 0.97, 1.0, 0.0])
    advantages, _ = losses.gae(rewards, values * mask, mask, gamma=0.5, lam=1.0)
    # λ = 1: A_t = Σ γ^k r_{t+k} − V_t = discounted return minus value
    assert advantages.tolist()[0] == pytest.approx([0.25 - 0.5, 0.5 - 0.6, 1.0 - 0.7, 0.0])


def test_kl_penalised_per_token_rewards():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = losses.kl_penalized_rewards(logprobs, ref_logprobs, torch.tensor([3.0, -1.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]]))
    # −β·kl everywhere, the score added at each row's last real token, nothing on padding
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 3.0, 0.0], [0.0, 0.05, -1.0]]))


def test_right_aligned_responses_get_the_same_rewards_and_advantages_as_left_aligned_ones():
    """Rollouts end every response in the last column (padding in front): shifting a row changes nothing."""
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -2.0, 0.0]])
    values, score = torch.tensor([[0.3, 0.6, 0.0]]), torch.tensor([2.0])
    left = torch.tensor([[1.0, 1.0, 0.0]])
    shift = lambda x: x.roll(1, dims=1)
    rewards, _ = losses.kl_penalized_rewards(logprobs, ref_logprobs, score, left, kl_coef=0.1)
    shifted, _ = losses.kl_penalized_rewards(shift(logprobs), shift(ref_logprobs), score, shift(left), kl_coef=0.1)
    torch.testing.assert_close(shifted, shift(rewards))
    advantages, returns = losses.gae(rewards, values * left, left, gamma=0.9, lam=0.95)
    shifted_advantages, shifted_returns = losses.gae(shifted, shift(values * left), shift(left), gamma=0.9, lam=0.95)
    torch.testing.assert_close(shifted_advantages, shift(advantages))
    torch.testing.assert_close(shifted_returns, shift(returns))


def test_clipped_losses_at_the_clip_boundary():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.3, 0.7, 0.7, 1.1]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, clip_fraction = losses.ppo_policy_loss(ratios.log(), old, advantages, mask, clip_range=0.2)
    # per token −min(ρA, clip(ρ)A): −1.2 (clipped), −0.7, +0.8 (clipped), +2.2
    assert loss.item() == pytest.approx((-1.2 - 0.7 + 0.8 + 2.2) / 4, rel=1e-5)
    assert clip_fraction.item() == pytest.approx(0.5)
    values, old_values, returns = torch.tensor([[1.5, 1.1]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    value_loss = losses.ppo_value_loss(values, old_values, returns, torch.ones(1, 2), clip_range=0.2)
    # token 1: max((1.5−2)², (1.2−2)²) = 0.64; token 2: inside the clip, (1.1−2)² = 0.81
    assert value_loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, rel=1e-5)


def test_whiten_has_zero_mean_and_unit_variance_over_the_mask():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = losses.whiten(x, mask)
    assert losses.masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6) and white[0, 3] == 0
    assert losses.masked_mean(white ** 2, mask).item() == pytest.approx(1.0, rel=1e-4)


def test_reward_nll_weight_adds_the_chosen_answers_per_token_nll(tiny_tokenizer):
    torch.manual_seed(0)
    lm = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64,
                                                            n_layers=1, d_model=32, n_heads=2))
    reward = model_heads.GPTRewardModel.from_language_model(lm)
    pairs = [{"instruction": "计算 1 + 2 = ?", "chosen": "3", "rejected": "4"},
             {"instruction": "Who?", "chosen": "ROMEO", "rejected": "JULIET"}]
    dataset = data_loader.PreferencePairDataset(pairs, tiny_tokenizer, max_seq_len=64)
    batch = data_loader.collate_pairs([dataset[0], dataset[1]], tiny_tokenizer.pad_token_id)
    plain = losses.reward_loss(reward, batch)
    weighted = losses.reward_loss(reward, batch, nll_weight=2.0)
    chosen = {k: v[:2] for k, v in batch.items()}  # the first half of a pair batch is the chosen answers
    nll = -metrics.scored_logprobs(lm, chosen["input_ids"], chosen["attention_mask"], chosen["labels"],
                                   average=True).mean()
    assert weighted["chosen_nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert weighted["preference_loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    assert weighted["loss"].item() == pytest.approx(plain["loss"].item() + 2.0 * nll.item(), rel=1e-5)


def test_sft_loss_scores_response_tokens_only(tiny_tokenizer):
    record = {"instruction": "计算 1 + 2 = ?", "response": "3"}
    dataset = data_loader.GPTSFTDataset([record], tiny_tokenizer, 64)
    item = dataset[0]
    prompt = build_sft_prompt(record["instruction"])
    n_prompt = 1 + len(tiny_tokenizer.encode_ordinary(prompt))
    assert (item["labels"][:n_prompt] == -100).all() and (item["labels"][n_prompt:] != -100).all()
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64,
                                                               n_layers=1, d_model=32, n_heads=2))
    batch = data_loader.collate_batch([item], tiny_tokenizer.pad_token_id)
    loss = losses.causal_lm_loss(model, batch)
    log_probs = model(batch["input_ids"])["logits"][0].log_softmax(-1)
    ids = item["input_ids"]
    manual = -sum(log_probs[t, ids[t + 1]] for t in range(n_prompt - 1, len(ids) - 1)) / (len(ids) - n_prompt)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_dpo_and_ipo_losses_against_hand_computed_values():
    t = lambda x: torch.tensor([x])
    loss, chosen_reward, rejected_reward = losses.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    # h = (−1 − −3) − (−2 − −2) = 2; −log σ(0.5·2) = log(1 + e^−1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert (chosen_reward.item(), rejected_reward.item()) == pytest.approx((0.5, -0.5))
    smoothed, _, _ = losses.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)
    ipo, _, _ = losses.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, ipo=True)
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    zero, _, _ = losses.dpo_loss(t(-4.0), t(-4.0), t(-1.0), t(-1.0), beta=0.3)  # zero margin
    assert zero.item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses.dpo_loss(t(-4.0), t(-4.0), t(-1.0), t(-1.0), beta=0.25, ipo=True)[0].item() == pytest.approx(4.0)


def test_dpo_positive_penalises_only_a_chosen_answer_below_the_reference():
    t = lambda x: torch.tensor([x])
    # chosen fell 0.5 below the reference: h = (−2.5 − −6) − (−2 − −4) = 1.5, minus λ·0.5 = 1.5 − 1 = 0.5
    loss, _, _ = losses.dpo_loss(t(-2.5), t(-6.0), t(-2.0), t(-4.0), beta=0.5, dpop_lambda=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.25)), rel=1e-6)
    # chosen above the reference: no penalty, plain DPO
    above = [losses.dpo_loss(t(-1.5), t(-6.0), t(-2.0), t(-4.0), beta=0.5, dpop_lambda=lam)[0].item()
             for lam in (0, 50)]
    assert above[0] == pytest.approx(above[1]) == pytest.approx(math.log(1 + math.exp(-1.25)), rel=1e-6)


def test_grpo_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.0]])
    advantages = losses.grpo_advantages(rewards)
    std = math.sqrt(1 / 3)  # sample std of (0, 1, 0, 1)
    assert advantages[0].tolist() == pytest.approx([-0.5 / std, 0.5 / std, -0.5 / std, 0.5 / std], rel=1e-4)
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical rewards teach nothing
    assert advantages[2].sum().item() == pytest.approx(0.0, abs=1e-5) and advantages[2, 0] > 0
