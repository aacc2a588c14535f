"""Rebuild data/pretrain/{train,val}.txt from the public-domain sources in ../shared/corpus.

Output convention: one document per line. Shakespeare's plays give one document per speech
(``SPEAKER: speech``), his poems one per sonnet or stanza, and the Chinese poems one per poem
(``《title》 author：lines``). Every 20th document of each work goes to val.txt (5%, spread across works).

    python -m data.build_pretrain_data --corpus ../shared/corpus --output data/pretrain
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

import cli
from atomic_file import atomic_path
from readers import read_lines

VAL_EVERY = 20  # one document in VAL_EVERY is held out
SPEAKER_LINE = re.compile(r"^([A-Z][A-Za-z'\- ]{0,40}?)\.$")
STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
HEADING = re.compile(r"^(ACT|SCENE|Scene|PROLOGUE|EPILOGUE|Prologue|Epilogue|INDUCTION|Induction)\b")
POEMS = {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def blocks(text: str) -> list[list[str]]:
    """Split text into runs of non-blank lines."""
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def persons(text: str) -> dict[str, str]:
    """First words of the dramatis personae, for expanding abbreviated speaker names."""
    head = text.split("ACT I", 1)[0]
    marker = re.search(r"persons represented", head, re.IGNORECASE)
    head = head[marker.end():] if marker else ""
    names = {}
    for line in head.splitlines():
        name = re.split(r"[,.]", line.strip(), maxsplit=1)[0].strip()
        if name and len(name) < 30:
            names[name.upper()] = name.upper()
    return names


def expand_speaker(abbrev: str, names: dict[str, str]) -> str:
    key = abbrev.upper()
    if key in names:
        return key
    matches = sorted(n for n in names if n.startswith(key) or n.split()[-1].startswith(key))
    return matches[0] if len(matches) == 1 else key


def play_documents(text: str) -> list[str]:
    names = persons(text)
    docs = []
    body = text[text.find("\nACT I"):] if "\nACT I" in text else text
    for block in blocks(body):
        match = SPEAKER_LINE.match(block[0].strip())
        if not match or HEADING.match(block[0]) or len(block) < 2:
            continue
        speech = squash(STAGE_DIRECTION.sub(" ", " ".join(block[1:])))
        if speech:
            docs.append(f"{expand_speaker(match.group(1), names)}: {speech}")
    return docs


def poem_documents(text: str) -> list[str]:
    docs = []
    for block in blocks(text)[1:]:  # skip the title block
        lines = [line.strip() for line in block]
        if len(lines) == 1 and (re.fullmatch(r"[IVXLC]+\.?", lines[0]) or lines[0].isupper()):
            continue  # sonnet numbers and headings
        docs.append(squash(" ".join(lines)))
    return [d for d in docs if len(d) > 40]


def chinese_poems(text: str) -> list[str]:
    docs = []
    for block in blocks(text):
        if len(block) < 3:
            continue
        title = re.sub(r"^题目[:：]", "", block[0].strip())
        author = re.sub(r"^作者[:：]", "", block[1].strip())
        author = re.sub(r"（.*?）|\(.*?\)", "", author).strip()
        docs.append(f"{title} {author}：{''.join(line.strip() for line in block[2:])}")
    return docs


class CorpusError(ValueError):
    """The source corpus is missing or yields no documents."""


def build(corpus: Path, output: Path) -> tuple[int, int]:
    """Write train.txt and val.txt (each atomically); refuses before writing anything if the corpus is unusable."""
    plays = sorted((corpus / "shakespeare").glob("*.txt"))
    poems = sorted((corpus / "poetry_zh").glob("*.txt"))
    if not corpus.is_dir() or not (plays or poems):
        raise CorpusError(f"no corpus in {corpus} (expected shakespeare/*.txt and poetry_zh/*.txt): pass --corpus; "
                          f"{output} was left as it was")
    works = [poem_documents(read_text(p)) if p.stem in POEMS else play_documents(read_text(p)) for p in plays]
    works += [chinese_poems(read_text(p)) for p in poems]
    train, val = [], []
    for docs in works:
        for i, doc in enumerate(docs):
            (val if i % VAL_EVERY == VAL_EVERY // 2 else train).append(doc)
    if not train or not val:
        raise CorpusError(f"{corpus} yields {len(train)} train and {len(val)} val documents: it is not the expected "
                          f"corpus layout; {output} was left as it was")
    output.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.txt", train), ("val.txt", val)):
        with atomic_path(output / name) as tmp:
            tmp.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return len(train), len(val)


def read_text(path: Path) -> str:
    """A corpus file's text; a bad byte is one line naming the file and line (``readers.read_lines``)."""
    return "\n".join(read_lines(path)) + "\n"


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m data.build_pretrain_data", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"),
                        help="folder with shakespeare/ and poetry_zh/")
    parser.add_argument("--output", type=Path, default=Path("data/pretrain"),
                        help="where train.txt and val.txt are written (each replaced atomically)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, nothing written (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_output_folder(args.output, "--output")
    # the files this builder writes (earlier builds of them are replaced); never a corpus file it reads
    outputs = {f"--output's {name}": Path(args.output) / name for name in ("train.txt", "val.txt")}
    cli.check_outputs(outputs, [("--corpus", path) for path in Path(args.corpus).rglob("*.txt")], own=lambda path: True)
    n_train, n_val = build(args.corpus, args.output)
    print(f"wrote {n_train} train and {n_val} val documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
