"""The one reader of every data file format: documents (``.txt`` one per line; ``.jsonl``, ``.jsonl.gz`` and
``.jsonl.zst`` one ``{"text": ...}`` object per line; ``.parquet`` a string column; or a folder of any mix) and records
(a ``.json`` list or ``.jsonl`` of objects: SFT, preference and classification records; ``read_records`` also reads
a ``.parquet``'s rows, for converters), and the rows of benchmark files (``.jsonl``, ``.csv``, ``.parquet``;
``task_benchmarks`` reads what they mean).

Its own module, with no torch, because the tokenizer CLI, the data pipeline, the trainers, the evaluator and the
verifiers all read these files and must agree on what they hold: the same files, the same order, and the same one-line
``DataError`` (naming file and line, or row group) for a bad byte, a bad record or a truncated file. Documents are
streamed: a line, or one Parquet batch, at a time, so no reader holds the corpus in memory. ``zstandard`` and
``pyarrow`` are imported only when a .zst or .parquet file is read (a .txt user never pays for them).
"""
from __future__ import annotations

import csv
import gzip
import importlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prompts import PromptError, check_conversation

# Document formats, matched on the end of the file name (".jsonl.gz" is one format, not a ".gz" file).
DOCUMENT_FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
FORMATS_TEXT = ".txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet"
RECORD_SUFFIXES = (".json", ".jsonl")
DEFAULT_TEXT_FIELD = "text"
# JSON nesting a file may hold: a record is an object of strings, a conversation 3 levels, a .json list one more. A
# deeper file (`[[[[...]]]]`) is not data, and past ~1,000 levels Python's parser itself dies in RecursionError.
MAX_JSON_DEPTH = 32
# Rows per Parquet batch: memory is one batch of one column (a few MB of text), never a row group or a file.
PARQUET_BATCH_ROWS = 1024
# Compressed bytes read per step: small, because 64 KiB of zstd can expand to megabytes of repetitive text.
COMPRESSED_CHUNK = 1 << 16
# a JSON escape of a UTF-16 surrogate (\ud800-\udfff): half of a pair, or a lone one that is no character
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
REQUIREMENTS = {"zstandard": "zstandard==0.25.0", "pyarrow": "pyarrow==26.0.1"}


class DataError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it."""


def _optional_module(name: str, what: str) -> Any:
    """A format's library, imported on first use; missing, it is one DataError saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pin = REQUIREMENTS[name.split(".")[0]]
        raise DataError(f"reading {what} needs {pin.split('==')[0]}: pip install {pin} "
                        "(it is in requirements.txt)") from None


# ----------------------------------------------------------------------------- finding the files

def document_format(path: Path) -> str | None:
    """Which of ``DOCUMENT_FORMATS`` a file name ends with (None: not a document file)."""
    return next((fmt for fmt in DOCUMENT_FORMATS if path.name.endswith(fmt) and path.name != fmt), None)


def _visible(path: Path, root: Path) -> bool:
    """Not hidden and not under a hidden folder (the token cache lives in ``.cache/``)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def data_files(path: str | os.PathLike) -> list[Path]:
    """The document files behind ``path``: the file itself, or a folder's files of any of ``DOCUMENT_FORMATS``
    (subfolders included, hidden ones skipped), sorted by path."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass a {FORMATS_TEXT} file or a folder of them")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and document_format(p) and _visible(p, path))
        if not files:
            raise DataError(f"folder {path} holds no data files ({FORMATS_TEXT}): add data files or point at "
                            "another folder")
        return files
    if document_format(path) is None:
        raise DataError(f"{path} is not a {FORMATS_TEXT} file: use one document per line (.txt), "
                        f"{{\"text\": ...}} per line (.jsonl, optionally .gz or .zst) or a string column (.parquet)")
    return [path]


# ----------------------------------------------------------------------------- lines of plain and compressed files

class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks, so ``io.BufferedReader`` can split it into lines in C."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._left = chunks, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        n = min(len(buffer), len(self._left))
        buffer[:n], self._left = self._left[:n], self._left[n:]
        return n


def _zstd_chunks(raw: io.BufferedIOBase) -> Iterator[bytes]:
    """Decompressed bytes of a zstd stream, frame after frame. Written by hand because zstandard's stream reader
    ends silently at a truncated frame; here a frame cut short is an EOFError."""
    zstd = _optional_module("zstandard", ".jsonl.zst files")
    decompressor = zstd.ZstdDecompressor()
    frame, fed = decompressor.decompressobj(), False
    while chunk := raw.read(COMPRESSED_CHUNK):
        while chunk:
            try:
                yield frame.decompress(chunk)
            except zstd.ZstdError as err:
                raise OSError(f"not valid zstd data: {err}") from None
            fed, chunk = True, b""
            if frame.eof:  # a file may hold several frames: the bytes after this one start the next
                chunk, frame, fed = frame.unused_data, decompressor.decompressobj(), False
    if fed:
        raise EOFError("the compressed data ends in the middle of a zstd frame")


def _raw_lines(file: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a plain, .gz or .zst file; a truncated or corrupt compressed file is a DataError
    naming the file and the line where its data stops."""
    with open(file, "rb") as raw:
        if file.name.endswith(".gz"):
            stream: Iterable[bytes] = gzip.GzipFile(fileobj=raw)
        elif file.name.endswith(".zst"):
            stream = io.BufferedReader(_ChunkReader(_zstd_chunks(raw)))
        else:
            yield from enumerate(raw, 1)
            return
        lines, line_no = iter(stream), 0
        while True:
            try:
                line = next(lines, None)
            except (OSError, EOFError, zlib.error) as err:
                raise DataError(f"{file}:{line_no + 1}: cannot decompress ({err}): the file is truncated or corrupt; "
                                "download or compress it again") from None
            if line is None:
                return
            line_no += 1
            yield line_no, line


def utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (plain, .gz or .zst); a bad byte is a DataError naming the file and
    line."""
    for line_no, raw in _raw_lines(file):
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


def lone_surrogate(value: Any) -> tuple[str, int, int] | None:
    """The first lone surrogate in any string of ``value`` (lists and dicts walked, keys too), as (its path such as
    "messages.1.content", its code point, its index in the string); None when every string is Unicode text. JSON can
    escape one (``"\\ud800"``), but it is no character: no tokenizer, log or answer can carry it."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:  # iterative: a deeply nested value cannot exhaust the recursion limit
        where, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{where}.{key}", v) for key, v in reversed(item.items()))
            stack.extend((f"{where}.<key>", key) for key in item)  # popped first: a path never holds a bad key
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}.{i}", v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return where.lstrip("."), ord(item[err.start]), err.start
    return None


def check_text(value: Any, where: str) -> None:
    """Every string in ``value`` (a parsed JSON value, keys included) is text (``lone_surrogate``): else a DataError
    naming ``where``, the one Unicode policy wherever text enters (docs/errors.md)."""
    found = lone_surrogate(value)
    if found is not None:
        raise DataError(f"{where}: a lone surrogate \\u{found[1]:04x} (half of a UTF-16 pair, no character): fix or "
                        "remove that text")


def parse_json(text: str, where: str, check_strings: bool = True) -> Any:
    """``json.loads`` with the one nesting bound (``MAX_JSON_DEPTH``) and the one Unicode policy (``check_text``;
    ``check_strings=False``: the caller checks each record itself, to name it): too deep, or a lone surrogate, is a
    DataError naming ``where``. An invalid JSON text raises ``json.JSONDecodeError`` for the caller to locate."""
    too_deep = DataError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep: a record is an object of "
                         "strings (a conversation a list of them); fix the file")
    try:
        value = json.loads(text)
    except RecursionError:  # far deeper than the bound: the parser ran out of stack
        raise too_deep from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    if check_strings and _SURROGATE_ESCAPE.search(text):  # only an escape makes one: decoded UTF-8 holds none
        check_text(value, where)
    return value


def json_line(file: Path, line_no: int, line: str) -> Any:
    try:
        return parse_json(line, f"{file}:{line_no}")
    except json.JSONDecodeError as err:
        raise DataError(f"{file}:{line_no}: invalid JSON ({err.msg}): fix or remove that line") from None


# ----------------------------------------------------------------------------- documents: one reader per format

def _txt_documents(file: Path) -> Iterator[str]:
    """A .txt: one document per line (line end dropped, blank lines skipped)."""
    for _, line in utf8_lines(file):
        if line.strip():
            yield line.rstrip("\r\n")


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    """A .jsonl / .jsonl.gz / .jsonl.zst: one JSON object per line, its ``text_field`` string the document."""
    field = json.dumps(text_field, ensure_ascii=False)
    for line_no, line in utf8_lines(file):
        if not line.strip():
            continue
        record = json_line(file, line_no, line)
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = (f"its fields are {', '.join(map(repr, list(record)[:8]))}; pass --text_field"
                     if isinstance(record, dict) and text_field not in record else
                     f"got {type(record.get(text_field) if isinstance(record, dict) else record).__name__}")
            raise DataError(f"{file}:{line_no}: expected an object with a string {field} field, e.g. "
                            f"{{{field}: \"...\"}} ({found})")
        if text.strip():  # blank, as a blank line of a .txt: nothing to learn from
            yield text


def _open_parquet(file: Path) -> tuple[Any, Any]:
    """(pyarrow.parquet.ParquetFile, pyarrow) of a file that opens as Parquet."""
    pa = _optional_module("pyarrow", ".parquet files")
    pq = _optional_module("pyarrow.parquet", ".parquet files")
    try:
        return pq.ParquetFile(file), pa
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a readable Parquet file ({str(err).splitlines()[0]}): "
                        "the file is truncated or corrupt; download or write it again") from None


def _parquet_file(file: Path, text_field: str) -> tuple[Any, Any]:
    """(pyarrow.parquet.ParquetFile, pyarrow) of a file whose ``text_field`` column holds strings."""
    parquet, pa = _open_parquet(file)
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{file}: no column {text_field!r} (its columns: {', '.join(map(repr, schema.names[:8]))}): "
                        "pass --text_field with the column that holds the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{file}: column {text_field!r} holds {kind}, not strings: pass --text_field with the "
                        "column that holds the text")
    return parquet, pa


def _parquet_batches(file: Path, parquet: Any, pa: Any, columns: list[str] | None) -> Iterator[tuple[int, Any]]:
    """(row group, batch) of ``columns`` (None: all), one batch of one row group at a time; a part that does not
    decode is a DataError naming the row group."""
    for group in range(parquet.num_row_groups):
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{file}: row group {group}: cannot read ({str(err).splitlines()[0]}): the file is "
                                "truncated or corrupt; download or write it again") from None
            if batch is None:
                break
            yield group, batch


def _parquet_values(file: Path, group: int, first_row: int, values: Any) -> list:
    """``values.to_pylist()`` of a Parquet batch or column; a string that is not UTF-8 (pyarrow hands a column's
    bytes over unchecked) is a DataError naming the row, as a bad byte in a .jsonl names the line."""
    try:
        return values.to_pylist()
    except UnicodeDecodeError as err:
        bad = next(i for i in range(len(values)) if not _decodes(values.slice(i, 1)))
        raise DataError(f"{file}: row group {group}, row {first_row + bad}: not UTF-8 text ({err.reason}): write "
                        "the file with UTF-8 strings") from None


def _decodes(values: Any) -> bool:
    try:
        values.to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def _parquet_documents(file: Path, text_field: str) -> Iterator[str]:
    """A .parquet: the ``text_field`` column, read one batch of one row group at a time (never the whole file)."""
    parquet, pa = _parquet_file(file, text_field)
    row = 0
    for group, batch in _parquet_batches(file, parquet, pa, [text_field]):
        for text in _parquet_values(file, group, row, batch.column(0)):
            if text is None:
                raise DataError(f"{file}: row group {group}, row {row}: {text_field!r} is null, not a string: "
                                "drop or fill the empty rows")
            row += 1
            if text.strip():
                yield text


def _file_documents(file: Path, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """The documents of one file, by its format; a file with none is a DataError (a wrong file, not an empty
    corner of the corpus)."""
    fmt = document_format(file)
    if fmt == ".txt":
        documents = _txt_documents(file)
    elif fmt == ".parquet":
        documents = _parquet_documents(file, text_field)
    else:
        documents = _jsonl_documents(file, text_field)
    count = 0
    for count, text in enumerate(documents, 1):
        yield text
    if count == 0:
        raise DataError(f"{file} holds no documents (empty, or only blank lines or blank {text_field!r}): add text "
                        "or remove the file")


def _take_bytes(documents: Iterator[str], max_bytes: int) -> Iterator[str]:
    """The documents up to ``max_bytes`` of UTF-8 text in all; the one that crosses the limit is cut there (at a
    character boundary)."""
    left = max_bytes
    for text in documents:
        size = len(text.encode("utf-8"))
        if size >= left:
            head = text.encode("utf-8")[:left].decode("utf-8", "ignore")  # "ignore": a split character's first bytes
            if head:
                yield head
            return
        left -= size
        yield text


def read_documents(path: str | os.PathLike, text_field: str = DEFAULT_TEXT_FIELD,
                   max_bytes: int | None = None) -> Iterator[str]:
    """Documents from a .txt (one per line, blank lines skipped), a .jsonl / .jsonl.gz / .jsonl.zst (the string
    ``text_field`` of each object), a .parquet (its ``text_field`` column), or a folder of any mix in path order,
    streamed (nothing holds the corpus in memory). ``max_bytes``: stop after that many bytes of UTF-8 text (a prefix
    of the corpus in this order; later files are not opened)."""
    documents = (text for file in data_files(path) for text in _file_documents(file, text_field))
    yield from documents if max_bytes is None else _take_bytes(documents, max_bytes)


# ----------------------------------------------------------------------------- records

def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    for line_no, line in utf8_lines(path):
        if line.strip():
            yield f"{path}:{line_no}", json_line(path, line_no, line)


def _located_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) of every record of a .json list or a .jsonl file."""
    if path.suffix == ".json":
        text = "".join(line for _, line in utf8_lines(path))
        try:
            records = parse_json(text, str(path), check_strings=False)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}): fix the file") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        located = [(f"{path}[{i}]", r) for i, r in enumerate(records)]
        if _SURROGATE_ESCAPE.search(text):
            for where, record in located:
                check_text(record, where)
        return located
    if path.suffix == ".jsonl":
        return list(_jsonl_records(path))
    raise DataError(f"{path} is not a .json or .jsonl file: records must be JSON objects")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row as a dict) of a .parquet, one batch at a time; a row nested deeper than JSON may be is a
    DataError, as in a .jsonl."""
    parquet, pa = _open_parquet(path)
    row = 0
    for group, batch in _parquet_batches(path, parquet, pa, None):
        for record in _parquet_values(path, group, row, batch):
            where = f"{path}: row {row}"
            if json_depth(record) > MAX_JSON_DEPTH:
                raise DataError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep: fix the file")
            row += 1
            yield where, record


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) of every record of a .json list, a .jsonl file (a line at a time) or a .parquet file (a row
    as a dict of its columns, a batch at a time); ``where`` is ``file:line``, ``file[index]`` or ``file: row N``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: pass a .json, .jsonl or .parquet file of records")
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_records(path)
    else:
        yield from _located_records(path)


def record_count(path: str | os.PathLike) -> int | None:
    """How many records ``read_records`` will give, where that is cheap to know (a .parquet's metadata, a .jsonl's
    non-blank lines); None for a .json list (known only once parsed)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _open_parquet(path)[0].metadata.num_rows
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def check_messages(where: str, record: dict, answered: bool) -> None:
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
            check_messages(where, record, answered="response" in messages_for)
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


def holds_records(path: str | os.PathLike, text_field: str = DEFAULT_TEXT_FIELD) -> bool:
    """Whether a data file holds records (instruction or chat, as SFT reads them) rather than documents: a .json
    file always; a .jsonl file when its first record is an instruction record rather than a {"text": ...} document
    (its text in ``text_field``); any other file never."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return True
    if suffix != ".jsonl" or path.is_dir():
        return False
    for line_no, line in utf8_lines(path):
        if line.strip():
            try:
                record = parse_json(line, f"{path}:{line_no}")
            except (json.JSONDecodeError, DataError):
                return False  # the reader reports the bad line with its number
            return isinstance(record, dict) and text_field not in record and ("instruction" in record
                                                                           or "messages" in record)
    return False


# ----------------------------------------------------------------------------- rows of benchmark files

ROW_SUFFIXES = (".jsonl", ".csv", ".parquet")  # the files benchmark suites ship in


def _csv_rows(file: Path) -> Iterator[tuple[str, list[str]]]:
    """(file:line, fields) of a headerless .csv; a quoted field may span lines (the row's first line is named)."""
    lines = (line for _, line in utf8_lines(file))
    reader = csv.reader(lines, strict=True)
    start = 1
    while True:
        try:
            row = next(reader, None)
        except csv.Error as err:
            raise DataError(f"{file}:{start}: not a valid CSV row ({err}): fix or remove it") from None
        if row is None:
            return
        if row:  # a blank line is no row
            yield f"{file}:{start}", row
        start = reader.line_num + 1


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of a benchmark file, ``where`` naming file and line (or row) for error messages:
    a headerless .csv (a list of strings per row), or a .jsonl / .parquet as ``read_records`` reads them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"benchmark file {path} does not exist (check the path)")
    if path.suffix not in ROW_SUFFIXES:
        raise DataError(f"{path}: a benchmark file is {', '.join(ROW_SUFFIXES)}, not {path.suffix or 'no suffix'}")
    yield from _csv_rows(path) if path.suffix == ".csv" else read_records(path)
