"""atomic_path: the target is replaced only by a complete write, and no temp file is left behind."""
import pytest

from atomic_file import atomic_path


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
