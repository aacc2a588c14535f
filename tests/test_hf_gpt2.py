"""hf_gpt2: Hugging Face GPT-2 folders load into GPTModel with transformers' logits and greedy tokens."""
from __future__ import annotations

import pytest
import torch
import transformers

from checkpoints import CheckpointError
from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from hf_gpt2 import load_hf_gpt2


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


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
    return hf, load_hf_gpt2(folder).eval(), folder


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
    ours = load_hf_gpt2(tmp_path).eval()
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
    got = generate(ours, ids, SamplingParams(max_new_tokens=20, do_sample=False), attention_mask=mask)
    assert torch.equal(got, expected)


def test_hf_pytorch_model_bin_with_legacy_keys_loads(hf_pair, tmp_path):
    """Original GPT-2 files: no 'transformer.' prefix, causal-mask buffers, pytorch_model.bin."""
    hf, ours, folder = hf_pair
    legacy = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 40, 40).tril()
    legacy["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    loaded = load_hf_gpt2(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_hf_loading_errors(tmp_path, hf_pair):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text((hf_pair[2] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_gpt2(tmp_path)


