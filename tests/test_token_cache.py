"""token_cache: the document convention, reuse and invalidation, shards, resume after a kill, damage, flat memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pretrain_trainer as pt
import token_cache as tc
from cli_cases import assert_one_line_error, run_on_a_full_disk
from conftest import corpus_lines

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["HAMLET: To be, or not to be.", "《静夜思》 李白：床前明月光，疑是地上霜。", "ROMEO: But, soft! what light?"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def reference_tokens(tokenizer, docs) -> list[int]:
    """The convention, by the tokenizer's own encode: ``<s> doc </s>`` per document, in order."""
    return [i for doc in docs for i in tokenizer.encode(doc)["input_ids"]]


def test_token_stream_follows_the_document_convention(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "WRITE_CHUNK_TOKENS", 7)  # exercise the chunked writer
    source = write(tmp_path / "docs.txt", "\n".join(DOCS) + "\n")
    stream = tc.build_token_stream(source, tiny_tokenizer, num_workers=2, show_progress=False)
    expected = reference_tokens(tiny_tokenizer, DOCS)
    assert stream.tokens.dtype == np.uint16
    assert stream.tokens.tolist() == expected
    assert stream.n_documents == 3
    assert stream.n_bytes == sum(len(d.encode("utf-8")) + 1 for d in DOCS)
    assert stream.path.parent == tmp_path / ".cache"
    assert stream.path.name == f"docs.{tiny_tokenizer.fingerprint[:16]}.bin"
    meta = json.loads(stream.path.with_suffix(".json").read_text())
    assert sum(s["n_tokens"] for s in meta["shards"]) == len(expected) and meta["dtype"] == "uint16"
    assert meta["complete"] and meta["n_documents"] == 3


def test_token_dtype_widens_for_big_vocabularies():
    assert tc.token_dtype(65535) == np.uint16
    assert tc.token_dtype(65536) == np.uint32


class CountingTokenizer:
    """Delegates to a real tokenizer, counting how often encode_many runs."""

    def __init__(self, tokenizer, fingerprint=None):
        self.tokenizer, self.calls = tokenizer, 0
        self.fingerprint = fingerprint or tokenizer.fingerprint

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)

    def encode_many(self, texts, num_workers=None, show_progress=False):
        self.calls += 1
        return self.tokenizer.encode_many(texts, num_workers=1)


def test_cache_reused_then_invalidated_by_tokenizer_or_source_change(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "docs.txt", "\n".join(DOCS) + "\n")
    tok = CountingTokenizer(tiny_tokenizer)
    first = tc.build_token_stream(source, tok, show_progress=False)
    second = tc.build_token_stream(source, tok, show_progress=False)
    assert tok.calls == 1 and second.path == first.path and second.tokens.tolist() == first.tokens.tolist()

    other = CountingTokenizer(tiny_tokenizer, fingerprint="f" * 64)  # a changed tokenizer has another fingerprint
    third = tc.build_token_stream(source, other, show_progress=False)
    assert other.calls == 1 and third.path != first.path

    write(source, DOCS[0] + "\n")
    os.utime(source, ns=(1, 1))  # a different mtime even on coarse clocks
    fourth = tc.build_token_stream(source, tok, show_progress=False)
    assert tok.calls == 2 and fourth.n_documents == 1

    first.path.write_bytes(b"\x00")  # a damaged cache file is rebuilt, not trusted
    fifth = tc.build_token_stream(source, tok, show_progress=False)
    assert tok.calls == 3 and fifth.tokens.tolist() == tiny_tokenizer.encode(DOCS[0])["input_ids"]



# ----------------------------------------------------------------------------- shards, resume, damage


def corpus(path: Path, n_lines: int = 3000) -> tuple[Path, list[str]]:
    lines = [line for line in corpus_lines(limit=n_lines) if line.strip()]
    return write(path, "\n".join(lines) + "\n"), lines


class StoppingTokenizer(CountingTokenizer):
    """Counts the documents it encodes, and raises KeyboardInterrupt (a Ctrl-C) after ``stop_after`` of them."""

    def __init__(self, tokenizer, stop_after: int | None = None):
        super().__init__(tokenizer)
        self.stop_after, self.encoded = stop_after, 0

    def encode_many(self, texts, num_workers=None, show_progress=False):
        for ids in self.tokenizer.encode_many(texts, num_workers=1):
            if self.stop_after is not None and self.encoded >= self.stop_after:
                raise KeyboardInterrupt
            self.encoded += 1
            yield ids


def test_shards_hold_consecutive_documents_with_their_crc(tiny_tokenizer, tmp_path):
    source, lines = corpus(tmp_path / "docs.txt")
    stream = tc.build_token_stream(source, tiny_tokenizer, num_workers=2, show_progress=False, shard_bytes=20_000)
    assert stream.tokens.tolist() == reference_tokens(tiny_tokenizer, lines)
    shards = json.loads(stream.path.with_suffix(".json").read_text())["shards"]
    assert len(shards) > 3 and sum(s["n_documents"] for s in shards) == len(lines)
    raw, offset = stream.path.read_bytes(), 0
    for shard in shards:
        length = shard["n_tokens"] * 2
        assert tc.zlib.crc32(raw[offset:offset + length]) == shard["crc32"] and shard["n_bytes"] >= 20_000 or \
            shard is shards[-1]
        offset += length
    assert offset == len(raw)


def test_an_interrupted_build_continues_from_its_finished_shards(tiny_tokenizer, tmp_path):
    source, lines = corpus(tmp_path / "docs.txt")
    whole = tc.build_token_stream(source, tiny_tokenizer, cache_dir=tmp_path / "whole", show_progress=False,
                                  shard_bytes=20_000)
    stopped = StoppingTokenizer(tiny_tokenizer, stop_after=len(lines) // 2)
    with pytest.raises(KeyboardInterrupt):
        tc.build_token_stream(source, stopped, cache_dir=tmp_path / "cut", show_progress=False, shard_bytes=20_000)
    meta = json.loads(next((tmp_path / "cut").glob("*.json")).read_text())
    finished = sum(s["n_documents"] for s in meta["shards"])
    assert not meta["complete"] and 0 < finished <= len(lines) // 2

    resumed = StoppingTokenizer(tiny_tokenizer)
    stream = tc.build_token_stream(source, resumed, cache_dir=tmp_path / "cut", show_progress=False,
                                   shard_bytes=20_000)
    assert resumed.encoded == len(lines) - finished  # the finished shards were not encoded again
    assert stream.path.read_bytes() == whole.path.read_bytes()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_shard_is_re_encoded_from_there_never_read_as_tokens(tiny_tokenizer, tmp_path, damage, capsys):
    source, lines = corpus(tmp_path / "docs.txt")
    first = tc.build_token_stream(source, tiny_tokenizer, show_progress=False, shard_bytes=20_000)
    good = first.path.read_bytes()
    shards = json.loads(first.path.with_suffix(".json").read_text())["shards"]
    second_start = shards[0]["n_tokens"] * 2
    del first
    raw = bytearray(good)
    if damage == "flipped byte":
        raw[second_start + 3] ^= 0xFF
    else:
        raw = raw[:second_start + 10]
    Path(tc.cache_paths(source, tiny_tokenizer.fingerprint)[0]).write_bytes(bytes(raw))
    counting = StoppingTokenizer(tiny_tokenizer)
    stream = tc.build_token_stream(source, counting, show_progress=False, shard_bytes=20_000)
    assert counting.encoded == len(lines) - shards[0]["n_documents"]  # from the damaged shard on
    assert stream.path.read_bytes() == good
    assert "damaged from shard 2 of" in capsys.readouterr().err


def test_a_corpus_without_documents_is_one_data_error(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(tc.DataError):
        tc.build_token_stream(source, tiny_tokenizer, show_progress=False)


KILL_SCRIPT = """
import sys
from byte_level_bpe import ByteLevelBPETokenizer
import token_cache
tokenizer = ByteLevelBPETokenizer.from_pretrained(sys.argv[1])
token_cache.build_token_stream(sys.argv[2], tokenizer, num_workers=2, cache_dir=sys.argv[3], show_progress=False,
                               shard_bytes=int(sys.argv[4]))
"""


@pytest.mark.slow
def test_kill_9_at_half_then_a_restart_ends_with_the_uninterrupted_bytes(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    lines = [line for line in corpus_lines(limit=20000) if line.strip()]
    source = write(tmp_path / "docs.txt", "\n".join(lines * 3) + "\n")
    shard_bytes = source.stat().st_size // 10
    args = [str(tiny_tokenizer_dir), str(source), str(tmp_path / "cut"), str(shard_bytes)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=ROOT)
    meta_path = tmp_path / "cut" / tc.cache_paths(source, tiny_tokenizer.fingerprint)[1].name
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(meta_path.read_text())["shards"]) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    meta = json.loads(meta_path.read_text())
    assert not meta["complete"] and 5 <= len(meta["shards"]) < 10, "the build was not killed half-way"
    resumed = StoppingTokenizer(tiny_tokenizer)
    stream = tc.build_token_stream(source, resumed, cache_dir=tmp_path / "cut", show_progress=False,
                                   shard_bytes=shard_bytes)
    assert 0 < resumed.encoded < len(lines) * 3 * 0.6
    whole = tc.build_token_stream(source, tiny_tokenizer, num_workers=2, cache_dir=tmp_path / "whole",
                                  show_progress=False, shard_bytes=shard_bytes)
    assert stream.path.read_bytes() == whole.path.read_bytes()
    assert np.array_equal(stream.tokens, whole.tokens)


RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from byte_level_bpe import ByteLevelBPETokenizer
import token_cache
tokenizer = ByteLevelBPETokenizer.from_pretrained(sys.argv[1])
lines = Path(sys.argv[3]).read_text(encoding="utf-8").splitlines()
with open(sys.argv[2], "w", encoding="utf-8") as out:  # a generated corpus, written line by line
    for i in range(int(sys.argv[4])):
        out.write(lines[(i * 7919) % len(lines)] + " " + lines[(i * 104729) % len(lines)] + "\\n")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream = token_cache.build_token_stream(sys.argv[2], tokenizer, num_workers=1, show_progress=False,
                                        shard_bytes=1 << 20)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(stream), stream.n_bytes)
"""


@pytest.mark.slow
def test_building_the_cache_takes_the_same_memory_for_an_8x_larger_corpus(tiny_tokenizer_dir, tmp_path):
    """Peak RSS (KiB) of a build of ~47 MB of text within 4 MiB of one of ~6 MB (measured: +0.3 MB): a build that
    kept a shard's tokens in memory as Python ints grows by ~240 MB."""
    lines = write(tmp_path / "lines.txt", "\n".join(line for line in corpus_lines(limit=20000) if line.strip()))
    peaks = []
    for n_docs in (20_000, 160_000):
        argv = [str(tiny_tokenizer_dir), str(tmp_path / f"{n_docs}.txt"), str(lines), str(n_docs)]
        run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *argv], capture_output=True, text=True, cwd=ROOT,
                             timeout=240)
        assert run.returncode == 0, run.stderr
        before, peak, n_tokens, n_bytes = map(int, run.stdout.split())
        peaks.append((peak, n_tokens, n_bytes))
    (small, small_tokens, _), (large, large_tokens, large_bytes) = peaks
    assert large_tokens > 7 * small_tokens and large_bytes > 40e6
    assert large - small < 4096, peaks


def test_a_cache_built_from_another_text_field_is_its_own(tiny_tokenizer, tmp_path):
    source = write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": d, "title": d[:3]}) + "\n" for d in DOCS))
    tok = CountingTokenizer(tiny_tokenizer)
    text = tc.build_token_stream(source, tok, show_progress=False)
    title = tc.build_token_stream(source, tok, show_progress=False, text_field="title")
    assert tok.calls == 2 and title.n_documents == len(DOCS) and len(title) < len(text)
    assert json.loads(title.path.with_suffix(".json").read_text())["text_field"] == "title"
    assert title.path != text.path  # both kept: switching back and forth re-encodes nothing
    again = tc.build_token_stream(source, tok, show_progress=False, text_field="title")
    back = tc.build_token_stream(source, tok, show_progress=False)
    assert tok.calls == 2 and again.tokens.tolist() == title.tokens.tolist()
    assert back.tokens.tolist() == reference_tokens(tiny_tokenizer, DOCS)


@pytest.mark.slow
def test_a_full_disk_while_tokenizing_keeps_the_finished_shards_and_a_rerun_continues(tiny_tokenizer_dir, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(corpus_lines(limit=4000)) + "\n", encoding="utf-8")
    args = ["--train_data_dir", str(train), "--tokenizer_dir", str(tiny_tokenizer_dir), "--output_dir",
            str(tmp_path / "run"), "--device", "cpu", "--num_workers", "1", "--n_layers", "1", "--d_model", "32",
            "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "2", "--samples", "0", "--max_steps", "1",
            "--cache_dir", str(tmp_path / "cache")]
    result = run_on_a_full_disk(60_000, "pretrain_trainer", args)  # the cache is ~250 KB
    assert_one_line_error(result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert "while writing the token cache" in last and "no shard was finished yet" in last, last
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.pth"))
    assert pt.main(args) == 0  # the rerun continues from the kept shards and trains
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert meta["complete"] and meta["version"] == tc.CACHE_VERSION


def _same_size_and_times(source: Path, text: str) -> None:
    """Replace the content keeping the size and both times, as ``cp -p`` / ``rsync -t`` of another file can."""
    stat = source.stat()
    assert len(text.encode()) == stat.st_size
    source.write_text(text, encoding="utf-8")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


SOURCE_CHANGES = [  # (how the corpus changes after it was cached, whether the cache must be rebuilt)
    ("content, same size and mtime (cp -p)", lambda path, docs: _same_size_and_times(path, "\n".join(
        [docs[1], docs[0], *docs[2:]]) + "\n"), True),
    ("one letter, same size and mtime", lambda path, docs: _same_size_and_times(path, "\n".join(
        [docs[0].replace("e", "a", 1), *docs[1:]]) + "\n"), True),
    ("mtime only (touch)", lambda path, docs: os.utime(path, ns=(1, 1)), False),
    ("nothing", lambda path, docs: None, False),
]


@pytest.mark.parametrize("change, rebuilt", [c[1:] for c in SOURCE_CHANGES], ids=[c[0] for c in SOURCE_CHANGES])
def test_the_cache_follows_the_corpus_content_not_its_size_and_time(change, rebuilt, tiny_tokenizer, tmp_path):
    docs = list(DOCS)
    source = write(tmp_path / "docs.txt", "\n".join(docs) + "\n")
    tok = CountingTokenizer(tiny_tokenizer)
    tc.build_token_stream(source, tok, show_progress=False)
    change(source, docs)
    stream = tc.build_token_stream(source, tok, show_progress=False)
    assert tok.calls == (2 if rebuilt else 1)
    now = source.read_text(encoding="utf-8").splitlines()
    assert stream.tokens.tolist() == reference_tokens(tiny_tokenizer, now)  # the tokens of the text on disk now
