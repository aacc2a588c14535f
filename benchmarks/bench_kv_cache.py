"""KV-cache memory and decode speed of GPT-2's shape and the modern shape (grouped-query attention) at one size.

For each pair of presets (GPT-2 blocks, then the modern blocks of the same width and depth): the KV cache's bytes
per token per slot, read off the engine's allocated buffers (keys and values of every layer over n_slots x max_len
positions), and greedy decode tokens/s through the one engine (``decoding.DecodeEngine``) at each batch size: random
weights, --vocab_size tokens, a --prompt_len-token prompt per slot, --new_tokens new tokens each (no early stop).
The shapes alternate round by round; each figure is the median of --rounds. Prints one JSON line.

    python -m benchmarks.bench_kv_cache                                   # 124M pair and the default run's pair
    python -m benchmarks.bench_kv_cache --pairs tiny:modern-tiny --batch_sizes 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import cli
from benchmarks.cli_options import benchmark_parser, positive_ints
from decoding import DecodeEngine, SamplingParams
from devices import set_threads
from gpt_model import PRESETS, GPTConfig, GPTModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_kv_cache.json"
DEFAULT_LAYERS = 2  # the default pretraining run's depth (pretrain_trainer.DEFAULT_TINY_LAYERS)


def preset_pairs(text: str) -> list[tuple[str, str]]:
    """argparse type: comma-separated ``gpt2_preset:modern_preset`` pairs ("gpt2:modern,tiny:modern-tiny")."""
    pairs = []
    for item in text.split(","):
        names = tuple(name.strip() for name in item.split(":"))
        if len(names) != 2 or not all(names):
            raise argparse.ArgumentTypeError(f"expected pairs such as gpt2:modern, got {item!r}")
        unknown = [name for name in names if name not in PRESETS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
        pairs.append(names)
    return pairs


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_kv_cache", __doc__)
    parser.add_argument("--pairs", type=preset_pairs, default=[("gpt2", "modern"), ("tiny", "modern-tiny")],
                        help="GPT-2:modern preset pairs (tiny pairs run at the default run's 2 layers)")
    parser.add_argument("--batch_sizes", type=positive_ints(), default=[1, 32], help="slots decoding together")
    parser.add_argument("--vocab_size", type=cli.positive_int, default=8192, help="the models' vocabulary")
    parser.add_argument("--prompt_len", type=cli.positive_int, default=32, help="prompt tokens per slot")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=64, help="new tokens per slot")
    parser.add_argument("--rounds", type=cli.positive_int, default=3, help="alternating rounds (median)")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON result is written")
    return parser


def build_model(preset: str, vocab_size: int) -> GPTModel:
    """Random weights of ``preset`` (a tiny preset at the default run's depth), seeded alike for every shape."""
    depth = {"n_layers": DEFAULT_LAYERS} if preset in ("tiny", "modern-tiny") else {}
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_preset(preset, vocab_size=vocab_size, **depth)).eval()


def kv_bytes_per_token(engine: DecodeEngine) -> int:
    """Bytes the engine's cache holds per position of one slot: keys + values of every layer."""
    cache = engine.cache
    total = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values] if t is not None)
    return total // (cache.n_slots * cache.max_len)


def decode_run(model: GPTModel, batch: int, args: argparse.Namespace) -> tuple[float, int]:
    """(new tokens/s, KV bytes per token per slot) of one greedy batch through a fresh engine."""
    engine = DecodeEngine(model, n_slots=batch, max_len=args.prompt_len + args.new_tokens)
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(2, args.vocab_size, (batch, args.prompt_len), generator=generator).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False)
    started = time.perf_counter()
    with torch.inference_mode():
        requests = engine.run(prompts, params)
    seconds = time.perf_counter() - started
    return sum(len(r.output_ids) for r in requests) / seconds, kv_bytes_per_token(engine)


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    result: dict = {"torch": torch.__version__, "threads": args.num_threads, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "vocab_size": args.vocab_size, "rounds": args.rounds, "pairs": {}}
    for pair in args.pairs:
        models = {name: build_model(name, args.vocab_size) for name in pair}
        speeds: dict[tuple[str, int], list[float]] = {(n, b): [] for n in pair for b in args.batch_sizes}
        memory: dict[str, int] = {}
        for _ in range(args.rounds):
            for batch in args.batch_sizes:
                for name, model in models.items():  # alternate the shapes: a busy moment hits both
                    tok_s, memory[name] = decode_run(model, batch, args)
                    speeds[name, batch].append(tok_s)
        result["pairs"][":".join(pair)] = {name: {
            "parameters": sum(p.numel() for p in model.parameters()),
            "n_heads": model.config.n_heads, "n_kv_heads": model.config.n_kv_heads or model.config.n_heads,
            "kv_bytes_per_token": memory[name],
            **{f"decode_tok_s_b{b}": round(statistics.median(speeds[name, b]), 1) for b in args.batch_sizes}}
            for name, model in models.items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
