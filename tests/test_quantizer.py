"""INT8 weight-only quantization: exact per-channel scales, logits close to fp32, checkpoint round trip, CLI."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_checkpoint, load_model_and_tokenizer, save_checkpoint
from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from inference.quantizer import main
from quantization import (Int8Embedding, Int8Linear, PackedLinear, QuantizationError, fbgemm_available,
                          pack_linears_for_cpu, prepare_for_inference, quantize_model_int8, quantize_per_channel,
                          weight_count)

KERNELS = ["dequant", pytest.param("fbgemm", marks=pytest.mark.skipif(not fbgemm_available(), reason="no FBGEMM")),
           pytest.param("int8pack", marks=pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no"))]


@pytest.fixture()
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


@pytest.fixture()
def run_dir(model, tiny_tokenizer, tmp_path) -> Path:
    tiny_tokenizer.save(tmp_path / "run" / "tokenizer")
    save_checkpoint(tmp_path / "run" / "fp32.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    return tmp_path / "run"


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
    # FBGEMM also quantizes activations (per tensor, 7 bits): close, not exact
    torch.testing.assert_close(got(x), reference, atol=0.05 if kernel == "fbgemm" else 1e-5, rtol=0.02)


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


def test_save_load_round_trip_and_size(model, run_dir, tiny_tokenizer):
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    quantize_model_int8(model)
    save_checkpoint(run_dir / "int8.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    ckpt = load_checkpoint(run_dir / "int8.pth")
    assert ckpt["quantization"] == "int8" and ckpt["model_state_dict"]["lm_head.weight"].dtype == torch.int8
    assert (run_dir / "int8.pth").stat().st_size <= 0.3 * (run_dir / "fp32.pth").stat().st_size
    via_loader, tokenizer = load_model_and_tokenizer(run_dir / "int8.pth")  # the one loading entry point
    with torch.no_grad():
        assert torch.equal(via_loader(ids)["logits"], model(ids)["logits"])
    assert via_loader.lm_head.weight is via_loader.transformer.wte.weight
    prompt = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode_ordinary("ROMEO:")])
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(via_loader, prompt, greedy), generate(model, prompt, greedy))


def test_evaluator_reads_an_int8_checkpoint(model, run_dir, tmp_path, capsys):
    import evaluator

    quantize_model_int8(model)
    save_checkpoint(run_dir / "int8.pth", model)
    val = tmp_path / "val.txt"
    val.write_text("ROMEO: What say you?\nJULIET: 床前明月光\n", encoding="utf-8")
    reports = []
    for name in ("fp32.pth", "int8.pth"):
        assert evaluator.main(["--no_progress", "--model_path", str(run_dir / name), "--test_data_path", str(val),
                               "--output", str(tmp_path / "r.json")]) == 0
        reports.append(json.loads((tmp_path / "r.json").read_text())["results"][0])
    assert abs(reports[1]["bits_per_byte"] / reports[0]["bits_per_byte"] - 1) < 0.01
    fp32, _ = load_model_and_tokenizer(run_dir / "fp32.pth", trainable=True)  # plain weights
    # the packed fp32 model and the INT8 one count the weights they were made from
    assert reports[0]["n_parameters"] == reports[1]["n_parameters"] == fp32.num_parameters()


def test_cli_quantizes_and_reports(run_dir, tmp_path, capsys):
    val = tmp_path / "val.txt"
    val.write_text("ROMEO: What say you?\nLEAR: Attend the lords.\n", encoding="utf-8")
    out = tmp_path / "elsewhere" / "int8.pth"
    assert main(["--model_path", str(run_dir / "fp32.pth"), "--output", str(out), "--test_data_path", str(val)]) == 0
    printed = capsys.readouterr().out
    assert "int8 checkpoint" in printed and "bits_per_byte" in printed
    assert (out.parent / "tokenizer" / "vocab.json").exists()  # copied, so the output loads on its own
    load_model_and_tokenizer(out)


def test_cli_errors_are_one_line(model, run_dir, tmp_path, capsys):
    save_checkpoint(run_dir / "int8.pth", quantize_model_int8(model))
    cases = [(["--model_path", str(run_dir / "int8.pth"), "--output", str(tmp_path / "o.pth")],
              "is an INT8 checkpoint, for inference only"),
             (["--model_path", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o.pth")], "missing.pth"),
             (["--model_path", str(run_dir / "fp32.pth"), "--output", str(run_dir / "fp32.pth")],
              "never one of the command's inputs"),
             (["--model_path", str(run_dir / "fp32.pth"), "--output", str(tmp_path / "o.pth"),
               "--test_data_path", str(tmp_path / "nope.txt")], "nope.txt")]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert main(["--model_path", "m.pth", "--output", "o.pth", "--batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--batch_size" in err and err.count("\n") == 1


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
