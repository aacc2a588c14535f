"""GPTModel against Hugging Face GPT-2, plus generation, masking, loss, checkpoint and helper behaviour."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gpt_model import (
    CheckpointError, GPTConfig, GPTModel, autocast_context, load_checkpoint, load_model_and_tokenizer, resolve_device,
    resolve_dtype, save_checkpoint,
)

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=48)


@pytest.fixture()
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(**SMALL).eval()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers GPT2LMHeadModel saved as safetensors, and ours loaded from that folder."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                                     bos_token_id=0, eos_token_id=2, pad_token_id=1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias values so their conversion is exercised
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return hf, GPTModel.from_hf_gpt2(folder).eval(), folder


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ----------------------------------------------------------------------------- reference parity


def test_logits_match_transformers(hf_pair):
    hf, ours, _ = hf_pair
    ids = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        assert (ours(ids)["logits"] - hf(ids).logits).abs().max() < 1e-4


def test_exact_gelu_checkpoint_matches_transformers(tmp_path):
    """activation_function "gelu" (exact erf GELU) loads as GPTConfig.activation "gelu" with the same logits."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=53, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     activation_function="gelu")
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # MLP inputs of order 1, where the two GELUs differ (near 0 they agree)
        for block in hf.transformer.h:
            block.mlp.c_fc.weight.mul_(50)
            block.mlp.c_proj.weight.mul_(50)
    hf.save_pretrained(tmp_path)
    ours = GPTModel.from_hf_gpt2(tmp_path).eval()
    assert ours.config.activation == "gelu"
    ids = torch.randint(0, 53, (2, 16))
    tanh = GPTModel(GPTConfig.from_dict({**ours.config.to_dict(), "activation": "gelu_tanh"})).eval()
    tanh.load_state_dict(ours.state_dict())
    with torch.no_grad():
        exact_error = (ours(ids)["logits"] - hf(ids).logits).abs().max()
        tanh_error = (tanh(ids)["logits"] - hf(ids).logits).abs().max()
    assert exact_error < 1e-5 and tanh_error > 10 * exact_error  # the activation is what makes the match


def test_left_padded_logits_match_transformers(hf_pair):
    hf, ours, _ = hf_pair
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], pad_id=1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask)["logits"]
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4


def test_greedy_generation_matches_transformers(hf_pair):
    hf, ours, _ = hf_pair
    ids, mask = left_pad([[0, 5, 6, 7, 8], [0, 9, 10]], pad_id=1)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=1)
    got = ours.generate(ids, attention_mask=mask, max_gen_len=20, do_sample=False)
    assert torch.equal(got, expected)


def test_hf_pytorch_model_bin_with_legacy_keys_loads(hf_pair, tmp_path):
    """Original GPT-2 files: no 'transformer.' prefix, causal-mask buffers, pytorch_model.bin."""
    hf, ours, folder = hf_pair
    legacy = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 40, 40).tril()
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    loaded = GPTModel.from_hf_gpt2(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_hf_loading_errors(tmp_path, hf_pair):
    with pytest.raises(CheckpointError, match="config.json"):
        GPTModel.from_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text((hf_pair[2] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        GPTModel.from_hf_gpt2(tmp_path)


def test_causal_mask_future_tokens_never_change_past_logits(model):
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(ids)["logits"], model(changed)["logits"]
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_padding_tokens_are_invisible(model):
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8]], pad_id=1)
    other = ids.clone()
    other[1, :2] = torch.tensor([50, 60])  # different junk under the padding
    with torch.no_grad():
        a = model(ids, attention_mask=mask)["logits"]
        b = model(other, attention_mask=mask)["logits"]
        alone = model(torch.tensor([[7, 8]]))["logits"]
    torch.testing.assert_close(a[1, 2:], b[1, 2:])
    torch.testing.assert_close(a[1, 2:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all()


def test_right_padded_batch_matches_each_row_alone(model):
    """Training batches are right-padded (collate_batch): real positions must equal the unpadded rows."""
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    ids = torch.tensor([rows[0], rows[1] + [1, 1, 1]])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)["logits"]
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))["logits"][0]
            torch.testing.assert_close(batch[i, :len(row)], alone, atol=1e-5, rtol=1e-5)


def test_cache_slots_prefill_then_steps_match_full_forward(model):
    """Two sequences of different lengths in cache slots 2 and 0, decoded token by token: same logits as no cache."""
    from transformer_components import KVCache, KVCacheView

    seqs = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    prompt_lens, slots = [4, 2], torch.tensor([2, 0])
    cache = KVCache(SMALL["n_layers"], n_slots=3, max_len=12)
    with torch.no_grad():
        width = max(prompt_lens)
        ids = torch.tensor([s[:width] for s in seqs])  # right-padded prompts: row 1's extra tokens are overwritten
        view = KVCacheView(cache, slots, torch.arange(width).expand(2, width), key_len=0)
        got = [[row] for row in model(ids, kv_cache=view)["logits"][[0, 1], [3, 1]]]
        lengths = list(prompt_lens)
        for _ in range(4):
            step_ids = torch.tensor([[s[n]] for s, n in zip(seqs, lengths)])
            positions = torch.tensor([[n] for n in lengths])
            view = KVCacheView(cache, slots, positions, key_len=max(lengths) + 1)
            for row, logits in enumerate(model(step_ids, kv_cache=view)["logits"][:, 0]):
                got[row].append(logits)
            lengths = [n + 1 for n in lengths]
        for row, seq in enumerate(seqs):
            full = model(torch.tensor([seq]))["logits"][0, prompt_lens[row] - 1:prompt_lens[row] + 4]
            torch.testing.assert_close(torch.stack(got[row]), full, atol=1e-5, rtol=1e-5)
    assert cache.keys[0].shape == (3, SMALL["n_heads"], 12, SMALL["d_model"] // SMALL["n_heads"])
    assert cache.keys[0][1].abs().sum() == 0  # the unused slot was never written


def test_loss_ignores_minus_100_labels(model):
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    out = model(ids, labels=labels)
    logits, targets = out["logits"][:, :-1], labels[:, 1:]
    kept = targets != -100
    manual = -F.log_softmax(logits[kept], dim=-1).gather(1, targets[kept][:, None]).mean()
    torch.testing.assert_close(out["loss"], manual)
    assert model(ids)["loss"] is None


def test_pad_id_labels_are_not_ignored(model):
    ids = torch.full((1, 6), model.config.pad_token_id)
    assert torch.isfinite(model(ids, labels=ids)["loss"])  # only -100 is ignored


def test_hidden_states_are_final_layer_norm_output(model):
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, output_hidden_states=True)
    assert out["hidden_states"].shape == (2, 9, SMALL["d_model"])
    torch.testing.assert_close(model.lm_head(out["hidden_states"]), out["logits"])
    assert "hidden_states" not in model(ids)


def test_gradients_reach_every_parameter(model):
    model.train()
    ids = torch.randint(0, 97, (2, 12))
    model(ids, labels=ids)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_give_clear_errors(model):
    with pytest.raises(ValueError, match="2-D integer"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="2-D integer"):
        model(torch.rand(1, 3))
    with pytest.raises(ValueError, match="exceeds max_seq_len 48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))


# ----------------------------------------------------------------------------- generation


def test_cached_and_uncached_greedy_decoding_agree(model):
    ids, mask = left_pad([[0, 3, 4, 5, 6], [0, 7]], pad_id=1)
    cached = model.generate(ids, attention_mask=mask, max_gen_len=25, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_gen_len=25, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 30)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [[0, 3, 4, 5, 6, 7], [0, 8], [0, 9, 10, 11]]
    ids, mask = left_pad(prompts, pad_id=model.config.pad_token_id)
    batch = model.generate(ids, attention_mask=mask, max_gen_len=15, do_sample=False, repetition_penalty=1.2)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_gen_len=15, do_sample=False, repetition_penalty=1.2)
        assert batch[row, ids.size(1) - len(prompt):].tolist() == alone[0].tolist()


def test_seeded_sampling_is_reproducible(model):
    ids = torch.tensor([[0, 5, 6]])
    kwargs = dict(max_gen_len=20, temperature=1.5, top_k=20, top_p=0.9)
    a = model.generate(ids, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.generate(ids, generator=torch.Generator().manual_seed(7), **kwargs)
    c = model.generate(ids, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_sampling_is_greedy(model):
    ids = torch.tensor([[0, 5, 6]])
    sampled = model.generate(ids, max_gen_len=10, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(ids, max_gen_len=10, do_sample=False))


def test_eos_stops_rows_and_pads_them(model):
    ids = torch.tensor([[0, 5, 6], [0, 9, 10]])
    free = model.generate(ids, max_gen_len=12, do_sample=False)
    eos = int(free[0, 5])  # the third token row 0 generates becomes the stop token
    out = model.generate(ids, max_gen_len=12, do_sample=False, eos_token_id=eos)
    for row in range(2):
        new = out[row, 3:].tolist()
        if eos in new:
            stop = new.index(eos)
            assert new[:stop + 1] == free[row, 3:3 + stop + 1].tolist()
            assert all(t == model.config.pad_token_id for t in new[stop + 1:])
    if all(eos in r for r in out[:, 3:].tolist()):  # everyone finished: stopped early
        assert out.size(1) < free.size(1)


def test_generation_never_exceeds_context(model):
    ids = torch.randint(0, 97, (1, 40))
    out = model.generate(ids, max_gen_len=100, do_sample=False)
    assert out.shape == (1, SMALL["max_seq_len"])
    with pytest.raises(ValueError, match="no room to generate"):
        model.generate(torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, top_p=0.0)


def test_generate_restores_mode_and_returns_autograd_usable_tensor(model):
    model.train()
    out = model.generate(torch.tensor([[0, 5]]), max_gen_len=4, do_sample=False)
    assert model.training and not out.is_inference()
    model(out, labels=out)["loss"].backward()  # PPO feeds generated sequences back with gradients


# ----------------------------------------------------------------------------- config, constructor, accounting


def test_config_validation_and_round_trip():
    config = GPTConfig.from_preset("tiny", vocab_size=512)
    assert (config.d_model, config.n_layers, config.n_heads, config.d_ff, config.max_seq_len) == (128, 4, 4, 512, 256)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"d_model": 64, "n_embd": 64})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="positive integer"):
        GPTConfig(n_layers=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        GPTConfig(vocab_size=10, pad_token_id=10)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")


def test_gpt2_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        gpt2 = GPTModel(GPTConfig.from_preset("gpt2"))
    assert gpt2.num_parameters() == 124_439_808  # GPT-2 small with tied embeddings
    assert gpt2.num_parameters(exclude_embeddings=True) == 124_439_808 - 1024 * 768
    flops = gpt2.estimate_flops_per_token(seq_len=1024)
    assert flops == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    assert gpt2.estimate_mfu(tokens_per_sec=1000.0, peak_flops=flops * 4000.0) == pytest.approx(0.25)


def test_seed_style_kwargs_constructor_and_weight_tying():
    torch.manual_seed(0)
    a = GPTModel(**SMALL)
    assert a.config == GPTConfig(**SMALL)
    assert a.lm_head.weight is a.transformer.wte.weight
    assert GPTModel(GPTConfig(**SMALL), dropout=0.1).config.dropout == 0.1


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    m = GPTModel(vocab_size=500, d_model=256, n_layers=8, n_heads=4, d_ff=1024, max_seq_len=64)
    layer = m.transformer.h[0]
    assert layer.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert all(p.abs().sum() == 0 for n, p in m.named_parameters() if n.endswith("bias") and "ln_" not in n)


def test_optimizer_groups(model):
    opt = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["fused"]


def test_fused_optimizer_steps_like_the_reference_adamw(model):
    """The fused kernel configure_optimizer picks gives the same parameters as PyTorch's per-parameter AdamW."""
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for net in (model, reference):
        net(ids, labels=ids)["loss"].backward()
    fused = model.configure_optimizer(weight_decay=0.1, lr=1e-2, device_type="cpu")
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                               reference.configure_optimizer(0.1, 1e-2).param_groups], lr=1e-2, betas=(0.9, 0.95),
                              foreach=False)
    for _ in range(3):
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_device_and_dtype_helpers_on_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None).type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16 and resolve_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4", "cpu")
    with autocast_context("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_bf16_autocast_forward_and_generate(model):
    ids = torch.tensor([[0, 5, 6, 7]])
    with autocast_context("cpu", torch.bfloat16):
        logits = model(ids)["logits"]
        out = model.generate(ids, max_gen_len=5, do_sample=False)
    assert logits.dtype == torch.bfloat16 and out.shape == (1, 9)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, step=3, tokenizer_fingerprint="abc", history={"loss": [1.0, 0.5]})
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and ckpt["history"] == {"loss": [1.0, 0.5]} and ckpt["config"] == model.config.to_dict()
    loaded = GPTModel.from_pretrained(path).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids)["logits"], model(ids)["logits"])
    assert not list(path.parent.glob("*.tmp"))


def test_compile_and_ddp_prefixes_are_stripped(model, tmp_path):
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state, "config": model.config.to_dict()}, tmp_path / "wrapped.pt")
    loaded = GPTModel.from_pretrained(tmp_path / "wrapped.pt")
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
    with pytest.raises(CheckpointError, match="not a file"):
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
    with pytest.raises(CheckpointError, match="not a GPTModel checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    ckpt = load_checkpoint(tmp_path / "good.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "d_ff": 64}}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"c_fc.weight has shape \(128, 32\) in the checkpoint but \(64, 32\)"):
        GPTModel.from_pretrained(tmp_path / "mismatch.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "n_embd": 32}}, tmp_path / "badconfig.pt")
    with pytest.raises(CheckpointError, match="unknown GPTConfig field"):
        GPTModel.from_pretrained(tmp_path / "badconfig.pt")
    state = dict(ckpt["model_state_dict"])
    state.pop("transformer.ln_f.weight")
    torch.save({**ckpt, "model_state_dict": state}, tmp_path / "missingkey.pt")
    with pytest.raises(CheckpointError, match="missing"):
        GPTModel.from_pretrained(tmp_path / "missingkey.pt")
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
    out = loaded.generate(prompt, max_gen_len=5, do_sample=False, eos_token_id=tokenizer.eos_token_id)
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


def test_loss_only_gives_the_same_loss_and_gradients_without_full_logits(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # an SFT-style batch: only the answer is scored
    labels[2, 9:] = -100
    full = model(ids, labels=labels)
    full["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sparse = model(ids, labels=labels, loss_only=True)
    sparse["loss"].backward()
    assert sparse["logits"] is None
    torch.testing.assert_close(sparse["loss"], full["loss"])
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
