"""The weights inference runs on: INT8 weight-only layers (int8 weights, one scale per output channel) and fp32
layers prepacked for the CPU; ``prepare_for_inference`` turns a trained ``GPTModel`` into the fastest of them for its
device, and every inference path (``checkpoints.load_model_and_tokenizer``, so ``decoding.generate``, the evaluator, the
chat CLI, best-of-N and the server) runs on what it returns. Training keeps plain ``nn.Linear`` weights.

Every nn.Linear of the decoder becomes an Int8Linear, and by default so does the LM head; when the head is tied to
the token embedding, the embedding then reads the same int8 table (its rows are the head's output channels, so the same
per-row scales serve both); an untied embedding gets its own int8 table. Kernels, chosen per device (measured with
benchmarks/bench_inference.py):
  - "fbgemm" (x86 CPU): torch.ops.quantized.linear_dynamic, the kernel behind quantize_dynamic. It ALSO quantizes
    activations: per tensor (each call), to 7-bit unsigned (reduce_range, which keeps AVX2's 16-bit accumulation from
    saturating), then dequantizes the int32 result. Held to the same quality target.
  - "fbgemm_direct" (x86 CPU, the default there): FBGEMM's int8 GEMM called directly
    (torch.fbgemm_linear_int8_weight_fp32_activation) behind a torch.library op with a fake kernel, so a compiled
    decode step holds it in one graph; the per-channel scales and the bias are applied outside (inductor fuses them).
    Activations are quantized per tensor to 8-bit unsigned (no reduce_range). AVX2 and AVX-512 without VNNI sum
    pairs of u8 x s8 products in int16, which 8-bit weights can overflow: there the weights are packed at 7 bits
    (+-63, scales doubled), which cannot (255 * 63 * 2 < 2^15); with AVX-512 VNNI (int32 sums) at their 8 bits.
  - "int8pack" (CUDA): torch._weight_int8pack_mm, activations stay in the compute dtype (as gpt-fast).
  - "dequant": int8 -> compute dtype, then a plain matmul times the scales; correct everywhere (the fallback).

Its own module, below the checkpoint loader (which builds INT8 models from their files) and above the model; the INT8
CLI is ``inference/quantizer.py``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_model import GPTModel

KERNELS = ("auto", "fbgemm_direct", "fbgemm", "int8pack", "dequant")
OPS_NAMESPACE = "gpt_framework"


class QuantizationError(ValueError):
    """Bad quantization input (unknown kernel, a model that is already quantized, ...)."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (row): (int8 weight, float32 scale) with weight ~= int8 * scale[:, None]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@functools.cache
def fbgemm_available() -> bool:
    """Whether this torch build has FBGEMM's dynamic int8 linear (x86 CPUs); asked once, not per matmul."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


@functools.cache
def fbgemm_direct_available() -> bool:
    """Whether this torch build also has FBGEMM's int8 GEMM as plain ops (the torch.fbgemm_* family)."""
    return fbgemm_available() and hasattr(torch, "fbgemm_linear_int8_weight_fp32_activation") \
        and hasattr(torch, "fbgemm_pack_quantized_matrix")


@functools.cache
def int32_accumulation() -> bool:
    """Whether FBGEMM sums u8 x s8 products in int32 on this CPU (AVX-512 VNNI); else in saturating int16 pairs."""
    return bool(torch.cpu.get_capabilities().get("avx512_vnni", False))


def fbgemm_int8_units(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, col_offsets: torch.Tensor,
                      zeros: torch.Tensor) -> torch.Tensor:
    """(N, in) float32 times the int8 (out, in) ``weight`` packed by torch.fbgemm_pack_quantized_matrix, in int8
    units: no scale, no bias (the caller applies both)."""
    return torch.fbgemm_linear_int8_weight_fp32_activation(x, weight, packed, col_offsets, 1.0, 0, zeros)


# The same as an op of its own with a fake kernel, so torch.compile keeps it in one graph (eager calls skip its
# dispatch); the packed weight is an opaque handle, a graph input, never a constant to fold.
fbgemm_int8_matmul = torch.library.custom_op(f"{OPS_NAMESPACE}::fbgemm_int8_matmul",
                                             mutates_args=())(fbgemm_int8_units)


@fbgemm_int8_matmul.register_fake
def _fbgemm_int8_matmul_shape(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, col_offsets: torch.Tensor,
                              zeros: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def pick_kernel(device: torch.device) -> str:
    """The kernel that measured fastest on this kind of device (benchmarks/bench_inference.py), else the fallback."""
    if device.type == "cpu" and fbgemm_direct_available():
        return "fbgemm_direct"
    if device.type == "cpu" and fbgemm_available():
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
        self._packed: tuple[tuple, list[int], Any] | None = None  # (packed from, their versions, FBGEMM packed)
        self._direct: tuple[tuple, list[int], tuple] | None = None  # the same for fbgemm_direct
        self._kernels: dict[tuple[str, torch.dtype], str] = {}  # (device type, dtype) -> the kernel chosen

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
        """The kernel for inputs like ``x`` (chosen once per device type and dtype: this runs on every matmul)."""
        where = (x.device.type, x.dtype)
        if where not in self._kernels:
            self._kernels[where] = self._choose_kernel(x.device, x.dtype)
        return self._kernels[where]

    def _choose_kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        kernel = pick_kernel(device) if self.kernel == "auto" else self.kernel
        if kernel == "fbgemm_direct" and not fbgemm_direct_available():
            kernel = "fbgemm"
        if kernel.startswith("fbgemm") and (device.type != "cpu" or dtype != torch.float32 or not fbgemm_available()):
            return "dequant"  # FBGEMM takes float32 on CPU only
        if kernel == "int8pack" and not hasattr(torch, "_weight_int8pack_mm"):
            return "dequant"
        return kernel

    def _fbgemm_weights(self):
        """FBGEMM's prepacked weights, rebuilt when a weight, scale or bias tensor is replaced or written in place."""
        sources = (self.weight, self.scale, self.bias)
        versions = [t._version for t in sources if t is not None]
        packed = self._packed
        if packed is None or packed[1] != versions or any(a is not b for a, b in zip(packed[0], sources)):
            with warnings.catch_warnings():  # quantized-tensor constructors warn that they are deprecated
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                packed = (sources, versions, torch.ops.quantized.linear_prepack(qweight, self.bias))
            self._packed = packed
        return packed[2]

    def _direct_weights(self) -> tuple[torch.Tensor, ...]:
        """(int8 weight, FBGEMM's packed copy, its row sums, zeros, scale) for ``fbgemm_int8_matmul``, rebuilt as
        ``_fbgemm_weights``. Where FBGEMM sums in int16 pairs the weights are packed at 7 bits (scales doubled)."""
        if torch.compiler.is_compiling():  # packed by the eager calls before (a compiled step follows a prefill)
            if self._direct is None:
                raise QuantizationError("run an Int8Linear once before compiling it: its weights are packed eagerly")
            return self._direct[2]
        sources = (self.weight, self.scale)
        versions = [t._version for t in sources]
        direct = self._direct
        if direct is None or direct[1] != versions or any(a is not b for a, b in zip(direct[0], sources)):
            weight, scale = self.weight, self.scale
            if not int32_accumulation():  # 255 * 63 * 2 < 2^15: no pair of products saturates int16
                weight, scale = torch.round(weight / 2).clamp(-63, 63).to(torch.int8), scale * 2
            with warnings.catch_warnings():  # the torch.fbgemm_* family warns once that it is deprecated
                warnings.simplefilter("ignore")
                packed = torch.fbgemm_pack_quantized_matrix(weight)
                zeros = torch.zeros(self.out_features)
                col_offsets = weight.sum(dim=1, dtype=torch.int32)
                fbgemm_int8_matmul(torch.zeros(1, self.in_features), weight, packed, col_offsets, zeros)
            direct = self._direct = (sources, versions, (weight, packed, col_offsets, zeros, scale))
        return direct[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.active_kernel(x)
        shape = x.shape[:-1] + (self.out_features,)
        x2d = x.reshape(-1, self.in_features)
        if kernel == "fbgemm_direct":
            weight, packed, col_offsets, zeros, scale = self._direct_weights()
            matmul = fbgemm_int8_matmul if torch.compiler.is_compiling() else fbgemm_int8_units
            y = matmul(x2d.contiguous(), weight, packed, col_offsets, zeros) * scale
            return (y if self.bias is None else y + self.bias).view(shape)
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


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build can prepack fp32 weights for oneDNN (CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear_eager(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with W in oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# The same as an op of its own: inductor lowers mkldnn's linear only for a weight it froze as a constant; as an
# opaque op with a fake kernel the packed weight stays a graph input and the compiled step calls oneDNN directly.
onednn_linear = torch.library.custom_op(f"{OPS_NAMESPACE}::onednn_linear", mutates_args=())(onednn_linear_eager)


@onednn_linear.register_fake
def _onednn_linear_shape(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (packed.shape[0],))


class PackedLinear(nn.Module):
    """Float y = x W^T + b with W prepacked once into oneDNN's blocked layout (what inductor's freezing does on
    CPU): the GEMV/GEMM of decoding then skips nn.Linear's per-call layout work (benchmarks/bench_inference.py).
    Without oneDNN, W is stored (in, out) contiguous instead (also faster than nn.Linear's (out, in) on CPU).
    Inference only: nothing to train; the packed weight is not part of the state dict."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.onednn = onednn_available() and weight.device.type == "cpu" and weight.dtype == torch.float32
        weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if self.onednn else \
            weight.t().contiguous()
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and x.dtype == torch.float32:
            return (onednn_linear if torch.compiler.is_compiling() else onednn_linear_eager)(x, self.packed, self.bias)
        x2d = x.reshape(-1, self.in_features)
        weight_t = self.packed.to_dense().t() if self.onednn else self.packed
        y = x2d @ weight_t if self.bias is None else torch.addmm(self.bias, x2d, weight_t)
        return y.view(x.shape[:-1] + (self.out_features,))


def pack_linears_for_cpu(model: GPTModel) -> GPTModel:
    """In place, for fp32 inference on CPU: every nn.Linear and the tied LM head to a PackedLinear; the embedding
    keeps its own table. ``prepare_for_inference`` calls this (so every inference path does); training never does."""
    if any(isinstance(m, (Int8Linear, PackedLinear)) for m in model.modules()):
        raise QuantizationError("the model's linear layers were already replaced (INT8 or packed)")
    with torch.no_grad():
        for parent, name, linear in decoder_linears(model):
            setattr(parent, name, PackedLinear(linear.weight, linear.bias))
        model.lm_head = PackedLinear(model.lm_head.weight, model.lm_head.bias)
    return model.eval()


def prepare_for_inference(model: nn.Module, quantize: str = "none", dtype: torch.dtype = torch.float32) -> nn.Module:
    """In place, the model a decode loop should run (eval mode): INT8 when asked (or already), else, for fp32 on a CPU,
    prepacked weights; a model already prepared is returned as it is. Only a ``GPTModel`` is changed (reward models
    and classifiers keep their layers)."""
    if quantize not in ("none", "int8"):
        raise QuantizationError(f"unknown quantization {quantize!r}; use none or int8")
    if not isinstance(model, GPTModel) or is_packed(model):
        return model.eval()
    if quantize == "int8" and not is_quantized(model):
        quantize_model_int8(model)
    device = next(model.parameters()).device
    if not is_quantized(model) and device.type == "cpu" and dtype == torch.float32 and onednn_available():
        pack_linears_for_cpu(model)
    return model.eval()


def decoder_linears(model: GPTModel) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every linear layer (float or INT8) inside the decoder blocks."""
    return [(parent, name, child) for parent in model.transformer.h.modules()
            for name, child in parent.named_children() if isinstance(child, (nn.Linear, Int8Linear))]


def swap_in_int8(model: GPTModel, lm_head: bool = True, kernel: str = "auto", quantize: bool = True) -> GPTModel:
    """Replace the decoder's nn.Linear (and the tied head + embedding) by INT8 modules, quantized or empty (the
    checkpoint loader fills empty ones from an INT8 state dict)."""
    if any(isinstance(m, (Int8Linear, Int8Embedding, PackedLinear)) for m in model.modules()):
        raise QuantizationError("the model is already quantized (or its linear layers were packed)")
    for parent, name, linear in decoder_linears(model):
        int8 = Int8Linear.from_linear(linear, kernel) if quantize else \
            Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        setattr(parent, name, int8.to(linear.weight.device))
    if lm_head:
        config = model.config
        head = Int8Linear.from_linear(model.lm_head, kernel) if quantize else \
            Int8Linear(config.d_model, config.vocab_size, bias=False, kernel=kernel).to(model.lm_head.weight.device)
        embedding = Int8Embedding(config.vocab_size, config.d_model)
        if config.tie_embeddings:
            embedding.weight, embedding.scale = head.weight, head.scale  # one int8 table serves both (still tied)
        elif quantize:  # an untied head: the embedding gets its own int8 table, its rows scaled on their own
            embedding.weight, embedding.scale = quantize_per_channel(model.transformer.wte.weight)
        model.lm_head, model.transformer.wte = head, embedding.to(model.lm_head.weight.device)
    model.quantization_config = {"lm_head": lm_head}
    return model


def quantize_model_int8(model: GPTModel, lm_head: bool = True, kernel: str = "auto") -> GPTModel:
    """Quantize in place: every decoder nn.Linear (and, with lm_head, the tied head and embedding) to int8."""
    if kernel not in KERNELS:
        raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    with torch.no_grad():
        return swap_in_int8(model, lm_head, kernel, quantize=True)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def is_packed(model: nn.Module) -> bool:
    """Whether the model's linear layers were prepacked for inference (their weights are not in its state dict)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def weight_count(model: nn.Module) -> int:
    """The weights a model holds, float, packed or INT8, so each reports the size of the model it was made from: an
    INT8 model counts its int8 matrices and float biases (its per-channel scales are not weights), a packed one its
    packed matrices (a tied LM head once: it is the token embedding)."""
    if is_quantized(model):
        tensors = {t.data_ptr(): t.numel() for name, t in model.state_dict().items() if not name.endswith(".scale")}
        return sum(tensors.values())
    packed = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                 for name, m in model.named_modules()
                 if isinstance(m, PackedLinear) and (name != "lm_head" or not model.config.tie_embeddings))
    return packed + sum(p.numel() for p in model.parameters())
