"""hf_models through the one loader: Hugging Face GPT-2, Llama and Qwen3 folders load into GPTModel with transformers'
logits and greedy tokens (left padding included); bad folders are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from checkpoints import CheckpointError, load_model
from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel


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
    return hf, load_model(folder).eval(), folder


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
    ours = load_model(tmp_path).eval()
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
    loaded = load_model(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_hf_loading_errors(tmp_path, hf_pair):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((hf_pair[2] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)




def modern_hf(kind: str, tie: bool, bias: bool = False):
    """A random transformers Llama / Qwen3 with grouped-query attention, its norms' gains not all one."""
    torch.manual_seed(0)
    common = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, max_position_embeddings=40, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie, attention_bias=bias, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=bias, **common))
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


MODERN = [("llama", True, False), ("llama", False, True), ("qwen3", True, False), ("qwen3", False, False)]


@pytest.mark.parametrize("kind,tie,bias", MODERN)
def test_llama_and_qwen3_folders_load_with_transformers_logits_and_greedy_tokens(tmp_path, kind, tie, bias):
    hf = modern_hf(kind, tie, bias)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    c = ours.config
    assert (c.pos_embedding, c.norm, c.mlp, c.n_kv_heads) == ("rope", "rmsnorm", "swiglu", 2)
    assert c.qk_norm == (kind == "qwen3")
    assert (c.tie_embeddings, c.bias, c.rope_theta) == (tie, bias, 5000.0)
    ids, mask = left_pad([[0, 5, 6, 7, 8, 9, 10], [0, 11, 12]], pad_id=1)
    with torch.no_grad():
        full = hf(ids[:1]).logits
        expected = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        got = ours(ids, attention_mask=mask)["logits"]
    assert (ours(ids[:1])["logits"] - full).abs().max() < 1e-4
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-4
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=1)
    assert torch.equal(generate(ours, ids, SamplingParams(max_new_tokens=12, do_sample=False), attention_mask=mask),
                       want)


def test_linear_rope_scaling_loads_as_position_interpolation(tmp_path):
    hf = modern_hf("llama", tie=True)
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    hf.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # rebuilt with the scaled rotary
    ours = load_model(tmp_path).eval()
    assert ours.config.rope_scaling == 2.0
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert (ours(ids)["logits"] - hf(ids).logits).abs().max() < 1e-4


def test_unknown_architectures_and_unsupported_options_are_one_line_errors(tmp_path):
    modern_hf("llama", tie=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in (({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
                            ({"hidden_act": "gelu"}, "SiLU"),
                            ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                            ({"mlp_bias": True}, "mlp_bias")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path)
