"""Crash-safe file writes, shared by checkpoints, tokenizer files, data files and token caches.

Its own module because the tokenizer (no torch), the model and the data pipeline all write files
that must never be left half-written, and none of them should import the others for it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

# temporary names: ".<name>.<pid>.tmp" (files) and ".<name>.<pid>.tmpdir" / ".<name>.<pid>.old" (folders)
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.(tmp|tmpdir|old)$")
# errnos of a write that ran out of room: disk full, quota, a file-size limit (ulimit -f, RLIMIT_FSIZE)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# torch.save's C++ writer reports a failed write (disk full, file-size limit) only as a RuntimeError with these
_SERIALIZER_WRITE_FAILURES = ("unexpected pos", "failed writing file", "file write failed")
# safetensors (Rust) raises its own SafetensorError, whose text ends in the errno: "... (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# numpy's tofile (the gguf writer) reports a short write as an OSError without an errno: "9600 requested and 3400
# written"
_SHORT_WRITE = re.compile(r"^(\d+) requested and (\d+) written")


class NoSpaceError(OSError):
    """A write that ran out of room; its message names the file and says that the previous one is intact."""


def _write_errno(err: BaseException) -> int | None:
    """The errno of a failed write: an OSError's own, or the one a library's error type spells in its text."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    match = _RUST_OS_ERROR.search(str(err))
    return int(match.group(1)) if match else None


def _hidden_write_failure(err: BaseException) -> bool:
    """A write that failed without saying why: torch's serializer, or a short write (numpy); both a full disk or a
    file-size limit in practice."""
    if isinstance(err, RuntimeError):
        return any(s in str(err) for s in _SERIALIZER_WRITE_FAILURES)
    short = _SHORT_WRITE.match(str(err)) if isinstance(err, OSError) and err.errno is None else None
    return short is not None and int(short.group(2)) < int(short.group(1))


def no_space_error(err: BaseException, path: Path) -> NoSpaceError | None:
    """``err`` as a ``NoSpaceError`` about writing ``path`` if it is a write that ran out of room, else None: an
    OSError with ENOSPC / EDQUOT / EFBIG, a library's own error type carrying one (safetensors), or a writer that
    hides the errno (torch's serializer, numpy's short write under the gguf writer)."""
    if isinstance(err, NoSpaceError):
        return err
    code = _write_errno(err)
    if code == errno.EFBIG:
        reason = "the file-size limit of this process (ulimit -f) was reached"
    elif code == errno.EDQUOT:
        reason = f"disk quota exceeded on the device of {path.parent}"
    elif code == errno.ENOSPC:
        reason = f"no space left on the device of {path.parent}"
    elif _hidden_write_failure(err):
        limited = _file_size_limited()
        reason = f"no space left on the device of {path.parent}" + (" (or the file-size limit, ulimit -f, was "
                                                                    "reached)" if limited else "")
    else:
        return None
    kept = (f"the previous {path.name} is intact" if path.exists()
            else f"nothing was replaced, the files already in {path.parent} are intact")
    return NoSpaceError(errno.ENOSPC, f"{reason} while writing {path}; {kept}: free some space (or write elsewhere) "
                                      "and run again")


def _file_size_limited() -> bool:
    """Whether this process has a file-size limit (RLIMIT_FSIZE), which torch's writer cannot tell from a full disk."""
    try:
        import resource
    except ImportError:  # not on Unix
        return False
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced and renamed over ``path``.

    If the block raises (or the process dies) the previous ``path`` is untouched and, on an
    exception, the temporary file is removed (a killed process's is removed by ``remove_stale_temps``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except Exception as err:  # a writer's own error type too (safetensors')
        tmp.unlink(missing_ok=True)  # first: the message may say the previous file is intact
        full = no_space_error(err, path)
        if full is None:
            raise
        raise full from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` as a whole (files that belong together).

    The old folder is renamed aside and removed only after the new one is in place, so a crash leaves either
    the old or the new set of files at ``path`` (or, between the two renames, the old set under its temp name,
    which ``remove_stale_temps`` puts back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmpdir")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except Exception as err:  # a writer's own error type too (safetensors')
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # failed between the two renames: the old set goes back
            os.replace(old, path)
        full = no_space_error(err, path)
        if full is None:
            raise
        raise full from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(path.parent)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files/folders of writes whose process died (killed mid-save); returns them.

    A folder left renamed aside (``.<name>.<pid>.old``) with nothing at ``<name>`` is put back instead.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if not match or _process_alive(int(match.group(1))):
            continue
        original = entry.with_name(entry.name[1:].rsplit(".", 2)[0])
        if match.group(2) == "old" and not original.exists():
            os.replace(entry, original)
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; not every platform can open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
