"""The INT8 CLI: quantize a float checkpoint to INT8 weight-only (one scale per output channel), report the file
sizes and the held-out quality before and after.

    python -m inference.quantizer --model_path models/sft/sft_best.pth --output models/sft/sft_best_int8.pth

The layers and kernels are in ``quantization.py``; the INT8 file is an ordinary checkpoint (``quantization: "int8"``)
that every tool loads through ``checkpoints.load``.
"""
from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

import checkpoints
import cli
from atomic_file import atomic_directory, remove_stale_temps
from devices import set_threads
from evaluator import GPTEvaluator
from quantization import QuantizationError, quantize_model_int8
from readers import DEFAULT_TEXT_FIELD, holds_records


def held_out_quality(model: torch.nn.Module, tokenizer, data: str, batch_size: int, max_samples: int | None,
                     text_field: str = DEFAULT_TEXT_FIELD) -> tuple[str, float]:
    """Held-out bits per byte (documents of any format, their text in ``text_field``) or response perplexity (SFT
    .json / .jsonl)."""
    ev = GPTEvaluator(model, tokenizer, show_progress=True)
    path = Path(data)
    if holds_records(path, text_field):
        return "response_perplexity", ev.response_perplexity(path, batch_size, max_samples)
    report = ev.evaluate_pretrained(path, batch_size=batch_size, max_samples=max_samples, text_field=text_field)
    return "bits_per_byte", report["bits_per_byte"]


def weights_bytes(model: torch.nn.Module) -> int:
    """Size of the model's weights as a checkpoint file, without writing one."""
    buffer = io.BytesIO()
    torch.save({"model_state_dict": model.state_dict(), "config": model.config.to_dict()}, buffer)
    return buffer.tell()


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m inference.quantizer",
                                description="Quantize a GPTModel checkpoint to INT8 weight-only (per-channel scales), "
                                            "print file sizes and held-out quality before/after.")
    parser.add_argument("--model_path", required=True, help="float checkpoint (.pth) to quantize")
    parser.add_argument("--output", required=True, help="where to write the INT8 checkpoint (.pth)")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: <checkpoint folder>/tokenizer); "
                                                "copied next to --output when that folder has none")
    parser.add_argument("--test_data_path", default="data/pretrain/val.txt",
                        help="held-out data: documents (.txt, .jsonl*, .parquet or a folder) give bits per byte, SFT "
                             ".json/.jsonl gives response perplexity")
    parser.add_argument("--text_field", type=cli.field_name, default=DEFAULT_TEXT_FIELD,
                        help="the field (.jsonl*) or column (.parquet) that holds each held-out document's text")
    parser.add_argument("--no_eval", action="store_true", help="skip the quality comparison")
    parser.add_argument("--keep_lm_head", action="store_true",
                        help="leave the LM head and the tied embedding in float (larger file, slower at batch 1)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=8, help="evaluation batch size")
    parser.add_argument("--max_samples", type=cli.positive_int, help="evaluate only the first N documents / records")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not this command's INT8 file of --model_path")
    return parser


def quantized_from(model_path: str) -> str:
    """What an INT8 checkpoint records as its source: the float checkpoint's absolute path."""
    return str(Path(model_path).resolve())


def check_paths(args) -> None:
    """Before any work: --output is none of the inputs (nor what the checkpoint refers to: a LoRA adapter's base), and
    an existing one is replaced only if it is this command's INT8 file of the same --model_path (a rerun), or with
    --overwrite."""
    def own(path: Path) -> bool:
        try:
            meta = checkpoints.checkpoint_metadata(path)
        except checkpoints.CheckpointError:
            return False
        return meta.get("quantization") == "int8" and meta.get("quantized_from") == quantized_from(args.model_path)

    inputs = [*checkpoints.checkpoint_inputs("--model_path", args.model_path, args.tokenizer_dir),
              ("--test_data_path", None if args.no_eval else args.test_data_path)]
    cli.check_outputs({"--output": args.output}, inputs, args.overwrite, own)
    if Path(args.output).is_dir():
        raise QuantizationError(f"--output {args.output} is a folder: pass a file such as "
                                f"{Path(args.output) / 'model_int8.pth'}")
    cli.check_output_folder(Path(args.output).parent, "--output's folder")


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer folder copied whole or not at all (a full disk leaves no half of one)."""
    with atomic_directory(target) as tmp:
        for file in source.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_run, argv)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    check_paths(args)
    if not args.no_eval and not Path(args.test_data_path).exists():
        raise QuantizationError(f"--test_data_path {args.test_data_path} not found (or pass --no_eval)")
    remove_stale_temps(Path(args.output).parent)  # what a run killed mid-write left (kill -9), as the trainers do
    loaded = checkpoints.load(args.model_path, args.tokenizer_dir, device="cpu", trainable=True, expect="lm")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    extra = {k: loaded.metadata[k] for k in ("tokenizer_fingerprint", "sft_template") if k in loaded.metadata}
    extra["quantized_from"] = quantized_from(args.model_path)  # a rerun may replace this file without --overwrite
    fp32_bytes = weights_bytes(model)  # weights only: the trainer's file also holds optimizer state
    quality = (lambda: None) if args.no_eval else \
        (lambda: held_out_quality(model, tokenizer, args.test_data_path, args.batch_size, args.max_samples,
                                  args.text_field))
    before = quality()
    quantize_model_int8(model, lm_head=not args.keep_lm_head)
    checkpoints.save_checkpoint(args.output, model, **extra)
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else Path(args.model_path).parent / "tokenizer"
    target = Path(args.output).parent / "tokenizer"
    if not target.exists():
        copy_tokenizer(tokenizer_dir, target)
    after = quality()
    size_in, size_out = Path(args.model_path).stat().st_size, Path(args.output).stat().st_size
    print(f"{args.model_path}: {size_in / 1e6:.2f} MB; its fp32 weights alone {fp32_bytes / 1e6:.2f} MB -> "
          f"int8 checkpoint {size_out / 1e6:.2f} MB ({size_out / fp32_bytes:.3f}x): {args.output}")
    if before is not None:
        metric, fp32, int8 = before[0], before[1], after[1]
        print(f"{metric} on {args.test_data_path}: fp32 {fp32:.4f}, int8 {int8:.4f} ({(int8 / fp32 - 1) * 100:+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
