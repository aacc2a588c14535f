"""Build the project's own small benchmark tasks, in the standard benchmark formats, from its embedded held-out data,
so that a model trained on data/ gets a CORE-like score with no download (``evaluator.py --tasks``).

These are not the public benchmarks: they are tasks of the same shape, drawn from text the default pipeline never
trains on, that a model of a few minutes can score above chance on.

- ``hellaswag_local.jsonl`` (HellaSwag's format): a line of the held-out pretraining text (data/pretrain/val.txt) cut
  after half its words; the context is the first half (a play's speaker is the ``activity_label``), the endings are
  the true second half and the second halves of three other held-out lines, shuffled; ``label`` is the true one.
- ``gsm8k_local.jsonl`` (GSM8K's format): the held-out SFT sums (data/sft/sft_test.json), ``question`` the prompt,
  ``answer`` the worked sum ending in ``#### N``.
- ``arc_easy_local.jsonl`` (ARC's format, AI2's shape): the held-out SFT reading tasks (speaker, poem author, next
  line of a poem), the right answer and three answers of other questions of the same family as A-D.

Every choice is drawn with a fixed seed, so a build is byte for byte the same; each file is written atomically.

    python -m data.build_benchmark_tasks [--output_dir data/benchmarks] [--seed 0]
"""
from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cli
from atomic_file import atomic_path
from data.sft.build_sft_data import SPEECH
from readers import DataError, load_sft_records, read_documents

DEFAULT_OUTPUT = Path("data/benchmarks")
DEFAULT_PRETRAIN_VAL = Path("data/pretrain/val.txt")
DEFAULT_SFT_TEST = Path("data/sft/sft_test.json")
FILES = {"hellaswag": "hellaswag_local.jsonl", "gsm8k": "gsm8k_local.jsonl", "arc_easy": "arc_easy_local.jsonl"}
LINE_WORDS = (8, 24)  # held-out lines of 8 to 24 words: both halves say something, and they fit a 64-token context
NUM_CHOICES = 4  # as HellaSwag and most of ARC
SUM = re.compile(r"(\d+) \+ (\d+) = \?$")  # the SFT arithmetic prompt's sum (data.sft.build_sft_data)
READING_TASKS = ("speaker", "poem_author", "poem_next_line")  # held-out SFT families with one right short answer


class BuildError(DataError):
    """The held-out data cannot give the requested tasks."""


@dataclass(frozen=True)
class Sizes:
    """Examples per task (at most; GSM8K and ARC take every held-out question up to it)."""
    hellaswag: int = 300
    gsm8k: int = 500
    arc_easy: int = 300


# ----------------------------------------------------------------------------- the tasks

def split_line(line: str) -> tuple[str, str, str] | None:
    """(activity label, context, true ending) of a held-out line, or None when it is too short or too long: the
    speaker of a speech (``SPEAKER: words``) is the label, the first half of the words the context."""
    speech = SPEECH.match(line)
    speaker, text = (speech.group(1), speech.group(2)) if speech else ("", line)
    words = text.split()
    if not LINE_WORDS[0] <= len(words) <= LINE_WORDS[1]:
        return None
    half = len(words) // 2
    return speaker, " ".join(words[:half]), " ".join(words[half:])


def shuffled_choices(rng: random.Random, right: str, pool: Sequence[str]) -> tuple[list[str], int]:
    """``right`` and NUM_CHOICES - 1 different wrong answers from ``pool``, in random order, and the right one's
    index."""
    wrong: list[str] = []
    for candidate in rng.sample(list(pool), len(pool)):
        if candidate != right and candidate not in wrong:
            wrong.append(candidate)
        if len(wrong) == NUM_CHOICES - 1:
            break
    if len(wrong) < NUM_CHOICES - 1:
        raise BuildError(f"only {len(wrong)} wrong answers differ from {right!r}: the held-out data is too small")
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


def hellaswag_rows(lines: Sequence[str], seed: int, count: int, source: str) -> list[dict[str, Any]]:
    """HellaSwag rows (``ind``, ``activity_label``, ``ctx_a``, ``ctx_b``, ``ctx``, ``endings``, ``label``) from up to
    ``count`` held-out documents; the wrong endings are the true endings of other documents. ``source_id`` is
    ``<file>:<n>``, the n-th document (its line in a .txt)."""
    rng = random.Random(f"hellaswag:{seed}")
    split = [(n, parts) for n, line in enumerate(lines, 1) if (parts := split_line(line))]
    endings = [ending for _, (_, _, ending) in split]
    rows = []
    for n, (label, context, ending) in sorted(rng.sample(split, min(count, len(split))), key=lambda x: x[0]):
        choices, right = shuffled_choices(rng, ending, endings)
        rows.append({"ind": len(rows), "activity_label": label, "ctx_a": context, "ctx_b": "", "ctx": context,
                     "endings": choices, "label": right, "split": "val", "source_id": f"{source}:{n}"})
    return rows


def gsm8k_rows(records: Sequence[dict], count: int) -> list[dict[str, str]]:
    """GSM8K rows: each held-out sum's prompt, and the worked sum ending in ``#### N``."""
    rows = []
    for record in records:
        if record.get("task") != "arithmetic" or len(rows) == count:
            continue
        match = SUM.search(record["instruction"])
        a, b = (int(x) for x in match.groups()) if match else (None, None)
        if match is None or str(a + b) != record["response"].strip():
            raise BuildError(f"arithmetic record {record['instruction']!r} -> {record['response']!r} is not a sum "
                             "of the SFT format: rebuild data/sft with python -m data.sft.build_sft_data")
        rows.append({"question": record["instruction"], "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def arc_rows(records: Sequence[dict], seed: int, count: int) -> list[dict[str, Any]]:
    """ARC rows (AI2's shape) from up to ``count`` held-out reading questions, sampled across the families; the
    wrong choices are the answers of other questions of the same family."""
    rng = random.Random(f"arc_easy:{seed}")
    questions = [r for r in records if r.get("task") in READING_TASKS]
    answers = {task: [r["response"] for r in questions if r["task"] == task] for task in READING_TASKS}
    rows = []
    for i in sorted(rng.sample(range(len(questions)), min(count, len(questions)))):
        record = questions[i]
        choices, right = shuffled_choices(rng, record["response"], answers[record["task"]])
        labels = [chr(ord("A") + k) for k in range(len(choices))]
        rows.append({"id": f"{record['task']}_{i}", "question": {
            "stem": record["instruction"], "choices": [{"text": t, "label": k} for t, k in zip(choices, labels)]},
            "answerKey": labels[right]})
    return rows


# ----------------------------------------------------------------------------- building

def build(pretrain_val: Path, sft_test: Path, output_dir: Path, seed: int, sizes: Sizes) -> dict[str, int]:
    """Write the three task files (each atomically) and return {file name: examples}; everything is read and
    checked before anything is written."""
    records, documents = load_sft_records(sft_test), list(read_documents(pretrain_val))
    tasks = {"hellaswag": hellaswag_rows(documents, seed, sizes.hellaswag, pretrain_val.as_posix()),
             "gsm8k": gsm8k_rows(records, sizes.gsm8k), "arc_easy": arc_rows(records, seed, sizes.arc_easy)}
    for name, rows in tasks.items():
        if not rows:
            source = pretrain_val if name == "hellaswag" else sft_test
            raise BuildError(f"{source} gives no {name} examples: it is not the project's held-out data")
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in tasks.items():
        with atomic_path(output_dir / FILES[name]) as tmp:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return {FILES[name]: len(rows) for name, rows in tasks.items()}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m data.build_benchmark_tasks", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT,
                   help=f"folder the task files are written to ({', '.join(FILES.values())}; each replaced "
                        "atomically, other files left alone)")
    p.add_argument("--pretrain_val", type=Path, default=DEFAULT_PRETRAIN_VAL,
                   help="held-out pretraining text (a .txt of one document per line, or any corpus format): the "
                        "HellaSwag-format task")
    p.add_argument("--sft_test", type=Path, default=DEFAULT_SFT_TEST,
                   help="held-out SFT records: the GSM8K-format (arithmetic) and ARC-format (reading) tasks")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the sampling and the choices' order")
    for name, flag in (("hellaswag", "--hellaswag"), ("gsm8k", "--gsm8k"), ("arc_easy", "--arc_easy")):
        p.add_argument(flag, type=cli.positive_int, default=getattr(Sizes, name),
                       help=f"most {name} examples")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, nothing written (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_output_folder(args.output_dir, "--output_dir")
    # the files this builder writes (earlier builds of them are replaced); never one of the files it reads
    outputs = {f"--output_dir's {name}": args.output_dir / name for name in FILES.values()}
    cli.check_outputs(outputs, [("--pretrain_val", args.pretrain_val), ("--sft_test", args.sft_test)],
                      own=lambda path: True)
    sizes = Sizes(hellaswag=args.hellaswag, gsm8k=args.gsm8k, arc_easy=args.arc_easy)
    for name, count in build(args.pretrain_val, args.sft_test, args.output_dir, args.seed, sizes).items():
        print(f"{args.output_dir / name}: {count} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
