"""The corpus builder turns the source layouts into one document per line; its CLI writes train.txt and val.txt."""

import subprocess
import sys

from cli_cases import assert_one_line_error, snapshot
from conftest import ROOT, TRAIN_TXT, VAL_TXT
from data import build_pretrain_data as build

PLAY = """THE TRAGEDY OF KING LEAR

Persons Represented.

Lear, King of Britain.
Earl of Kent.
Edmund, Bastard Son to Gloster.

ACT I.

Scene I. A Room of State in King Lear's Palace.

[Enter Kent, Gloster, and Edmund.]

Kent.
I thought the King had more affected the Duke of Albany than
Cornwall.

Edm.
No, my lord. [Aside.] Not yet.
"""

POEMS = """《感遇・其一》
作者：张九龄
兰叶春葳蕤，桂华秋皎洁。
欣欣此生意，自尔为佳节。

题目:《塞上》
作者:柳开（９４６－９９９）
鸣骹直上一千尺，天静无风声更干。
"""


def test_play_speeches_become_one_line_each_with_expanded_speaker():
    docs = build.play_documents(PLAY)
    assert docs == [
        "EARL OF KENT: I thought the King had more affected the Duke of Albany than Cornwall.",
        "EDMUND: No, my lord. Not yet.",
    ]


def test_chinese_poems_keep_title_author_and_lines():
    assert build.chinese_poems(POEMS) == [
        "《感遇・其一》 张九龄：兰叶春葳蕤，桂华秋皎洁。欣欣此生意，自尔为佳节。",
        "《塞上》 柳开：鸣骹直上一千尺，天静无风声更干。",
    ]


def test_embedded_corpus_has_expected_shape():
    train = TRAIN_TXT.read_text(encoding="utf-8").splitlines()
    val = VAL_TXT.read_text(encoding="utf-8").splitlines()
    assert 2_000_000 < TRAIN_TXT.stat().st_size + VAL_TXT.stat().st_size < 6_000_000
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.06
    assert all(line.strip() for line in train + val)
    assert any(line.startswith("LEAR: Attend the lords of France and Burgundy") for line in train + val)
    assert sum("》" in line for line in val) > 10  # held-out poems too, not only plays
    assert len(set(train) & set(val)) < 50  # only short stock lines ("Ay, my lord.") repeat


def test_cli_writes_train_and_val_with_every_twentieth_document_held_out(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "shakespeare").mkdir(parents=True)
    (corpus / "poetry_zh").mkdir()
    speeches = "".join(f"Kent.\nSpeech number {i} of the play.\n\n" for i in range(40))
    (corpus / "shakespeare" / "king_lear.txt").write_text(PLAY + "\n" + speeches, encoding="utf-8")
    (corpus / "poetry_zh" / "poems.txt").write_text(POEMS, encoding="utf-8")
    out = tmp_path / "out"
    assert build.main(["--corpus", str(corpus), "--output", str(out)]) == 0
    train = (out / "train.txt").read_text(encoding="utf-8").splitlines()
    val = (out / "val.txt").read_text(encoding="utf-8").splitlines()
    assert len(train) + len(val) == 2 + 40 + 2 and len(val) == 2  # documents 10 and 30 of the play
    assert val == ["EARL OF KENT: Speech number 8 of the play.", "EARL OF KENT: Speech number 28 of the play."]
    assert f"wrote {len(train)} train and 2 val documents to {out}" in capsys.readouterr().out


def test_build_pretrain_data_refuses_a_missing_or_empty_corpus(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("earlier train\n")
    (out / "val.txt").write_text("earlier val\n")
    before = snapshot(out)
    empty_corpus = tmp_path / "corpus"
    (empty_corpus / "shakespeare").mkdir(parents=True)
    (empty_corpus / "shakespeare" / "empty.txt").write_text("")
    for corpus in (tmp_path / "missing", empty_corpus):
        result = subprocess.run([sys.executable, "-m", "data.build_pretrain_data", "--corpus", str(corpus),
                                 "--output", str(out)],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert_one_line_error(result.returncode, result.stderr)
        assert snapshot(out) == before

