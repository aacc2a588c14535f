"""Benchmark our ByteLevelBPETokenizer against Hugging Face `tokenizers`; prints ONE JSON line.

Run from the repository root: ``python -m benchmarks.bench_tokenizer [--input data/pretrain/train.txt]``
(``--tokenizer_dir models/bpe_tokenizer``: also the saved tokenizer's encode speed on --input).
For a 1 MB slice and the whole file: training time at vocab 1024 and 8192, encode throughput
(one process with a cold cache and again warm, and all cores via encode_many), bytes per token;
the same for `tokenizers` (train_from_iterator; encode_batch over lines and one encode call), and ours/theirs ratios.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import cli
from benchmarks.cli_options import benchmark_parser
from byte_level_bpe import DEFAULT_SPECIAL_TOKENS, ByteLevelBPETokenizer


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_slice(lines: list[str], vocab_sizes: tuple[int, ...]) -> dict:
    import tokenizers

    n_mb = sum(len(line.encode("utf-8")) + 1 for line in lines) / 1e6
    text = "\n".join(lines)
    out: dict = {"megabytes": round(n_mb, 3), "lines": len(lines)}
    for vocab_size in vocab_sizes:
        ours = ByteLevelBPETokenizer(vocab_size=vocab_size)
        _, ours_train_s = timed(lambda: ours.train(lines, min_frequency=2, show_progress=False))
        hf = tokenizers.ByteLevelBPETokenizer()
        _, hf_train_s = timed(lambda: hf.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2,
                                                             special_tokens=DEFAULT_SPECIAL_TOKENS,
                                                             show_progress=False))

        with tempfile.TemporaryDirectory() as tmp:  # cold = freshly loaded, empty pre-token cache
            ours.save(tmp)
            ours = ByteLevelBPETokenizer.from_pretrained(tmp)
        ids, cold_s = timed(lambda: [ours.encode_ordinary(line) for line in lines])
        _, warm_s = timed(lambda: [ours.encode_ordinary(line) for line in lines])
        _, many_s = timed(lambda: list(ours.encode_many(lines, num_workers=None)))
        hf_batch, hf_batch_s = timed(lambda: hf.encode_batch(lines))
        _, hf_one_s = timed(lambda: hf.encode(text))
        n_tokens = sum(map(len, ids))
        hf_tokens = sum(len(e.ids) for e in hf_batch)
        out[f"vocab_{vocab_size}"] = {
            "ours_vocab": len(ours),
            "train_s": round(ours_train_s, 3),
            "hf_train_s": round(hf_train_s, 3),
            "train_time_ratio": round(ours_train_s / hf_train_s, 2),
            "encode_mb_s_1proc_cold": round(n_mb / cold_s, 2),
            "encode_mb_s_1proc_warm": round(n_mb / warm_s, 2),
            "encode_mb_s_all_cores": round(n_mb / many_s, 2),
            "hf_encode_batch_mb_s": round(n_mb / hf_batch_s, 2),
            "hf_encode_one_call_mb_s": round(n_mb / hf_one_s, 2),
            "encode_speed_ratio_cold_vs_hf_batch": round(hf_batch_s / cold_s, 3),
            "encode_speed_ratio_all_cores_vs_hf_batch": round(hf_batch_s / many_s, 3),
            # +1 per line: the newline </s> stands for
            "bytes_per_token": round(n_mb * 1e6 / (n_tokens + len(lines)), 3),
            "hf_bytes_per_token": round(n_mb * 1e6 / (hf_tokens + len(lines)), 3),
        }
    return out


def bench_saved(folder: str, lines: list[str], rounds: int = 5) -> dict:
    """A saved tokenizer (the one the pipeline trains and serves), freshly loaded each round, encoding ``lines`` in
    one process: the server's and the data pipeline's path. Median MB/s of the rounds, cold (empty pre-token cache)
    and warm (the same lines again)."""
    n_mb = sum(len(line.encode("utf-8")) + 1 for line in lines) / 1e6
    cold, warm = [], []
    for _ in range(rounds):
        tokenizer = ByteLevelBPETokenizer.from_pretrained(folder)
        cold.append(timed(lambda: [tokenizer.encode_ordinary(line) for line in lines])[1])
        warm.append(timed(lambda: [tokenizer.encode_ordinary(line) for line in lines])[1])
    return {"tokenizer_dir": folder, "vocab": len(tokenizer), "megabytes": round(n_mb, 3), "rounds": rounds,
            "encode_mb_s_1proc_cold_median": round(n_mb / statistics.median(cold), 2),
            "encode_mb_s_1proc_warm_median": round(n_mb / statistics.median(warm), 2)}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_tokenizer", __doc__)
    parser.add_argument("--input", default="data/pretrain/train.txt", help="UTF-8 corpus, one document per line")
    parser.add_argument("--slice_mb", type=cli.positive_float, default=1.0, help="size of the small slice in MB")
    parser.add_argument("--tokenizer_dir", help="also a saved tokenizer (e.g. models/bpe_tokenizer) encoding --input, "
                        "freshly loaded each of 5 rounds")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag or a missing --input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer_dir and not os.path.isfile(os.path.join(args.tokenizer_dir, "vocab.json")):
        raise cli.UsageError(f"--tokenizer_dir {args.tokenizer_dir} holds no saved tokenizer (vocab.json)")
    with open(args.input, encoding="utf-8") as f:
        all_lines = f.read().splitlines()
    small, size = [], 0
    for line in all_lines:
        if size >= args.slice_mb * 1e6:
            break
        small.append(line)
        size += len(line.encode("utf-8")) + 1
    result = {
        "cpu_cores": os.cpu_count(),
        "input": args.input,
        "slice_1mb": bench_slice(small, (1024, 8192)),
        "whole_file": bench_slice(all_lines, (1024, 8192)),
    }
    if args.tokenizer_dir:
        result["saved_tokenizer"] = bench_saved(args.tokenizer_dir, all_lines)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
