"""Which GRPO learning rate learns within the stage's step budget? Judged on the training prompts' reward only.

From an SFT model with room to improve (the 2,500-step one of bench_finetune, arithmetic 0.10 on held-out sums),
`python finetune.py --mode rlvf --lr LR` runs once per learning rate with every other setting at its default; the
verdict is the mean verifier reward of the sampled training answers in the first and last quarter of the steps
(metrics.jsonl), so the choice never looks at the test files. The held-out figures each run logs are reported
beside it, not used.

    python -m benchmarks.bench_rlvf_lr [--sft_model models/bench_finetune/sft_2500/sft_best.pth] [--lrs 2e-5 1e-4]

Prints ONE JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cli
from benchmarks.bench_finetune import ROOT, run
from benchmarks.cli_options import benchmark_parser


def quarters(rows: list[dict], key: str) -> list[float]:
    """Mean of ``key`` over each quarter of the training rows (0 where a step trained on no row)."""
    k = max(1, len(rows) // 4)
    return [round(sum(r.get(key, 0.0) for r in rows[i * k:(i + 1) * k]) / k, 4) for i in range(4)]


def mean(rows: list[dict], key: str) -> float:
    return round(sum(r[key] for r in rows) / len(rows), 4)


def summary(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r and "val_reward" not in r]
    held_out = [r for r in rows if "val_reward" in r]
    return {"train_reward_by_quarter": quarters(train, "reward"), "kl_by_quarter": quarters(train, "kl"),
            "first_step_kl": round(train[0].get("kl", 0.0), 4),
            "trained_rows_per_step": round(sum(r["trained_rows"] for r in train) / len(train), 1),
            "zero_advantage_groups": mean(train, "zero_advantage_groups"),
            "solved_groups": mean(train, "solved_groups"),
            "held_out_arithmetic_first_last": [round(held_out[i]["val_exact_match/arithmetic"], 4) for i in (0, -1)]}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_rlvf_lr", __doc__)
    parser.add_argument("--sft_model", default="models/bench_finetune/sft_2500/sft_best.pth",
                        help="the SFT model to start from (one with room to improve)")
    parser.add_argument("--lrs", type=cli.positive_float, nargs="+", default=[2e-5, 1e-4, 3e-4],
                        help="learning rates to try")
    parser.add_argument("--workdir", default="models/bench_rlvf_lr", help="where each run writes its outputs")
    parser.add_argument("--reuse", action="store_true", help="summarise runs already in --workdir instead of rerunning")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out: dict = {"sft_model": args.sft_model}
    for lr in args.lrs:
        output_dir = ROOT / args.workdir / f"lr{lr:g}"
        reused = args.reuse and (output_dir / "metrics.jsonl").exists()
        seconds = None if reused else run(["finetune.py", "--mode", "rlvf", "--sft_model", args.sft_model,
                                           "--output_dir", str(output_dir), "--lr", str(lr), "--eval_interval", "50"])
        out[f"lr{lr:g}"] = {"seconds": seconds, **summary(output_dir)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
