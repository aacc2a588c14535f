"""INT8 weight-only quantization of GPTModel: int8 weights with one scale per output channel.

    python -m inference.quantizer --model_path models/sft/sft_best.pth --output models/sft/sft_best_int8.pth

Every nn.Linear of the decoder becomes an Int8Linear, and by default so does the LM head; since the head is
tied to the token embedding, the embedding then reads the same int8 table (its rows are the head's output
channels, so the same per-row scales serve both). Kernels, chosen per device (see README, measured with
benchmarks/bench_inference.py):
  - "fbgemm" (x86 CPU): torch.ops.quantized.linear_dynamic, the kernel behind quantize_dynamic. It ALSO
    quantizes activations: per tensor (each call), to 7-bit unsigned (reduce_range, which keeps AVX2's 16-bit
    accumulation from saturating), then dequantizes the int32 result. Held to the same quality target.
  - "int8pack" (CUDA): torch._weight_int8pack_mm, activations stay in the compute dtype (as gpt-fast).
  - "dequant": int8 -> compute dtype, then a plain matmul times the scales; correct everywhere (the fallback).
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

import cli
import torch.nn as nn
import torch.nn.functional as F

from gpt_model import GPTConfig, GPTModel, _load_state_dict_checked, load_checkpoint, resolve_device, save_checkpoint

KERNELS = ("auto", "fbgemm", "int8pack", "dequant")


class QuantizationError(ValueError):
    """Bad quantization input (unknown kernel, a model that is already quantized, ...)."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (row): (int8 weight, float32 scale) with weight ~= int8 * scale[:, None]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def pick_kernel(device: torch.device) -> str:
    """The kernel that measured fastest on this kind of device (benchmarks/bench_inference.py), else the fallback."""
    if device.type == "cpu" and _fbgemm_available():
        return "fbgemm"
    if device.type == "cuda" and hasattr(torch, "_weight_int8pack_mm"):
        return "int8pack"
    return "dequant"


class Int8Linear(nn.Module):
    """y = (x @ W_int8.T) * scale + bias, W int8 (out, in) with one float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: tuple[tuple, Any] | None = None  # FBGEMM's prepacked weights, rebuilt when the weight changes

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        layer.weight, layer.scale = quantize_per_channel(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer.to(linear.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def active_kernel(self, x: torch.Tensor) -> str:
        kernel = pick_kernel(x.device) if self.kernel == "auto" else self.kernel
        if kernel == "fbgemm" and (x.device.type != "cpu" or x.dtype != torch.float32 or not _fbgemm_available()):
            return "dequant"  # FBGEMM takes float32 on CPU only
        if kernel == "int8pack" and not hasattr(torch, "_weight_int8pack_mm"):
            return "dequant"
        return kernel

    def _fbgemm_weights(self):
        key = (self.weight.data_ptr(), self.weight._version, self.scale._version,
               None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        if self._packed is None or self._packed[0] != key:
            with warnings.catch_warnings():  # quantized-tensor constructors warn that they are deprecated
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
            self._packed = (key, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.active_kernel(x)
        shape = x.shape[:-1] + (self.out_features,)
        x2d = x.reshape(-1, self.in_features)
        if kernel == "fbgemm":
            return torch.ops.quantized.linear_dynamic(x2d.contiguous(), self._fbgemm_weights(), True).view(shape)
        if kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2d.contiguous(), self.weight, self.scale.to(x.dtype))
        else:
            y = F.linear(x2d, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(shape)


class Int8Embedding(nn.Module):
    """Embedding lookup from an int8 table with one scale per row (the tied LM head's table)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids].unsqueeze(-1)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """Float y = x W^T + b with W prepacked once into oneDNN's blocked layout (what inductor's freezing does on
    CPU): the GEMV/GEMM of decoding then skips nn.Linear's per-call layout work (benchmarks/bench_inference.py).
    Without oneDNN, W is stored (in, out) contiguous instead (also faster than nn.Linear's (out, in) on CPU).
    Inference only: nothing to train; the packed weight is not part of the state dict."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.onednn = _onednn_available() and weight.device.type == "cpu" and weight.dtype == torch.float32
        weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if self.onednn else \
            weight.t().contiguous()
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        x2d = x.reshape(-1, self.in_features)
        weight_t = self.packed.to_dense().t() if self.onednn else self.packed
        y = x2d @ weight_t if self.bias is None else torch.addmm(self.bias, x2d, weight_t)
        return y.view(x.shape[:-1] + (self.out_features,))


def pack_linears_for_cpu(model: GPTModel) -> GPTModel:
    """In place, for fp32 inference on CPU: every nn.Linear and the tied LM head to a PackedLinear; the embedding
    keeps its own table. The server, the chat CLI and the evaluator call this; training never does."""
    if any(isinstance(m, (Int8Linear, PackedLinear)) for m in model.modules()):
        raise QuantizationError("the model's linear layers were already replaced (INT8 or packed)")
    with torch.no_grad():
        for parent, name, linear in _decoder_linears(model):
            setattr(parent, name, PackedLinear(linear.weight, linear.bias))
        model.lm_head = PackedLinear(model.lm_head.weight, model.lm_head.bias)
    return model.eval()


def prepare_for_inference(model: GPTModel, quantize: str = "none", dtype: torch.dtype = torch.float32) -> GPTModel:
    """The model a decode loop should run: INT8 when asked (or already), else fp32 on CPU with packed weights."""
    if quantize == "int8" and not is_quantized(model):
        quantize_model_int8(model)
    device = next(model.parameters()).device
    if not is_quantized(model) and device.type == "cpu" and dtype == torch.float32 and _onednn_available():
        pack_linears_for_cpu(model)
    return model.eval()


def _decoder_linears(model: GPTModel) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.transformer.h.modules()
            for name, child in parent.named_children() if isinstance(child, (nn.Linear, Int8Linear))]


def _swap_in_int8(model: GPTModel, lm_head: bool, kernel: str, quantize: bool) -> GPTModel:
    """Replace the decoder's nn.Linear (and the tied head + embedding) by INT8 modules, quantized or empty."""
    if any(isinstance(m, (Int8Linear, Int8Embedding, PackedLinear)) for m in model.modules()):
        raise QuantizationError("the model is already quantized (or its linear layers were packed)")
    for parent, name, linear in _decoder_linears(model):
        int8 = Int8Linear.from_linear(linear, kernel) if quantize else \
            Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        setattr(parent, name, int8.to(linear.weight.device))
    if lm_head:
        if model.lm_head.weight is not model.transformer.wte.weight:
            raise QuantizationError("lm_head is not tied to the token embedding; quantize it with lm_head=False")
        config = model.config
        head = Int8Linear.from_linear(model.lm_head, kernel) if quantize else \
            Int8Linear(config.d_model, config.vocab_size, bias=False, kernel=kernel).to(model.lm_head.weight.device)
        embedding = Int8Embedding(config.vocab_size, config.d_model)
        embedding.weight, embedding.scale = head.weight, head.scale  # one int8 table serves both (still tied)
        model.lm_head, model.transformer.wte = head, embedding
    model.quantization_config = {"lm_head": lm_head}
    return model


def quantize_model_int8(model: GPTModel, lm_head: bool = True, kernel: str = "auto") -> GPTModel:
    """Quantize in place: every decoder nn.Linear (and, with lm_head, the tied head and embedding) to int8."""
    if kernel not in KERNELS:
        raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    with torch.no_grad():
        return _swap_in_int8(model, lm_head, kernel, quantize=True)


def enable_int8_inference(model: GPTModel, lm_head: bool = True) -> GPTModel:
    """Seed-compatible name: quantize_model_int8 and switch to eval mode."""
    return quantize_model_int8(model, lm_head=lm_head).eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_count(model: nn.Module) -> int:
    """The weights a model holds, INT8 or float: an INT8 model counts its int8 matrices and float biases (its
    per-channel scales are not weights), so it reports the size of the model it was made from."""
    if not is_quantized(model):
        return sum(p.numel() for p in model.parameters())
    tensors = {t.data_ptr(): t.numel() for name, t in model.state_dict().items() if not name.endswith(".scale")}
    return sum(tensors.values())


def save_quantized_model(model: GPTModel, path: str | Path, **extra: Any) -> None:
    """One checkpoint format: int8 tensors + scales + config + "quantization": "int8" (atomic write)."""
    if not is_quantized(model):
        raise QuantizationError("the model is not quantized; call quantize_model_int8(model) first")
    save_checkpoint(path, model, quantization="int8", quantization_config=dict(model.quantization_config), **extra)


def model_from_int8_state(config: GPTConfig, state: dict[str, torch.Tensor], quantization_config: dict,
                          source: str) -> GPTModel:
    """Rebuild an INT8 GPTModel from its config and state dict (gpt_model.load_model_and_tokenizer calls this)."""
    lm_head = bool(quantization_config.get("lm_head", "lm_head.scale" in state))
    model = _swap_in_int8(GPTModel(config), lm_head, kernel="auto", quantize=False)
    _load_state_dict_checked(model, state, source)
    return model


def load_quantized_model(path: str | Path, device: str | torch.device | None = None) -> GPTModel:
    """An INT8 checkpoint written by save_quantized_model, in eval mode on device (config from the file)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("quantization") != "int8":
        from gpt_model import CheckpointError

        raise CheckpointError(f"{path} is not an INT8 checkpoint; make one with python -m inference.quantizer")
    model = model_from_int8_state(GPTConfig.from_dict(ckpt["config"]), ckpt["model_state_dict"],
                                  ckpt.get("quantization_config", {}), str(path))
    return model.to(resolve_device(device)).eval()


# ----------------------------------------------------------------------------- CLI


def _quality(model: GPTModel, tokenizer, data: str, batch_size: int, max_samples: int | None) -> tuple[str, float]:
    """Held-out bits per byte (.txt / {"text"} .jsonl) or response perplexity (SFT .json / .jsonl)."""
    import evaluator

    ev = evaluator.GPTEvaluator(model, tokenizer, show_progress=True)
    path = Path(data)
    suffix = path.suffix.lower()
    sft = suffix == ".json" or (suffix == ".jsonl" and evaluator._first_jsonl_record_is_sft(path))
    if sft:
        from data_loader import GPTSFTDataset, load_sft_records

        records = evaluator._take(load_sft_records(path), max_samples)
        dataset = GPTSFTDataset(records, tokenizer, model.config.max_seq_len)
        items = [dataset[i] for i in range(len(dataset))]
        return "response_perplexity", ev.compute_perplexity(
            evaluator._length_sorted_batches(items, batch_size, tokenizer.pad_token_id))
    metrics = ev.evaluate_pretrained(path, batch_size=batch_size, max_samples=max_samples)
    return "bits_per_byte", metrics["bits_per_byte"]


def _checkpoint_bytes(model: GPTModel) -> int:
    """Size of save_checkpoint(model) without writing a file."""
    buffer = io.BytesIO()
    torch.save({"model_state_dict": model.state_dict(), "config": model.config.to_dict()}, buffer)
    return buffer.tell()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from inference import OneLineErrorParser

    parser = OneLineErrorParser(description="Quantize a GPTModel checkpoint to INT8 weight-only (per-channel scales), "
                                            "print file sizes and held-out quality before/after.")
    parser.add_argument("--model_path", required=True, help="float checkpoint (.pth) to quantize")
    parser.add_argument("--output", required=True, help="where to write the INT8 checkpoint (.pth)")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: <checkpoint folder>/tokenizer); "
                                                "copied next to --output when that folder has none")
    parser.add_argument("--eval_data", default="data/pretrain/val.txt",
                        help="held-out data: .txt/.jsonl text gives bits per byte, SFT .json/.jsonl gives response "
                             "perplexity (default: data/pretrain/val.txt)")
    parser.add_argument("--no_eval", action="store_true", help="skip the quality comparison")
    parser.add_argument("--keep_lm_head", action="store_true",
                        help="leave the LM head and the tied embedding in float (larger file, slower at batch 1)")
    parser.add_argument("--batch_size", type=int, default=8, help="evaluation batch size (default: 8)")
    parser.add_argument("--max_samples", type=int, help="evaluate only the first N documents / records")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max_samples must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_run, argv)


def _run(argv: Sequence[str] | None) -> int:
    from gpt_model import load_model_and_tokenizer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.output).resolve() == Path(args.model_path).resolve():
        raise QuantizationError("--output must differ from --model_path (the float checkpoint is kept)")
    if not args.no_eval and not Path(args.eval_data).exists():
        raise QuantizationError(f"--eval_data {args.eval_data} not found (or pass --no_eval)")
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.tokenizer_dir, device="cpu")
    if is_quantized(model):
        raise QuantizationError(f"{args.model_path} is already an INT8 checkpoint")
    ckpt = load_checkpoint(args.model_path)
    extra = {k: ckpt[k] for k in ("tokenizer_fingerprint", "sft_template") if k in ckpt}
    del ckpt
    fp32_bytes = _checkpoint_bytes(model)  # weights only: the trainer's file also holds optimizer state
    quality = (lambda: None) if args.no_eval else \
        (lambda: _quality(model, tokenizer, args.eval_data, args.batch_size, args.max_samples))
    before = quality()
    quantize_model_int8(model, lm_head=not args.keep_lm_head)
    save_quantized_model(model, args.output, **extra)
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else Path(args.model_path).parent / "tokenizer"
    target = Path(args.output).parent / "tokenizer"
    if not target.exists():
        shutil.copytree(tokenizer_dir, target)
    after = quality()
    size_in, size_out = Path(args.model_path).stat().st_size, Path(args.output).stat().st_size
    print(f"{args.model_path}: {size_in / 1e6:.2f} MB; its fp32 weights alone {fp32_bytes / 1e6:.2f} MB -> "
          f"int8 checkpoint {size_out / 1e6:.2f} MB ({size_out / fp32_bytes:.3f}x): {args.output}")
    if before is not None:
        metric, fp32, int8 = before[0], before[1], after[1]
        print(f"{metric} on {args.eval_data}: fp32 {fp32:.4f}, int8 {int8:.4f} ({(int8 / fp32 - 1) * 100:+.2f}%)")
    return 0


if __name__ == "__main__":
    # Run the CLI from the imported module, not from __main__: a checkpoint loaded through gpt_model builds its
    # layers from inference.quantizer, and two copies of the module would mean two Int8Linear classes.
    from inference.quantizer import main as _main

    sys.exit(_main())
