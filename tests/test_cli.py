"""cli: the one parser and error policy (bad input is exactly one `error:` line on stderr and exit 2, never a
traceback; outputs never overwrite inputs or files the command did not write), the settings written once
(``cli.setting`` / ``add_settings`` / ``typed_settings``), ``describe_os_error``, and signals in ``run_cli``.

The table of bad flags covers every command built on ``cli.ArgumentParser``: one block of rows per command. A new flag
gets its bad values as rows in its command's block.
"""
from __future__ import annotations

import ast
import dataclasses
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints
import cli
import evaluator
import finetune
import finetune_stages as stages
import pretrain_trainer as pt
from byte_level_bpe import ByteLevelBPETokenizer
from cli_cases import assert_one_line_error, run_main, snapshot
from conftest import ROOT, TRAIN_TXT, corpus_lines
from inference import quantizer


# ----------------------------------------------------------------------------- settings, parsing, OS errors

@dataclasses.dataclass
class Toy:
    steps: int = cli.setting(10, "how many steps", cli.positive_int)
    rate: float = cli.setting(0.5, "a rate", cli.probability)
    mode: str = cli.setting("fast", "the mode", choices=("fast", "slow"))
    verbose: bool = cli.setting(False, "say more")
    out_dir: str = cli.setting("out", "where it goes", flag="output")
    hidden: int = 3  # not a flag


def toy_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="toy")
    cli.add_settings(parser, Toy)
    return parser


def test_settings_of_lists_only_the_fields_made_with_setting():
    assert [f.name for f in cli.settings_of(Toy)] == ["steps", "rate", "mode", "verbose", "out_dir"]
    assert Toy() == Toy(10, 0.5, "fast", False, "out", 3)  # the defaults are the dataclass's own


def test_typed_settings_hold_only_what_the_user_typed_and_the_config_fills_the_rest():
    args = toy_parser().parse_args(["--steps", "4", "--verbose", "--output", "elsewhere"])
    typed = cli.typed_settings(args, Toy)
    assert typed == {"steps": 4, "verbose": True, "out_dir": "elsewhere"}
    assert Toy(**typed) == Toy(steps=4, verbose=True, out_dir="elsewhere")
    assert cli.typed_settings(toy_parser().parse_args([]), Toy) == {}


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"), (["--steps", "x"], "--steps"), (["--rate", "1.5"], "--rate"),
    (["--mode", "medium"], "--mode"), (["--hidden", "1"], "unrecognized"), (["--out_dir", "x"], "unrecognized"),
    (["--ste", "4"], "unrecognized"),
    (["--dir", "runs/caf\udce9"], r"'runs/caf\\udce9' is not UTF-8 text \(byte 0xe9 is not UTF-8\)"),
    (["--dir", "\udbff"], r"lone surrogate \\udbff is no character"),
], ids=["steps 0", "steps x", "rate 1.5", "mode medium", "not a flag", "the field name of a renamed flag",
        "a prefix of a flag", "a byte that is not UTF-8", "a lone surrogate"])
def test_a_bad_setting_is_a_usage_error_naming_the_flag(argv, message):
    with pytest.raises(cli.UsageError, match=message):
        toy_parser().parse_args(argv)


def test_help_shows_each_settings_help_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit) as exit_info:
        toy_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "how many steps (default: 10)" in out and "a rate (default: 0.5)" in out
    assert "--output OUTPUT" in out and "where it goes (default: out)" in out
    assert "say more" in out and "say more (default" not in out  # False says nothing
    assert "--hidden" not in out


@pytest.mark.parametrize("err, expected", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"),
     "No such file or directory: /x/y (check the path)"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/z"), "Permission denied: /root/z (no permission"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), "Is a directory: /tmp (a file and a folder"),
    (OSError(errno.ENOSPC, "No space left on device", "/d/f"), "No space left on device: /d/f (free some space"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
], ids=["missing", "permission", "folder", "full", "other"])
def test_describe_os_error_names_the_path_and_a_hint_without_errno_noise(err, expected):
    text = cli.describe_os_error(err)
    assert text.startswith(expected) and "Errno" not in text and "[" not in text


# ----------------------------------------------------------------------------- every command: one table

# command -> (module whose main() runs it, the valid flags each case starts from). In the flags and the cases,
# {ckpt} is a tiny checkpoint (tokenizer beside it), {adapter} a LoRA adapter file on the checkpoint {base} (each with
# its tokenizer beside it), {sft} an SFT .json, {text} a small corpus, {afile} a plain file (all in a shared folder
# that must stay as it was), {out} the test's own empty folder, which must stay empty.
COMMANDS = {
    "evaluator": ("evaluator", ["--model_path", "{ckpt}", "--model_type", "sft", "--test_data_path", "{sft}",
                                "--output", "{out}/report.json", "--do_sample", "--no_progress"]),
    "build_pretrain_data": ("data.build_pretrain_data", ["--corpus", "{out}/corpus", "--output", "{out}/pretrain"]),
    "build_sft_data": ("data.sft.build_sft_data", ["--corpus", str(TRAIN_TXT), "--output_dir", "{out}/sft"]),
    "build_benchmark_tasks": ("data.build_benchmark_tasks", ["--output_dir", "{out}/benchmarks"]),
    "speedrun": ("runs.speedrun", ["--dry_run", "--output_dir", "{out}/run"]),
    "build_classify_data": ("data.classify.build_classify_data",
                            ["--corpus", str(TRAIN_TXT), "--output_dir", "{out}/classify"]),
    "checkpoints": ("checkpoints", []),
    "quantizer": ("inference.quantizer", ["--model_path", "{ckpt}", "--output", "{out}/int8.pth", "--no_eval"]),
    "kv_cache_infer": ("inference.kv_cache_infer", ["--model_path", "{ckpt}", "--prompt", "ROMEO:", "--device", "cpu"]),
    "byte_level_bpe": ("byte_level_bpe", ["--input", "{text}", "--output", "{out}/tokenizer"]),
    "export": ("inference.export", ["--model_path", "{ckpt}", "--format", "hf", "--output", "{out}/hf"]),
    "bench_classify": ("benchmarks.bench_classify", ["--pretrained", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_dpo_beta": ("benchmarks.bench_dpo_beta", ["--sft_model", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_finetune": ("benchmarks.bench_finetune", ["--pretrained", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_generate": ("benchmarks.bench_generate", ["--shapes", "tiny", "--devices", "cpu"]),
    "bench_inference": ("benchmarks.bench_inference", ["--shape", "tiny", "--no_ct2"]),
    "bench_rlvf_lr": ("benchmarks.bench_rlvf_lr", ["--sft_model", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_rlvf_room": ("benchmarks.bench_rlvf_room", ["--pretrained", "main={ckpt}", "--workdir", "{out}/work"]),
    "bench_peers": ("benchmarks.bench_peers", ["--skip_servers"]),
    "bench_docker": ("benchmarks.bench_docker", ["--model_path", "{ckpt}"]),
    "bench_chat": ("benchmarks.bench_chat", ["--pretrained", "{ckpt}", "--workdir", "{out}/work"]),
    "bench_decode": ("benchmarks.bench_decode", ["--model_path", "{ckpt}"]),
    "screenshot_chat": ("benchmarks.screenshot_chat", ["--model_path", "{ckpt}", "--output", "{out}/chat.png"]),
    "bench_server": ("benchmarks.bench_server", ["--model_path", "{ckpt}", "--skip_baseline", "--duration", "1"]),
    "bench_soak": ("benchmarks.bench_soak", ["--model_path", "{ckpt}", "--seconds", "1", "--long_tokens", "16",
                                             "--output", "{out}/soak.json"]),
    "bench_equivalence": ("benchmarks.bench_equivalence", ["--against", "HEAD", "--stages", "sft"]),
    "bench_tokenizer": ("benchmarks.bench_tokenizer", ["--input", "{text}"]),
    "bench_scale": ("benchmarks.bench_scale", ["--sizes_mb", "1", "--work_dir", "{out}/work"]),
    "bench_optimizer": ("benchmarks.bench_optimizer", ["--seeds", "1", "--skip_default_runs"]),
    "bench_train": ("benchmarks.bench_train", ["--steps", "1"]),
    "bench_architecture": ("benchmarks.bench_architecture", ["--seeds", "1", "--default_seeds", "",
                                                             "--short_minutes", "0.05"]),
    "bench_tools": ("benchmarks.bench_tools", ["--sft_model", "{ckpt}", "--limit", "1"]),
    "bench_kv_cache": ("benchmarks.bench_kv_cache", ["--pairs", "tiny:modern-tiny", "--rounds", "1"]),
    "bench_structured": ("benchmarks.bench_structured", ["--corpus", "{text}", "--steps", "1", "--repeats", "1"]),
    "download": ("data.download", ["--endpoint", "http://127.0.0.1:9", "--output", "{out}/hf", "--list"]),
    "convert_chat": ("data.convert_chat", ["{sft}", "{out}/chat.jsonl", "--no_progress"]),
    "gpu_check": ("benchmarks.gpu_check", ["--dry_run", "--work_dir", "{out}/work", "--output", "{out}/gpu.json"]),
}

# The retired spellings, assembled so that a grep for them finds only code that still uses them.
OLD_THREADS, OLD_MAX_GEN_LEN, OLD_MIN_GEN_LEN = "--" + "threads", "--" + "max_gen_len", "--" + "min_gen_len"


def rows(command: str, flag_lists: list[list[str]]) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """One case per flag list: the command's valid flags plus these."""
    return [(command, flags, ()) for flags in flag_lists]


def missing(command: str, *flags: str, adding: tuple[str, ...] = ()) -> tuple[str, list[str], tuple[str, ...]]:
    """One case: the command's valid flags without ``flags`` (each with its value), plus ``adding``."""
    return command, list(adding), flags


# (command, flags added to its valid ones, flags dropped from them). Each must fail before any work starts. Outputs:
# an output is never one of the command's inputs nor what they refer to (a LoRA adapter's base model, its folder and
# tokenizer), two outputs are never the same path, and an existing file the command did not write needs --overwrite
# (cli.check_outputs, checkpoints.checkpoint_inputs).
BAD_FLAGS: list[tuple[str, list[str], tuple[str, ...]]] = []

# evaluator: sampling and run settings, outputs, --text_field, standard benchmarks (--tasks, --limit, few-shot)
BAD_FLAGS += rows("evaluator", [
    ["--top_p", "0"], ["--top_p", "2"], ["--top_k", "-1"], ["--top_k", "x"], ["--temperature", "0"],
    ["--temperature", "inf"], ["--batch_size", "0"], ["--max_new_tokens", "0"], ["--max_new_tokens", "ten"],
    ["--max_samples", "0"], ["--seed", "-1"], ["--seed", "abc"], ["--num_threads", "0"], ["--num_threads", "two"],
    ["--best_of", "0"], ["--best_of_scorer", "x"], ["--model_type", "ppo"], ["--dtype", "int4"],
    ["--device", "tpu"], [OLD_MAX_GEN_LEN, "8"], [OLD_THREADS, "2"], ["--output"],
    ["--output", "{sft}"], ["--output", "{ckpt}"], ["--output", "{folder}/tokenizer/vocab.json"],
    ["--plot", "{out}/report.json"], ["--output", "{afile}"], ["--plot", "{afile}"], ["--overwrite", "x"],
    ["--output", "{sft}", "--overwrite"], ["--compare", "{ckpt}", "--output", "{ckpt}", "--overwrite"],
    ["--text_field", ""], ["--text_field"],
    ["--tasks", "winogrande={sft}"], ["--tasks", "hellaswag={out}/missing.jsonl"], ["--tasks", "hellaswag"],
    ["--tasks", "hellaswag={sft}"], ["--tasks", "mmlu={text}"], ["--tasks", "mmlu={folder}"],
    ["--tasks", "mmlu={afile},mmlu={afile}"], ["--tasks", "gsm8k={out}/g.jsonl", "--model_type", "reward"],
    ["--tasks"], ["--limit", "0"], ["--limit", "x"], ["--num_fewshot", "-1"], ["--num_fewshot", "two"],
    ["--model_path", "{adapter}", "--output", "{base}", "--overwrite"],
    ["--compare", "{adapter}", "--plot", "{base}", "--overwrite"],
])
BAD_FLAGS += [missing("evaluator", "--test_data_path"), missing("evaluator", "--model_path"),
              missing("evaluator", "--test_data_path", adding=("--tasks", "mmlu={out}/missing.csv")),
              missing("evaluator", "--test_data_path", adding=("--tasks", "mmlu={folder}", "--plot", "{out}/c.png"))]

# build_pretrain_data
BAD_FLAGS += rows("build_pretrain_data", [
    ["--bogus"], ["--num_threads", "2"], ["--corpus"], ["--output", "{afile}"], ["--corpus", "{out}/missing"],
])

# build_sft_data
BAD_FLAGS += rows("build_sft_data", [
    ["--arithmetic_chat_form", "json"], ["--arithmetic_chat_form"],
    ["--seed", "-1"], ["--seed", "x"], ["--arithmetic_train", "-1"], ["--arithmetic_test", "1.5"],
    ["--arithmetic_rl", "-5"], ["--pairwise_arithmetic", "x"], ["--speaker_train", "-1"], ["--speaker_test", "x"],
    ["--mixed_excerpts_train", "-1"], ["--chat_sums_train", "-1"], ["--chat_sums_test", "x"],
    ["--num_threads", "2"], ["--output_dir", "{afile}"], ["--corpus", "{out}/missing.txt"], ["--output_dir"],
])

# build_classify_data
BAD_FLAGS += rows("build_classify_data", [
    ["--seed", "-1"], ["--seed", "1.5"], ["--max_train", "0"], ["--max_test", "x"], ["--bogus", "1"],
    ["--output_dir", "{afile}"], ["--corpus", "{out}/missing.txt"], ["--corpus"],
])

# checkpoints (the inspector)
BAD_FLAGS += rows("checkpoints", [[], ["--bogus", "{ckpt}"], ["{text}"], ["{out}/missing.pth"]])

# quantizer: settings, outputs, --text_field
BAD_FLAGS += rows("quantizer", [
    ["--batch_size", "0"], ["--batch_size", "x"], ["--max_samples", "-1"], ["--num_threads", "0"],
    [OLD_THREADS, "2"], ["--output", "{ckpt}"],
    ["--output", "{afile}"], ["--output", "{text}"], ["--output", "{folder}/tokenizer/merges.txt"],
    ["--output", "{ckpt}", "--overwrite"], ["--output", "{folder}"], ["--overwrite", "x"],
    ["--text_field", ""], ["--model_path", "{adapter}", "--output", "{base}", "--overwrite"],
])
BAD_FLAGS += [missing("quantizer", "--model_path"), missing("quantizer", "--output"),
              missing("quantizer", "--no_eval",
                      adding=("--test_data_path", "{afile}", "--output", "{afile}", "--overwrite"))]

# kv_cache_infer (the generation CLI)
BAD_FLAGS += rows("kv_cache_infer", [
    ["--max_new_tokens", "0"], ["--max_new_tokens", "x"], [OLD_MAX_GEN_LEN, "5"], ["--temperature", "0"],
    ["--top_k", "-1"], ["--top_p", "0"], ["--top_p", "1.5"], ["--repetition_penalty", "0"],
    ["--repetition_penalty", "1e-45"], ["--seed", "-1"], ["--num_threads", "0"], [OLD_THREADS, "1"],
    ["--interactive"], ["--max_message_chars", "0"], ["--max_message_chars", "x"], ["--no_calculator"],
    ["--no_calculator", "x"], ["--compile", "fast"], ["--compile"], ["--speculative", "-1"], ["--speculative", "x"],
    ["--speculative"],
    ["--prompt", "ROMEO \udcff"], ["--prompt", "\ud800"],  # not UTF-8: the Unicode policy
])
BAD_FLAGS += [missing("kv_cache_infer", "--model_path")]

# byte_level_bpe (the tokenizer trainer): settings, outputs, --text_field, the byte cap
BAD_FLAGS += rows("byte_level_bpe", [
    ["--vocab_size", "abc"], ["--vocab_size", "100"], ["--min_frequency", "0"], ["--num_workers", "0"],
    ["--num_threads", "2"], ["--input", "{out}/missing.txt"], ["--output", "{afile}"], ["--output", "{folder}"],
    ["--text_field", ""], ["--text_field", " text"], ["--text_field"], ["--max_train_bytes", "0"],
    ["--max_train_bytes", "-5"], ["--max_train_bytes", "1e9"], ["--max_train_bytes", "x"],
])

# export
BAD_FLAGS += rows("export", [
    ["--format", "onnx"], ["--format"], ["--type", "q4_0"], ["--type", "q8_0"], ["--output", "{ckpt}"],
    ["--output", "{ckpt}", "--overwrite"], ["--output", "{folder}", "--overwrite"],
    ["--output", "{folder}/tokenizer", "--overwrite"], ["--output", "{afile}", "--format", "gguf"],
    ["--model_path", "{text}"], ["--model_path", "{out}/missing.pth"], ["--tokenizer_dir", "{out}/missing"],
    ["--bogus"], ["--model_path", "{adapter}", "--output", "{folder}/base", "--overwrite"],
    ["--model_path", "{adapter}", "--output", "{folder}/base/tokenizer", "--overwrite"],
    ["--model_path", "{adapter}", "--format", "gguf", "--output", "{base}", "--overwrite"],
    ["--output", "{out}/hf\udce9"],  # a file name whose byte is not UTF-8
])
BAD_FLAGS += [missing("export", "--format"), missing("export", "--output"), missing("export", "--model_path")]

# bench_classify
BAD_FLAGS += rows("bench_classify", [["--num_threads", "0"], ["--num_threads", "x"], [OLD_THREADS, "2"], ["--workdir"]])

# bench_dpo_beta
BAD_FLAGS += rows("bench_dpo_beta", [["--betas", "0"], ["--betas", "x"], ["--betas"], [OLD_THREADS, "2"]])

# bench_finetune
BAD_FLAGS += rows("bench_finetune", [["--seeds", "-1"], ["--seeds", "a"], ["--stages", "sft", "nope"],
                                     [OLD_THREADS, "2"]])

# bench_generate
BAD_FLAGS += rows("bench_generate", [
    ["--prompt_len", "0"], ["--new_tokens", "-1"], ["--repeats", "0"], ["--batch_sizes", "1,x"],
    ["--batch_sizes", "0"], ["--batch_sizes", ""], ["--shapes", "huge"], ["--devices", "tpu"],
    ["--uncached_samples", "1"], ["--num_threads", "0"], [OLD_THREADS, "1"],
])

# bench_inference
BAD_FLAGS += rows("bench_inference", [
    ["--shape", "huge"], ["--repeats", "0"], ["--num_threads", "0"], ["--kernel_threads", "0"], ["--stagger", "0"],
    ["--joining", "1,x"], ["--compile_shapes", "huge"], ["--new_tokens", "x"], [OLD_THREADS, "2"],
    ["--compile_rounds", "0"], ["--compile_batch", "x"], ["--compiled_only", "x"],
])

# bench_rlvf_lr
BAD_FLAGS += rows("bench_rlvf_lr", [["--lrs", "0"], ["--lrs", "x"], ["--lrs"], ["--bogus"]])

# bench_rlvf_room
BAD_FLAGS += rows("bench_rlvf_room", [
    ["--pretrained", "noequals"], ["--train_sums", "-1"], ["--test_sums", "0"], ["--seeds", "x"],
    ["--num_threads", "0"], ["--lr_runs", "0"], [OLD_THREADS, "2"],
])
BAD_FLAGS += [missing("bench_rlvf_room", "--pretrained")]

# bench_server
BAD_FLAGS += rows("bench_server", [
    ["--duration", "0"], ["--users", "1,0"], ["--users", "x"], ["--min_new_tokens", "0"],
    ["--max_new_tokens", "x"], [OLD_MAX_GEN_LEN, "48"], ["--num_threads", "0"], [OLD_THREADS, "2"],
    ["--port", "0"],
])

# bench_soak
BAD_FLAGS += rows("bench_soak", [
    ["--seconds", "0"], ["--warmup_seconds", "x"], ["--users", "0"], ["--leave", "1.5"], ["--leave", "x"],
    ["--max_batch_size", "0"], ["--max_queue", "x"], ["--shutdown_timeout", "-1"], ["--shutdown_streams", "0"],
    ["--long_tokens", "0"], ["--long_tokens", "100000"], ["--num_threads", "0"], ["--seed", "x"],
    ["--model_path", "{out}/missing.pth"], ["--output", "{folder}"], ["--bogus"],
])

# bench_peers
BAD_FLAGS += rows("bench_peers", [
    ["--num_threads", "0"], ["--new_tokens", "x"], ["--repeats", "0"], ["--context", "64"], ["--users", "1,x"],
    ["--users", "0"], ["--duration", "0"], ["--max_tokens", "-1"], [OLD_THREADS, "2"], ["--no_compile", "x"],
])

# bench_chat
BAD_FLAGS += rows("bench_chat", [
    ["--seeds", "x"], ["--seeds", "-1"], ["--num_threads", "0"], ["--pretrained", "{out}/missing.pth"], ["--bogus"],
])

# bench_decode
BAD_FLAGS += rows("bench_decode", [
    ["--num_threads", "0"], ["--repeats", "x"], ["--k", "0"], ["--quantize", "int4"], ["--new_tokens", "-1"],
    ["--model_path", "{out}/missing.pth"], ["--bogus"],
])

# screenshot_chat
BAD_FLAGS += rows("screenshot_chat", [["--model_path", "{out}/missing.pth"], ["--bogus"]])

# bench_docker
BAD_FLAGS += rows("bench_docker", [
    ["--requests", "0"], ["--requests", "x"], ["--model_path", "{out}/missing.pth"], ["--bogus"],
])

# bench_equivalence
BAD_FLAGS += rows("bench_equivalence", [["--stages", "ppo"], ["--stages"], ["--against"], ["--bogus"]])

# bench_tokenizer
BAD_FLAGS += rows("bench_tokenizer", [
    ["--slice_mb", "0"], ["--slice_mb", "x"], ["--input", "{out}/missing.txt"], ["--bogus"],
    ["--tokenizer_dir", "{out}/missing"], ["--tokenizer_dir"],
])

# bench_optimizer
BAD_FLAGS += rows("bench_optimizer", [
    ["--seeds", "0"], ["--seeds", "x"], ["--short_minutes", "0"], ["--adamw_lrs", "0"], ["--muon_lrs", "x"],
    ["--recipe", "gpt3"], ["--bogus"],
])

# bench_scale
BAD_FLAGS += rows("bench_scale", [
    ["--sizes_mb", "0"], ["--sizes_mb", "x"], ["--vocab_size", "10"], ["--encode_mb", "0"], ["--bogus"],
    ["--reuse_training", "--output", "{out}/missing.json"],
])

# bench_train
BAD_FLAGS += rows("bench_train", [
    ["--steps", "0"], ["--steps", "x"], ["--num_threads", "0"], ["--vocab_size", "x"], [OLD_THREADS, "2"],
])

# bench_tools
BAD_FLAGS += rows("bench_tools", [
    ["--seeds", "x"], ["--num_threads", "0"], ["--limit", "0"], ["--max_new_tokens", "x"], ["--batch_size", "0"],
    ["--sft_model", "{out}/missing.pth"], ["--chat_test", "{out}/missing.json"], ["--sft_max_steps", "0"],
    ["--pretrained", "{ckpt}"], ["--sft_flags", '"unclosed'], ["--bogus"],
])

# bench_kv_cache
BAD_FLAGS += rows("bench_kv_cache", [
    ["--pairs", "gpt2"], ["--pairs", "gpt2:nope"], ["--pairs", ":modern"], ["--batch_sizes", "0"],
    ["--batch_sizes", ""], ["--vocab_size", "x"], ["--prompt_len", "0"], ["--new_tokens", "-1"], ["--rounds", "0"],
    ["--num_threads", "0"], ["--bogus"],
])

# bench_architecture
BAD_FLAGS += rows("bench_architecture", [
    ["--seeds", "0"], ["--seeds", "", "--default_seeds", ""], ["--seeds", "x"], ["--default_seeds", "1,x"],
    ["--short_minutes", "0"],
    ["--short_minutes", "x"], ["--optimizer", "sgd"], ["--bogus"],
])

# bench_structured
BAD_FLAGS += rows("bench_structured", [
    ["--vocab_size", "100"], ["--vocab_size", "x"], ["--shape", "huge"], ["--batch_sizes", "1,0"],
    ["--batch_sizes", ""], ["--steps", "0"], ["--repeats", "x"], ["--num_threads", "0"],
    ["--corpus", "{out}/missing.txt"], ["--corpus", "{folder}"], ["--bogus"],
])

# gpu_check
BAD_FLAGS += rows("gpu_check", [
    ["--steps", "bogus"], ["--steps", "device,bogus"], ["--steps", ""], ["--steps", ","], ["--max_minutes", "0"],
    ["--max_minutes", "x"], ["--num_threads", "0"], ["--output", "{folder}"], ["--step", "bogus"], ["--bogus"],
])

# download (fails before any request or write)
BAD_FLAGS += rows("download", [
    ["--shards", "0"], ["--shards", "x"], ["--max_gb", "0"], ["--max_gb", "-1"], ["--max_gb", "nan"],
    ["--workers", "0"], ["--retries", "-1"], ["--timeout", "0"], ["--endpoint", "ftp://mirror"],
    ["--endpoint", "huggingface.co"], ["--endpoint"], ["--dataset", "fineweb"], ["--dataset", "a/b/c"],
    ["--files"], ["--files", "*.parquet", "--config", "default"], ["--split", "train"], ["--output", "{afile}"],
    ["--list", "x"], ["--bogus"],
])

# convert_chat
BAD_FLAGS += rows("convert_chat", [
    ["--format", "xml"], ["--format"], ["{out}/chat.txt"], ["{out}/missing.json", "{out}/other.jsonl"],
    ["--skip_bad", "{afile}"], ["--bogus"],
])

# build_benchmark_tasks
BAD_FLAGS += rows("build_benchmark_tasks", [
    ["--seed", "-1"], ["--seed", "x"], ["--hellaswag", "0"], ["--gsm8k", "x"], ["--arc_easy", "-1"],
    ["--output_dir", "{afile}"], ["--output_dir"], ["--pretrain_val", "{out}/missing.txt"],
    ["--pretrain_val", "{sft}"], ["--sft_test", "{out}/missing.json"], ["--sft_test", "{text}"],
    ["--sft_test", "{sft}"], ["--bogus"],
])

# speedrun
BAD_FLAGS += rows("speedrun", [
    ["--size", "cpu"], ["--size", "tpu"], ["--size"], ["--depth", "0"], ["--depth", "x"], ["--depth", "4"],
    ["--nproc", "0"], ["--nproc", "2"], ["--serve"], ["--port", "8001"], ["--port", "0"], ["--host", "0.0.0.0"],
    ["--cost_per_hour", "-1"], ["--cost_per_hour", "x"], ["--cost_per_hour", "nan"], ["--limit", "0"],
    ["--limit", "x"], ["--tasks", "winogrande={sft}"], ["--tasks", "hellaswag"],
    ["--tasks", "hellaswag={out}/missing.jsonl"], ["--tasks", "hellaswag={sft}"],
    ["--tasks", "mmlu={afile},mmlu={afile}"], ["--output_dir", "{afile}"],
    ["--output_dir", str(ROOT / "models" / "dry")], ["--train_data", "{out}/missing.txt"],
    ["--val_data", "{out}/missing.txt"], ["--train_data", "{sft}"], ["--force", "x"], ["--bogus"],
])


def case_id(case: tuple) -> str:
    command, flags, dropped = case
    return f"{command}: " + " ".join([*flags, *(f"without {flag}" for flag in dropped)] or ["no arguments"])




def command_line(command: str, flags: list[str], dropped: tuple[str, ...], places: dict[str, Path]) -> list[str]:
    """The command's valid flags without ``dropped`` (each with its value), plus ``flags``; placeholders filled."""
    base = COMMANDS[command][1]
    kept, skip = [], False
    for i, arg in enumerate(base):
        if skip:
            skip = False
        elif arg in dropped:
            skip = i + 1 < len(base) and not base[i + 1].startswith("--")
        else:
            kept.append(arg)
    return [arg.format(**places) for arg in kept + flags]


@pytest.mark.parametrize("case", BAD_FLAGS, ids=case_id)
def test_bad_flags_of_every_converted_cli(case, shared, tmp_path, capsys, monkeypatch):
    command, flags, dropped = case
    main = importlib.import_module(COMMANDS[command][0]).main
    monkeypatch.chdir(tmp_path)  # a relative default output would land here
    before = snapshot(shared["folder"])
    code = main(command_line(command, flags, dropped, {**{k: str(v) for k, v in shared.items()}, "out": tmp_path}))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err  # never argparse's usage block
    assert not captured.out  # no report, no JSON line
    assert not list(tmp_path.iterdir()), "a failed command wrote something"
    assert snapshot(shared["folder"]) == before


def test_the_table_covers_every_command_and_every_benchmark():
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem.startswith("bench_")}
    assert benchmarks <= set(COMMANDS), sorted(benchmarks - set(COMMANDS))
    assert {command for command, _, _ in BAD_FLAGS} == set(COMMANDS)


# the table's commands, plus pretraining, finetuning and the server (tested by their own files)
PARSER_MODULES = sorted({module for module, _ in COMMANDS.values() if module != "checkpoints"}
                        | {"pretrain_trainer", "finetune", "inference.settings"})


@pytest.mark.parametrize("module", PARSER_MODULES)
def test_every_flag_has_help_and_the_parser_is_the_projects(module):
    parser = importlib.import_module(module).build_parser()
    assert isinstance(parser, cli.ArgumentParser) and issubclass(parser.formatter_class, cli.HelpFormatter)
    assert not [action.dest for action in parser._actions if not action.help]
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert not flags & {OLD_THREADS, OLD_MAX_GEN_LEN, OLD_MIN_GEN_LEN}, module


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_exits_0_with_the_usage(command, capsys):
    module, _ = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python ")



# ----------------------------------------------------------------------------- settings: each written once

def help_entries(main, argv: list[str], capsys, monkeypatch) -> dict[str, str]:
    """--help as flag -> its entry (a wide terminal: no help text wrapped, no hyphen broken)."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    entries: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("    "):  # a long flag's help starts on the next line
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def test_pretrain_help_lists_every_setting_with_its_help_and_its_default(capsys, monkeypatch):
    entries = help_entries(pt.main, [], capsys, monkeypatch)
    defaults = pt.config_from_args(pt.build_parser().parse_args([]))  # what a run with no flags trains with
    settings = [*cli.settings_of(pt.TrainConfig), *cli.settings_of(pt.PretrainOptions)]
    flagless = {f.name for f in dataclasses.fields(pt.TrainConfig)} - {f.name for f in settings}
    assert flagless == {"beta1", "beta2"}  # AdamW's betas are not flags
    for field in settings:
        entry = entries[f"--{field.metadata['flag'] or field.name}"]
        assert field.metadata["help"] in entry
        value = getattr(defaults, field.name, field.default)
        if value not in (None, False):
            assert f"{value:g}" in entry if isinstance(value, float) else f"{value}" in entry, (field.name, entry)
    assert "0.003 with --optimizer adamw, 0.006 with --optimizer muon" in entries["--lr"]


def test_finetune_help_lists_every_setting_with_each_modes_default(capsys, monkeypatch):
    entries = help_entries(finetune.main, [], capsys, monkeypatch)
    by_name = {f.name: f for config in stages.CONFIGS.values() for f in cli.settings_of(config)}
    assert set(by_name) | {"mode", "beta1", "beta2"} == set().union(*map(stages.field_names, stages.MODES))
    for name, field in by_name.items():
        entry = entries[f"--{name}"]
        assert field.metadata["help"] in entry
        defaults = {mode: getattr(config(), name) for mode, config in stages.CONFIGS.items()
                    if name in stages.field_names(mode)}
        if len(defaults) < len(stages.MODES):
            assert "--mode " + ", ".join(defaults) in entry, entry
        if len(set(map(repr, defaults.values()))) > 1:
            assert all(f"{mode} {value}" in entry for mode, value in defaults.items()), entry
        elif next(iter(defaults.values())) not in (None, False):
            assert f"default: {next(iter(defaults.values()))}" in entry, entry


def own_fields(path: Path) -> list[str]:
    """The fields each dataclass in a file annotates itself (a default changed with cli.with_defaults is not one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.target.id for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
            if any("dataclass" in ast.unparse(d) for d in cls.decorator_list)
            for node in cls.body if isinstance(node, ast.AnnAssign)]


@pytest.mark.parametrize("command", ["pretrain_trainer.py", "finetune_stages.py"])
def test_each_setting_is_defined_once(command):
    """A command's settings (the loop's in training.py, its own in its file) each have one definition: a mode or a
    subclass changes only defaults."""
    names = own_fields(ROOT / "training.py") + own_fields(ROOT / command)
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)


def test_with_defaults_changes_only_a_default_and_refuses_a_name_it_does_not_inherit():
    field = next(f for f in dataclasses.fields(stages.PPOConfig) if f.name == "kl_coef")
    shared = next(f for f in dataclasses.fields(stages.GRPOConfig) if f.name == "kl_coef")
    assert (field.default, shared.default) == (0.2, 0.05) and field.metadata == shared.metadata
    with pytest.raises(TypeError, match="klcoef"):
        cli.with_defaults(klcoef=0.1)(type("Typo", (stages.PPOConfig,), {}))



# ----------------------------------------------------------------------------- outputs

def test_an_output_that_exists_is_replaced_only_when_it_is_the_commands_own_or_with_overwrite(shared, tmp_path,
                                                                                              capsys):
    """The evaluator replaces its own earlier report and chart, the quantizer its own INT8 file of the same model;
    anything else needs --overwrite, and an input is never an output even then."""
    report, chart, notes = tmp_path / "report.json", tmp_path / "chart.png", tmp_path / "notes.txt"
    notes.write_text("mine")
    evaluate = ["--model_path", str(shared["ckpt"]), "--model_type", "sft", "--test_data_path", str(shared["sft"]),
                "--max_new_tokens", "2", "--no_progress"]
    for _ in range(2):  # the second run replaces the first one's report and chart
        assert evaluator.main(evaluate + ["--output", str(report), "--plot", str(chart)]) == 0
    assert json.loads(report.read_text())["model_type"] == "sft" and chart.read_bytes().startswith(b"\x89PNG")
    code, err = run_main(evaluator.main, evaluate + ["--output", str(notes)], capsys)
    assert_one_line_error(code, err)
    assert "already exists and was not written by this command" in err and notes.read_text() == "mine"
    assert evaluator.main(evaluate + ["--output", str(notes), "--overwrite"]) == 0
    assert json.loads(notes.read_text())["results"]

    other = tmp_path / "other.pth"  # another existing checkpoint: kept without --overwrite
    other.write_bytes(shared["ckpt"].read_bytes())
    quantize = ["--model_path", str(shared["ckpt"]), "--no_eval", "--output"]
    code, err = run_main(quantizer.main, quantize + [str(other)], capsys)
    assert_one_line_error(code, err)
    assert other.read_bytes() == shared["ckpt"].read_bytes()
    for _ in range(2):  # the rerun replaces its own INT8 file of the same --model_path
        assert quantizer.main(quantize + [str(tmp_path / "int8.pth")]) == 0
    assert checkpoints.checkpoint_metadata(tmp_path / "int8.pth")["quantization"] == "int8"
    assert quantizer.main(quantize + [str(other), "--overwrite"]) == 0
    assert checkpoints.checkpoint_metadata(other)["quantization"] == "int8"
    capsys.readouterr()



# ----------------------------------------------------------------------------- signals in run_cli

def _encode_across_processes(argv) -> int:
    tokenizer = ByteLevelBPETokenizer(vocab_size=300)
    tokenizer.train(corpus_lines(limit=50), show_progress=False)
    for _ in range(3):  # each call starts a worker pool and shuts it down
        assert len(list(tokenizer.encode_many(corpus_lines(limit=200), num_workers=2))) == 200
    return 0


def _sigterm_handler_of_a_forked_child(argv) -> int:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what SIGTERM does there, then leaves without running any cleanup
        os.write(write, b"default" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"python")
        os._exit(0)
    os.waitpid(pid, 0)
    return {b"default": 0, b"python": 1}[os.read(read, 16)]


def test_a_forked_child_dies_on_sigterm_even_blocked_in_c():
    assert cli.run_cli(_sigterm_handler_of_a_forked_child, []) == 0  # SIG_DFL there, the CLI's handler here


def test_forked_workers_shut_down_by_their_pool_exit_quietly(capfd):
    assert cli.run_cli(_encode_across_processes, []) == 0
    assert "Traceback" not in capfd.readouterr().err



def _signal_inside(signum: int) -> str:
    return f"""
import os, signal, sys, importlib
module = importlib.import_module(sys.argv[1])
def build(*args, **kwargs):
    os.kill(os.getpid(), {int(signum)})  # Ctrl-C / SIGTERM while the builder works
    signal.pause() if {int(signum)} == signal.SIGTERM else None
module.build = build
sys.exit(module.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("builder, output_flag", [("data.build_pretrain_data", "--output"),
                                                  ("data.sft.build_sft_data", "--output_dir"),
                                                  ("data.classify.build_classify_data", "--output_dir")])
def test_a_data_builder_stopped_by_a_signal_exits_130_or_143_without_a_traceback(builder, output_flag, signum,
                                                                                 tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.txt").write_text("earlier\n")
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _signal_inside(signum), builder, output_flag, str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == (130 if signum == signal.SIGINT else 143), result.stderr
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr
    assert snapshot(out) == before
