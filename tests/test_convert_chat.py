"""data.convert_chat: ShareGPT, Alpaca and OpenAI-messages files (.json, .jsonl, .parquet) into {"messages"} records
that finetune.py reads and trains on. Expected records are written out by hand from the fixtures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import finetune as ft
import readers
from data import convert_chat
from run_folder import read_metrics

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Answer with the number only."},
                       {"from": "human", "value": "计算 15 + 27 = ?"}, {"from": "gpt", "value": "42"},
                       {"from": "human", "value": "thanks!"}]},  # the unanswered last turn is dropped
    {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                       {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                       {"from": "observation", "value": '{"sky": "sunny"}'}, {"from": "gpt", "value": "Sunny."}]},
    {"system": "You are terse.", "conversations": [{"from": "user", "value": "Hi"}, {"from": "tool", "value": "t"},
                                                   {"from": "assistant", "value": "Hello."}]},
]
SHAREGPT_RECORDS = [
    {"messages": [{"role": "system", "content": "Answer with the number only."},
                  {"role": "user", "content": "计算 15 + 27 = ?"}, {"role": "assistant", "content": "42"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                  {"role": "user", "content": '{"sky": "sunny"}'}, {"role": "assistant", "content": "Sunny."}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "user", "content": "t"}, {"role": "assistant", "content": "Hello."}]},
]
ALPACA = [
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a prime.", "input": "", "output": "7"},
    {"instruction": "Say hi.", "output": "hi", "system": "Be polite."},
]
ALPACA_RECORDS = [
    {"messages": [{"role": "user", "content": "Translate to French.\ncat"}, {"role": "assistant", "content": "chat"}]},
    {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]},
    {"messages": [{"role": "system", "content": "Be polite."}, {"role": "user", "content": "Say hi."},
                  {"role": "assistant", "content": "hi"}]},
]


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def convert(*argv: str) -> int:
    return convert_chat.main([*argv, "--no_progress"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_sharegpt_and_alpaca_files_become_the_records_finetune_reads(tmp_path, capsys):
    sharegpt = write_json(tmp_path / "sharegpt.json", SHAREGPT)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    out = tmp_path / "chat.jsonl"
    assert convert(str(sharegpt), str(alpaca), str(out)) == 0
    assert read_jsonl(out) == SHAREGPT_RECORDS + ALPACA_RECORDS
    assert readers.load_sft_records(out) == SHAREGPT_RECORDS + ALPACA_RECORDS  # the trainer's own reader accepts it
    printed = capsys.readouterr().out
    assert "wrote 6 conversations" in printed and "(sharegpt.json: sharegpt, alpaca.jsonl: alpaca)" in printed


def test_openai_messages_pass_through_from_parquet_and_jsonl(tmp_path):
    conversations = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]]
    table = pa.table({"messages": conversations, "source": ["x", "y"]})  # a list of structs, as SmolTalk stores it
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    parts = write_jsonl(tmp_path / "parts.jsonl", [{"messages": [
        {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi"}]}])
    out = tmp_path / "out" / "chat.jsonl"
    assert convert(str(tmp_path / "train-00000-of-00001.parquet"), str(parts), str(out)) == 0
    assert read_jsonl(out) == [{"messages": c} for c in conversations] + [{"messages": [
        {"role": "developer", "content": "d"}, {"role": "user", "content": "Hello, there"},
        {"role": "assistant", "content": "Hi"}]}]


def test_a_folder_is_read_file_by_file_each_with_its_own_format(tmp_path):
    folder = tmp_path / "downloaded"
    (folder / "a").mkdir(parents=True)
    write_json(folder / "a" / "one.json", SHAREGPT)
    write_jsonl(folder / "two.jsonl", ALPACA)
    (folder / "two.jsonl.part").write_text("half a download")  # never read
    (folder / ".download_manifest.json").write_text("{}")  # hidden: never read
    out = tmp_path / "chat.jsonl"
    assert convert(str(folder), str(out)) == 0
    assert read_jsonl(out) == SHAREGPT_RECORDS + ALPACA_RECORDS


BAD_RECORDS = [  # (record, what the error says), each in an otherwise good ShareGPT .jsonl, as its line 2
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "unknown role 'narrator'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}, "content must be a string"),
    ({"conversations": []}, "must be a non-empty list"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no assistant message"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "late"},
                        {"from": "gpt", "value": "a"}]}, "at most one system message"),
    ({"conversations": ["not a message"]}, "message 0 is a str"),
    (["not", "an", "object"], "expected a JSON object"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_a_bad_record_is_one_line_naming_file_and_line_or_is_skipped_and_counted(record, message, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [SHAREGPT[0], record, SHAREGPT[1]])
    out = tmp_path / "chat.jsonl"
    assert convert(str(source), str(out)) == 2
    err = one_error_line(capsys)
    assert f"{source}:2: " in err and message in err
    assert not out.exists()  # nothing half-written
    assert convert(str(source), str(out), "--skip_bad") == 0
    assert read_jsonl(out) == SHAREGPT_RECORDS[:2]
    printed = capsys.readouterr().out
    assert "wrote 2 conversations" in printed and f"skipped 1 bad record(s); the first: {source}:2: " in printed


def test_format_detection_and_forcing(tmp_path, capsys):
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "p", "completion": "c"}])
    assert convert(str(unknown), str(tmp_path / "a.jsonl")) == 2
    assert f"{unknown}:1: cannot tell the chat format" in one_error_line(capsys)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    assert convert(str(alpaca), str(tmp_path / "b.jsonl"), "--format", "sharegpt") == 2
    err = one_error_line(capsys)
    assert "alpaca.jsonl:1: 'conversations' must be a non-empty list of messages (sharegpt format)" in err
    assert convert(str(alpaca), str(tmp_path / "c.jsonl"), "--format", "alpaca") == 0
    assert read_jsonl(tmp_path / "c.jsonl") == ALPACA_RECORDS
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"instruction": ["i"], "output": [None]}), parquet)
    assert convert(str(parquet), str(tmp_path / "d.jsonl")) == 2
    assert f"{parquet}: row 0: 'output' must be a string" in one_error_line(capsys)


def test_an_existing_output_needs_overwrite_and_a_failed_run_keeps_it(tmp_path, capsys):
    source = write_json(tmp_path / "sharegpt.json", SHAREGPT)
    out = write_jsonl(tmp_path / "chat.jsonl", ALPACA_RECORDS)
    before = out.read_bytes()
    assert convert(str(source), str(out)) == 2
    assert "already exists" in one_error_line(capsys)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}])
    assert convert(str(bad), str(out), "--overwrite") == 2
    capsys.readouterr()
    assert out.read_bytes() == before
    assert convert(str(source), str(out), "--overwrite") == 0
    assert read_jsonl(out) == SHAREGPT_RECORDS


@pytest.mark.usefixtures("one_thread")
def test_finetune_trains_on_the_converted_file(files, tmp_path, capsys):
    """A real `finetune.py --mode sft` run, a few steps, on ShareGPT and Alpaca data converted here."""
    sharegpt = write_json(tmp_path / "sharegpt.json", SHAREGPT * 4)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4)
    data = tmp_path / "chat.jsonl"
    assert convert(str(sharegpt), str(alpaca), str(data)) == 0
    out = tmp_path / "sft"
    code = ft.main(["--mode", "sft", "--pretrained_model", str(files["pretrained"]), "--data_path", str(data),
                    "--test_data_path", str(data), "--output_dir", str(out), "--max_steps", "3", "--batch_size", "4",
                    "--eval_interval", "3", "--log_interval", "1", "--device", "cpu", "--max_new_tokens", "4"])
    assert code == 0
    assert "sft: 24 train / 24 held-out examples" in capsys.readouterr().out  # every converted record
    losses = [r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert (out / "sft_best.pth").is_file()
