"""Build the classification demo data in data/classify/ from the embedded corpus, deterministically for a seed.

The task: what form of verse is this excerpt? Four classes, all from ``data/pretrain/train.txt``:

- ``speech``: a window of a Shakespeare play speech, the speaker's name removed;
- ``poem``: a window of a Shakespeare sonnet or narrative-poem stanza (Venus and Adonis, Lucrece, ...);
- ``zh_5char``: a couplet of a Chinese poem written in five-character lines (五言), title and poet removed;
- ``zh_7char``: a couplet of a poem in seven-character lines (七言).

English windows have the same number of words in both classes and start at a random word, so neither length nor
the first word gives the class away: a speech in blank verse and a sonnet differ in rhyme, diction and subject.
The two Chinese classes differ only in line length, which a BPE model must infer from tokens that cover one to
three characters each. Train and test come from disjoint source documents (a speech, a poem, a stanza), so no
text and no document is in both. The speeches are capped (2,400 train / 300 test of 25k); the few poems give every
window, half-overlapping in train (augmentation), so the test set is near balanced (majority class ~48%).

    python -m data.classify.build_classify_data [--seed 0] [--output_dir data/classify]
"""
from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cli
from atomic_file import atomic_path
from readers import read_lines

DEFAULT_OUTPUT = Path("data/classify")
DEFAULT_CORPUS = Path("data/pretrain/train.txt")
LABELS = ("speech", "poem", "zh_5char", "zh_7char")
TITLED_POEM = re.compile(r"^《[^》]+》\S* \S+?：(.+)$")  # 《title》[其二] author：lines
SPEECH = re.compile(r"^([A-Z][A-Z'\- ]*[A-Z]): (.+)$")  # SPEAKER: speech
CJK = re.compile(r"[\u4e00-\u9fff]")
LINE_BREAK = re.compile(r"[，。？！；：、\s]+")
WINDOW_WORDS = 32  # English excerpt length: median ~46 tokens, within the default 64-token context
COUPLETS_PER_POEM = 3  # at most this many couplets of one Chinese poem (long ballads would dominate)
TEST_FRACTION = 0.2  # of each class's source documents
MAX_TRAIN, MAX_TEST = 2400, 300  # excerpts per class: caps the speeches (25k); the poems give fewer


class BuildError(ValueError):
    """The corpus is missing or cannot give the requested data."""


def chinese_lines(doc: str) -> list[str]:
    """The verse lines of a Chinese poem document (title and poet dropped)."""
    match = TITLED_POEM.match(doc)
    body = match.group(1) if match else doc
    return [line for line in LINE_BREAK.split(body) if line]


def english_windows(text: str, rng: random.Random, max_windows: int, stride: int = WINDOW_WORDS) -> list[str]:
    """Up to ``max_windows`` excerpts of exactly WINDOW_WORDS words, ``stride`` words apart from a random offset."""
    words = text.split()
    span = len(words) - WINDOW_WORDS  # the last possible start
    if span < 0:
        return []
    starts = list(range(rng.randrange(span % stride + 1), span + 1, stride))
    chosen = sorted(rng.sample(starts, min(max_windows, len(starts))))
    return [" ".join(words[s:s + WINDOW_WORDS]) for s in chosen]


def couplets(lines: list[str], rng: random.Random, max_windows: int) -> list[str]:
    pairs = [f"{lines[i]}，{lines[i + 1]}。" for i in range(0, len(lines) - 1, 2)]
    return rng.sample(pairs, min(max_windows, len(pairs)))


def documents_by_class(corpus: Path) -> dict[str, list[str]]:
    """Source documents of each class: speeches (speaker removed), poem stanzas, 5- and 7-character poems."""
    if not corpus.is_file():
        raise BuildError(f"corpus {corpus} not found; pass --corpus data/pretrain/train.txt")
    docs: dict[str, list[str]] = {label: [] for label in LABELS}
    for doc in read_lines(corpus):  # a bad byte names the file and line
        if not doc.strip():
            continue
        if CJK.search(doc):
            lengths = {len(line) for line in chinese_lines(doc)}
            if lengths in ({5}, {7}):  # regular verse only; mixed line lengths (ci, irregular) are left out
                docs[f"zh_{lengths.pop()}char"].append(doc)
        elif match := SPEECH.match(doc):
            docs["speech"].append(match.group(2))
        else:
            docs["poem"].append(doc)
    for label, found in docs.items():
        if not found:
            raise BuildError(f"{corpus} gives no {label!r} documents; use the pretraining corpus")
    return docs


def excerpts(label: str, doc: str, rng: random.Random, train: bool) -> list[str]:
    """One window of a speech; every window of a poem (half-overlapping in train, as augmentation: the poems are
    few); up to COUPLETS_PER_POEM couplets of a Chinese poem."""
    if label == "speech":
        return english_windows(doc, rng, 1)
    if label == "poem":
        return english_windows(doc, rng, len(doc), WINDOW_WORDS // 2 if train else WINDOW_WORDS)
    return couplets(chinese_lines(doc), rng, COUPLETS_PER_POEM)


def build_records(corpus: Path, seed: int, max_train: int = MAX_TRAIN,
                  max_test: int = MAX_TEST) -> tuple[list[dict], list[dict]]:
    """(train, test) records {"text", "label"}: each class's documents are split first, then cut into excerpts."""
    rng = random.Random(seed)
    train, test = [], []
    for label, docs in documents_by_class(corpus).items():
        docs = sorted(set(docs))
        rng.shuffle(docs)
        n_test = max(1, round(len(docs) * TEST_FRACTION))
        splits = ((docs[:n_test], test, max_test, False), (docs[n_test:], train, max_train, True))
        for part, out, cap, is_train in splits:
            texts: list[str] = []
            for doc in part:
                if len(texts) >= cap:
                    break
                texts += excerpts(label, doc, rng, is_train)
            out += [{"text": t, "label": label} for t in texts[:cap]]
    seen = {r["text"] for r in train}
    test = list({r["text"]: r for r in test if r["text"] not in seen}.values())  # a line quoted twice must not leak
    train = list({r["text"]: r for r in train}.values())
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build(corpus: Path, output_dir: Path, seed: int, max_train: int = MAX_TRAIN,
          max_test: int = MAX_TEST) -> dict[str, Counter]:
    """Write train.jsonl and test.jsonl; returns the number of records per label in each."""
    train, test = build_records(corpus, seed, max_train, max_test)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(output_dir / "train.jsonl", train)
    write_jsonl(output_dir / "test.jsonl", test)
    return {"train.jsonl": Counter(r["label"] for r in train), "test.jsonl": Counter(r["label"] for r in test)}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m data.classify.build_classify_data", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="seed of the document split and the excerpt offsets")
    p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="folder train.jsonl / test.jsonl go to")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the pretraining corpus, one document per line")
    p.add_argument("--max_train", type=cli.positive_int, default=MAX_TRAIN,
                   help="at most this many train excerpts per class")
    p.add_argument("--max_test", type=cli.positive_int, default=MAX_TEST,
                   help="at most this many test excerpts per class")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, nothing written (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_output_folder(args.output_dir, "--output_dir")
    # the files this builder writes (earlier builds of them are replaced); never the corpus it reads
    outputs = {f"--output_dir's {name}": args.output_dir / name for name in ("train.jsonl", "test.jsonl")}
    cli.check_outputs(outputs, [("--corpus", args.corpus)], own=lambda path: True)
    counts = build(args.corpus, args.output_dir, args.seed, args.max_train, args.max_test)
    for name, per_label in counts.items():
        labels = ", ".join(f"{label} {per_label[label]}" for label in LABELS)
        print(f"{args.output_dir / name}: {sum(per_label.values())} records ({labels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
