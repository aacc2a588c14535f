"""The speedrun's report: each stage's figures read from what its CLI wrote (the JSON summary line of its log, its
metrics.jsonl, the evaluator's report), the machine it ran on, and ``report.md`` built from them as a pure function.

    figures = stage_figures("pretrain", log_text, output_dir)      # {"val_bpb": ..., "tokens_per_sec": ..., ...}
    text = build_report(ReportInfo(...), [StageResult(...), ...])  # markdown
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from run_folder import read_metrics

STATUS_TEXT = {"ok": "ran", "failed": "failed", "interrupted": "interrupted"}


@dataclass
class StageResult:
    """One stage's run: the command as run, how it ended, its wall time, its log and its figures."""
    name: str
    command: tuple[str, ...]
    status: str  # "ok", "failed" or "interrupted"
    wall_s: float
    log: str  # relative to the speedrun's folder
    figures: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    reused: bool = False  # done by an earlier run of the same command: not run again

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "command": list(self.command)}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> StageResult:
        return cls(**{**row, "command": tuple(row["command"])})


@dataclass(frozen=True)
class ReportInfo:
    """What the report says about the run as a whole."""
    invocation: str  # the speedrun command line
    size: str
    output_dir: str
    machine: dict[str, Any]
    cost_per_hour: float
    generated: str  # when, as text


# ----------------------------------------------------------------------------- figures from the stages' outputs

def json_summary(log_text: str) -> dict[str, Any]:
    """The last JSON object printed on a line of its own (the trainers' summary line), or {} when there is none."""
    for line in reversed(re.split(r"[\r\n]+", log_text)):
        if line.startswith("{") and line.rstrip().endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def _curve(folder: Path, output_dir: Path) -> dict[str, str]:
    curve = folder / "loss_curve.png"
    return {"loss_curve": curve.relative_to(output_dir).as_posix()} if curve.is_file() else {}


def _pretrain_figures(log_text: str, output_dir: Path) -> dict[str, Any]:
    summary, folder = json_summary(log_text), output_dir / "pretrain"
    rows = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    bpbs = [r["val_bpb"] for r in rows if "val_bpb" in r]  # the metrics log, should the summary line be missing
    size = re.search(r"^model: .*?([\d.]+[KMBT]) parameters", log_text, flags=re.M)
    figures = {key: summary[key] for key in ("steps", "tokens_per_sec", "val_bpb", "unigram_val_bpb", "mfu")
               if summary.get(key) is not None}
    if "val_bpb" not in figures and bpbs:
        figures["val_bpb"] = bpbs[-1]
    return {**figures, **({"parameters": size.group(1)} if size else {}), **_curve(folder, output_dir)}


def _benchmark_figures(output_dir: Path) -> dict[str, Any]:
    path = output_dir / "benchmarks" / "eval_report.json"
    results = json.loads(path.read_text(encoding="utf-8"))["results"] if path.is_file() else []
    return {"models": [{"model": Path(r["model_path"]).stem, "parameters": r.get("n_parameters"),
                        **r["benchmarks"]} for r in results if "benchmarks" in r]}


def stage_figures(name: str, log_text: str, output_dir: Path) -> dict[str, Any]:
    """The figures the report shows for a finished stage, from its log and the files it wrote."""
    if name == "tokenizer":
        vocab = output_dir / "tokenizer" / "vocab.json"
        ratio = re.search(r"([\d.]+) bytes/token", log_text)
        return {**({"vocab_size": len(json.loads(vocab.read_text(encoding="utf-8")))} if vocab.is_file() else {}),
                **({"bytes_per_token": float(ratio.group(1))} if ratio else {})}
    if name == "pretrain":
        return _pretrain_figures(log_text, output_dir)
    if name == "sft":
        summary = json_summary(log_text)
        return {**{key: summary[key] for key in ("steps", "best_val_loss", "exact_match") if key in summary},
                **_curve(output_dir / "sft", output_dir)}
    if name == "benchmarks":
        return _benchmark_figures(output_dir)
    return {}


def describe_machine() -> dict[str, Any]:
    """The CPU (model, cores), the visible GPUs, torch and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0].strip() if names else cpu
    except OSError:  # not Linux
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.platform(terse=True)}


# ----------------------------------------------------------------------------- the markdown

def duration(seconds: float) -> str:
    """3.7 s, 4m 05s, 1h 02m 03s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m {secs:02d}s"


def command_text(command: Sequence[str]) -> str:
    """A command as a user types it: the Python interpreter's path shown as ``python``."""
    shown = ["python" if Path(part).name.startswith("python") and i == 0 else part for i, part in enumerate(command)]
    return shlex.join(shown)


def _machine_section(machine: dict[str, Any]) -> list[str]:
    gpus = machine.get("gpus") or []
    gpu_text = ", ".join(f"{gpus.count(name)} x {name}" for name in dict.fromkeys(gpus)) if gpus else "none"
    return ["## Machine", "", "| | |", "|---|---|", f"| CPU | {machine.get('cpu')} ({machine.get('cores')} cores) |",
            f"| GPU | {gpu_text} |", f"| torch | {machine.get('torch')} |", f"| Python | {machine.get('python')} |",
            f"| OS | {machine.get('os')} |", ""]


def _stages_section(results: Sequence[StageResult], cost_per_hour: float) -> list[str]:
    def cost(seconds: float) -> str:
        return f"${seconds / 3600 * cost_per_hour:.2f}" if cost_per_hour > 0 else "-"

    lines = ["## Stages", "", "| stage | status | wall time | cost | command | log |", "|---|---|---:|---:|---|---|"]
    for r in results:
        status = "reused (earlier run)" if r.reused else STATUS_TEXT.get(r.status, r.status)
        if r.status == "failed" and r.exit_code is not None:
            status += f" (exit {r.exit_code})"
        lines.append(f"| {r.name} | {status} | {duration(r.wall_s)} | {cost(r.wall_s)} | "
                     f"`{command_text(r.command)}` | [{Path(r.log).name}]({r.log}) |")
    total = sum(r.wall_s for r in results)
    lines += [f"| **total** | | {duration(total)} | {cost(total)} | | |", ""]
    if cost_per_hour > 0:
        lines += [f"Cost at ${cost_per_hour:.2f} per hour of this machine.", ""]
    return lines


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _training_sections(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    pre = figures.get("pretrain")
    if pre:
        lines += ["## Pretraining", "", f"- validation bits per byte: **{_number(pre.get('val_bpb'))}**"
                  + (f" (unigram baseline {_number(pre['unigram_val_bpb'])})" if "unigram_val_bpb" in pre else ""),
                  f"- tokens per second: {_number(pre.get('tokens_per_sec'), 0)} (median of the logged steps)",
                  f"- steps: {pre.get('steps', '-')}; model: {pre.get('parameters', '-')} parameters"]
        lines += [f"- MFU: {_number(pre['mfu'], 3)}"] if "mfu" in pre else []
        lines += ["", f"![pretraining loss]({pre['loss_curve']})"] if "loss_curve" in pre else []
        lines.append("")
    sft = figures.get("sft")
    if sft:
        match = sft.get("exact_match", {})
        per_task = ", ".join(f"{key.split('/', 1)[1]} {_number(value, 3)}" for key, value in match.items()
                             if key.startswith("exact_match/"))
        lines += ["## SFT", "", f"- exact match on the held-out tasks: **{_number(match.get('exact_match'), 3)}**"
                  + (f" ({per_task})" if per_task else ""),
                  f"- best validation loss: {_number(sft.get('best_val_loss'))}; steps: {sft.get('steps', '-')}"]
        lines += ["", f"![SFT loss]({sft['loss_curve']})"] if "loss_curve" in sft else []
        lines.append("")
    return lines


def _benchmarks_section(models: Sequence[dict[str, Any]]) -> list[str]:
    """One row per task, two columns per model: the accuracy CORE centres (acc or acc_norm) and the centred one."""
    if not models:
        return []
    names = list(models[0]["tasks"])
    head = "| task | n | metric | " + " | ".join(f"{m['model']} | {m['model']} centred" for m in models) + " |"
    lines = ["## Benchmarks", "", head, "|---|---:|---|" + "---:|---:|" * len(models)]
    for name in names:
        first = models[0]["tasks"][name]
        cells = " | ".join(f"{_number(m['tasks'][name][first['metric']])} | {_number(m['tasks'][name]['centred'])}"
                           for m in models)
        lines.append(f"| {name} | {first['n']} | {first['metric']} | {cells} |")
    core = " | ".join(f" | **{_number(m['core'])}**" for m in models)
    lines.append(f"| **CORE** | | mean centred | {core} |")
    files = ", ".join(f"{name} `{models[0]['tasks'][name]['path']}`" for name in names)
    return lines + ["", f"Files: {files}. CORE is the mean of the centred accuracies (0 = chance, 1 = all right); "
                        "it compares runs of the same files and limits only.", ""]


def _chat_section(serve: dict[str, Any] | None, sft_model: str) -> list[str]:
    lines = ["## Chat", ""]
    if serve:
        lines += [f"The server started and answered `/health` in {duration(serve['ready_s'])} "
                  f"(device {serve.get('device', '-')}); the chat page answered {serve.get('chat_page', '-')}."]
        if "reply" in serve:
            lines += ["", f"Asked `{serve['prompt']}`, the SFT model replied `{serve['reply']}`."]
        lines.append("")
    return lines + ["Serve it and chat at http://127.0.0.1:8000/chat:", "", "```bash",
                    f"python -m inference.api_service --model_path {sft_model}", "```", ""]


def build_report(info: ReportInfo, results: Sequence[StageResult]) -> str:
    """report.md: the run, the machine, the stages (command, wall time, cost), each stage's figures, how to chat."""
    figures = {r.name: r.figures for r in results if r.status == "ok"}
    lines = ["# Speedrun report", "", f"`{info.invocation}` (size `{info.size}`), {info.generated}, "
             f"into `{info.output_dir}`.", ""]
    lines += _machine_section(info.machine) + _stages_section(results, info.cost_per_hour)
    lines += _training_sections(figures) + _benchmarks_section(figures.get("benchmarks", {}).get("models", []))
    lines += _chat_section(figures.get("serve"), (Path(info.output_dir) / "sft" / "sft_best.pth").as_posix())
    lines += ["## Running it again", "", "The same command reuses every stage whose outputs exist and whose command "
              "is unchanged, continues an interrupted training stage from its last checkpoint, and reruns the "
              "stages after it; `--force` reruns every stage.", ""]
    return "\n".join(lines)
