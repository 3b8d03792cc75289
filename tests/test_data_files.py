"""Predefined split files: a run uses exactly the split written by a peer library."""

import numpy as np
import pytest

from fixtures.data_roots import fixture_path, full_data_path
from jaxrec.config import DataConfig
from jaxrec.data import sources
from jaxrec.data.parsing import DataError
from jaxrec.data.splits import describe


def _pairs(dataset, rows):
  return sorted(zip(dataset.user_raw_ids[dataset.users[rows]].tolist(), dataset.item_raw_ids[dataset.items[rows]].tolist()))


def _round_trip_ml100k_split(tmp_path, ml100k_path: str):
  """Writes an ML-100K split as a peer library would (raw ids per part, RecBole's header, an
  items.tsv of titles and text) and loads it back with data.split=predefined."""
  ml, split = sources.load(DataConfig(source="ml100k", path=ml100k_path, split_seed=7))
  parts = {name: getattr(split, name) for name in ("train", "valid", "test")}
  for name, rows in parts.items():
    users, items = ml.user_raw_ids[ml.users[rows]], ml.item_raw_ids[ml.items[rows]]
    lines = ["user_id:token\titem_id:token"] + [f"{u}\t{i}" for u, i in zip(users, items)]
    (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
  with open(tmp_path / "items.tsv", "w", encoding="utf-8") as f:
    f.write("item_id\ttitle\ttext\n")
    for raw, title, text in zip(ml.item_raw_ids, ml.item_titles, ml.item_text):
      f.write(f"{raw}\t{title}\t{text}\n")
  dataset, loaded = sources.load(DataConfig(source="files", path=str(tmp_path), split="predefined"))
  assert dataset.item_raw_ids.dtype == np.int64 and not dataset.has_time
  for name, rows in parts.items():
    assert _pairs(dataset, getattr(loaded, name)) == _pairs(ml, rows)
  assert loaded.protocol.startswith("predefined files")
  counts = describe(dataset, loaded)
  assert (counts["data/train"], counts["data/valid"], counts["data/test"]) == tuple(len(r) for r in parts.values())
  return dataset


def test_tsv_split_is_used_exactly(tmp_path):
  dataset = _round_trip_ml100k_split(tmp_path, fixture_path("ml-100k"))
  assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (30, 60, 577)
  assert dataset.item_titles[int(np.searchsorted(dataset.item_raw_ids, 7))] == "Garçon Rêveur, Le (1992)"


def test_full_tsv_split_is_used_exactly(tmp_path):
  dataset = _round_trip_ml100k_split(tmp_path, full_data_path("ml-100k"))
  assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (943, 1_682, 100_000)
  assert dataset.item_titles[int(np.searchsorted(dataset.item_raw_ids, 543))] == "Misérables, Les (1995)"


def test_recbole_style_split_with_time_and_cold_items():
  # tests/fixtures/peer-split: RecBole atomic-file headers, string users, integer items, a
  # timestamp column, and items 124 and 125 only in test.
  dataset, split = sources.load(DataConfig(source="files", path=fixture_path("peer-split"), split="predefined"))
  assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (20, 25, 167)
  assert (len(split.train), len(split.valid), len(split.test)) == (124, 20, 23)
  assert dataset.has_time and dataset.item_raw_ids.dtype == np.int64 and dataset.user_raw_ids.dtype.kind == "U"
  # First data line of train.tsv: u01 101 1600009075.
  assert (dataset.user_raw_ids[dataset.users[0]], dataset.item_raw_ids[dataset.items[0]], dataset.timestamps[0]) == (
      "u01", 101, 1_600_009_075)
  assert dataset.item_raw_ids[split.cold_items].tolist() == [124, 125]
  assert split.protocol == "predefined files, 2 cold items held out"
  # items.tsv: 101 has text; 102's text column is empty, so its title stands in.
  assert dataset.item_titles[:2] == ("Wild Voyage Pedal", "Distant Lantern Pedal")
  assert dataset.item_text[:2] == ("Would long but build quiet clip clip but sets but clip.", "Distant Lantern Pedal")
  counts = describe(dataset, split)
  assert (counts["data/cold_items"], counts["data/cold_test"], counts["data/items_without_train"]) == (2, 3, 2)


def test_peer_split_files_under_a_random_split_have_no_cold_items():
  dataset, split = sources.load(DataConfig(source="files", path=fixture_path("peer-split")))
  assert split.cold_items.sum() == 0 and split.protocol == "random 0.8:0.1:0.1 per user"
  assert len(split.train) + len(split.valid) + len(split.test) == 167


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
  with pytest.raises(ValueError, match="data.split=predefined needs data.source=files"):
    sources.load(DataConfig(source="ml100k", path=fixture_path("ml-100k"), split="predefined"))
