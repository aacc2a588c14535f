"""Convert chat data in the common formats into the project's SFT records: one {"messages": [...]} per line.

    python -m data.convert_chat sharegpt.json chat.jsonl
    python -m data.convert_chat data/hf/HuggingFaceTB/smoltalk smoltalk.jsonl --skip_bad
    python finetune.py --mode sft --data_path chat.jsonl

Inputs are .json lists, .jsonl files or .parquet files (or folders of them), read by ``readers.read_records``. Each
file's format is told from its first record (or forced with ``--format``):

- ``sharegpt``: ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}`` (``role`` /
  ``content`` keys inside are read too, and a top-level ``"system"`` string becomes the system message);
- ``alpaca``: ``{"instruction", "input" (optional), "output", "system" (optional)}``; the input joins the
  instruction on its own line, as ``prompts.record_instruction`` joins it for every SFT record;
- ``messages``: OpenAI's ``{"messages": [{"role", "content"}, ...]}``, checked and passed through (a content list
  of text parts is joined).

Roles map onto the chat format's: human/user -> user, gpt/assistant/chatgpt/model -> assistant, system/developer
stay, a function call -> assistant (the model learns to write it), a tool's or function's result (tool,
observation, function) -> user (read, never scored). Messages after the last assistant message are dropped (there is
no answer to learn from them). Each record must then pass the check ``finetune.py`` applies
(``readers.check_messages``); one that does not is one error line naming file and line (or row), or, with
``--skip_bad``, is counted and reported.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

import cli
from atomic_file import atomic_path
from prompts import record_instruction
from readers import DataError, check_messages, read_records, record_count

RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "model": "assistant", "system": "system", "developer": "developer", "function_call": "assistant",
         "tool": "user", "observation": "user", "function": "user"}
FORMATS = ("sharegpt", "alpaca", "messages")


class RecordError(ValueError):
    """A record that is not a usable conversation (the caller adds where it is)."""


# ----------------------------------------------------------------------------- one record

def _content(value: Any, index: int) -> str:
    """A message's text: a string, or a list of text parts (OpenAI's newer content form) joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RecordError(f"message {index}: the content must be a string (or a list of text parts), "
                      f"got {type(value).__name__}")


def _messages(turns: Any, field_name: str) -> list[dict]:
    """The ``{"role", "content"}`` messages of a list of turns written with from/value or role/content keys."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{field_name!r} must be a non-empty list of messages")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"message {index} is a {type(turn).__name__}, not an object")
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        role = turn.get(role_key)
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise RecordError(f"message {index}: unknown role {role!r} (known: {', '.join(ROLES)})")
        out.append({"role": ROLES[role.lower()], "content": _content(turn.get(content_key), index)})
    return out


def _system(record: dict) -> list[dict]:
    """A top-level "system" string as the conversation's system message."""
    system = record.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise RecordError(f"\"system\" must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}]


def from_sharegpt(record: dict) -> list[dict]:
    return _system(record) + _messages(record.get("conversations"), "conversations")


def from_alpaca(record: dict) -> list[dict]:
    answer = record.get("output", record.get("response"))
    for key, value in (("instruction", record.get("instruction")), ("output", answer)):
        if not isinstance(value, str):
            raise RecordError(f"{key!r} must be a string, got {type(value).__name__}")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError(f"\"input\" must be a string, got {type(extra).__name__}")
    user = record_instruction({"instruction": record["instruction"], "input": extra})
    return _system(record) + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def from_messages(record: dict) -> list[dict]:
    return _messages(record.get("messages"), "messages")


CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "sharegpt": from_sharegpt, "alpaca": from_alpaca, "messages": from_messages}


def detect(record: Any) -> str:
    """The format a record is written in, from its fields."""
    if isinstance(record, dict):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "messages"
        if "instruction" in record and ("output" in record or "response" in record):
            return "alpaca"
    fields = ", ".join(map(repr, list(record)[:8])) if isinstance(record, dict) else type(record).__name__
    raise RecordError(f"cannot tell the chat format from this record ({fields}): pass --format "
                      f"{', '.join(FORMATS)}")


def convert_record(record: Any, fmt: str, where: str) -> dict:
    """One ``{"messages": [...]}`` SFT record; a bad one is a DataError naming ``where``."""
    try:
        if not isinstance(record, dict):
            raise RecordError(f"expected a JSON object, got {type(record).__name__}")
        messages = CONVERTERS[fmt](record)
    except RecordError as err:
        raise DataError(f"{where}: {err} ({fmt} format)") from None
    while messages and messages[-1]["role"] != "assistant":  # a question with no answer teaches nothing
        messages.pop()
    converted = {"messages": messages}
    if not messages:
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    check_messages(where, converted, answered=True)  # the check finetune.py applies when it reads the file
    return converted


# ----------------------------------------------------------------------------- files

def input_files(paths: Sequence[Path]) -> list[Path]:
    """The record files behind ``paths``: files as given, folders' .json / .jsonl / .parquet files (sorted,
    hidden ones and unfinished downloads skipped)."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in RECORD_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder {path} holds no .json, .jsonl or .parquet files")
            files += found
        elif not path.exists():
            raise DataError(f"input {path} does not exist: pass .json, .jsonl or .parquet files or folders")
        elif path.suffix not in RECORD_SUFFIXES:
            raise DataError(f"input {path} is not a .json, .jsonl or .parquet file")
        else:
            files.append(path)
    return files


@dataclass
class Report:
    written: int = 0
    skipped: int = 0
    first_bad: str = ""
    formats: dict[str, str] = field(default_factory=dict)  # file -> the format it was read as


def _records(file: Path, fmt: str | None, skip_bad: bool, report: Report):
    """The converted records of one file; its format from its first usable record unless ``fmt`` is given."""
    for where, record in read_records(file):
        try:
            if fmt is None:
                try:
                    fmt = detect(record)
                except RecordError as err:
                    raise DataError(f"{where}: {err}") from None
                report.formats[str(file)] = fmt
            yield convert_record(record, fmt, where)
        except DataError as err:
            if not skip_bad:
                raise
            report.skipped += 1
            report.first_bad = report.first_bad or str(err)


def convert(paths: Sequence[Path], output: Path, fmt: str | None, skip_bad: bool, show_progress: bool) -> Report:
    """Write every input record as a ``{"messages"}`` line of ``output`` (replaced atomically: a failed run leaves
    the previous file)."""
    files, report = input_files(paths), Report()
    counts = [record_count(f) for f in files]
    bar = tqdm(total=None if None in counts else sum(counts), unit="record", desc="converting",
               disable=not show_progress)
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for file in files:
            if fmt:
                report.formats[str(file)] = fmt
            for converted in _records(file, fmt, skip_bad, report):
                out.write(json.dumps(converted, ensure_ascii=False) + "\n")
                report.written += 1
                bar.update(1)
        if report.written == 0:  # raised inside the block: the previous output stays
            raise DataError(f"no record could be converted (first problem: {report.first_bad or 'no records'})")
    bar.close()
    return report


# ----------------------------------------------------------------------------- the CLI

def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m data.convert_chat", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN",
                        help="chat files (.json, .jsonl, .parquet) or folders of them")
    parser.add_argument("output", type=Path, metavar="OUT", help="the .jsonl of {\"messages\"} records to write")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="the input format; auto tells it per file from the first record")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip records that are not a usable conversation, count them and report the first")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, nothing written (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.output.suffix != ".jsonl":
        raise cli.UsageError(f"OUT {args.output} must be a .jsonl file (one record per line)")
    cli.check_output_folder(args.output.parent, "OUT's folder")
    cli.check_outputs({"OUT": args.output}, [("IN", path) for path in args.inputs], overwrite=args.overwrite)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fmt = None if args.format == "auto" else args.format
    report = convert(args.inputs, args.output, fmt, args.skip_bad, not args.no_progress)
    formats = ", ".join(f"{Path(f).name}: {kind}" for f, kind in report.formats.items())
    print(f"wrote {report.written} conversations to {args.output} ({formats})")
    if report.skipped:
        print(f"skipped {report.skipped} bad record(s); the first: {report.first_bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
