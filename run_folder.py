"""A run's output folder: checkpoints named ``<prefix>_step_N.pth`` / ``<prefix>_best.pth``, ``metrics.jsonl``,
``loss_curve.png`` (and a classifier's ``confusion_matrix.png``) and ``tokenizer/``, and the guarantee that a run
never leaves it worse than it found it (an earlier run's files move to ``previous/`` instead of being deleted, and
only when this run has a checkpoint to write).

Its own module because the training loop uses it and the benchmarks and tests read the metrics it writes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from atomic_file import atomic_path, remove_stale_temps
from byte_level_bpe import ByteLevelBPETokenizer, TokenizerError

CONFUSION_CHART = "confusion_matrix.png"  # a classifier run's chart of its best checkpoint on the test set
RUN_FILES = ("metrics.jsonl", "loss_curve.png", CONFUSION_CHART)  # what a run writes besides checkpoints, tokenizer/


def step_checkpoints(output_dir: Path, prefix: str) -> list[Path]:
    """``{prefix}_step_{N}.pth`` files in ``output_dir``, oldest step first."""
    found = []
    for path in Path(output_dir).glob(f"{prefix}_step_*.pth"):
        number = path.stem.rsplit("_", 1)[1]
        if number.isdigit():
            found.append((int(number), path))
    return [p for _, p in sorted(found)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a damaged line (a kill mid-write) is skipped, not fatal."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class RunFolder:
    """An output folder that a run may never leave worse than it found it.

    Nothing in it changes until the run has its first checkpoint to write. Then the files of an earlier, different
    run with the same prefix (checkpoints, metrics.jsonl, the charts, a tokenizer/ that differs) move to
    ``previous/<time>/`` instead of being deleted, and metrics.jsonl starts again: empty for a fresh run, the rows up
    to the checkpoint's step when resuming (from this folder, or copied from the folder resumed from).
    """

    def __init__(self, output_dir: str | os.PathLike, prefix: str, tokenizer, resumed_from: str | None, step: int,
                 is_main: bool = True):
        self.path, self.prefix, self.tokenizer, self.is_main = Path(output_dir), prefix, tokenizer, is_main
        self.committed = False
        self.pending: list[dict[str, Any]] = []
        source = Path(resumed_from).resolve().parent if resumed_from else None
        self.same_run = source is not None and self.path.exists() and source == self.path.resolve()
        self.history = [r for r in read_metrics((source or self.path) / "metrics.jsonl") if r["step"] <= step] \
            if source else []
        if is_main:
            remove_stale_temps(self.path)
            if source is not None and not self.same_run and self.earlier_files():
                print(f"resuming {resumed_from} into {self.path}: the earlier run there moves to "
                      f"{self.path / 'previous'}/ at the first checkpoint")

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def earlier_files(self) -> list[Path]:
        names = [*step_checkpoints(self.path, self.prefix), self.path / f"{self.prefix}_best.pth",
                 *(self.path / name for name in RUN_FILES)]
        return [p for p in names if p.exists()]

    def _tokenizer_differs(self) -> bool:
        config = self.path / "tokenizer" / "vocab.json"
        if not config.exists():
            return False
        try:
            return ByteLevelBPETokenizer.from_pretrained(config.parent).fingerprint != self.tokenizer.fingerprint
        except TokenizerError:
            return True

    def commit(self) -> None:
        """Called just before the first checkpoint: move the earlier run aside, then take the folder over."""
        if self.committed or not self.is_main:
            self.committed = True
            return
        self.path.mkdir(parents=True, exist_ok=True)
        moved = [] if self.same_run else self.earlier_files()
        if not self.same_run and self._tokenizer_differs():
            moved.append(self.path / "tokenizer")
        if moved:
            archive = self.path / "previous" / time.strftime("%Y%m%d-%H%M%S")
            archive.mkdir(parents=True, exist_ok=True)
            for path in moved:
                shutil.move(str(path), str(archive / path.name))
            print(f"the earlier run's {len(moved)} file(s) in {self.path} moved to {archive}")
        if not (self.path / "tokenizer" / "vocab.json").exists():
            self.tokenizer.save(self.path / "tokenizer")
        rows = self.history + self.pending
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        self.pending, self.committed = [], True

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if not self.committed:
            self.pending.append(row)
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        return (read_metrics(self.metrics_path) if self.committed else self.history) + self.pending

    def plot(self) -> None:
        """loss_curve.png: train and val loss by step."""
        if not (self.is_main and self.committed):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.metrics()
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        for points, label, style in ((train, "train", "-"), (val, "val", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{self.prefix} loss")
        if train or val:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.path / "loss_curve.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
