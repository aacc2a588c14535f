"""data.download and data.transfer against a local Hub: a threaded HTTP server on 127.0.0.1 that answers the Hub's
tree and dataset-info API and serves files with Range support, and can fail, drop, corrupt, throttle or hide them.

What must hold: files arrive byte for byte (sha256 against the source bytes; git blob ids against `git hash-object`),
in parallel; a download killed or interrupted midway resumes from its ``.part`` with an HTTP Range and ends identical;
a corrupt or short download never leaves a file that ``readers.py`` reads; a 500 is retried; a 404, an unknown
dataset or a full disk is one ``error:`` line.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import readers
from conftest import ROOT
from data import download, transfer

SEND_CHUNK = 16 * 1024


@dataclass
class Served:
    """A file of the fake Hub, and how it misbehaves."""
    data: bytes
    lfs: bool = True  # listed with an LFS sha256 (else with its git blob id)
    fail: int = 0  # answer 500 to this many requests first
    drop_after: int | None = None  # close the connection once this byte of the file is sent ...
    drops: int = 0  # ... on this many requests
    corrupt: bool = False  # send other bytes of the same size
    missing: bool = False  # listed, but 404
    delay: float = 0.0  # seconds per 16 KiB sent
    redirect: bool = False  # answer with a 302 to another URL (as the Hub sends LFS files to its CDN)


class FakeHub:
    """What the server holds and what it was asked."""

    def __init__(self):
        self.repos: dict[str, dict[str, Served]] = {}
        self.cards: dict[str, dict] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file path, Range header) of every file request
        self.tokens: list[tuple[str, str | None]] = []  # (URL path, Authorization header) of every file request
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.url = ""

    def file_requests(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


def git_blob_id(data: bytes, tmp_path: Path) -> str:
    """The blob id as git itself computes it (the independent reference for the Hub's oid of a non-LFS file)."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(data)
    return subprocess.run(["git", "hash-object", str(blob)], capture_output=True, text=True, check=True).stdout.strip()


def tree_entries(files: dict[str, Served]) -> list[dict]:
    entries, folders = [], set()
    for path, served in sorted(files.items()):
        parts = path.split("/")
        folders |= {"/".join(parts[:i]) for i in range(1, len(parts))}
        entry = {"type": "file", "path": path, "size": len(served.data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(served.data) + served.data).hexdigest()}
        if served.lfs:
            entry["lfs"] = {"oid": hashlib.sha256(served.data).hexdigest(), "size": len(served.data),
                            "pointerSize": 134}
        entries.append(entry)
    return [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)] + entries


class Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        api = re.match(r"^/api/datasets/([^/]+/[^/]+)/(tree|revision)/([^/]+)", path)
        with self.hub.lock:
            self.hub.tokens.append((path, self.headers.get("Authorization")))
        cdn = re.match(r"^/cdn/([^/]+/[^/]+)/(.+)$", path)
        if cdn:
            return self.send_file(self.hub.repos[cdn.group(1)].get(cdn.group(2)), cdn.group(2))
        resolve = re.match(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo not in self.hub.repos:
            return self.answer(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        revision = (api or resolve).group(3 if api else 2)
        if revision != "main":
            return self.answer(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
        if api and api.group(2) == "tree":
            return self.answer(200, json.dumps(tree_entries(self.hub.repos[repo])).encode())
        if api:
            return self.answer(200, json.dumps({"id": repo, "cardData": self.hub.cards.get(repo, {})}).encode())
        served = self.hub.repos[repo].get(resolve.group(3))
        if served is not None and served.redirect:
            return self.answer(302, headers={"Location": f"/cdn/{repo}/{resolve.group(3)}"})
        self.send_file(served, resolve.group(3))

    def send_file(self, served: Served | None, path: str) -> None:
        with self.hub.lock:
            self.hub.requests.append((path, self.headers.get("Range")))
        if served is None or served.missing:
            return self.answer(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
        if served.fail > 0:
            served.fail -= 1
            return self.answer(500, b"Internal Error")
        data = bytes(b ^ 0x5A for b in served.data) if served.corrupt else served.data
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        end = len(data)
        if served.drops > 0:
            served.drops -= 1
            end = max(start, served.drop_after)
        self.stream(data, start, end, served)

    def stream(self, data: bytes, start: int, end: int, served: Served) -> None:
        with self.hub.lock:
            self.hub.active += 1
            self.hub.peak = max(self.hub.peak, self.hub.active)
        try:
            for offset in range(start, end, SEND_CHUNK):
                self.wfile.write(data[offset:min(end, offset + SEND_CHUNK)])
                time.sleep(served.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (killed, interrupted)
        finally:
            with self.hub.lock:
                self.hub.active -= 1


@pytest.fixture()
def hub():
    state = FakeHub()
    handler = type("BoundHandler", (Handler,), {"hub": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(transfer, "RETRY_BASE_SECONDS", 0.01)


def documents(seed: int, n: int, size: int) -> list[str]:
    """Documents of random hex (incompressible, so the file is about n * size bytes)."""
    rng = random.Random(seed)
    return [f"doc {seed}.{i} " + rng.randbytes(size // 2).hex() for i in range(n)]


def parquet_bytes(texts: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=64)
    return sink.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shards(count: int, n: int = 40, size: int = 1000) -> dict[str, Served]:
    return {f"sample/10BT/{i:03d}_00000.parquet": Served(parquet_bytes(documents(i, n, size))) for i in range(count)}


def run(hub: FakeHub, out: Path, *flags: str) -> int:
    return download.main(["--endpoint", hub.url, "--output", str(out), "--no_progress", *flags])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------- which files

@pytest.mark.parametrize("pattern, path, matches", [
    ("sample/10BT/*.parquet", "sample/10BT/000_00000.parquet", True),
    ("sample/10BT/*.parquet", "sample/10BT/sub/000_00000.parquet", False),  # * stays within a folder
    ("sample/10BT/*", "sample/100BT/000_00000.parquet", False),
    ("data/all/train-*", "data/all/train-00000-of-00009.parquet", True),
    ("data/all/train-*", "data/all/test-00000-of-00001.parquet", False),
    ("**/*.parquet", "a.parquet", True), ("**/*.parquet", "x/y/a.parquet", True),
    ("**/*.parquet", "x/y/a.parquet.part", False), ("data/**", "data/x/y.jsonl", True),
    ("file?.jsonl", "file1.jsonl", True), ("file?.jsonl", "file10.jsonl", False),
    ("a+b.jsonl", "a+b.jsonl", True), ("a+b.jsonl", "aab.jsonl", False),  # regex characters are literal
])
def test_patterns_match_as_the_hubs_data_files_do(pattern, path, matches):
    assert bool(download.glob_regex(pattern).match(path)) is matches


def remote(path: str, gb: float) -> download.RemoteFile:
    return download.RemoteFile(path, int(gb * download.GB), None, None)


def test_shards_then_max_gb_bound_the_selection_in_path_order():
    files = [remote(f"d/{i}.parquet", 2.0) for i in (3, 1, 0, 2)] + [remote("README.md", 0.001)]
    paths = lambda chosen: [f.path for f in chosen]  # noqa: E731
    assert paths(download.select(files, ["d/*.parquet"], None, None, "o/n")) == [f"d/{i}.parquet" for i in range(4)]
    assert paths(download.select(files, ["d/*.parquet"], 2, None, "o/n")) == ["d/0.parquet", "d/1.parquet"]
    assert paths(download.select(files, ["d/*.parquet"], None, 5.0, "o/n")) == ["d/0.parquet", "d/1.parquet"]
    assert paths(download.select(files, ["d/*.parquet"], 1, 5.0, "o/n")) == ["d/0.parquet"]
    with pytest.raises(download.DownloadError, match="more than --max_gb 1"):
        download.select(files, ["d/*.parquet"], None, 1.0, "o/n")
    with pytest.raises(download.DownloadError, match="no file of o/n matches x/"):
        download.select(files, ["x/*"], None, None, "o/n")


def test_list_shows_the_presets_default_and_a_config_from_the_card(hub, tmp_path, capsys):
    hub.repos["HuggingFaceFW/fineweb-edu"] = {**shards(4), "data/CC-MAIN-1/000.parquet": Served(b"x" * 10),
                                              "README.md": Served(b"# card", lfs=False)}
    assert run(hub, tmp_path / "out", "--list") == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in listed[:-1]] == ["sample/10BT/000_00000.parquet",
                                                          "sample/10BT/001_00000.parquet"]  # the preset's 2 shards
    assert listed[-1].startswith("2 file(s)")
    hub.cards["o/chat"] = {"configs": [
        {"config_name": "all", "data_files": [{"split": "train", "path": "data/all/train-*"},
                                              {"split": "test", "path": ["data/all/test-*"]}]},
        {"config_name": "tiny", "data_files": "data/tiny/*.jsonl"}]}
    hub.repos["o/chat"] = {p: Served(b"{}\n", lfs=False) for p in (
        "data/all/train-00000-of-00002.parquet", "data/all/train-00001-of-00002.parquet",
        "data/all/test-00000-of-00001.parquet", "data/tiny/a.jsonl")}
    assert run(hub, tmp_path / "chat", "--dataset", "o/chat", "--config", "all", "--split", "train", "--list") == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()[:-1]] == [
        "data/all/train-00000-of-00002.parquet", "data/all/train-00001-of-00002.parquet"]
    assert run(hub, tmp_path / "chat", "--dataset", "o/chat", "--config", "all", "--list") == 0
    assert len(capsys.readouterr().out.splitlines()) == 4  # both splits, and the summary
    assert run(hub, tmp_path / "chat", "--dataset", "o/chat", "--config", "big", "--list") == 2
    assert "no config 'big' (its card declares: all, tiny)" in one_error_line(capsys)
    assert run(hub, tmp_path / "chat", "--dataset", "o/chat", "--config", "all", "--split", "dev", "--list") == 2
    assert "no split 'dev' (its splits: train, test)" in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "chat").exists()  # listing writes nothing


# ----------------------------------------------------------------------------- downloads

def test_parallel_download_of_several_shards_is_byte_identical_and_a_rerun_fetches_nothing(hub, tmp_path, capsys):
    files = shards(4)
    for served in files.values():
        served.delay = 0.02  # slow enough that the four overlap
    files["extra/notes.jsonl"] = Served(b'{"text": "a note"}\n', lfs=False)  # checked by its git blob id
    hub.repos["o/corpus"] = files
    out = tmp_path / "corpus"
    assert run(hub, out, "--dataset", "o/corpus", "--workers", "4") == 0
    for path, served in files.items():
        assert sha256((out / path).read_bytes()) == sha256(served.data), path
    assert hub.peak >= 2, "the shards were fetched one at a time"
    expected = [text for path in sorted(files) if path.endswith(".parquet")
                for text in pq.read_table(io.BytesIO(files[path].data)).column("text").to_pylist()]
    assert [d for d in readers.read_documents(out) if d != "a note"] == expected
    manifest = json.loads((out / transfer.MANIFEST_NAME).read_text())["files"]
    assert manifest["extra/notes.jsonl"]["git_sha1"] == git_blob_id(files["extra/notes.jsonl"].data, tmp_path)
    assert {k: v["sha256"] for k, v in manifest.items()} == {p: sha256(s.data) for p, s in files.items()}
    assert not list(out.rglob("*.part"))
    served_before = len(hub.requests)
    capsys.readouterr()
    assert run(hub, out, "--dataset", "o/corpus") == 0
    assert len(hub.requests) == served_before  # every file verified already: none fetched again
    assert capsys.readouterr().out.startswith("5 of 5 file(s) already here")


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    files = shards(1, n=60)
    (path, served), = files.items()
    served.drop_after, served.drops = len(served.data) // 3, 2  # cut at the same byte twice
    hub.repos["o/c"] = files
    assert run(hub, tmp_path / "out", "--dataset", "o/c") == 0
    assert sha256((tmp_path / "out" / path).read_bytes()) == sha256(served.data)
    assert hub.file_requests(path) == [None, f"bytes={served.drop_after}-", f"bytes={served.drop_after}-"]


def test_retries_a_500_then_succeeds(hub, tmp_path):
    files = shards(2)
    files["sample/10BT/000_00000.parquet"].fail = 2
    hub.repos["o/c"] = files
    assert run(hub, tmp_path / "out", "--dataset", "o/c", "--retries", "2") == 0
    assert len(hub.file_requests("sample/10BT/000_00000.parquet")) == 3
    for path, served in files.items():
        assert (tmp_path / "out" / path).read_bytes() == served.data


def assert_nothing_readable(out: Path) -> None:
    """No file the readers would read: the folder holds at most ``.part`` files and the hidden manifest."""
    if out.exists():
        with pytest.raises(readers.DataError, match="holds no data files"):
            readers.data_files(out)


@pytest.mark.parametrize("fault", ["corrupt", "short", "retried 500s", "git blob"])
def test_a_corrupt_or_short_download_never_leaves_a_file_the_readers_accept(fault, hub, tmp_path, capsys):
    files = shards(1)
    (path, served), = files.items()
    if fault == "corrupt":
        served.corrupt = True
    elif fault == "short":
        served.drop_after, served.drops = 1000, 99
    elif fault == "retried 500s":
        served.fail = 99
    else:  # a non-LFS file whose bytes are not the listed blob's
        path = "notes.jsonl"
        files = {path: Served(b'{"text": "a note"}\n', lfs=False, corrupt=True)}
    hub.repos["o/c"] = files
    assert run(hub, tmp_path / "out", "--dataset", "o/c", "--retries", "2") == 2
    err = one_error_line(capsys)
    expected = {"corrupt": "sha256", "short": "1000 bytes arrived", "retried 500s": "HTTP 500",
                "git blob": "git blob id"}
    assert expected[fault] in err and "gave up after 3 tries" in err
    assert not (tmp_path / "out" / path).exists()
    assert_nothing_readable(tmp_path / "out")
    if fault == "short":  # the bytes that did arrive are kept to resume
        assert (tmp_path / "out" / (path + ".part")).stat().st_size == 1000
        served.drops = 0
        assert run(hub, tmp_path / "out", "--dataset", "o/c") == 0
        assert (tmp_path / "out" / path).read_bytes() == served.data
        assert hub.file_requests(path)[-1] == "bytes=1000-"


def test_a_404_an_unknown_dataset_or_revision_and_a_full_disk_are_one_line(hub, tmp_path, capsys, monkeypatch):
    files = shards(2)
    files["sample/10BT/001_00000.parquet"].missing = True
    hub.repos["o/c"] = files
    out = tmp_path / "out"
    assert run(hub, out, "--dataset", "o/c") == 2
    assert "001_00000.parquet: HTTP 404" in one_error_line(capsys)
    assert not (out / "sample/10BT/001_00000.parquet").exists()
    assert run(hub, out, "--dataset", "o/none") == 2
    assert "no dataset 'o/none'" in one_error_line(capsys)
    assert run(hub, out, "--dataset", "o/c", "--revision", "v9") == 2
    assert "has no revision 'v9'" in one_error_line(capsys)
    fresh = tmp_path / "fresh"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert run(hub, fresh, "--dataset", "o/c", "--files", "sample/10BT/000_00000.parquet") == 2
    assert "needs 0.00 GB more but" in one_error_line(capsys)
    assert not fresh.exists()  # refused before anything was written


def test_a_wrong_file_at_the_target_is_replaced_and_a_right_one_kept(hub, tmp_path):
    files = shards(2)
    hub.repos["o/c"] = files
    out = tmp_path / "out"
    (right, right_served), (wrong, wrong_served) = files.items()
    for path, data in ((right, right_served.data), (wrong, wrong_served.data[::-1])):
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)  # no manifest: both are checked by their sha256
    assert run(hub, out, "--dataset", "o/c") == 0
    assert hub.file_requests(right) == [] and hub.file_requests(wrong) == [None]
    assert (out / wrong).read_bytes() == wrong_served.data


def test_the_token_goes_to_the_hub_only_and_a_redirected_resume_keeps_its_range(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    files = shards(1)
    (path, served), = files.items()
    served.redirect, served.drop_after, served.drops = True, 5000, 1
    hub.repos["o/c"] = files
    assert run(hub, tmp_path / "out", "--dataset", "o/c") == 0
    assert (tmp_path / "out" / path).read_bytes() == served.data
    resolve, cdn = f"/datasets/o/c/resolve/main/{path}", f"/cdn/o/c/{path}"
    assert [t for t in hub.tokens if t[0] in (resolve, cdn)] == [
        (resolve, "Bearer hf_secret"), (cdn, None), (resolve, "Bearer hf_secret"), (cdn, None)]
    assert hub.file_requests(path) == [None, "bytes=5000-"]  # the Range survived the redirect


def test_an_empty_file_is_fetched_too(hub, tmp_path):
    hub.repos["o/c"] = {"empty.jsonl": Served(b"", lfs=False)}
    assert run(hub, tmp_path / "out", "--dataset", "o/c") == 0
    assert (tmp_path / "out" / "empty.jsonl").read_bytes() == b""


def test_the_hub_library_is_imported_by_the_download_command_only():
    code = ("import sys, data.download, data.transfer, data.convert_chat, readers, finetune; "
            "sys.exit('huggingface_hub' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


# ----------------------------------------------------------------------------- killed and interrupted runs

def start_download(hub: FakeHub, out: Path) -> subprocess.Popen:
    """The CLI in its own process, pointed at the fake Hub through HF_ENDPOINT (no --endpoint)."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(out.parent / "hf_home"), "PYTHONUNBUFFERED": "1"}
    env.pop("HF_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "data.download", "--dataset", "o/slow", "--output", str(out),
                             "--workers", "2", "--no_progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_part(out: Path, process: subprocess.Popen, at_least: int) -> None:
    deadline = time.time() + 60
    while not any(p.stat().st_size >= at_least for p in out.rglob("*.part")):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"no .part grew to {at_least} bytes: {process.communicate()}")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["kill -9", "Ctrl-C", "SIGTERM"])
def test_a_download_stopped_midway_resumes_to_identical_bytes(signum, hub, tmp_path):
    files = shards(2, n=40, size=10000)  # about 200 KB each, sent at about 0.3 MB/s
    for served in files.values():
        served.delay = 0.05
    hub.repos["o/slow"] = files
    out = tmp_path / "out"
    process = start_download(hub, out)
    wait_for_part(out, process, 2 * SEND_CHUNK)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    if signum != signal.SIGKILL:
        assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr
        assert "Traceback" not in stderr and "run the same command again to resume" in stderr.splitlines()[-1]
    assert not [p for p in files if (out / p).exists()], "a file appeared before it was complete"
    assert_nothing_readable(out)
    parts = {p: (out / (p + ".part")).stat().st_size for p in files if (out / (p + ".part")).exists()}
    assert parts and all(0 < size < len(files[p].data) for p, size in parts.items())
    for served in files.values():
        served.delay = 0.0
    assert run(hub, out, "--dataset", "o/slow") == 0
    for path, served in files.items():
        assert sha256((out / path).read_bytes()) == sha256(served.data)
    for path, size in parts.items():  # each partial file was resumed where it stopped, not fetched again
        assert hub.file_requests(path)[-1] == f"bytes={size}-"
