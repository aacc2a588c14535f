"""Does GRPO gain on sums once the SFT model has room? The demo data plus three-digit sums, from several pretrained
models.

With every two-digit train sum in the SFT data, held-out two-digit sums reach 0.99+ after SFT and GRPO has nothing to
fix. Here the committed data gets three-digit sums (100-999 + 100-999, the same prompt): ``--train_sums`` of them
join the SFT data, ``--test_sums`` the held-out file (task ``arithmetic3``, so they are reported apart) and 3,000
others are GRPO's prompts, sums neither SFT nor the test file holds. For each pretrained model:
``finetune.py --mode sft`` on that data, then ``finetune.py --mode rlvf`` per seed on the three-digit prompts (200
steps; held-out figures on the first 300 records of the shuffled test file pick ``rlvf_best.pth``), and optionally
GRPO at other learning rates with a warmup (``--lr_runs``). Every checkpoint's held-out greedy exact match, per family.

    python -m benchmarks.bench_rlvf_room --pretrained main=models/pretrain/pretrain_best.pth \
        other=/path/to/another/pretrain_best.pth [--seeds 0 1 2] [--lr_runs 1e-4 5e-5] [--num_threads 1]

Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import cli
from benchmarks.bench_finetune import ROOT, exact_match, train
from benchmarks.bench_rlvf_lr import summary
from benchmarks.cli_options import benchmark_parser
from data.sft.build_sft_data import arithmetic_example

RL_SUMS = 3000
RL_STEPS = 200


def build_data(out: Path, train_sums: int, test_sums: int) -> dict[str, Path]:
    """The committed SFT data + three-digit sums: SFT records, held-out records (as is, and shuffled), RL prompts."""
    rng = random.Random(7)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < train_sums + test_sums + RL_SUMS:
        pairs.add((rng.randint(100, 999), rng.randint(100, 999)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)

    def records(chunk: list[tuple[int, int]], task: str = "arithmetic") -> list[dict[str, str]]:
        return [{"instruction": e.instruction, "response": e.response, "task": task}
                for e in (arithmetic_example(a, b) for a, b in chunk)]

    train = json.loads((ROOT / "data/sft/sft_data.json").read_text(encoding="utf-8"))
    train += records(ordered[test_sums:test_sums + train_sums])
    rng.shuffle(train)
    test = json.loads((ROOT / "data/sft/sft_test.json").read_text(encoding="utf-8"))
    test += records(ordered[:test_sums], "arithmetic3")
    shuffled = list(test)
    random.Random(0).shuffle(shuffled)  # GRPO evaluates the first 300 held-out records: a mix of every family
    files = {"sft": train, "test": test, "test_shuffled": shuffled, "rl": records(ordered[test_sums + train_sums:])}
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.json" for name in files}
    for name, rows in files.items():
        paths[name].write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return paths


def named_path(text: str) -> tuple[str, str]:
    """argparse type: NAME=PATH, both non-empty."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_rlvf_room", __doc__)
    parser.add_argument("--pretrained", type=named_path, nargs="+", required=True, metavar="NAME=PATH",
                        help="pretrained models to start SFT from, each named")
    parser.add_argument("--train_sums", type=cli.nonnegative_int, default=5000, help="three-digit sums in the SFT data")
    parser.add_argument("--test_sums", type=cli.positive_int, default=500, help="three-digit sums in the held-out file")
    parser.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1, 2],
                        help="seeds of the GRPO runs")
    parser.add_argument("--lr_runs", type=cli.positive_float, nargs="*", default=[],
                        help="GRPO learning rates to try with --warmup_steps 20 (seed 0, from the last model)")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads of every run")
    parser.add_argument("--workdir", default="models/bench_rlvf_room", help="where the data and every run go")
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --workdir instead of rerunning")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    work = ROOT / args.workdir
    data = build_data(work / "data", args.train_sums, args.test_sums)
    threads = ["--num_threads", str(args.num_threads)] if args.num_threads else []

    def stage(checkpoint: Path, command: list[str]) -> float | None:
        return train(args, checkpoint, [*command, "--output_dir", str(checkpoint.parent), *threads])

    def rlvf(sft: Path, checkpoint: Path, seed: int, *extra: str) -> dict:
        seconds = stage(checkpoint, ["finetune.py", "--mode", "rlvf", "--sft_model", str(sft), "--seed", str(seed),
                                     "--max_steps", str(RL_STEPS), "--data_path", str(data["rl"]),
                                     "--test_data_path", str(data["test_shuffled"]), *extra])
        return {"seconds": seconds, "exact_match": exact_match(checkpoint, data["test"]),
                **summary(checkpoint.parent)}  # the training signal: reward by quarter, groups all alike, ...

    out: dict = {"train_sums": args.train_sums, "test_sums": args.test_sums, "rl_sums": RL_SUMS, "rl_steps": RL_STEPS}
    for name, path in args.pretrained:
        sft = work / f"sft_{name}" / "sft_best.pth"
        seconds = stage(sft, ["finetune.py", "--mode", "sft", "--pretrained_model", path,
                              "--data_path", str(data["sft"]), "--test_data_path", str(data["test"])])
        result = {"pretrained": path, "sft_seconds": seconds, "sft_exact_match": exact_match(sft, data["test"])}
        for seed in args.seeds:
            result[f"rlvf_seed{seed}"] = rlvf(sft, work / f"rlvf_{name}_seed{seed}" / "rlvf_best.pth", seed)
        three_digit = [result[f"rlvf_seed{s}"]["exact_match"]["exact_match/arithmetic3"] for s in args.seeds]
        result["rlvf_arithmetic3_min_max"] = [min(three_digit), max(three_digit)]
        result["rlvf_arithmetic3_gain_mean"] = round(sum(three_digit) / len(three_digit)
                                                     - result["sft_exact_match"]["exact_match/arithmetic3"], 4)
        out[name] = result
    for lr in args.lr_runs:
        checkpoint = work / f"rlvf_{name}_lr{lr:g}_warmup20" / "rlvf_best.pth"
        out[f"{name}_lr{lr:g}_warmup20"] = rlvf(sft, checkpoint, 0, "--lr", str(lr), "--warmup_steps", "20")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
