"""finetune_stages: every stage runs on the one training loop, writes its best checkpoint, and resumes exactly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import checkpoints
import data_loader
import finetune_stages as stages
import gpt_model
import metrics
import model_heads
import scoring
import training
import verifiers
from conftest import stage_config
from evaluator import GPTEvaluator
from prompts import CHAT_TEMPLATE, SFT_TEMPLATE
from rl_step import PPOStep
from run_folder import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_nll_weight_adds_the_chosen_answers_per_token_nll(files, tmp_path):
    sft = stage_config(files, tmp_path, "sft", max_steps=1, eval_interval=1)
    stages.run_sft(sft, None, show_progress=False)
    rows = {}
    for weight in (0.0, 2.0):
        dpo = stage_config(files, tmp_path / str(weight), "dpo", sft_model=str(Path(sft.output_dir) / "sft_best.pth"),
                     max_steps=1, eval_interval=1, dpo_nll_weight=weight, lr=1e-12)
        stages.run_dpo(dpo, None, show_progress=False)
        rows[weight] = read_metrics(Path(dpo.output_dir) / "metrics.jsonl")[0]
    assert rows[0.0]["chosen_nll"] == pytest.approx(rows[2.0]["chosen_nll"]) and rows[0.0]["chosen_nll"] > 0
    with_nll = rows[0.0]["train_loss"] + 2.0 * rows[0.0]["chosen_nll"]
    assert rows[2.0]["train_loss"] == pytest.approx(with_nll, rel=1e-5)
    assert rows[0.0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference: DPO loss is log 2


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sft_run_writes_best_with_template_and_resumes_exactly(optimizer, files, tmp_path):
    straight = stage_config(files, tmp_path / "a", "sft", max_steps=6, save_interval=3, eval_interval=3,
                            optimizer=optimizer)
    stages.run_sft(straight, None, show_progress=False)
    best = checkpoints.load_checkpoint(Path(straight.output_dir) / "sft_best.pth")
    assert best["sft_template"] == CHAT_TEMPLATE and best["stage"] == "sft"

    killed = stage_config(files, tmp_path / "b", "sft", max_steps=6, save_interval=3, eval_interval=3,
                          optimizer=optimizer)
    stages.run_sft(killed, None, show_progress=False, stop_after=3)  # as if killed after step 3's checkpoint
    stages.run_sft(killed, "auto", show_progress=False)
    losses = lambda cfg: [r["train_loss"] for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
                          if "train_loss" in r]
    assert len(losses(straight)) == 6
    assert losses(killed)[3:] == losses(straight)[3:]  # the resumed steps see exactly the same batches


def test_sft_learns_calculator_calls_and_answers_never_the_results(files, tmp_path):
    """A tiny SFT run on the demo's calculator dialogues: the checkpoint knows the tool, and its samples score each
    call and the answer after the result, never the result (the engine writes that) nor a context-only turn."""
    from prompts import TOOL_CALL, TOOL_RESULT, TOOL_RESULT_END, knows_tools

    import random

    from data.sft import build_sft_data as build_sft
    sums = [build_sft.arithmetic_example(a, b) for a, b in ((40, 2), (13, 29), (7, 8), (50, 25))] * 6
    whole = build_sft.dialogues(sums, random.Random(0), len(sums), tool=True)  # --arithmetic_chat_form tool
    records = [w for r in whole for w in build_sft.windows(r, lambda record: len(record["messages"]) < 10)]
    assert len(records) == 48 and all(any(m.get("tool_calls") for m in r["messages"]) for r in records)
    data = tmp_path / "tools.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    cfg = stage_config({**files, "sft_data": data}, tmp_path, "sft", max_steps=2, eval_interval=2)
    stages.run_sft(cfg, None, show_progress=False)
    loaded = checkpoints.load(Path(cfg.output_dir) / "sft_best.pth")
    assert knows_tools(loaded.template)
    tok = loaded.tokenizer
    call, result, result_end = (tok.special_token_id(t) for t in (TOOL_CALL, TOOL_RESULT, TOOL_RESULT_END))
    dataset = data_loader.GPTSFTDataset(records, tok, 64, loaded.template)
    assert len(dataset) == len(records) and not dataset.num_truncated
    for record, (ids, labels) in zip(records, dataset.samples):
        inside = False
        for token, label in zip(ids, labels):
            inside = inside or token == result
            assert not (inside and label != -100)  # a result span: input only
            inside = inside and token != result_end
        learned_calls = sum(1 for m in record["messages"] if m.get("tool_calls") and m.get("weight", 1))
        assert sum(1 for t, label in zip(ids, labels) if t == call and label == t) == learned_calls >= 1
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant" and m["content"]
                   and m.get("weight", 1)]
        scored_text = tok.decode([label for label in labels if label != -100], skip_special_tokens=True)
        assert all(answer in scored_text for answer in answers)


def test_sft_at_a_longer_context_interpolates_a_rotary_models_positions(files, tiny_tokenizer, tmp_path):
    """--max_seq_len past the base's: a rotary model reads twice as many positions (linear interpolation, kept in
    the checkpoint); a learned position table cannot grow, which is one line up front."""
    torch.manual_seed(0)
    config = gpt_model.GPTConfig.from_preset("modern-tiny", vocab_size=len(tiny_tokenizer), max_seq_len=32,
                                             n_layers=1, d_model=32, n_heads=2, n_kv_heads=1)
    base = tmp_path / "rope" / "pretrain_best.pth"
    checkpoints.save_checkpoint(base, gpt_model.GPTModel(config), tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    tiny_tokenizer.save(base.parent / "tokenizer")
    cfg = stage_config(files, tmp_path, "sft", pretrained_model=str(base), max_seq_len=64, max_steps=2)
    stages.run_sft(cfg, None, show_progress=False)
    loaded = checkpoints.load(Path(cfg.output_dir) / "sft_best.pth").model.config
    assert (loaded.max_seq_len, loaded.rope_scaling) == (64, 2.0)
    with pytest.raises(training.TrainError, match="learned positions"):
        stages.run_sft(stage_config(files, tmp_path / "gpt2", "sft", max_seq_len=128), None, show_progress=False)
    with pytest.raises(training.TrainError, match="shorter than the base"):
        stages.run_sft(stage_config(files, tmp_path / "short", "sft", max_seq_len=16), None, show_progress=False)


def test_lora_sft_saves_small_adapters_that_load_through_the_one_entry_point(files, tmp_path):
    cfg = stage_config(files, tmp_path, "sft", lora_r=4, lora_alpha=8.0, lr=1e-2)
    stages.run_sft(cfg, None, show_progress=False)
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

    merged_cfg = stage_config(files, tmp_path / "m", "sft", lora_r=4, lora_alpha=8.0, lr=1e-2, merge_lora=True)
    stages.run_sft(merged_cfg, None, show_progress=False)
    merged = checkpoints.load_checkpoint(Path(merged_cfg.output_dir) / "sft_best.pth")
    assert not merged.get("lora") and not any("lora_" in k for k in merged["model_state_dict"])
    plain, _ = checkpoints.load_model_and_tokenizer(Path(merged_cfg.output_dir) / "sft_best.pth")
    adapter, _ = checkpoints.load_model_and_tokenizer(Path(merged_cfg.output_dir) / "sft_lora_adapter.pth",
                                                    tokenizer_dir=Path(merged_cfg.output_dir) / "tokenizer")
    assert torch.allclose(plain(ids)["logits"], adapter(ids)["logits"], atol=1e-5)


@pytest.mark.parametrize("likelihood_weight", [0.0, 1.0])
def test_reward_stage_trains_and_its_checkpoint_is_a_reward_model(files, tmp_path, likelihood_weight):
    sft = stage_config(files, tmp_path, "sft")
    stages.run_sft(sft, None, show_progress=False)
    cfg = stage_config(files, tmp_path, "reward", sft_model=str(Path(sft.output_dir) / "sft_best.pth"), max_steps=6,
                 eval_interval=3, reward_likelihood_weight=likelihood_weight)
    summary = stages.run_reward(cfg, None, show_progress=False)
    model, tokenizer = checkpoints.load_model_and_tokenizer(summary["checkpoint"])
    assert isinstance(model, model_heads.GPTRewardModel) and model.likelihood == (likelihood_weight > 0)
    if model.likelihood:  # the weight is learned, and the evaluator ranks by the same scores as training does
        assert model.likelihood_weight.item() != 1.0
        test_set = data_loader.PreferencePairDataset(str(files["rlhf_pairwise_test"]), tokenizer, 64)
        chosen, rejected = scoring.pair_scores(model, test_set, tokenizer.pad_token_id, scoring.ScoreParams(8))
        report = GPTEvaluator(model, tokenizer, show_progress=False).evaluate_reward(files["rlhf_pairwise_test"])
        assert report["pairwise_accuracy"] == metrics.pairwise_accuracy(chosen, rejected)
        assert report["mean_margin"] == pytest.approx(sum(chosen) / 16 - sum(rejected) / 16, abs=1e-5)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert {"accuracy", "train_loss"} <= set(rows[0]) and any("val_accuracy" in r for r in rows)
    best = min((r for r in rows if "val_loss" in r), key=lambda r: r["val_loss"])  # the evaluation that saved it
    loaded = checkpoints.load(summary["checkpoint"])
    report = GPTEvaluator(loaded.model, loaded.tokenizer, show_progress=False,
                          template=loaded.template).evaluate_reward(files["rlhf_pairwise_test"], batch_size=64)
    assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-6)  # the CLI measures what training logged
    assert report["pairwise_accuracy"] == best["val_accuracy"]
    assert report["mean_margin"] == pytest.approx(best["val_margin"], rel=1e-5, abs=1e-7)


def test_a_new_head_is_initialised_by_the_seed(files, tiny_tokenizer, tmp_path):
    lm = stages.load_base(str(files["pretrained"]), None, "--pretrained_model").model

    def head(seed: int, draws_before: int) -> torch.Tensor:
        torch.rand(draws_before)  # whatever ran before in the process must not matter
        cfg = stage_config(files, tmp_path, "reward", seed=seed)
        model, _, _ = stages.resume_or(cfg, None, "reward", tiny_tokenizer,
                                   lambda: model_heads.GPTRewardModel.from_language_model(lm))
        return model.head.weight.detach().clone()

    assert torch.equal(head(0, 0), head(0, 5)) and not torch.equal(head(0, 0), head(1, 0))


def test_dpo_and_rlvf_runs_write_their_best_checkpoints(files, tmp_path):
    sft = stage_config(files, tmp_path, "sft")
    stages.run_sft(sft, None, show_progress=False)
    sft_model = str(Path(sft.output_dir) / "sft_best.pth")
    dpo = stage_config(files, tmp_path, "dpo", sft_model=sft_model, max_steps=3, eval_interval=3)
    summary = stages.run_dpo(dpo, None, show_progress=False)
    rows = read_metrics(Path(dpo.output_dir) / "metrics.jsonl")
    assert {"accuracy", "margin"} <= set(rows[0]) and "val_accuracy" in rows[-1]
    assert isinstance(checkpoints.load_model_and_tokenizer(summary["checkpoint"])[0], gpt_model.GPTModel)
    rlvf = stage_config(files, tmp_path, "rlvf", sft_model=sft_model, max_steps=2, eval_interval=2,
                        rollout_batch_size=2, group_size=3, ppo_minibatch_size=3, ppo_epochs=1)
    summary = stages.run_rlvf(rlvf, None, show_progress=False)
    rows = read_metrics(Path(rlvf.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2] and Path(summary["checkpoint"]).exists()


def test_rl_stages_follow_the_training_loops_warmup_and_cosine(files, tmp_path):
    """--warmup_steps / --min_lr_ratio shape the lr of PPO and GRPO as they do every other stage's (they were
    accepted and ignored); the critic's lr keeps its ratio to the policy's."""
    rlvf = stage_config(files, tmp_path, "rlvf", sft_model=str(files["pretrained"]), max_steps=4, eval_interval=4,
                  rollout_batch_size=2, group_size=2, ppo_minibatch_size=4, ppo_epochs=1, lr=1e-4, warmup_steps=2,
                  min_lr_ratio=0.1)
    stages.run_rlvf(rlvf, None, show_progress=False)
    logged = [r["lr"] for r in read_metrics(Path(rlvf.output_dir) / "metrics.jsonl") if "reward" in r]
    assert logged == pytest.approx([5e-5, 1e-4, 0.1e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 0.9e-4,
                                    0.1e-4 + 0.5 * (1 + math.cos(3 * math.pi / 4)) * 0.9e-4])
    base = stages.load_base(str(files["pretrained"]), None, "--pretrained_model")
    reward = model_heads.GPTRewardModel.from_language_model(base.model, 1.0)

    def ppo_trainer(cfg) -> training.Trainer:
        step = PPOStep(cfg, base.tokenizer, reward, [], SFT_TEMPLATE)
        return training.Trainer(cfg, base.model, base.tokenizer, iter(()), step, prefix="ppo", show_progress=False)

    trainer = ppo_trainer(stage_config(files, tmp_path, "rlhf", lr=1e-4, critic_lr=3e-4, warmup_steps=4, max_steps=8))
    trainer.step = 1
    trainer._apply_schedule()
    assert trainer.lr == pytest.approx(5e-5) and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert trainer.strategy.critic_optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4)
    defaults = stages.PPOConfig()  # the stage's defaults: a constant lr
    trainer = ppo_trainer(stage_config(files, tmp_path / "default", "rlhf", lr=defaults.lr,
                                       warmup_steps=defaults.warmup_steps, min_lr_ratio=defaults.min_lr_ratio))
    for trainer.step in (0, 75, 149):
        trainer._apply_schedule()
        assert trainer.lr == pytest.approx(defaults.lr)


@pytest.mark.parametrize("skip", [True, False])
def test_rlvf_trains_only_on_groups_whose_answers_scored_differently(files, tmp_path, skip):
    records = [{"instruction": f"计算 {i} + 1 = ?", "response": str(i + 1), "verifier": "constant" if i % 2 else "length"}
               for i in range(4)]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    verifiers.register_verifier("constant")(lambda response, record: 1.0)  # every answer alike: zero advantage
    verifiers.register_verifier("length")(lambda response, record: float(len(response) % 2))
    try:
        rlvf = stage_config(files, tmp_path, "rlvf", sft_model=str(files["pretrained"]), data_path=str(data),
                      test_data_path=str(data), max_steps=1, eval_interval=1, rollout_batch_size=4, group_size=4,
                      ppo_minibatch_size=4, ppo_epochs=1, format_weight=0.0, skip_uniform_groups=skip, seed=1)
        stages.run_rlvf(rlvf, None, show_progress=False)
    finally:
        del verifiers.VERIFIERS["constant"], verifiers.VERIFIERS["length"]
    row = next(r for r in read_metrics(Path(rlvf.output_dir) / "metrics.jsonl") if "reward" in r)
    uniform_groups = round(row["zero_advantage_groups"] * 4)
    assert uniform_groups >= 2  # the two "constant" groups at least
    assert row["trained_rows"] == (4 - uniform_groups) * 4 if skip else row["trained_rows"] == 16


# ----------------------------------------------------------------------------- RL on the one training loop
# Regressions of the RL loop that copied the training loop (each behaved wrongly at 45b0f70).

def sft_model(files, tmp_path) -> str:
    sft = stage_config(files, tmp_path, "sft", max_steps=2, eval_interval=2)
    stages.run_sft(sft, None, show_progress=False)
    return str(Path(sft.output_dir) / "sft_best.pth")


def rlvf_config(files, tmp_path, name: str, sft: str, **overrides):
    values = dict(sft_model=sft, max_steps=4, eval_interval=2, rollout_batch_size=2, group_size=4,
                  ppo_minibatch_size=4, ppo_epochs=1, format_weight=1.0, lr=1e-3, skip_uniform_groups=False)
    return stage_config(files, tmp_path / name, "rlvf", **{**values, **overrides})


def step_rows(config) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"}
            for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward" in r]


def test_rl_keep_last_0_keeps_every_step_checkpoint_and_1_keeps_the_last(files, tmp_path):
    sft = sft_model(files, tmp_path)
    for keep_last, expected in ((0, [1, 2, 3]), (1, [3])):  # at 45b0f70 keep_last 0 deleted every one of them
        config = rlvf_config(files, tmp_path, f"keep{keep_last}", sft, max_steps=3, save_interval=1,
                             keep_last=keep_last)
        stages.run_rlvf(config, None, show_progress=False)
        kept = sorted(int(p.stem.rsplit("_", 1)[1]) for p in Path(config.output_dir).glob("rlvf_step_*.pth"))
        assert kept == expected


def test_rl_epochs_stop_the_run(files, tmp_path):
    """--epochs N is one stopping rule with --max_steps (at 45b0f70 RL ignored it and ran until --max_minutes)."""
    sft = sft_model(files, tmp_path)
    records = [{"instruction": f"计算 {i} + 1 = ?", "response": str(i + 1), "task": "arithmetic"} for i in range(6)]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    # a time budget as well, as at 45b0f70 (whose RL loop stopped on it alone): the test's time limit ends a regression
    config = rlvf_config(files, tmp_path, "epochs", sft, data_path=str(prompts), max_steps=None, epochs=2,
                         max_minutes=600.0)
    summary = stages.run_rlvf(config, None, show_progress=False)
    assert summary["steps"] == 6  # 2 epochs x 3 batches of 2 prompts


@pytest.mark.parametrize("stage, optimizer", [("rlvf", "adamw"), ("rlhf", "adamw"), ("rlhf", "muon")])
def test_rl_resumes_exactly(files, tmp_path, stage, optimizer):
    """A run killed after step 2 and resumed with --resume auto ends where the uninterrupted run does: the same rows
    and the same policy (and critic), through the loop's one save / restore."""
    sft = sft_model(files, tmp_path)
    if stage == "rlvf":
        make = lambda name: rlvf_config(files, tmp_path, name, sft, save_interval=2,  # noqa: E731
                                        optimizer=optimizer)
        run = stages.run_rlvf
    else:
        reward = model_heads.GPTRewardModel.from_language_model(checkpoints.load(sft, trainable=True).model)
        checkpoints.save_checkpoint(tmp_path / "reward.pth", reward, model_class="reward",
                                    tokenizer_fingerprint=checkpoints.load(sft).tokenizer.fingerprint)
        shutil_copy_tokenizer(sft, tmp_path)
        make = lambda name: stage_config(files, tmp_path / name, "rlhf", sft_model=sft,  # noqa: E731
                                         reward_model=str(tmp_path / "reward.pth"), max_steps=4, eval_interval=2,
                                         rollout_batch_size=4, ppo_minibatch_size=2, ppo_epochs=1, save_interval=2,
                                         optimizer=optimizer)
        run = stages.run_rlhf
    straight, killed = make("straight"), make("killed")
    run(straight, None, show_progress=False)
    run(killed, None, show_progress=False, stop_after=2)
    run(killed, "auto", show_progress=False)
    assert step_rows(killed) == step_rows(straight) and len(step_rows(straight)) == 4
    prefix = "rlvf" if stage == "rlvf" else "ppo"
    a, b = (checkpoints.load_checkpoint(Path(c.output_dir) / f"{prefix}_step_4.pth") for c in (straight, killed))
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert a["step_state"].keys() == b["step_state"].keys() and a["scaler"] == b["scaler"]


def shutil_copy_tokenizer(sft: str, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(Path(sft).parent / "tokenizer", tmp_path / "tokenizer", dirs_exist_ok=True)


def test_rl_runs_in_the_run_precision_with_grad_accum_and_compile(files, tmp_path, monkeypatch):
    """--dtype, --grad_accum and --compile reach PPO/GRPO (at 45b0f70 they were accepted and ignored): rollouts and
    updates run under bf16 autocast, each minibatch is split into grad_accum micro-batches, and the training forward
    passes go through the compiled model."""
    sft = sft_model(files, tmp_path)
    compiled_calls, autocast_seen, micro_batches = [], set(), []

    class Compiled(torch.nn.Module):  # what torch.compile returns, without paying for inductor here
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *args, **kwargs):
            compiled_calls.append(args[0].shape[0])
            return self._orig_mod(*args, **kwargs)

    monkeypatch.setattr(training.torch, "compile", lambda module, **kwargs: Compiled(module))
    real_update = training.Trainer.update

    def update(self, micro_losses, *args, **kwargs):
        micro_batches.append(len(micro_losses))
        return real_update(self, micro_losses, *args, **kwargs)

    monkeypatch.setattr(training.Trainer, "update", update)
    config = rlvf_config(files, tmp_path, "bf16", sft, max_steps=1, dtype="bf16", grad_accum=2, compile=True)
    policy = stages.load_base(sft, None, "--sft_model").model
    policy.register_forward_hook(lambda module, args, out: autocast_seen.add(torch.is_autocast_enabled("cpu")))
    monkeypatch.setattr(stages, "load_base", lambda *args: checkpoints.Loaded(
        policy, checkpoints.load(sft).tokenizer, "lm", SFT_TEMPLATE, Path(sft)))
    stages.run_rlvf(config, None, show_progress=False)
    assert autocast_seen == {True}  # every policy pass (rollout, update, held-out) under bf16 autocast
    assert set(micro_batches) == {2} and compiled_calls and set(compiled_calls) == {2}  # 4-row minibatches in halves


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_sft_from_a_tokenizer_without_chat_tokens_adds_them_and_grows_the_embedding(files, tmp_path, lora_r):
    from byte_level_bpe import ByteLevelBPETokenizer
    from conftest import corpus_lines
    from gpt_model import GPTConfig, GPTModel
    from prompts import CHAT_TOKENS, render_prompt

    old = ByteLevelBPETokenizer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    old.train(corpus_lines(limit=300), show_progress=False)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(old), max_seq_len=64, n_layers=1, d_model=32,
                                           n_heads=2))
    pretrained = tmp_path / "old" / "pretrain_best.pth"
    checkpoints.save_checkpoint(pretrained, model, tokenizer_fingerprint=old.fingerprint)
    old.save(pretrained.parent / "tokenizer")
    cfg = stage_config({**files, "pretrained": pretrained}, tmp_path, "sft", lora_r=lora_r, lora_alpha=8.0)
    stages.run_sft(cfg, None, show_progress=False)
    loaded = checkpoints.load(Path(cfg.output_dir) / "sft_best.pth")
    added = len(CHAT_TOKENS)
    assert loaded.template == CHAT_TEMPLATE and len(loaded.tokenizer) == len(old) + added
    assert [loaded.tokenizer.special_token_id(t) for t in CHAT_TOKENS] == list(range(len(old), len(old) + added))
    assert loaded.model.config.vocab_size == len(old) + added
    embedding = loaded.model.transformer.wte.weight if not lora_r else None
    if embedding is not None:  # old rows as they were trained from, new rows distinct from each other
        assert not torch.allclose(embedding[-4:-3], embedding[-3:-2])
    ids = render_prompt(loaded.tokenizer, [{"role": "user", "content": "计算 1 + 2 = ?"}], loaded.template).ids
    assert loaded.model(torch.tensor([ids]))["logits"].shape[-1] == len(old) + added
    if lora_r:
        adapter = checkpoints.load(Path(cfg.output_dir) / "sft_lora_adapter.pth",
                                   tokenizer_dir=Path(cfg.output_dir) / "tokenizer")
        assert torch.allclose(adapter.model(torch.tensor([ids]))["logits"],
                              loaded.model(torch.tensor([ids]))["logits"], atol=1e-6)


# ----------------------------------------------------------------------------- kinds, data up front, messages

def lora_sft_model(files, tmp_path) -> str:
    sft = stage_config(files, tmp_path, "sft", max_steps=1, eval_interval=1, lora_r=2)
    stages.run_sft(sft, None, show_progress=False)
    return str(Path(sft.output_dir) / "sft_best.pth")  # adapters in place (no --merge_lora)


@pytest.mark.parametrize("mode", ["dpo", "rlvf"])
def test_a_stage_from_a_lora_sft_model_writes_a_best_checkpoint_that_loads(mode, files, tmp_path):
    """At a9fd542 dpo/rlvf --sft_model <LoRA sft_best.pth> trained, then wrote a *_best.pth no loader could build."""
    sft = lora_sft_model(files, tmp_path)
    overrides = dict(rollout_batch_size=2, group_size=2, ppo_minibatch_size=4, ppo_epochs=1) if mode == "rlvf" else {}
    config = stage_config(files, tmp_path / "next", mode, sft_model=sft, max_steps=1, eval_interval=1, **overrides)
    summary = (stages.run_dpo if mode == "dpo" else stages.run_rlvf)(config, None, show_progress=False)
    loaded = checkpoints.load(summary["checkpoint"])
    assert loaded.kind == "lm" and not checkpoints.checkpoint_metadata(summary["checkpoint"])["lora"]


@pytest.mark.parametrize("verifier", ["nope", ["math"]], ids=["unknown", "a list"])
@pytest.mark.parametrize("where", ["data_path", "test_data_path"])
def test_rlvf_checks_every_records_verifier_before_it_evaluates_or_touches_the_folder(verifier, where, files,
                                                                                       tmp_path):
    records = json.loads(Path(files["sft_data"]).read_text(encoding="utf-8"))[:6]
    records[4]["verifier"] = verifier
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "rlvf"
    out.mkdir()
    (out / "rlvf_best.pth").write_bytes(b"an earlier run's best")
    config = stage_config(files, tmp_path, "rlvf", sft_model=str(files["pretrained"]), **{where: str(bad)},
                          rollout_batch_size=2, group_size=2)
    with pytest.raises(verifiers.DataError, match=rf"--{where} .*bad.json: record 5: .*(unknown verifier 'nope'|"
                                                  r"field 'verifier' is a list)"):
        stages.run_rlvf(config, None, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["rlvf_best.pth"]
    assert (out / "rlvf_best.pth").read_bytes() == b"an earlier run's best"


@pytest.mark.parametrize("keep_last", [0, 1])
@pytest.mark.parametrize("at_step", [0, 2], ids=["before the first step", "at step 2"])
def test_the_sigterm_message_names_only_a_file_that_exists(keep_last, at_step, files, tmp_path, monkeypatch):
    """At 45b0f70 PPO's message with --keep_last 0 named a step checkpoint it had just deleted."""
    import os
    import signal

    import cli
    import rl_step

    real_call, real_held_out = rl_step.GRPOStep.__call__, rl_step.GRPOStep.held_out

    def call(self, trainer):
        if trainer.step + 1 == at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # StopSignals turns it into a save at the end of this step
        return real_call(self, trainer)

    def held_out(self, policy):
        if at_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # during the step-0 evaluation: nothing saved yet
        return real_held_out(self, policy)

    monkeypatch.setattr(rl_step.GRPOStep, "__call__", call)
    monkeypatch.setattr(rl_step.GRPOStep, "held_out", held_out)
    config = stage_config(files, tmp_path, "rlvf", sft_model=str(files["pretrained"]), max_steps=4, save_interval=1,
                          keep_last=keep_last, rollout_batch_size=2, group_size=2, ppo_minibatch_size=4,
                          ppo_epochs=1)
    with pytest.raises(cli.Interrupted) as stopped:
        stages.run_rlvf(config, None, show_progress=False)
    message = str(stopped.value)
    if at_step == 0:
        assert "no checkpoint saved yet" in message and ".pth" not in message
    else:
        named = Path(message.split("saved ")[1].split(";")[0])
        assert named.name == "rlvf_step_2.pth" and named.is_file(), message


def test_rotation_keeps_the_checkpoint_just_written_when_the_folder_holds_later_steps(files, tmp_path):
    """Resumed from an earlier step of the same folder, --keep_last 1 used to delete the file it had just saved (the
    later steps sort after it), and the SIGTERM message then named it."""
    base = dict(sft_model=str(files["pretrained"]), save_interval=1, rollout_batch_size=2, group_size=2,
                ppo_minibatch_size=4, ppo_epochs=1, eval_interval=100)
    stages.run_rlvf(stage_config(files, tmp_path, "rlvf", max_steps=4, keep_last=0, **base), None, show_progress=False)
    out = tmp_path / "rlvf"
    config = stage_config(files, tmp_path, "rlvf", max_steps=4, keep_last=1, **base)
    stages.run_rlvf(config, str(out / "rlvf_step_2.pth"), show_progress=False, stop_after=3)
    trainer_steps = sorted(p.name for p in out.glob("rlvf_step_*.pth"))
    assert trainer_steps == ["rlvf_step_3.pth"]


def test_rlhf_checks_its_data_and_resume_file_before_training_the_reward_model_first(files, tmp_path):
    """Without --reward_model, rlhf trains one first into <output_dir>/reward/: minutes of work (and a folder) that a
    bad --test_data_path or --resume used to throw away after it."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]), encoding="utf-8")
    not_ppo = tmp_path / "lm.pth"
    not_ppo.write_bytes(files["pretrained"].read_bytes())
    for overrides, resume, message in ((dict(test_data_path=str(bad)), None, "missing or non-string field"),
                                       ({}, str(not_ppo), "no training state")):
        config = stage_config(files, tmp_path, "rlhf", sft_model=str(files["pretrained"]), **overrides)
        with pytest.raises(ValueError, match=message):
            stages.run_rlhf(config, resume, show_progress=False)
        assert not Path(config.output_dir).exists()
