"""Inference on top of decoding.py: INT8 weight-only quantization (`inference.quantizer`) and generation,
streaming and terminal chat (`inference.kv_cache_infer`); each module is a CLI (`python -m inference.<module>`)."""
from __future__ import annotations

import argparse
import sys


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports bad flags as one `error: ...` line (exit status 2), without the usage block."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
