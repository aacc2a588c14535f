"""Muon against AdamW at the same wall clock, lr tuned for each by a small sweep; prints ONE JSON line.

Run from the repository root: ``python -m benchmarks.bench_optimizer [--seeds 0,1,2]`` (about 45 minutes on 2 cores;
results in benchmarks/results/bench_optimizer.json).

Every run is ``python pretrain_trainer.py`` as a user runs it, with ``--optimizer``, ``--lr`` and ``--seed`` set, on
the embedded corpus (the Shakespeare plays and the poems of data/pretrain/train.txt), scored by its final held-out
bits per byte (data/pretrain/val.txt, every token once). ``--recipe`` picks the model: the command's default, or
nanoGPT's shakespeare_char shape (``--recipe nanogpt``: 6 x 384, context 256, batch 8; run it with
``--skip_default_runs`` for the 105 s comparison). Two budgets, both counted from process start as ``--max_minutes``
does:
- the short recipe: 105 s (``--max_minutes 1.75``), first a sweep of ``--adamw_lrs`` / ``--muon_lrs`` with seed
  0, then every seed at each optimizer's best lr;
- the default run (4.75 minutes, the command's default budget) for every seed, each optimizer at its swept lr.
Runs alternate between the optimizers so that a machine that slows down mid-benchmark slows both alike.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cli
from benchmarks.cli_options import benchmark_parser, positive_ints

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_optimizer.json"
SWEEP = {"adamw": "1.5e-3,3e-3,6e-3", "muon": "3e-3,6e-3,1.2e-2"}
# the model each recipe trains: the command's default (2 x 128, context 64, batch 16), or nanoGPT's shakespeare_char
RECIPES = {"default": [], "nanogpt": ["--n_layers", "6", "--d_model", "384", "--n_heads", "6", "--max_seq_len", "256",
                                      "--batch_size", "8"]}


def pretrain_run(label: dict, flags: list[str], seed: int, minutes: float | None, work: Path) -> dict:
    """One ``python pretrain_trainer.py`` run as a user runs it, with ``flags`` and ``--seed``; ``label`` (what the
    run compares: an optimizer and lr, an architecture) plus its summary's steps and final val_bpb."""
    out = work / ("_".join(f"{k}{v}" for k, v in label.items()) + f"_seed{seed}_{minutes or 'default'}")
    argv = [sys.executable, "pretrain_trainer.py", *flags, "--seed", str(seed), "--output_dir", str(out),
            "--samples", "0", "--cache_dir", str(work / "cache")]
    if minutes is not None:
        argv += ["--max_minutes", str(minutes)]
    start = time.perf_counter()
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} failed: {run.stderr[-1500:]}")
    summary = next(json.loads(line) for line in run.stdout.splitlines() if line.startswith("{"))
    row = {**label, "seed": seed, "minutes": minutes or 4.75, "steps": summary["steps"],
           "val_bpb": summary["val_bpb"], "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(row), file=sys.stderr)
    return row


def pretrain(optimizer: str, lr: float, seed: int, minutes: float | None, work: Path, shape: list[str]) -> dict:
    """One pretraining run with ``--optimizer`` and ``--lr``; its summary (steps, final val_bpb, ...)."""
    return pretrain_run({"optimizer": optimizer, "lr": lr}, ["--optimizer", optimizer, "--lr", str(lr), *shape],
                        seed, minutes, work)


def spread(rows: list[dict]) -> dict:
    values = [r["val_bpb"] for r in rows]
    return {"mean": round(statistics.mean(values), 4), "min": min(values), "max": max(values), "runs": values,
            "steps": [r["steps"] for r in rows]}


def float_list(text: str) -> list[float]:
    return [cli.positive_float(part) for part in text.split(",")]


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_optimizer", __doc__)
    parser.add_argument("--seeds", type=positive_ints(), default=[1, 2, 3], help="seeds of the compared runs")
    parser.add_argument("--default_seeds", type=positive_ints(), default=None,
                        help="seeds of the default-budget runs (default: --seeds)")
    parser.add_argument("--short_minutes", type=cli.positive_float, default=1.75, help="the short recipe's budget")
    for name, lrs in SWEEP.items():
        parser.add_argument(f"--{name}_lrs", type=float_list, default=float_list(lrs),
                            help=f"the lrs swept for {name} (comma-separated)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                        help="the model trained: the command's default, or nanoGPT's shakespeare_char shape (6 x 384, "
                             "context 256, batch 8)")
    parser.add_argument("--skip_default_runs", action="store_true", help="only the short budget")
    parser.add_argument("--output", default=str(RESULTS), help="where the JSON result is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_optimizer_"))
    sweeps, shape = {"adamw": args.adamw_lrs, "muon": args.muon_lrs}, RECIPES[args.recipe]
    sweep_rows = []
    for i in range(max(map(len, sweeps.values()))):  # alternating: adamw lr i, muon lr i, ...
        for name, lrs in sweeps.items():
            if i < len(lrs):
                sweep_rows.append(pretrain(name, lrs[i], args.seeds[0], args.short_minutes, work, shape))
    best = {name: min((r for r in sweep_rows if r["optimizer"] == name), key=lambda r: r["val_bpb"])["lr"]
            for name in sweeps}
    short = {name: [r for r in sweep_rows if r["optimizer"] == name and r["lr"] == best[name]] for name in sweeps}
    default: dict[str, list[dict]] = {name: [] for name in sweeps}
    default_seeds = args.seeds if args.default_seeds is None else args.default_seeds
    for seed in sorted(set(args.seeds) | set(default_seeds)):
        for name in sweeps:
            if seed != args.seeds[0] and seed in args.seeds:
                short[name].append(pretrain(name, best[name], seed, args.short_minutes, work, shape))
            if not args.skip_default_runs and seed in default_seeds:
                default[name].append(pretrain(name, best[name], seed, None, work, shape))
    result = {"recipe": args.recipe, "model_flags": shape, "best_lr": best, "sweep": sweep_rows,
              "short_recipe": {name: spread(rows) for name, rows in short.items()},
              "default_run": {name: spread(rows) for name, rows in default.items() if rows}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
