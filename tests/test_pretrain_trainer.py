"""pretrain_trainer: learning, exact resume, DDP gradient averaging, exact bits per byte, checkpoints and CLI errors."""
from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import checkpoints
import data_loader as dl
import token_cache
import training
import gpt_model
import pretrain_trainer as pt
import scoring
import sizing
from byte_level_bpe import ByteLevelBPETokenizer
from cli_cases import assert_one_line_error, pretrain_args, run_main, snapshot
from conftest import VAL_TXT, corpus_lines, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 600, 40)


def small_config(corpus, output_dir, **overrides) -> pt.TrainConfig:
    train, val = corpus
    values = dict(train_data=str(train), val_data=str(val), output_dir=str(output_dir), preset="tiny", n_layers=2,
                  d_model=64, n_heads=4, max_seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5, max_steps=10,
                  eval_interval=5, log_interval=1, keep_last=2, device="cpu", dtype="float32", num_workers=1, seed=0)
    return pt.TrainConfig(**{**values, **overrides})


def test_loss_decreases_and_run_outputs(corpus, tiny_tokenizer, tmp_path):
    config = small_config(corpus, tmp_path, max_steps=100, eval_interval=25, keep_last=1, batch_size=8)
    trainer = pt.GPTTrainer(config, tiny_tokenizer, show_progress=False)
    trainer.train()
    rows = trainer.metrics()
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    val_losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 101))
    assert train_losses[0] == pytest.approx(math.log(len(tiny_tokenizer)), rel=0.1)  # starts near uniform
    assert np.mean(train_losses[-10:]) < train_losses[0] - 1.0
    assert len(val_losses) == 4 and val_losses == sorted(val_losses, reverse=True)
    unigram = dl.unigram_bits_per_byte(trainer.train_stream.tokens, trainer.val_stream, len(tiny_tokenizer))
    assert rows[-1]["val_bpb"] < unigram - 0.2  # learned more than token frequencies
    assert all({"lr", "tokens_per_sec"} <= set(r) for r in rows if "train_loss" in r)
    assert all({"val_ppl", "val_bpb"} <= set(r) for r in rows if "val_loss" in r)

    out = Path(tmp_path)
    assert sorted(p.name for p in out.glob("*.pth")) == ["pretrain_best.pth", "pretrain_step_100.pth"]  # keep_last=1
    assert (out / "loss_curve.png").stat().st_size > 0
    model, tokenizer = checkpoints.load_model_and_tokenizer(out / "pretrain_best.pth")
    assert tokenizer.fingerprint == tiny_tokenizer.fingerprint
    best = checkpoints.load_checkpoint(out / "pretrain_best.pth")
    assert best["tokenizer_fingerprint"] == tiny_tokenizer.fingerprint and best["step"] == 100
    figures = scoring.stream_loss(model, trainer.val_stream.tokens, trainer.byte_lengths, scoring.ScoreParams(4))
    last = [r for r in rows if "val_loss" in r][-1]  # the best checkpoint's evaluation, with other batches
    for key, name in (("val_loss", "loss"), ("val_ppl", "perplexity"), ("val_bpb", "bits_per_byte")):
        assert figures[name] == pytest.approx(last[key], rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(corpus, tiny_tokenizer, tmp_path, optimizer):
    config = dict(max_steps=8, save_interval=3, eval_interval=4, dropout=0.1, optimizer=optimizer)
    straight = pt.GPTTrainer(small_config(corpus, tmp_path / "straight", **config), tiny_tokenizer, show_progress=False)
    straight.train()

    killed = pt.GPTTrainer(small_config(corpus, tmp_path / "resumed", **config), tiny_tokenizer, show_progress=False)
    killed.train(stop_after=5)  # as if killed right after step 5's checkpoint; the metrics of steps 4-5 get rewritten
    random.random(), np.random.rand(), torch.rand(3)  # a new process would have different RNG states
    resumed = pt.GPTTrainer(small_config(corpus, tmp_path / "resumed", **config), tiny_tokenizer, resume="auto",
                            show_progress=False)
    assert resumed.step == 5
    resumed.train()

    without_speed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]
    # same losses, lrs and evals, bit for bit
    assert without_speed(resumed.metrics()) == without_speed(straight.metrics())
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert (sorted(p.name for p in (tmp_path / "resumed").glob("pretrain_step_*.pth"))
            == ["pretrain_step_6.pth", "pretrain_step_8.pth"])


def test_resuming_with_another_optimizer_is_one_line(corpus, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    pt.GPTTrainer(small_config(corpus, run, max_steps=2, save_interval=2, optimizer="muon"), tiny_tokenizer,
                  show_progress=False).train()
    with pytest.raises(training.TrainError, match="was trained with --optimizer muon, this run has --optimizer adamw: "
                                            "resume with --optimizer muon"):
        pt.GPTTrainer(small_config(corpus, run, max_steps=4, optimizer="adamw"), tiny_tokenizer, resume="auto",
                      show_progress=False)


def test_evaluation_bits_per_byte_of_a_uniform_model(tiny_tokenizer, tmp_path):
    """Zeroed final LayerNorm → all logits 0 → every prediction costs exactly ln(V) nats."""
    source = tmp_path / "val.txt"
    source.write_text("\n".join(corpus_lines(VAL_TXT, limit=12)) + "\n", encoding="utf-8")
    stream = token_cache.build_token_stream(source, tiny_tokenizer, num_workers=1, show_progress=False)
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=16,
                                                               n_layers=1))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
    result = scoring.stream_loss(model, stream.tokens, dl.token_byte_lengths(tiny_tokenizer), scoring.ScoreParams(3))
    n_predicted = len(stream) - 1
    assert result["n_tokens"] == n_predicted and result["n_bytes"] == stream.n_bytes  # the text's bytes, + 1 per doc
    assert result["loss"] == pytest.approx(math.log(len(tiny_tokenizer)), rel=1e-6)
    assert result["perplexity"] == pytest.approx(len(tiny_tokenizer), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(n_predicted * math.log(len(tiny_tokenizer))
                                                    / (math.log(2) * stream.n_bytes), rel=1e-6)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    state = training.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    torch.save({"rng": state}, tmp_path / "rng.pt")
    training.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_failed_save_keeps_the_previous_checkpoint(corpus, tiny_tokenizer, tmp_path, monkeypatch):
    trainer = pt.GPTTrainer(small_config(corpus, tmp_path, max_steps=2, eval_interval=100), tiny_tokenizer,
                            show_progress=False)
    trainer.save(tmp_path / "pretrain_step_1.pth")

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(tmp_path / "pretrain_step_1.pth")
    assert checkpoints.load_checkpoint(tmp_path / "pretrain_step_1.pth")["step"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, tokenizer_dir: str, config: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = pt.GPTTrainer(pt.TrainConfig(**config), ByteLevelBPETokenizer.from_pretrained(tokenizer_dir),
                            show_progress=False)
    first_batch = next(dl.RandomWindowBatches(trainer.train_stream.tokens, 32, 4, seed=config["seed"],
                                              rank=rank))["input_ids"]
    trainer.train()
    torch.save({"params": trainer.model.state_dict(), "first_batch": first_batch}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_cpu_processes_average_gradients(corpus, tiny_tokenizer_dir, tiny_tokenizer, tmp_path, optimizer):
    config = asdict(small_config(corpus, tmp_path / "run", max_steps=4, eval_interval=4, optimizer=optimizer))
    token_cache.build_token_stream(config["train_data"], tiny_tokenizer, num_workers=1, show_progress=False)  # warm
    context = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tiny_tokenizer_dir), config, str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 180
    while not context.join(timeout=5):  # a hang (mismatched collectives) fails the test instead of the suite
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])  # each rank saw its own data
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name  # ...yet the averaged gradients kept them in step
    checkpoint = checkpoints.load_checkpoint(tmp_path / "run" / "pretrain_step_4.pth")
    assert len(checkpoint["rank_states"]) == 2
    assert all(torch.equal(checkpoint["model_state_dict"][k], v) for k, v in rank0["params"].items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]  # rank 0 logs alone


def test_cli_trains_tokenizer_when_missing_and_reports(corpus, tmp_path, capsys):
    train, val = corpus
    code = pt.main(["--train_data_dir", str(train), "--val_data_dir", str(val), "--tokenizer_dir",
                    str(tmp_path / "tok"), "--vocab_size", "300", "--output_dir", str(tmp_path / "out"),
                    "--n_layers", "1", "--d_model", "32", "--n_heads", "2", "--max_seq_len", "48", "--batch_size", "2",
                    "--max_steps", "3", "--eval_interval", "3", "--num_workers", "1", "--device", "cpu",
                    "--samples", "4"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["steps"] == 3 and summary["val_bpb"] > 0 and summary["unigram_val_bpb"] > 0
    assert out.count("--- ") == len(pt.SAMPLE_PROMPTS)
    tokenizer = ByteLevelBPETokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == 300
    assert ByteLevelBPETokenizer.from_pretrained(tmp_path / "out" / "tokenizer").fingerprint == tokenizer.fingerprint


def test_cli_trains_on_parquet_and_zstd_data_with_a_text_field(corpus, tiny_tokenizer_dir, tiny_tokenizer, tmp_path,
                                                                capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    train, val = corpus
    pq.write_table(pa.table({"body": train.read_text(encoding="utf-8").splitlines()}), tmp_path / "train.parquet",
                   row_group_size=100)
    records = "".join(json.dumps({"body": line}) + "\n" for line in val.read_text(encoding="utf-8").splitlines())
    (tmp_path / "val.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(records.encode()))
    code = pt.main(["--train_data_dir", str(tmp_path / "train.parquet"), "--val_data_dir",
                    str(tmp_path / "val.jsonl.zst"), "--text_field", "body", "--tokenizer_dir",
                    str(tiny_tokenizer_dir), "--output_dir", str(tmp_path / "out"), "--n_layers", "1", "--d_model",
                    "32", "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "2", "--max_steps", "2",
                    "--eval_interval", "2", "--num_workers", "1", "--device", "cpu", "--samples", "0"])
    assert code == 0
    n_train = len(token_cache.build_token_stream(train, tiny_tokenizer, num_workers=1, show_progress=False))
    assert f"{n_train:,} train tokens" in capsys.readouterr().out  # the same documents as the .txt


def test_a_run_without_validation_data_names_the_checkpoint_it_wrote_and_the_next_stage_finds_it(
        corpus, tiny_tokenizer_dir, tmp_path, capsys):
    """--val_data_dir none writes step checkpoints only: the run's last line names the last one (never a best model
    it did not write), and finetuning's default --pretrained_model (<folder>/pretrain_best.pth) points at it."""
    import finetune

    out = tmp_path / "run"
    argv = pretrain_args(corpus, tiny_tokenizer_dir, out, "--val_data_dir", "none", "--max_steps", "2")
    assert pt.main(argv) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert not (out / "pretrain_best.pth").exists() and (out / "pretrain_step_2.pth").is_file()
    assert "(best: pretrain_best.pth)" not in last_line
    assert f"the last is {out / 'pretrain_step_2.pth'}; finetune from it with --pretrained_model" in last_line
    code, err = run_main(finetune.main, ["--pretrained_model", str(out / "pretrain_best.pth"), "--output_dir",
                                         str(tmp_path / "sft"), "--max_steps", "1", "--device", "cpu"], capsys)
    assert_one_line_error(code, err)
    assert "holds pretrain_step_2.pth, the last checkpoint of a run without validation data" in err
    assert f"pass --pretrained_model {out / 'pretrain_step_2.pth'}" in err and not (tmp_path / "sft").exists()


def test_cli_errors_are_one_line(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    base = ["--tokenizer_dir", str(tiny_tokenizer_dir), "--val_data_dir", str(corpus[1]), "--output_dir",
            str(tmp_path / "out"), "--device", "cpu", "--num_workers", "1"]
    assert pt.main(base + ["--train_data_dir", str(tmp_path / "nope.txt"), "--max_steps", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: data path")

    assert pt.main(base + ["--train_data_dir", str(corpus[0]), "--max_steps", "1", "--n_heads", "3",
                           "--d_model", "64"]) == 2
    assert "divisible by n_heads" in capsys.readouterr().err

    other = ByteLevelBPETokenizer(vocab_size=300)
    other.train(corpus_lines(limit=50), show_progress=False)
    other.save(tmp_path / "other_tok")
    trainer = pt.GPTTrainer(small_config(corpus, tmp_path / "a", max_steps=1), other, show_progress=False)
    trainer.save(tmp_path / "a" / "pretrain_step_1.pth")
    assert pt.main(base + ["--train_data_dir", str(corpus[0]), "--max_steps", "2", "--resume",
                           str(tmp_path / "a" / "pretrain_step_1.pth")]) == 2
    assert "different tokenizer" in capsys.readouterr().err

    with pytest.raises(training.TrainError, match="no stopping rule"):
        pt.GPTTrainer(small_config(corpus, tmp_path / "b", max_steps=None), other, show_progress=False)


def test_console_shows_a_time_budgets_bar_with_a_total_and_a_line_per_evaluation(corpus, tiny_tokenizer, tmp_path,
                                                                                   capsys):
    """--max_minutes alone: the bar's total is the steps the budget allows at the speed so far (so it has an ETA,
    and ends at the steps run); every evaluation prints its figures on the console, as metrics.jsonl has them."""
    config = small_config(corpus, tmp_path, max_steps=None, max_minutes=0.04, eval_interval=3, eval_batches=2,
                          save_interval=10_000, log_interval=1)
    trainer = pt.GPTTrainer(config, tiny_tokenizer, show_progress=True)
    trainer.start_time = time.time()  # the budget counts from here, not from the tokenization above
    trainer.train()
    out, err = capsys.readouterr()
    states = re.findall(r"pretrain:[^\r\n]*?(\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d", err)
    assert states, err
    assert int(states[-1][0]) == int(states[-1][1]) == trainer.step  # the final state: every step, the whole bar
    evals = [r for r in trainer.metrics() if "val_loss" in r]
    assert len(evals) >= 2 and trainer.step >= 3  # at least one mid-run evaluation and the final one
    lines = [line for line in out.splitlines() if line.startswith("pretrain step ")]
    assert lines == [f"pretrain step {r['step']}: val_loss {r['val_loss']:.4g}, val_ppl {r['val_ppl']:.4g}, "
                     f"val_bpb {r['val_bpb']:.4g}" for r in evals]


# ----------------------------------------------------------------------------- the CLI's bad input

BAD_PRETRAIN_FLAGS = [
    ["--optimizer", "sgd"], ["--optimizer"],
    ["--batch_size", "0"], ["--grad_accum", "0"], ["--max_seq_len", "1"], ["--eval_interval", "0"],
    ["--log_interval", "0"], ["--max_steps", "-1"], ["--max_steps", "0"], ["--epochs", "-1"], ["--epochs", "0"],
    ["--lr", "0"], ["--lr", "nan"], ["--lr", "abc"], ["--max_minutes", "0"], ["--dropout", "1.5"],
    ["--preset", "huge"], ["--dtype", "int3"], ["--keep_last", "-1"], ["--warmup_steps", "-5"],
    ["--num_workers", "0"], ["--save_interval", "0"], ["--vocab_size", "10"], ["--min_lr_ratio", "2"],
    ["--n_heads", "3"], ["--max_minutes", "0.001"], ["--text_field", ""], ["--text_field", "text "],
    ["--depth", "0"], ["--depth", "x"], ["--depth", "2"],  # the base flags set --n_layers: --depth cannot join them
    ["--tokens_per_param", "0"], ["--tokens_per_param", "-1"], ["--max_epochs", "0"], ["--max_epochs", "inf"],
    ["--print_plan", "--resume", "auto"], ["--bogus"], ["--val_data_dir"],
]


@pytest.mark.parametrize("flags", BAD_PRETRAIN_FLAGS, ids=lambda f: " ".join(f))
def test_pretrain_bad_flags_are_one_line_and_leave_the_folder_as_it_was(flags, corpus, tiny_tokenizer_dir,
                                                                        earlier_run, capsys):
    before = snapshot(earlier_run)
    code, err = run_main(pt.main, pretrain_args(corpus, tiny_tokenizer_dir, earlier_run, "--max_steps", "3", *flags),
                         capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("tokenizing ")]  # no bars
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err  # never argparse's usage block
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

# ----------------------------------------------------------------------------- sizing the run

# the configuration `python pretrain_trainer.py` trained with before the run could size itself, field by field
DEFAULT_RUN = {'output_dir': 'models/pretrain', 'batch_size': 16, 'grad_accum': 1, 'lr': 0.006, 'min_lr_ratio': 0.1,
               'warmup_steps': 50, 'weight_decay': 0.1, 'beta1': 0.9, 'beta2': 0.95, 'optimizer': 'muon',
               'grad_clip': 1.0, 'max_steps': None, 'epochs': None, 'max_minutes': 4.75, 'eval_interval': 500,
               'eval_batches': None, 'log_interval': 10, 'save_interval': None, 'keep_last': 2, 'dtype': 'auto',
               'compile': False, 'device': None, 'seed': 1337, 'train_data': 'data/pretrain/train.txt',
               'val_data': 'data/pretrain/val.txt', 'cache_dir': None, 'text_field': 'text', 'preset': 'modern-tiny',
               'n_layers': 2, 'd_model': None, 'n_heads': None, 'd_ff': None, 'dropout': 0.0, 'max_seq_len': 64,
               'num_workers': None}
SIZING_FIELDS = {"depth": None, "tokens_per_param": 20.0, "max_epochs": 4.0}


def plan_args(corpus, tokenizer_dir, output_dir, *extra: str) -> list[str]:
    train, val = corpus
    return ["--train_data_dir", str(train), "--val_data_dir", str(val), "--tokenizer_dir", str(tokenizer_dir),
            "--output_dir", str(output_dir), "--num_workers", "1", "--device", "cpu", "--samples", "0", *extra]


def corpus_figures(corpus, tokenizer, batch_size: int = 16, max_seq_len: int = 64) -> pt.Corpus:
    """The figures a plan is made from, computed here as the trainer must: the tokens of the training stream."""
    n_tokens = len(token_cache.build_token_stream(corpus[0], tokenizer, num_workers=1, show_progress=False))
    return pt.Corpus(n_tokens, len(tokenizer), batch_size * max_seq_len)


def test_the_default_run_on_cpu_is_unchanged(corpus, tiny_tokenizer):
    """No flags: the same model, budget and schedule as before sizing existed, and no plan or measurement on a CPU."""
    config = pt.config_from_args(pt.build_parser().parse_args([]))
    assert asdict(config) == {**DEFAULT_RUN, **SIZING_FIELDS}
    typed: set[str] = set()
    assert not pt.auto_sizing_applies(typed, torch.device("cpu"), training.DistInfo(), False)
    assert pt.size_run(config, typed, corpus_figures(corpus, tiny_tokenizer)) == (config, None)


def test_print_plan_shows_the_depths_plan_and_writes_no_checkpoint(corpus, tiny_tokenizer_dir, tiny_tokenizer,
                                                                  tmp_path, capsys):
    assert pt.main(plan_args(corpus, tiny_tokenizer_dir, tmp_path / "out", "--depth", "12", "--print_plan")) == 0
    out = capsys.readouterr().out
    figures = corpus_figures(corpus, tiny_tokenizer)
    expected = sizing.plan_from_depth(12, len(tiny_tokenizer), 64, figures.tokens, 16 * 64,
                                      sizing.SizingRules(base_lr=pt.DEFAULT_LR["muon"]))
    assert sizing.format_plan(expected) in out
    assert f"{expected.parameters:,}" in out and f"steps: {expected.steps:,} of 1,024 tokens" in out
    assert expected.capped_by_epochs and expected.epochs <= 4  # 85M parameters on a few thousand lines
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_depth_run_trains_the_planned_shape_with_the_scaled_lr(corpus, tiny_tokenizer_dir, tiny_tokenizer,
                                                                 tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert pt.main(plan_args(corpus, tiny_tokenizer_dir, out_dir, "--depth", "1", "--max_steps", "3",
                             "--batch_size", "2", "--max_seq_len", "32", "--eval_interval", "3")) == 0
    out = capsys.readouterr().out
    checkpoint = checkpoints.load_checkpoint(out_dir / "pretrain_step_3.pth")
    shape = {k: checkpoint["config"][k] for k in ("n_layers", "d_model", "n_heads", "d_ff")}
    assert shape == {"n_layers": 1, "d_model": 64, "n_heads": 1, "d_ff": 256}  # depth 1: one head of 64
    plan = sizing.plan_from_depth(1, len(tiny_tokenizer), 32, corpus_figures(corpus, tiny_tokenizer, 2, 32).tokens,
                                  64, sizing.SizingRules(base_lr=6e-3))
    assert checkpoint["train_args"]["lr"] == pytest.approx(6e-3 * math.sqrt(128 / 64)) == pytest.approx(plan.lr)
    assert checkpoint["train_args"]["max_steps"] == 3 and checkpoint["step"] == 3  # the typed budget wins
    model, _ = checkpoints.load_model_and_tokenizer(out_dir / "pretrain_step_3.pth")
    assert model.num_parameters() == plan.parameters
    assert f"({plan.parameters:,}; vocab" in out and "steps: 3 of 64 tokens (2 sequences x 32)" in out


def test_a_depth_run_without_a_budget_trains_the_plans_steps(corpus, tiny_tokenizer, tmp_path):
    parsed = pt.build_parser().parse_args(["--depth", "3", "--tokens_per_param", "0.5", "--max_epochs", "2"])
    config = pt.config_from_args(parsed)
    assert config.max_minutes is None and config.max_steps is None and config.n_layers is None
    figures = corpus_figures(corpus, tiny_tokenizer)
    sized, plan = pt.size_run(config, set(vars(parsed)), figures)
    rules = sizing.SizingRules(base_lr=6e-3, tokens_per_param=0.5, max_epochs=2)
    assert plan == sizing.plan_from_depth(3, len(tiny_tokenizer), 64, figures.tokens, 1024, rules)
    assert (sized.n_layers, sized.d_model, sized.n_heads, sized.d_ff) == (3, 192, 3, 768)
    assert sized.max_steps == plan.steps and sized.lr == pytest.approx(6e-3 * math.sqrt(128 / 192))
    assert pt.plan_lines(sized, pt.model_config_of(sized, tiny_tokenizer), figures, plan) == sizing.format_plan(plan)


def test_on_cuda_with_no_flags_the_measured_speed_picks_the_depth(corpus, tiny_tokenizer):
    """The automatic sizing as a pure function of what was measured: a faster device trains a deeper model, the
    choice is plan_for_budget's at the FLOP/s measured at the probed depth, and the clock stays as a guard."""
    config = pt.config_from_args(pt.build_parser().parse_args([]))
    assert pt.auto_sizing_applies(set(), torch.device("cuda"), training.DistInfo(), False)
    for typed in ({"depth"}, {"max_steps"}, {"n_layers"}, {"preset"}):
        assert not pt.auto_sizing_applies(typed, torch.device("cuda"), training.DistInfo(), False)
    assert not pt.auto_sizing_applies(set(), torch.device("cuda"), training.DistInfo(0, 0, 2), False)
    assert not pt.auto_sizing_applies(set(), torch.device("cuda"), training.DistInfo(), True)
    figures = pt.Corpus(tokens=500_000_000, vocab=len(tiny_tokenizer), tokens_per_step=1024)  # a large corpus
    rules = sizing.SizingRules(base_lr=6e-3)
    assert pt.probe_depth(config, figures) == max(
        d for d in range(1, 33) if not sizing.plan_from_depth(d, figures.vocab, 64, figures.tokens, 1024,
                                                              rules).capped_by_epochs)
    chosen = []
    for speed in (2e5, 2e6, 2e7):
        sized, plan = pt.size_run(config, set(), figures, measured=(4, speed), minutes_left=4.0)
        expected = sizing.plan_for_budget(4.0, sizing.flops_throughput(speed, 4, figures.vocab, 64),
                                          figures.vocab, 64, figures.tokens, 1024, rules)
        assert plan == expected and plan.expected_minutes <= 4.0
        assert (sized.depth, sized.n_layers, sized.max_steps, sized.max_minutes) == (
            plan.depth, plan.depth, plan.steps, pt.DEFAULT_MINUTES)
        chosen.append(plan.depth)
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]
    slow, plan = pt.size_run(config, set(), figures, measured=(4, 1.0), minutes_left=4.0)  # not even depth 1 fits
    assert plan is None and slow == config


def test_measured_throughput_runs_the_runs_step_in_a_scratch_folder(corpus, tiny_tokenizer, tmp_path):
    config = small_config(corpus, tmp_path / "out", batch_size=2)
    stream = token_cache.build_token_stream(corpus[0], tiny_tokenizer, num_workers=1, show_progress=False)
    assert pt.measure_throughput(config, tiny_tokenizer, stream, depth=1) > 0
    assert not (tmp_path / "out").exists()


def test_resuming_with_another_depth_is_one_line(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    base = plan_args(corpus, tiny_tokenizer_dir, out_dir, "--max_seq_len", "32", "--batch_size", "2")
    assert pt.main(base + ["--depth", "1", "--max_steps", "2", "--eval_interval", "2"]) == 0
    capsys.readouterr()
    assert pt.main(base + ["--depth", "2", "--max_steps", "4", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --depth 2 (n_layers 2) differs from the checkpoint's 1") and err.count("\n") == 1
    assert pt.main(base + ["--depth", "1", "--max_steps", "3", "--resume", "auto"]) == 0  # the same depth resumes
