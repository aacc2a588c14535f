"""What the CLI tests share: a folder's snapshot, the one-line error check, a main() run as a user runs it, the
pretraining command line, and a command run on a full disk. Fixtures live in conftest.py; these are plain helpers."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (what 'left as it was' means)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "usage:" not in err, err  # ours, never argparse's usage block


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects bad values before anything runs
        code = exc.code
    return code, capsys.readouterr().err


def pretrain_args(corpus, tokenizer_dir, output_dir, *extra: str) -> list[str]:
    train, val = corpus
    return ["--train_data_dir", str(train), "--val_data_dir", str(val), "--tokenizer_dir", str(tokenizer_dir),
            "--output_dir", str(output_dir), "--device", "cpu", "--num_workers", "1", "--n_layers", "1",
            "--d_model", "32", "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "2", "--samples", "0", *extra]


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


KILLED_IN = """
import importlib, os, signal, sys
owner, name = sys.argv[1].rsplit(".", 1)
holder = importlib.import_module(owner) if not owner[0].isupper() else None
if holder is None:  # a method: module.Class.method
    module, cls = owner.rsplit(".", 1)
    holder = getattr(importlib.import_module(module), cls)
real = getattr(holder, name)

def write_then_die(*args, **kwargs):
    real(*args, **kwargs)  # the write itself, then kill -9 before the rename makes it visible
    os.kill(os.getpid(), signal.SIGKILL)

setattr(holder, name, write_then_die)
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
"""


def run_killed_in(writer: str, module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``module``'s CLI in a process killed with SIGKILL (kill -9) right after ``writer`` (``"pkg.mod.func"`` or
    ``"pkg.mod.Class.method"``) has written its temporary file: what a kill mid-save leaves on disk."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", KILLED_IN, writer, module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def temp_files(folder: Path) -> list[str]:
    """The names of crash-safe writes' temporary files and folders under ``folder`` (``atomic_file``'s names)."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".tmpdir", ".old")))
