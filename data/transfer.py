"""Downloading files over HTTP(S) so that only verified files ever appear: in parallel (a few threads), resumable
(each file grows as ``<name>.part`` and a rerun asks for the rest with an HTTP Range), checked (the size, and the
sha256 or git blob id the server's listing gave) and only then renamed into place atomically, retried with
exponential backoff on network errors and 5xx/429 answers, with one progress bar in bytes for all of them.

    plan = [Transfer(url, target=Path("out/a.parquet"), size=1234, sha256="9f86...")]
    fetch_all(plan, TransferParams(workers=4))

Its own module because it knows nothing of datasets or the Hub: ``data.download`` decides what to fetch and from
where, this moves the bytes. A partial, short or corrupt download never leaves a file at its final name, so the
readers (which skip ``*.part`` names) never see one; Ctrl-C or a kill leaves the ``.part`` for the next run.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import random
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from atomic_file import atomic_path, no_space_error

CHUNK_BYTES = 1 << 20  # bytes read per step: small enough to stop promptly, large enough to be cheap
RETRY_BASE_SECONDS = 1.0  # waits: 1, 2, 4, 8, ... seconds (times 1 to 1.5, so parallel retries spread out)
RETRY_MAX_SECONDS = 60.0
STOP_GRACE_SECONDS = 2.0  # how long an interrupted run waits for its threads to put their last chunk on disk
MANIFEST_NAME = ".download_manifest.json"  # hidden: the readers skip it
RETRIED_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "gpt-data-download/1"


class DownloadError(ValueError):
    """A download that cannot succeed (a 404, a refused token, a file that keeps arriving corrupt); the message
    names the file and says what to do."""


class _Retry(Exception):
    """A failure worth another try: a dropped connection, a timeout, a 5xx, a file that arrived corrupt."""


class _Stopped(Exception):
    """Another thread failed or the user interrupted: this thread stops after its current chunk."""


@dataclass(frozen=True)
class Transfer:
    """One file to fetch: where from, where to, and what it must be (size; sha256 and/or git blob sha1 if known)."""
    url: str
    target: Path
    size: int
    sha256: str | None = None
    git_sha1: str | None = None  # the git blob id (sha1 of "blob <size>\\0" + content): non-LFS files on the Hub
    headers: dict[str, str] = field(default_factory=dict, hash=False)  # sent to this URL only, not after a redirect

    @property
    def part(self) -> Path:
        return self.target.with_name(self.target.name + ".part")


@dataclass(frozen=True)
class TransferParams:
    workers: int = 8
    retries: int = 5  # tries after the first, per file
    timeout: float = 60.0  # seconds without a byte before a connection counts as dropped
    show_progress: bool = True


# ----------------------------------------------------------------------------- checksums and the manifest

class _Digests:
    """The running sha256 (always: the manifest records it) and git blob sha1 (when expected) of one file."""

    def __init__(self, transfer: Transfer):
        self.sha256 = hashlib.sha256()
        self.git_sha1 = hashlib.sha1(b"blob %d\0" % transfer.size) if transfer.git_sha1 else None

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.git_sha1 is not None:
            self.git_sha1.update(data)

    def mismatch(self, transfer: Transfer) -> str | None:
        """What differs from what the server promised, or None."""
        if transfer.sha256 and self.sha256.hexdigest() != transfer.sha256:
            return f"sha256 {self.sha256.hexdigest()[:12]}... is not the server's {transfer.sha256[:12]}..."
        if self.git_sha1 is not None and self.git_sha1.hexdigest() != transfer.git_sha1:
            return f"git blob id {self.git_sha1.hexdigest()[:12]}... is not the server's {transfer.git_sha1[:12]}..."
        return None


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _hash_file(path: Path, transfer: Transfer) -> _Digests:
    digests = _Digests(transfer)
    for chunk in _file_chunks(path):
        digests.update(chunk)
    return digests


class Manifest:
    """``<folder>/.download_manifest.json``: path -> size and sha256 of every file this tool verified there, so a
    rerun skips them without reading them again."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / MANIFEST_NAME
        self.lock = threading.Lock()
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}  # missing or unreadable: every existing file is hashed once more

    def key(self, transfer: Transfer) -> str:
        return transfer.target.relative_to(self.folder).as_posix()

    def vouches_for(self, transfer: Transfer) -> bool:
        """Whether the file at ``transfer.target`` was verified by this tool and the server still serves it."""
        entry = self.entries.get(self.key(transfer))
        return (isinstance(entry, dict) and transfer.target.is_file() and entry.get("size") == transfer.size
                and transfer.target.stat().st_size == transfer.size
                and (transfer.sha256 is None or entry.get("sha256") == transfer.sha256)
                and (transfer.git_sha1 is None or entry.get("git_sha1") == transfer.git_sha1))

    def record(self, transfer: Transfer, digests: _Digests) -> None:
        entry = {"size": transfer.size, "sha256": digests.sha256.hexdigest()}
        if digests.git_sha1 is not None:
            entry["git_sha1"] = digests.git_sha1.hexdigest()
        with self.lock:
            self.entries[self.key(transfer)] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"files": self.entries}, indent=1, sort_keys=True), encoding="utf-8")


def already_done(transfer: Transfer, manifest: Manifest) -> bool:
    """Whether the target holds exactly what the server promises: vouched for by the manifest, or (an older file of
    the right size) hashed now and found right, then recorded."""
    if manifest.vouches_for(transfer):
        return True
    if not transfer.target.is_file() or transfer.target.stat().st_size != transfer.size:
        return False
    if transfer.sha256 is None and transfer.git_sha1 is None:
        return False  # nothing to check it against: fetch it again
    digests = _hash_file(transfer.target, transfer)
    if digests.mismatch(transfer):
        return False
    manifest.record(transfer, digests)
    return True


# ----------------------------------------------------------------------------- one request

def _open(transfer: Transfer, start: int, timeout: float) -> http.client.HTTPResponse:
    """The response to a GET of ``transfer.url`` from byte ``start``; a 4xx other than 408/425/429 is a
    DownloadError, everything transient a _Retry."""
    request = urllib.request.Request(transfer.url, headers={"User-Agent": USER_AGENT})
    for name, value in transfer.headers.items():
        request.add_unredirected_header(name, value)  # a token goes to the Hub, never to where it redirects
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code in RETRIED_STATUS or err.code >= 500:
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        hint = {401: "the server wants a token: set HF_TOKEN", 403: "access refused: accept the dataset's terms "
                "on its page and set HF_TOKEN", 404: "no such file: check --dataset, --revision and the file list",
                416: "the server refused the resume range: delete the .part file and run again"}
        raise DownloadError(f"{transfer.url}: HTTP {err.code} {err.reason} ({hint.get(err.code, 'not retried')})"
                            ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _Retry(f"cannot connect ({reason})") from None


def _resumed_from(response: http.client.HTTPResponse, start: int) -> int:
    """Where the response's bytes start: ``start`` for a 206 that says so, 0 for a full 200."""
    if response.status == 200 or not start:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if response.status != 206 or not match or int(match.group(1)) != start:
        raise _Retry(f"the server answered the resume at byte {start} with {response.status} "
                     f"{response.headers.get('Content-Range')!r}")
    return start


def _read_into(response: http.client.HTTPResponse, out, digests: _Digests, progress: Callable[[int], None],
               stop: threading.Event, room: int) -> int:
    """Copy the body into ``out`` chunk by chunk (at most ``room`` bytes: more is a corrupt answer); bytes copied."""
    copied = 0
    while True:
        if stop.is_set():
            raise _Stopped()
        try:
            chunk = response.read1(min(CHUNK_BYTES, room - copied + 1))  # what has arrived, up to a chunk
        except (http.client.HTTPException, OSError) as err:  # a dropped connection, a timeout
            raise _Retry(f"the connection dropped after {copied} bytes ({type(err).__name__})") from None
        if not chunk:
            return copied
        if copied + len(chunk) > room:
            raise _Retry(f"the server sent more than the {room} bytes expected")
        out.write(chunk)  # a full disk raises here: not retried
        digests.update(chunk)
        copied += len(chunk)
        progress(len(chunk))


# ----------------------------------------------------------------------------- one file

def _attempt(transfer: Transfer, params: TransferParams, progress: Callable[[int], None],
             stop: threading.Event) -> _Digests:
    """One try: resume (or start) the ``.part``, verify it, rename it into place. A corrupt result is deleted."""
    part = transfer.part
    part.touch()  # an empty file has nothing to fetch but still becomes a file
    have = part.stat().st_size
    if have > transfer.size:  # not a prefix of this file (the remote file changed): start over
        part.unlink()
        progress(-have)
        have = 0
    digests = _hash_file(part, transfer) if have else _Digests(transfer)
    if have < transfer.size:
        with _open(transfer, have, params.timeout) as response:
            start = _resumed_from(response, have)
            if start < have:  # the server sent the whole file: the .part is rewritten from byte 0
                progress(-have)
                digests, have = _Digests(transfer), 0
            with open(part, "r+b") as out:
                out.truncate(have)
                out.seek(have)
                have += _read_into(response, out, digests, progress, stop, transfer.size - have)
                out.flush()
                os.fsync(out.fileno())
    problem = (f"{have} bytes arrived, {transfer.size} expected" if have != transfer.size
               else digests.mismatch(transfer))
    if problem:
        if have == transfer.size:  # complete but wrong: the next try starts over
            part.unlink()
            progress(-have)
        raise _Retry(problem)
    with atomic_path(transfer.target) as tmp:  # synced, renamed, the folder synced (atomic_file)
        os.replace(part, tmp)
    return digests


def _fetch_one(transfer: Transfer, params: TransferParams, progress: Callable[[int], None],
               stop: threading.Event) -> _Digests:
    """``_attempt`` until it succeeds, at most ``params.retries`` more times, waiting longer after each failure."""
    transfer.target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(params.retries + 1):
        try:
            return _attempt(transfer, params, progress, stop)
        except _Retry as err:
            if attempt == params.retries:
                raise DownloadError(f"{transfer.url}: {err}; gave up after {attempt + 1} tries (the .part file is "
                                    "kept: run again to resume, or raise --retries)") from None
            wait = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** attempt) * random.uniform(1.0, 1.5)
            if stop.wait(wait):
                raise _Stopped()
        except OSError as err:
            full = no_space_error(err, transfer.part)
            if full is None:
                raise
            raise full from err
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- many files

def _run_threads(work: Callable[[Transfer], None], transfers: list[Transfer], workers: int,
                 stop: threading.Event) -> None:
    """Run ``work`` on every transfer in ``workers`` daemon threads; the first error stops the others (after their
    current chunk) and is raised here. Daemon threads, so that an interrupted run exits without waiting for a
    read that blocks for up to ``timeout`` seconds."""
    todo: queue.SimpleQueue[Transfer] = queue.SimpleQueue()
    for transfer in transfers:
        todo.put(transfer)
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                transfer = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(transfer)
            except _Stopped:
                return
            except BaseException as err:  # handed to the main thread, which raises it
                errors.append(err)
                stop.set()
                return

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(min(workers, len(transfers)))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # a timed join, so Ctrl-C reaches this thread
    except BaseException:
        stop.set()
        for thread in threads:
            thread.join(STOP_GRACE_SECONDS / len(threads))
        raise
    if errors:
        raise errors[0]


def pending(transfers: list[Transfer], manifest: Manifest) -> list[Transfer]:
    """The transfers whose target is not already there and right (see ``already_done``)."""
    return [t for t in transfers if not already_done(t, manifest)]


def bytes_missing(transfers: list[Transfer]) -> int:
    """Bytes still to fetch for ``transfers``: their sizes less what their ``.part`` files hold."""
    return sum(max(0, t.size - (t.part.stat().st_size if t.part.exists() else 0)) for t in transfers)


def fetch_all(transfers: list[Transfer], todo: list[Transfer], params: TransferParams, manifest: Manifest) -> None:
    """Fetch ``todo`` (those of ``transfers`` not done yet), recording each verified file in ``manifest``; the bar
    counts the bytes of all ``transfers``. Raises DownloadError, NoSpaceError, or the interrupt."""
    total = sum(t.size for t in transfers)
    bar = tqdm(total=total, initial=total - bytes_missing(todo), unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"downloading {len(todo)} file(s)", disable=not params.show_progress, smoothing=0.05)
    lock, stop = threading.Lock(), threading.Event()

    def progress(n: int) -> None:
        with lock:
            bar.update(n)

    def work(transfer: Transfer) -> None:
        manifest.record(transfer, _fetch_one(transfer, params, progress, stop))

    try:
        _run_threads(work, todo, params.workers, stop)
    finally:
        bar.close()
