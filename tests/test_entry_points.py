"""How the project's commands are run: every command the README, docs, Makefile and Dockerfile name answers ``--help``
in the form they give, from the project root (``python -m pkg.module`` for a script in a package, ``python x.py`` for
a top-level one); every script is named there; and no file edits the import path to make another form work."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for p in (ROOT / "docker").iterdir() if p.is_file())]

# `python -m pkg.mod`, `python x.py`, `$(PYTHON) x.py` (Makefile) and ["python", "-m", "pkg.mod"] (Dockerfile CMD)
COMMAND = re.compile(r'(?:\bpython3?|\$\(PYTHON\))"?(?:,\s*"|\s+)(-m(?:",\s*"|\s+))?([\w./]+)')
# an import-path edit, spelled so that this file does not match it
PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\s*\(|(\[[^\]]*\])?\s*\+?=(?!=))")


def project_file(form: str, target: str) -> Path | None:
    """The project file a documented command runs, or None where it is not the project's (pytest, llama_cpp)."""
    if form == "-m":
        path = ROOT / (target.replace(".", "/") + ".py")
    else:
        path = ROOT / target if target.endswith(".py") else ROOT / "-"  # `python -c ...`, `python HOST` in prose
    return path if path.is_file() else None


def documented_commands() -> dict[tuple[str, str], list[str]]:
    """(form, target) -> the documents naming it; form is "-m" (a module) or "path" (a file)."""
    found: dict[tuple[str, str], list[str]] = {}
    for document in DOCUMENTS:
        for match in COMMAND.finditer(document.read_text(encoding="utf-8")):
            key = ("-m" if match.group(1) else "path", match.group(2))
            if project_file(*key):
                found.setdefault(key, []).append(str(document.relative_to(ROOT)))
    return found


DOCUMENTED = documented_commands()


def project_sources() -> list[Path]:
    """Every .py file of the project (not under hidden folders such as .git or a .venv, nor under models/)."""
    return [p for p in sorted(ROOT.rglob("*.py"))
            if not any(part.startswith(".") or part == "models" for part in p.relative_to(ROOT).parts[:-1])]


def scripts() -> set[Path]:
    """Every project file with a ``__main__`` block (tests aside): the commands a user can run."""
    return {p for p in project_sources() if p.relative_to(ROOT).parts[0] != "tests"
            and 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")}


def test_every_script_is_documented_and_in_the_form_its_place_needs():
    named = {project_file(*key): key for key in DOCUMENTED}
    assert set(named) == scripts(), sorted(str(p.relative_to(ROOT)) for p in set(named) ^ scripts())
    for path, (form, target) in named.items():
        in_package = path.parent != ROOT  # inference/, data/, benchmarks/: its imports need the root, hence -m
        assert form == ("-m" if in_package else "path"), (target, DOCUMENTED[form, target])


# Each command runs in a child forked from one interpreter that has imported torch (the slow import nearly every
# command shares, ~2 s each), the way `python -m pkg.mod` / `python x.py` run it from the root: through runpy, with
# the root as sys.path[0]. The children start with none of the project's modules imported.
RUNNER = r"""
import json, os, runpy, sys, traceback
import torch
root, out, commands = os.getcwd(), sys.argv[1], json.loads(sys.argv[2])

def child(i, form, target):
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(os.path.join(out, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT), fd)
    sys.argv, sys.path[0], code = [target, "--help"], root, 0
    try:
        runpy.run_module(target, run_name="__main__", alter_sys=True) if form == "-m" else \
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

codes, running, waiting = {}, {}, list(enumerate(commands))
while waiting or running:
    if waiting and len(running) < (os.cpu_count() or 1):
        i, (form, target) = waiting.pop(0)
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(i, form, target)
        running[pid] = i
    else:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(commands))]))
"""


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[tuple[str, str], tuple[int, str, str]]:
    """(form, target) -> (exit code, stdout, stderr) of the command with --help, from the root, no PYTHONPATH."""
    out = tmp_path_factory.mktemp("help")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = sorted(DOCUMENTED)
    run = subprocess.run([sys.executable, "-c", RUNNER, str(out), json.dumps(commands)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    codes = json.loads(run.stdout.splitlines()[-1])
    return {key: (code, (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text())
            for i, (key, code) in enumerate(zip(commands, codes))}


@pytest.mark.slow
@pytest.mark.parametrize("form,target", sorted(DOCUMENTED))
def test_every_documented_command_answers_help_in_its_documented_form(form, target, help_runs):
    code, out, err = help_runs[form, target]
    assert code == 0 and out.startswith("usage: ") and "Traceback" not in err, err


def test_no_file_edits_the_import_path():
    """Scripts in packages run with -m from the root; pytest imports from the root through pytest.ini."""
    edits = [f"{p.relative_to(ROOT)}:{n}" for p in project_sources()
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if PATH_EDIT.search(line)]
    assert not edits, edits
