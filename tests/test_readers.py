"""readers: the one reader of documents and records, and its one-line errors (file and line named)."""
from __future__ import annotations

import json

import pytest

import readers
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
    ("data.csv", "a,b\n", "not a .txt or .jsonl"),
])
def test_read_documents_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        list(readers.read_documents(path))


def test_read_documents_directory_without_data_files(tmp_path):
    write(tmp_path / "readme.md", "x")
    with pytest.raises(DataError, match="holds no .txt or .jsonl files"):
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
    assert readers.load_sft_records(tmp_path / "a.jsonl") == mixed and readers.jsonl_holds_records(tmp_path / "a.jsonl")
    prompt = {"messages": chat["messages"][:4], "chosen": "4", "rejected": "5"}
    write(tmp_path / "p.json", json.dumps([prompt], ensure_ascii=False))
    assert readers.load_preference_records(tmp_path / "p.json") == [prompt]


USER, ANSWER = '{"role": "user", "content": "q"}', '{"role": "assistant", "content": "a"}'


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "tool", "content": "x"}, %s]}' % ANSWER, "unknown chat role 'tool'"),
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


def test_jsonl_holds_records_tells_records_from_documents(tmp_path):
    assert readers.jsonl_holds_records(write(tmp_path / "r.jsonl", '\n{"instruction": "a", "response": "b"}\n'))
    assert not readers.jsonl_holds_records(write(tmp_path / "d.jsonl", '{"text": "a"}\n'))
    assert not readers.jsonl_holds_records(write(tmp_path / "bad.jsonl", '{oops\n'))


# ----------------------------------------------------------------------------- hostile files (issue 24, class 2)

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
    assert not readers.jsonl_holds_records(write(tmp_path / "first.jsonl", content + "\n"))


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
