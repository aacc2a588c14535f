"""Multi-turn chat learning: the default SFT (the committed data, its dialogues included) from one pretrained model,
once per seed, scored on the held-out dialogues and on the single-turn test file.

    python -m benchmarks.bench_chat --pretrained models/pretrain/pretrain_best.pth --seeds 0,1,2
    python -m benchmarks.bench_chat --reuse          # score the runs already in --workdir again

Per seed: exact match of every assistant turn of data/sft/chat_test.json (arithmetic dialogues: a sum, then two
follow-ups on the running total; author dialogues: the poet, then the surname), with the model's own earlier answers
in the history (as in a chat) and with the reference answers (teacher-forced); and single-turn exact match per
family on data/sft/sft_test.json. The mean and spread over seeds of each figure. Prints one JSON line.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import checkpoints
import cli
import finetune_stages
from benchmarks.cli_options import benchmark_parser
from decoding import SamplingParams
from evaluator import GPTEvaluator

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEST = ROOT / "data" / "sft" / "chat_test.json"
SINGLE_TEST = ROOT / "data" / "sft" / "sft_test.json"


def sft(pretrained: Path, output: Path, seed: int, threads: int) -> float:
    """`python finetune.py --mode sft` with its defaults and this seed; wall seconds."""
    command = [sys.executable, "finetune.py", "--mode", "sft", "--pretrained_model", str(pretrained),
               "--output_dir", str(output), "--seed", str(seed), "--num_threads", str(threads)]
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - started, 1)


def scores(checkpoint: Path) -> dict[str, dict[str, float]]:
    """Dialogue exact match per turn (own and reference history) and single-turn exact match per family."""
    loaded = checkpoints.load(checkpoint)
    ev = GPTEvaluator(loaded.model, loaded.tokenizer, show_progress=False, template=loaded.template)
    records = json.loads(CHAT_TEST.read_text(encoding="utf-8"))
    rounded = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    greedy = SamplingParams(max_new_tokens=16, do_sample=False)
    return {"own_history": rounded(ev.dialogue_exact_match(records, greedy, own_history=True)),
            "teacher_forced": rounded(ev.dialogue_exact_match(records, greedy, own_history=False)),
            "single_turn": rounded(finetune_stages.exact_match_report(checkpoint, str(SINGLE_TEST)))}


def summary(runs: dict[int, dict]) -> dict[str, dict[str, list[float]]]:
    """Per measure and key: [mean, min, max] over the seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    first = next(iter(runs.values()))
    for measure, figures in first.items():
        if not isinstance(figures, dict):
            continue
        out[measure] = {}
        for key in figures:
            values = [run[measure][key] for run in runs.values()]
            out[measure][key] = [round(sum(values) / len(values), 4), min(values), max(values)]
    return out


def seed_list(text: str) -> list[int]:
    """argparse type: comma-separated ints >= 0 ("0,1,2")."""
    return [cli.nonnegative_int(part.strip()) for part in text.split(",")]


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_chat", __doc__)
    parser.add_argument("--pretrained", type=Path, default=ROOT / "models" / "pretrain" / "pretrain_best.pth",
                        help="the pretrained checkpoint every SFT run starts from")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated SFT seeds (>= 0)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "models" / "bench_chat",
                        help="where each seed's SFT run is written (sft_seed<N>/)")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads per SFT run")
    parser.add_argument("--reuse", action="store_true", help="score a seed's existing sft_best.pth instead of training")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not args.pretrained.is_file():
        raise cli.UsageError(f"--pretrained {args.pretrained}: no such checkpoint (run python pretrain_trainer.py)")
    torch.set_num_threads(args.num_threads)
    out: dict = {"pretrained": str(args.pretrained), "torch": torch.__version__, "runs": {}}
    for seed in args.seeds:
        folder = args.workdir / f"sft_seed{seed}"
        best = folder / "sft_best.pth"
        seconds = None if args.reuse and best.is_file() else sft(args.pretrained, folder, seed, args.num_threads)
        out["runs"][seed] = {"sft_seconds": seconds, **scores(best)}
    out["summary"] = summary(out["runs"])
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
