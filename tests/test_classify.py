"""Classification finetuning: the head on the last real token, frozen blocks, the metrics by hand, a tiny run that
beats chance, the demo data generator, and the evaluator on a classifier checkpoint."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
import data_loader
import evaluator
import finetune as ft
import gpt_model
import losses
import metrics
import model_heads
import readers
import scoring
from conftest import ROOT, TRAIN_TXT
from data.classify import build_classify_data as build_classify
from optimizers import configure_optimizer

CLASSIFY_DATA = ROOT / "data" / "classify"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(tokenizer, **overrides) -> gpt_model.GPTConfig:
    values = dict(vocab_size=len(tokenizer), max_seq_len=64, n_layers=2, d_model=32, n_heads=2, dropout=0.0)
    return gpt_model.GPTConfig.from_preset("tiny", **{**values, **overrides})


# ----------------------------------------------------------------------------- the model

def test_head_reads_the_last_real_token_of_right_padded_rows(tiny_tokenizer):
    torch.manual_seed(0)
    model = model_heads.GPTClassifier(small_config(tiny_tokenizer), 3, ["a", "b", "c"]).eval()
    lengths = [5, 9, 2]
    rows = [torch.randint(4, len(tiny_tokenizer), (n,)) for n in lengths]
    batch = data_loader.collate_batch([{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows], 1)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        assert logits.shape == (3, 3) and logits.dtype == torch.float32
        for i, row in enumerate(rows):  # each row alone, no padding: the head on its final hidden state
            alone = model.head(model.backbone.hidden_states(row[None])[0, -1])
            torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=1e-5)


def test_frozen_blocks_get_no_gradient_and_do_not_move(tiny_tokenizer):
    torch.manual_seed(0)
    model = model_heads.GPTClassifier(small_config(tiny_tokenizer), 2)
    model_heads.freeze_all_but_last(model, 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = configure_optimizer(model, weight_decay=0.1, lr=1e-2)
    ids = torch.randint(4, len(tiny_tokenizer), (4, 10))
    out = losses.classify_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                   "label": torch.tensor([0, 1, 1, 0])})
    out["loss"].backward()
    optimizer.step()
    trainable = ("backbone.transformer.h.1.", "backbone.transformer.ln_f.", "head.")
    for name, p in model.named_parameters():
        if name.startswith(trainable):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(p, before[name]), name
        else:  # embeddings (tied lm_head included) and block 0
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, before[name]), name
    model_heads.freeze_all_but_last(model, 5)  # more than there are: every block, still not the embeddings
    assert {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and ".h." in n} == {"0", "1"}
    assert not model.backbone.transformer.wte.weight.requires_grad
    model_heads.freeze_all_but_last(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "backbone.transformer.ln_f.weight", "backbone.transformer.ln_f.bias", "head.weight"}


def test_classifier_checkpoint_round_trip_keeps_labels(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    model = model_heads.GPTClassifier(small_config(tiny_tokenizer), 3, ["x", "y", "z"])
    checkpoints.save_checkpoint(tmp_path / "c.pth", model, model_class="classify", labels=model.labels,
                              tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    loaded, _ = checkpoints.load_model_and_tokenizer(tmp_path / "c.pth", tokenizer_dir=tiny_tokenizer_dir)
    assert isinstance(loaded, model_heads.GPTClassifier) and loaded.labels == ["x", "y", "z"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    checkpoints.save_checkpoint(tmp_path / "bad.pth", model, model_class="classify")
    with pytest.raises(checkpoints.CheckpointError, match="needs 'labels'"):
        checkpoints.load_model_and_tokenizer(tmp_path / "bad.pth", tokenizer_dir=tiny_tokenizer_dir)


# ----------------------------------------------------------------------------- metrics, by hand

def test_confusion_matrix_precision_recall_on_a_hand_made_example():
    targets = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predictions = [0, 1, 0, 1, 1, 2, 0, 2, 1]
    confusion = metrics.confusion_matrix(targets, predictions, 4)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    precision, recall = metrics.precision_recall(confusion)
    # class 0: predicted 3 times, 2 right; present 3 times, 2 found. class 1: predicted 4, right 2; present 2.
    # class 2: predicted 2, right 2; present 4. class 3: never predicted nor present -> 0, 0.
    assert precision == pytest.approx([2 / 3, 2 / 4, 2 / 2, 0.0])
    assert recall == pytest.approx([2 / 3, 2 / 2, 2 / 4, 0.0])
    report = scoring.classification_figures(torch.tensor(targets), torch.tensor(predictions), "abcd")
    assert report["accuracy"] == pytest.approx(6 / 9) and report["majority_baseline"] == pytest.approx(4 / 9)
    assert report["precision/b"] == pytest.approx(0.5) and report["recall/c"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="class ids"):
        metrics.confusion_matrix([0, 4], [0, 1], 4)


# ----------------------------------------------------------------------------- data

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_classification_records_errors_are_one_line(tmp_path):
    cases = [("holds no records", ""), ("missing or non-string field 'label'", '{"text": "a"}\n'),
             ("missing or non-string field 'label'", '{"text": "a", "label": 3}\n'),
             ("missing or non-string field 'text'", '{"label": "x"}\n'), ("invalid JSON", "{oops\n")]
    for expected, content in cases:
        path = tmp_path / "r.jsonl"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(readers.DataError) as err:
            readers.load_classification_records(path)
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_dataset_keeps_the_final_eos_when_cutting_long_texts(tiny_tokenizer):
    records = [{"text": "word " * 200, "label": "b"}, {"text": "short", "label": "a"}]
    dataset = data_loader.ClassificationDataset(records, tiny_tokenizer, 16)
    assert dataset.labels == ["a", "b"] and dataset.num_truncated == 1
    long_item, short_item = dataset[0], dataset[1]
    assert len(long_item["input_ids"]) == 16 and long_item["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert short_item["input_ids"].tolist() == [tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode_ordinary("short"),
                                               tiny_tokenizer.eos_token_id]
    assert (long_item["label"], short_item["label"]) == (1, 0)
    with pytest.raises(readers.DataError, match="not one of the model's classes"):
        data_loader.ClassificationDataset([{"text": "x", "label": "c"}], tiny_tokenizer, 16, ["a", "b"])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classify")
    build_classify.main(["--seed", "0", "--output_dir", str(folder), "--corpus", str(TRAIN_TXT)])
    return folder


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generator_is_deterministic_and_matches_the_committed_files(built, tmp_path):
    for name in ("train.jsonl", "test.jsonl"):
        assert (built / name).read_bytes() == (CLASSIFY_DATA / name).read_bytes(), name
    build_classify.main(["--seed", "1", "--output_dir", str(tmp_path), "--corpus", str(TRAIN_TXT)])
    assert (tmp_path / "train.jsonl").read_bytes() != (built / "train.jsonl").read_bytes()


def test_generated_splits_share_no_text_or_source_and_labels_match_the_corpus(built):
    train, test = read(built / "train.jsonl"), read(built / "test.jsonl")
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(build_classify.LABELS)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    corpus = TRAIN_TXT.read_text(encoding="utf-8").splitlines()
    speeches = "\n".join(line.split(": ", 1)[1] for line in corpus if re.match(r"^[A-Z][A-Z'\- ]*[A-Z]: ", line))
    poem_docs = [line for line in corpus if not re.search(r"[\u4e00-\u9fff]", line) and not
                 re.match(r"^[A-Z][A-Z'\- ]*[A-Z]: ", line)]
    zh_docs = [re.sub(r"[，。？！；：、\s]", "", line.split("：", 1)[1] if line.startswith("《") else line)
               for line in corpus if re.search(r"[\u4e00-\u9fff]", line)]
    sources = {"train": set(), "test": set()}
    rng = random.Random(0)
    for split, records in (("test", test), ("train", rng.sample(train, 400))):
        for r in records:
            text, label = r["text"], r["label"]
            if label == "speech":
                assert len(text.split()) == build_classify.WINDOW_WORDS and text in speeches
            elif label == "poem":
                assert len(text.split()) == build_classify.WINDOW_WORDS
                found = [i for i, doc in enumerate(poem_docs) if text in " ".join(doc.split())]
                assert found, text
                sources[split].update(("poem", i) for i in found)
            else:
                lines = [x for x in re.split(r"[，。]", text) if x]
                assert len(lines) == 2 and {len(x) for x in lines} == {int(label[3])}, (text, label)
                found = [i for i, doc in enumerate(zh_docs) if "".join(lines) in doc]
                assert found, text
                sources[split].update(("zh", i) for i in found)
    assert not sources["train"] & sources["test"]  # no poem or stanza gives excerpts to both splits


# ----------------------------------------------------------------------------- training and evaluation

@pytest.fixture()
def pretrained(tiny_tokenizer, tiny_tokenizer_dir, tmp_path) -> Path:
    torch.manual_seed(0)
    model = gpt_model.GPTModel(small_config(tiny_tokenizer, n_layers=1))
    path = tmp_path / "pre" / "pretrain_best.pth"
    checkpoints.save_checkpoint(path, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    shutil.copytree(tiny_tokenizer_dir, path.parent / "tokenizer")
    return path


def two_class_slice(split: str, per_class: int) -> list[dict]:
    """English speeches vs seven-character Chinese couplets from the demo data: learnable in a few dozen steps."""
    records = read(CLASSIFY_DATA / f"{split}.jsonl")
    return [r for label in ("speech", "zh_7char") for r in [r for r in records if r["label"] == label][:per_class]]


@pytest.mark.slow
def test_a_tiny_classify_run_beats_chance_and_the_evaluator_cli_agrees(pretrained, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", two_class_slice("train", 96))
    test_records = two_class_slice("test", 30)
    test = write_jsonl(tmp_path / "test.jsonl", test_records)
    out = tmp_path / "cls"
    code = ft.main(["--mode", "classify", "--pretrained_model", str(pretrained), "--classify_train", str(train),
                    "--classify_test", str(test), "--output_dir", str(out), "--max_steps", "40", "--eval_interval",
                    "20", "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5", "--device", "cpu"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy"] >= 0.8  # chance (and the majority class) is 0.5
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = checkpoints.load_checkpoint(out / "classify_best.pth")
    assert best["model_class"] == "classify" and best["labels"] == ["speech", "zh_7char"]

    model, tokenizer = checkpoints.load_model_and_tokenizer(out / "classify_best.pth")
    context = model.config.max_seq_len
    with torch.no_grad():  # one text at a time, unpadded
        logits = torch.stack([model(torch.tensor([data_loader.encode_for_classification(tokenizer, r["text"],
                                                                                         context)[0]]))[0]
                              for r in test_records])
    predicted = [model.labels[i] for i in logits.argmax(-1).tolist()]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, test_records)) / len(test_records)
    assert accuracy == pytest.approx(summary["accuracy"])

    report_path = tmp_path / "report.json"
    code = evaluator.main(["--model_type", "classify", "--model_path", str(out / "classify_best.pth"),
                           "--test_data_path", str(test), "--output", str(report_path), "--device", "cpu",
                           "--no_progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "confusion matrix" in printed and "precision/speech" in printed
    report = json.loads(report_path.read_text(encoding="utf-8"))["results"][0]
    assert report["accuracy"] == pytest.approx(accuracy)
    confusion = torch.tensor(report["confusion_matrix"])
    for i, label in enumerate(report["labels"]):  # rows are the true classes
        rows = [j for j, r in enumerate(test_records) if r["label"] == label]
        assert confusion[i].tolist() == [sum(predicted[j] == other for j in rows) for other in report["labels"]]

    code = evaluator.main(["--model_type", "sft", "--model_path", str(out / "classify_best.pth"),
                           "--test_data_path", str(test), "--output", str(report_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "is a classifier: use --model_type classify" in err and "Traceback" not in err


def test_classify_cli_errors_are_one_line(pretrained, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1}])
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "a", "label": "z"}])
    base = ["--mode", "classify", "--pretrained_model", str(pretrained), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--device", "cpu"]
    cases = {"missing or non-string field 'label'": ["--classify_train", str(bad), "--classify_test", str(good)],
             "not one of the model's classes": ["--classify_train", str(good), "--classify_test", str(unseen)],
             "exceeds the model's 1 blocks": ["--classify_train", str(good), "--classify_test", str(good),
                                              "--trainable_blocks", "2"]}
    for expected, extra in cases.items():
        code = ft.main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_second_classify_run_into_the_same_folder_moves_the_first_ones_confusion_chart_aside(pretrained, tmp_path,
                                                                                              capsys):
    train = write_jsonl(tmp_path / "train.jsonl", two_class_slice("train", 8))
    test = write_jsonl(tmp_path / "test.jsonl", two_class_slice("test", 4))
    out = tmp_path / "cls"
    argv = ["--mode", "classify", "--pretrained_model", str(pretrained), "--classify_train", str(train),
            "--classify_test", str(test), "--output_dir", str(out), "--max_steps", "2", "--eval_interval", "2",
            "--batch_size", "4", "--device", "cpu"]
    assert ft.main(argv) == 0
    first = (out / "confusion_matrix.png").read_bytes()
    assert ft.main(argv + ["--seed", "1"]) == 0
    capsys.readouterr()
    (archive,) = (out / "previous").iterdir()
    assert (archive / "confusion_matrix.png").read_bytes() == first  # the first run's chart, whole
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
