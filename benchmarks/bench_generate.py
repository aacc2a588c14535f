"""Greedy generation throughput of GPTModel (KV cache on / off) against transformers' GPT-2 with the same weights.

Prints ONE JSON line. Keys are <device>_<shape>_b<batch>_<figure>; tok_s counts new tokens only
(batch * new_tokens / seconds), best of --repeats runs, ours and transformers' runs interleaved.
Uncached 124M decoding on CPU is too slow to run in full (minutes): its time is estimated by timing
single uncached steps at --uncached_samples sequence lengths between the prompt and the full length and
integrating over all steps (trapezoid); those keys end in _est. Everything else is measured end to end.

    python -m benchmarks.bench_generate                     # tiny + gpt2 shapes, batch 1 and 8, CPU (+ CUDA)
    python -m benchmarks.bench_generate --shapes tiny       # seconds
    python -m benchmarks.bench_generate --num_threads 1     # on a busy/shared box: 2 threads on oversubscribed
                                                            # cores make small matmuls swing 5-10x run to run
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import cli
from benchmarks.cli_options import benchmark_parser, positive_ints, presets
from decoding import SamplingParams, generate
from devices import set_threads
from gpt_model import GPTConfig, GPTModel
from hf_models import from_hf_config, from_hf_state_dict


def build_pair(shape: str, device: torch.device) -> tuple[GPTModel, GPT2LMHeadModel]:
    """transformers GPT-2 with random weights (vocab 50257) and our model holding the very same weights."""
    preset = GPTConfig.from_preset(shape)
    hf_config = GPT2Config(vocab_size=50257, n_positions=preset.max_seq_len, n_embd=preset.d_model,
                           n_layer=preset.n_layers, n_head=preset.n_heads, n_inner=preset.d_ff,
                           bos_token_id=50256, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config).eval().to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    config = from_hf_config({**hf_config.to_dict(), "architectures": ["GPT2LMHeadModel"]})
    ours = GPTModel(config)
    ours.load_state_dict(from_hf_state_dict({k: v.cpu() for k, v in hf.state_dict().items()}, config))
    return ours.eval().to(device), hf


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def estimate_uncached_seconds(model: GPTModel, prompt: torch.Tensor, new_tokens: int, samples: int,
                              device: torch.device) -> float:
    """Sum over all steps of one uncached step's time, interpolated from `samples` timed sequence lengths."""
    prompt_len = prompt.size(1)
    lengths = np.linspace(prompt_len, prompt_len + new_tokens - 1, samples).round().astype(int)
    step_seconds = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (prompt.size(0), int(length)), device=device)
        one_step = functools.partial(generate, model, ids, SamplingParams(max_new_tokens=1, do_sample=False),
                                     use_cache=False)
        one_step()  # warm this shape
        step_seconds.append(min(timed(one_step, device)[0] for _ in range(2)))
    every_length = np.arange(prompt_len, prompt_len + new_tokens)
    return float(np.interp(every_length, lengths, step_seconds).sum())


def bench_shape(shape: str, device: torch.device, args: argparse.Namespace, results: dict) -> None:
    ours, hf = build_pair(shape, device)
    repeats = args.repeats if shape == "tiny" or device.type == "cuda" else args.big_cpu_repeats
    full_uncached = shape == "tiny" or device.type == "cuda"
    for batch in args.batch_sizes:
        prefix = f"{device.type}_{shape}_b{batch}"
        gen = torch.Generator(device="cpu").manual_seed(batch)
        prompt = torch.randint(0, 50257, (batch, args.prompt_len), generator=gen).to(device)
        mask = torch.ones_like(prompt)
        run_ours = functools.partial(generate, ours, prompt, SamplingParams(max_new_tokens=args.new_tokens,
                                                                            do_sample=False))
        run_hf = functools.partial(hf.generate, prompt, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False)
        generate(ours, prompt, SamplingParams(max_new_tokens=4, do_sample=False))  # warm-up: allocator, kernels
        hf.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        ours_s, hf_s, same = [], [], True
        for _ in range(repeats):
            seconds, ours_out = timed(run_ours, device)
            ours_s.append(seconds)
            seconds, hf_out = timed(run_hf, device)
            hf_s.append(seconds)
            same = same and torch.equal(ours_out, hf_out)
        if full_uncached:
            uncached_s = min(timed(lambda: run_ours(use_cache=False), device)[0] for _ in range(max(1, repeats - 1)))
            uncached_key = "uncached_tok_s"
        else:
            uncached_s = estimate_uncached_seconds(ours, prompt, args.new_tokens, args.uncached_samples, device)
            uncached_key = "uncached_tok_s_est"
        new = batch * args.new_tokens
        results[f"{prefix}_cached_tok_s"] = round(new / min(ours_s), 1)
        results[f"{prefix}_{uncached_key}"] = round(new / uncached_s, 1)
        results[f"{prefix}_hf_cached_tok_s"] = round(new / min(hf_s), 1)
        results[f"{prefix}_ours_over_hf"] = round(min(hf_s) / min(ours_s), 2)
        results[f"{prefix}_cache_speedup"] = round(uncached_s / min(ours_s), 1)
        results[f"{prefix}_same_tokens_as_hf"] = same
    del ours, hf


def device_list(text: str) -> list[str]:
    """argparse type: "auto" (cpu, plus cuda when available) or comma-separated torch devices ("cpu,cuda")."""
    if text == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        try:
            torch.device(name)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"unknown device {name!r}; use auto or a list such as cpu,cuda") from None
    if not names:
        raise argparse.ArgumentTypeError("expected auto or a list of devices such as cpu,cuda, got ''")
    return names


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_generate", __doc__)
    parser.add_argument("--shapes", type=presets(), default="tiny,gpt2",
                        help="comma-separated GPTConfig presets to measure")
    parser.add_argument("--batch_sizes", type=positive_ints(), default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=cli.positive_int, default=32, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=128, help="tokens generated per row (greedy)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed runs per figure (best kept)")
    parser.add_argument("--big_cpu_repeats", type=cli.positive_int, default=2,
                        help="timed runs per figure for non-tiny shapes on CPU (each takes tens of seconds)")
    parser.add_argument("--uncached_samples", type=cli.int_at_least(2), default=5,
                        help="sequence lengths timed to estimate uncached decoding of non-tiny shapes on CPU")
    parser.add_argument("--devices", type=device_list, default="auto",
                        help="auto (cpu, plus cuda when available) or a list: cpu,cuda")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    results: dict = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "greedy": True,
                     "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32"}
    if torch.cuda.is_available():
        results["cuda_device"] = torch.cuda.get_device_name()
    started = time.perf_counter()
    for device in args.devices:
        for shape in args.shapes:
            bench_shape(shape, torch.device(device), args, results)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
