"""GPTModel: masking, padding, the KV cache, loss, config and initialisation (generation: test_decoding)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from devices import autocast_context
from gpt_model import GPTConfig, GPTModel

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=48)


MODERN = dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2, bias=False,
              tie_embeddings=False)
SHAPES = {"gpt2": {}, "modern": MODERN}


@pytest.fixture(params=SHAPES)
def model(request) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(**SMALL, **SHAPES[request.param]).eval()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


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
    assert cache.keys[0].shape == (3, model.config.n_kv_heads, 12, SMALL["d_model"] // SMALL["n_heads"])
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


@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"d_ff": 200, "n_layers": 3}, MODERN,
                                       {**MODERN, "bias": True, "tie_embeddings": True, "norm": "layernorm"},
                                       {"pos_embedding": "rope", "mlp": "swiglu", "n_kv_heads": 1}])
def test_parameter_count_from_the_shape_equals_the_parameters(overrides):
    model = GPTModel(**{**SMALL, **overrides})
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    lookups = [model.transformer.wte] if not model.config.tie_embeddings else []
    lookups += [model.transformer.wpe] if "wpe" in model.transformer else []
    without_lookups = model.num_parameters() - sum(m.weight.numel() for m in lookups)
    assert model.num_parameters(exclude_embeddings=True) == without_lookups


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


def test_bf16_autocast_forward(model):
    ids = torch.tensor([[0, 5, 6, 7]])
    with autocast_context("cpu", torch.bfloat16):
        logits = model(ids)["logits"]
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 4, SMALL["vocab_size"])


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


def test_grow_vocab_keeps_every_old_logit_and_adds_distinct_tied_rows():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=300, max_seq_len=16)).eval()
    ids = torch.tensor([[0, 5, 17, 299]])
    before = model(ids)["logits"]
    model.grow_vocab(304)
    after = model(ids)["logits"]
    assert after.shape[-1] == 304 and model.config.vocab_size == 304
    assert torch.allclose(after[..., :300], before, atol=1e-6)  # the old tokens' logits are unchanged
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    new = model.transformer.wte.weight[300:]
    assert torch.cdist(new, new).fill_diagonal_(1).min() > 0  # distinct rows, so the model can tell them apart
    assert model(torch.tensor([[0, 303]]))["logits"].isfinite().all()
    with pytest.raises(ValueError, match="cannot shrink"):
        model.grow_vocab(10)


# ----------------------------------------------------------------------------- architecture options

def test_an_old_config_dict_builds_the_same_gpt2():
    """A checkpoint's config written before the architecture options builds GPT-2 exactly: no new module, buffer or
    parameter, the same weights from the same seed."""
    old = {k: v for k, v in GPTConfig(**SMALL).to_dict().items()
           if k not in ("pos_embedding", "rope_theta", "rope_scaling", "norm", "qk_norm", "mlp", "n_kv_heads",
                        "tie_embeddings")}
    config = GPTConfig.from_dict(old)
    assert config == GPTConfig(**SMALL) and config.architecture() == "GPT-2" and config.n_kv_heads == 4
    torch.manual_seed(0)
    model = GPTModel(config)
    assert model.rotary is None and not list(model.buffers())
    assert all(type(m).__name__ != "RMSNorm" for m in model.modules())
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 32, 32)
    assert {n for n, _ in model.named_parameters()} >= {"transformer.wpe.weight", "transformer.h.0.ln_1.bias"}


def test_the_modern_presets_are_rope_rmsnorm_qk_norm_swiglu_gqa_without_bias_at_a_gpt2_budget():
    for modern, gpt2 in (("modern-tiny", "tiny"), ("modern", "gpt2"), ("modern-medium", "gpt2-medium")):
        config = GPTConfig.from_preset(modern)
        assert config.architecture() == \
            f"rope + rmsnorm + qk_norm + swiglu + gqa {config.n_heads}q/{config.n_heads // 2}kv heads + no bias"
        with torch.device("meta"):
            ratio = GPTModel(config).num_parameters() / GPTModel(GPTConfig.from_preset(gpt2)).num_parameters()
        assert 0.9 < ratio < 1.0  # the MLP's budget kept, fewer key/value heads and no position table
    assert GPTConfig.from_preset("modern").d_ff == 2048  # 8/3 x 768


@pytest.mark.parametrize("field, value, message", [
    ("n_kv_heads", 3, "divisor of n_heads"), ("n_kv_heads", 0, "divisor"), ("pos_embedding", "alibi", "learned, rope"),
    ("norm", "batchnorm", "layernorm, rmsnorm"), ("mlp", "relu", "gelu, swiglu"), ("rope_theta", 0, "positive"),
    ("rope_scaling", -1.0, "positive"), ("qk_norm", "yes", "true or false"), ("tie_embeddings", 1, "true or false")])
def test_bad_architecture_options_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, field: value})
    with pytest.raises(ValueError, match="must be even"):
        GPTConfig(**{**SMALL, "d_model": 36, "n_heads": 4, "pos_embedding": "rope"})  # head_dim 9


def test_rotary_left_padding_follows_the_attention_mask_as_learned_positions_do():
    """A left-padded row numbers its real tokens from 0, so it equals the row alone to float precision (rotary
    attention is relative, but the q/k norms and rounding would still see shifted absolute angles)."""
    torch.manual_seed(0)
    model = GPTModel(**SMALL, **MODERN).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], pad_id=1)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)["logits"]
        alone = model(torch.tensor([[12, 13, 14]]))["logits"]
    torch.testing.assert_close(batch[1, 4:], alone[0], atol=1e-5, rtol=1e-5)


def test_grow_vocab_of_an_untied_head_grows_both_tables():
    torch.manual_seed(0)
    model = GPTModel(**SMALL, **MODERN).eval()
    ids = torch.tensor([[0, 5, 17, 96]])
    before = model(ids)["logits"]
    model.grow_vocab(101)
    assert model.lm_head.weight is not model.transformer.wte.weight and model.lm_head.weight.shape == (101, 32)
    torch.testing.assert_close(model(ids)["logits"][..., :97], before)


def test_gqa_flops_count_the_query_heads_and_fewer_key_value_weights():
    full, grouped = GPTModel(**SMALL, pos_embedding="rope"), GPTModel(**SMALL, pos_embedding="rope", n_kv_heads=1)
    saved = SMALL["n_layers"] * 2 * (4 - 1) * 8 * 32 + SMALL["n_layers"] * 2 * (4 - 1) * 8  # k, v weights + biases
    assert full.num_parameters() - grouped.num_parameters() == saved
    attention_term = 12 * SMALL["n_layers"] * SMALL["d_model"] * 48
    assert grouped.estimate_flops_per_token() == 6 * grouped.num_parameters(exclude_embeddings=True) + attention_term


def test_extend_context_interpolates_rotary_positions_and_trains_on_the_longer_context():
    """Linear position interpolation: the extended model reads position 2p as the original read p (a rotary model's
    scores depend on positions only through the angles), its config says so, and a training step runs at 2x."""
    torch.manual_seed(0)
    model = GPTModel(**SMALL, **MODERN)
    original = copy.deepcopy(model).eval()
    model.extend_context(96)
    assert (model.config.max_seq_len, model.config.rope_scaling) == (96, 2.0)
    torch.testing.assert_close(model.rotary.cos[::2], original.rotary.cos)  # position 2p -> the angles of p
    assert GPTModel(model.config).rotary.cos.shape == (96, 8)  # the config alone rebuilds it (checkpoints)
    ids = torch.randint(0, 97, (2, 96))
    loss = model(ids, labels=ids)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.c_attn.weight.grad is not None
    model.extend_context(64)  # shorter than now: nothing to do
    assert model.config.max_seq_len == 96
    with pytest.raises(ValueError, match="learned positions"):
        GPTModel(**SMALL).extend_context(96)


def test_a_gpt2_config_is_written_as_before_the_architecture_options():
    """A GPT-2 file names only the fields older code knows, so that code reads it; a modern one names its options."""
    old_fields = {"vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "dropout", "bias",
                  "pad_token_id", "layer_norm_eps", "activation"}
    gpt2, modern = GPTConfig.from_preset("tiny"), GPTConfig.from_preset("modern-tiny")
    assert set(gpt2.to_dict()) == old_fields and GPTConfig.from_dict(gpt2.to_dict()) == gpt2
    assert {"pos_embedding", "norm", "qk_norm", "mlp", "n_kv_heads"} <= set(modern.to_dict())
    assert GPTConfig.from_dict(modern.to_dict()) == modern
