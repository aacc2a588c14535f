"""Fetch public pretraining corpora and chat data from a Hugging Face dataset repository.

Any server that speaks the Hub's API will do (a mirror, a local test server): which files, from the Hub's file
listing; the bytes, by ``data.transfer`` (parallel, resumable, checked, atomic).

    python -m data.download                                  # FineWeb-Edu's sample-10BT: 2 shards, about 4.3 GB
    python -m data.download --dataset smoltalk               # SmolTalk's chat conversations (train split)
    python -m data.download --dataset fineweb-edu --max_gb 30                 # every shard that fits in 30 GB
    python -m data.download --dataset owner/name --files 'data/*.parquet' --shards 4
    python -m data.download --dataset owner/name --config default --split train --list

Files land under ``--output`` (default ``data/hf/<owner>/<name>``) at their paths in the repository; the folder is
what ``pretrain_trainer.py --train_data_dir`` and the tokenizer read, and chat files go through
``python -m data.convert_chat``. ``huggingface_hub`` (requirements.txt) lists the files and is imported only here,
when a listing is needed; ``--endpoint`` (or ``HF_ENDPOINT``) points at a mirror, ``HF_TOKEN`` opens gated datasets.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import cli
from atomic_file import remove_stale_temps
from data.transfer import (DownloadError, Manifest, Transfer, TransferParams, bytes_missing, fetch_all,
                           pending)

DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_REQUIREMENT = "huggingface_hub==2.4.0"
GB = 1e9  # the Hub shows sizes in decimal units, and so does --max_gb
# The files of a repository taken when neither --files nor --config says: every format readers.py reads.
DEFAULT_PATTERNS = ("**/*.parquet", "**/*.jsonl", "**/*.jsonl.gz", "**/*.jsonl.zst")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
T = TypeVar("T")


@dataclass(frozen=True)
class Preset:
    """A dataset by a short name: its repository, the files taken, and how many by default (None: all)."""
    repo_id: str
    patterns: tuple[str, ...]
    shards: int | None
    what: str


PRESETS = {
    "fineweb-edu": Preset("HuggingFaceFW/fineweb-edu", ("sample/10BT/*.parquet",), 2,
                          "pretraining text: FineWeb-Edu's 10B-token sample, 14 shards of about 2.1 GB ('text')"),
    "smoltalk": Preset("HuggingFaceTB/smoltalk", ("data/all/train-*.parquet",), None,
                       "chat data: SmolTalk's train split, 9 shards of about 0.22 GB ('messages')"),
}


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repository as the listing gives it: its path, size and checksum."""
    path: str
    size: int
    sha256: str | None  # of the content: LFS (and Xet) files
    git_sha1: str | None  # the git blob id: files stored in git itself


@dataclass(frozen=True)
class Source:
    """Where the files come from: a repository at a revision on an endpoint, and the token to send."""
    repo_id: str
    revision: str
    endpoint: str
    token: str | None


# ----------------------------------------------------------------------------- the Hub's listing

def _hub() -> Any:
    """huggingface_hub, imported on first use (no other module needs it); missing, one line saying what to install."""
    try:
        hub = importlib.import_module("huggingface_hub")
        importlib.import_module("huggingface_hub.errors")  # submodules the package does not load by itself
        importlib.import_module("huggingface_hub.utils.logging")
    except ImportError:
        raise DownloadError(f"listing a dataset's files needs huggingface_hub: pip install {HUB_REQUIREMENT} "
                            "(it is in requirements.txt)") from None
    hub.utils.logging.set_verbosity_error()  # its retry notices would break the one-line error policy
    return hub


def _network_error(err: Exception) -> bool:
    """A connection refused, a name not resolved, a timeout: whichever HTTP client the Hub library uses."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "TimeoutException", "RequestError"})


def _ask_hub(source: Source, what: str, call: Callable[[Any], T]) -> T:
    """``call(HfApi)``, its failures turned into one line that says what to change."""
    hub = _hub()
    where = f"{source.endpoint}/datasets/{source.repo_id}"
    try:
        return call(hub.HfApi(endpoint=source.endpoint, token=source.token))
    except hub.errors.RevisionNotFoundError:
        raise DownloadError(f"{source.repo_id} has no revision {source.revision!r}: check --revision") from None
    except hub.errors.GatedRepoError:
        raise DownloadError(f"{source.repo_id} is gated: accept its terms at {where} and set HF_TOKEN") from None
    except hub.errors.RepositoryNotFoundError:
        raise DownloadError(f"no dataset {source.repo_id!r} at {source.endpoint} (or it is private: set HF_TOKEN): "
                            f"check --dataset (presets: {', '.join(PRESETS)})") from None
    except hub.errors.HfHubHTTPError as err:
        raise DownloadError(f"{what} {where} failed: {str(err).splitlines()[0]}") from None
    except Exception as err:
        if not _network_error(err):
            raise
        raise DownloadError(f"cannot reach {source.endpoint} ({err}): check the network, or --endpoint / "
                            "HF_ENDPOINT") from None


def list_files(source: Source) -> list[RemoteFile]:
    """Every file of the repository (recursively), with its size and checksum."""
    entries = _ask_hub(source, "listing the files of", lambda api: list(api.list_repo_tree(
        source.repo_id, recursive=True, revision=source.revision, repo_type="dataset")))
    files = []
    for entry in entries:
        if not hasattr(entry, "size"):  # a folder
            continue
        lfs = getattr(entry, "lfs", None)
        files.append(RemoteFile(entry.path, int(entry.size), lfs.sha256 if lfs else None,
                                None if lfs else entry.blob_id))
    return files


def config_patterns(source: Source, config: str, split: str | None) -> tuple[str, ...]:
    """The file patterns of a config (and split) as the dataset card's ``configs`` declares them."""
    card = _ask_hub(source, "reading the card of",
                    lambda api: api.dataset_info(source.repo_id, revision=source.revision).card_data)
    configs = {c.get("config_name", "default"): c for c in getattr(card, "configs", None) or []
               if isinstance(c, dict)}
    if config not in configs:
        known = ", ".join(configs) or "none"
        raise DownloadError(f"{source.repo_id} has no config {config!r} (its card declares: {known}): pass one of "
                            "them, or --files with a pattern")
    data_files = configs[config].get("data_files", [])
    if isinstance(data_files, (str, dict)):
        data_files = [data_files]
    patterns, splits = [], []
    for entry in data_files:
        entry = {"split": "train", "path": entry} if isinstance(entry, str) else entry
        splits.append(entry.get("split", "train"))
        if split in (None, splits[-1]):
            path = entry.get("path", [])
            patterns += [path] if isinstance(path, str) else list(path)
    if not patterns:
        raise DownloadError(f"config {config!r} of {source.repo_id} has no split {split!r} (its splits: "
                            f"{', '.join(splits) or 'none'}): check --split")
    return tuple(patterns)


# ----------------------------------------------------------------------------- which files

def glob_regex(pattern: str) -> re.Pattern:
    """A repository path pattern as the Hub's data_files write them: ``*`` and ``?`` stay within one folder,
    ``**`` crosses folders (``**/`` also matches no folder)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out) + r"\Z")


def select(files: list[RemoteFile], patterns: Sequence[str], shards: int | None, max_gb: float | None,
           repo_id: str) -> list[RemoteFile]:
    """The files matching any pattern, in path order: the first ``shards`` of them, then as many as fit in
    ``max_gb``."""
    regexes = [glob_regex(p) for p in patterns]
    matched = sorted((f for f in files if any(r.match(f.path) for r in regexes)), key=lambda f: f.path)
    if not matched:
        sample = ", ".join(f.path for f in sorted(files, key=lambda f: f.path)[:6]) or "none"
        raise DownloadError(f"no file of {repo_id} matches {' '.join(patterns)} (its files: {sample}): check "
                            "--files / --config / --split")
    chosen = matched[:shards] if shards else matched
    if max_gb is not None:
        kept, total = [], 0
        for remote in chosen:
            if total + remote.size > max_gb * GB:
                break
            kept.append(remote)
            total += remote.size
        if not kept:
            raise DownloadError(f"the first file, {chosen[0].path}, is {chosen[0].size / GB:.2f} GB: more than "
                                f"--max_gb {max_gb:g}; raise it")
        chosen = kept
    return chosen


def transfers_for(chosen: list[RemoteFile], source: Source, output: Path) -> list[Transfer]:
    """Where each file comes from and goes (its repository path under ``output``)."""
    hub = _hub()
    headers = {"Authorization": f"Bearer {source.token}"} if source.token else {}
    transfers = []
    for remote in chosen:
        parts = Path(remote.path).parts
        if not parts or Path(remote.path).is_absolute() or ".." in parts:
            raise DownloadError(f"the listing names a file outside the repository ({remote.path!r}): refusing it")
        url = hub.hf_hub_url(source.repo_id, remote.path, repo_type="dataset", revision=source.revision,
                             endpoint=source.endpoint)
        transfers.append(Transfer(url, output / remote.path, remote.size, remote.sha256, remote.git_sha1, headers))
    return transfers


# ----------------------------------------------------------------------------- the CLI

def _endpoint(text: str) -> str:
    """argparse type: an http(s) URL."""
    if not re.match(r"^https?://[^/\s]+", text):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m data.download", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fineweb-edu", help="a preset (" + "; ".join(
        f"{name}: {p.what}" for name, p in PRESETS.items()) + ") or a dataset repository id, owner/name")
    parser.add_argument("--files", nargs="+", metavar="PATTERN", help="repository paths to take, e.g. "
                        "'data/*.parquet' ('*' within a folder, '**' across folders); default: the preset's, or "
                        "every .parquet / .jsonl(.gz/.zst) file")
    parser.add_argument("--config", help="take the files of this config, as the dataset card declares them")
    parser.add_argument("--split", help="with --config: only this split (e.g. train); default: every split")
    parser.add_argument("--revision", default="main", help="branch, tag or commit of the repository")
    parser.add_argument("--shards", type=cli.positive_int,
                        help="take the first N matching files (default: the preset's; every file otherwise, or when "
                        "--max_gb is given)")
    parser.add_argument("--max_gb", type=cli.positive_float, help="take files, in order, while they fit in this "
                        "many GB (10^9 bytes)")
    parser.add_argument("--output", type=Path, help="folder the files go to (default: data/hf/<owner>/<name>)")
    parser.add_argument("--endpoint", type=_endpoint, default=os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT),
                        help="the Hub's address, or a mirror's (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--workers", type=cli.positive_int, default=8, help="files downloaded at the same time")
    parser.add_argument("--retries", type=cli.nonnegative_int, default=5,
                        help="tries per file after the first, waiting 1, 2, 4, ... s between them")
    parser.add_argument("--timeout", type=cli.positive_float, default=60.0,
                        help="seconds without data before a connection counts as dropped (and is retried)")
    parser.add_argument("--list", action="store_true", help="print the files that would be fetched, and exit")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def resolve(args) -> tuple[str, tuple[str, ...] | None, int | None]:
    """(repository id, file patterns or None for --config, default shard count) from the flags."""
    if args.files and args.config:
        raise cli.UsageError("pass --files or --config, not both")
    if args.split and not args.config:
        raise cli.UsageError("--split needs --config (the card's config whose split it is)")
    preset = PRESETS.get(args.dataset)
    if preset is None and not REPO_ID.match(args.dataset):
        raise cli.UsageError(f"--dataset {args.dataset!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                             "repository id like owner/name")
    repo_id = preset.repo_id if preset else args.dataset
    if args.files or args.config:
        return repo_id, tuple(args.files) if args.files else None, None
    return repo_id, preset.patterns if preset else DEFAULT_PATTERNS, preset.shards if preset else None


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    repo_id, patterns, default_shards = resolve(args)
    output = cli.check_output_folder(args.output or Path("data/hf") / repo_id, "--output")
    source = Source(repo_id, args.revision, args.endpoint, _hub().get_token())
    files = list_files(source)
    if patterns is None:
        patterns = config_patterns(source, args.config, args.split)
    shards = args.shards or (default_shards if args.max_gb is None else None)
    transfers = transfers_for(select(files, patterns, shards, args.max_gb, repo_id), source, output)
    if args.list:
        for transfer in transfers:
            print(f"{transfer.size / GB:8.3f} GB  {transfer.target.relative_to(output).as_posix()}")
        print(f"{len(transfers)} file(s), {sum(t.size for t in transfers) / GB:.3f} GB, into {output}")
        return 0
    _download(transfers, output, TransferParams(args.workers, args.retries, args.timeout, not args.no_progress))
    return 0


def _download(transfers: list[Transfer], output: Path, params: TransferParams) -> None:
    """Fetch what is missing (after checking there is room for it) and say where the files are."""
    remove_stale_temps(output)
    manifest = Manifest(output)
    todo = pending(transfers, manifest)
    existing = next(p for p in (output, *output.parents) if p.exists())  # nothing is created before this check
    needed, free = bytes_missing(todo), shutil.disk_usage(existing).free
    if needed > free:
        raise DownloadError(f"the download needs {needed / GB:.2f} GB more but {existing} has {free / GB:.2f} GB "
                            "free: free some space, fetch less (--shards, --max_gb) or pass another --output")
    output.mkdir(parents=True, exist_ok=True)
    total = sum(t.size for t in transfers) / GB
    print(f"{len(transfers) - len(todo)} of {len(transfers)} file(s) already here; fetching {needed / GB:.3f} GB "
          f"into {output}", flush=True)
    try:
        fetch_all(transfers, todo, params, manifest)
    except (KeyboardInterrupt, cli.Interrupted) as err:
        signum = getattr(err, "signum", signal.SIGINT)
        raise cli.Interrupted(signum, f"interrupted by {signal.Signals(signum).name}: the partial files (*.part) "
                                      "are kept; run the same command again to resume") from None
    print(f"{len(transfers)} file(s), {total:.3f} GB, verified in {output}")


if __name__ == "__main__":
    sys.exit(main())
