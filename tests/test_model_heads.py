"""model_heads: the reward model's score and label log-probs, its likelihood term, and checkpoint round trip."""
from __future__ import annotations

import pytest
import torch

import checkpoints
import gpt_model
import metrics
import model_heads


def test_reward_model_scores_and_label_logprobs_come_from_one_pass():
    torch.manual_seed(0)
    lm = gpt_model.GPTModel(gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2,
                                                d_ff=32))
    reward = model_heads.GPTRewardModel.from_language_model(lm)
    input_ids = torch.randint(0, 11, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    scores, logprobs = reward(input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.equal(scores, reward(input_ids, attention_mask=attention_mask))
    expected = metrics.scored_logprobs(lm, input_ids, attention_mask, labels)
    assert logprobs.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_reward_likelihood_adds_the_learned_weight_times_the_mean_answer_logprob(tmp_path):
    torch.manual_seed(0)
    lm = gpt_model.GPTModel(gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2,
                                                d_ff=32))
    reward = model_heads.GPTRewardModel.from_language_model(lm, likelihood_weight=0.5)
    input_ids = torch.randint(0, 11, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # row 0 scores 5 answer tokens, row 1 two
    head_only = model_heads.at_last_token(reward.values(input_ids, attention_mask), attention_mask)
    mean_logprob = metrics.scored_logprobs(lm, input_ids, attention_mask, labels, average=True)
    scores = reward.score(input_ids, attention_mask, labels)
    assert scores.tolist() == pytest.approx((head_only + 0.5 * mean_logprob).tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="pass labels="):
        reward(input_ids, attention_mask)
    assert reward.likelihood_weight.requires_grad  # learned with the head
    path = tmp_path / "reward_best.pth"
    checkpoints.save_checkpoint(path, reward, model_class="reward", reward_likelihood=True)
    loaded = checkpoints.build_model(checkpoints.load_checkpoint(path), path)
    assert loaded.likelihood and torch.equal(loaded.score(input_ids, attention_mask, labels), scores)


def test_reward_model_and_classifier_train_on_the_modern_shape_with_left_padding():
    torch.manual_seed(0)
    config = gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2, d_ff=32,
                                 pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=1,
                                 bias=False, tie_embeddings=False)
    lm = gpt_model.GPTModel(config)
    input_ids = torch.randint(1, 11, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding: the last real token is still the last one
    for model, target in ((model_heads.GPTRewardModel.from_language_model(lm), torch.tensor([1.0, -1.0])),
                          (model_heads.GPTClassifier.from_language_model(lm, ["a", "b"]), torch.tensor([0, 1]))):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(4):
            out = model(input_ids, attention_mask=attention_mask)
            loss = (out - target).pow(2).mean() if out.dim() == 1 else torch.nn.functional.cross_entropy(out, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], type(model).__name__
        alone = model.eval()(input_ids[1:, 3:])
        torch.testing.assert_close(model(input_ids, attention_mask=attention_mask)[1:], alone, atol=1e-5, rtol=1e-5)
