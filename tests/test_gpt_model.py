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


@pytest.fixture()
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(**SMALL).eval()


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


@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"d_ff": 200, "n_layers": 3}])
def test_parameter_count_from_the_shape_equals_the_parameters(overrides):
    model = GPTModel(**{**SMALL, **overrides})
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    without_positions = model.num_parameters() - model.transformer.wpe.weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == without_positions


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
