"""LoRA adapters: identity at init, exact merge (fused q/k/v included), gradients only on adapters, save/load."""
import pytest
import torch
import torch.nn as nn

from checkpoints import build_model, load_checkpoint, save_checkpoint
from gpt_model import GPTConfig, GPTModel
from lora import (LoRAError, LoRALinear, apply_lora, count_parameters, load_lora_state_dict, lora_state_dict,
                  mark_only_lora_trainable, merge_lora, save_lora)

CONFIG = GPTConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, pad_token_id=0)


def make_model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(CONFIG).eval()


def randomize_adapters(model, seed=1):
    """B is zero at init (the model equals its base); give it values so merging has something to check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    return model


def tokens(batch=3, length=12, seed=2):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_zero_initialised_b_leaves_the_model_unchanged():
    base, wrapped = make_model(), apply_lora(make_model(), r=4, alpha=8)
    x = tokens()
    assert torch.equal(base(x)["logits"], wrapped(x)["logits"])
    layer = wrapped.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4) and layer.scaling == 2.0


def test_targets_match_name_suffixes_and_leave_others_alone():
    model = apply_lora(make_model(), targets=["attn.c_proj", "c_fc"], r=2, alpha=2)
    for block in model.transformer.h:
        assert isinstance(block.attn.c_proj, LoRALinear) and isinstance(block.mlp.c_fc, LoRALinear)
        assert type(block.attn.c_attn) is nn.Linear and type(block.mlp.c_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_forward_matches_a_hand_computed_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = LoRALinear(base, r=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(3, 2))
    x = torch.randn(4, 5)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_merged_model_is_plain_and_matches_the_unmerged_forward():
    model = randomize_adapters(apply_lora(make_model(), r=4, alpha=8))
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding too
    unmerged = model(x, attention_mask=mask)["logits"]
    merged_model = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(make_model().state_dict())
    assert all(p.requires_grad for p in merged_model.parameters())
    torch.testing.assert_close(merged_model(x, attention_mask=mask)["logits"], unmerged, atol=1e-5, rtol=0)


def test_merged_model_round_trips_through_a_checkpoint(tmp_path):
    model = randomize_adapters(apply_lora(make_model(), r=4, alpha=8))
    x = tokens()
    expected = model(x)["logits"]
    save_checkpoint(tmp_path / "merged.pth", merge_lora(model))
    reloaded = build_model(load_checkpoint(tmp_path / "merged.pth"), "checkpoint").eval()
    torch.testing.assert_close(reloaded(x)["logits"], expected, atol=1e-5, rtol=0)


def test_fused_qkv_slices_each_get_their_own_update():
    model = apply_lora(make_model(), targets=["c_attn"], r=3, alpha=3)
    layer = model.transformer.h[0].attn.c_attn
    d = CONFIG.d_model
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():  # an update on the key rows only
        layer.lora_B.zero_()
        layer.lora_B[d:2 * d] = torch.randn(d, 3)
    merged = layer.merged_linear().weight.detach()
    assert torch.equal(merged[:d], w0[:d]) and torch.equal(merged[2 * d:], w0[2 * d:])
    torch.testing.assert_close(merged[d:2 * d], w0[d:2 * d] + layer.lora_B[d:2 * d] @ layer.lora_A)

    with torch.no_grad():  # now all three, and check q, k, v as attention computes them from a hand formula
        layer.lora_B.copy_(torch.randn(3 * d, 3))
    x = torch.randn(2, 5, d)
    q, k, v = layer(x).split(d, dim=2)
    low_rank = x @ layer.lora_A.T
    b = layer.base_layer.bias
    for i, got in enumerate((q, k, v)):
        rows = slice(i * d, (i + 1) * d)
        expected = x @ w0[rows].T + b[rows] + low_rank @ layer.lora_B[rows].T
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(x @ layer.merged_linear().weight[rows].T + b[rows], expected)


def test_only_adapter_parameters_receive_gradients():
    model = mark_only_lora_trainable(apply_lora(make_model(), r=4, alpha=8))
    model.train()
    x = tokens()
    model(x, labels=x)["loss"].backward()
    for name, param in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert param.requires_grad
        else:
            assert not param.requires_grad and param.grad is None, name
    # with B = 0 the first step only moves B (dL/dA = 0), as in the paper
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_a_training_step_changes_only_adapters():
    model = mark_only_lora_trainable(apply_lora(make_model(), r=4, alpha=8)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    for _ in range(2):
        model(x, labels=x)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(torch.count_nonzero(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear))


def test_count_parameters():
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    mark_only_lora_trainable(apply_lora(model, targets=["c_attn"], r=4, alpha=8))
    adapters = CONFIG.n_layers * 4 * (CONFIG.d_model + 3 * CONFIG.d_model)
    assert count_parameters(model) == (adapters, total + adapters)


def test_adapters_save_and_load_through_a_file(tmp_path):
    trained = randomize_adapters(apply_lora(make_model(), targets=["c_attn", "c_fc"], r=4, alpha=8, dropout=0.1))
    save_lora(tmp_path / "adapters.pth", trained, step=7)
    state = torch.load(tmp_path / "adapters.pth", weights_only=True)
    assert state["step"] == 7
    assert state["lora_config"] == {"r": 4, "alpha": 8.0, "dropout": 0.1, "targets": sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc"))}
    assert all(".lora_" in key for key in state["lora_state_dict"])
    base_size = sum(p.numel() for p in make_model().parameters())
    assert sum(t.numel() for t in state["lora_state_dict"].values()) < base_size / 5  # small: adapters only

    fresh = load_lora_state_dict(make_model(), state)  # a plain base model gets the adapters
    x = tokens()
    torch.testing.assert_close(fresh.eval()(x)["logits"], trained.eval()(x)["logits"], atol=0, rtol=0)
    assert lora_state_dict(fresh)["lora_config"] == state["lora_config"]


def test_loading_adapters_of_another_shape_is_an_error():
    state = lora_state_dict(apply_lora(make_model(), r=4, alpha=8))
    with pytest.raises(LoRAError, match="shape"):
        load_lora_state_dict(apply_lora(make_model(), r=2, alpha=8), state)
    with pytest.raises(LoRAError, match="not a LoRA adapter file"):
        load_lora_state_dict(make_model(), {"model_state_dict": {}})


def test_unknown_targets_are_a_one_line_value_error_listing_what_exists():
    with pytest.raises(ValueError) as info:
        apply_lora(make_model(), targets=["c_attn", "q_proj"])
    message = str(info.value)
    assert "q_proj" in message and "attn.c_attn" in message and "mlp.c_fc" in message and "\n" not in message
    assert "c_attn, " not in message.split("available")[0]  # only the missing target is named as missing
    with pytest.raises(LoRAError, match="tied"):
        apply_lora(make_model(), targets=["lm_head"])
    with pytest.raises(LoRAError, match="no LoRA targets"):
        apply_lora(make_model(), targets=[])
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(apply_lora(make_model()))


def test_dropout_only_in_train_mode():
    model = randomize_adapters(apply_lora(make_model(), r=4, alpha=8, dropout=0.5))
    x = tokens()
    model.train()
    torch.manual_seed(3)
    first = model(x)["logits"]
    second = model(x)["logits"]
    assert not torch.equal(first, second)
    model.eval()
    torch.testing.assert_close(model(x)["logits"], model(x)["logits"], atol=0, rtol=0)
    eval_logits = model(x)["logits"]
    torch.testing.assert_close(merge_lora(model)(x)["logits"], eval_logits, atol=1e-5, rtol=0)


def test_bad_hyperparameters_are_errors():
    for kwargs in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}):
        with pytest.raises(LoRAError):
            apply_lora(make_model(), **{"r": 4, "alpha": 8, "dropout": 0.0, **kwargs})


def test_the_modern_shape_takes_the_default_targets_trains_adapters_only_and_merges_exactly():
    """Grouped-query c_attn ((n_heads + 2 n_kv_heads) x head_dim rows) and SwiGLU's fused c_fc are plain targets."""
    torch.manual_seed(0)
    config = GPTConfig.from_dict({**CONFIG.to_dict(), "pos_embedding": "rope", "norm": "rmsnorm", "qk_norm": True,
                                  "mlp": "swiglu", "n_kv_heads": 2, "bias": False, "tie_embeddings": False})
    model = apply_lora(GPTModel(config), r=2, alpha=4.0)
    mark_only_lora_trainable(model)
    layer = model.transformer.h[0]
    assert layer.attn.c_attn.lora_B.shape == ((4 + 2 * 2) * 8, 2) and layer.mlp.c_fc.lora_B.shape == (2 * 64, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # B is zero at first: the second step moves A too
        optimizer.zero_grad()
        model(tokens(), labels=tokens())["loss"].backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    model.eval()
    with torch.no_grad():
        expected = model(tokens())["logits"]
        torch.testing.assert_close(merge_lora(model)(tokens())["logits"], expected, atol=1e-5, rtol=1e-5)
