"""inference.quantizer: an INT8 checkpoint that saves, loads back and evaluates, and its CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import load_checkpoint, load_model_and_tokenizer, save_checkpoint
from decoding import SamplingParams, generate
from gpt_model import GPTModel
from inference.quantizer import main
from quantization import quantize_model_int8


@pytest.fixture()
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


@pytest.fixture()
def run_dir(model, tiny_tokenizer, tmp_path) -> Path:
    tiny_tokenizer.save(tmp_path / "run" / "tokenizer")
    save_checkpoint(tmp_path / "run" / "fp32.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    return tmp_path / "run"


def test_save_load_round_trip_and_size(model, run_dir, tiny_tokenizer):
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    quantize_model_int8(model)
    save_checkpoint(run_dir / "int8.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    ckpt = load_checkpoint(run_dir / "int8.pth")
    assert ckpt["quantization"] == "int8" and ckpt["model_state_dict"]["lm_head.weight"].dtype == torch.int8
    assert (run_dir / "int8.pth").stat().st_size <= 0.3 * (run_dir / "fp32.pth").stat().st_size
    via_loader, tokenizer = load_model_and_tokenizer(run_dir / "int8.pth")  # the one loading entry point
    with torch.no_grad():
        assert torch.equal(via_loader(ids)["logits"], model(ids)["logits"])
    assert via_loader.lm_head.weight is via_loader.transformer.wte.weight
    prompt = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode_ordinary("ROMEO:")])
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(via_loader, prompt, greedy), generate(model, prompt, greedy))


def test_evaluator_reads_an_int8_checkpoint(model, run_dir, tmp_path, capsys):
    import evaluator

    quantize_model_int8(model)
    save_checkpoint(run_dir / "int8.pth", model)
    val = tmp_path / "val.txt"
    val.write_text("ROMEO: What say you?\nJULIET: 床前明月光\n", encoding="utf-8")
    reports = []
    for name in ("fp32.pth", "int8.pth"):
        assert evaluator.main(["--no_progress", "--model_path", str(run_dir / name), "--test_data_path", str(val),
                               "--output", str(tmp_path / "r.json")]) == 0
        reports.append(json.loads((tmp_path / "r.json").read_text())["results"][0])
    assert abs(reports[1]["bits_per_byte"] / reports[0]["bits_per_byte"] - 1) < 0.01
    fp32, _ = load_model_and_tokenizer(run_dir / "fp32.pth", trainable=True)  # plain weights
    # the packed fp32 model and the INT8 one count the weights they were made from
    assert reports[0]["n_parameters"] == reports[1]["n_parameters"] == fp32.num_parameters()


def test_cli_quantizes_and_reports(run_dir, tmp_path, capsys):
    val = tmp_path / "val.txt"
    val.write_text("ROMEO: What say you?\nLEAR: Attend the lords.\n", encoding="utf-8")
    out = tmp_path / "elsewhere" / "int8.pth"
    assert main(["--model_path", str(run_dir / "fp32.pth"), "--output", str(out), "--test_data_path", str(val)]) == 0
    printed = capsys.readouterr().out
    assert "int8 checkpoint" in printed and "bits_per_byte" in printed
    assert (out.parent / "tokenizer" / "vocab.json").exists()  # copied, so the output loads on its own
    load_model_and_tokenizer(out)


def test_cli_errors_are_one_line(model, run_dir, tmp_path, capsys):
    save_checkpoint(run_dir / "int8.pth", quantize_model_int8(model))
    cases = [(["--model_path", str(run_dir / "int8.pth"), "--output", str(tmp_path / "o.pth")],
              "is an INT8 checkpoint, for inference only"),
             (["--model_path", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o.pth")], "missing.pth"),
             (["--model_path", str(run_dir / "fp32.pth"), "--output", str(run_dir / "fp32.pth")],
              "never one of the command's inputs"),
             (["--model_path", str(run_dir / "fp32.pth"), "--output", str(tmp_path / "o.pth"),
               "--test_data_path", str(tmp_path / "nope.txt")], "nope.txt")]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert main(["--model_path", "m.pth", "--output", "o.pth", "--batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--batch_size" in err and err.count("\n") == 1


@pytest.mark.parametrize("writer, left", [
    ("os.fsync", r"\.model_int8\.pth\.\d+\.tmp"),  # killed with the INT8 file written, before its rename
    ("shutil.copy2", r"\.tokenizer\.\d+\.tmpdir"),  # killed while the tokenizer is copied beside it
])
def test_the_temporary_files_of_a_run_killed_mid_write_are_removed_by_the_next_one(writer, left, run_dir, tmp_path):
    """kill -9 mid-save leaves the write's temporary file; the next successful run removes it, as the trainers'
    next start does (atomic_file.remove_stale_temps), and its own output loads."""
    import re

    from cli_cases import run_killed_in, temp_files

    out = tmp_path / "int8" / "model_int8.pth"
    argv = ["--model_path", str(run_dir / "fp32.pth"), "--output", str(out), "--no_eval"]
    killed = run_killed_in(writer, "inference.quantizer", argv)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [name for name in temp_files(out.parent) if re.fullmatch(left, name)], temp_files(out.parent)
    assert main(argv) == 0
    assert temp_files(out.parent) == []
    assert load_checkpoint(out)["quantization"] == "int8" and (out.parent / "tokenizer" / "vocab.json").exists()
