"""quantization: exact per-channel INT8 scales, every kernel against the dequantized matmul, an error bound against
fp32, logits close to fp32, fp32 linears packed for the CPU, and prepare_for_inference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from quantization import (weight_count, Int8Embedding, Int8Linear, PackedLinear, QuantizationError, fbgemm_available,
                          fbgemm_direct_available, fbgemm_int8_matmul, pack_linears_for_cpu, prepare_for_inference,
                          quantize_model_int8, quantize_per_channel)

NO_DIRECT = pytest.mark.skipif(not fbgemm_direct_available(), reason="this torch build lacks torch.fbgemm_* ops")
KERNELS = ["dequant", pytest.param("fbgemm", marks=pytest.mark.skipif(not fbgemm_available(), reason="no FBGEMM")),
           pytest.param("fbgemm_direct", marks=NO_DIRECT),
           pytest.param("int8pack", marks=pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no"))]


@pytest.fixture()
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


def test_int8_round_trip_of_a_random_linear_is_within_half_a_step_of_fp32():
    """Rounding to the nearest of 255 levels per row: each weight is off by at most scale / 2, so an output is off
    by at most sum_j |x_j| * scale_i / 2 (the bound the dequant kernel must meet, up to float error)."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q, scale = quantize_per_channel(linear.weight.detach())
    restored = q.float() * scale[:, None]
    assert (restored - linear.weight).abs().max() <= (scale[:, None] / 2 + 1e-7).max()
    assert torch.equal(scale, linear.weight.detach().abs().amax(dim=1) / 127)
    x = torch.randn(8, 96)
    with torch.no_grad():
        error = (Int8Linear.from_linear(linear, kernel="dequant")(x) - linear(x)).abs()
    bound = x.abs().sum(dim=1, keepdim=True) * scale[None, :] / 2
    assert (error <= bound + 1e-5).all()
    assert error.max() > 0  # it did quantize


def test_prepare_for_inference_keeps_the_logits_within_a_tolerance(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids)["logits"]
        packed = prepare_for_inference(copy.deepcopy(model))(ids)["logits"]
        int8 = prepare_for_inference(copy.deepcopy(model), quantize="int8")(ids)["logits"]
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)  # packing changes the layout only
    assert (int8 - reference).abs().max() < 0.1 * reference.abs().max()
    assert F.cosine_similarity(int8.flatten(1), reference.flatten(1)).min() > 0.999


def test_per_channel_scales_on_a_hand_made_matrix():
    weight = torch.tensor([[1.27, -0.5, 0.02], [-2.54, 1.0, 0.0]])
    q, scale = quantize_per_channel(weight)
    torch.testing.assert_close(scale, torch.tensor([0.01, 0.02]))  # row max / 127, one scale per output channel
    assert q.dtype == torch.int8 and q.tolist() == [[127, -50, 2], [-127, 50, 0]]
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(weight)
    x = torch.randn(4, 3)
    int8 = Int8Linear.from_linear(linear, kernel="dequant")
    torch.testing.assert_close(int8(x), x @ (q.float() * scale[:, None]).T + linear.bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_matches_the_dequantized_matmul(kernel):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    reference = Int8Linear.from_linear(linear, kernel="dequant")(x)
    got = Int8Linear.from_linear(linear, kernel=kernel)
    assert got.active_kernel(x) == kernel
    # FBGEMM also quantizes activations (per tensor, 7 or 8 bits): close, not exact
    torch.testing.assert_close(got(x), reference, atol=0.05 if kernel.startswith("fbgemm") else 1e-5, rtol=0.02)


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_logits_close_to_fp32(model, kernel):
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(ids)["logits"]
        int8 = quantize_model_int8(model, kernel=kernel)(ids)["logits"]
    assert F.cosine_similarity(fp32.flatten(1), int8.flatten(1)).min() > 0.999
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.wte, Int8Embedding)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, one int8 table
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model_int8(model)


@pytest.mark.parametrize("onednn", [True, False])
def test_packed_fp32_linears_give_the_same_logits_and_tokens(model, monkeypatch, onednn):
    if not onednn:  # the (in, out) fallback where oneDNN is missing
        monkeypatch.setattr("quantization.onednn_available", lambda: False)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    prompt = ids[:1, :5]
    params = SamplingParams(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        expected, greedy = model(ids)["logits"], generate(model, prompt, params)
        pack_linears_for_cpu(model)
        torch.testing.assert_close(model(ids)["logits"], expected, atol=1e-5, rtol=1e-5)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * model.config.n_layers + 1 and not any(isinstance(m, nn.Linear) for m in model.modules())
    assert all(m.onednn == (onednn and torch.backends.mkldnn.is_available()) for m in linears)
    assert torch.equal(generate(model, prompt, params), greedy)
    with pytest.raises(QuantizationError, match="already"):
        quantize_model_int8(model)


def test_prepare_for_inference_packs_fp32_on_cpu_and_quantizes_on_request(model):
    assert isinstance(prepare_for_inference(copy.deepcopy(model)).lm_head,
                      PackedLinear if torch.backends.mkldnn.is_available() else nn.Linear)
    assert isinstance(prepare_for_inference(copy.deepcopy(model), dtype=torch.bfloat16).lm_head, nn.Linear)
    assert isinstance(prepare_for_inference(copy.deepcopy(model), quantize="int8").lm_head, Int8Linear)


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no FBGEMM (non-x86 CPU)")
def test_fbgemm_prepacked_weights_follow_every_change_of_the_weights():
    """The packed copy is cached across matmuls; a weight written in place, replaced or loaded must not go stale."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(16, 8), kernel="fbgemm")
    x = torch.randn(3, 16)

    def reference() -> torch.Tensor:  # the dequantized matmul, computed independently of any packing
        return x @ (layer.weight.float() * layer.scale[:, None]).T + layer.bias

    layer(x)
    layer.weight.mul_(-1)  # in place
    torch.testing.assert_close(layer(x), reference(), atol=0.05, rtol=0.05)
    layer.scale = layer.scale * 2  # a new tensor
    torch.testing.assert_close(layer(x), reference(), atol=0.05, rtol=0.05)
    other = Int8Linear.from_linear(nn.Linear(16, 8), kernel="fbgemm")
    layer.load_state_dict(other.state_dict())  # copied into the existing buffers
    torch.testing.assert_close(layer(x), other(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), reference(), atol=0.05, rtol=0.05)


def test_the_modern_shape_quantizes_every_projection_and_an_untied_head_keeps_two_tables(tiny_config):
    torch.manual_seed(0)
    modern = dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2, bias=False,
                  tie_embeddings=False)
    model = GPTModel(GPTConfig.from_dict({**tiny_config.to_dict(), **modern})).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(ids)["logits"]
        packed = prepare_for_inference(copy.deepcopy(model))(ids)["logits"]
        int8 = quantize_model_int8(model)(ids)["logits"]
    torch.testing.assert_close(packed, fp32, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(fp32.flatten(1), int8.flatten(1)).min() > 0.999
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.transformer.h[0].attn.c_attn.out_features == (4 + 2 * 2) * 32  # the GQA-width fused projection
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert weight_count(model) == GPTModel(model.config).num_parameters()


@NO_DIRECT
def test_fbgemm_direct_never_saturates_on_the_worst_case_row():
    """Every activation at the top of its range against weights all +127: each pair of u8 x s8 products is 64,770,
    past int16, where FBGEMM sums pairs in int16 (AVX2, AVX-512 without VNNI). The layer must still give the
    product the dequantized weights give (7-bit weights there: 255 * 63 * 2 < 2^15)."""
    linear = nn.Linear(256, 8, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
    x = torch.full((2, 256), 3.0)
    got = Int8Linear.from_linear(linear, kernel="fbgemm_direct")(x)
    torch.testing.assert_close(got, torch.full((2, 8), 256 * 3.0 * 0.5), rtol=0.01, atol=0.0)


@NO_DIRECT
def test_fbgemm_direct_is_as_close_to_fp32_as_the_dynamic_kernel(model):
    """Its error on a model's logits against fp32, next to quantized.linear_dynamic's (7-bit activations), over
    layer-normed activations: within 1.5x of it (8-bit activations, 7- or 8-bit weights)."""
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = model(ids)["logits"]
        errors = {kernel: (quantize_model_int8(copy.deepcopy(model), kernel=kernel)(ids)["logits"] - fp32).abs().mean()
                  for kernel in ("fbgemm", "fbgemm_direct")}
    assert errors["fbgemm_direct"] <= 1.5 * errors["fbgemm"], errors


@NO_DIRECT
def test_fbgemm_direct_compiles_into_one_graph_with_its_fake_kernel():
    """The op's fake kernel gives torch.compile the output shape, so a layer holding it traces without a break
    (fullgraph) and computes what it computes eagerly; the packed weight stays an input, not a folded constant."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 48), kernel="fbgemm_direct")
    x = torch.randn(3, 64)
    eager = layer(x)  # packs the weights (a compiled step always follows an eager prefill)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, atol=1e-6, rtol=1e-6)
    weight, packed, col_offsets, zeros, _ = layer._direct_weights()
    assert fbgemm_int8_matmul(x, weight, packed, col_offsets, zeros).shape == (3, 48)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_packed_fp32_linear_compiles_into_one_graph():
    """Inductor lowers oneDNN's linear only for a weight it froze itself; the packed one goes through an op of our
    own (a fake kernel for its shape), so a compiled step holding it traces whole and computes the same."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(3, 1, 64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), linear(x),
                                   atol=1e-5, rtol=1e-5)
