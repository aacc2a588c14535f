"""finetune: losses against hand-worked values, SFT masking, LoRA through the CLI, a PPO iteration, resume, errors."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
import data_loader
import finetune as ft
import gpt_model
import metrics
import model_heads
import readers
import training
import verifiers
from conftest import ROOT
from evaluator import GPTEvaluator, exact_match_by_task
from prompts import SFT_TEMPLATE, build_sft_prompt, record_prompt_ids

SFT_DATA = ROOT / "data" / "sft"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def files(tiny_tokenizer, tiny_tokenizer_dir, tmp_path) -> dict[str, Path]:
    """A tiny 'pretrained' checkpoint laid out as the trainer writes it, and small slices of the demo data."""
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64,
                                                               n_layers=1, d_model=32, n_heads=2))
    pretrained = tmp_path / "pre" / "pretrain_best.pth"
    checkpoints.save_checkpoint(pretrained, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    shutil.copytree(tiny_tokenizer_dir, pretrained.parent / "tokenizer")
    out = {"pretrained": pretrained}
    for name, count in (("sft_data", 48), ("sft_test", 16), ("rlhf_pairwise", 48), ("rlhf_pairwise_test", 16)):
        records = json.loads((SFT_DATA / f"{name}.json").read_text(encoding="utf-8"))[:count]
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


def config(files, tmp_path, mode: str, **overrides) -> ft.FinetuneConfig:
    values = dict(mode=mode, data_path=str(files["sft_data"]), test_data_path=str(files["sft_test"]),
                  pairwise_data=str(files["rlhf_pairwise"]), pairwise_test_data=str(files["rlhf_pairwise_test"]),
                  pretrained_model=str(files["pretrained"]), output_dir=str(tmp_path / mode), device="cpu",
                  dtype="float32", batch_size=8, max_steps=4, eval_interval=2, log_interval=1, warmup_steps=1,
                  lr=1e-3, seed=0, eval_samples=8, max_new_tokens=4)
    return ft.FinetuneConfig(**{**values, **overrides})


# ----------------------------------------------------------------------------- the losses, by hand

def test_bradley_terry_loss_against_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2  # -log σ(1), -log σ(-2)
    assert ft.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert ft.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    # smoothing ε = 0.1: 0.9·(-log σ(Δ)) + 0.1·(-log σ(-Δ)) per pair; its minimum sits at Δ = log(0.9 / 0.1)
    smoothed = (0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
                + 0.9 * math.log(1 + math.exp(2.0)) + 0.1 * math.log(1 + math.exp(-2.0))) / 2
    assert ft.bradley_terry_loss(chosen, rejected, 0.1).item() == pytest.approx(smoothed, rel=1e-6)
    margins = torch.tensor([math.log(9) - 0.01, math.log(9), math.log(9) + 0.01])
    losses = [ft.bradley_terry_loss(m.view(1), torch.zeros(1), 0.1).item() for m in margins]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_gae_against_a_hand_worked_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.9]])  # the 4th step is padding: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = ft.gae(rewards, values * mask, mask, gamma=1.0, lam=0.9)
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.9·0.3 = 0.37; δ0 = 0.1, A0 = 0.1 + 0.9·0.37 = 0.433
    assert advantages.tolist()[0] == pytest.approx([0.433, 0.37, 0.3, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.933, 0.97, 1.0, 0.0])
    advantages, _ = ft.gae(rewards, values * mask, mask, gamma=0.5, lam=1.0)
    # λ = 1: A_t = Σ γ^k r_{t+k} − V_t = discounted return minus value
    assert advantages.tolist()[0] == pytest.approx([0.25 - 0.5, 0.5 - 0.6, 1.0 - 0.7, 0.0])


def test_kl_penalised_per_token_rewards():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = ft.kl_penalized_rewards(logprobs, ref_logprobs, torch.tensor([3.0, -1.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]]))
    # −β·kl everywhere, the score added at each row's last real token, nothing on padding
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 3.0, 0.0], [0.0, 0.05, -1.0]]))


def test_right_aligned_responses_get_the_same_rewards_and_advantages_as_left_aligned_ones():
    """Rollouts end every response in the last column (padding in front): shifting a row changes nothing."""
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -2.0, 0.0]])
    values, score = torch.tensor([[0.3, 0.6, 0.0]]), torch.tensor([2.0])
    left = torch.tensor([[1.0, 1.0, 0.0]])
    shift = lambda x: x.roll(1, dims=1)
    rewards, _ = ft.kl_penalized_rewards(logprobs, ref_logprobs, score, left, kl_coef=0.1)
    shifted, _ = ft.kl_penalized_rewards(shift(logprobs), shift(ref_logprobs), score, shift(left), kl_coef=0.1)
    torch.testing.assert_close(shifted, shift(rewards))
    advantages, returns = ft.gae(rewards, values * left, left, gamma=0.9, lam=0.95)
    shifted_advantages, shifted_returns = ft.gae(shifted, shift(values * left), shift(left), gamma=0.9, lam=0.95)
    torch.testing.assert_close(shifted_advantages, shift(advantages))
    torch.testing.assert_close(shifted_returns, shift(returns))


def test_clipped_losses_at_the_clip_boundary():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.3, 0.7, 0.7, 1.1]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, clip_fraction = ft.ppo_policy_loss(ratios.log(), old, advantages, mask, clip_range=0.2)
    # per token −min(ρA, clip(ρ)A): −1.2 (clipped), −0.7, +0.8 (clipped), +2.2
    assert loss.item() == pytest.approx((-1.2 - 0.7 + 0.8 + 2.2) / 4, rel=1e-5)
    assert clip_fraction.item() == pytest.approx(0.5)
    values, old_values, returns = torch.tensor([[1.5, 1.1]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    value_loss = ft.ppo_value_loss(values, old_values, returns, torch.ones(1, 2), clip_range=0.2)
    # token 1: max((1.5−2)², (1.2−2)²) = 0.64; token 2: inside the clip, (1.1−2)² = 0.81
    assert value_loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, rel=1e-5)


def test_whiten_and_adaptive_kl_controller():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = ft.whiten(x, mask)
    assert ft.masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6) and white[0, 3] == 0
    assert ft.masked_mean(white ** 2, mask).item() == pytest.approx(1.0, rel=1e-4)
    controller = ft.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))


def test_token_logprobs_against_a_naive_loop():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 2] = -100
    logprobs, mask = metrics.token_logprobs(logits, labels)
    for b in range(2):
        for t in range(4):
            expected = 0.0 if labels[b, t + 1] == -100 else logits[b, t].log_softmax(-1)[labels[b, t + 1]].item()
            assert logprobs[b, t].item() == pytest.approx(expected, abs=1e-5)
    assert metrics.sequence_logprobs(logits, labels).tolist() == pytest.approx(logprobs.sum(1).tolist())
    loss = metrics.shifted_cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(-(logprobs.sum() / mask.sum()).item(), rel=1e-5)


def test_scored_logprobs_equal_the_full_logits_ones_with_padding():
    torch.manual_seed(0)
    model = gpt_model.GPTModel(gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2,
                                                   d_ff=32))
    input_ids = torch.randint(0, 11, (3, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    labels[2, 3:] = -100  # a row with nothing scored
    full = metrics.sequence_logprobs(model(input_ids, attention_mask=attention_mask)["logits"], labels)
    scored = metrics.scored_logprobs(model, input_ids, attention_mask, labels)
    assert scored.tolist() == pytest.approx(full.tolist(), abs=1e-5) and scored[2] == 0
    mean = metrics.scored_logprobs(model, input_ids, attention_mask, labels, average=True)
    assert mean[0].item() == pytest.approx(full[0].item() / 5, abs=1e-5)


def test_scored_logprobs_go_through_forward_so_a_ddp_wrapped_policy_works(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = gpt_model.GPTModel(gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2,
                                                   d_ff=32))
    input_ids = torch.randint(0, 11, (2, 8))
    labels = input_ids.clone()
    labels[:, :4] = -100
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)  # what the trainer hands DPO's loss under torchrun
        total = metrics.scored_logprobs(wrapped, input_ids, None, labels)
        total.sum().backward()
    finally:
        dist.destroy_process_group()
    expected = metrics.sequence_logprobs(model(input_ids)["logits"], labels)
    assert total.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


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


def test_reward_nll_weight_adds_the_chosen_answers_per_token_nll(tiny_tokenizer):
    torch.manual_seed(0)
    lm = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64,
                                                            n_layers=1, d_model=32, n_heads=2))
    reward = model_heads.GPTRewardModel.from_language_model(lm)
    pairs = [{"instruction": "计算 1 + 2 = ?", "chosen": "3", "rejected": "4"},
             {"instruction": "Who?", "chosen": "ROMEO", "rejected": "JULIET"}]
    dataset = data_loader.PreferencePairDataset(pairs, tiny_tokenizer, max_seq_len=64)
    batch = data_loader.collate_pairs([dataset[0], dataset[1]], tiny_tokenizer.pad_token_id)
    plain = ft.reward_loss(reward, batch)
    weighted = ft.reward_loss(reward, batch, nll_weight=2.0)
    chosen = {k: v[:2] for k, v in batch.items()}  # the first half of a pair batch is the chosen answers
    nll = -metrics.scored_logprobs(lm, chosen["input_ids"], chosen["attention_mask"], chosen["labels"],
                                   average=True).mean()
    assert weighted["chosen_nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert weighted["preference_loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    assert weighted["loss"].item() == pytest.approx(plain["loss"].item() + 2.0 * nll.item(), rel=1e-5)


def test_dpo_nll_weight_adds_the_chosen_answers_per_token_nll(files, tmp_path):
    sft = config(files, tmp_path, "sft", max_steps=1, eval_interval=1)
    ft.run_sft(sft, None, show_progress=False)
    rows = {}
    for weight in (0.0, 2.0):
        dpo = config(files, tmp_path / str(weight), "dpo", sft_model=str(Path(sft.output_dir) / "sft_best.pth"),
                     max_steps=1, eval_interval=1, dpo_nll_weight=weight, lr=1e-12)
        ft.run_dpo(dpo, None, show_progress=False)
        rows[weight] = training.read_metrics(Path(dpo.output_dir) / "metrics.jsonl")[0]
    assert rows[0.0]["chosen_nll"] == pytest.approx(rows[2.0]["chosen_nll"]) and rows[0.0]["chosen_nll"] > 0
    with_nll = rows[0.0]["train_loss"] + 2.0 * rows[0.0]["chosen_nll"]
    assert rows[2.0]["train_loss"] == pytest.approx(with_nll, rel=1e-5)
    assert rows[0.0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference: DPO loss is log 2


def test_exact_match_and_pairwise_accuracy_on_hand_made_records():
    records = [{"response": "42", "task": "arithmetic"}, {"response": "7", "task": "arithmetic"},
               {"response": "ROMEO", "task": "speaker"}]
    report = exact_match_by_task([" 42\n", "8", "ROMEO"], records)
    assert report == {"exact_match": pytest.approx(2 / 3), "exact_match/arithmetic": 0.5, "exact_match/speaker": 1.0}
    assert metrics.pairwise_accuracy([1.0, 0.5, 2.0], [0.0, 0.5, 3.0]) == pytest.approx(1 / 3)  # a tie is not a win
    with pytest.raises(ValueError):
        metrics.exact_match(["a"], [])


# ----------------------------------------------------------------------------- SFT

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
    loss = training.causal_lm_loss(model, batch)
    log_probs = model(batch["input_ids"])["logits"][0].log_softmax(-1)
    ids = item["input_ids"]
    manual = -sum(log_probs[t, ids[t + 1]] for t in range(n_prompt - 1, len(ids) - 1)) / (len(ids) - n_prompt)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_sft_run_writes_best_with_template_and_resumes_exactly(files, tmp_path):
    straight = config(files, tmp_path / "a", "sft", max_steps=6, save_interval=3, eval_interval=3)
    ft.run_sft(straight, None, show_progress=False)
    best = checkpoints.load_checkpoint(Path(straight.output_dir) / "sft_best.pth")
    assert best["sft_template"] == SFT_TEMPLATE and best["stage"] == "sft"

    killed = config(files, tmp_path / "b", "sft", max_steps=6, save_interval=3, eval_interval=3)
    ft.run_sft(killed, None, show_progress=False, stop_after=3)  # as if killed after step 3's checkpoint
    ft.run_sft(killed, "auto", show_progress=False)
    losses = lambda cfg: [r["train_loss"] for r in training.read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
                          if "train_loss" in r]
    assert len(losses(straight)) == 6
    assert losses(killed)[3:] == losses(straight)[3:]  # the resumed steps see exactly the same batches


def test_lora_sft_saves_small_adapters_that_load_through_the_one_entry_point(files, tmp_path):
    cfg = config(files, tmp_path, "sft", lora_r=4, lora_alpha=8.0, lr=1e-2)
    ft.run_sft(cfg, None, show_progress=False)
    out = Path(cfg.output_dir)
    wrapped, tokenizer = checkpoints.load_model_and_tokenizer(out / "sft_best.pth")
    adapted, _ = checkpoints.load_model_and_tokenizer(out / "sft_lora_adapter.pth", tokenizer_dir=out / "tokenizer")
    base, _ = checkpoints.load_model_and_tokenizer(files["pretrained"])
    ids = torch.tensor([[0, *tokenizer.encode_ordinary("计算 1 + 2 = ?")]])
    assert torch.allclose(wrapped(ids)["logits"], adapted(ids)["logits"], atol=1e-6)
    assert not torch.allclose(base(ids)["logits"], adapted(ids)["logits"], atol=1e-4)  # the adapters learned
    assert (out / "sft_lora_adapter.pth").stat().st_size < 0.5 * (out / "sft_best.pth").stat().st_size
    frozen = {k: v for k, v in base.state_dict().items()}
    for name, value in wrapped.state_dict().items():  # every base weight untouched, only adapters trained
        plain = name.replace(".base_layer.", ".")
        if plain in frozen and "lora_" not in name:
            assert torch.equal(value, frozen[plain]), name

    merged_cfg = config(files, tmp_path / "m", "sft", lora_r=4, lora_alpha=8.0, lr=1e-2, merge_lora=True)
    ft.run_sft(merged_cfg, None, show_progress=False)
    merged = checkpoints.load_checkpoint(Path(merged_cfg.output_dir) / "sft_best.pth")
    assert not merged.get("lora") and not any("lora_" in k for k in merged["model_state_dict"])
    plain, _ = checkpoints.load_model_and_tokenizer(Path(merged_cfg.output_dir) / "sft_best.pth")
    adapter, _ = checkpoints.load_model_and_tokenizer(Path(merged_cfg.output_dir) / "sft_lora_adapter.pth",
                                                    tokenizer_dir=Path(merged_cfg.output_dir) / "tokenizer")
    assert torch.allclose(plain(ids)["logits"], adapter(ids)["logits"], atol=1e-5)


# ----------------------------------------------------------------------------- reward model and PPO

@pytest.mark.parametrize("likelihood_weight", [0.0, 1.0])
def test_reward_stage_trains_and_its_checkpoint_is_a_reward_model(files, tmp_path, likelihood_weight):
    sft = config(files, tmp_path, "sft")
    ft.run_sft(sft, None, show_progress=False)
    cfg = config(files, tmp_path, "reward", sft_model=str(Path(sft.output_dir) / "sft_best.pth"), max_steps=6,
                 eval_interval=3, reward_likelihood_weight=likelihood_weight)
    summary = ft.run_reward(cfg, None, show_progress=False)
    model, tokenizer = checkpoints.load_model_and_tokenizer(summary["checkpoint"])
    assert isinstance(model, model_heads.GPTRewardModel) and model.likelihood == (likelihood_weight > 0)
    if model.likelihood:  # the weight is learned, and the evaluator ranks by the same scores as training does
        assert model.likelihood_weight.item() != 1.0
        test_set = data_loader.PreferencePairDataset(str(files["rlhf_pairwise_test"]), tokenizer, 64)
        chosen, rejected = ft.score_pairs(model, test_set, tokenizer.pad_token_id, 8, torch.device("cpu"))
        report = GPTEvaluator(model, tokenizer, show_progress=False).evaluate_reward(files["rlhf_pairwise_test"])
        assert report["pairwise_accuracy"] == metrics.pairwise_accuracy(chosen, rejected)
        assert report["mean_margin"] == pytest.approx(sum(chosen) / 16 - sum(rejected) / 16, abs=1e-5)
    rows = training.read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert {"accuracy", "train_loss"} <= set(rows[0]) and any("val_accuracy" in r for r in rows)


def test_a_new_head_is_initialised_by_the_seed(files, tiny_tokenizer, tmp_path):
    lm, _, _ = ft.load_base(str(files["pretrained"]), None, "--pretrained_model")

    def head(seed: int, draws_before: int) -> torch.Tensor:
        torch.rand(draws_before)  # whatever ran before in the process must not matter
        cfg = config(files, tmp_path, "reward", seed=seed)
        model, _, _ = ft.resume_or(cfg, None, "reward", tiny_tokenizer,
                                   lambda: model_heads.GPTRewardModel.from_language_model(lm))
        return model.head.weight.detach().clone()

    assert torch.equal(head(0, 0), head(0, 5)) and not torch.equal(head(0, 0), head(1, 0))


@pytest.mark.parametrize("likelihood_weight", [0.0, 1.0])
def test_a_ppo_iteration_moves_the_policy_and_critic_but_not_the_reference_or_reward_model(files, tmp_path,
                                                                                            likelihood_weight):
    policy, tokenizer, _ = ft.load_base(str(files["pretrained"]), None, "--pretrained_model")
    reward = model_heads.GPTRewardModel.from_language_model(policy, likelihood_weight)
    cfg = config(files, tmp_path, "rlhf", lr=1e-3, critic_lr=1e-3, rollout_batch_size=4, ppo_minibatch_size=2,
                 ppo_epochs=2, max_steps=1)
    records = readers.load_sft_records(files["sft_test"])
    prompts = [record_prompt_ids(tokenizer, r, SFT_TEMPLATE) for r in records]
    trainer = ft.PPOTrainer(cfg, policy, reward, tokenizer, prompts, records[:4], SFT_TEMPLATE,
                            show_progress=False)
    before = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("policy", trainer.policy), ("reference", trainer.reference),
                              ("reward", trainer.reward_model), ("critic", trainer.critic))}
    batch = trainer.rollout(next(trainer.prompts))
    assert batch.response_mask.sum(1).min() >= 1 and batch.logprobs.shape == batch.values.shape
    stats = trainer.update(batch)
    assert {"policy_loss", "value_loss", "clip_fraction", "entropy"} <= set(stats)
    changed = {name: any(not torch.equal(v, getattr(trainer, attr).state_dict()[k]) for k, v in state.items())
               for (name, state), attr in zip(before.items(), ("policy", "reference", "reward_model", "critic"))}
    assert changed == {"policy": True, "reference": False, "reward": False, "critic": True}


def test_evaluate_policy_gives_every_answer_its_room_whatever_the_batch(files):
    """A short prompt batched with a long one must not have its answer cut by the long one's place in the context:
    batched figures equal those of one prompt at a time."""
    policy, tokenizer, _ = ft.load_base(str(files["pretrained"]), None, "--pretrained_model")
    reward = model_heads.GPTRewardModel.from_language_model(policy, 1.0)
    short = {"instruction": "计算 1 + 2 = ?", "response": "3"}
    long = {"instruction": "床前明月光，疑是地上霜。", "response": "x"}
    records = [short, long, dict(short, instruction="计算 3 + 4 = ?"), long]
    args = (policy, policy, reward, tokenizer, records, SFT_TEMPLATE, 40)
    assert len(record_prompt_ids(tokenizer, long, SFT_TEMPLATE)) + 40 > 64  # the long one leaves < 40
    one_by_one = ft.evaluate_policy(*args, batch_size=1)
    assert ft.evaluate_policy(*args, batch_size=4) == pytest.approx(one_by_one, abs=1e-5)


def test_samples_end_every_response_in_the_last_column_and_give_each_prompt_its_room(files):
    policy, tokenizer, _ = ft.load_base(str(files["pretrained"]), None, "--pretrained_model")
    template = SFT_TEMPLATE
    prompts = [record_prompt_ids(tokenizer, {"instruction": text}, template)
               for text in ("计算 1 + 2 = ?", "床前明月光，疑是地上霜。")]
    samples = ft.sample_responses(policy, prompts, 40, tokenizer, do_sample=False)
    alone = [ft.sample_responses(policy, [p], 40, tokenizer, do_sample=False).responses[0] for p in prompts]
    assert samples.responses == alone  # batched with a longer prompt, the short one keeps its room
    assert max(map(len, alone)) > 64 - max(map(len, prompts))  # a left-padded batch would have cut it
    n = samples.response_mask.size(1)
    assert samples.sequences.size(1) - samples.response_start == n == max(map(len, samples.responses))
    labels = ft.response_labels(samples)
    for row, (prompt, response) in enumerate(zip(prompts, samples.responses)):
        real = samples.sequences[row][samples.attention_mask[row].bool()].tolist()
        assert real == prompt + response  # left padding only
        assert samples.response_mask[row].tolist() == [0.0] * (n - len(response)) + [1.0] * len(response)
        assert [t for t in labels[row].tolist() if t != -100] == response


# ----------------------------------------------------------------------------- CLI errors

def test_cli_errors_are_one_line(files, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    no_field = tmp_path / "no_field.json"
    no_field.write_text(json.dumps([{"instruction": "x"}]))
    cases = {
        "run `python pretrain_trainer.py` first": ["--pretrained_model", str(tmp_path / "missing.pth")],
        "holds no records": ["--data_path", str(empty)],
        "missing or non-string field 'response'": ["--data_path", str(no_field)],
        "match no nn.Linear": ["--lora_r", "4", "--lora_targets", "q_proj"],
        "--lora_r applies to --mode sft only": ["--mode", "reward", "--lora_r", "4"],
        "run `python finetune.py --mode sft` first": ["--mode", "reward", "--sft_model", str(tmp_path / "none.pth")],
    }
    base = ["--pretrained_model", str(files["pretrained"]), "--data_path", str(files["sft_data"]),
            "--test_data_path", str(files["sft_test"]), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--device", "cpu"]
    for expected, extra in cases.items():
        code = ft.main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and expected in err, (expected, err)
    bad_flags = (["--mode", "grpo"], ["--dpo_loss", "hinge"], ["--group_size", "1"], ["--lora_r", "-1"],
                 ["--kl_coef", "-1"], ["--lam", "0"], ["--batch_size", "0"])
    for flags in bad_flags:
        with pytest.raises(SystemExit) as exit_info:
            ft.main(base + flags)
        assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()  # nothing was written by any rejected run

    other = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=300, max_seq_len=64, n_layers=1,
                                                               d_model=32, n_heads=2))
    checkpoints.save_checkpoint(tmp_path / "other" / "m.pth", other, tokenizer_fingerprint="another tokenizer")
    shutil.copytree(files["pretrained"].parent / "tokenizer", tmp_path / "other" / "tokenizer")
    code = ft.main(base + ["--pretrained_model", str(tmp_path / "other" / "m.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "has 512 tokens but the model only 300" in err.splitlines()[-1]


# ----------------------------------------------------------------------------- DPO, GRPO and the verifiers

def test_dpo_and_ipo_losses_against_hand_computed_values():
    t = lambda x: torch.tensor([x])
    loss, chosen_reward, rejected_reward = ft.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    # h = (−1 − −3) − (−2 − −2) = 2; −log σ(0.5·2) = log(1 + e^−1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert (chosen_reward.item(), rejected_reward.item()) == pytest.approx((0.5, -0.5))
    smoothed, _, _ = ft.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)
    ipo, _, _ = ft.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, ipo=True)
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    zero, _, _ = ft.dpo_loss(t(-4.0), t(-4.0), t(-1.0), t(-1.0), beta=0.3)  # zero margin
    assert zero.item() == pytest.approx(math.log(2), rel=1e-6)
    assert ft.dpo_loss(t(-4.0), t(-4.0), t(-1.0), t(-1.0), beta=0.25, ipo=True)[0].item() == pytest.approx(4.0)


def test_dpo_positive_penalises_only_a_chosen_answer_below_the_reference():
    t = lambda x: torch.tensor([x])
    # chosen fell 0.5 below the reference: h = (−2.5 − −6) − (−2 − −4) = 1.5, minus λ·0.5 = 1.5 − 1 = 0.5
    loss, _, _ = ft.dpo_loss(t(-2.5), t(-6.0), t(-2.0), t(-4.0), beta=0.5, dpop_lambda=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.25)), rel=1e-6)
    # chosen above the reference: no penalty, plain DPO
    above = [ft.dpo_loss(t(-1.5), t(-6.0), t(-2.0), t(-4.0), beta=0.5, dpop_lambda=lam)[0].item() for lam in (0, 50)]
    assert above[0] == pytest.approx(above[1]) == pytest.approx(math.log(1 + math.exp(-1.25)), rel=1e-6)


def test_grpo_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.0]])
    advantages = ft.grpo_advantages(rewards)
    std = math.sqrt(1 / 3)  # sample std of (0, 1, 0, 1)
    assert advantages[0].tolist() == pytest.approx([-0.5 / std, 0.5 / std, -0.5 / std, 0.5 / std], rel=1e-4)
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical rewards teach nothing
    assert advantages[2].sum().item() == pytest.approx(0.0, abs=1e-5) and advantages[2, 0] > 0


def test_dpo_and_rlvf_runs_write_their_best_checkpoints(files, tmp_path):
    sft = config(files, tmp_path, "sft")
    ft.run_sft(sft, None, show_progress=False)
    sft_model = str(Path(sft.output_dir) / "sft_best.pth")
    dpo = config(files, tmp_path, "dpo", sft_model=sft_model, max_steps=3, eval_interval=3)
    summary = ft.run_dpo(dpo, None, show_progress=False)
    rows = training.read_metrics(Path(dpo.output_dir) / "metrics.jsonl")
    assert {"accuracy", "margin"} <= set(rows[0]) and "val_accuracy" in rows[-1]
    assert isinstance(checkpoints.load_model_and_tokenizer(summary["checkpoint"])[0], gpt_model.GPTModel)
    rlvf = config(files, tmp_path, "rlvf", sft_model=sft_model, max_steps=2, eval_interval=2, rollout_batch_size=2,
                  group_size=3, ppo_minibatch_size=3, ppo_epochs=1)
    summary = ft.run_rlvf(rlvf, None, show_progress=False)
    rows = training.read_metrics(Path(rlvf.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2] and Path(summary["checkpoint"]).exists()


def test_rl_stages_follow_the_training_loops_warmup_and_cosine(files, tmp_path):
    """--warmup_steps / --min_lr_ratio shape the lr of PPO and GRPO as they do every other stage's (they were
    accepted and ignored); the critic's lr keeps its ratio to the policy's."""
    rlvf = config(files, tmp_path, "rlvf", sft_model=str(files["pretrained"]), max_steps=4, eval_interval=4,
                  rollout_batch_size=2, group_size=2, ppo_minibatch_size=4, ppo_epochs=1, lr=1e-4, warmup_steps=2,
                  min_lr_ratio=0.1)
    ft.run_rlvf(rlvf, None, show_progress=False)
    logged = [r["lr"] for r in training.read_metrics(Path(rlvf.output_dir) / "metrics.jsonl") if "reward" in r]
    assert logged == pytest.approx([5e-5, 1e-4, 0.1e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 0.9e-4,
                                    0.1e-4 + 0.5 * (1 + math.cos(3 * math.pi / 4)) * 0.9e-4])
    policy, tokenizer, _ = ft.load_base(str(files["pretrained"]), None, "--pretrained_model")
    reward = model_heads.GPTRewardModel.from_language_model(policy, 1.0)
    ppo = config(files, tmp_path, "rlhf", lr=1e-4, critic_lr=3e-4, warmup_steps=4, max_steps=8)
    trainer = ft.PPOTrainer(ppo, policy, reward, tokenizer, [[1, 2, 3]], [], SFT_TEMPLATE,
                            show_progress=False)
    trainer.step = 1
    assert trainer.apply_schedule() == pytest.approx(5e-5)
    assert trainer.policy_optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert trainer.critic_optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)
    constant = config(files, tmp_path / "default", "rlhf",  # the stage's defaults: a constant lr
                      **{k: ft.STAGE_DEFAULTS["rlhf"][k] for k in ("lr", "warmup_steps", "min_lr_ratio")})
    trainer = ft.PPOTrainer(constant, policy, reward, tokenizer, [[1, 2, 3]], [], SFT_TEMPLATE,
                            show_progress=False)
    for trainer.step in (0, 75, 149):
        assert trainer.apply_schedule() == pytest.approx(constant.lr)
    assert ft.build_parser().parse_args(["--mode", "rlvf", "--min_lr_ratio", "1"]).min_lr_ratio == 1.0  # as default


@pytest.mark.parametrize("skip", [True, False])
def test_rlvf_trains_only_on_groups_whose_answers_scored_differently(files, tmp_path, skip):
    records = [{"instruction": f"计算 {i} + 1 = ?", "response": str(i + 1), "verifier": "constant" if i % 2 else "length"}
               for i in range(4)]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    verifiers.register_verifier("constant")(lambda response, record: 1.0)  # every answer alike: zero advantage
    verifiers.register_verifier("length")(lambda response, record: float(len(response) % 2))
    try:
        rlvf = config(files, tmp_path, "rlvf", sft_model=str(files["pretrained"]), data_path=str(data),
                      test_data_path=str(data), max_steps=1, eval_interval=1, rollout_batch_size=4, group_size=4,
                      ppo_minibatch_size=4, ppo_epochs=1, format_weight=0.0, skip_uniform_groups=skip, seed=1)
        ft.run_rlvf(rlvf, None, show_progress=False)
    finally:
        del verifiers.VERIFIERS["constant"], verifiers.VERIFIERS["length"]
    row = next(r for r in training.read_metrics(Path(rlvf.output_dir) / "metrics.jsonl") if "reward" in r)
    uniform_groups = round(row["zero_advantage_groups"] * 4)
    assert uniform_groups >= 2  # the two "constant" groups at least
    assert row["trained_rows"] == (4 - uniform_groups) * 4 if skip else row["trained_rows"] == 16


def test_readme_lists_each_modes_defaults():
    from conftest import ROOT

    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `") and line.split("|")[1].strip(" `") in ft.STAGE_DEFAULTS}
    assert set(rows) == set(ft.STAGE_DEFAULTS)
    for mode, defaults in ft.STAGE_DEFAULTS.items():
        output_dir, lr, warmup, max_steps, interval = rows[mode][:5]
        assert output_dir.strip("`") == defaults["output_dir"] and float(lr) == defaults["lr"], mode
        assert (int(warmup), int(max_steps.replace(",", "")), int(interval)) == (
            defaults["warmup_steps"], defaults["max_steps"], defaults["eval_interval"]), mode
