"""Training throughput: tokens/s of full optimizer steps (forward, backward, clip, AdamW as the training loop builds
it: ``optimizers.configure_optimizer``, the fused kernel, weight decay on 2-D weights only).

Prints ONE JSON line. CPU always; CUDA too when present (bf16 autocast where supported, plus MFU).
``cpu_nanogpt_config`` is nanoGPT's shakespeare_char shape (6 layers x 384, block 256, vocab 65) at batch 8, fp32,
bias on, no dropout: the configuration our step is compared with nanoGPT on, as GPT-2 (tanh GELU) and with nanoGPT's
exact GELU (``ours_exact_gelu``), the one difference between the two models. With ``--nanogpt DIR`` (a local
checkout of karpathy/nanoGPT, which this project does not ship) its ``model.py`` is timed in the same process on
the same batches, alternating with ours so that a busy machine slows both alike.

    python -m benchmarks.bench_train [--steps 5] [--num_threads 2] [--nanogpt ~/src/nanoGPT]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # same setting as the trainer

import contextlib
import importlib.util
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import cli
import gpt_model
from benchmarks.cli_options import benchmark_parser
from devices import autocast_context, resolve_dtype, set_threads
from optimizers import configure_optimizer
from training import peak_flops

SHAPES = {"tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512),
          "6x384": dict(d_model=384, n_layers=6, n_heads=6, d_ff=1536)}


def tokens_per_second(shape: str, device: torch.device, vocab_size: int, seq_len: int, batch_size: int,
                      steps: int) -> dict:
    torch.manual_seed(0)
    config = gpt_model.GPTConfig(vocab_size=vocab_size, max_seq_len=seq_len, **SHAPES[shape])
    model = gpt_model.GPTModel(config).to(device)
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), device.type)  # the training loop's AdamW
    dtype = resolve_dtype("auto", device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        with autocast_context(device, dtype):
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
    result = {"tokens_per_sec": round(rate, 1), "params_M": round(model.num_parameters() / 1e6, 2),
              "dtype": str(dtype).removeprefix("torch.")}
    peak = peak_flops(device)
    if peak:
        result["mfu"] = round(model.estimate_mfu(rate, peak), 4)
    return result


NANOGPT_SHAPE = dict(n_layers=6, d_model=384, n_heads=6, d_ff=1536, seq_len=256, batch=8, vocab_size=65)


def _nanogpt_model(directory: str, shape: dict) -> torch.nn.Module:
    """nanoGPT's GPT from a local checkout's model.py, built with the same shape."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(directory).expanduser() / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.GPTConfig(block_size=shape["seq_len"], vocab_size=shape["vocab_size"], n_layer=shape["n_layers"],
                              n_head=shape["n_heads"], n_embd=shape["d_model"], dropout=0.0, bias=True)
    return module.GPT(config)


def step_seconds(model: torch.nn.Module, loss_of, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """Seconds of one forward + backward + clip + AdamW step."""
    start = time.perf_counter()
    loss = loss_of(model, x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def nanogpt_config_comparison(steps: int, nanogpt_dir: str | None) -> dict:
    """Our step vs nanoGPT's (when given) on nanoGPT's shakespeare_char shape, fp32, CPU, interleaved step by step."""
    shape = NANOGPT_SHAPE
    torch.manual_seed(0)
    x = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"] + 1))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # as nanoGPT's get_batch stacks them
    def ours(activation: str) -> tuple:
        model = gpt_model.GPTModel(gpt_model.GPTConfig(
            vocab_size=shape["vocab_size"], max_seq_len=shape["seq_len"], n_layers=shape["n_layers"],
            d_model=shape["d_model"], n_heads=shape["n_heads"], d_ff=shape["d_ff"], activation=activation))
        return model, lambda m, _: m(inputs, labels=inputs)["loss"], configure_optimizer(model, 0.1, 6e-4)

    # ours as GPT-2 (tanh GELU), and with nanoGPT's exact GELU: the one difference left between the two steps
    systems = {"ours": ours("gelu_tanh"), "ours_exact_gelu": ours("gelu")}
    if nanogpt_dir:
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter counts
            theirs = _nanogpt_model(nanogpt_dir, shape)
            optimizer = theirs.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
        systems["nanogpt"] = (theirs, lambda m, _: m(inputs, targets)[1], optimizer)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for step in range(steps + 1):
        for name, (model, loss_of, optimizer) in systems.items():
            seconds = step_seconds(model, loss_of, inputs, optimizer)
            if step:  # the first step warms up allocations
                times[name].append(seconds)
    tokens = shape["batch"] * shape["seq_len"]
    out = {**shape, "dtype": "float32"}
    for name, values in times.items():
        out[f"{name}_tokens_per_sec"] = round(tokens / statistics.median(values), 1)
    if "nanogpt_tokens_per_sec" in out:
        for name in ("ours", "ours_exact_gelu"):
            out[f"{name}_vs_nanogpt"] = round(out[f"{name}_tokens_per_sec"] / out["nanogpt_tokens_per_sec"], 3)
    return out


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_train", __doc__)
    parser.add_argument("--steps", type=cli.positive_int, default=5,
                        help="timed optimizer steps per measurement (after one warm-up step)")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--vocab_size", type=cli.positive_int, default=2048,
                        help="vocabulary size of the benchmarked models")
    parser.add_argument("--nanogpt", default=None, help="a local nanoGPT checkout: also time its model.py on the "
                        "nanoGPT configuration")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    out: dict = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "vocab_size": args.vocab_size}
    cpu = torch.device("cpu")
    out["cpu_nanogpt_config"] = nanogpt_config_comparison(max(args.steps, 5), args.nanogpt)
    for shape in SHAPES:
        out[f"cpu_{shape}"] = {**tokens_per_second(shape, cpu, args.vocab_size, 256, 16, args.steps),
                               "seq_len": 256, "batch": 16}
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        torch.set_float32_matmul_precision("high")
        out["gpu"] = torch.cuda.get_device_name(cuda)
        for shape in SHAPES:
            out[f"cuda_{shape}"] = {**tokens_per_second(shape, cuda, args.vocab_size, 1024, 32, args.steps * 4),
                                    "seq_len": 1024, "batch": 32}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
