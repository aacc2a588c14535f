"""atomic_path: the target is replaced only by a complete write, and no temp file is left behind; a write that runs
out of room (ENOSPC, a file-size limit, torch's serializer failing) is one NoSpaceError and the previous file stays."""
import errno

import pytest
import torch

from atomic_file import NoSpaceError, atomic_directory, atomic_path


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


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     OSError(errno.EFBIG, "File too large"), RuntimeError(TORCH_WRITE_FAILURE)],
                         ids=["ENOSPC", "EFBIG", "torch writer"])
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
    for error in (RuntimeError("a bug"), PermissionError(errno.EACCES, "Permission denied")):
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
