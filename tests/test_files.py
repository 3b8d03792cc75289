"""jaxrec.files: a write replaces the whole file or leaves the old one, and never leaves a temporary."""

import errno
import json

import numpy as np
import pytest

from jaxrec import files


def test_writes_bytes_text_and_json_and_replaces_the_old_file(tmp_path):
  path = tmp_path / "new" / "dir" / "out.bin"  # missing parents are created
  files.write_atomically(str(path), b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  files.write_atomically(str(path), "grüße")
  assert path.read_text(encoding="utf-8") == "grüße"
  files.write_json_atomically(str(tmp_path / "m.json"), {"b": np.float32(0.5), "a": 1})
  assert (tmp_path / "m.json").read_text() == '{\n "a": 1,\n "b": 0.5\n}\n'
  assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1, "b": 0.5}
  assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["m.json", "out.bin"]


def test_an_exception_while_writing_keeps_the_old_file(tmp_path):
  path = tmp_path / "cache.npy"
  path.write_bytes(b"old")
  with pytest.raises(ValueError, match="encoder blew up"):
    with files.atomic_file(str(path)) as f:
      f.write(b"half of the new")
      raise ValueError("encoder blew up")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["cache.npy"]


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
  path = tmp_path / "metrics.json"
  path.write_text("old")
  real_open = open

  class FullDisk:
    def __init__(self, file):
      self.file = file

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.file.close()
      return False

    def write(self, data):
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(files, "open", lambda p, mode: FullDisk(real_open(p, mode)), raising=False)
  with pytest.raises(files.FileWriteError) as e:
    files.write_json_atomically(str(path), {"recall@10": 0.25})
  assert str(e.value) == f"could not write {path}: no space left on device (23 bytes to write)"
  assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temporary is gone


def test_an_unwritable_directory_is_one_line_naming_the_file(tmp_path):
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("")
  with pytest.raises(files.FileWriteError, match=f"^could not write {blocker}/stats.json: "):
    files.write_atomically(str(blocker / "stats.json"), "{}")
