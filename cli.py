"""The one error policy of every command-line tool: argument types that reject bad values at parse time,
settings written once as config fields (``setting``) and made into flags (``add_settings``), and ``run_cli``, which
turns a user's mistake into one ``error: ...`` line and exit status 2.

Its own module because the tokenizer CLI (which must not import torch), the trainers, the evaluator, the data
builders and the inference tools all share it, and none of them should import another for it.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

EXIT_USER_ERROR = 2
EXIT_SIGINT = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_SIGTERM = 143  # 128 + SIGTERM (docker stop, Slurm, Kubernetes)


class Interrupted(Exception):
    """A SIGINT/SIGTERM ended the program; ``message`` says what was saved."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.signum == signal.SIGTERM else EXIT_SIGINT


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the flag and says how to fix it."""


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Fail before any work if ``path`` cannot become a writable folder (it is a file, or its parent is read-only)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file: pass a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder: pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {existing} (permission denied): pass a writable folder")
    return path


PathArg = str | os.PathLike | None


def _same_or_inside(output: Path, source: Path) -> bool:
    """Whether writing ``output`` would replace ``source``: the same file (also through a link) or a folder
    holding it."""
    out, src = output.resolve(), source.resolve()
    if out == src or out in src.parents:
        return True
    try:
        return output.exists() and source.exists() and os.path.samefile(output, source)
    except OSError:
        return False


def check_outputs(outputs: dict[str, PathArg], inputs: Sequence[tuple[str, PathArg]] = (), overwrite: bool = False,
                  own: Callable[[Path], bool] | None = None) -> None:
    """The one rule for a command's outputs (flag -> path), checked before any work: an output is never one of the
    command's inputs ((flag, path) pairs; the same file, or a folder holding one), no two outputs are the same path,
    and an existing output is replaced only if ``own(path)`` recognises it as this command's earlier output, or with
    ``--overwrite``. None paths are skipped."""
    sources = [(flag, Path(p)) for flag, p in inputs if p is not None]
    targets = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    for flag, target in targets.items():
        for source_flag, source in sources:
            if _same_or_inside(target, source):
                raise UsageError(f"{flag} {target} would replace {source_flag} {source}: an output is never one of "
                                 "the command's inputs; pass another path")
        for other_flag, other in targets.items():
            if other_flag < flag and other.resolve() == target.resolve():
                raise UsageError(f"{flag} and {other_flag} are the same path {target}: pass a different path to each")
        holds_files = target.is_file() or (target.is_dir() and any(target.iterdir()))
        if holds_files and not overwrite and not (own and own(target)):
            raise UsageError(f"{flag} {target} already exists and was not written by this command: pass a new path, "
                             "or --overwrite to replace it")


# ----------------------------------------------------------------------------- argument types

def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


positive_int = int_at_least(1)


def port(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = _number(int, text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {value}")
    return value
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def repetition_penalty(text: str) -> float:
    """argparse type: a CTRL repetition penalty in [0.01, 100] (1 = off; a smaller one overflows the logits)."""
    value = _number(float, text)
    if not 0.01 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in [0.01, 100] (1.0 = off), got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a float in (0, 1] (top-p, a fraction that cannot be zero)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1] (a ratio where both ends mean something)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1) (dropout, label smoothing)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def proper_fraction(text: str) -> float:
    """argparse type: a float in (0, 1) (a share of records held out: neither none nor all)."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def path_or_none(text: str) -> str | None:
    """argparse type: a path, or 'none' (any case) for no path (--val_data_dir none: no evaluation)."""
    return None if text.lower() == "none" else text


def field_name(text: str) -> str:
    """argparse type: the name of a record field or column (--text_field): not empty, not padded with spaces."""
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a field name (e.g. text), got {text!r}")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or any(action.default is v for v in (None, argparse.SUPPRESS, False)):
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """The one parser of every CLI: a bad flag raises ``UsageError``, which ``run_cli`` prints as one ``error:`` line
    (exit 2) instead of argparse's usage block; defaults are shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a typo or a prefix (--lr for --lr_warmup) is an error, never a guess
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        for text in sys.argv[1:] if args is None else args:
            check_argument_text(text)
        return super().parse_known_args(args, namespace)


def check_argument_text(text: str) -> None:
    """The Unicode policy for the command line: an argument is text. Python hands a byte that is not UTF-8 over as
    a lone surrogate (U+DC80-U+DCFF), which no tokenizer, file or JSON answer can carry: refused here, naming it."""
    bad = next((ch for ch in text if "\ud800" <= ch <= "\udfff"), None) if isinstance(text, str) else None
    if bad is None:
        return
    what = (f"byte {ord(bad) - 0xDC00:#04x} is not UTF-8" if 0xDC80 <= ord(bad) <= 0xDCFF else
            f"lone surrogate \\u{ord(bad):04x} is no character")
    raise UsageError(f"argument {text!r} is not UTF-8 text ({what}): pass UTF-8 text, file names included")


# ----------------------------------------------------------------------------- settings: each written once

def setting(default: Any, help: str, type: Callable[[str], Any] | None = None, choices: Sequence[str] = (),
            flag: str | None = None, action: str | type[argparse.Action] | None = None, **extra: Any) -> Any:
    """A config field that is also a flag: its default, --help text, parse type and choices, written once, as the
    field's metadata (``add_settings`` makes the flag). ``flag`` spells a flag named otherwise than the field; a bool
    is a ``store_true`` flag unless ``action`` says otherwise; ``extra`` is the caller's own (an environment
    variable)."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": tuple(choices),
                                                        "flag": flag, "action": action, **extra})


def settings_of(config: type) -> list[dataclasses.Field]:
    """The fields of a config class that are flags (made with ``setting``), in field order."""
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


def with_defaults(**defaults: Any) -> Callable[[type], type]:
    """Class decorator, under ``@dataclass``: a subclass that changes only the defaults of fields it inherits; their
    type, help and place stay where they were defined once. A name it does not inherit is a TypeError (a typo)."""
    def apply(cls: type) -> type:
        inherited = {f.name: f for base in reversed(cls.__mro__[1:]) if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base)}  # the nearest base's field wins
        unknown = sorted(set(defaults) - set(inherited))
        if unknown:
            raise TypeError(f"{cls.__name__} sets the default of {', '.join(unknown)}, which it does not inherit")
        own = dict(cls.__dict__.get("__annotations__", {}))  # never the base's dict, which cls.__annotations__ may be
        for name, value in defaults.items():
            own[name] = inherited[name].type
            setattr(cls, name, dataclasses.field(default=value, metadata=inherited[name].metadata))
        cls.__annotations__ = own
        return cls
    return apply


def default_note(value: Any) -> str:
    """"default: X" for --help, or nothing where the default says nothing (None, False)."""
    return "" if value is None or value is False else f"default: {value}"


def add_settings(parser: Any, config: type, names: Iterable[str] | None = None,
                 notes: Mapping[str, str] | None = None) -> None:
    """A flag on ``parser`` (a parser or an argument group) for each setting of ``config`` (every one, or ``names``):
    --name (or the field's ``flag``), its type, choices and help. Its default is SUPPRESS, so that a parsed namespace
    holds exactly what the user typed (``typed_settings``) and the config's own defaults fill the rest; --help shows
    the config's default, or ``notes[name]`` in its place ("" for none)."""
    by_name, notes = {f.name: f for f in settings_of(config)}, notes or {}
    for name in by_name if names is None else names:
        field = by_name[name]
        meta = field.metadata
        note = notes.get(name, "" if "default" in meta["help"] else default_note(field.default))
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                   "help": meta["help"] + (f" ({note})" if note else "")}
        if meta["action"] or isinstance(field.default, bool):
            options["action"] = meta["action"] or "store_true"
        else:
            options.update({k: v for k, v in (("type", meta["type"]), ("choices", meta["choices"] or None)) if v})
            if meta["flag"] and not meta["choices"]:
                options["metavar"] = meta["flag"].upper()
        parser.add_argument(f"--{meta['flag'] or name}", **options)


def typed_settings(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The settings of ``config`` that the user typed (an ``add_settings`` flag is in the namespace only if typed)."""
    names = {f.name for f in dataclasses.fields(config)}
    return {name: value for name, value in vars(args).items() if name in names}


# ----------------------------------------------------------------------------- running a CLI

def describe_os_error(err: OSError) -> str:
    """'<what went wrong>: <path>' plus a hint, without errno noise."""
    what = err.strerror or str(err)
    where = f": {err.filename}" if err.filename else ""
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # atomic_file's NoSpaceError says it all already
        hint = "" if "run again" in what else " (free some space, or write elsewhere, and run again)"
    elif isinstance(err, PermissionError):
        hint = " (no permission: pick a folder you can write to)"
    elif isinstance(err, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        hint = " (a file and a folder have the same name: pass another path)"
    elif isinstance(err, FileNotFoundError):
        hint = " (check the path)"
    return f"{what}{where}{hint}"


_CLI_PID: int | None = None  # the process run_cli runs in; forked workers (tokenizer pools) inherit the handler


def _raise_interrupted(signum: int, frame) -> None:
    if os.getpid() != _CLI_PID:  # a forked worker being shut down by its pool: die quietly, as by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def _default_sigterm_in_forked_child() -> None:
    """A forked child (a tokenizer pool's worker) dies on SIGTERM at once, as by default. The inherited Python
    handler only runs between bytecodes: a worker blocked in C on a lock another parent thread held at fork time
    never ran it, so the pool's terminate() waited on it forever (seen under load in the test suite)."""
    if signal.getsignal(signal.SIGTERM) is _raise_interrupted:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; user errors (ValueError subclasses, OSError) become one line on stderr and exit 2.

    SIGTERM is turned into ``Interrupted`` so it unwinds like Ctrl-C (finally blocks run); a tool that can save
    (the trainers) catches the signals itself and raises ``Interrupted`` with what it saved. Other exceptions are
    bugs and keep their traceback.
    """
    global _CLI_PID
    previous = None
    if threading.current_thread() is threading.main_thread():
        _CLI_PID = os.getpid()
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return main(argv)
    except Interrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_SIGINT
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UnicodeDecodeError as err:  # readers name file and line themselves; this is the safety net
        print(f"error: input is not UTF-8 text ({err.reason} at byte {err.start}): convert it to UTF-8",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as err:  # every project error class (TokenizerError, DataError, ...) is a ValueError
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if previous is not None:  # leave the process as it was (tests, embedding callers)
            signal.signal(signal.SIGTERM, previous)
