"""Bad input as a user gives it, across every CLI: exit 2, one `error:` line, no traceback, earlier outputs intact.

One table holds the bad flags of every command converted to ``cli.ArgumentParser`` (the evaluator, the data builders,
the checkpoint inspector, the quantizer, the generation CLI, the tokenizer trainer, every benchmark): wrong type, out
of range, unknown (the retired spellings of --num_threads and --max_new_tokens among them), a missing value or a
missing required flag.

Also the Python API's type/range checks, and what interruption does: Ctrl-C / SIGTERM save and resume, kill -9
during training and during a save leaves no stale temp files and resumes exactly.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import byte_level_bpe
import checkpoints
import cli
import decoding
import evaluator
import gpt_model
import pretrain_trainer as pt
import training
from byte_level_bpe import ByteLevelBPETokenizer, TokenizerError
from conftest import ROOT, TRAIN_TXT, VAL_TXT, corpus_lines, write_corpus
from run_folder import read_metrics
from test_readers import MANY, corrupt_row_group, truncated, write_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 400, 30)


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (what 'left as it was' means)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") or ": error: " in last, err  # ours, or argparse's "prog: error: ..."


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects bad values before anything runs
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture()
def earlier_run(tiny_tokenizer, tmp_path) -> Path:
    """An output folder holding a finished earlier run: best + step checkpoints, metrics, curve, tokenizer."""
    folder = tmp_path / "earlier"
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=32,
                                                               n_layers=1, d_model=32, n_heads=2))
    checkpoints.save_checkpoint(folder / "pretrain_best.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "val_loss": 4.0}\n')
    (folder / "loss_curve.png").write_bytes(b"\x89PNG earlier")
    tiny_tokenizer.save(folder / "tokenizer")
    return folder


# ----------------------------------------------------------------------------- pretrain_trainer

def pretrain_args(corpus, tokenizer_dir, output_dir, *extra: str) -> list[str]:
    train, val = corpus
    return ["--train_data_dir", str(train), "--val_data_dir", str(val), "--tokenizer_dir", str(tokenizer_dir),
            "--output_dir", str(output_dir), "--device", "cpu", "--num_workers", "1", "--n_layers", "1",
            "--d_model", "32", "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "2", "--samples", "0", *extra]


BAD_PRETRAIN_FLAGS = [
    ["--optimizer", "sgd"], ["--optimizer"],
    ["--batch_size", "0"], ["--grad_accum", "0"], ["--max_seq_len", "1"], ["--eval_interval", "0"],
    ["--log_interval", "0"], ["--max_steps", "-1"], ["--max_steps", "0"], ["--epochs", "-1"], ["--epochs", "0"],
    ["--lr", "0"], ["--lr", "nan"], ["--lr", "abc"], ["--max_minutes", "0"], ["--dropout", "1.5"],
    ["--preset", "huge"], ["--dtype", "int3"], ["--keep_last", "-1"], ["--warmup_steps", "-5"],
    ["--num_workers", "0"], ["--save_interval", "0"], ["--vocab_size", "10"], ["--min_lr_ratio", "2"],
    ["--n_heads", "3"], ["--max_minutes", "0.001"], ["--text_field", ""], ["--text_field", "text "],
]


@pytest.mark.parametrize("flags", BAD_PRETRAIN_FLAGS, ids=lambda f: " ".join(f))
def test_pretrain_bad_flags_are_one_line_and_leave_the_folder_as_it_was(flags, corpus, tiny_tokenizer_dir,
                                                                        earlier_run, capsys):
    before = snapshot(earlier_run)
    code, err = run_main(pt.main, pretrain_args(corpus, tiny_tokenizer_dir, earlier_run, "--max_steps", "3", *flags),
                         capsys)
    assert_one_line_error(code, err)
    assert snapshot(earlier_run) == before


def test_pretrain_bad_data_and_paths(corpus, tiny_tokenizer_dir, earlier_run, tmp_path, capsys):
    before = snapshot(earlier_run)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"good line\ncaf\xe9 au lait\n")
    cases = {
        "data path": ["--train_data_dir", str(tmp_path / "missing.txt")],
        f"{latin1}:2: not UTF-8": ["--train_data_dir", str(latin1)],
        "is an existing file": ["--output_dir", str(earlier_run / "metrics.jsonl")],
        "not found": ["--resume", str(tmp_path / "missing.pth")],
        "no training state": ["--resume", str(earlier_run / "pretrain_best.pth")],
    }
    for expected, extra in cases.items():
        args = pretrain_args(corpus, tiny_tokenizer_dir, earlier_run, "--max_steps", "3")
        code, err = run_main(pt.main, args + extra, capsys)
        assert_one_line_error(code, err)
        assert expected in err, (expected, err)
    assert snapshot(earlier_run) == before


def test_read_only_token_cache_names_the_flag(corpus, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda path, mode: False if str(path).endswith(".cache") else real_access(path, mode))
    fresh = tmp_path / "fresh_corpus"
    fresh.mkdir()
    (fresh / "train.txt").write_text(corpus[0].read_text(encoding="utf-8"), encoding="utf-8")
    args = pretrain_args(corpus, tiny_tokenizer_dir, tmp_path / "out", "--max_steps", "2")
    code, err = run_main(pt.main, args + ["--train_data_dir", str(fresh / "train.txt")], capsys)
    assert_one_line_error(code, err)
    assert "token cache" in err and "--cache_dir" in err


def test_resume_checkpoint_that_does_not_fit(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert pt.main(pretrain_args(corpus, tiny_tokenizer_dir, out, "--max_steps", "2", "--eval_interval", "2")) == 0
    capsys.readouterr()
    step = out / "pretrain_step_2.pth"
    code, err = run_main(pt.main, pretrain_args(corpus, tiny_tokenizer_dir, out, "--max_steps", "4", "--d_model", "64",
                                                "--resume", str(step)), capsys)
    assert_one_line_error(code, err)
    assert "--d_model 64 differs from the checkpoint's 32" in err

    checkpoint = torch.load(step, weights_only=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    bad_tensors = dict(checkpoint, model_state_dict={k: v[:1] if v.dim() else v
                                                     for k, v in checkpoint["model_state_dict"].items()})
    torch.save(bad_tensors, broken / "pretrain_step_2.pth")
    no_state = {k: v for k, v in checkpoint.items() if k != "rank_states"}
    torch.save(no_state, broken / "no_state.pth")
    bad_optimizer = dict(checkpoint, optimizer={**checkpoint["optimizer"], "muon": {"state": {}, "param_groups": []}})
    torch.save(bad_optimizer, broken / "bad_optimizer.pth")
    (broken / "corrupt.pth").write_bytes(b"not a checkpoint")
    for name, expected in (("pretrain_step_2.pth", "has shape"), ("no_state.pth", "no training state"),
                           ("bad_optimizer.pth", "training state does not fit"), ("corrupt.pth", "corrupt")):
        args = pretrain_args(corpus, tiny_tokenizer_dir, out, "--max_steps", "4", "--resume", str(broken / name))
        code, err = run_main(pt.main, args, capsys)
        assert_one_line_error(code, err)
        assert expected in err, (name, err)


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


def test_resume_auto_with_only_a_best_model_starts_fresh_and_keeps_it(corpus, tiny_tokenizer, earlier_run, capsys):
    before = snapshot(earlier_run)
    config = pt.TrainConfig(train_data=str(corpus[0]), val_data=None, output_dir=str(earlier_run), n_layers=1,
                            d_model=32, n_heads=2, max_seq_len=32, batch_size=2, max_steps=2, eval_interval=2,
                            device="cpu", dtype="float32", num_workers=1)
    trainer = pt.GPTTrainer(config, tiny_tokenizer, resume="auto", show_progress=False)
    assert "no pretrain_step_N.pth" in capsys.readouterr().out
    trainer.train()
    (archive,) = (earlier_run / "previous").iterdir()
    assert snapshot(archive)["pretrain_best.pth"] == before["pretrain_best.pth"]


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


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, tiny_tokenizer, tmp_path):
    config = pt.TrainConfig(train_data=str(corpus[0]), val_data=None, output_dir=str(tmp_path), n_layers=1,
                            d_model=32, n_heads=2, max_seq_len=32, batch_size=2, max_steps=20, save_interval=2,
                            eval_interval=100, log_interval=5, device="cpu", dtype="float32", num_workers=1)
    trainer = pt.GPTTrainer(config, tiny_tokenizer, show_progress=False)
    normal = trainer.strategy.loss_fn  # pretraining's SupervisedStep
    trainer.strategy.loss_fn = lambda model, batch: normal(model, batch) * (float("nan") if trainer.step >= 3 else 1.0)
    with pytest.raises(training.TrainError, match=r"non-finite .* by step 4: lower --lr"):
        trainer.train()
    good = checkpoints.load_checkpoint(tmp_path / "pretrain_step_2.pth")
    assert good["step"] == 2 and all(torch.isfinite(v).all() for v in good["model_state_dict"].values())
    assert not (tmp_path / "pretrain_step_4.pth").exists()


# ----------------------------------------------------------------------------- byte_level_bpe

def test_tokenizer_cli_errors_leave_the_existing_tokenizer_as_it_was(tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir).save(out)
    before = snapshot(out)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(corpus_lines(limit=50)), encoding="utf-8")
    cases = [["--input", str(text), "--num_workers", "0"], ["--input", str(text), "--vocab_size", "abc"],
             ["--input", str(text), "--vocab_size", "100"], ["--input", str(text), "--min_frequency", "0"],
             ["--input", str(tmp_path / "missing.txt")], ["--input", str(empty)]]
    for extra in cases:
        code, err = run_main(byte_level_bpe.main, ["--output", str(out), *extra], capsys)
        assert_one_line_error(code, err)
    assert snapshot(out) == before
    for target in (a_file, a_file / "sub"):
        code, err = run_main(byte_level_bpe.main, ["--input", str(text), "--output", str(target)], capsys)
        assert_one_line_error(code, err)
    assert a_file.read_text() == "x"


def test_tokenizer_save_is_all_or_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "tok"
    tiny_tokenizer.save(out)
    (out / "README.md").write_text("mine")
    before = snapshot(out)
    other = ByteLevelBPETokenizer(vocab_size=300)
    other.train(corpus_lines(limit=50), show_progress=False)
    real_write = Path.write_text

    def crash_on_merges(self, *args, **kwargs):
        if self.name == "merges.txt":
            raise OSError(28, "No space left on device", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", crash_on_merges)
    with pytest.raises(OSError):
        other.save(out)
    monkeypatch.undo()
    assert snapshot(out) == before  # vocab.json was written, but only inside the temporary folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    other.save(out)
    assert ByteLevelBPETokenizer.from_pretrained(out).fingerprint == other.fingerprint
    assert (out / "README.md").read_text() == "mine"  # the user's other files are kept


# ----------------------------------------------------------------------------- evaluator

@pytest.fixture()
def checkpoint(tiny_tokenizer, tiny_tokenizer_dir, tmp_path) -> Path:
    import shutil

    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer),
                                                               max_seq_len=32, n_layers=1, d_model=32, n_heads=2))
    path = tmp_path / "ckpt" / "model.pth"
    checkpoints.save_checkpoint(path, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    shutil.copytree(tiny_tokenizer_dir, path.parent / "tokenizer")
    return path


def test_evaluator_bad_files(checkpoint, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"fine\n\xff\xfe\n")
    good = tmp_path / "val.txt"
    good.write_text("\n".join(corpus_lines(VAL_TXT, limit=3)), encoding="utf-8")
    cases = {f"{latin1}:2": ["--model_path", str(checkpoint), "--test_data_path", str(latin1)],
             "is a folder": ["--model_path", str(checkpoint), "--test_data_path", str(good), "--output", str(tmp_path)],
             "not found": ["--model_path", str(tmp_path / "missing.pth"), "--test_data_path", str(good)]}
    for expected, args in cases.items():
        code, err = run_main(evaluator.main, args + ["--no_progress"], capsys)
        assert_one_line_error(code, err)
        assert expected in err, (expected, err)


BAD_CORPORA = {  # file name -> (how to spoil documents written in that format, where the error must point)
    "t.jsonl.gz": (lambda path: truncated(path), r"t.jsonl.gz:"),
    "t.jsonl.zst": (lambda path: truncated(path), r"t.jsonl.zst:"),
    "c.parquet": (lambda path: truncated(path), "c.parquet: not a readable Parquet file"),
    "r.parquet": (lambda path: corrupt_row_group(path, 1), "r.parquet: row group 1: cannot read"),
    "f.jsonl": (lambda path: path.write_text('{"text": "ok"}\n{"text": 7}\n'), "f.jsonl:2: expected"),
}


@pytest.mark.parametrize("name", BAD_CORPORA)
def test_a_bad_corpus_file_is_one_error_line_naming_it_in_the_tokenizer_and_the_evaluator(name, checkpoint, tmp_path,
                                                                                          capsys):
    path = write_docs(tmp_path / "corpus" / name, MANY, row_group_size=1000)
    spoil, where = BAD_CORPORA[name]
    spoil(path)
    code, err = run_main(byte_level_bpe.main, ["--input", str(path.parent), "--output", str(tmp_path / "tok")], capsys)
    assert_one_line_error(code, err)
    assert f"{path.parent}/{where}" in err and not (tmp_path / "tok").exists()
    code, err = run_main(evaluator.main, ["--model_path", str(checkpoint), "--test_data_path", str(path),
                                          "--output", str(tmp_path / "report.json"), "--no_progress"], capsys)
    assert_one_line_error(code, err)
    assert f"{path.parent}/{where}" in err and not (tmp_path / "report.json").exists()


# ----------------------------------------------------------------------------- data/build_pretrain_data.py

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


# ----------------------------------------------------------------------------- every converted CLI: one table

# command -> (module whose main() runs it, the valid flags each case starts from). In the flags and the cases,
# {ckpt} is a tiny checkpoint (tokenizer beside it), {sft} an SFT .json, {text} a small corpus, {afile} a plain file
# (all in a shared folder that must stay as it was), {out} the test's own empty folder, which must stay empty.
COMMANDS = {
    "evaluator": ("evaluator", ["--model_path", "{ckpt}", "--model_type", "sft", "--test_data_path", "{sft}",
                                "--output", "{out}/report.json", "--do_sample", "--no_progress"]),
    "build_pretrain_data": ("data.build_pretrain_data", ["--corpus", "{out}/corpus", "--output", "{out}/pretrain"]),
    "build_sft_data": ("data.sft.build_sft_data", ["--corpus", str(TRAIN_TXT), "--output_dir", "{out}/sft"]),
    "build_classify_data": ("data.classify.build_classify_data",
                            ["--corpus", str(TRAIN_TXT), "--output_dir", "{out}/classify"]),
    "checkpoints": ("checkpoints", []),
    "quantizer": ("inference.quantizer", ["--model_path", "{ckpt}", "--output", "{out}/int8.pth", "--no_eval"]),
    "kv_cache_infer": ("inference.kv_cache_infer", ["--model_path", "{ckpt}", "--prompt", "ROMEO:", "--device", "cpu"]),
    "byte_level_bpe": ("byte_level_bpe", ["--input", "{text}", "--output", "{out}/tokenizer"]),
    "export": ("inference.export", ["--model_path", "{ckpt}", "--format", "hf", "--output", "{out}/hf"]),
    "bench_classify": ("benchmarks.bench_classify", ["--pretrained", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_dpo_beta": ("benchmarks.bench_dpo_beta", ["--sft_model", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_finetune": ("benchmarks.bench_finetune", ["--pretrained", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_generate": ("benchmarks.bench_generate", ["--shapes", "tiny", "--devices", "cpu"]),
    "bench_inference": ("benchmarks.bench_inference", ["--shape", "tiny", "--no_ct2"]),
    "bench_rlvf_lr": ("benchmarks.bench_rlvf_lr", ["--sft_model", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_rlvf_room": ("benchmarks.bench_rlvf_room", ["--pretrained", "main={ckpt}", "--workdir", "{out}/work"]),
    "bench_peers": ("benchmarks.bench_peers", ["--skip_servers"]),
    "bench_docker": ("benchmarks.bench_docker", ["--model_path", "{ckpt}"]),
    "bench_chat": ("benchmarks.bench_chat", ["--pretrained", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_tools": ("benchmarks.bench_tools", ["--sft_model", "{ckpt}", "--limit", "1"]),
    "screenshot_chat": ("benchmarks.screenshot_chat", ["--model_path", "{ckpt}", "--output", "{out}/chat.png"]),
    "bench_server": ("benchmarks.bench_server", ["--model_path", "{ckpt}", "--skip_baseline", "--duration", "1"]),
    "bench_equivalence": ("benchmarks.bench_equivalence", ["--against", "HEAD", "--stages", "sft"]),
    "bench_tokenizer": ("benchmarks.bench_tokenizer", ["--input", "{text}"]),
    "bench_scale": ("benchmarks.bench_scale", ["--sizes_mb", "1", "--work_dir", "{out}/work"]),
    "bench_optimizer": ("benchmarks.bench_optimizer", ["--seeds", "1", "--skip_default_runs"]),
    "bench_train": ("benchmarks.bench_train", ["--steps", "1"]),
    "download": ("data.download", ["--endpoint", "http://127.0.0.1:9", "--output", "{out}/hf", "--list"]),
    "convert_chat": ("data.convert_chat", ["{sft}", "{out}/chat.jsonl", "--no_progress"]),
    "gpu_check": ("benchmarks.gpu_check", ["--dry_run", "--work_dir", "{out}/work", "--output", "{out}/gpu.json"]),
}

# The retired spellings, assembled so that a grep for them finds only code that still uses them.
OLD_THREADS, OLD_MAX_GEN_LEN, OLD_MIN_GEN_LEN = "--" + "threads", "--" + "max_gen_len", "--" + "min_gen_len"

# (command, flags added to its valid ones, flags dropped from them). Each must fail before any work starts.
BAD_FLAGS = [
    *[("evaluator", flags, ()) for flags in (
        ["--top_p", "0"], ["--top_p", "2"], ["--top_k", "-1"], ["--top_k", "x"], ["--temperature", "0"],
        ["--temperature", "inf"], ["--batch_size", "0"], ["--max_new_tokens", "0"], ["--max_new_tokens", "ten"],
        ["--max_samples", "0"], ["--seed", "-1"], ["--seed", "abc"], ["--num_threads", "0"], ["--num_threads", "two"],
        ["--best_of", "0"], ["--best_of_scorer", "x"], ["--model_type", "ppo"], ["--dtype", "int4"],
        ["--device", "tpu"], [OLD_MAX_GEN_LEN, "8"], [OLD_THREADS, "2"], ["--output"])],
    ("evaluator", [], ("--test_data_path",)), ("evaluator", [], ("--model_path",)),
    *[("build_pretrain_data", flags, ()) for flags in (
        ["--bogus"], ["--num_threads", "2"], ["--corpus"], ["--output", "{afile}"], ["--corpus", "{out}/missing"])],
    *[("build_sft_data", flags, ()) for flags in (
        ["--seed", "-1"], ["--seed", "x"], ["--arithmetic_train", "-1"], ["--arithmetic_test", "1.5"],
        ["--arithmetic_rl", "-5"], ["--pairwise_arithmetic", "x"], ["--speaker_train", "-1"], ["--speaker_test", "x"],
        ["--mixed_excerpts_train", "-1"], ["--chat_sums_train", "-1"], ["--chat_sums_test", "x"],
        ["--arithmetic_chat_form", "json"], ["--arithmetic_chat_form"],
        ["--num_threads", "2"], ["--output_dir", "{afile}"],
        ["--corpus", "{out}/missing.txt"], ["--output_dir"])],
    *[("build_classify_data", flags, ()) for flags in (
        ["--seed", "-1"], ["--seed", "1.5"], ["--max_train", "0"], ["--max_test", "x"], ["--bogus", "1"],
        ["--output_dir", "{afile}"], ["--corpus", "{out}/missing.txt"], ["--corpus"])],
    *[("checkpoints", flags, ()) for flags in (
        [], ["--bogus", "{ckpt}"], ["{text}"], ["{out}/missing.pth"])],
    *[("quantizer", flags, ()) for flags in (
        ["--batch_size", "0"], ["--batch_size", "x"], ["--max_samples", "-1"], ["--num_threads", "0"],
        [OLD_THREADS, "2"], ["--output", "{ckpt}"])],
    ("quantizer", [], ("--model_path",)), ("quantizer", [], ("--output",)),
    *[("kv_cache_infer", flags, ()) for flags in (
        ["--max_new_tokens", "0"], ["--max_new_tokens", "x"], [OLD_MAX_GEN_LEN, "5"], ["--temperature", "0"],
        ["--top_k", "-1"], ["--top_p", "0"], ["--top_p", "1.5"], ["--repetition_penalty", "0"],
        ["--repetition_penalty", "1e-45"], ["--seed", "-1"], ["--num_threads", "0"], [OLD_THREADS, "1"],
        ["--interactive"])],
    ("kv_cache_infer", [], ("--model_path",)),
    *[("byte_level_bpe", flags, ()) for flags in (
        ["--vocab_size", "abc"], ["--vocab_size", "100"], ["--min_frequency", "0"], ["--num_workers", "0"],
        ["--num_threads", "2"], ["--input", "{out}/missing.txt"], ["--output", "{afile}"])],
    *[("export", flags, ()) for flags in (
        ["--format", "onnx"], ["--format"], ["--type", "q4_0"], ["--type", "q8_0"], ["--output", "{ckpt}"],
        ["--output", "{ckpt}", "--overwrite"], ["--output", "{folder}", "--overwrite"],
        ["--output", "{folder}/tokenizer", "--overwrite"], ["--output", "{afile}", "--format", "gguf"],
        ["--model_path", "{text}"], ["--model_path", "{out}/missing.pth"], ["--tokenizer_dir", "{out}/missing"],
        ["--bogus"])],
    ("export", [], ("--format",)), ("export", [], ("--output",)), ("export", [], ("--model_path",)),
    *[("bench_classify", flags, ()) for flags in (
        ["--num_threads", "0"], ["--num_threads", "x"], [OLD_THREADS, "2"], ["--workdir"])],
    *[("bench_dpo_beta", flags, ()) for flags in (["--betas", "0"], ["--betas", "x"], ["--betas"], [OLD_THREADS, "2"])],
    *[("bench_finetune", flags, ()) for flags in (
        ["--seeds", "-1"], ["--seeds", "a"], ["--stages", "sft", "nope"], [OLD_THREADS, "2"])],
    *[("bench_generate", flags, ()) for flags in (
        ["--prompt_len", "0"], ["--new_tokens", "-1"], ["--repeats", "0"], ["--batch_sizes", "1,x"],
        ["--batch_sizes", "0"], ["--batch_sizes", ""], ["--shapes", "huge"], ["--devices", "tpu"],
        ["--uncached_samples", "1"], ["--num_threads", "0"], [OLD_THREADS, "1"])],
    *[("bench_inference", flags, ()) for flags in (
        ["--shape", "huge"], ["--repeats", "0"], ["--num_threads", "0"], ["--kernel_threads", "0"], ["--stagger", "0"],
        ["--joining", "1,x"], ["--compile_shapes", "huge"], ["--new_tokens", "x"], [OLD_THREADS, "2"])],
    *[("bench_rlvf_lr", flags, ()) for flags in (["--lrs", "0"], ["--lrs", "x"], ["--lrs"], ["--bogus"])],
    *[("bench_rlvf_room", flags, ()) for flags in (
        ["--pretrained", "noequals"], ["--train_sums", "-1"], ["--test_sums", "0"], ["--seeds", "x"],
        ["--num_threads", "0"], ["--lr_runs", "0"], [OLD_THREADS, "2"])],
    ("bench_rlvf_room", [], ("--pretrained",)),
    *[("bench_server", flags, ()) for flags in (
        ["--duration", "0"], ["--users", "1,0"], ["--users", "x"], ["--min_new_tokens", "0"],
        ["--max_new_tokens", "x"], [OLD_MAX_GEN_LEN, "48"], ["--num_threads", "0"], [OLD_THREADS, "2"],
        ["--port", "0"])],
    *[("bench_peers", flags, ()) for flags in (
        ["--num_threads", "0"], ["--new_tokens", "x"], ["--repeats", "0"], ["--context", "64"], ["--users", "1,x"],
        ["--users", "0"], ["--duration", "0"], ["--max_tokens", "-1"], [OLD_THREADS, "2"])],
    *[("bench_chat", flags, ()) for flags in (
        ["--seeds", "x"], ["--seeds", "-1"], ["--num_threads", "0"], ["--pretrained", "{out}/missing.pth"],
        ["--bogus"])],
    *[("bench_tools", flags, ()) for flags in (
        ["--seeds", "x"], ["--num_threads", "0"], ["--limit", "0"], ["--max_new_tokens", "x"], ["--batch_size", "0"],
        ["--sft_max_steps", "0"], ["--sft_model", "{out}/missing.pth"], ["--chat_test", "{out}/missing.json"],
        ["--pretrained", "{ckpt}"], ["--bogus"])],
    *[("screenshot_chat", flags, ()) for flags in (["--model_path", "{out}/missing.pth"], ["--bogus"])],
    *[("bench_docker", flags, ()) for flags in (
        ["--requests", "0"], ["--requests", "x"], ["--model_path", "{out}/missing.pth"], ["--bogus"])],
    *[("bench_equivalence", flags, ()) for flags in (["--stages", "ppo"], ["--stages"], ["--against"], ["--bogus"])],
    *[("bench_tokenizer", flags, ()) for flags in (
        ["--slice_mb", "0"], ["--slice_mb", "x"], ["--input", "{out}/missing.txt"], ["--bogus"])],
    *[("bench_optimizer", flags, ()) for flags in (
        ["--seeds", "0"], ["--seeds", "x"], ["--short_minutes", "0"], ["--adamw_lrs", "0"], ["--muon_lrs", "x"],
        ["--recipe", "gpt3"], ["--bogus"])],
    *[("bench_scale", flags, ()) for flags in (
        ["--sizes_mb", "0"], ["--sizes_mb", "x"], ["--vocab_size", "10"], ["--encode_mb", "0"], ["--bogus"],
        ["--reuse_training", "--output", "{out}/missing.json"])],
    *[("bench_train", flags, ()) for flags in (
        ["--steps", "0"], ["--steps", "x"], ["--num_threads", "0"], ["--vocab_size", "x"], [OLD_THREADS, "2"])],
    *[("gpu_check", flags, ()) for flags in (
        ["--steps", "bogus"], ["--steps", "device,bogus"], ["--steps", ""], ["--steps", ","], ["--max_minutes", "0"],
        ["--max_minutes", "x"], ["--num_threads", "0"], ["--output", "{folder}"], ["--step", "bogus"], ["--bogus"])],
]


# ----- issue 24, hostile files / full disk / colliding paths (branch issue24-files) --------------------------------
# An output is never one of the command's inputs, two outputs are never the same path, and an existing file the
# command did not write needs --overwrite (cli.check_outputs); the new flags' bad values.
BAD_FLAGS += [
    *[("evaluator", flags, ()) for flags in (
        ["--output", "{sft}"], ["--output", "{ckpt}"], ["--output", "{folder}/tokenizer/vocab.json"],
        ["--plot", "{out}/report.json"], ["--output", "{afile}"], ["--plot", "{afile}"], ["--overwrite", "x"],
        ["--output", "{sft}", "--overwrite"], ["--compare", "{ckpt}", "--output", "{ckpt}", "--overwrite"])],
    *[("quantizer", flags, ()) for flags in (
        ["--output", "{afile}"], ["--output", "{text}"], ["--output", "{folder}/tokenizer/merges.txt"],
        ["--output", "{ckpt}", "--overwrite"], ["--output", "{folder}"], ["--overwrite", "x"])],
    ("quantizer", ["--test_data_path", "{afile}", "--output", "{afile}", "--overwrite"], ("--no_eval",)),
    *[("byte_level_bpe", flags, ()) for flags in (["--output", "{folder}"],)],
    *[("kv_cache_infer", flags, ()) for flags in (["--max_message_chars", "0"], ["--max_message_chars", "x"],
                                                  ["--no_calculator"], ["--no_calculator", "x"])],
]


# ----- issue 25, every corpus format (branch scale-readers): the field / column and the tokenizer's byte cap --------
BAD_FLAGS += [
    *[("byte_level_bpe", flags, ()) for flags in (
        ["--text_field", ""], ["--text_field", " text"], ["--text_field"], ["--max_train_bytes", "0"],
        ["--max_train_bytes", "-5"], ["--max_train_bytes", "1e9"], ["--max_train_bytes", "x"])],
    *[("evaluator", flags, ()) for flags in (["--text_field", ""], ["--text_field"])],
    ("quantizer", ["--text_field", ""], ()),
]


# ----- standard benchmarks (evaluator --tasks): an unknown task, a missing or unreadable file, bad --limit / few-shot
BAD_FLAGS += [
    *[("evaluator", flags, ()) for flags in (
        ["--tasks", "winogrande={sft}"], ["--tasks", "hellaswag={out}/missing.jsonl"], ["--tasks", "hellaswag"],
        ["--tasks", "hellaswag={sft}"], ["--tasks", "mmlu={text}"], ["--tasks", "mmlu={folder}"],
        ["--tasks", "mmlu={afile},mmlu={afile}"], ["--tasks", "gsm8k={out}/g.jsonl", "--model_type", "reward"],
        ["--tasks"], ["--limit", "0"], ["--limit", "x"], ["--num_fewshot", "-1"], ["--num_fewshot", "two"])],
    ("evaluator", ["--tasks", "mmlu={out}/missing.csv"], ("--test_data_path",)),
    ("evaluator", ["--tasks", "mmlu={folder}", "--plot", "{out}/c.png"], ("--test_data_path",)),
]

# ----- real corpora and chat data: the downloader and the chat converter (each fails before any request or write) --
BAD_FLAGS += [
    *[("download", flags, ()) for flags in (
        ["--shards", "0"], ["--shards", "x"], ["--max_gb", "0"], ["--max_gb", "-1"], ["--max_gb", "nan"],
        ["--workers", "0"], ["--retries", "-1"], ["--timeout", "0"], ["--endpoint", "ftp://mirror"],
        ["--endpoint", "huggingface.co"], ["--endpoint"], ["--dataset", "fineweb"], ["--dataset", "a/b/c"],
        ["--files"], ["--files", "*.parquet", "--config", "default"], ["--split", "train"], ["--output", "{afile}"],
        ["--list", "x"], ["--bogus"])],
    *[("convert_chat", flags, ()) for flags in (
        ["--format", "xml"], ["--format"], ["{out}/chat.txt"], ["{out}/missing.json", "{out}/other.jsonl"],
        ["--skip_bad", "{afile}"], ["--bogus"])],
]


def case_id(case: tuple) -> str:
    command, flags, dropped = case
    return f"{command}: " + " ".join([*flags, *(f"without {flag}" for flag in dropped)] or ["no arguments"])


@pytest.fixture(scope="module")
def shared(tiny_tokenizer, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """What the commands read: a tiny checkpoint with its tokenizer, an SFT file, a small corpus, a plain file."""
    import shutil

    folder = tmp_path_factory.mktemp("shared")
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer),
                                                               max_seq_len=32, n_layers=1, d_model=32, n_heads=2))
    checkpoints.save_checkpoint(folder / "model.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    shutil.copytree(tiny_tokenizer_dir, folder / "tokenizer")
    (folder / "sft.json").write_text(json.dumps([{"instruction": "a", "response": "b"}]), encoding="utf-8")
    (folder / "text.txt").write_text("\n".join(corpus_lines(limit=50)) + "\n", encoding="utf-8")
    (folder / "a_file").write_text("x")
    return {"ckpt": folder / "model.pth", "sft": folder / "sft.json", "text": folder / "text.txt",
            "afile": folder / "a_file", "folder": folder}


def command_line(command: str, flags: list[str], dropped: tuple[str, ...], places: dict[str, Path]) -> list[str]:
    """The command's valid flags without ``dropped`` (each with its value), plus ``flags``; placeholders filled."""
    base = COMMANDS[command][1]
    kept, skip = [], False
    for i, arg in enumerate(base):
        if skip:
            skip = False
        elif arg in dropped:
            skip = i + 1 < len(base) and not base[i + 1].startswith("--")
        else:
            kept.append(arg)
    return [arg.format(**places) for arg in kept + flags]


@pytest.mark.parametrize("case", BAD_FLAGS, ids=case_id)
def test_bad_flags_of_every_converted_cli(case, shared, tmp_path, capsys, monkeypatch):
    command, flags, dropped = case
    main = importlib.import_module(COMMANDS[command][0]).main
    monkeypatch.chdir(tmp_path)  # a relative default output would land here
    before = snapshot(shared["folder"])
    code = main(command_line(command, flags, dropped, {**{k: str(v) for k, v in shared.items()}, "out": tmp_path}))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err  # never argparse's usage block
    assert not captured.out  # no report, no JSON line
    assert not list(tmp_path.iterdir()), "a failed command wrote something"
    assert snapshot(shared["folder"]) == before


def test_the_table_covers_every_command_and_every_benchmark():
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem.startswith("bench_")}
    assert benchmarks <= set(COMMANDS), sorted(benchmarks - set(COMMANDS))
    assert {command for command, _, _ in BAD_FLAGS} == set(COMMANDS)


PARSER_MODULES = sorted(module for module, _ in COMMANDS.values() if module != "checkpoints")


@pytest.mark.parametrize("module", PARSER_MODULES)
def test_every_flag_has_help_and_the_parser_is_the_projects(module):
    parser = importlib.import_module(module).build_parser()
    assert isinstance(parser, cli.ArgumentParser) and issubclass(parser.formatter_class, cli.HelpFormatter)
    assert not [action.dest for action in parser._actions if not action.help]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert not flags & {OLD_THREADS, OLD_MAX_GEN_LEN, OLD_MIN_GEN_LEN}, module


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_exits_0_with_the_usage(command, capsys):
    module, _ = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python ")


# ----------------------------------------------------------------------------- the Python API

@pytest.mark.parametrize("call", [
    lambda tok: tok.decode([-1]), lambda tok: tok.decode(None), lambda tok: tok.decode(["a"]),
    lambda tok: tok.encode_ordinary(None), lambda tok: tok.encode(None), lambda tok: tok.train(None),
    lambda tok: tok.train([b"bytes"]), lambda tok: ByteLevelBPETokenizer(vocab_size="abc"),
    lambda tok: ByteLevelBPETokenizer(vocab_size=100), lambda tok: tok.encode("x", max_seq_len="9"),
    lambda tok: list(tok.encode_many(["x"], num_workers=0)), lambda tok: tok.train(["x"], min_frequency=0),
], ids=["decode-1", "decodeNone", "decodeStr", "encodeOrdNone", "encodeNone", "trainNone", "trainBytes",
        "vocabStr", "vocabSmall", "maxLenStr", "workers0", "minFreq0"])
def test_tokenizer_api_rejects_bad_input_with_a_value_error(call, tiny_tokenizer):
    with pytest.raises(TokenizerError):
        call(tiny_tokenizer)


@pytest.mark.parametrize("kwargs", [dict(top_k=-1), dict(top_p=0.0), dict(top_p=2.0), dict(temperature=0.0),
                                    dict(max_new_tokens=-1), dict(top_k="5"), dict(temperature=float("nan")),
                                    dict(repetition_penalty=0.0)], ids=str)
def test_generate_rejects_bad_settings_with_a_value_error(kwargs):
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=300, max_seq_len=16, n_layers=1))
    with pytest.raises(ValueError):
        decoding.generate(model, torch.tensor([[0, 5]]), decoding.SamplingParams(**{"max_new_tokens": 3, **kwargs}))
    with pytest.raises(ValueError):
        decoding.generate(model, None)


# ----------------------------------------------------------------------------- interruption (real processes)

SLOW_RUN = """
import sys, time, torch, training, pretrain_trainer as pt
delay, hang_at = float(sys.argv[1]), int(sys.argv[2])
step = training.SupervisedStep.__call__
def slow_step(self, trainer):
    time.sleep(delay)
    return step(self, trainer)
training.SupervisedStep.__call__ = slow_step
save = torch.save
def hanging_save(obj, path, *a, **k):
    if hang_at and obj.get("step") == hang_at and obj.get("optimizer") is not None:
        open(path, "wb").write(b"half a checkpoint")
        time.sleep(600)
    return save(obj, path, *a, **k)
torch.save = hanging_save
sys.exit(pt.main(sys.argv[3:]))
"""


def launch(args: list[str], delay: float = 0.0, hang_at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(delay), str(hang_at), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path_glob: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"{path_glob} never appeared: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)


def train_losses(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in read_metrics(folder / "metrics.jsonl") if "train_loss" in r]


def interruption_args(corpus, tokenizer_dir, out: Path, *extra: str) -> list[str]:
    return pretrain_args(corpus, tokenizer_dir, out, "--max_steps", "12", "--save_interval", "4",
                         "--eval_interval", "100", "--log_interval", "1", "--num_threads", "1", "--dropout", "0.1",
                         *extra)


@pytest.fixture(scope="module")
def straight_run(corpus, tiny_tokenizer_dir, tmp_path_factory) -> list[tuple[int, float]]:
    out = tmp_path_factory.mktemp("straight")
    process = launch(interruption_args(corpus, tiny_tokenizer_dir, out))
    assert process.wait(timeout=120) == 0, process.communicate()[1]
    return train_losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_the_run_resumes_exactly(signum, corpus, tiny_tokenizer_dir, straight_run,
                                                               tmp_path):
    out = tmp_path / "run"
    process = launch(interruption_args(corpus, tiny_tokenizer_dir, out), delay=0.1)
    wait_for(out / "pretrain_step_4.pth", process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (130 if signum == signal.SIGINT else 143), err
    assert "Traceback" not in err and "continue with --resume auto" in err
    saved = int(err.split("at step ")[1].split(":")[0])
    assert (out / f"pretrain_step_{saved}.pth").exists() and saved >= 4
    resumed = launch(interruption_args(corpus, tiny_tokenizer_dir, out, "--resume", "auto"))
    assert resumed.wait(timeout=120) == 0, resumed.communicate()[1]
    assert train_losses(out) == straight_run


@pytest.mark.slow
@pytest.mark.parametrize("during", ["training", "save"])
def test_kill_9_then_resume_auto_continues_exactly_without_stale_files(during, corpus, tiny_tokenizer_dir,
                                                                        straight_run, tmp_path):
    out = tmp_path / "run"
    if during == "training":
        process = launch(interruption_args(corpus, tiny_tokenizer_dir, out), delay=0.1)
        wait_for(out / "pretrain_step_4.pth", process)
    else:  # hangs half way through writing step 8's checkpoint
        process = launch(interruption_args(corpus, tiny_tokenizer_dir, out), hang_at=8)
        wait_for(out / ".pretrain_step_8.pth.*.tmp", process)
    process.kill()
    process.communicate(timeout=30)
    assert not (out / "pretrain_step_8.pth").exists() or during == "training"
    resumed = launch(interruption_args(corpus, tiny_tokenizer_dir, out, "--resume", "auto"))
    assert resumed.wait(timeout=120) == 0, resumed.communicate()[1]
    assert not [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".tmpdir", ".old"))]
    assert train_losses(out) == straight_run


def _encode_across_processes(argv) -> int:
    tokenizer = ByteLevelBPETokenizer(vocab_size=300)
    tokenizer.train(corpus_lines(limit=50), show_progress=False)
    for _ in range(3):  # each call starts a worker pool and shuts it down
        assert len(list(tokenizer.encode_many(corpus_lines(limit=200), num_workers=2))) == 200
    return 0


def _sigterm_handler_of_a_forked_child(argv) -> int:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what SIGTERM does there, then leaves without running any cleanup
        os.write(write, b"default" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"python")
        os._exit(0)
    os.waitpid(pid, 0)
    return {b"default": 0, b"python": 1}[os.read(read, 16)]


def test_a_forked_child_dies_on_sigterm_even_blocked_in_c():
    import cli

    assert cli.run_cli(_sigterm_handler_of_a_forked_child, []) == 0  # SIG_DFL there, the CLI's handler here


def test_forked_workers_shut_down_by_their_pool_exit_quietly(capfd):
    import cli

    assert cli.run_cli(_encode_across_processes, []) == 0
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- issue 24, class 1: the wrong kind of
# checkpoint. Every file says what it is; every entry point checks it once, up front, through checkpoints.load /
# checkpoints.load_resumable: exit 2, one line saying what was given and what to pass instead, nothing written.

FAKE_TRAINING_STATE = dict(step=2, optimizer={"state": {}, "param_groups": []}, scaler={}, best_val_loss=1.0,
                           scheduler={"train_seconds": 1.0, "max_steps": 4}, rank_states=[{"rng": {}}])


@pytest.fixture(scope="module")
def kinds(tiny_tokenizer, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """One file of every kind (weights-only models and each stage's step file, with a stand-in training state: the
    checks come before it is read), a reward model on another tokenizer, and small data files for every mode."""
    import shutil

    import lora
    import model_heads
    from quantization import quantize_model_int8

    folder = tmp_path_factory.mktemp("kinds")
    shutil.copytree(tiny_tokenizer_dir, folder / "tokenizer")
    config = gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64, n_layers=1,
                                             d_model=32, n_heads=2)
    torch.manual_seed(0)
    fp = {"tokenizer_fingerprint": tiny_tokenizer.fingerprint}
    lm = gpt_model.GPTModel(config)
    save = checkpoints.save_checkpoint
    save(folder / "lm.pth", lm, **fp)
    save(folder / "int8.pth", quantize_model_int8(gpt_model.GPTModel(config).eval()), **fp)
    adapted = lora.apply_lora(gpt_model.GPTModel(config), ["c_attn"], r=2, alpha=4.0)
    lora.save_lora(folder / "adapter.pth", adapted, base_model=str(folder / "lm.pth"), config=config.to_dict(), **fp)
    save(folder / "reward.pth", model_heads.GPTRewardModel.from_language_model(lm), **fp)
    classifier = model_heads.GPTClassifier.from_language_model(lm, ["a", "b"])
    save(folder / "classify.pth", classifier, labels=["a", "b"], **fp)
    heads = {"pretrain": lm, "sft": lm, "dpo": lm, "ppo": lm, "rlvf": lm,
             "reward": model_heads.GPTRewardModel.from_language_model(lm),
             "classify": model_heads.GPTClassifier.from_language_model(lm, ["a", "b"])}
    for stage, model in heads.items():
        save(folder / f"{stage}_step_2.pth", model, stage=stage, labels=["a", "b"], **fp, **FAKE_TRAINING_STATE)
    other = ByteLevelBPETokenizer(vocab_size=300)
    other.train(corpus_lines(limit=100), show_progress=False)
    (folder / "other").mkdir()
    other.save(folder / "other" / "tokenizer")
    other_lm = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(other), max_seq_len=64,
                                                                  n_layers=1, d_model=32, n_heads=2))
    save(folder / "other" / "reward.pth", model_heads.GPTRewardModel.from_language_model(other_lm),
         tokenizer_fingerprint=other.fingerprint)
    sft = [{"instruction": f"计算 {i} + 1 = ?", "response": str(i + 1), "task": "arithmetic"} for i in range(4)]
    (folder / "sft.json").write_text(json.dumps(sft, ensure_ascii=False), encoding="utf-8")
    pairs = [{"instruction": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    (folder / "pairs.json").write_text(json.dumps(pairs), encoding="utf-8")
    (folder / "cls.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n"
                                              for i in range(4)), encoding="utf-8")
    (folder / "text.txt").write_text("\n".join(corpus_lines(limit=50)) + "\n", encoding="utf-8")
    return {p.stem if p.parent == folder else f"other_{p.stem}": p for p in folder.rglob("*.pth")} | {
        "folder": folder, "sft_data": folder / "sft.json", "pairs": folder / "pairs.json", "cls": folder / "cls.jsonl",
        "text": folder / "text.txt"}


MODE_DATA = {"sft": ["--data_path", "{sft_data}", "--test_data_path", "{sft_data}"],
             "reward": ["--pairwise_data", "{pairs}", "--pairwise_test_data", "{pairs}"],
             "dpo": ["--pairwise_data", "{pairs}", "--pairwise_test_data", "{pairs}", "--test_data_path", "{sft_data}"],
             "rlhf": ["--pairwise_data", "{pairs}", "--test_data_path", "{sft_data}"],
             "rlvf": ["--data_path", "{sft_data}", "--test_data_path", "{sft_data}"],
             "classify": ["--classify_train", "{cls}", "--classify_test", "{cls}"]}
FROM = {"sft": "--pretrained_model", "classify": "--pretrained_model"}  # the other modes start from --sft_model


def ft(mode: str, *flags: str, start: str = "{lm}") -> tuple[str, list[str]]:
    extra = ["--reward_model", "{reward}"] if mode == "rlhf" and "--reward_model" not in flags else []
    return "finetune", ["--mode", mode, FROM.get(mode, "--sft_model"), start, *MODE_DATA[mode], *extra, *flags,
                        "--max_steps", "1", "--device", "cpu", "--output_dir", "{out}/run"]


def pt_resume(name: str) -> tuple[str, list[str]]:
    return "pretrain_trainer", ["--train_data_dir", "{text}", "--tokenizer_dir", "{folder}/tokenizer", "--output_dir",
                                "{out}/run", "--device", "cpu", "--n_layers", "1", "--d_model", "32", "--n_heads", "2",
                                "--max_seq_len", "64", "--max_steps", "1", "--num_workers", "1", "--samples", "0",
                                "--resume", name]


TRAINS = "an INT8 checkpoint, for inference only: it cannot be trained; pass the float checkpoint"
WRONG_KIND = [  # (what, (module, argv), the message's telling part)
    *[(f"{mode} {FROM.get(mode, '--sft_model')} INT8", ft(mode, start="{int8}"), TRAINS) for mode in MODE_DATA],
    *[(f"{mode} from a reward model", ft(mode, start="{reward}"), "is a reward model (written by finetune.py --mode "
       "reward), not a language model: pass a language model") for mode in ("sft", "dpo", "rlvf", "classify")],
    ("sft from a classifier", ft("sft", start="{classify}"), "is a classifier (written by finetune.py --mode "
     "classify), not a language model"),
    *[(f"{mode} --resume {stage} step", ft(mode, "--resume", f"{{{stage}_step_2}}"),
       f"is a step checkpoint of {stage} ") for mode, stage in (
        ("sft", "reward"), ("sft", "dpo"), ("sft", "pretrain"), ("dpo", "sft"), ("reward", "sft"), ("rlvf", "ppo"),
        ("rlhf", "rlvf"), ("classify", "sft"), ("classify", "reward"))],
    ("dpo --resume sft step names the command", ft("dpo", "--resume", "{sft_step_2}"),
     "continue it with `finetune.py --mode sft --resume"),
    ("sft --resume INT8", ft("sft", "--resume", "{int8}"), "is an INT8 language model, for inference only, not a "
     "step checkpoint of sft: pass a sft_step_N.pth"),
    ("sft --resume LoRA adapters", ft("sft", "--resume", "{adapter}"), "is LoRA adapters, for inference only"),
    ("sft --lora_r 2 --resume a full-model step", ft("sft", "--lora_r", "2", "--resume", "{sft_step_2}"),
     "trains the whole model (no LoRA), but this run has --lora_r 2"),
    ("rlhf --reward_model on another tokenizer", ft("rlhf", "--reward_model", "{other_reward}"),
     "was trained with another tokenizer"),
    ("rlhf --reward_model a language model", ft("rlhf", "--reward_model", "{lm}"), "not a reward model"),
    ("rlhf --reward_model a classifier", ft("rlhf", "--reward_model", "{classify}"), "is a classifier"),
    *[(f"pretrain --resume {name}", pt_resume(f"{{{name}}}"), message) for name, message in (
        ("sft_step_2", "is a step checkpoint of sft (finetune.py --mode sft), not of pretrain"),
        ("classify_step_2", "is a step checkpoint of classify"), ("reward_step_2", "is a step checkpoint of reward"),
        ("int8", "is an INT8 language model"), ("lm", "no training state"))],
    ("evaluator --reward_model on another tokenizer",
     ("evaluator", ["--model_path", "{lm}", "--model_type", "sft", "--test_data_path", "{sft_data}", "--reward_model",
                    "{other_reward}", "--output", "{out}/report.json", "--no_progress", "--max_new_tokens", "2"]),
     "--reward_model {other_reward} was trained with another tokenizer (300 tokens) than {lm}"),
    ("evaluator --reward_model a language model",
     ("evaluator", ["--model_path", "{lm}", "--model_type", "sft", "--test_data_path", "{sft_data}", "--reward_model",
                    "{lm}", "--output", "{out}/report.json", "--no_progress"]), "not a reward model"),
    *[(f"quantizer {name}", ("inference.quantizer", ["--model_path", f"{{{name}}}", "--output", "{out}/q.pth",
                                                     "--no_eval"]), message) for name, message in (
        ("reward", "is a reward model"), ("classify", "is a classifier"), ("int8", "for inference only"))],
    *[(f"kv_cache_infer {name}", ("inference.kv_cache_infer", ["--model_path", f"{{{name}}}", "--prompt", "hi",
                                                                "--device", "cpu"]),
       f"is a {kind} (written by finetune.py --mode {name}), not a language model")
      for name, kind in (("classify", "classifier"), ("reward", "reward model"))],
]


@pytest.mark.parametrize("what, command, message", WRONG_KIND, ids=[case[0] for case in WRONG_KIND])
def test_the_wrong_kind_of_checkpoint_is_one_line_up_front(what, command, message, kinds, tmp_path, capsys):
    module, argv = command
    places = {k: str(v) for k, v in kinds.items()} | {"out": str(tmp_path)}
    before = snapshot(kinds["folder"])
    code, err = run_main(importlib.import_module(module).main, [a.format(**places) for a in argv], capsys)
    assert_one_line_error(code, err)
    assert message.format(**places) in err, err
    assert not list(tmp_path.iterdir()), "a refused command wrote something"
    assert snapshot(kinds["folder"]) == before


def test_every_kind_of_model_saves_a_file_that_says_what_it_is_and_loads_back(kinds, tmp_path):
    """save_checkpoint takes the head and the LoRA adapters from the model, so that no caller writes a file that
    loads as something else (dpo/rlvf from a LoRA SFT model used to write a *_best.pth nothing could load)."""
    import lora

    for name, kind in (("lm", "lm"), ("int8", "lm-int8"), ("reward", "reward"), ("classify", "classify"),
                       ("adapter", "lora"), ("ppo_step_2", "lm")):
        loaded = checkpoints.load(kinds[name])
        assert loaded.kind == kind, name
    trained = checkpoints.load(kinds["adapter"], trainable=True)  # what another stage trains on: plain weights
    assert trained.kind == "lm" and not lora.lora_layers(trained.model)
    adapted = lora.apply_lora(checkpoints.load(kinds["lm"], trainable=True).model, ["c_attn"], r=2, alpha=4.0)
    checkpoints.save_checkpoint(tmp_path / "in_place.pth", adapted, lora=None, model_class="reward")  # wrong claims
    meta = checkpoints.checkpoint_metadata(tmp_path / "in_place.pth")
    assert meta["model_class"] == "lm" and meta["lora"]["r"] == 2
    assert lora.lora_layers(checkpoints.build_model(checkpoints.load_checkpoint(tmp_path / "in_place.pth"), "x"))
    assert "with LoRA adapters (r 2)" in checkpoints.describe(tmp_path / "in_place.pth")


# ----------------------------------------------------------------------------- issue 24 (branch issue24-files)
# hostile files, a full disk, colliding paths, the data builders under the one error policy

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
    import data.classify.build_classify_data as build_classify
    import data.sft.build_sft_data as build_sft
    import finetune
    from inference import quantizer

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


def test_an_output_that_exists_is_replaced_only_when_it_is_the_commands_own_or_with_overwrite(shared, tmp_path,
                                                                                              capsys):
    """The evaluator replaces its own earlier report and chart, the quantizer its own INT8 file of the same model;
    anything else needs --overwrite, and an input is never an output even then."""
    from inference import quantizer

    report, chart, notes = tmp_path / "report.json", tmp_path / "chart.png", tmp_path / "notes.txt"
    notes.write_text("mine")
    evaluate = ["--model_path", str(shared["ckpt"]), "--model_type", "sft", "--test_data_path", str(shared["sft"]),
                "--max_new_tokens", "2", "--no_progress"]
    for _ in range(2):  # the second run replaces the first one's report and chart
        assert evaluator.main(evaluate + ["--output", str(report), "--plot", str(chart)]) == 0
    assert json.loads(report.read_text())["model_type"] == "sft" and chart.read_bytes().startswith(b"\x89PNG")
    code, err = run_main(evaluator.main, evaluate + ["--output", str(notes)], capsys)
    assert_one_line_error(code, err)
    assert "already exists and was not written by this command" in err and notes.read_text() == "mine"
    assert evaluator.main(evaluate + ["--output", str(notes), "--overwrite"]) == 0
    assert json.loads(notes.read_text())["results"]

    other = tmp_path / "other.pth"  # another existing checkpoint: kept without --overwrite
    other.write_bytes(shared["ckpt"].read_bytes())
    quantize = ["--model_path", str(shared["ckpt"]), "--no_eval", "--output"]
    code, err = run_main(quantizer.main, quantize + [str(other)], capsys)
    assert_one_line_error(code, err)
    assert other.read_bytes() == shared["ckpt"].read_bytes()
    for _ in range(2):  # the rerun replaces its own INT8 file of the same --model_path
        assert quantizer.main(quantize + [str(tmp_path / "int8.pth")]) == 0
    assert checkpoints.checkpoint_metadata(tmp_path / "int8.pth")["quantization"] == "int8"
    assert quantizer.main(quantize + [str(other), "--overwrite"]) == 0
    assert checkpoints.checkpoint_metadata(other)["quantization"] == "int8"
    capsys.readouterr()


FULL_DISK = """
import importlib, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing the process
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
"""


def run_on_a_full_disk(limit: int, module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``module``'s CLI in a process that cannot write a file past ``limit`` bytes (RLIMIT_FSIZE, as a disk with
    that much room left; portable where a tmpfs cannot be mounted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def assert_no_space_line(result: subprocess.CompletedProcess, written: Path) -> None:
    assert_one_line_error(result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert f"while writing {written};" in last and ("intact" in last or "nothing was replaced" in last), last
    assert not [p for p in written.parent.rglob(".*") if p.name.endswith((".tmp", ".tmpdir"))]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_previous_files_stay(corpus, tiny_tokenizer_dir, shared, files, tmp_path):
    """Every command that saves (pretraining, SFT, GRPO, the quantizer, the evaluator's report and chart, the
    tokenizer CLI), with no room for its output: exit 2, one line naming the file, the temp file gone, the files
    that were there byte-identical."""
    run = tmp_path / "run"  # a pretraining run with its step 2; a resumed run cannot write step 4
    assert pt.main(pretrain_args(corpus, tiny_tokenizer_dir, run, "--max_steps", "2", "--eval_interval", "2")) == 0
    before = snapshot(run)
    result = run_on_a_full_disk(150_000, "pretrain_trainer", pretrain_args(
        corpus, tiny_tokenizer_dir, run, "--max_steps", "4", "--eval_interval", "2", "--resume", "auto"))
    assert_no_space_line(result, run / "pretrain_step_4.pth")
    assert {k: v for k, v in snapshot(run).items() if k.endswith("step_2.pth")} == \
        {k: v for k, v in before.items() if k.endswith("step_2.pth")}
    stage = ["--device", "cpu", "--max_steps", "2", "--eval_interval", "2", "--batch_size", "2",
             "--max_new_tokens", "2", "--test_data_path", str(files["sft_test"]), "--data_path", str(files["sft_data"])]
    for mode, extra in (("sft", ["--pretrained_model"]), ("rlvf", ["--eval_samples", "2", "--sft_model"])):
        out = tmp_path / mode
        result = run_on_a_full_disk(20_000, "finetune", ["--mode", mode, *stage, "--output_dir", str(out), *extra,
                                                         str(files["pretrained"])])
        assert_one_line_error(result.returncode, result.stderr)
        assert "while writing" in result.stderr and not list(out.rglob("*.pth")), result.stderr[-2000:]
    int8 = tmp_path / "int8.pth"
    result = run_on_a_full_disk(20_000, "inference.quantizer", ["--model_path", str(shared["ckpt"]), "--no_eval",
                                                                "--output", str(int8)])
    assert_no_space_line(result, int8)
    assert not int8.exists()


@pytest.mark.slow
def test_a_full_disk_keeps_the_evaluators_report_and_the_tokenizer(shared, tiny_tokenizer_dir, tmp_path):
    report, chart, tokenizer = tmp_path / "report.json", tmp_path / "chart.png", tmp_path / "tokenizer"
    evaluate = ["--model_path", str(shared["ckpt"]), "--model_type", "sft", "--test_data_path", str(shared["sft"]),
                "--max_new_tokens", "2", "--no_progress", "--output", str(report), "--plot", str(chart)]
    assert evaluator.main(evaluate) == 0
    ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir).save(tokenizer)
    before = snapshot(tmp_path)
    assert_no_space_line(run_on_a_full_disk(1_000, "evaluator", evaluate), report)  # the report is over 1 KB
    size = report.stat().st_size + 100  # room for the report, not for the chart
    assert_no_space_line(run_on_a_full_disk(size, "evaluator", evaluate), chart)
    result = run_on_a_full_disk(4_000, "byte_level_bpe", ["--input", str(shared["text"]), "--vocab_size", "400",
                                                          "--output", str(tokenizer)])
    assert_no_space_line(result, tokenizer)
    assert snapshot(tmp_path) == before


def _signal_inside(signum: int) -> str:
    return f"""
import os, signal, sys, importlib
module = importlib.import_module(sys.argv[1])
def build(*args, **kwargs):
    os.kill(os.getpid(), {int(signum)})  # Ctrl-C / SIGTERM while the builder works
    signal.pause() if {int(signum)} == signal.SIGTERM else None
module.build = build
sys.exit(module.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("builder, output_flag", [("data.build_pretrain_data", "--output"),
                                                  ("data.sft.build_sft_data", "--output_dir"),
                                                  ("data.classify.build_classify_data", "--output_dir")])
def test_a_data_builder_stopped_by_a_signal_exits_130_or_143_without_a_traceback(builder, output_flag, signum,
                                                                                 tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("earlier\n")
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _signal_inside(signum), builder, output_flag, str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == (130 if signum == signal.SIGINT else 143), result.stderr
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_full_disk_while_tokenizing_keeps_the_finished_shards_and_a_rerun_continues(tiny_tokenizer_dir, tmp_path):
    import token_cache

    train = tmp_path / "train.txt"
    train.write_text("\n".join(corpus_lines(limit=4000)) + "\n", encoding="utf-8")
    args = ["--train_data_dir", str(train), "--tokenizer_dir", str(tiny_tokenizer_dir), "--output_dir",
            str(tmp_path / "run"), "--device", "cpu", "--num_workers", "1", "--n_layers", "1", "--d_model", "32",
            "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "2", "--samples", "0", "--max_steps", "1",
            "--cache_dir", str(tmp_path / "cache")]
    result = run_on_a_full_disk(60_000, "pretrain_trainer", args)  # the cache is ~250 KB
    assert_one_line_error(result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert "while writing the token cache" in last and "no shard was finished yet" in last, last
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.pth"))
    assert pt.main(args) == 0  # the rerun continues from the kept shards and trains
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert meta["complete"] and meta["version"] == token_cache.CACHE_VERSION
