"""Does DPO's β trade preference accuracy against exact match? One DPO run per β from the same SFT model.

`python finetune.py --mode dpo --dpo_beta B` runs once per β with every other setting at its default; each run's
``dpo_best.pth`` is then measured as bench_finetune measures DPO: held-out implicit-reward preference accuracy and
held-out greedy exact match (overall and per family), beside the SFT model's own exact match.

    python -m benchmarks.bench_dpo_beta [--sft_model models/bench_finetune/sft/sft_best.pth] [--betas 0.1 0.5 2]

Prints ONE JSON line.
"""
from __future__ import annotations

import json
import sys

import cli
from benchmarks.bench_finetune import ROOT, dpo_accuracy, exact_match, train
from benchmarks.cli_options import benchmark_parser


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_dpo_beta", __doc__)
    parser.add_argument("--sft_model", default="models/bench_finetune/sft/sft_best.pth",
                        help="the SFT model DPO starts from (and its frozen reference)")
    parser.add_argument("--betas", type=cli.positive_float, nargs="+", default=[0.1, 0.3, 0.5, 1.0, 2.0],
                        help="β values to try")
    parser.add_argument("--workdir", default="models/bench_dpo_beta", help="where each run writes its outputs")
    parser.add_argument("--reuse", action="store_true", help="measure runs already in --workdir instead of rerunning")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    sft = ROOT / args.sft_model
    out: dict = {"sft_model": args.sft_model, "sft_exact_match": exact_match(sft)}
    for beta in args.betas:
        checkpoint = ROOT / args.workdir / f"beta{beta:g}" / "dpo_best.pth"
        seconds = train(args, checkpoint, ["finetune.py", "--mode", "dpo", "--sft_model", str(sft),
                                           "--dpo_beta", str(beta), "--output_dir", str(checkpoint.parent)])
        out[f"beta{beta:g}"] = {"seconds": seconds, "preference_accuracy": round(dpo_accuracy(checkpoint, sft), 4),
                                "exact_match": exact_match(checkpoint)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
