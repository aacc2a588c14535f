"""data/build_benchmark_tasks.py: the project's own tasks in the standard formats. The committed files are what the
builder writes (byte for byte, for its seed), task_benchmarks reads them, and each label points at the answer the
held-out data it came from gives: the rest of the pretraining line, the SFT record's response, the sum."""
from __future__ import annotations

import json
import re

import pytest

import task_benchmarks
from conftest import ROOT
from data import build_benchmark_tasks as bbt
from readers import load_sft_records, read_documents

COMMITTED = ROOT / "data" / "benchmarks"


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    counts = bbt.build(bbt.DEFAULT_PRETRAIN_VAL, bbt.DEFAULT_SFT_TEST, out, 0, bbt.Sizes())
    return out, counts


def test_the_committed_files_are_the_builders_output_and_small(built):
    out, counts = built
    assert counts == {"hellaswag_local.jsonl": 300, "gsm8k_local.jsonl": 500, "arc_easy_local.jsonl": 300}
    for name in bbt.FILES.values():
        assert (out / name).read_bytes() == (COMMITTED / name).read_bytes(), name
    assert sum((COMMITTED / name).stat().st_size for name in bbt.FILES.values()) < 300_000


def test_a_second_build_is_byte_for_byte_the_same_and_another_seed_differs(built, tmp_path):
    out, _ = built
    bbt.build(bbt.DEFAULT_PRETRAIN_VAL, bbt.DEFAULT_SFT_TEST, tmp_path / "again", 0, bbt.Sizes())
    bbt.build(bbt.DEFAULT_PRETRAIN_VAL, bbt.DEFAULT_SFT_TEST, tmp_path / "seed1", 1, bbt.Sizes())
    for name in bbt.FILES.values():
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    assert (tmp_path / "seed1" / "hellaswag_local.jsonl").read_bytes() != (out / "hellaswag_local.jsonl").read_bytes()


@pytest.mark.parametrize("task", sorted(bbt.FILES))
def test_task_benchmarks_reads_every_file(task):
    loaded = task_benchmarks.load_task(task, COMMITTED / bbt.FILES[task])
    assert len(loaded.examples) == len(rows(COMMITTED / bbt.FILES[task]))
    for example in loaded.examples:
        assert example.choices == () if task == "gsm8k" else len(set(example.choices)) == bbt.NUM_CHOICES


def test_hellaswag_label_is_the_rest_of_the_held_out_line():
    documents = list(read_documents(bbt.DEFAULT_PRETRAIN_VAL))
    parsed = task_benchmarks.load_task("hellaswag", COMMITTED / bbt.FILES["hellaswag"]).examples
    labels = []
    for row, example in zip(rows(COMMITTED / bbt.FILES["hellaswag"]), parsed):
        line = documents[int(row["source_id"].rsplit(":", 1)[1]) - 1]
        speaker = f"{row['activity_label']}: " if row["activity_label"] else ""
        assert line == f"{speaker}{row['ctx']} {row['endings'][row['label']]}"
        assert example.context + " " + example.choices[example.label] == line  # as the evaluator will ask it
        others = [e for k, e in enumerate(row["endings"]) if k != row["label"]]
        assert all(not line.endswith(" " + e) for e in others)  # no wrong ending is also right
        labels.append(row["label"])
    assert min(labels.count(k) for k in range(4)) > 40  # shuffled: the right ending is at every place


def test_gsm8k_answers_are_the_held_out_sums():
    references = {r["instruction"]: r["response"] for r in load_sft_records(bbt.DEFAULT_SFT_TEST)
                  if r["task"] == "arithmetic"}
    found = rows(COMMITTED / bbt.FILES["gsm8k"])
    assert len(found) == len(references) == 500
    for row in found:
        a, b = map(int, re.findall(r"\d+", row["question"]))
        assert row["answer"].endswith(f"#### {a + b}") and references[row["question"]] == str(a + b)
        assert task_benchmarks.answer_matches(f"so {a + b}", row["answer"])
        assert not task_benchmarks.answer_matches(f"so {a + b + 1}", row["answer"])


def test_arc_answer_key_is_the_held_out_response():
    references = {r["instruction"]: r for r in load_sft_records(bbt.DEFAULT_SFT_TEST)}
    found = rows(COMMITTED / bbt.FILES["arc_easy"])
    tasks = set()
    for row in found:
        record = references[row["question"]["stem"]]
        texts = {c["label"]: c["text"] for c in row["question"]["choices"]}
        assert list(texts) == ["A", "B", "C", "D"] and texts[row["answerKey"]] == record["response"]
        assert record["task"] in bbt.READING_TASKS
        tasks.add(record["task"])
    assert tasks == set(bbt.READING_TASKS)


def test_split_line_halves_the_words_and_keeps_the_speaker():
    assert bbt.split_line("KING: one two three four five six seven eight nine") == \
        ("KING", "one two three four", "five six seven eight nine")
    assert bbt.split_line("a b c d e f g h") == ("", "a b c d", "e f g h")
    assert bbt.split_line("KING: too short here") is None
    assert bbt.split_line(" ".join(["w"] * 25)) is None


def test_the_cli_writes_the_files_and_leaves_others_alone(tmp_path, capsys):
    (tmp_path / "mine.jsonl").write_text("keep\n")
    assert bbt.main(["--output_dir", str(tmp_path), "--hellaswag", "5", "--gsm8k", "3", "--arc_easy", "4"]) == 0
    assert [len(rows(tmp_path / bbt.FILES[t])) for t in ("hellaswag", "gsm8k", "arc_easy")] == [5, 3, 4]
    assert (tmp_path / "mine.jsonl").read_text() == "keep\n"
    assert "hellaswag_local.jsonl: 5 examples" in capsys.readouterr().out
