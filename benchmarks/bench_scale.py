"""Pretraining data at scale: tokenizer training, encoding and the token cache on 10 / 100 / 500 MB; ONE JSON line.

Run from the repository root: ``python -m benchmarks.bench_scale [--sizes_mb 10,100,500] [--work_dir DIR]``
(about 25 minutes on 2 cores; results in benchmarks/results/bench_scale.json).

The corpora are built from the embedded text (data/pretrain/train.txt) without letting repetition do the work: our
encoder (and HF's) caches pre-tokens, so a corpus of the same lines repeated would encode at cache speed and train a
tokenizer on a fixed set of words. Each generated line is a random line of the corpus with one new word put in at a
random word boundary (two corpus words spliced for English, a run of 2-6 corpus characters for Chinese), which keeps
the share of never-seen pre-tokens (the `hit_rate` each size reports: pre-tokens seen before in the same stream, an
unbounded cache) near the embedded text's own (0.964), at every size, instead of creeping up to 1.

Measured, each as its own process with the process tree's RSS sampled every 20 ms (workers included):
- tokenizer training (our ``train_from_path`` vs HF ``tokenizers.ByteLevelBPETokenizer.train``, same vocab size,
  min_frequency 2, same specials): wall time and peak RSS;
- encoding on all cores, MB/s, on ``--encode_mb`` of the 100 MB corpus (ours ``encode_many`` from a cold cache, HF
  ``encode_batch``, ``tiktoken`` ``encode_ordinary_batch``, the last two with our vocab and merges), and how many
  lines the three encode identically;
- the token cache (``token_cache.build_token_stream``, all cores): wall, MB/s and peak RSS at every size;
- a build of the 100 MB corpus killed (SIGKILL) once half its shards are finished, then run again: the shards it
  re-used and whether its cache bytes equal the uninterrupted build's.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import regex

import cli
from benchmarks.cli_options import benchmark_parser, positive_ints
from byte_level_bpe import GPT2_SPLIT_PATTERN

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "pretrain" / "train.txt"
RESULTS = ROOT / "benchmarks" / "results" / "bench_scale.json"
HAN = regex.compile(r"\p{Han}")


# ----------------------------------------------------------------------------- the corpora

def _new_word(rng: random.Random, words: list[str], chars: list[str], chinese: bool) -> str:
    if chinese:
        return "".join(rng.choice(chars) for _ in range(rng.randint(2, 6)))
    a, b = rng.choice(words), rng.choice(words)
    return a[:max(1, len(a) // 2)] + b[len(b) // 2:]


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> Path:
    """``size_mb`` MB of new lines: a random corpus line with one new word inserted (see the module docstring)."""
    if path.exists() and path.stat().st_size >= size_mb * 1_000_000:
        return path
    lines = [line for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = sorted({w for line in lines if not HAN.search(line) for w in regex.findall(r"\p{L}{3,}", line)})
    chars = [c for line in lines for c in line if HAN.match(c)]
    rng, written = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_mb * 1_000_000:
            block = []
            for _ in range(5000):
                line = rng.choice(lines)
                chinese = bool(HAN.search(line))
                parts = line.split(" ")
                cut = rng.randint(1, len(parts)) if not chinese else 0
                new = _new_word(rng, words, chars, chinese)
                if chinese:
                    at = rng.randint(0, len(line))
                    block.append(f"{line[:at]}，{new}，{line[at:]}")
                else:
                    block.append(" ".join(parts[:cut] + [new] + parts[cut:]))
            text = "\n".join(block) + "\n"
            out.write(text)
            written += len(text.encode("utf-8"))
    return path


def hit_rate(path: Path) -> dict:
    """Share of pre-tokens already seen earlier in the stream (an unbounded pre-token cache), and distinct ones."""
    findall, seen, hits, total = regex.compile(GPT2_SPLIT_PATTERN).findall, set(), 0, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            pieces = findall(line.rstrip("\n"))
            total += len(pieces)
            for piece in pieces:
                if piece in seen:
                    hits += 1
                else:
                    seen.add(piece)
    return {"hit_rate": round(hits / total, 4), "pre_tokens": total, "distinct_pre_tokens": len(seen)}


# ----------------------------------------------------------------------------- measured jobs, one process each

JOBS = {
    "train_ours": """
from byte_level_bpe import train_from_path
train_from_path(sys.argv[2], vocab_size=int(sys.argv[3]), show_progress=False).save(sys.argv[4])
""",
    "train_hf": """
import tokenizers
from byte_level_bpe import DEFAULT_SPECIAL_TOKENS
hf = tokenizers.ByteLevelBPETokenizer()
hf.train([sys.argv[2]], vocab_size=int(sys.argv[3]), min_frequency=2, special_tokens=DEFAULT_SPECIAL_TOKENS,
         show_progress=False)
""",
    "cache": """
from byte_level_bpe import ByteLevelBPETokenizer
import token_cache
tokenizer = ByteLevelBPETokenizer.from_pretrained(sys.argv[3])
stream = token_cache.build_token_stream(sys.argv[2], tokenizer, num_workers=None, cache_dir=sys.argv[4],
                                        show_progress=False)
print(len(stream), stream.n_bytes)
""",
}


def tree_rss(proc) -> int:
    """Resident bytes of a process and all its descendants (a pool's workers count)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(job: str, *args: str, kill_when=None) -> dict:
    """Run ``JOBS[job]`` in its own process: wall seconds, peak RSS of its tree (MB), its stdout; ``kill_when()``
    true: SIGKILL it there."""
    code = "import sys\n" + JOBS[job]  # `python -c` imports from its cwd, the project root
    proc = subprocess.Popen([sys.executable, "-c", code, job, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    start, peak, killed = time.perf_counter(), 0, False
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"{job} failed: {err[-2000:]}")
    return {"seconds": round(wall, 2), "peak_rss_mb": round(peak / 1e6, 1), "stdout": out.strip(), "killed": killed}


# ----------------------------------------------------------------------------- the measurements

def bench_training(corpus: Path, vocab_size: int, out_dir: Path) -> dict:
    ours = measure("train_ours", str(corpus), str(vocab_size), str(out_dir))
    hf = measure("train_hf", str(corpus), str(vocab_size))
    return {"ours_s": ours["seconds"], "hf_s": hf["seconds"], "time_ratio": round(ours["seconds"] / hf["seconds"], 2),
            "ours_peak_rss_mb": ours["peak_rss_mb"], "hf_peak_rss_mb": hf["peak_rss_mb"],
            "rss_ratio": round(ours["peak_rss_mb"] / hf["peak_rss_mb"], 2)}


def tiktoken_encoding(tokenizer):
    """A tiktoken Encoding with our merges: each token's bytes ranked by its id (ids follow merge order)."""
    import tiktoken

    special_ids = {s: tokenizer.vocab[s] for s in tokenizer.special_tokens}
    ranks = {tokenizer.decode_bytes([i]): i for i in range(len(tokenizer)) if i not in special_ids.values()}
    return tiktoken.Encoding("ours", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)


def bench_encoding(corpus: Path, tokenizer_dir: Path, encode_mb: int, cores: int) -> dict:
    import tokenizers

    from byte_level_bpe import ByteLevelBPETokenizer

    lines, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            lines.append(line.rstrip("\n"))
            size += len(line.encode("utf-8"))
            if size >= encode_mb * 1_000_000:
                break
    ours = ByteLevelBPETokenizer.from_pretrained(tokenizer_dir)  # cold: an empty pre-token cache
    hf = tokenizers.ByteLevelBPETokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    tk = tiktoken_encoding(ours)
    timings, outputs = {}, {}
    for name, encode in (("ours", lambda: list(ours.encode_many(lines, num_workers=cores))),
                         ("hf_batch", lambda: [e.ids for e in hf.encode_batch(lines)]),
                         ("tiktoken", lambda: tk.encode_ordinary_batch(lines, num_threads=cores))):
        start = time.perf_counter()
        outputs[name] = encode()
        timings[name] = time.perf_counter() - start
    sample = range(min(len(lines), 20000))
    same = {other: sum(outputs["ours"][i] == list(outputs[other][i]) for i in sample) / len(sample)
            for other in ("hf_batch", "tiktoken")}
    mb = size / 1e6
    return {"megabytes": round(mb, 1), "cores": cores,
            **{f"{name}_mb_s": round(mb / s, 2) for name, s in timings.items()},
            "ours_vs_hf_batch": round(timings["hf_batch"] / timings["ours"], 2),
            "ours_vs_tiktoken": round(timings["tiktoken"] / timings["ours"], 2),
            "identical_lines_vs_hf": round(same["hf_batch"], 4),
            "identical_lines_vs_tiktoken": round(same["tiktoken"], 4)}


def bench_cache(corpus: Path, tokenizer_dir: Path, cache_dir: Path) -> dict:
    run = measure("cache", str(corpus), str(tokenizer_dir), str(cache_dir))
    n_tokens, n_bytes = map(int, run["stdout"].split())
    return {"seconds": run["seconds"], "mb_s": round(n_bytes / 1e6 / run["seconds"], 2),
            "peak_rss_mb": run["peak_rss_mb"], "tokens": n_tokens}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def bench_kill_and_resume(corpus: Path, tokenizer_dir: Path, cache_dir: Path, whole_bin: Path) -> dict:
    """SIGKILL a build once it has written half the tokens of ``whole_bin``, build again: the finished shards it
    re-used, and whether its bytes equal the uninterrupted build's."""
    import token_cache

    expected = -(-corpus.stat().st_size // token_cache.SHARD_TEXT_BYTES)
    meta_path, partial = cache_dir / whole_bin.with_suffix(".json").name, cache_dir / whole_bin.name
    half = whole_bin.stat().st_size // 2

    def half_done() -> bool:
        return partial.exists() and partial.stat().st_size >= half

    first = measure("cache", str(corpus), str(tokenizer_dir), str(cache_dir), kill_when=half_done)
    kept = len(json.loads(meta_path.read_text())["shards"]) if meta_path.exists() else 0
    second = measure("cache", str(corpus), str(tokenizer_dir), str(cache_dir))
    resumed_bin = cache_dir / whole_bin.name
    return {"shards": expected, "killed_at_bytes": f"{half:,} of {whole_bin.stat().st_size:,}",
            "finished_shards_kept": kept, "killed": first["killed"],
            "killed_after_s": first["seconds"], "resumed_s": second["seconds"],
            "same_bytes_as_uninterrupted": _sha256(resumed_bin) == _sha256(whole_bin)}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_scale", __doc__)
    parser.add_argument("--sizes_mb", type=positive_ints(), default=[10, 100, 500], help="corpus sizes in MB")
    parser.add_argument("--vocab_size", type=cli.int_at_least(300), default=8000, help="tokenizer vocabulary size")
    parser.add_argument("--encode_mb", type=cli.positive_int, default=50,
                        help="MB of the middle corpus encoded by each encoder")
    parser.add_argument("--work_dir", default=None, help="folder for the corpora and caches (default: a temp folder)")
    parser.add_argument("--output", default=str(RESULTS), help="where the JSON result is written")
    parser.add_argument("--reuse_training", action="store_true",
                        help="keep the tokenizers an earlier run left in --work_dir and its training and hit-rate "
                             "figures in --output; measure the rest of --sizes_mb again (other sizes' rows stay)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    earlier = json.loads(Path(args.output).read_text(encoding="utf-8")) if args.reuse_training else None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    result: dict = {"cpu_cores": cores, "vocab_size": args.vocab_size, "source_hit_rate": hit_rate(SOURCE),
                    "sizes": dict(earlier["sizes"]) if earlier else {}}  # sizes not measured again are kept
    middle = sorted(args.sizes_mb)[len(args.sizes_mb) // 2]
    for size in sorted(args.sizes_mb):
        corpus = make_corpus(work / f"corpus_{size}mb.txt", size)
        tok_dir = work / f"tokenizer_{size}mb"
        for stale in work.glob(f"cache_{size}mb*"):
            shutil.rmtree(stale)  # every build is measured from nothing
        if earlier is not None:
            keep = ("megabytes", "hit_rate", "pre_tokens", "distinct_pre_tokens", "tokenizer_training")
            row = {k: earlier["sizes"][f"{size}mb"][k] for k in keep}
        else:
            row = {"megabytes": round(corpus.stat().st_size / 1e6, 1), **hit_rate(corpus),
                   "tokenizer_training": bench_training(corpus, args.vocab_size, tok_dir)}
        row["token_cache"] = bench_cache(corpus, tok_dir, work / f"cache_{size}mb")
        if size == middle:
            row["encoding"] = bench_encoding(corpus, tok_dir, args.encode_mb, cores)
            whole = next((work / f"cache_{size}mb").glob("*.bin"))
            row["kill_9_and_resume"] = bench_kill_and_resume(corpus, tok_dir, work / f"cache_{size}mb_killed", whole)
        result["sizes"][f"{size}mb"] = row
        print(json.dumps({size: row}), file=sys.stderr)
    peaks = [row["token_cache"]["peak_rss_mb"] for row in result["sizes"].values()]
    result["token_cache_peak_rss_spread"] = round(max(peaks) / min(peaks) - 1, 3)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
