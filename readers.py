"""The one reader of every data file format: documents (``.txt`` one per line, ``.jsonl`` ``{"text": ...}``, or a folder
of them) and records (a ``.json`` list or ``.jsonl`` of objects: SFT, preference and classification records).

Its own module, with no torch, because the tokenizer CLI, the data pipeline, the trainers, the evaluator and the
verifiers all read these files and must agree on what they hold: the same files, the same order, and the same one-line
``DataError`` (naming file and line) for a bad byte or a bad record.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prompts import PromptError, check_conversation

DOCUMENT_SUFFIXES = (".txt", ".jsonl")
RECORD_SUFFIXES = (".json", ".jsonl")
# JSON nesting a file may hold: a record is an object of strings, a conversation 3 levels, a .json list one more. A
# deeper file (`[[[[...]]]]`) is not data, and past ~1,000 levels Python's parser itself dies in RecursionError.
MAX_JSON_DEPTH = 32


class DataError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- documents

def _visible(path: Path, root: Path) -> bool:
    """Not hidden and not under a hidden folder (the token cache lives in ``.cache/``)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def data_files(path: str | os.PathLike) -> list[Path]:
    """The .txt / .jsonl files behind ``path``: the file itself, or a folder's files (subfolders included, hidden
    ones skipped), sorted by path."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass a .txt/.jsonl file or a folder of them")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix in DOCUMENT_SUFFIXES and _visible(p, path))
        if not files:
            raise DataError(f"folder {path} holds no .txt or .jsonl files: add data files or point at another folder")
        return files
    if path.suffix not in DOCUMENT_SUFFIXES:
        raise DataError(f"{path} is not a .txt or .jsonl file: "
                        f"use one document per line (.txt) or {{\"text\": ...}} per line (.jsonl)")
    return [path]


def utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a bad byte is a DataError naming the file and line."""
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{file}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}): "
                                "convert the file to UTF-8") from None


def read_lines(file: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file, without their line ends; a bad byte is a DataError naming file and line."""
    return [line.rstrip("\r\n") for _, line in utf8_lines(Path(file))]


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply lists and objects nest in ``value`` (a string or number: 0), counted without recursion and only up
    to ``limit + 1``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` with the one nesting bound (``MAX_JSON_DEPTH``): too deep is a DataError naming ``where``.
    An invalid JSON text raises ``json.JSONDecodeError`` for the caller to locate."""
    too_deep = DataError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep: a record is an object of "
                         "strings (a conversation a list of them); fix the file")
    try:
        value = json.loads(text)
    except RecursionError:  # far deeper than the bound: the parser ran out of stack
        raise too_deep from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def json_line(file: Path, line_no: int, line: str) -> Any:
    try:
        return parse_json(line, f"{file}:{line_no}")
    except json.JSONDecodeError as err:
        raise DataError(f"{file}:{line_no}: invalid JSON ({err.msg}): fix or remove that line") from None


def _file_documents(file: Path) -> Iterator[str]:
    count = 0
    for line_no, line in utf8_lines(file):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            record = json_line(file, line_no, line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{file}:{line_no}: expected an object with a string \"text\" field, "
                                f"e.g. {{\"text\": \"...\"}}")
            text = record["text"]
            if not text.strip():  # blank, as a blank line of a .txt: nothing to learn from
                continue
        else:
            text = line.rstrip("\r\n")
        count += 1
        yield text
    if count == 0:
        raise DataError(f"{file} holds no documents (empty, or only blank lines or blank \"text\"): add text or "
                        "remove the file")


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents from a .txt (one per line, blank lines skipped), a .jsonl ({"text": ...}) or a folder of them,
    streamed (nothing holds the corpus in memory)."""
    for file in data_files(path):
        yield from _file_documents(file)


# ----------------------------------------------------------------------------- records

def _located_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) of every record of a .json list or a .jsonl file."""
    if path.suffix == ".json":
        text = "".join(line for _, line in utf8_lines(path))
        try:
            records = parse_json(text, str(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}): fix the file") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return [(f"{path}[{i}]", r) for i, r in enumerate(records)]
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", json_line(path, n, line)) for n, line in utf8_lines(path) if line.strip()]
    raise DataError(f"{path} is not a .json or .jsonl file: records must be JSON objects")


def _check_messages(where: str, record: dict, answered: bool) -> None:
    """A record's "messages": a valid conversation ending with an assistant message (``answered``: it holds the
    reference answer) or with a user message (a prompt)."""
    try:
        check_conversation(record["messages"], need_assistant=answered)
    except PromptError as err:
        raise DataError(f"{where}: {err}") from None
    last = record["messages"][-1]["role"]
    if answered and last != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant message (the answer to learn)")
    if not answered and last == "assistant":
        raise DataError(f"{where}: a prompt conversation must end with a user message (the answers are separate)")


def load_records(path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = (),
                 messages_for: Sequence[str] = ()) -> list[dict]:
    """Records from a .json list or a .jsonl file, checking that ``required`` fields are strings. A record may hold
    a conversation ``"messages"`` in place of the fields ``messages_for`` (answered when they include "response")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: pass a .json list or a .jsonl file of records")
    located = _located_records(path)
    if not located:
        raise DataError(f"{path} holds no records: add at least one {{{', '.join(repr(k) for k in required)}}} object")
    for where, record in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with fields {list(required)}, "
                            f"got {type(record).__name__}")
        needed = required
        if messages_for and "messages" in record:
            _check_messages(where, record, answered="response" in messages_for)
            needed = [key for key in required if key not in messages_for]
        for key in needed:
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: missing or non-string field {key!r} (required: {list(required)}"
                                + (' or "messages"' if messages_for else "") + ")")
        for key in optional:
            if key in record and not isinstance(record[key], str):
                raise DataError(f"{where}: field {key!r} must be a string")
    return [record for _, record in located]


def load_sft_records(path: str | os.PathLike) -> list[dict]:
    """Instruction records from a .json list or .jsonl: {"instruction", "response"} plus optional "input", or a
    conversation {"messages": [{"role", "content"}, ...]} ending with the assistant's answer."""
    return load_records(path, required=("instruction", "response"), optional=("input",),
                        messages_for=("instruction", "response"))


def load_preference_records(path: str | os.PathLike) -> list[dict]:
    """Preference records from a .json list or .jsonl: {"instruction", "chosen", "rejected"} plus optional "input";
    "messages" (a conversation ending with a user message) may stand for the instruction."""
    return load_records(path, required=("instruction", "chosen", "rejected"), optional=("input",),
                        messages_for=("instruction",))


def load_classification_records(path: str | os.PathLike) -> list[dict]:
    """Classification records from a .jsonl (or .json list): {"text": str, "label": str}."""
    return load_records(path, required=("text", "label"))


def jsonl_holds_records(path: str | os.PathLike) -> bool:
    """Whether a .jsonl file's first record is an instruction record rather than a {"text": ...} document."""
    for line_no, line in utf8_lines(Path(path)):
        if line.strip():
            try:
                record = parse_json(line, f"{path}:{line_no}")
            except (json.JSONDecodeError, DataError):
                return False  # the reader reports the bad line with its number
            return isinstance(record, dict) and "text" not in record and ("instruction" in record
                                                                           or "messages" in record)
    return False
