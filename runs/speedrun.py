"""One command from raw text to a served chat model: tokenizer -> pretraining -> SFT -> benchmarks -> report.md ->
(with --serve) the server and its chat page. Each stage runs its documented CLI as a subprocess, its output streamed
and kept in ``<output_dir>/logs/<stage>.log``, its wall time measured; the first stage that fails stops the run with
one line naming it and its log. A rerun reuses the stages already done (``--force`` redoes them); Ctrl-C stops the
current stage cleanly (the trainers save a checkpoint that the next run continues) and exits 130.

    python -m runs.speedrun --dry_run                 # every stage, tiny, on the CPU, in a few minutes
    python -m runs.speedrun --size cpu --serve        # the laptop run, then serve it on http://127.0.0.1:8000/chat
    python -m runs.speedrun --size gpus --nproc 8 --cost_per_hour 24
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

import cli
import task_benchmarks
from atomic_file import atomic_path
from readers import DataError, data_files
from runs.plan import SERVER_HOST, SIZES, RunSpec, Stage, benchmark_limit, layout, plan, with_resume
from runs.report import ReportInfo, StageResult, build_report, command_text, describe_machine, stage_figures

ROOT = Path(__file__).resolve().parent.parent  # the stages' commands run from the repository root
LOCAL_TASKS = {"hellaswag": "data/benchmarks/hellaswag_local.jsonl", "gsm8k": "data/benchmarks/gsm8k_local.jsonl",
               "arc_easy": "data/benchmarks/arc_easy_local.jsonl"}  # python -m data.build_benchmark_tasks
DEFAULT_OUTPUT = Path("models/speedrun")
STATE_FILE = "speedrun.json"  # each stage's last result, read by the next run to reuse what is done
SERVER_READY_S = 300.0  # the server check gives the model this long to load
CHAT_PROMPT = "计算 12 + 30 = ?"  # the server check's question: a held-out-format sum


class StageFailed(Exception):
    """A stage exited with an error; the run stops there."""


# ----------------------------------------------------------------------------- the run's settings

def project_path(path: Path) -> Path:
    """A user's path as the stages (run from the repository root) see it: relative to the root when inside it."""
    absolute = path.expanduser().resolve()
    return absolute.relative_to(ROOT) if absolute.is_relative_to(ROOT) else absolute


def free_port() -> int:
    """A TCP port nobody listens on now (the server check's)."""
    with socket.socket() as sock:
        sock.bind((SERVER_HOST, 0))
        return sock.getsockname()[1]


def pick_size(args: Any, gpus: int) -> str:
    """The size asked, or by the GPUs visible (auto); refuses a size this machine cannot run."""
    if args.dry_run:
        return "dry"
    size = args.size if args.size != "auto" else ("gpus" if gpus > 1 else "gpu" if gpus == 1 else "cpu")
    if size in ("gpu", "gpus") and gpus == 0:
        raise cli.UsageError(f"--size {size} needs a CUDA GPU and torch sees none: use --size cpu")
    if args.nproc is not None and size != "gpus":
        raise cli.UsageError(f"--nproc applies to --size gpus (this run's size is {size})")
    if args.nproc is not None and args.nproc > gpus:
        raise cli.UsageError(f"--nproc {args.nproc}: torch sees {gpus} GPU(s)")
    return size


def check_dry_run(args: Any, explicit: set[str]) -> None:
    """--dry_run runs its own tiny sizes on the CPU into a scratch folder: flags that would change that are errors."""
    clashes = [f"--{name}" for name in ("size", "depth", "nproc", "serve") if name in explicit]
    if clashes:
        raise cli.UsageError(f"--dry_run runs fixed tiny sizes on the CPU and serves nothing: drop {clashes[0]}")
    models = (ROOT / "models").resolve()
    if args.output_dir is not None and args.output_dir.expanduser().resolve().is_relative_to(models):
        raise cli.UsageError(f"--dry_run never writes under {models}: pass another --output_dir")


def task_list(extra: str | None, limit: int | None) -> tuple[tuple[str, Path], ...]:
    """The project's own tasks, a task of the same name given in --tasks replacing it; every file read and checked
    now, before hours of training."""
    pairs = {name: Path(path) for name, path in LOCAL_TASKS.items()}
    given = task_benchmarks.parse_task_list(extra) if extra else []
    pairs.update({name: project_path(path) for name, path in given})
    task_benchmarks.load_tasks([(name, ROOT / path) for name, path in pairs.items()], limit)
    return tuple(pairs.items())


def spec_from_args(args: Any, explicit: set[str]) -> RunSpec:
    """The run's settings from the flags, every one checked before anything is written."""
    if args.dry_run:
        check_dry_run(args, explicit)
    gpus = torch.cuda.device_count()
    size = pick_size(args, gpus)
    for flag, path in (("--train_data", args.train_data), ("--val_data", args.val_data)):
        try:
            data_files(path)  # missing, or holding no file of a corpus format
        except DataError as err:
            raise cli.UsageError(f"{flag}: {err}") from None
    tasks = task_list(args.tasks, benchmark_limit(size, args.limit))
    output = args.output_dir or (Path(tempfile.mkdtemp(prefix="speedrun_dry_")) if size == "dry" else DEFAULT_OUTPUT)
    cli.check_output_folder(output, "--output_dir")
    torchrun = Path(sys.executable).with_name("torchrun")
    return RunSpec(size=size, output_dir=project_path(output), train_data=project_path(args.train_data),
                   val_data=project_path(args.val_data), tasks=tasks, python=sys.executable,
                   torchrun=str(torchrun) if torchrun.exists() else "torchrun",
                   nproc=args.nproc or max(gpus, 1), depth=args.depth, limit=args.limit,
                   port=free_port())


# ----------------------------------------------------------------------------- running a stage

def copy_output(stream: Any, sink: Any) -> None:
    """The child's output, as it comes, to the terminal and to its log (tqdm's carriage returns included)."""
    for chunk in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        sink.write(chunk)
        sink.flush()


@contextlib.contextmanager
def started(command: Sequence[str], log: Path) -> Iterator[subprocess.Popen]:
    """A stage's process, its output streamed and logged; stopped (SIGTERM, then SIGKILL after a minute) if still
    running when the block ends. It has a session of its own, so a Ctrl-C reaches it once, from us."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(list(command), cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        pump = threading.Thread(target=copy_output, args=(proc.stdout, sink), daemon=True)
        pump.start()
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            pump.join()
            proc.stdout.close()


def wait_forwarding(proc: subprocess.Popen) -> int | None:
    """Wait for ``proc``; each Ctrl-C or SIGTERM we get is passed on to it (the trainers save, then stop; a second
    Ctrl-C stops them at once). Returns the last signal passed on, or None."""
    forwarded = None
    while True:
        try:
            proc.wait()
            return forwarded
        except KeyboardInterrupt:
            forwarded = signal.SIGINT
        except cli.Interrupted as err:  # SIGTERM, as cli.run_cli raises it
            forwarded = err.signum
        if proc.poll() is None:
            proc.send_signal(forwarded)


def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of a GET, or a JSON POST when ``body`` is given; (0, b"") when nothing answers. No proxy:
    the server is on loopback."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def check_server(command: Sequence[str], log: Path) -> dict[str, Any]:
    """Start the server, wait for /health to say ok, open the chat page, ask one chat question, stop it."""
    base = f"http://{SERVER_HOST}:{command[list(command).index('--port') + 1]}"
    start = time.monotonic()
    with started(command, log) as proc:
        while (answer := http(base + "/health", timeout=5))[0] != 200:
            if proc.poll() is not None:
                raise StageFailed(f"the server exited with status {proc.returncode} before /health said ok")
            if time.monotonic() - start > SERVER_READY_S:
                raise StageFailed(f"the server did not answer /health within {SERVER_READY_S:.0f} s")
            time.sleep(0.5)
        ready, health = time.monotonic() - start, json.loads(answer[1])
        chat_page, _ = http(base + "/chat")
        status, body = http(base + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": CHAT_PROMPT}], "max_tokens": 16, "temperature": 0})
    if chat_page != 200 or status != 200:
        raise StageFailed(f"the server answered /chat with {chat_page} and a chat completion with {status}")
    reply = json.loads(body)["choices"][0]["message"]["content"]
    return {"ready_s": round(ready, 1), "device": health.get("device"), "chat_page": chat_page,
            "prompt": CHAT_PROMPT, "reply": reply}


def run_stage(stage: Stage, command: tuple[str, ...], output_dir: Path) -> tuple[StageResult, int | None]:
    """Run one stage (or the server check) and read its figures; never raises for a failed or interrupted stage.
    Returns its result and the signal that stopped the run during it (None: none)."""
    log = layout(output_dir)["logs"] / f"{stage.name}.log"
    for folder in stage.folders:
        (ROOT / folder).mkdir(parents=True, exist_ok=True)
    start, code, figures, stopped_by = time.monotonic(), 0, {}, None
    try:
        if stage.server:
            figures = check_server(command, ROOT / log)
        else:
            with started(command, ROOT / log) as proc:
                stopped_by = wait_forwarding(proc)
            code = proc.returncode
    except (KeyboardInterrupt, cli.Interrupted) as err:  # during the server check
        stopped_by, code = getattr(err, "signum", signal.SIGINT), None
    except StageFailed as err:
        code = 1
        with open(ROOT / log, "a", encoding="utf-8") as sink:
            sink.write(f"\nerror: {err}\n")
        print(f"error: {err}", file=sys.stderr)
    # a trainer that finished despite the signal is done; one that saved and stopped continues on the next run
    status = "ok" if code == 0 else "interrupted" if stopped_by else "failed"
    if status == "ok" and not stage.server:
        figures = stage_figures(stage.name, (ROOT / log).read_text(encoding="utf-8", errors="replace"),
                                ROOT / output_dir)
    result = StageResult(stage.name, command, status, round(time.monotonic() - start, 1),
                         log.relative_to(output_dir).as_posix(), figures, code)
    return result, stopped_by


# ----------------------------------------------------------------------------- the whole run

def load_state(output_dir: Path) -> dict[str, Any]:
    """{stage: {"plan": the command planned, "result": its StageResult}} from the last run into this folder."""
    path = ROOT / output_dir / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("stages", {}) if path.is_file() else {}
    except (json.JSONDecodeError, AttributeError):  # a damaged state file: every stage runs again
        return {}


def write_json_and_report(spec: RunSpec, state: dict[str, Any], info: ReportInfo,
                          results: Sequence[StageResult]) -> None:
    folder = ROOT / spec.output_dir
    with atomic_path(folder / STATE_FILE) as tmp:
        tmp.write_text(json.dumps({"stages": state}, ensure_ascii=False, indent=1), encoding="utf-8")
    with atomic_path(folder / "report.md") as tmp:
        tmp.write_text(build_report(info, results), encoding="utf-8")


def is_done(stage: Stage, earlier: dict[str, Any] | None) -> bool:
    """Done by an earlier run: the same command finished, and its outputs are still there."""
    return bool(earlier and stage.outputs and tuple(earlier["plan"]) == stage.command
                and earlier["result"]["status"] == "ok" and all((ROOT / path).exists() for path in stage.outputs))


def run_all(spec: RunSpec, info: ReportInfo, force: bool) -> tuple[list[StageResult], int | None]:
    """Every stage in order, reusing what is done; stops at the first that fails or is interrupted. Returns the
    results and the signal that stopped the run (None: it was not interrupted)."""
    state = {} if force else load_state(spec.output_dir)
    results: list[StageResult] = []
    fresh = force  # once a stage runs, the stages after it use its new outputs and run too
    for stage in plan(spec):
        earlier = state.get(stage.name)
        if not fresh and is_done(stage, earlier):
            results.append(replace(StageResult.from_json(earlier["result"]), reused=True))
            print(f"\n== {stage.name}: done by an earlier run of the same command (reused; --force reruns it)")
            continue
        resume = not fresh and earlier is not None and tuple(earlier["plan"]) == stage.command
        command = with_resume(stage, resume)
        print(f"\n== {stage.name}: {command_text(command)}", flush=True)
        result, stopped_by = run_stage(stage, command, spec.output_dir)
        results.append(result)
        fresh = fresh or bool(stage.outputs)
        state[stage.name] = {"plan": list(stage.command), "result": result.to_json()}
        write_json_and_report(spec, state, info, results)
        if result.status != "ok" or stopped_by is not None:
            return results, stopped_by
        print(f"== {stage.name}: done in {result.wall_s:.1f} s", flush=True)
    return results, None


def serve(spec: RunSpec, host: str, port: int) -> int:
    """The SFT model served in the foreground with its chat page, until Ctrl-C."""
    sft = layout(spec.output_dir)["sft"] / "sft_best.pth"
    command = (spec.python, "-m", "inference.api_service", "--model_path", str(sft), "--host", host,
               "--port", str(port), *SIZES[spec.size]["serve"])
    print(f"\n== serving {sft}: chat at http://{host}:{port}/chat (Ctrl-C stops)\n{shlex.join(command)}", flush=True)
    with started(command, ROOT / layout(spec.output_dir)["logs"] / "serve_foreground.log") as proc:
        wait_forwarding(proc)
    return 0


# ----------------------------------------------------------------------------- CLI

@dataclass
class SpeedrunOptions:
    """The speedrun's settings, each written once: name, type, default and help."""

    size: str = cli.setting("auto", "cpu: the CLIs' laptop defaults; gpu: a larger model on one GPU; gpus: the same "
                            "under torchrun on --nproc GPUs; auto: by the GPUs torch sees (docs/speedrun.md)",
                            choices=("auto", "cpu", "gpu", "gpus"))
    depth: int | None = cli.setting(None, "passed to pretrain_trainer.py --depth N, replacing the size's model shape",
                                    type=cli.positive_int)
    nproc: int | None = cli.setting(None, "--size gpus: processes, one per GPU (default: every GPU)",
                                    type=cli.positive_int)
    dry_run: bool = cli.setting(False, "every stage on tiny sizes on the CPU, the server only checked, in a few "
                                "minutes, into a new temporary folder unless --output_dir (never under models/)")
    output_dir: Path | None = cli.setting(None, f"where every stage writes, the logs, the state and report.md "
                                          f"(default: {DEFAULT_OUTPUT}, or a new temporary folder with --dry_run)",
                                          type=Path)
    train_data: Path = cli.setting(Path("data/pretrain/train.txt"), "raw text for the tokenizer and pretraining "
                                   "(.txt, .jsonl*, .parquet, or a folder)", type=Path)
    val_data: Path = cli.setting(Path("data/pretrain/val.txt"), "held-out text, same formats", type=Path)
    tasks: str | None = cli.setting(None, "more benchmark files for evaluator.py --tasks (HellaSwag, ARC, MMLU, "
                                    "GSM8K) as NAME=PATH[,NAME=PATH...]; a name given here replaces the project's "
                                    "own task of that name (data/benchmarks/)")
    limit: int | None = cli.setting(None, "examples scored per task (default: all; 8 with --dry_run)",
                                    type=cli.positive_int)
    cost_per_hour: float = cli.setting(0.0, "the machine's price per hour, to report each stage's cost (0: no cost "
                                       "column)", type=cli.nonnegative_float)
    force: bool = cli.setting(False, "rerun every stage, even those an earlier run finished")
    serve: bool = cli.setting(False, "then serve the SFT model with its chat page until Ctrl-C")
    host: str = cli.setting(SERVER_HOST, "--serve: the address to bind (0.0.0.0: other machines)")
    port: int = cli.setting(8000, "--serve: the TCP port", type=cli.port)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m runs.speedrun", description=__doc__.splitlines()[0])
    cli.add_settings(p, SpeedrunOptions)
    return p


def speedrun_options(argv: Sequence[str] | None) -> tuple[SpeedrunOptions, set[str]]:
    """(the options, the names of the flags the user typed), from one parse."""
    typed = cli.typed_settings(build_parser().parse_args(argv), SpeedrunOptions)
    return SpeedrunOptions(**typed), set(typed)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 before anything runs (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args, explicit = speedrun_options(argv)
    for flag in ("host", "port"):
        if flag in explicit and not args.serve:
            raise cli.UsageError(f"--{flag} applies to --serve")
    spec = spec_from_args(args, explicit)
    invocation = shlex.join(["python", "-m", "runs.speedrun", *(sys.argv[1:] if argv is None else argv)])
    info = ReportInfo(invocation, spec.size, spec.output_dir.as_posix(), describe_machine(), args.cost_per_hour,
                      datetime.now().strftime("%Y-%m-%d %H:%M"))
    (ROOT / layout(spec.output_dir)["logs"]).mkdir(parents=True, exist_ok=True)
    print(f"speedrun: size {spec.size}, into {spec.output_dir}")
    results, stopped_by = run_all(spec, info, args.force)
    report, last = spec.output_dir / "report.md", results[-1]
    if stopped_by is not None:
        print(f"\nstopped during {last.name} (its log: {spec.output_dir / last.log}); the same command continues the "
              f"run. Report so far: {report}", file=sys.stderr)
        return 128 + stopped_by
    if last.status != "ok":
        print(f"error: stage {last.name} failed (exit {last.exit_code}): see {spec.output_dir / last.log}",
              file=sys.stderr)
        return 1
    ran = sum(r.wall_s for r in results if not r.reused)
    print(f"\nspeedrun done: {ran:.0f} s of stages run now; report {report}")
    return serve(spec, args.host, args.port) if args.serve else 0


if __name__ == "__main__":
    sys.exit(main())
