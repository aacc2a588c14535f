"""Where and in what precision torch runs: the device (``auto`` picks CUDA, then MPS, then CPU), the compute dtype
(``auto`` picks bf16 on capable GPUs, fp16 on other GPUs, fp32 on CPU), autocast, and CPU threads.

Its own module (torch only) because the trainers, the evaluator, the checkpoint loader and every inference tool
resolve the same ``--device`` / ``--dtype`` / ``--num_threads`` flags, and none of them should import another for it.
"""
from __future__ import annotations

import contextlib

import torch

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" -> cuda if available, else mps, else cpu; otherwise the named device (checked to exist)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu (or auto)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu (or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """"auto"/None -> bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 elsewhere; else the named dtype."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32/fp32, bfloat16/bf16 or float16/fp16")
    return DTYPE_NAMES[dtype]


def autocast_context(device: str | torch.device, dtype: torch.dtype):
    """torch.autocast for bf16/fp16 (weights stay fp32), a no-op context for fp32."""
    device = torch.device(device)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def set_threads(num_threads: int | None) -> None:
    """torch's CPU threads (``--num_threads``); None or 0 leaves torch's own choice."""
    if num_threads:
        torch.set_num_threads(num_threads)
