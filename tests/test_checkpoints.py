"""checkpoints: the one format and loader (every kind of file, read once, prepared for training or inference),
what a file is, and its one-line errors."""
from __future__ import annotations

import pytest
import torch

import checkpoints
import lora
from checkpoints import (CheckpointError, build_model, describe, load, load_checkpoint, load_model_and_tokenizer,
                         save_checkpoint)
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
