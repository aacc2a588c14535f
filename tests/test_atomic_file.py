"""atomic_path: the target is replaced only by a complete write, and no temp file is left behind; a write that runs
out of room (ENOSPC, a file-size limit, torch's serializer failing) is one NoSpaceError and the previous file stays;
every command that saves, run on a full disk, says so in one line and keeps the files that were there."""
import errno
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import evaluator
import pretrain_trainer as pt
from atomic_file import NoSpaceError, atomic_directory, atomic_path
from byte_level_bpe import ByteLevelBPETokenizer
from cli_cases import (assert_no_space_line, assert_one_line_error, pretrain_args, run_main, run_on_a_full_disk,
                       snapshot)


def test_success_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt.pth"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_failure_keeps_previous_file_and_removes_temp(tmp_path):
    target = tmp_path / "vocab.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]


def test_creates_new_file(tmp_path):
    target = tmp_path / "meta.json"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"{}")
    assert target.read_bytes() == b"{}"


# ----------------------------------------------------------------------------- a full disk

TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch's words


SAFETENSORS_WRITE_FAILURE = "Error while serializing: I/O error: No space left on device (os error 28)"  # its words
NUMPY_SHORT_WRITE = "19200 requested and 8684 written"  # numpy's tofile under the gguf writer, with no errno


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     OSError(errno.EFBIG, "File too large"), RuntimeError(TORCH_WRITE_FAILURE),
                                     SafetensorError(SAFETENSORS_WRITE_FAILURE), OSError(NUMPY_SHORT_WRITE)],
                         ids=["ENOSPC", "EFBIG", "torch writer", "safetensors writer", "numpy short write"])
def test_a_write_that_runs_out_of_room_is_one_no_space_error_and_the_previous_file_stays(failure, tmp_path):
    target = tmp_path / "sft_step_8.pth"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(NoSpaceError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a check")
            raise failure
    message = str(caught.value.strerror)
    assert f"while writing {target}; the previous sft_step_8.pth is intact" in message
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft_step_8.pth"]  # the temporary file is gone


def test_torch_save_past_the_room_left_is_a_no_space_error(tmp_path, monkeypatch):
    real_save = torch.save

    def save_to_a_full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise RuntimeError(TORCH_WRITE_FAILURE)  # what torch raises when the disk fills during the write

    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    with pytest.raises(NoSpaceError, match="no space left on the device of .* nothing was replaced"):
        with atomic_path(tmp_path / "new.pth") as tmp:
            torch.save({"x": torch.zeros(3)}, tmp)
    assert not list(tmp_path.iterdir())


def test_other_errors_pass_through_unchanged(tmp_path):
    for error in (RuntimeError("a bug"), PermissionError(errno.EACCES, "Permission denied"),
                  SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"),
                  OSError("3 requested and 3 written, says no one"), ValueError("a bad value")):
        with pytest.raises(type(error)) as caught:
            with atomic_path(tmp_path / "x") as tmp:
                tmp.write_text("x")
                raise error
        assert not isinstance(caught.value, NoSpaceError)
    assert not list(tmp_path.iterdir())


def test_a_folder_write_that_runs_out_of_room_keeps_the_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text("old")
    with pytest.raises(NoSpaceError, match="the previous tokenizer is intact"):
        with atomic_directory(folder) as tmp:
            (tmp / "vocab.json").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (folder / "vocab.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


# ----------------------------------------------------------------------------- every command on a full disk

@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_previous_files_stay(corpus, tiny_tokenizer_dir, shared, files, tmp_path):
    """Every command that saves (pretraining, SFT, GRPO, the quantizer, the evaluator's report and chart, the
    tokenizer CLI), with no room for its output: exit 2, one line naming the file, the temp file gone, the files
    that were there byte-identical."""
    run = tmp_path / "run"  # a pretraining run with its step 2; a resumed run cannot write step 4
    assert pt.main(pretrain_args(corpus, tiny_tokenizer_dir, run, "--max_steps", "2", "--eval_interval", "2")) == 0
    before = snapshot(run)
    result = run_on_a_full_disk(150_000, "pretrain_trainer", pretrain_args(
        corpus, tiny_tokenizer_dir, run, "--max_steps", "4", "--eval_interval", "2", "--resume", "auto"))
    assert_no_space_line(result, run / "pretrain_step_4.pth")
    assert {k: v for k, v in snapshot(run).items() if k.endswith("step_2.pth")} == \
        {k: v for k, v in before.items() if k.endswith("step_2.pth")}
    stage = ["--device", "cpu", "--max_steps", "2", "--eval_interval", "2", "--batch_size", "2",
             "--max_new_tokens", "2", "--test_data_path", str(files["sft_test"]), "--data_path", str(files["sft_data"])]
    for mode, extra in (("sft", ["--pretrained_model"]), ("rlvf", ["--eval_samples", "2", "--sft_model"])):
        out = tmp_path / mode
        result = run_on_a_full_disk(20_000, "finetune", ["--mode", mode, *stage, "--output_dir", str(out), *extra,
                                                         str(files["pretrained"])])
        assert_one_line_error(result.returncode, result.stderr)
        assert "while writing" in result.stderr and not list(out.rglob("*.pth")), result.stderr[-2000:]
    int8 = tmp_path / "int8.pth"
    result = run_on_a_full_disk(20_000, "inference.quantizer", ["--model_path", str(shared["ckpt"]), "--no_eval",
                                                                "--output", str(int8)])
    assert_no_space_line(result, int8)
    assert not int8.exists()


@pytest.mark.slow
def test_a_full_disk_keeps_the_evaluators_report_and_the_tokenizer(shared, tiny_tokenizer_dir, tmp_path):
    report, chart, tokenizer = tmp_path / "report.json", tmp_path / "chart.png", tmp_path / "tokenizer"
    evaluate = ["--model_path", str(shared["ckpt"]), "--model_type", "sft", "--test_data_path", str(shared["sft"]),
                "--max_new_tokens", "2", "--no_progress", "--output", str(report), "--plot", str(chart)]
    assert evaluator.main(evaluate) == 0
    ByteLevelBPETokenizer.from_pretrained(tiny_tokenizer_dir).save(tokenizer)
    before = snapshot(tmp_path)
    assert_no_space_line(run_on_a_full_disk(1_000, "evaluator", evaluate), report)  # the report is over 1 KB
    size = report.stat().st_size + 100  # room for the report, not for the chart
    assert_no_space_line(run_on_a_full_disk(size, "evaluator", evaluate), chart)
    result = run_on_a_full_disk(4_000, "byte_level_bpe", ["--input", str(shared["text"]), "--vocab_size", "400",
                                                          "--output", str(tokenizer)])
    assert_no_space_line(result, tokenizer)
    assert snapshot(tmp_path) == before



def _safetensors_fills_the_disk(tensors, path, *args, **kwargs):
    Path(path).write_bytes(b"half of the weights")
    raise SafetensorError(SAFETENSORS_WRITE_FAILURE)


def _gguf_fills_the_disk(writer, *args, **kwargs):
    raise OSError(NUMPY_SHORT_WRITE)


def _json_fills_the_disk(path, obj):
    raise OSError(errno.ENOSPC, "No space left on device")


EXPORT_ON_A_FULL_DISK = [  # (format, output name, the writer that runs out of room, and how, an earlier export there)
    ("hf", "hf", "safetensors.torch.save_file", _safetensors_fills_the_disk, True),
    ("hf", "hf", "safetensors.torch.save_file", _safetensors_fills_the_disk, False),
    ("hf", "hf", "inference.export.write_json", _json_fills_the_disk, True),
    ("gguf", "m.gguf", "gguf.GGUFWriter.write_tensors_to_file", _gguf_fills_the_disk, True),
    ("gguf", "m.gguf", "gguf.GGUFWriter.write_tensors_to_file", _gguf_fills_the_disk, False),
]


@pytest.mark.parametrize("fmt, name, writer, failure, earlier", EXPORT_ON_A_FULL_DISK,
                         ids=[f"{c[0]}-{c[2].rsplit('.', 1)[1]}-{'over an export' if c[4] else 'new'}"
                              for c in EXPORT_ON_A_FULL_DISK])
def test_an_export_on_a_full_disk_is_the_no_space_line_and_the_earlier_files_stay(fmt, name, writer, failure, earlier,
                                                                                   shared, tmp_path, monkeypatch,
                                                                                   capsys):
    """safetensors' own error type and numpy's errno-less short write (under the gguf writer) are a full disk too:
    one `no space left ... intact` line, exit 2, the earlier export byte-identical, no temporary file left."""
    import importlib

    from inference import export

    output = tmp_path / name
    argv = ["--model_path", str(shared["ckpt"]), "--format", fmt, "--output", str(output), "--overwrite"]
    if earlier:
        assert export.main(argv) == 0
    before = snapshot(tmp_path)
    owner, attribute = writer.rsplit(".", 1)
    module, _, cls = owner.rpartition(".") if writer.startswith("gguf.") else (owner, "", "")
    target = getattr(importlib.import_module(module), cls) if cls else importlib.import_module(module)
    monkeypatch.setattr(target, attribute, failure)
    code, err = run_main(export.main, argv, capsys)
    assert_one_line_error(code, err)
    kept = f"the previous {name} is intact" if earlier else f"nothing was replaced, the files already in {tmp_path}"
    assert err.startswith("error: no space left on the device of") and f"writing {output}; {kept}" in err, err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ([name] if earlier else [])


@pytest.mark.slow
@pytest.mark.parametrize("fmt, name", [("hf", "hf"), ("gguf", "m.gguf")])
def test_an_export_past_the_room_left_keeps_the_earlier_export(fmt, name, shared, tmp_path):
    """The same on a real short disk (a file-size limit): the earlier export stays byte-identical."""
    from inference import export

    output = tmp_path / name
    argv = ["--model_path", str(shared["ckpt"]), "--format", fmt, "--output", str(output), "--overwrite"]
    assert export.main(argv) == 0
    before = snapshot(tmp_path)
    assert_no_space_line(run_on_a_full_disk(20_000, "inference.export", argv), output)
    assert snapshot(tmp_path) == before
