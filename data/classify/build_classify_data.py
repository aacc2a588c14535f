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
text and no document is in both.

    python data/classify/build_classify_data.py [--seed 0] [--output_dir data/classify]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make atomic_file importable
from atomic_file import atomic_path  # noqa: E402

DEFAULT_OUTPUT = Path("data/classify")
DEFAULT_CORPUS = Path("data/pretrain/train.txt")
LABELS = ("speech", "poem", "zh_5char", "zh_7char")
TITLED_POEM = re.compile(r"^《[^》]+》\S* \S+?：(.+)$")  # 《title》[其二] author：lines
SPEECH = re.compile(r"^([A-Z][A-Z'\- ]*[A-Z]): (.+)$")  # SPEAKER: speech
CJK = re.compile(r"[\u4e00-\u9fff]")
LINE_BREAK = re.compile(r"[，。？！；：、\s]+")
WINDOW_WORDS = 24  # English excerpt length; ~30-40 tokens, well inside the default 64-token context
WINDOWS_PER_DOC = 3  # at most this many excerpts of one poem stanza or Chinese poem
TEST_FRACTION = 0.2
MAX_PER_CLASS = 1200  # train + test excerpts per class (speeches are plentiful; the poems give fewer)


class BuildError(ValueError):
    """The corpus is missing or cannot give the requested data."""


def chinese_lines(doc: str) -> list[str]:
    """The verse lines of a Chinese poem document (title and poet dropped)."""
    match = TITLED_POEM.match(doc)
    body = match.group(1) if match else doc
    return [line for line in LINE_BREAK.split(body) if line]


def english_windows(text: str, rng: random.Random, max_windows: int) -> list[str]:
    """Up to ``max_windows`` non-overlapping excerpts of exactly WINDOW_WORDS words, at a random offset."""
    words = text.split()
    n = len(words) // WINDOW_WORDS
    if n == 0:
        return []
    start = rng.randrange(len(words) - n * WINDOW_WORDS + 1)
    windows = [" ".join(words[start + i * WINDOW_WORDS:start + (i + 1) * WINDOW_WORDS]) for i in range(n)]
    return rng.sample(windows, min(max_windows, n))


def couplets(lines: list[str], rng: random.Random, max_windows: int) -> list[str]:
    pairs = [f"{lines[i]}，{lines[i + 1]}。" for i in range(0, len(lines) - 1, 2)]
    return rng.sample(pairs, min(max_windows, len(pairs)))


def documents_by_class(corpus: Path) -> dict[str, list[str]]:
    """Source documents of each class: speeches (speaker removed), poem stanzas, 5- and 7-character poems."""
    if not corpus.is_file():
        raise BuildError(f"corpus {corpus} not found; pass --corpus data/pretrain/train.txt")
    docs: dict[str, list[str]] = {label: [] for label in LABELS}
    for doc in corpus.read_text(encoding="utf-8").splitlines():
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


def excerpts(label: str, doc: str, rng: random.Random) -> list[str]:
    if label == "speech":
        return english_windows(doc, rng, 1)
    if label == "poem":
        return english_windows(doc, rng, WINDOWS_PER_DOC)
    return couplets(chinese_lines(doc), rng, WINDOWS_PER_DOC)


def build_records(corpus: Path, seed: int, max_per_class: int = MAX_PER_CLASS) -> tuple[list[dict], list[dict]]:
    """(train, test) records {"text", "label"}: each class's documents are split first, then cut into excerpts."""
    rng = random.Random(seed)
    train, test = [], []
    for label, docs in documents_by_class(corpus).items():
        docs = sorted(set(docs))
        rng.shuffle(docs)
        per_doc = [(doc, excerpts(label, doc, rng)) for doc in docs]
        per_doc = [(doc, texts) for doc, texts in per_doc if texts]
        total = sum(len(texts) for _, texts in per_doc)
        budget = min(total, max_per_class)
        n_test = round(budget * TEST_FRACTION)
        taken: list[list[str]] = [[], []]  # test, train
        for _, texts in per_doc:
            split = 0 if len(taken[0]) < n_test else 1
            room = (n_test if split == 0 else budget - n_test) - len(taken[split])
            if room <= 0 and split == 1:
                break
            taken[split] += texts[:max(room, 0)]
        test += [{"text": t, "label": label} for t in taken[0]]
        train += [{"text": t, "label": label} for t in taken[1]]
    seen = {r["text"] for r in train}
    test = [r for r in test if r["text"] not in seen]  # a line quoted in two documents must not leak
    train = list({r["text"]: r for r in train}.values())
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build(corpus: Path, output_dir: Path, seed: int, max_per_class: int = MAX_PER_CLASS) -> dict[str, Counter]:
    """Write train.jsonl and test.jsonl; returns the number of records per label in each."""
    train, test = build_records(corpus, seed, max_per_class)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(output_dir / "train.jsonl", train)
    write_jsonl(output_dir / "test.jsonl", test)
    return {"train.jsonl": Counter(r["label"] for r in train), "test.jsonl": Counter(r["label"] for r in test)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the document split and the excerpt offsets")
    p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help="folder train.jsonl / test.jsonl go to")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the pretraining corpus, one document per line")
    p.add_argument("--max_per_class", type=int, default=MAX_PER_CLASS,
                   help="at most this many excerpts per class (train + test)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_per_class < 5:
        print("error: --max_per_class must be >= 5 (each class needs train and test excerpts)", file=sys.stderr)
        sys.exit(2)
    try:
        counts = build(args.corpus, args.output_dir, args.seed, args.max_per_class)
    except (BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for name, per_label in counts.items():
        labels = ", ".join(f"{label} {per_label[label]}" for label in LABELS)
        print(f"{args.output_dir / name}: {sum(per_label.values())} records ({labels})")


if __name__ == "__main__":
    main()
