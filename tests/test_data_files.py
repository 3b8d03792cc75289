"""Predefined split files: a run uses exactly the split written by a peer library."""

from pathlib import Path

import numpy as np
import pytest

from jaxrec.config import DataConfig
from jaxrec.data import sources
from jaxrec.data.parsing import DataError
from jaxrec.data.splits import describe, make_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def peer_split():
  """An ML-100K split as a peer library would write it: raw ids per part."""
  path = SHARED / "ml-100k"
  assert path.is_dir(), f"shared data missing: {path}"
  dataset, split = sources.load(DataConfig(source="ml100k", path=str(path), split_seed=7))
  parts = {}
  for name in ("train", "valid", "test"):
    rows = getattr(split, name)
    parts[name] = (dataset.user_raw_ids[dataset.users[rows]], dataset.item_raw_ids[dataset.items[rows]],
                   dataset.timestamps[rows])
  return dataset, parts


def _pairs(dataset, rows):
  return sorted(zip(dataset.user_raw_ids[dataset.users[rows]].tolist(), dataset.item_raw_ids[dataset.items[rows]].tolist()))


def test_tsv_split_is_used_exactly(tmp_path, peer_split):
  ml, parts = peer_split
  for name, (users, items, _) in parts.items():
    lines = ["user_id:token\titem_id:token"] + [f"{u}\t{i}" for u, i in zip(users, items)]
    (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
  with open(tmp_path / "items.tsv", "w", encoding="utf-8") as f:
    f.write("item_id\ttitle\ttext\n")
    for raw, title, text in zip(ml.item_raw_ids, ml.item_titles, ml.item_text):
      f.write(f"{raw}\t{title}\t{text}\n")
  dataset, split = sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (943, 1_682, 100_000)
  assert dataset.item_raw_ids.dtype == np.int64 and not dataset.has_time
  for name in ("train", "valid", "test"):
    expected = sorted(zip(parts[name][0].tolist(), parts[name][1].tolist()))
    assert _pairs(dataset, getattr(split, name)) == expected
  index = int(np.searchsorted(dataset.item_raw_ids, 543))
  assert dataset.item_titles[index] == "Misérables, Les (1995)"
  assert split.protocol.startswith("predefined files")
  counts = describe(dataset, split)
  assert (counts["data/train"], counts["data/valid"], counts["data/test"]) == (len(parts["train"][0]),
                                                                                len(parts["valid"][0]), len(parts["test"][0]))


def test_npz_with_time_and_test_only_items_are_cold(tmp_path):
  np.savez(tmp_path / "train.npz", user=np.array(["a", "a", "b"]), item=np.array(["x", "y", "x"]), timestamp=np.array([1, 2, 3]))
  np.savez(tmp_path / "test.npz", user=np.array(["a", "b"]), item=np.array(["z", "y"]), timestamp=np.array([5, 6]))
  dataset, split = sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  assert dataset.has_time and dataset.item_raw_ids.tolist() == ["x", "y", "z"] and dataset.item_text == ("x", "y", "z")
  assert split.train.tolist() == [0, 1, 2] and split.valid.tolist() == [] and split.test.tolist() == [3, 4]
  assert split.cold_items.tolist() == [False, False, True]
  np.testing.assert_array_equal(dataset.timestamps, [1, 2, 3, 5, 6])


def test_filters_follow_predefined_rows(tmp_path):
  (tmp_path / "train.tsv").write_text("1\t1\n1\t2\n2\t1\n2\t2\n3\t9\n")
  (tmp_path / "test.tsv").write_text("1\t3\n2\t3\n3\t3\n")
  dataset, split = sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined", kcore=2))
  # Item 9 has one interaction, then user 3 has one: both go; rows of users 1-2 keep their part.
  assert dataset.user_raw_ids.tolist() == [1, 2] and dataset.item_raw_ids.tolist() == [1, 2, 3]
  assert _pairs(dataset, split.test) == [(1, 3), (2, 3)]
  assert len(split.train) == 4 and split.cold_items.tolist() == [False, False, True]


def test_missing_and_malformed_files(tmp_path):
  (tmp_path / "train.tsv").write_text("1\t2\n")
  with pytest.raises(DataError, match=r"test\.npz: expected test\.npz or test\.tsv .*no such file"):
    sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  (tmp_path / "test.tsv").write_text("user\titem\n1\t2\n3\t4\nuser\titem\n5\t6\n")
  with pytest.raises(DataError, match=r"test\.tsv, line 4: .*duplicate header line 'user\\titem'"):
    sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  (tmp_path / "test.tsv").write_text("1\t2\n3 4\n")
  with pytest.raises(DataError, match=r"test\.tsv, line 2: expected 2 tab-separated fields .*1 field\(s\) in '3 4'"):
    sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  (tmp_path / "test.tsv").write_text("1\t2\n")
  np.savez(tmp_path / "valid.npz", users=np.array([1]))
  with pytest.raises(DataError, match=r"valid\.npz: expected arrays 'user' and 'item'.*\['users'\]"):
    sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  with pytest.raises(DataError, match="no such directory"):
    sources.load(DataConfig(source="files", path=str(tmp_path / "nope"), split="predefined"))


def test_predefined_needs_files_source():
  path = SHARED / "ml-100k"
  with pytest.raises(ValueError, match="data.split=predefined needs data.source=files"):
    sources.load(DataConfig(source="ml100k", path=str(path), split="predefined"))
