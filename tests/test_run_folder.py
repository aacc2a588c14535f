"""run_folder: step checkpoints found in step order, a metrics.jsonl that survives a damaged line, and an output
folder that a run never leaves worse than it found it (the earlier run moves to previous/ at the first checkpoint)."""
from __future__ import annotations

import json

import pytest

import pretrain_trainer as pt
from byte_level_bpe import ByteLevelBPETokenizer
from cli_cases import snapshot
from conftest import corpus_lines
from run_folder import RunFolder, read_metrics, step_checkpoints


def test_step_checkpoints_are_in_step_order_and_ignore_other_names(tmp_path):
    for name in ("toy_step_10.pth", "toy_step_9.pth", "toy_step_2.pth", "toy_best.pth", "toy_step_x.pth",
                 "other_step_1.pth", "toy_step_3.pth.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in step_checkpoints(tmp_path, "toy")] == ["toy_step_2.pth", "toy_step_9.pth",
                                                                  "toy_step_10.pth"]
    assert step_checkpoints(tmp_path / "missing", "toy") == []


def test_read_metrics_skips_a_damaged_line_and_rows_without_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n[1, 2]\n{"loss": 1}\n'
                    '{"step": "3"}\n{"step": 4, "val_loss": 1.5}\n', encoding="utf-8")
    assert read_metrics(path) == [{"step": 1, "train_loss": 2.0}, {"step": 4, "val_loss": 1.5}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_nothing_moves_until_the_first_checkpoint_then_the_earlier_run_goes_to_previous(tiny_tokenizer, earlier_run):
    before = snapshot(earlier_run)
    run = RunFolder(earlier_run, "pretrain", tiny_tokenizer, resumed_from=None, step=0)
    run.log({"step": 1, "train_loss": 3.0})
    assert snapshot(earlier_run) == before and run.metrics() == [{"step": 1, "train_loss": 3.0}]
    run.commit()
    (archive,) = (earlier_run / "previous").iterdir()
    assert sorted(p.name for p in archive.iterdir()) == ["loss_curve.png", "metrics.jsonl", "pretrain_best.pth"]
    assert snapshot(earlier_run / "tokenizer") == snapshot(archive.parent.parent / "tokenizer")  # same tokenizer stays
    run.log({"step": 2, "train_loss": 2.5})
    assert [r["step"] for r in read_metrics(earlier_run / "metrics.jsonl")] == [1, 2]


def test_a_different_tokenizer_moves_aside_with_the_run_and_the_new_one_is_saved(tiny_tokenizer, earlier_run):
    other = ByteLevelBPETokenizer(vocab_size=300)
    other.train(corpus_lines(limit=50), show_progress=False)
    old_vocab = (earlier_run / "tokenizer" / "vocab.json").read_bytes()
    RunFolder(earlier_run, "pretrain", other, resumed_from=None, step=0).commit()
    (archive,) = (earlier_run / "previous").iterdir()
    assert (archive / "tokenizer" / "vocab.json").read_bytes() == old_vocab
    assert ByteLevelBPETokenizer.from_pretrained(earlier_run / "tokenizer").fingerprint == other.fingerprint


def test_resuming_in_the_same_folder_keeps_its_files_and_its_rows_up_to_the_step(tiny_tokenizer, earlier_run):
    step = earlier_run / "pretrain_step_1.pth"
    step.write_bytes(b"stand-in")  # RunFolder never reads a checkpoint: only its folder and its step
    run = RunFolder(earlier_run, "pretrain", tiny_tokenizer, resumed_from=str(step), step=1)
    run.commit()
    assert not (earlier_run / "previous").exists() and step.exists()
    assert read_metrics(earlier_run / "metrics.jsonl") == [{"step": 1, "train_loss": 5.0}]  # step 2's row dropped


def test_fresh_run_keeps_the_earlier_run_until_its_first_checkpoint_then_moves_it_aside(
        corpus, tiny_tokenizer, tiny_tokenizer_dir, earlier_run, capsys):
    before = snapshot(earlier_run)
    config = pt.TrainConfig(train_data=str(corpus[0]), val_data=str(corpus[1]), output_dir=str(earlier_run),
                            n_layers=1, d_model=32, n_heads=2, max_seq_len=32, batch_size=2, max_steps=4,
                            eval_interval=2, log_interval=1, device="cpu", dtype="float32", num_workers=1)
    trainer = pt.GPTTrainer(config, tiny_tokenizer, show_progress=False)
    assert snapshot(earlier_run) == before  # constructing a run changes nothing
    trainer.train(stop_after=1)  # a checkpoint at step 1: now the earlier run moves aside
    archives = list((earlier_run / "previous").iterdir())
    assert len(archives) == 1
    assert snapshot(archives[0]) == {k: v for k, v in before.items() if not k.startswith("tokenizer/")}
    rows = [json.loads(line) for line in (earlier_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # the new run's log alone



def test_resume_from_another_folder_moves_its_run_aside_and_continues_the_source_log(
        corpus, tiny_tokenizer, earlier_run, tmp_path):
    source = tmp_path / "source"
    config = pt.TrainConfig(train_data=str(corpus[0]), val_data=str(corpus[1]), output_dir=str(source), n_layers=1,
                            d_model=32, n_heads=2, max_seq_len=32, batch_size=2, max_steps=4, eval_interval=2,
                            log_interval=1, device="cpu", dtype="float32", num_workers=1)
    pt.GPTTrainer(config, tiny_tokenizer, show_progress=False).train(stop_after=2)
    before = snapshot(earlier_run)
    config.output_dir = str(earlier_run)
    resumed = pt.GPTTrainer(config, tiny_tokenizer, resume=str(source / "pretrain_step_2.pth"), show_progress=False)
    resumed.train()
    (archive,) = (earlier_run / "previous").iterdir()
    assert snapshot(archive)["pretrain_best.pth"] == before["pretrain_best.pth"]
    steps = [r["step"] for r in resumed.metrics() if "train_loss" in r]
    assert steps == [1, 2, 3, 4]  # the source's rows up to its checkpoint, then this run's


EARLIER_FILES = [  # (prefix of the new run, files an earlier run left, those that move to previous/)
    ("classify", ["classify_best.pth", "classify_step_4.pth", "metrics.jsonl", "loss_curve.png",
                  "confusion_matrix.png"],
     ["classify_best.pth", "classify_step_4.pth", "confusion_matrix.png", "loss_curve.png", "metrics.jsonl"]),
    ("sft", ["classify_best.pth", "confusion_matrix.png", "metrics.jsonl"],  # another stage's charts go too
     ["confusion_matrix.png", "metrics.jsonl"]),
    ("classify", ["confusion_matrix.png", "notes.txt", "eval_report.json"], ["confusion_matrix.png"]),
]


@pytest.mark.parametrize("prefix, earlier, moved", EARLIER_FILES, ids=[" ".join(c[1]) for c in EARLIER_FILES])
def test_every_file_an_earlier_run_wrote_moves_to_previous_at_the_first_checkpoint(prefix, earlier, moved,
                                                                                   tiny_tokenizer, tmp_path):
    """The charts a run writes (the loss curve, a classifier's confusion matrix) move aside with its checkpoints and
    metrics, byte for byte: a second classify run into the same folder never overwrites the first one's chart."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in earlier:
        (folder / name).write_bytes(f"the earlier {name}".encode())
    before = snapshot(folder)
    RunFolder(folder, prefix, tiny_tokenizer, resumed_from=None, step=0).commit()
    (archive,) = (folder / "previous").iterdir()
    assert sorted(p.name for p in archive.iterdir()) == moved
    assert snapshot(archive) == {name: before[name] for name in moved}
    after = snapshot(folder)
    assert all(after[name] == before[name] for name in set(earlier) - set(moved))  # not a run's: left as it was
    assert not (folder / "confusion_matrix.png").exists()
