"""Classification finetuning on the demo task: held-out accuracy and wall time of the default command, with baselines.

    pretrained (models/pretrain/pretrain_best.pth, trained first with `python pretrain_trainer.py` if missing)
      -> python finetune.py --mode classify      (defaults: data/classify/{train,test}.jsonl, ~600 steps)
      -> held-out accuracy, per-class recall of classify_best.pth (evaluator.evaluate_classification)

Baselines measured in the same run on the same split: the majority class, and a bag-of-character-n-gram naive
Bayes (1- to 3-grams, add-one smoothing; the usual strong text-classification baseline, here in a few lines of
Python). ``--scratch`` also trains the same classifier from a random initialisation with the same settings, to show
what pretraining adds. Prints ONE JSON line.

    python -m benchmarks.bench_classify [--pretrained models/pretrain/pretrain_best.pth] [--num_threads 2] [--scratch]
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import checkpoints
import cli
from benchmarks.cli_options import benchmark_parser
from gpt_model import GPTModel
from readers import load_classification_records

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "classify" / "train.jsonl"
TEST = ROOT / "data" / "classify" / "test.jsonl"


def run(args: list[str]) -> float:
    """Run one CLI command from the project root; returns its wall seconds (fails loudly)."""
    start = time.time()
    print("$ python " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - start, 1)


def char_ngrams(text: str, n_max: int = 3) -> Counter:
    return Counter(text[i:i + n] for n in range(1, n_max + 1) for i in range(len(text) - n + 1))


def naive_bayes_accuracy(train: list[dict], test: list[dict]) -> float:
    """Multinomial naive Bayes on character 1-3-grams with add-one smoothing."""
    counts: dict[str, Counter] = {}
    for r in train:
        counts.setdefault(r["label"], Counter()).update(char_ngrams(r["text"]))
    vocab = set().union(*counts.values())
    priors = Counter(r["label"] for r in train)
    totals = {label: sum(c.values()) + len(vocab) for label, c in counts.items()}

    def predict(text: str) -> str:
        grams = char_ngrams(text)
        return max(counts, key=lambda label: math.log(priors[label]) + sum(
            n * math.log((counts[label][g] + 1) / totals[label]) for g, n in grams.items()))

    return sum(predict(r["text"]) == r["label"] for r in test) / len(test)


def finetuned(pretrained: Path, output_dir: Path, num_threads: int) -> dict:
    """Train with the default command; accuracy and per-class recall of classify_best.pth on the test split."""
    import evaluator

    seconds = run(["finetune.py", "--mode", "classify", "--pretrained_model", str(pretrained),
                   "--output_dir", str(output_dir), "--num_threads", str(num_threads)])
    model, tokenizer = checkpoints.load_model_and_tokenizer(output_dir / "classify_best.pth", device="cpu")
    report = evaluator.GPTEvaluator(model, tokenizer, show_progress=False).evaluate_classification(TEST)
    steps = checkpoints.checkpoint_metadata(output_dir / "classify_best.pth")["step"]
    return {"accuracy": round(report["accuracy"], 4), "wall_seconds": seconds, "best_step": steps,
            "recall": {k.removeprefix("recall/"): round(v, 3) for k, v in report.items() if k.startswith("recall/")},
            "confusion_matrix": report["confusion_matrix"], "labels": report["labels"]}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_classify", __doc__)
    parser.add_argument("--pretrained", default="models/pretrain/pretrain_best.pth",
                        help="the pretrained model (trained with the default `python pretrain_trainer.py` if missing)")
    parser.add_argument("--workdir", default="models/bench_classify", help="where the runs write their outputs")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads of the training run")
    parser.add_argument("--scratch", action="store_true", help="also train from a random initialisation")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    pretrained, work = ROOT / args.pretrained, ROOT / args.workdir
    out: dict = {"torch": torch.__version__, "threads": args.num_threads}
    if not pretrained.exists():
        out["pretrain_seconds"] = run(["pretrain_trainer.py", "--samples", "0", "--output_dir", str(pretrained.parent)])
    train, test = load_classification_records(TRAIN), load_classification_records(TEST)
    out["n_train"], out["n_test"] = len(train), len(test)
    out["majority_baseline"] = round(max(Counter(r["label"] for r in test).values()) / len(test), 4)
    out["naive_bayes_char_ngram_accuracy"] = round(naive_bayes_accuracy(train, test), 4)
    result = finetuned(pretrained, work / "pretrained", args.num_threads)
    out["accuracy"], out["wall_seconds"] = result["accuracy"], result["wall_seconds"]
    out["finetuned"] = result
    if args.scratch:
        scratch = work / "scratch_init" / "pretrain_best.pth"
        base, tokenizer = checkpoints.load_model_and_tokenizer(pretrained, device="cpu")
        torch.manual_seed(0)
        checkpoints.save_checkpoint(scratch, GPTModel(base.config), tokenizer_fingerprint=tokenizer.fingerprint)
        tokenizer.save(scratch.parent / "tokenizer")
        out["from_scratch"] = finetuned(scratch, work / "scratch", args.num_threads)
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
