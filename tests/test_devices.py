"""devices: --device / --dtype resolution and autocast on CPU."""
from __future__ import annotations

import pytest
import torch

from devices import autocast_context, resolve_device, resolve_dtype


def test_device_and_dtype_helpers_on_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None).type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16 and resolve_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4", "cpu")
    with autocast_context("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
