"""The benchmarks' shared command-line pieces on top of cli.py: a parser whose --help keeps the benchmark's docstring
as written (its usage examples stay readable) and shows every flag's default, and the argument types of
comma-separated lists (``--batch_sizes 1,8``, ``--shapes tiny,gpt2``).

Its own module because every benchmark script builds its parser from it, and none of them should import another
benchmark (with its heavy imports) for it; it imports only cli (and gpt_model's presets when a list names them).
"""
from __future__ import annotations

import argparse
from typing import Callable

import cli


class DocstringHelpFormatter(argparse.RawDescriptionHelpFormatter, cli.HelpFormatter):
    """--help prints the description line by line as written, and "(default: X)" after each flag's help."""


def benchmark_parser(module: str, doc: str | None) -> cli.ArgumentParser:
    """A ``cli.ArgumentParser`` named ``python -m <module>``, described by the benchmark's docstring."""
    return cli.ArgumentParser(prog=f"python -m {module}", description=doc, formatter_class=DocstringHelpFormatter)


def positive_ints(allow_empty: bool = False) -> Callable[[str], list[int]]:
    """argparse type: comma-separated ints >= 1 ("1,8,32"); "" is the empty list only with ``allow_empty`` (a figure
    to skip)."""
    def parse(text: str) -> list[int]:
        if not text.strip():
            if allow_empty:
                return []
            raise argparse.ArgumentTypeError("expected comma-separated integers such as 1,8, got ''")
        return [cli.positive_int(part.strip()) for part in text.split(",")]
    parse.__name__ = "comma-separated integers"
    return parse


def presets(allow_empty: bool = False) -> Callable[[str], list[str]]:
    """argparse type: comma-separated ``GPTConfig`` preset names ("tiny,gpt2"); "" only with ``allow_empty``."""
    def parse(text: str) -> list[str]:
        from gpt_model import PRESETS  # lazy: the tokenizer and server benchmarks never load torch for their flags

        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected comma-separated presets ({', '.join(PRESETS)}), got ''")
        unknown = [name for name in names if name not in PRESETS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
        return names
    parse.__name__ = "comma-separated presets"
    return parse
