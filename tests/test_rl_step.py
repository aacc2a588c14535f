"""rl_step: rollouts through the decode engine, PPO's step on the one training loop, held-out policy figures."""
from __future__ import annotations

import pytest
import torch

import data_loader
import finetune_stages as stages
import model_heads
import readers
import rl_step
from conftest import stage_config
from decoding import SamplingParams, sampled_mask
from gpt_model import GPTConfig, GPTModel
from test_decoding import tool_trace
from prompts import CHAT_TOKENS, SFT_TEMPLATE, record_prompt_ids
from training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("likelihood_weight", [0.0, 1.0])
def test_a_ppo_iteration_moves_the_policy_and_critic_but_not_the_reference_or_reward_model(files, tmp_path,
                                                                                            likelihood_weight):
    base = stages.load_base(str(files["pretrained"]), None, "--pretrained_model")
    policy, tokenizer = base.model, base.tokenizer
    reward = model_heads.GPTRewardModel.from_language_model(policy, likelihood_weight)
    cfg = stage_config(files, tmp_path, "rlhf", lr=1e-3, critic_lr=1e-3, rollout_batch_size=4, ppo_minibatch_size=2,
                 ppo_epochs=2, max_steps=1)
    records = readers.load_sft_records(files["sft_test"])
    prompts = stages.rl_prompts([record_prompt_ids(tokenizer, r, SFT_TEMPLATE) for r in records], 64, "test")
    step = rl_step.PPOStep(cfg, tokenizer, reward, records[:4], SFT_TEMPLATE)
    trainer = Trainer(cfg, policy, tokenizer, data_loader.ShuffledBatches(prompts, 4, list, 0), step, prefix="ppo",
                      show_progress=False)
    models = {"policy": trainer.model, "reference": step.reference, "reward": step.reward_model, "critic": step.critic}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    batch = step.rollout(next(trainer.batches))
    assert batch.response_mask.sum(1).min() >= 1 and batch.logprobs.shape == batch.values.shape
    stats = step.update(batch)
    assert {"policy_loss", "value_loss", "clip_fraction", "entropy"} <= set(stats)
    changed = {name: any(not torch.equal(v, models[name].state_dict()[k]) for k, v in state.items())
               for name, state in before.items()}
    assert changed == {"policy": True, "reference": False, "reward": False, "critic": True}


def test_rollouts_sample_at_the_stage_temperature_from_the_whole_distribution(files, tmp_path):
    """The rollout sampling comes from the stage's settings once; no top-k: PPO's ratios are over the full policy."""
    cfg = stage_config(files, tmp_path, "rlvf", rollout_temperature=0.7, max_new_tokens=9)
    assert rl_step.rollout_sampling(cfg) == SamplingParams(max_new_tokens=9, do_sample=True, temperature=0.7, top_k=0)


def test_evaluate_policy_gives_every_answer_its_room_whatever_the_batch(files):
    """A short prompt batched with a long one must not have its answer cut by the long one's place in the context:
    batched figures equal those of one prompt at a time."""
    base = stages.load_base(str(files["pretrained"]), None, "--pretrained_model")
    policy, tokenizer = base.model, base.tokenizer
    reward = model_heads.GPTRewardModel.from_language_model(policy, 1.0)
    short = {"instruction": "计算 1 + 2 = ?", "response": "3"}
    long = {"instruction": "床前明月光，疑是地上霜。", "response": "x"}
    records = [short, long, dict(short, instruction="计算 3 + 4 = ?"), long]
    args = (policy, policy, reward, tokenizer, records, SFT_TEMPLATE, 40)
    assert len(record_prompt_ids(tokenizer, long, SFT_TEMPLATE)) + 40 > 64  # the long one leaves < 40
    one_by_one = rl_step.evaluate_policy(*args, batch_size=1)
    assert rl_step.evaluate_policy(*args, batch_size=4) == pytest.approx(one_by_one, abs=1e-5)


def test_samples_end_every_response_in_the_last_column_and_give_each_prompt_its_room(files):
    base = stages.load_base(str(files["pretrained"]), None, "--pretrained_model")
    policy, tokenizer = base.model, base.tokenizer
    template = SFT_TEMPLATE
    prompts = [record_prompt_ids(tokenizer, {"instruction": text}, template)
               for text in ("计算 1 + 2 = ?", "床前明月光，疑是地上霜。")]
    greedy = SamplingParams(max_new_tokens=40, do_sample=False)
    samples = rl_step.sample_responses(policy, prompts, greedy, tokenizer)
    alone = [rl_step.sample_responses(policy, [p], greedy, tokenizer).responses[0] for p in prompts]
    assert samples.responses == alone  # batched with a longer prompt, the short one keeps its room
    assert max(map(len, alone)) > 64 - max(map(len, prompts))  # a left-padded batch would have cut it
    n = samples.response_mask.size(1)
    assert samples.sequences.size(1) - samples.response_start == n == max(map(len, samples.responses))
    labels = rl_step.response_labels(samples)
    for row, (prompt, response) in enumerate(zip(prompts, samples.responses)):
        real = samples.sequences[row][samples.attention_mask[row].bool()].tolist()
        assert real == prompt + response  # left padding only
        assert samples.response_mask[row].tolist() == [0.0] * (n - len(response)) + [1.0] * len(response)
        assert [t for t in labels[row].tolist() if t != -100] == response


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    controller = rl_step.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))


def test_rollouts_run_the_calculator_and_leave_its_forced_result_out_of_the_loss(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer.with_special_tokens(CHAT_TOKENS)
    trace, seen = tool_trace(tok), {}

    def engine(policy, prompts, params, batch_size=64, generator=None, tokenizer=None):
        seen["tokenizer"] = tokenizer  # the engine runs the calculator only with the model's tokenizer
        return [list(trace) for _ in prompts]

    monkeypatch.setattr(rl_step, "generate_responses", engine)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tok), n_layers=1, max_seq_len=64))
    samples = rl_step.sample_responses(model, [[tok.bos_token_id, 5], [tok.bos_token_id]], SamplingParams(), tok)
    assert seen["tokenizer"] is tok
    for row in samples.response_mask.tolist():
        assert row == [float(m) for m in sampled_mask(tok, trace)]
