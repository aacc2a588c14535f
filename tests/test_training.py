"""training: the one loop (stopping rules, the warmup + cosine schedule, step checkpoints and their rotation, a
non-finite loss) and what interruption does: Ctrl-C / SIGTERM save and resume exactly, kill -9 during training or
during a save leaves no stale temp files and resumes exactly, --resume auto with nothing to resume starts fresh."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import gpt_model
import pretrain_trainer as pt
import training
from cli_cases import pretrain_args, snapshot
from conftest import ROOT
from run_folder import read_metrics, step_checkpoints


# ----------------------------------------------------------------------------- the schedule and the stopping rules

def test_lr_schedule_warms_up_then_follows_the_cosine():
    config = pt.TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    assert training.lr_at(0.0, 0, config) == pytest.approx(1e-4)
    assert training.lr_at(0.05, 9, config) == pytest.approx(1e-3)
    assert training.lr_at(0.0, 10, config) == pytest.approx(1e-3)
    assert training.lr_at(0.5, 50, config) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert training.lr_at(1.0, 100, config) == pytest.approx(1e-4)


def test_lr_at_hand_worked_values_without_warmup_and_past_the_end():
    config = training.TrainConfig(lr=2.0, min_lr_ratio=0.5, warmup_steps=4)
    assert [training.lr_at(0.0, s, config) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]  # 2 * (s + 1) / 4
    # cos(pi / 4) = sqrt(2) / 2: 1 + 0.5 * (1 + 0.7071...) * (2 - 1)
    assert training.lr_at(0.25, 10, config) == pytest.approx(1 + 0.5 * (1 + math.sqrt(2) / 2))
    assert training.lr_at(0.75, 10, config) == pytest.approx(1 + 0.5 * (1 - math.sqrt(2) / 2))
    assert training.lr_at(3.0, 10, config) == pytest.approx(1.0)  # progress past 1 stays at the floor
    flat = training.TrainConfig(lr=0.3, min_lr_ratio=1.0, warmup_steps=0)
    assert [training.lr_at(p, 5, flat) for p in (0.0, 0.3, 1.0)] == pytest.approx([0.3] * 3)


def test_run_progress_is_the_further_of_steps_and_time():
    assert training.run_progress(5, 20, 0.0, None) == 0.25
    assert training.run_progress(5, 20, 30.0, 60.0) == 0.5  # the time budget is further along
    assert training.run_progress(15, 20, 30.0, 60.0) == 0.75
    assert training.run_progress(3, None, 0.0, None) == 0.0  # no limit known: the schedule stays at its start


def tiny_trainer(tmp_path: Path, tokenizer, **overrides) -> training.Trainer:
    """A one-layer model on random token batches: enough for the loop's rules, fast on any CPU."""
    config = training.TrainConfig(**{**dict(output_dir=str(tmp_path / "run"), batch_size=2, warmup_steps=1,
                                             eval_interval=1000, log_interval=1000, device="cpu", dtype="float32",
                                             seed=0), **overrides})
    model = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=16,
                                                               n_layers=1, d_model=16, n_heads=2))
    generator = torch.Generator().manual_seed(0)
    batches = ({"input_ids": ids, "labels": ids}
               for ids in iter(lambda: torch.randint(0, len(tokenizer), (2, 16), generator=generator), None))
    return training.Trainer(config, model, tokenizer, batches, lambda m, b: m(**b)["loss"], prefix="toy",
                            steps_per_epoch=4, show_progress=False)


def test_the_first_limit_reached_stops_the_run(tiny_tokenizer, tmp_path):
    assert tiny_trainer(tmp_path / "a", tiny_tokenizer, max_steps=3).max_steps == 3
    assert tiny_trainer(tmp_path / "b", tiny_tokenizer, epochs=1.5).max_steps == 6  # ceil(1.5 * 4)
    assert tiny_trainer(tmp_path / "c", tiny_tokenizer, max_steps=3, epochs=2).max_steps == 3
    assert tiny_trainer(tmp_path / "d", tiny_tokenizer, max_minutes=5).max_steps is None  # the clock decides
    with pytest.raises(training.TrainError, match="no stopping rule"):
        tiny_trainer(tmp_path / "e", tiny_tokenizer)
    trainer = tiny_trainer(tmp_path / "f", tiny_tokenizer, max_steps=5, save_interval=100)
    trainer.train()
    assert trainer.step == 5 and [r["step"] for r in trainer.metrics() if "train_loss" in r] == [5]


def test_step_checkpoints_keep_the_newest_keep_last(tiny_tokenizer, tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_tokenizer, max_steps=7, save_interval=2, keep_last=2)
    trainer.train()
    run = tmp_path / "run"
    assert [p.name for p in step_checkpoints(run, "toy")] == ["toy_step_6.pth", "toy_step_7.pth"]
    assert checkpoints.load_checkpoint(run / "toy_step_7.pth")["step"] == 7
    keep_all = tiny_trainer(tmp_path / "all", tiny_tokenizer, max_steps=4, save_interval=1, keep_last=0)
    keep_all.train()
    assert [p.name for p in step_checkpoints(tmp_path / "all" / "run", "toy")] == [f"toy_step_{i}.pth"
                                                                                  for i in range(1, 5)]


def test_resume_auto_finds_the_latest_step_and_refuses_another_tokenizer(tiny_tokenizer, tmp_path):
    tiny_trainer(tmp_path, tiny_tokenizer, max_steps=10, save_interval=3, keep_last=0).train()
    run = tmp_path / "run"
    checkpoint, found = training.find_resume_checkpoint("auto", run, "toy", tiny_tokenizer)
    assert found == str(run / "toy_step_10.pth") and checkpoint["step"] == 10  # 10 after 9, not before 2
    assert training.find_resume_checkpoint(None, run, "toy", tiny_tokenizer) == (None, None)
    assert training.find_resume_checkpoint("auto", tmp_path / "empty", "toy", tiny_tokenizer) == (None, None)
    with pytest.raises(training.TrainError, match="different tokenizer"):
        training.find_resume_checkpoint("auto", run, "toy", SimpleNamespace(fingerprint="another"))


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
