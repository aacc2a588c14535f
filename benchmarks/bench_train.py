"""Training throughput: tokens/s of full optimizer steps (forward, backward, AdamW) for two model sizes.

Prints ONE JSON line. CPU always; CUDA too when present (bf16 autocast where supported, plus MFU).

    python -m benchmarks.bench_train [--steps 5] [--threads N]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # same setting as the trainer

import argparse
import json
import time

import torch

import gpt_model
from pretrain_trainer import peak_flops

SHAPES = {"tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512), "6x384": dict(d_model=384, n_layers=6, n_heads=6, d_ff=1536)}


def tokens_per_second(shape: str, device: torch.device, vocab_size: int, seq_len: int, batch_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    config = gpt_model.GPTConfig(vocab_size=vocab_size, max_seq_len=seq_len, **SHAPES[shape])
    model = gpt_model.GPTModel(config).to(device)
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), device.type)
    dtype = gpt_model.resolve_dtype("auto", device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        with gpt_model.autocast_context(device, dtype):
            loss = model(x, labels=x)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch_size * seq_len / (time.perf_counter() - start)
    result = {"tokens_per_sec": round(rate, 1), "params_M": round(model.num_parameters() / 1e6, 2), "dtype": str(dtype).removeprefix("torch.")}
    peak = peak_flops(device)
    if peak:
        result["mfu"] = round(model.estimate_mfu(rate, peak), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per measurement (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--vocab_size", type=int, default=2048, help="vocabulary size of the benchmarked models")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "vocab_size": args.vocab_size}
    cpu = torch.device("cpu")
    for shape in SHAPES:
        out[f"cpu_{shape}"] = {**tokens_per_second(shape, cpu, args.vocab_size, 256, 16, args.steps), "seq_len": 256, "batch": 16}
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        torch.set_float32_matmul_precision("high")
        out["gpu"] = torch.cuda.get_device_name(cuda)
        for shape in SHAPES:
            out[f"cuda_{shape}"] = {**tokens_per_second(shape, cuda, args.vocab_size, 1024, 32, args.steps * 4), "seq_len": 1024, "batch": 32}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
