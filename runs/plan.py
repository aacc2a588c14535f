"""The speedrun's plan: for a size, the documented CLI call of each stage (tokenizer, pretraining, SFT, benchmarks,
a server check), the files that show it is done, and which stages continue an interrupted run with ``--resume auto``.

A pure function of what the user asked (``RunSpec``), so that the commands for every size can be read and tested
without running anything; ``runs.speedrun`` runs them.

Sizes (each a row of ``SIZES``):

- ``dry``: every stage on tiny settings on the CPU (a 512-token vocabulary, 20 pretraining and 10 SFT steps of a
  one-layer model, 8 examples per task), to check the whole chain in a few minutes;
- ``cpu``: the CLIs' own defaults, the laptop run (a 1.45M-parameter model for about five minutes, SFT for about
  eight);
- ``gpu``: one GPU, a 6-layer 384-wide model with a 256-token context for 20 minutes, SFT with its defaults;
- ``gpus``: the same per process on N GPUs, pretraining and SFT under ``torchrun --standalone --nproc_per_node N``.

``--depth N`` (given by the user, never by a size) goes to pretraining as is and replaces the size's model shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SIZES: dict[str, dict[str, tuple[str, ...]]] = {
    "dry": {
        "tokenizer": ("--vocab_size", "512", "--num_workers", "1"),
        "shape": ("--n_layers", "1", "--d_model", "32", "--n_heads", "2"),
        "pretrain": ("--max_seq_len", "64", "--batch_size", "8", "--max_steps", "20", "--eval_interval", "10",
                     "--warmup_steps", "2", "--samples", "0", "--num_workers", "1", "--device", "cpu"),
        "sft": ("--max_steps", "10", "--eval_interval", "10", "--batch_size", "8", "--warmup_steps", "2",
                "--device", "cpu"),
        "benchmarks": ("--max_new_tokens", "16", "--device", "cpu"),
        "serve": ("--device", "cpu"),
    },
    "cpu": {
        "tokenizer": ("--vocab_size", "8192"),
        "shape": (),
        "pretrain": (),
        "sft": (),
        "benchmarks": ("--max_new_tokens", "32"),  # the local GSM8K-format answers are one line
        "serve": (),
    },
    "gpu": {
        "tokenizer": ("--vocab_size", "8192"),
        "shape": ("--n_layers", "6", "--d_model", "384", "--n_heads", "6"),
        "pretrain": ("--max_seq_len", "256", "--batch_size", "64", "--max_minutes", "20", "--device", "cuda"),
        "sft": ("--device", "cuda"),
        "benchmarks": ("--batch_size", "32", "--device", "cuda"),
        "serve": ("--device", "cuda"),
    },
}
SIZES["gpus"] = SIZES["gpu"]  # per process; torchrun multiplies the batch by the number of GPUs
DEFAULT_LIMIT = {"dry": 8}  # examples per benchmark task when the user gives no --limit (else all)
SERVER_HOST = "127.0.0.1"  # the server check listens on loopback only


@dataclass(frozen=True)
class RunSpec:
    """What the user asked: the size, where everything goes, the data, the benchmark files."""
    size: str  # a key of SIZES
    output_dir: Path
    train_data: Path
    val_data: Path
    tasks: tuple[tuple[str, Path], ...]  # (task name, file) for evaluator --tasks
    python: str = "python"
    torchrun: str = "torchrun"
    nproc: int = 1  # processes (GPUs) with size gpus
    depth: int | None = None  # pretrain_trainer.py --depth, only when the user gives it
    limit: int | None = None  # evaluator --limit; None: the size's DEFAULT_LIMIT
    port: int = 8000  # the server check's port


@dataclass(frozen=True)
class Stage:
    """One step: the command it runs, the files that show it finished, whether a rerun continues it."""
    name: str
    command: tuple[str, ...]
    outputs: tuple[Path, ...] = ()  # all present (and the same command recorded) = done; none: it always runs
    resumable: bool = False  # a trainer: `--resume auto` continues an interrupted run from its last checkpoint
    server: bool = False  # started, checked on /health and /chat, then stopped (not run to completion)
    folders: tuple[Path, ...] = field(default=())  # created before the command runs (the evaluator's --output)


def benchmark_limit(size: str, limit: int | None) -> int | None:
    """Examples scored per benchmark task: the user's --limit, else the size's default (all for real sizes)."""
    return limit if limit is not None else DEFAULT_LIMIT.get(size)


def layout(output_dir: Path) -> dict[str, Path]:
    """Where each stage writes under the speedrun's folder."""
    return {"tokenizer": output_dir / "tokenizer", "pretrain": output_dir / "pretrain", "sft": output_dir / "sft",
            "benchmarks": output_dir / "benchmarks", "cache": output_dir / "token_cache", "logs": output_dir / "logs"}


def launcher(spec: RunSpec, script: str) -> tuple[str, ...]:
    """How a training script starts: plain Python, or torchrun with one process per GPU (size gpus)."""
    if spec.size == "gpus":
        return (spec.torchrun, "--standalone", "--nproc_per_node", str(spec.nproc), script)
    return (spec.python, script)


def plan(spec: RunSpec) -> list[Stage]:
    """The stages in order, each the documented CLI call for ``spec``'s size."""
    size, where = SIZES[spec.size], layout(spec.output_dir)
    tokenizer = where["tokenizer"]
    pretrained, sft = where["pretrain"] / "pretrain_best.pth", where["sft"] / "sft_best.pth"
    report = where["benchmarks"] / "eval_report.json"
    shape = ("--depth", str(spec.depth)) if spec.depth is not None else size["shape"]
    limit = benchmark_limit(spec.size, spec.limit)
    limit_flags = ("--limit", str(limit)) if limit is not None else ()
    tasks = ",".join(f"{name}={path}" for name, path in spec.tasks)
    return [
        Stage("tokenizer", (spec.python, "byte_level_bpe.py", "--input", str(spec.train_data), *size["tokenizer"],
                            "--output", str(tokenizer)), (tokenizer / "vocab.json", tokenizer / "merges.txt")),
        Stage("pretrain", (*launcher(spec, "pretrain_trainer.py"), "--train_data_dir", str(spec.train_data),
                           "--val_data_dir", str(spec.val_data), "--tokenizer_dir", str(tokenizer),
                           "--cache_dir", str(where["cache"]), "--output_dir", str(where["pretrain"]), *shape,
                           *size["pretrain"]), (pretrained,), resumable=True),
        Stage("sft", (*launcher(spec, "finetune.py"), "--mode", "sft", "--pretrained_model", str(pretrained),
                      "--output_dir", str(where["sft"]), *size["sft"]), (sft,), resumable=True),
        Stage("benchmarks", (spec.python, "evaluator.py", "--model_type", "sft", "--compare", str(pretrained),
                             str(sft), "--tasks", tasks, *limit_flags, *size["benchmarks"],
                             "--output", str(report), "--no_progress"), (report,), folders=(where["benchmarks"],)),
        Stage("serve", (spec.python, "-m", "inference.api_service", "--model_path", str(sft), "--host", SERVER_HOST,
                        "--port", str(spec.port), *size["serve"]), server=True),
    ]


def with_resume(stage: Stage, resume: bool) -> tuple[str, ...]:
    """The command as run: a trainer continuing its own interrupted run gets ``--resume auto`` (from its last step
    checkpoint); any other run starts fresh (the trainer moves an earlier run aside to previous/)."""
    return stage.command + ("--resume", "auto") if stage.resumable and resume else stage.command
