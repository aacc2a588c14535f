"""runs/speedrun.py and its plan and report: the commands each size runs (a pure function), report.md from fixed stage
results (hand-checked lines), a stage that fails or is interrupted, and the dry run end to end (every stage, then a
rerun that reuses them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from runs import report as rp
from runs.plan import RunSpec, Stage, plan, with_resume
from runs.speedrun import run_stage

TASKS = (("hellaswag", Path("data/benchmarks/hellaswag_local.jsonl")),
         ("gsm8k", Path("data/benchmarks/gsm8k_local.jsonl")))


def spec(size: str, **changes) -> RunSpec:
    fields = dict(size=size, output_dir=Path("out"), train_data=Path("train.txt"), val_data=Path("val.txt"),
                  tasks=TASKS, python="python", torchrun="torchrun", port=9000)
    return RunSpec(**{**fields, **changes})


# ----------------------------------------------------------------------------- the plan

def test_cpu_plan_is_the_documented_clis_with_their_defaults():
    commands = {stage.name: list(stage.command) for stage in plan(spec("cpu"))}
    assert list(commands) == ["tokenizer", "pretrain", "sft", "benchmarks", "serve"]
    assert commands["tokenizer"] == ["python", "byte_level_bpe.py", "--input", "train.txt", "--vocab_size", "8192",
                                     "--output", "out/tokenizer"]
    assert commands["pretrain"] == ["python", "pretrain_trainer.py", "--train_data_dir", "train.txt",
                                    "--val_data_dir", "val.txt", "--tokenizer_dir", "out/tokenizer",
                                    "--cache_dir", "out/token_cache", "--output_dir", "out/pretrain"]
    assert commands["sft"] == ["python", "finetune.py", "--mode", "sft", "--pretrained_model",
                               "out/pretrain/pretrain_best.pth", "--output_dir", "out/sft"]
    assert commands["benchmarks"] == [
        "python", "evaluator.py", "--model_type", "sft", "--compare", "out/pretrain/pretrain_best.pth",
        "out/sft/sft_best.pth", "--tasks", "hellaswag=data/benchmarks/hellaswag_local.jsonl,"
        "gsm8k=data/benchmarks/gsm8k_local.jsonl", "--max_new_tokens", "32", "--output",
        "out/benchmarks/eval_report.json", "--no_progress"]
    assert commands["serve"] == ["python", "-m", "inference.api_service", "--model_path", "out/sft/sft_best.pth",
                                 "--host", "127.0.0.1", "--port", "9000"]


def test_gpu_plan_trains_a_larger_model_on_cuda_and_gpus_launches_the_trainers_with_torchrun():
    gpu = {stage.name: stage.command for stage in plan(spec("gpu"))}
    gpus = {stage.name: stage.command for stage in plan(spec("gpus", nproc=4))}
    assert gpu["pretrain"][:2] == ("python", "pretrain_trainer.py")
    for flags in (("--n_layers", "6"), ("--d_model", "384"), ("--max_minutes", "20"), ("--device", "cuda")):
        assert " ".join(flags) in " ".join(gpu["pretrain"])
    assert " ".join(gpu["sft"]).endswith("--device cuda") and "--device cuda" in " ".join(gpu["serve"])
    launcher = ("torchrun", "--standalone", "--nproc_per_node", "4")
    assert gpus["pretrain"] == launcher + gpu["pretrain"][1:]  # the same flags, one process per GPU
    assert gpus["sft"] == launcher + gpu["sft"][1:]
    for name in ("tokenizer", "benchmarks", "serve"):  # one process each
        assert gpus[name] == gpu[name]


def test_depth_replaces_the_size_shape_and_limit_reaches_the_evaluator():
    pretrain = plan(spec("gpu", depth=12))[1].command
    assert ("--depth", "12") == pretrain[pretrain.index("--depth"):pretrain.index("--depth") + 2]
    assert "--n_layers" not in pretrain and "--d_model" not in pretrain
    assert "--depth" not in plan(spec("cpu"))[1].command  # only when the user gives it
    dry = {stage.name: " ".join(stage.command) for stage in plan(spec("dry"))}
    assert "--limit 8" in dry["benchmarks"] and "--device cpu" in dry["pretrain"]
    assert "--limit 50" in " ".join(plan(spec("dry", limit=50))[3].command)
    assert "--limit" not in " ".join(plan(spec("cpu"))[3].command)


def test_only_a_trainer_continuing_its_own_run_gets_resume_auto():
    stages = {stage.name: stage for stage in plan(spec("cpu"))}
    assert with_resume(stages["pretrain"], True)[-2:] == ("--resume", "auto")
    assert with_resume(stages["sft"], True)[-2:] == ("--resume", "auto")
    assert with_resume(stages["pretrain"], False) == stages["pretrain"].command
    assert with_resume(stages["tokenizer"], True) == stages["tokenizer"].command


# ----------------------------------------------------------------------------- the report

def fixed_results() -> list[rp.StageResult]:
    bench = {"models": [{"model": name, "parameters": 100, "core": core, "tasks": {
        "hellaswag": {"acc": 0.4, "acc_norm": acc, "chance": 0.25, "centred": (acc - 0.25) / 0.75, "metric": "acc_norm",
                      "n": 8, "path": "h.jsonl"},
        "gsm8k": {"acc": 0.125, "chance": 0.0, "centred": 0.125, "metric": "acc", "n": 8, "path": "g.jsonl"}}}
        for name, acc, core in (("pretrain_best", 0.5, (1 / 3 + 0.125) / 2), ("sft_best", 0.25, 0.0625))]}
    return [
        rp.StageResult("tokenizer", ("/usr/bin/python3", "byte_level_bpe.py", "--vocab_size", "512"), "ok", 3.7,
                       "logs/tokenizer.log", {"vocab_size": 512}, 0, reused=True),
        rp.StageResult("pretrain", ("python", "pretrain_trainer.py"), "ok", 245.0, "logs/pretrain.log",
                       {"val_bpb": 2.5, "unigram_val_bpb": 4.03, "tokens_per_sec": 12345.6, "steps": 20,
                        "parameters": "1.45M", "loss_curve": "pretrain/loss_curve.png"}, 0),
        rp.StageResult("sft", ("python", "finetune.py", "--mode", "sft"), "ok", 3725.0, "logs/sft.log",
                       {"exact_match": {"exact_match": 0.5, "exact_match/arithmetic": 0.25}, "best_val_loss": 1.5,
                        "steps": 10}, 0),
        rp.StageResult("benchmarks", ("python", "evaluator.py"), "ok", 30.0, "logs/benchmarks.log", bench, 0),
        rp.StageResult("serve", ("python", "-m", "inference.api_service"), "failed", 2.0, "logs/serve.log", {}, 1),
    ]


def test_report_table_and_figures_are_the_hand_checked_lines():
    info = rp.ReportInfo("python -m runs.speedrun --size cpu", "cpu", "models/speedrun",
                         {"cpu": "Test CPU", "cores": 2, "gpus": ["H100", "H100"], "torch": "2.13", "python": "3.11",
                          "os": "Linux"}, 6.0, "2025-01-01 00:00")
    lines = rp.build_report(info, fixed_results()).splitlines()
    expected = [
        "| CPU | Test CPU (2 cores) |",
        "| GPU | 2 x H100 |",
        "| tokenizer | reused (earlier run) | 3.7 s | $0.01 | `python byte_level_bpe.py --vocab_size 512` | "
        "[tokenizer.log](logs/tokenizer.log) |",  # 3.7 s at $6/h = $0.006
        "| pretrain | ran | 4m 05s | $0.41 | `python pretrain_trainer.py` | [pretrain.log](logs/pretrain.log) |",
        "| sft | ran | 1h 02m 05s | $6.21 | `python finetune.py --mode sft` | [sft.log](logs/sft.log) |",
        "| serve | failed (exit 1) | 2.0 s | $0.00 | `python -m inference.api_service` | [serve.log](logs/serve.log) |",
        "| **total** | | 1h 06m 46s | $6.68 | | |",  # 4005.7 s
        "- validation bits per byte: **2.5000** (unigram baseline 4.0300)",
        "- tokens per second: 12,346 (median of the logged steps)",
        "- steps: 20; model: 1.45M parameters",
        "![pretraining loss](pretrain/loss_curve.png)",
        "- exact match on the held-out tasks: **0.500** (arithmetic 0.250)",
        "| task | n | metric | pretrain_best | pretrain_best centred | sft_best | sft_best centred |",
        "| hellaswag | 8 | acc_norm | 0.5000 | 0.3333 | 0.2500 | 0.0000 |",
        "| gsm8k | 8 | acc | 0.1250 | 0.1250 | 0.1250 | 0.1250 |",
        "| **CORE** | | mean centred |  | **0.2292** |  | **0.0625** |",
        "python -m inference.api_service --model_path models/speedrun/sft/sft_best.pth",
    ]
    for line in expected:
        assert line in lines, line
    assert "## Chat" in lines and not any(line.startswith("The server started") for line in lines)  # it failed
    assert not any("![SFT loss]" in line for line in lines)  # no curve was written


def test_report_without_a_price_has_no_costs_and_duration_formats():
    info = rp.ReportInfo("x", "dry", "out", {}, 0.0, "now")
    text = rp.build_report(info, fixed_results()[:2])
    assert "| pretrain | ran | 4m 05s | - |" in text and "Cost at" not in text
    assert [rp.duration(s) for s in (0.04, 59.94, 60, 3599.4, 3600)] == ["0.0 s", "59.9 s", "1m 00s", "59m 59s",
                                                                          "1h 00m 00s"]


def test_figures_come_from_the_summary_line_else_the_metrics_log(tmp_path):
    log = "plan lines\nmodel: 2 layers x 128 (4 heads of 32, d_ff 512), 1.45M parameters (1,453,568)\n" \
          "pretrain: 50%|##  | 1/2\r{\"not\": json\r\n" \
          '{"steps": 2, "tokens_per_sec": 10.0, "val_bpb": 3.25}\ncheckpoints in x\n'
    assert rp.json_summary(log) == {"steps": 2, "tokens_per_sec": 10.0, "val_bpb": 3.25}
    assert rp.json_summary("no summary\n") == {}
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "val_bpb": 4.5}\n{"step": 2, "val_bpb": 4.0}\n')
    assert rp.stage_figures("pretrain", log, tmp_path) == {"steps": 2, "tokens_per_sec": 10.0, "val_bpb": 3.25,
                                                           "parameters": "1.45M"}
    assert rp.stage_figures("pretrain", "crashed before its summary", tmp_path) == {"val_bpb": 4.0}


# ----------------------------------------------------------------------------- running stages

def test_a_failing_stage_is_recorded_with_its_exit_code_and_log(tmp_path):
    (tmp_path / "logs").mkdir()
    command = (sys.executable, "-c", "import sys; print('boom'); sys.exit(3)")
    result, stopped_by = run_stage(Stage("pretrain", command), command, tmp_path)
    assert (result.status, result.exit_code, stopped_by) == ("failed", 3, None)
    assert (tmp_path / result.log).read_text().strip() == "boom" and result.log == "logs/pretrain.log"


CHILD = """
import signal, sys, time
signals = []
signal.signal(signal.SIGINT, lambda *_: signals.append(1))
print("ready", flush=True)
while not signals:
    time.sleep(0.05)
time.sleep(0.5)  # a second signal, if one came, would be counted now ("saving")
open(sys.argv[1], "w").write(str(len(signals)))
sys.exit(130)
"""
DRIVER = """
import json, sys
from pathlib import Path
from runs.plan import Stage
from runs.speedrun import run_stage
command = (sys.executable, "-c", sys.argv[2], sys.argv[3])
result, stopped_by = run_stage(Stage("pretrain", command), command, Path(sys.argv[1]))
print("RESULT " + json.dumps([result.status, result.exit_code, stopped_by]))
"""


@pytest.mark.slow
def test_ctrl_c_reaches_the_stage_once_and_stops_the_run(tmp_path):
    (tmp_path / "logs").mkdir()
    count = tmp_path / "signals"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), textwrap.dedent(CHILD), str(count)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in driver.stdout:  # the child's output streams through the driver
        if line.strip() == "ready":
            break
    os.kill(driver.pid, signal.SIGINT)  # a Ctrl-C reaches the speedrun only: the stage has its own session
    out, _ = driver.communicate(timeout=60)
    assert json.loads(out.split("RESULT ", 1)[1]) == ["interrupted", 130, signal.SIGINT]
    assert count.read_text() == "1"  # forwarded once: a trainer saves rather than stopping at once


@pytest.mark.slow
def test_a_failed_stage_stops_the_run_with_one_line_naming_it(tmp_path):
    (tmp_path / "one.txt").write_text("x\n")
    run = subprocess.run([sys.executable, "-m", "runs.speedrun", "--dry_run", "--output_dir", str(tmp_path / "run"),
                          "--train_data", str(tmp_path / "one.txt")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    log = tmp_path / "run" / "logs" / "tokenizer.log"
    assert run.stderr.strip().splitlines()[-1] == f"error: stage tokenizer failed (exit 2): see {log}"
    assert "| tokenizer | failed (exit 2) |" in (tmp_path / "run" / "report.md").read_text()
    assert "== pretrain" not in run.stdout


# ----------------------------------------------------------------------------- the dry run, end to end

@pytest.mark.slow
def test_dry_run_end_to_end_then_a_rerun_reuses_every_stage(tmp_path):
    models = sorted(p.name for p in (ROOT / "models").iterdir()) if (ROOT / "models").is_dir() else []
    out = tmp_path / "run"
    command = [sys.executable, "-m", "runs.speedrun", "--dry_run", "--output_dir", str(out)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert first.returncode == 0, first.stderr[-3000:]
    text = (out / "report.md").read_text(encoding="utf-8")
    for name in ("tokenizer", "pretrain", "sft", "benchmarks", "serve"):
        assert f"| {name} | ran |" in text and (out / "logs" / f"{name}.log").is_file(), name
    for figure in ("validation bits per byte: **", "tokens per second: ", "exact match on the held-out tasks: **",
                   "| **CORE** |", "| hellaswag | 8 |", "| gsm8k | 8 |", "| arc_easy | 8 |",
                   "answered `/health` in"):
        assert figure in text, figure
    for link in ("pretrain/loss_curve.png", "sft/loss_curve.png"):
        assert f"]({link})" in text and (out / link).is_file()
    state = json.loads((out / "speedrun.json").read_text())["stages"]
    assert {name: row["result"]["status"] for name, row in state.items()} == dict.fromkeys(
        ("tokenizer", "pretrain", "sft", "benchmarks", "serve"), "ok")

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    text = (out / "report.md").read_text(encoding="utf-8")
    for name in ("tokenizer", "pretrain", "sft", "benchmarks"):
        assert f"| {name} | reused (earlier run) |" in text, name
    assert "| serve | ran |" in text  # the server check runs every time
    assert (sorted(p.name for p in (ROOT / "models").iterdir()) if (ROOT / "models").is_dir() else []) == models
