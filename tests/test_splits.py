"""Split protocols on real ML-100K: no leakage, cold items never trained on, leave-one-out in
time order; filters and the counts every run records."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from jaxrec.config import DataConfig
from jaxrec.data import filters, sources
from jaxrec.data.dataset import Dataset
from jaxrec.data.parsing import DataError
from jaxrec.data.splits import _ratio_counts, describe, make_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _cfg(**kw) -> DataConfig:
  path = SHARED / "ml-100k"
  assert path.is_dir(), f"shared data missing: {path}"
  return DataConfig(source="ml100k", path=str(path), **kw)


@pytest.fixture(scope="module")
def ml100k():
  return sources.load(_cfg())[0]


def _pairs(dataset, rows):
  return set(zip(dataset.users[rows].tolist(), dataset.items[rows].tolist()))


def test_random_split_is_a_partition_with_recbole_counts(ml100k):
  split = make_split(ml100k, _cfg())
  all_rows = np.concatenate([split.train, split.valid, split.test])
  np.testing.assert_array_equal(np.sort(all_rows), np.arange(100_000))
  assert not _pairs(ml100k, split.test) & _pairs(ml100k, split.train)
  assert not _pairs(ml100k, split.valid) & _pairs(ml100k, split.train)
  per_user = np.bincount(ml100k.users, minlength=ml100k.num_users)
  expected = np.array([_ratio_counts(int(n), (0.8, 0.1, 0.1)) for n in per_user])
  for part, column in ((split.train, 0), (split.valid, 1), (split.test, 2)):
    np.testing.assert_array_equal(np.bincount(ml100k.users[part], minlength=ml100k.num_users), expected[:, column])
  assert (len(split.train), len(split.valid), len(split.test)) == (80_808, 9_596, 9_596)
  again = make_split(ml100k, _cfg())
  np.testing.assert_array_equal(again.test, split.test)  # a pure function of split_seed


def test_ratio_counts_match_recbole():
  assert _ratio_counts(20, (0.8, 0.1, 0.1)) == [16, 2, 2]
  assert _ratio_counts(9, (0.8, 0.1, 0.1)) == [7, 1, 1]  # a part that floors to 0 still takes one
  assert _ratio_counts(2, (0.8, 0.1, 0.1)) == [1, 0, 1]
  assert _ratio_counts(5, (0.8, 0.1, 0.1)) == [3, 1, 1]


def test_cold_items_have_no_training_interactions(ml100k):
  split = make_split(ml100k, _cfg(cold_item_fraction=0.1))
  assert split.cold_items.sum() == 168
  cold_rows = np.flatnonzero(split.cold_items[ml100k.items])
  assert not split.cold_items[ml100k.items[split.train]].any()
  assert not split.cold_items[ml100k.items[split.valid]].any()
  np.testing.assert_array_equal(np.intersect1d(cold_rows, split.test), cold_rows)  # all kept for evaluation
  assert not _pairs(ml100k, split.test) & _pairs(ml100k, split.train)
  counts = describe(ml100k, split)
  assert counts["data/cold_items"] == 168 and counts["data/cold_test"] == len(cold_rows)
  assert counts["data/train"] + counts["data/valid"] + counts["data/test"] == 100_000
  assert "168 cold items held out" in counts["data/protocol"]


def test_leave_one_out_in_time_order(ml100k):
  split = make_split(ml100k, _cfg(split="loo"))
  assert len(split.test) == len(split.valid) == 943  # every ML-100K user has >= 20 ratings
  np.testing.assert_array_equal(np.bincount(ml100k.users[split.test], minlength=943), np.ones(943))
  np.testing.assert_array_equal(np.bincount(ml100k.users[split.valid], minlength=943), np.ones(943))
  last_train = np.full(943, -1)
  np.maximum.at(last_train, ml100k.users[split.train], ml100k.timestamps[split.train])
  valid_time = np.empty(943, np.int64)
  valid_time[ml100k.users[split.valid]] = ml100k.timestamps[split.valid]
  test_time = np.empty(943, np.int64)
  test_time[ml100k.users[split.test]] = ml100k.timestamps[split.test]
  assert (last_train <= valid_time).all() and (valid_time <= test_time).all()
  assert len(split.train) == 100_000 - 2 * 943
  assert not _pairs(ml100k, split.test) & _pairs(ml100k, split.train)


def test_leave_one_out_ties_follow_file_order():
  dataset = Dataset(name="ties", users=np.zeros(4, np.int32), items=np.arange(4, dtype=np.int32),
                    timestamps=np.array([5, 7, 7, 1]), item_text=("a", "b", "c", "d"), item_titles=("a", "b", "c", "d"),
                    item_raw_ids=np.arange(4), user_raw_ids=np.arange(1)).validate()
  split = make_split(dataset, DataConfig(split="loo"))
  assert (split.train.tolist(), split.valid.tolist(), split.test.tolist()) == ([0, 3], [1], [2])


def test_leave_one_out_refuses_file_order_time():
  path = SHARED / "ml-1m"
  assert path.is_dir()
  with pytest.raises(ValueError, match="needs timestamps"):
    sources.load(DataConfig(source="ml1m", path=str(path), split="loo"))


def test_min_rating_and_kcore_counts():
  dataset, split = sources.load(_cfg(min_rating=4))
  assert dataset.num_interactions == 34_174 + 21_201
  assert dataset.num_items == 1_682  # the catalog stays
  assert split.protocol.startswith("rating>=4; random")
  dataset, split = sources.load(_cfg(min_rating=4, kcore=5, split="loo"))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (54_413, 938, 1_008)
  assert np.bincount(dataset.users).min() >= 5 and np.bincount(dataset.items).min() >= 5
  assert split.protocol == "rating>=4, 5-core; temporal leave-one-out"


def test_kcore_iterates_to_a_fixed_point():
  # u0: i0 i1 i2; u1: i0 i1; u2: i2. With k=2: u2 goes, then i2 has 1 left and goes,
  # then u0 still has 2 (i0, i1): the 2-core is {u0, u1} x {i0, i1}.
  users = np.array([0, 0, 0, 1, 1, 2], np.int32)
  items = np.array([0, 1, 2, 0, 1, 2], np.int32)
  dataset = Dataset(name="toy", users=users, items=items, timestamps=np.arange(6), item_text=("a", "b", "c"),
                    item_titles=("a", "b", "c"), item_raw_ids=np.array([10, 11, 12]), user_raw_ids=np.array([7, 8, 9]),
                    item_features={"f": np.array([[1], [2], [3]], np.int32)}, item_feature_sizes={"f": 4}).validate()
  core, kept = filters.kcore(dataset, 2, "toy")
  assert kept.tolist() == [0, 1, 3, 4]
  assert core.item_raw_ids.tolist() == [10, 11] and core.user_raw_ids.tolist() == [7, 8]
  assert core.item_features["f"][:, 0].tolist() == [1, 2] and core.item_text == ("a", "b")
  with pytest.raises(DataError, match="toy: expected some interactions left after data.kcore=4"):
    filters.kcore(dataset, 4, "toy")


def test_train_fraction_keeps_a_seeded_share(ml100k):
  full = make_split(ml100k, _cfg())
  half = make_split(ml100k, _cfg(train_fraction=0.5))
  assert set(half.train.tolist()) <= set(full.train.tolist())
  assert abs(len(half.train) - 40_404) < 600
  np.testing.assert_array_equal(half.test, full.test)


def test_describe_is_flat_json(ml100k):
  import json
  counts = describe(ml100k, make_split(ml100k, _cfg()))
  assert json.loads(json.dumps(counts)) == counts
  assert {k: counts[k] for k in ("data/users", "data/items", "data/interactions", "data/train", "data/valid", "data/test",
                                  "data/cold_items")} == {"data/users": 943, "data/items": 1_682, "data/interactions": 100_000,
                                                          "data/train": 80_808, "data/valid": 9_596, "data/test": 9_596,
                                                          "data/cold_items": 0}
  assert counts["data/density"] == pytest.approx(100_000 / (943 * 1_682))
