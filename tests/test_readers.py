"""readers: the one reader of documents and records, and its one-line errors (file and line named)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import byte_level_bpe
import data.classify.build_classify_data as build_classify
import data.sft.build_sft_data as build_sft
import evaluator
import finetune
import pretrain_trainer as pt
import readers
from cli_cases import assert_one_line_error, pretrain_args, run_main, snapshot
from conftest import ROOT
from inference import quantizer
from prompts import record_instruction
from readers import DataError


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading


def test_read_documents_txt_skips_blank_lines_and_keeps_text(tmp_path):
    path = write(tmp_path / "a.txt", "first doc\n\n  \nsecond doc  \r\nthird\n")
    assert list(readers.read_documents(path)) == ["first doc", "second doc  ", "third"]


def test_read_documents_jsonl_and_directory_in_sorted_order(tmp_path):
    write(tmp_path / "b.jsonl", json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "二", "id": 3}) + "\n")
    write(tmp_path / "a.txt", "from txt\n")
    write(tmp_path / "notes.md", "ignored\n")
    assert list(readers.read_documents(tmp_path)) == ["from txt", "from jsonl", "二"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "", "holds no documents"),
    ("blank.txt", "\n \n", "holds no documents"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', "nofield.jsonl:1: expected an object with a string \"text\""),
    ("data.csv", "a,b\n", "not a .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet"),
])
def test_read_documents_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        list(readers.read_documents(path))


def test_read_documents_directory_without_data_files(tmp_path):
    write(tmp_path / "readme.md", "x")
    with pytest.raises(DataError, match="holds no data files"):
        list(readers.read_documents(tmp_path))


def test_load_sft_records_json_and_jsonl(tmp_path):
    records = [{"instruction": "写诗", "response": "床前明月光"},
               {"instruction": "Say hi", "input": "to Bob", "response": "Hi Bob"}]
    write(tmp_path / "a.json", json.dumps(records, ensure_ascii=False))
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    assert readers.load_sft_records(tmp_path / "a.json") == records
    assert readers.load_sft_records(tmp_path / "a.jsonl") == records
    assert record_instruction(records[1]) == "Say hi\nto Bob"


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "does not exist"),
    ("empty.jsonl", "\n", "holds no records"),
    ("empty.json", "[]", "holds no records"),
    ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{bad\n', r"bad\.jsonl:2: invalid JSON"),
    ("bad.json", '[{"instruction": "a",\n "response": }]', r"bad\.json:2: invalid JSON"),
    ("dict.json", '{"instruction": "a", "response": "b"}', "expected a JSON list"),
    ("nofield.jsonl", '{"instruction": "a"}\n', r"nofield\.jsonl:1: missing or non-string field 'response'"),
    ("nofield.json", '[{"instruction": "a", "response": "b"}, {"response": "c"}]',
     r"nofield\.json\[1\]: missing or non-string field 'instruction'"),
    ("badinput.jsonl", '{"instruction": "a", "response": "b", "input": 3}\n', "field 'input' must be a string"),
    ("list.jsonl", '["a", "b"]\n', "expected a JSON object"),
    ("data.txt", "x\n", "not a .json or .jsonl"),
])
def test_load_sft_records_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message):
        readers.load_sft_records(path)



def test_conversation_records_sit_beside_instruction_records(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "计算 1 + 2 = ?"},
                         {"role": "assistant", "content": "3"}, {"role": "user", "content": "再加 1 呢？"},
                         {"role": "assistant", "content": "4"}], "task": "arithmetic_chat"}
    mixed = [chat, {"instruction": "写诗", "response": "床前明月光"}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in mixed) + "\n")
    assert readers.load_sft_records(tmp_path / "a.jsonl") == mixed and readers.holds_records(tmp_path / "a.jsonl")
    prompt = {"messages": chat["messages"][:4], "chosen": "4", "rejected": "5"}
    write(tmp_path / "p.json", json.dumps([prompt], ensure_ascii=False))
    assert readers.load_preference_records(tmp_path / "p.json") == [prompt]


USER, ANSWER = '{"role": "user", "content": "q"}', '{"role": "assistant", "content": "a"}'


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "robot", "content": "x"}, %s]}' % ANSWER, "unknown chat role 'robot'"),
    ('{"messages": [%s]}' % USER, "at least one assistant message"),
    ('{"messages": [{"role": "user", "content": 3}, %s]}' % ANSWER, "content must be a string"),
    ('{"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, %s, %s]}'
     % (USER, ANSWER), "at most one system message"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [%s, %s, %s]}' % (USER, ANSWER, USER), "must end with an assistant message"),
])
def test_bad_conversations_name_file_and_line(tmp_path, line, message):
    write(tmp_path / "chat.jsonl", '{"instruction": "ok", "response": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: .*{message}"):
        readers.load_sft_records(tmp_path / "chat.jsonl")


def test_a_preference_prompt_conversation_ends_with_the_user(tmp_path):
    write(tmp_path / "p.jsonl", '{"messages": [%s, %s], "chosen": "x", "rejected": "y"}\n' % (USER, ANSWER))
    with pytest.raises(DataError, match=r"p\.jsonl:1: a prompt conversation must end with a user message"):
        readers.load_preference_records(tmp_path / "p.jsonl")


def test_a_folder_is_read_recursively_in_path_order_skipping_hidden_ones(tmp_path):
    write(tmp_path / "b" / "2.txt", "b2\n")
    write(tmp_path / "a.txt", "a\n")
    write(tmp_path / "b" / "1.jsonl", json.dumps({"text": "b1"}) + "\n")
    write(tmp_path / ".cache" / "x.txt", "the token cache's folder\n")
    write(tmp_path / ".hidden.txt", "hidden\n")
    found = [p.relative_to(tmp_path).as_posix() for p in readers.data_files(tmp_path)]
    assert found == ["a.txt", "b/1.jsonl", "b/2.txt"]
    assert list(readers.read_documents(tmp_path)) == ["a", "b1", "b2"]


def test_non_utf8_is_an_error_naming_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good line\ncaf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"latin1\.txt:2: not UTF-8 \(byte 0xe9 at column 4\)"):
        list(readers.read_documents(path))


def test_holds_records_tells_records_from_documents(tmp_path):
    assert readers.holds_records(write(tmp_path / "r.jsonl", '\n{"instruction": "a", "response": "b"}\n'))
    assert not readers.holds_records(write(tmp_path / "d.jsonl", '{"text": "a"}\n'))
    assert not readers.holds_records(write(tmp_path / "bad.jsonl", '{oops\n'))
    assert readers.holds_records(write(tmp_path / "r.json", '[{"instruction": "a", "response": "b"}]'))  # by name
    assert not readers.holds_records(write(tmp_path / "d.txt", '{"instruction": "a", "response": "b"}\n'))


def test_the_evaluator_and_the_quantizer_sniff_formats_through_readers():
    """Records-or-documents is decided in one place: the callers hold no suffix test of their own."""
    for name in ("evaluator.py", "inference/quantizer.py"):
        source = (ROOT / name).read_text(encoding="utf-8")
        assert "holds_records(" in source and '== ".json"' not in source, name


# ----------------------------------------------------------------------------- hostile files

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's own parser: RecursionError before the bound


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("read", [
    readers.load_sft_records, readers.load_preference_records, readers.load_classification_records,
    lambda path: list(readers.read_documents(path)),
], ids=["sft", "preference", "classification", "documents"])
@pytest.mark.parametrize("content", [DEEP, nested(readers.MAX_JSON_DEPTH + 1),
                                     '{"text": "x", "instruction": "a", "response": "b", "label": "c", "meta": %s}'
                                     % nested(readers.MAX_JSON_DEPTH)], ids=["100000", "33", "in a field"])
def test_json_nested_past_the_bound_is_one_data_error_in_every_reader(read, content, tmp_path):
    path = write(tmp_path / "deep.jsonl", '{"text": "x", "instruction": "a", "response": "b", "label": "c"}\n'
                 + content + "\n")
    with pytest.raises(DataError, match=rf"deep\.jsonl:2: JSON nested more than {readers.MAX_JSON_DEPTH} levels"):
        read(path)
    assert not readers.holds_records(write(tmp_path / "first.jsonl", content + "\n"))


def test_a_deep_json_list_file_is_one_data_error_and_real_nesting_passes(tmp_path):
    with pytest.raises(DataError, match=r"deep\.json: JSON nested more than"):
        readers.load_sft_records(write(tmp_path / "deep.json", DEEP))
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "meta": json.loads(nested(readers.MAX_JSON_DEPTH - 2))}  # list > record > meta: exactly at the bound
    assert readers.load_sft_records(write(tmp_path / "ok.json", json.dumps([chat]))) == [chat]
    assert readers.json_depth(chat) == readers.MAX_JSON_DEPTH - 1 and readers.json_depth("text") == 0


def test_blank_jsonl_text_is_skipped_as_a_blank_line_is(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "  "}\n{"text": "kept"}\n{"text": ""}\n')
    assert list(readers.read_documents(path)) == ["kept"]
    with pytest.raises(DataError, match="holds no documents"):
        list(readers.read_documents(write(tmp_path / "b.jsonl", '{"text": " \\n "}\n{"text": ""}\n')))


def test_read_lines_names_file_and_line_of_a_bad_byte(tmp_path):
    assert readers.read_lines(write(tmp_path / "a.txt", "one\r\ntwo\n\nthree")) == ["one", "two", "", "three"]
    (tmp_path / "b.txt").write_bytes(b"fine\n\xff\n")
    with pytest.raises(DataError, match=r"b\.txt:2: not UTF-8"):
        readers.read_lines(tmp_path / "b.txt")


# ----------------------------------------------------------------------------- every corpus format

DOCS = ["first document", "二 第二篇", "  leading spaces kept", "emoji 🙂 and tabs\tkept", "x" * 3000, "last one"]


def write_docs(path, docs, field: str = "text", row_group_size: int = 2):
    """``docs`` written in the format ``path``'s name says (Parquet: small row groups, so several are read)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n"
                    for i, d in enumerate(docs)).encode()
    if path.name.endswith(".txt"):
        path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    elif path.name.endswith(".jsonl"):
        path.write_bytes(lines)
    elif path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=row_group_size)
    return path


FORMATS = ["a.txt", "a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_the_same_documents_in_the_same_order(name, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 1)  # several batches per row group, several row groups
    assert list(readers.read_documents(write_docs(tmp_path / name, DOCS))) == DOCS
    assert readers.data_files(tmp_path / name) == [tmp_path / name]


def test_a_folder_of_every_format_reads_them_in_path_order(tmp_path):
    for i, name in enumerate(FORMATS):  # file i holds the documents i and i + 5 of 10
        write_docs(tmp_path / f"{i}" / name, [f"doc {i}", f"doc {i + 5}"])
    (tmp_path / "9" / "a.gz").parent.mkdir()
    (tmp_path / "9" / "a.gz").write_bytes(b"a bare .gz is not a document format")
    assert list(readers.read_documents(tmp_path)) == [f"doc {i + k}" for i in range(5) for k in (0, 5)]


def test_a_multi_frame_zstd_file_reads_every_frame(tmp_path):
    import zstandard

    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "m.jsonl.zst"
    path.write_bytes(compressor.compress(b'{"text": "one"}\n') + compressor.compress(b'{"text": "two"}\n'))
    assert list(readers.read_documents(path)) == ["one", "two"]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"])
def test_text_field_picks_the_field_and_another_field_is_an_error_naming_the_columns(name, tmp_path):
    path = write_docs(tmp_path / name, DOCS, field="content")
    assert list(readers.read_documents(path, text_field="content")) == DOCS
    with pytest.raises(DataError, match=rf"{name}(:1)?: .*'id', 'content'.*--text_field"):
        list(readers.read_documents(path))


def test_max_bytes_reads_a_prefix_cut_at_a_character_and_opens_no_later_file(tmp_path):
    write(tmp_path / "a.txt", "abc\n二三\n")
    write(tmp_path / "b.txt", "")  # never opened: its "holds no documents" error would show
    assert list(readers.read_documents(tmp_path, max_bytes=3)) == ["abc"]
    assert list(readers.read_documents(tmp_path, max_bytes=7)) == ["abc", "二"]  # 3 + 4 bytes: half of 三 dropped
    assert list(readers.read_documents(tmp_path, max_bytes=9)) == ["abc", "二三"]


def truncated(path, keep: float = 0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])
    return path


def corrupt_row_group(path, group: int):
    """Row group ``group``'s text column overwritten: the footer still reads, that row group does not."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(group).column(1)
    start, size = column.dictionary_page_offset or column.data_page_offset, column.total_compressed_size
    raw = bytearray(path.read_bytes())
    raw[start:start + size] = b"\xff" * size
    path.write_bytes(bytes(raw))
    return path


MANY = [f"document number {i} " * 5 for i in range(3000)]


@pytest.mark.parametrize("make, message", [
    (lambda d: truncated(write_docs(d / "t.jsonl.gz", MANY)), r"t\.jsonl\.gz:\d+: cannot decompress .*truncated"),
    (lambda d: truncated(write_docs(d / "t.jsonl.zst", MANY)), r"t\.jsonl\.zst:\d+: cannot decompress .*truncated"),
    (lambda d: write(d / "g.jsonl.zst", "not zstd at all"), r"g\.jsonl\.zst:1: cannot decompress .*zstd"),
    (lambda d: write(d / "g.jsonl.gz", "not gzip at all"), r"g\.jsonl\.gz:1: cannot decompress"),
    (lambda d: write_docs(d / "f.parquet", DOCS, field="body"),
     r"f\.parquet: no column 'text' \(its columns: 'id', 'body'"),
    (lambda d: truncated(write_docs(d / "c.parquet", MANY)), r"c\.parquet: not a readable Parquet file"),
    (lambda d: corrupt_row_group(write_docs(d / "p.parquet", MANY, row_group_size=1000), 1),
     r"p\.parquet: row group 1: cannot read"),
    (lambda d: write(d / "n.jsonl", '{"text": "ok"}\n{"text": 3}\n'),
     r"n\.jsonl:2: expected .*string \"text\".*int"),
    (lambda d: write(d / "z.jsonl", '{"text": null}\n'), r"z\.jsonl:1: expected .*string \"text\".*NoneType"),
])
def test_bad_corpus_files_are_one_data_error_naming_the_file_and_place(make, message, tmp_path):
    with pytest.raises(DataError, match=message):
        list(readers.read_documents(make(tmp_path)))


def test_parquet_non_string_column_and_null_rows_are_data_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"i\.parquet: column 'text' holds int64, not strings"):
        list(readers.read_documents(tmp_path / "i.parquet"))
    pq.write_table(pa.table({"text": ["a", "b", None]}), tmp_path / "n.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"n\.parquet: row group 1, row 2: 'text' is null"):
        list(readers.read_documents(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"text": pa.array(["big"], pa.large_string())}), tmp_path / "l.parquet")
    assert list(readers.read_documents(tmp_path / "l.parquet")) == ["big"]


@pytest.mark.parametrize("name, module", [("a.jsonl.zst", "zstandard"), ("a.parquet", "pyarrow")])
def test_a_missing_format_library_is_one_data_error_saying_what_to_install(name, module, tmp_path, monkeypatch):
    path = write_docs(tmp_path / name, DOCS)
    monkeypatch.setitem(__import__("sys").modules, module, None)  # None in sys.modules: import raises ImportError
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=rf"needs {module}: pip install {module}=="):
        list(readers.read_documents(path))


def test_reading_only_txt_imports_neither_format_library(tmp_path):
    import subprocess
    import sys

    write(tmp_path / "a.txt", "one\n")
    code = ("import sys, readers; list(readers.read_documents(sys.argv[1])); "
            "assert not {'pyarrow', 'zstandard'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.txt")], check=True, cwd=Path(readers.__file__).parent)


# ----------------------------------------------------------------------------- every command on a bad file

BAD_CORPORA = {  # file name -> (how to spoil documents written in that format, where the error must point)
    "t.jsonl.gz": (lambda path: truncated(path), r"t.jsonl.gz:"),
    "t.jsonl.zst": (lambda path: truncated(path), r"t.jsonl.zst:"),
    "c.parquet": (lambda path: truncated(path), "c.parquet: not a readable Parquet file"),
    "r.parquet": (lambda path: corrupt_row_group(path, 1), "r.parquet: row group 1: cannot read"),
    "f.jsonl": (lambda path: path.write_text('{"text": "ok"}\n{"text": 7}\n'), "f.jsonl:2: expected"),
}


@pytest.mark.parametrize("name", BAD_CORPORA)
def test_a_bad_corpus_file_is_one_error_line_naming_it_in_the_tokenizer_and_the_evaluator(name, shared, tmp_path,
                                                                                          capsys):
    path = write_docs(tmp_path / "corpus" / name, MANY, row_group_size=1000)
    spoil, where = BAD_CORPORA[name]
    spoil(path)
    code, err = run_main(byte_level_bpe.main, ["--input", str(path.parent), "--output", str(tmp_path / "tok")], capsys)
    assert_one_line_error(code, err)
    assert f"{path.parent}/{where}" in err and not (tmp_path / "tok").exists()
    code, err = run_main(evaluator.main, ["--model_path", str(shared["ckpt"]), "--test_data_path", str(path),
                                          "--output", str(tmp_path / "report.json"), "--no_progress"], capsys)
    assert_one_line_error(code, err)
    assert f"{path.parent}/{where}" in err and not (tmp_path / "report.json").exists()



# ----------------------------------------------------------------------------- every command on hostile files

DEEP_JSON = "[" * 100_000 + "]" * 100_000


@pytest.fixture()
def hostile(tmp_path) -> dict[str, Path]:
    """Files no reader should choke on: JSON nested 100,000 deep (.json and .jsonl), a Latin-1 corpus."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "deep.json").write_text(DEEP_JSON)
    (folder / "deep.jsonl").write_text('{"text": "fine", "instruction": "a", "response": "b"}\n' + DEEP_JSON + "\n")
    (folder / "latin1.txt").write_bytes("《静夜思》 李白：床前明月光。\n".encode() + b"ROMEO: caf\xe9\n")
    return {name: folder / name for name in ("deep.json", "deep.jsonl", "latin1.txt")}


def test_hostile_files_are_one_line_in_every_command_that_reads_them(hostile, files, shared, corpus,
                                                                     tiny_tokenizer_dir, earlier_run, capsys):
    """Every reader (SFT, preference, classification, pretraining, evaluator, quantizer's eval data) on JSON nested
    100,000 deep, and the data builders on a non-UTF-8 corpus: exit 2, one line naming the file, nothing changed."""
    before, out = snapshot(earlier_run), str(earlier_run)
    deep, deep_list, latin1 = (str(hostile[name]) for name in ("deep.jsonl", "deep.json", "latin1.txt"))
    finetune_base = ["--device", "cpu", "--max_steps", "1", "--output_dir", out]
    cases = [
        (finetune.main, ["--mode", "sft", "--pretrained_model", str(files["pretrained"]), "--data_path", deep,
                         *finetune_base], f"{deep}:2: JSON nested"),
        (finetune.main, ["--mode", "dpo", "--sft_model", str(files["pretrained"]), "--pairwise_data", deep_list,
                         *finetune_base], f"{deep_list}: JSON nested"),
        (finetune.main, ["--mode", "classify", "--pretrained_model", str(files["pretrained"]), "--classify_train",
                         deep, *finetune_base], f"{deep}:2: JSON nested"),
        (pt.main, pretrain_args(corpus, tiny_tokenizer_dir, earlier_run, "--train_data_dir", deep), "JSON nested"),
        (evaluator.main, ["--model_path", str(shared["ckpt"]), "--model_type", "sft", "--test_data_path", deep_list,
                          "--output", str(earlier_run / "report.json"), "--no_progress"], "JSON nested"),
        (evaluator.main, ["--model_path", str(shared["ckpt"]), "--test_data_path", deep, "--no_progress",
                          "--output", str(earlier_run / "report.json")], f"{deep}:2: JSON nested"),
        (quantizer.main, ["--model_path", str(shared["ckpt"]), "--output", str(earlier_run / "int8.pth"),
                          "--test_data_path", deep], f"{deep}:2: JSON nested"),
        (build_sft.main, ["--corpus", latin1, "--output_dir", out], f"{latin1}:2: not UTF-8"),
        (build_classify.main, ["--corpus", latin1, "--output_dir", out], f"{latin1}:2: not UTF-8"),
    ]
    for main, argv, expected in cases:
        code, err = run_main(main, argv, capsys)
        assert_one_line_error(code, err)
        assert expected in err, (argv, err)
        assert snapshot(earlier_run) == before, argv



# ----------------------------------------------------------------------------- the Unicode policy

def bad_utf8_parquet(path: Path) -> Path:
    """A .parquet whose string column holds bytes that are not UTF-8 in its second row (pyarrow writes them
    unchecked through a binary view)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array([b"fine", b"bad \xed\xa0\x80 surrogate bytes", b"x"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column, "label": ["a", "b", "c"]}), path)
    return path


SURROGATE_PAIR = r'"\ud83d\ude00"'  # JSON's escape of one emoji: a whole UTF-16 pair, valid text
UNICODE_CASES = [  # (file, content, reader, the DataError's start, or None: it reads)
    ("d.jsonl", '{"text": "fine"}\n{"text": "lone \\udc80"}\n', "documents", r"d\.jsonl:2: a lone surrogate \\udc80"),
    ("d.jsonl", '{"text": "high \\uD800 upper case"}\n', "documents", r"d\.jsonl:1: a lone surrogate \\ud800"),
    ("r.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "\\ud800", "response": "b"}\n', "sft",
     r"r\.jsonl:2: a lone surrogate"),
    ("r.json", '[{"instruction": "a", "response": "b"},\n {"instruction": "a", "response": "\\ud800x"}]', "sft",
     r"r\.json\[1\]: a lone surrogate \\ud800"),
    ("k.jsonl", '{"text": "x", "label": "a", "\\udfff": 1}\n', "classification", r"k\.jsonl:1: a lone surrogate"),
    ("p.json", '[{"instruction": "a", "chosen": "b", "rejected": "\\ude00\\ud83d"}]', "preference",
     r"p\.json\[0\]: a lone surrogate \\ude00"),  # a pair in the wrong order is two lone halves
    ("b.parquet", bad_utf8_parquet, "documents", r"b\.parquet: row group 0, row 1: not UTF-8 text"),
    ("b.parquet", bad_utf8_parquet, "records", r"b\.parquet: row group 0, row 1: not UTF-8 text"),
    ("ok.jsonl", '{"text": %s}\n' % SURROGATE_PAIR, "documents", None),
    ("ok.json", '[{"instruction": %s, "response": "\\\\ud800 is how JSON escapes it"}]' % SURROGATE_PAIR, "sft", None),
]
READERS = {"documents": lambda path: list(readers.read_documents(path)), "sft": readers.load_sft_records,
           "preference": readers.load_preference_records, "classification": readers.load_classification_records,
           "records": lambda path: list(readers.read_records(path))}


@pytest.mark.parametrize("name, content, reader, message", UNICODE_CASES,
                         ids=[f"{case[0]}-{case[2]}-{i}" for i, case in enumerate(UNICODE_CASES)])
def test_text_that_is_no_unicode_is_one_data_error_naming_the_file_and_record(name, content, reader, message,
                                                                                tmp_path):
    path = content(tmp_path / name) if callable(content) else write(tmp_path / name, content)
    if message is None:
        records = READERS[reader](path)
        assert "😀" in json.dumps(records, ensure_ascii=False)  # the pair decoded to its one character
        assert all(readers.check_text(r, "x") is None for r in records)
        return
    with pytest.raises(DataError, match=message):
        READERS[reader](path)


def test_a_lone_surrogate_in_a_data_file_is_one_line_in_every_command_that_reads_it(files, shared, corpus,
                                                                                     tiny_tokenizer_dir, earlier_run,
                                                                                     tmp_path, capsys):
    """finetune's and the evaluator's records, the pretraining corpus, the quantizer's held-out data: a JSON-escaped
    lone surrogate is exit 2 and one line naming file and record, never Python's codec message; nothing changed."""
    records = json.loads(files["sft_data"].read_text(encoding="utf-8"))[:6]
    bad_list = write(tmp_path / "sft.json", json.dumps(records + [{"instruction": "\ud800", "response": "b"}]))
    bad_lines = write(tmp_path / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in [*records, {
        "instruction": "a", "response": "b \udc00"}]))
    docs = write(tmp_path / "docs.jsonl", '{"text": "fine"}\n{"text": "\\ud800"}\n')
    before, out = snapshot(earlier_run), str(earlier_run)
    finetune_base = ["--device", "cpu", "--max_steps", "1", "--output_dir", out]
    cases = [
        (finetune.main, ["--pretrained_model", str(files["pretrained"]), "--data_path", str(bad_list),
                         *finetune_base], f"{bad_list}[6]: a lone surrogate \\ud800"),
        (finetune.main, ["--pretrained_model", str(files["pretrained"]), "--data_path", str(bad_lines),
                         *finetune_base], f"{bad_lines}:7: a lone surrogate \\udc00"),
        (finetune.main, ["--mode", "classify", "--pretrained_model", str(files["pretrained"]), "--classify_train",
                         str(docs), *finetune_base], f"{docs}:2: a lone surrogate"),
        (pt.main, pretrain_args(corpus, tiny_tokenizer_dir, earlier_run, "--train_data_dir", str(docs)),
         f"{docs}:2: a lone surrogate"),
        (evaluator.main, ["--model_path", str(shared["ckpt"]), "--model_type", "sft", "--test_data_path",
                          str(bad_list), "--output", str(earlier_run / "report.json"), "--no_progress"],
         f"{bad_list}[6]: a lone surrogate"),
        (evaluator.main, ["--model_path", str(shared["ckpt"]), "--test_data_path", str(docs), "--no_progress",
                          "--output", str(earlier_run / "report.json")], f"{docs}:2: a lone surrogate"),
        (quantizer.main, ["--model_path", str(shared["ckpt"]), "--output", str(earlier_run / "int8.pth"),
                          "--test_data_path", str(docs)], f"{docs}:2: a lone surrogate"),
    ]
    for main, argv, expected in cases:
        code, err = run_main(main, argv, capsys)
        assert_one_line_error(code, err)
        assert expected in err and "codec" not in err, (argv, err)
        assert snapshot(earlier_run) == before, argv
