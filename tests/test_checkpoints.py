"""checkpoints: the one format and loader (every kind of file, read once, prepared for training or inference),
what a file is, and its one-line errors."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
import gpt_model
import lora
import model_heads
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import (CheckpointError, build_model, describe, load, load_checkpoint, load_model_and_tokenizer,
                         save_checkpoint)
from cli_cases import assert_one_line_error, run_main, snapshot
from conftest import corpus_lines
from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from model_heads import GPTClassifier, GPTRewardModel
from quantization import Int8Linear, PackedLinear, quantize_model_int8

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=48)


@pytest.fixture()
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(**SMALL).eval()


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, step=3, tokenizer_fingerprint="abc", history={"loss": [1.0, 0.5]})
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and ckpt["history"] == {"loss": [1.0, 0.5]} and ckpt["config"] == model.config.to_dict()
    loaded = build_model(load_checkpoint(path), "checkpoint").eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids)["logits"], model(ids)["logits"])
    assert not list(path.parent.glob("*.tmp"))


def test_compile_and_ddp_prefixes_are_stripped(model, tmp_path):
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state, "config": model.config.to_dict()}, tmp_path / "wrapped.pt")
    loaded = build_model(load_checkpoint(tmp_path / "wrapped.pt"), "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class CompiledLike(torch.nn.Module):
    """What torch.compile returns: the real module under `_orig_mod` (without paying dynamo's import)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self._orig_mod = module


def test_saving_a_wrapped_model_writes_plain_names(model, tmp_path):
    for wrapped in (CompiledLike(model), torch.nn.DataParallel(model), CompiledLike(torch.nn.DataParallel(model))):
        save_checkpoint(tmp_path / "w.pt", wrapped)
        assert set(load_checkpoint(tmp_path / "w.pt")["model_state_dict"]) == set(model.state_dict())


def test_checkpoint_error_paths(model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="a folder without config.json; pass the .pth file"):
        load_checkpoint(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "garbage.pt")
    save_checkpoint(tmp_path / "good.pt", model)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "foreign.pt")
    ckpt = load_checkpoint(tmp_path / "good.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "d_ff": 64}}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"c_fc.weight has shape \(128, 32\) in the checkpoint but \(64, 32\)"):
        build_model(load_checkpoint(tmp_path / "mismatch.pt"), "checkpoint")
    torch.save({**ckpt, "config": {**ckpt["config"], "n_embd": 32}}, tmp_path / "badconfig.pt")
    with pytest.raises(CheckpointError, match="unknown GPTConfig field"):
        build_model(load_checkpoint(tmp_path / "badconfig.pt"), "checkpoint")
    state = dict(ckpt["model_state_dict"])
    state.pop("transformer.ln_f.weight")
    torch.save({**ckpt, "model_state_dict": state}, tmp_path / "missingkey.pt")
    with pytest.raises(CheckpointError, match="missing"):
        build_model(load_checkpoint(tmp_path / "missingkey.pt"), "checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(tmp_path / "bad_extra.pt", model, when=object())
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "reserved.pt", model, config={})


def test_load_model_and_tokenizer(tiny_tokenizer, tiny_config, tmp_path):
    model = GPTModel(tiny_config)
    tiny_tokenizer.save(tmp_path / "run" / "tokenizer")
    save_checkpoint(tmp_path / "run" / "best.pt", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    loaded, tokenizer = load_model_and_tokenizer(tmp_path / "run" / "best.pt")
    assert tokenizer.fingerprint == tiny_tokenizer.fingerprint and not loaded.training
    prompt = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode_ordinary("ROMEO:")])
    params = SamplingParams(max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    out = generate(loaded, prompt, params)
    assert isinstance(tokenizer.decode(out[0]), str)

    with pytest.raises(CheckpointError, match="tokenizer folder"):
        load_model_and_tokenizer(tmp_path / "run" / "best.pt", tokenizer_dir=tmp_path / "nowhere")
    save_checkpoint(tmp_path / "run" / "other.pt", model, tokenizer_fingerprint="0" * 64)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_model_and_tokenizer(tmp_path / "run" / "other.pt")
    small = GPTModel(GPTConfig.from_dict({**tiny_config.to_dict(), "vocab_size": 300}))
    save_checkpoint(tmp_path / "run" / "small.pt", small)
    with pytest.raises(CheckpointError, match="has 512 tokens but the model only 300"):
        load_model_and_tokenizer(tmp_path / "run" / "small.pt")


@pytest.fixture()
def run(tiny_tokenizer, tiny_config, tmp_path):
    """A run folder with its tokenizer and a float language model checkpoint."""
    torch.manual_seed(0)
    tiny_tokenizer.save(tmp_path / "tokenizer")
    model = GPTModel(tiny_config).eval()
    save_checkpoint(tmp_path / "lm.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint, stage="sft",
                    step=7, sft_template="Q: {instruction}\nA: {response}")
    return tmp_path, model


def test_inference_loads_fast_weights_and_training_loads_plain_ones(run):
    folder, model = run
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    served = load(folder / "lm.pth")
    trainable = load(folder / "lm.pth", trainable=True)
    assert served.kind == "lm" and served.template == "Q: {instruction}\nA: {response}"
    assert served.metadata["step"] == 7 and "model_state_dict" not in served.metadata
    assert not served.model.training and not any(p.requires_grad for p in served.model.parameters())
    assert isinstance(served.model.lm_head, PackedLinear if torch.backends.mkldnn.is_available() else torch.nn.Linear)
    assert trainable.model.training and isinstance(trainable.model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        expected = model(ids)["logits"]
        torch.testing.assert_close(served.model(ids)["logits"], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(trainable.model.eval()(ids)["logits"], expected)
    with pytest.raises(CheckpointError, match="prepared for inference"):
        save_checkpoint(folder / "packed.pth", served.model)


def test_int8_files_load_as_int8_and_are_refused_for_training(run, tiny_tokenizer):
    folder, model = run
    save_checkpoint(folder / "int8.pth", quantize_model_int8(model), tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    loaded = load(folder / "int8.pth")
    assert loaded.kind == "lm-int8" and isinstance(loaded.model.lm_head, Int8Linear)
    with pytest.raises(CheckpointError,
                       match="--pretrained_model .*int8.pth is an INT8 checkpoint, for inference only"):
        load(folder / "int8.pth", trainable=True, flag="--pretrained_model")
    assert load(folder / "lm.pth", quantize="int8").kind == "lm-int8"  # quantized at load time on request


def test_lora_checkpoints_are_merged_for_inference_and_training_unless_kept(run, tiny_tokenizer):
    """A LoRA-laden model trained on by another stage (dpo/rlvf --sft_model) is a plain one: what it saves loads."""
    folder, model = run
    adapted = lora.apply_lora(GPTModel(model.config), ["c_attn"], r=2, alpha=4.0)
    adapted.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.normal_()
    save_checkpoint(folder / "lora.pth", adapted, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                    lora=lora.lora_config(adapted))
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    served, trainable = load(folder / "lora.pth"), load(folder / "lora.pth", trainable=True)
    kept = load(folder / "lora.pth", trainable=True, keep_adapters=True)
    assert not lora.lora_layers(served.model) and not lora.lora_layers(trainable.model)
    assert lora.lora_layers(kept.model) and trainable.kind == "lm" and not trainable.metadata["lora"]
    with torch.no_grad():
        for other in (served, trainable):
            torch.testing.assert_close(other.model.eval()(ids)["logits"], adapted.eval()(ids)["logits"], atol=1e-4,
                                       rtol=1e-4)


def test_the_wrong_kind_of_file_is_one_line_naming_the_flag_and_its_writer(run, tiny_tokenizer):
    folder, model = run
    reward = GPTRewardModel.from_language_model(model)
    save_checkpoint(folder / "reward.pth", reward, model_class="reward",
                    tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    with pytest.raises(CheckpointError, match=r"--sft_model .*reward.pth is a reward model \(written by finetune.py "
                                              r"--mode reward\), not a language model"):
        load(folder / "reward.pth", expect="lm", flag="--sft_model")
    with pytest.raises(CheckpointError, match="lm.pth is a language model .*not a reward model"):
        load(folder / "lm.pth", expect="reward", flag="--reward_model")
    assert isinstance(load(folder / "reward.pth", expect="reward").model, GPTRewardModel)
    classifier = GPTClassifier(model.config, 2, ["a", "b"])
    save_checkpoint(folder / "classify.pth", classifier, model_class="classify", labels=["a", "b"])
    assert load(folder / "classify.pth").kind == "classify"


def test_describe_says_what_a_file_is(run, tiny_tokenizer, capsys):
    folder, model = run
    line = describe(folder / "lm.pth")
    assert "a language model" in line and "4 layers x 128, context 64, vocab 512" in line
    assert "stage sft, step 7" in line and "weights only" in line
    save_checkpoint(folder / "resumable.pth", model, optimizer={"state": {}}, rank_states=[{}])
    assert describe(folder / "resumable.pth").endswith("resumable (--resume)")
    assert checkpoints.main([str(folder / "lm.pth")]) == 0 and "a language model" in capsys.readouterr().out
    (folder / "junk.pth").write_bytes(b"junk")
    assert checkpoints.main([str(folder / "junk.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "corrupt" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- the wrong kind of checkpoint
# Every file says what it is; every entry point checks it once, up front, through checkpoints.load /
# checkpoints.load_resumable: exit 2, one line saying what was given and what to pass instead, nothing written.

FAKE_TRAINING_STATE = dict(step=2, optimizer={"state": {}, "param_groups": []}, scaler={}, best_val_loss=1.0,
                           scheduler={"train_seconds": 1.0, "max_steps": 4}, rank_states=[{"rng": {}}])


@pytest.fixture(scope="module")
def kinds(tiny_tokenizer, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """One file of every kind (weights-only models and each stage's step file, with a stand-in training state: the
    checks come before it is read), a reward model on another tokenizer, and small data files for every mode."""
    folder = tmp_path_factory.mktemp("kinds")
    shutil.copytree(tiny_tokenizer_dir, folder / "tokenizer")
    config = gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64, n_layers=1,
                                             d_model=32, n_heads=2)
    torch.manual_seed(0)
    fp = {"tokenizer_fingerprint": tiny_tokenizer.fingerprint}
    lm = gpt_model.GPTModel(config)
    save = checkpoints.save_checkpoint
    save(folder / "lm.pth", lm, **fp)
    save(folder / "int8.pth", quantize_model_int8(gpt_model.GPTModel(config).eval()), **fp)
    adapted = lora.apply_lora(gpt_model.GPTModel(config), ["c_attn"], r=2, alpha=4.0)
    lora.save_lora(folder / "adapter.pth", adapted, base_model=str(folder / "lm.pth"), config=config.to_dict(), **fp)
    save(folder / "reward.pth", model_heads.GPTRewardModel.from_language_model(lm), **fp)
    classifier = model_heads.GPTClassifier.from_language_model(lm, ["a", "b"])
    save(folder / "classify.pth", classifier, labels=["a", "b"], **fp)
    heads = {"pretrain": lm, "sft": lm, "dpo": lm, "ppo": lm, "rlvf": lm,
             "reward": model_heads.GPTRewardModel.from_language_model(lm),
             "classify": model_heads.GPTClassifier.from_language_model(lm, ["a", "b"])}
    for stage, model in heads.items():
        save(folder / f"{stage}_step_2.pth", model, stage=stage, labels=["a", "b"], **fp, **FAKE_TRAINING_STATE)
    other = ByteLevelBPETokenizer(vocab_size=300)
    other.train(corpus_lines(limit=100), show_progress=False)
    (folder / "other").mkdir()
    other.save(folder / "other" / "tokenizer")
    other_lm = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(other), max_seq_len=64,
                                                                  n_layers=1, d_model=32, n_heads=2))
    save(folder / "other" / "reward.pth", model_heads.GPTRewardModel.from_language_model(other_lm),
         tokenizer_fingerprint=other.fingerprint)
    sft = [{"instruction": f"计算 {i} + 1 = ?", "response": str(i + 1), "task": "arithmetic"} for i in range(4)]
    (folder / "sft.json").write_text(json.dumps(sft, ensure_ascii=False), encoding="utf-8")
    pairs = [{"instruction": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    (folder / "pairs.json").write_text(json.dumps(pairs), encoding="utf-8")
    (folder / "cls.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n"
                                              for i in range(4)), encoding="utf-8")
    (folder / "text.txt").write_text("\n".join(corpus_lines(limit=50)) + "\n", encoding="utf-8")
    return {p.stem if p.parent == folder else f"other_{p.stem}": p for p in folder.rglob("*.pth")} | {
        "folder": folder, "sft_data": folder / "sft.json", "pairs": folder / "pairs.json", "cls": folder / "cls.jsonl",
        "text": folder / "text.txt"}


MODE_DATA = {"sft": ["--data_path", "{sft_data}", "--test_data_path", "{sft_data}"],
             "reward": ["--pairwise_data", "{pairs}", "--pairwise_test_data", "{pairs}"],
             "dpo": ["--pairwise_data", "{pairs}", "--pairwise_test_data", "{pairs}", "--test_data_path", "{sft_data}"],
             "rlhf": ["--pairwise_data", "{pairs}", "--test_data_path", "{sft_data}"],
             "rlvf": ["--data_path", "{sft_data}", "--test_data_path", "{sft_data}"],
             "classify": ["--classify_train", "{cls}", "--classify_test", "{cls}"]}
FROM = {"sft": "--pretrained_model", "classify": "--pretrained_model"}  # the other modes start from --sft_model


def ft(mode: str, *flags: str, start: str = "{lm}") -> tuple[str, list[str]]:
    extra = ["--reward_model", "{reward}"] if mode == "rlhf" and "--reward_model" not in flags else []
    return "finetune", ["--mode", mode, FROM.get(mode, "--sft_model"), start, *MODE_DATA[mode], *extra, *flags,
                        "--max_steps", "1", "--device", "cpu", "--output_dir", "{out}/run"]


def pt_resume(name: str) -> tuple[str, list[str]]:
    return "pretrain_trainer", ["--train_data_dir", "{text}", "--tokenizer_dir", "{folder}/tokenizer", "--output_dir",
                                "{out}/run", "--device", "cpu", "--n_layers", "1", "--d_model", "32", "--n_heads", "2",
                                "--max_seq_len", "64", "--max_steps", "1", "--num_workers", "1", "--samples", "0",
                                "--resume", name]


TRAINS = "an INT8 checkpoint, for inference only: it cannot be trained; pass the float checkpoint"
WRONG_KIND = [  # (what, (module, argv), the message's telling part)
    *[(f"{mode} {FROM.get(mode, '--sft_model')} INT8", ft(mode, start="{int8}"), TRAINS) for mode in MODE_DATA],
    *[(f"{mode} from a reward model", ft(mode, start="{reward}"), "is a reward model (written by finetune.py --mode "
       "reward), not a language model: pass a language model") for mode in ("sft", "dpo", "rlvf", "classify")],
    ("sft from a classifier", ft("sft", start="{classify}"), "is a classifier (written by finetune.py --mode "
     "classify), not a language model"),
    *[(f"{mode} --resume {stage} step", ft(mode, "--resume", f"{{{stage}_step_2}}"),
       f"is a step checkpoint of {stage} ") for mode, stage in (
        ("sft", "reward"), ("sft", "dpo"), ("sft", "pretrain"), ("dpo", "sft"), ("reward", "sft"), ("rlvf", "ppo"),
        ("rlhf", "rlvf"), ("classify", "sft"), ("classify", "reward"))],
    ("dpo --resume sft step names the command", ft("dpo", "--resume", "{sft_step_2}"),
     "continue it with `finetune.py --mode sft --resume"),
    ("sft --resume INT8", ft("sft", "--resume", "{int8}"), "is an INT8 language model, for inference only, not a "
     "step checkpoint of sft: pass a sft_step_N.pth"),
    ("sft --resume LoRA adapters", ft("sft", "--resume", "{adapter}"), "is LoRA adapters, for inference only"),
    ("sft --lora_r 2 --resume a full-model step", ft("sft", "--lora_r", "2", "--resume", "{sft_step_2}"),
     "trains the whole model (no LoRA), but this run has --lora_r 2"),
    ("rlhf --reward_model on another tokenizer", ft("rlhf", "--reward_model", "{other_reward}"),
     "was trained with another tokenizer"),
    ("rlhf --reward_model a language model", ft("rlhf", "--reward_model", "{lm}"), "not a reward model"),
    ("rlhf --reward_model a classifier", ft("rlhf", "--reward_model", "{classify}"), "is a classifier"),
    *[(f"pretrain --resume {name}", pt_resume(f"{{{name}}}"), message) for name, message in (
        ("sft_step_2", "is a step checkpoint of sft (finetune.py --mode sft), not of pretrain"),
        ("classify_step_2", "is a step checkpoint of classify"), ("reward_step_2", "is a step checkpoint of reward"),
        ("int8", "is an INT8 language model"), ("lm", "no training state"))],
    ("evaluator --reward_model on another tokenizer",
     ("evaluator", ["--model_path", "{lm}", "--model_type", "sft", "--test_data_path", "{sft_data}", "--reward_model",
                    "{other_reward}", "--output", "{out}/report.json", "--no_progress", "--max_new_tokens", "2"]),
     "--reward_model {other_reward} was trained with another tokenizer (300 tokens) than {lm}"),
    ("evaluator --reward_model a language model",
     ("evaluator", ["--model_path", "{lm}", "--model_type", "sft", "--test_data_path", "{sft_data}", "--reward_model",
                    "{lm}", "--output", "{out}/report.json", "--no_progress"]), "not a reward model"),
    *[(f"quantizer {name}", ("inference.quantizer", ["--model_path", f"{{{name}}}", "--output", "{out}/q.pth",
                                                     "--no_eval"]), message) for name, message in (
        ("reward", "is a reward model"), ("classify", "is a classifier"), ("int8", "for inference only"))],
    *[(f"kv_cache_infer {name}", ("inference.kv_cache_infer", ["--model_path", f"{{{name}}}", "--prompt", "hi",
                                                                "--device", "cpu"]),
       f"is a {kind} (written by finetune.py --mode {name}), not a language model")
      for name, kind in (("classify", "classifier"), ("reward", "reward model"))],
]


@pytest.mark.parametrize("what, command, message", WRONG_KIND, ids=[case[0] for case in WRONG_KIND])
def test_the_wrong_kind_of_checkpoint_is_one_line_up_front(what, command, message, kinds, tmp_path, capsys):
    module, argv = command
    places = {k: str(v) for k, v in kinds.items()} | {"out": str(tmp_path)}
    before = snapshot(kinds["folder"])
    code, err = run_main(importlib.import_module(module).main, [a.format(**places) for a in argv], capsys)
    assert_one_line_error(code, err)
    assert message.format(**places) in err, err
    assert not list(tmp_path.iterdir()), "a refused command wrote something"
    assert snapshot(kinds["folder"]) == before


def test_every_kind_of_model_saves_a_file_that_says_what_it_is_and_loads_back(kinds, tmp_path):
    """save_checkpoint takes the head and the LoRA adapters from the model, so that no caller writes a file that
    loads as something else (dpo/rlvf from a LoRA SFT model used to write a *_best.pth nothing could load)."""
    for name, kind in (("lm", "lm"), ("int8", "lm-int8"), ("reward", "reward"), ("classify", "classify"),
                       ("adapter", "lora"), ("ppo_step_2", "lm")):
        loaded = checkpoints.load(kinds[name])
        assert loaded.kind == kind, name
    trained = checkpoints.load(kinds["adapter"], trainable=True)  # what another stage trains on: plain weights
    assert trained.kind == "lm" and not lora.lora_layers(trained.model)
    adapted = lora.apply_lora(checkpoints.load(kinds["lm"], trainable=True).model, ["c_attn"], r=2, alpha=4.0)
    checkpoints.save_checkpoint(tmp_path / "in_place.pth", adapted, lora=None, model_class="reward")  # wrong claims
    meta = checkpoints.checkpoint_metadata(tmp_path / "in_place.pth")
    assert meta["model_class"] == "lm" and meta["lora"]["r"] == 2
    assert lora.lora_layers(checkpoints.build_model(checkpoints.load_checkpoint(tmp_path / "in_place.pth"), "x"))
    assert "with LoRA adapters (r 2)" in checkpoints.describe(tmp_path / "in_place.pth")



MODERN = dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2, bias=False,
              tie_embeddings=False)


def test_a_checkpoint_written_before_the_architecture_options_loads_the_same_gpt2(model, tmp_path):
    """An old file's config has none of the new fields: it builds GPT-2, its weights load, its logits are the same."""
    save_checkpoint(tmp_path / "new.pth", model)
    ckpt = load_checkpoint(tmp_path / "new.pth")
    old_config = {k: v for k, v in ckpt["config"].items() if k in
                  ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "dropout", "bias",
                   "pad_token_id", "layer_norm_eps", "activation")}
    torch.save({**ckpt, "config": old_config}, tmp_path / "old.pth")
    old = build_model(load_checkpoint(tmp_path / "old.pth"), "old.pth").eval()
    assert old.config == model.config and old.config.architecture() == "GPT-2"
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(old(ids)["logits"], model(ids)["logits"])
    assert "GPT-2" in describe(tmp_path / "old.pth")


def test_the_modern_shape_saves_loads_and_says_what_it_is(tiny_tokenizer, tiny_config, tmp_path):
    torch.manual_seed(0)
    tiny_tokenizer.save(tmp_path / "tokenizer")
    model = GPTModel(GPTConfig.from_dict({**tiny_config.to_dict(), **MODERN})).eval()
    save_checkpoint(tmp_path / "modern.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    for quantize in ("none", "int8"):
        loaded = load(tmp_path / "modern.pth", quantize=quantize)
        with torch.no_grad():
            got, want = loaded.model(ids)["logits"], model(ids)["logits"]
        assert (got - want).abs().max() < (1e-4 if quantize == "none" else 0.1 * want.abs().max())
    save_checkpoint(tmp_path / "int8.pth", quantize_model_int8(GPTModel(model.config).eval()))
    assert load(tmp_path / "int8.pth", tmp_path / "tokenizer").model.lm_head.weight is not \
        load(tmp_path / "int8.pth", tmp_path / "tokenizer").model.transformer.wte.weight  # untied: two int8 tables
    line = describe(tmp_path / "modern.pth")
    assert "rope + rmsnorm + qk_norm + swiglu + gqa 4q/2kv heads + no bias + untied head" in line


# ----------------------------------------------------------------------------- what a checkpoint refers to

def test_checkpoint_inputs_name_every_file_a_checkpoint_reads_through(tiny_tokenizer, tmp_path):
    """A plain checkpoint reads itself and its tokenizer folder; a LoRA adapter also its base model and the base's
    tokenizer, and an adapter on an adapter the whole chain (a loop is followed once)."""
    from conftest import lora_adapter, tiny_checkpoint

    plain = tiny_checkpoint(tmp_path / "plain" / "m.pth", tiny_tokenizer)
    base, adapter = lora_adapter(tmp_path / "sft" / "adapters.pth", tmp_path / "pre" / "pretrain_best.pth",
                                 tiny_tokenizer)
    on_adapter = tmp_path / "again" / "a.pth"
    on_adapter.parent.mkdir()
    torch.save({**torch.load(adapter, weights_only=True), "base_model": str(adapter)}, on_adapter)
    looped = tmp_path / "loop.pth"
    torch.save({**torch.load(adapter, weights_only=True), "base_model": str(looped)}, looped)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    cases = [  # (path, --tokenizer_dir, expected paths)
        (plain, None, [plain, plain.parent / "tokenizer"]),
        (plain, tmp_path / "tok", [plain, tmp_path / "tok"]),
        (adapter, None, [adapter, adapter.parent / "tokenizer", base, base.parent / "tokenizer"]),
        (on_adapter, None, [on_adapter, on_adapter.parent / "tokenizer", adapter, adapter.parent / "tokenizer",
                            base, base.parent / "tokenizer"]),
        (looped, None, [looped, tmp_path / "tokenizer"]),
        (tmp_path / "junk.pth", None, [tmp_path / "junk.pth", tmp_path / "tokenizer"]),  # its loader says what's wrong
        (tmp_path / "missing.pth", None, [tmp_path / "missing.pth", tmp_path / "tokenizer"]),
    ]
    for path, tokenizer_dir, expected in cases:
        found = checkpoints.checkpoint_inputs("--model_path", path, tokenizer_dir)
        assert [p for _, p in found] == expected, path
    flags = [flag for flag, _ in checkpoints.checkpoint_inputs("--model_path", adapter)]
    assert flags == ["--model_path", "the tokenizer of --model_path", "the base model of --model_path",
                     "the tokenizer of the base model of --model_path"]
    assert checkpoints.checkpoint_inputs("--model_path", None) == []
