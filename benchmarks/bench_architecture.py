"""GPT-2's architecture against the modern one (rotary positions, RMSNorm, QK-norm, SwiGLU, grouped-query attention,
no biases) at the same wall clock; prints ONE JSON line.

    python -m benchmarks.bench_architecture                       # 3 seeds x 2 shapes x 105 s + 1 seed x 2 x 4.75 min
    python -m benchmarks.bench_architecture --default_seeds 1,2,3  # every seed on the default run too (~45 minutes)

Every run is ``python pretrain_trainer.py`` as a user runs it (``--optimizer``, AdamW by default: torch's Muon
runs its Newton-Schulz iterations in bf16, which CPUs without bf16 matrix units do 4-12x slower than AdamW's whole
step), on the embedded corpus, scored by its final held-out bits per byte. Two recipes, both counted from process
start as ``--max_minutes`` does:
- nanoGPT's shakespeare_char shape (6 x 384, context 256, batch 8) for ``--short_minutes`` (105 s);
- the command's default run (2 x 128, context 64, batch 16, 4.75 minutes).
The two architectures share every other setting (width, depth, heads, context, batch, optimizer) and alternate run by
run, so that a machine that slows down mid-benchmark slows both alike.
Results: benchmarks/results/bench_architecture.json.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import cli
from benchmarks.bench_optimizer import RECIPES, pretrain_run, spread
from benchmarks.cli_options import benchmark_parser, positive_ints

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_architecture.json"
# the two architectures as pretraining flags: the tiny preset's GPT-2 blocks, or the modern-tiny preset's
ARCHITECTURES = {"gpt2": ["--preset", "tiny"], "modern": ["--preset", "modern-tiny"]}
DEFAULT_LAYERS = ["--n_layers", "2"]  # the default run's depth (pretrain_trainer.DEFAULT_TINY_LAYERS)


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_architecture", __doc__)
    parser.add_argument("--seeds", type=positive_ints(allow_empty=True), default=[1, 2, 3],
                        help="seeds of the short recipe's runs (empty: skip it)")
    parser.add_argument("--default_seeds", type=positive_ints(allow_empty=True), default=[1],
                        help="seeds of the default-run comparison (empty: skip it)")
    parser.add_argument("--short_minutes", type=cli.positive_float, default=1.75, help="the short recipe's budget")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                        help="the optimizer of every run (each at pretraining's default lr for it)")
    parser.add_argument("--output", default=str(RESULTS), help="where the JSON result is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def compare(seeds: list[int], shape: list[str], minutes: float | None, work: Path) -> dict[str, dict]:
    """Each architecture's runs on one recipe, alternating architecture by architecture for each seed."""
    rows: dict[str, list[dict]] = {name: [] for name in ARCHITECTURES}
    for seed in seeds:
        for name, flags in ARCHITECTURES.items():
            rows[name].append(pretrain_run({"architecture": name}, [*flags, *shape], seed, minutes, work))
    return {name: spread(runs) for name, runs in rows.items() if runs}


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not args.seeds and not args.default_seeds:
        raise cli.UsageError("--seeds and --default_seeds are both empty: nothing to run")
    work = Path(tempfile.mkdtemp(prefix="bench_architecture_"))
    # one step first, untimed: the tokenizer (when missing) and the token cache are built once, outside every budget
    pretrain_run({"warmup": 1}, ["--max_steps", "1", *ARCHITECTURES["gpt2"]], 1, None, work)
    optimizer = ["--optimizer", args.optimizer]
    result: dict = {"architectures": ARCHITECTURES, "optimizer": args.optimizer}
    if args.seeds:
        result["nanogpt_shape"] = {"flags": RECIPES["nanogpt"], "minutes": args.short_minutes,
                                   **compare(args.seeds, [*RECIPES["nanogpt"], *optimizer], args.short_minutes, work)}
    if args.default_seeds:
        result["default_run"] = {"flags": DEFAULT_LAYERS, "minutes": 4.75,
                                 **compare(args.default_seeds, [*DEFAULT_LAYERS, *optimizer], None, work)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
