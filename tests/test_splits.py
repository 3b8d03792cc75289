"""Split protocols on the ML-100K-format fixture (and the real ML-100K with JAXREC_DATA): no
leakage, cold items never trained on, leave-one-out and the temporal ratio split in time order;
filters and the counts every run records."""

import dataclasses
import json

import numpy as np
import pytest

from fixtures.data_roots import fixture_path, full_data_path
from jaxrec.config import DataConfig
from jaxrec.data import filters, sources
from jaxrec.data.dataset import Dataset
from jaxrec.data.parsing import DataError
from jaxrec.data.splits import _ratio_counts, describe, make_split


def _fixture_cfg(**kw) -> DataConfig:
  return DataConfig(source="ml100k", path=fixture_path("ml-100k"), **kw)


def _full_cfg(**kw) -> DataConfig:
  return DataConfig(source="ml100k", path=full_data_path("ml-100k"), **kw)


@pytest.fixture(scope="module")
def ml100k():
  return sources.load(_fixture_cfg())[0]


@pytest.fixture(scope="module")
def ml100k_full():
  return sources.load(_full_cfg())[0]


def _pairs(dataset, rows):
  return set(zip(dataset.users[rows].tolist(), dataset.items[rows].tolist()))


def _check_random_split(dataset, cfg):
  """A partition with RecBole's per-user counts, no pair in two parts, a pure function of the seed."""
  split = make_split(dataset, cfg)
  all_rows = np.concatenate([split.train, split.valid, split.test])
  np.testing.assert_array_equal(np.sort(all_rows), np.arange(dataset.num_interactions))
  assert not _pairs(dataset, split.test) & _pairs(dataset, split.train)
  assert not _pairs(dataset, split.valid) & _pairs(dataset, split.train)
  per_user = np.bincount(dataset.users, minlength=dataset.num_users)
  expected = np.array([_ratio_counts(int(n), (0.8, 0.1, 0.1)) for n in per_user])
  for part, column in ((split.train, 0), (split.valid, 1), (split.test, 2)):
    np.testing.assert_array_equal(np.bincount(dataset.users[part], minlength=dataset.num_users), expected[:, column])
  again = make_split(dataset, cfg)
  np.testing.assert_array_equal(again.test, split.test)
  return split


def test_random_split_is_a_partition_with_recbole_counts(ml100k):
  split = _check_random_split(ml100k, _fixture_cfg())
  assert (len(split.train), len(split.valid), len(split.test)) == (485, 46, 46)


def test_full_random_split_counts(ml100k_full):
  split = _check_random_split(ml100k_full, _full_cfg())
  assert (len(split.train), len(split.valid), len(split.test)) == (80_808, 9_596, 9_596)


def test_ratio_counts_match_recbole():
  assert _ratio_counts(20, (0.8, 0.1, 0.1)) == [16, 2, 2]
  assert _ratio_counts(9, (0.8, 0.1, 0.1)) == [7, 1, 1]  # a part that floors to 0 still takes one
  assert _ratio_counts(2, (0.8, 0.1, 0.1)) == [1, 0, 1]
  assert _ratio_counts(5, (0.8, 0.1, 0.1)) == [3, 1, 1]


def _check_cold_items(dataset, cfg):
  split = make_split(dataset, cfg)
  cold_rows = np.flatnonzero(split.cold_items[dataset.items])
  assert not split.cold_items[dataset.items[split.train]].any()
  assert not split.cold_items[dataset.items[split.valid]].any()
  np.testing.assert_array_equal(np.intersect1d(cold_rows, split.test), cold_rows)  # all kept for evaluation
  assert not _pairs(dataset, split.test) & _pairs(dataset, split.train)
  counts = describe(dataset, split)
  assert counts["data/cold_items"] == split.cold_items.sum() and counts["data/cold_test"] == len(cold_rows)
  assert counts["data/train"] + counts["data/valid"] + counts["data/test"] == dataset.num_interactions
  return split, counts


def test_cold_items_have_no_training_interactions(ml100k):
  split, counts = _check_cold_items(ml100k, _fixture_cfg(cold_item_fraction=0.1))
  assert ml100k.item_raw_ids[split.cold_items].tolist() == [3, 9, 27, 29, 44, 56]  # round(0.1 * 60) items
  assert counts["data/cold_test"] == 71 and "6 cold items held out" in counts["data/protocol"]


def test_full_cold_items(ml100k_full):
  split, counts = _check_cold_items(ml100k_full, _full_cfg(cold_item_fraction=0.1))
  assert split.cold_items.sum() == 168 and "168 cold items held out" in counts["data/protocol"]


def _check_leave_one_out(dataset, cfg):
  """Every user (all have >= 3 interactions) gives its last to test and the one before to valid."""
  users = dataset.num_users
  split = make_split(dataset, cfg)
  assert len(split.test) == len(split.valid) == users
  np.testing.assert_array_equal(np.bincount(dataset.users[split.test], minlength=users), np.ones(users))
  np.testing.assert_array_equal(np.bincount(dataset.users[split.valid], minlength=users), np.ones(users))
  last_train = np.full(users, -1)
  np.maximum.at(last_train, dataset.users[split.train], dataset.timestamps[split.train])
  valid_time = np.empty(users, np.int64)
  valid_time[dataset.users[split.valid]] = dataset.timestamps[split.valid]
  test_time = np.empty(users, np.int64)
  test_time[dataset.users[split.test]] = dataset.timestamps[split.test]
  assert (last_train <= valid_time).all() and (valid_time <= test_time).all()
  assert len(split.train) == dataset.num_interactions - 2 * users
  assert not _pairs(dataset, split.test) & _pairs(dataset, split.train)
  return split


def test_leave_one_out_in_time_order(ml100k):
  split = _check_leave_one_out(ml100k, _fixture_cfg(split="loo"))
  assert (len(split.train), len(split.valid), len(split.test)) == (517, 30, 30)


def test_full_leave_one_out(ml100k_full):
  split = _check_leave_one_out(ml100k_full, _full_cfg(split="loo"))
  assert len(split.test) == 943 and len(split.train) == 100_000 - 2 * 943


def test_leave_one_out_ties_follow_file_order():
  dataset = Dataset(name="ties", users=np.zeros(4, np.int32), items=np.arange(4, dtype=np.int32),
                    timestamps=np.array([5, 7, 7, 1]), item_text=("a", "b", "c", "d"), item_titles=("a", "b", "c", "d"),
                    item_raw_ids=np.arange(4), user_raw_ids=np.arange(1)).validate()
  split = make_split(dataset, DataConfig(split="loo"))
  assert (split.train.tolist(), split.valid.tolist(), split.test.tolist()) == ([0, 3], [1], [2])


def test_leave_one_out_refuses_file_order_time():
  with pytest.raises(ValueError, match="needs timestamps"):  # the ML-1M pairs file has no time
    sources.load(DataConfig(source="ml1m", path=fixture_path("ml-1m"), split="loo"))


def test_min_rating_and_kcore_counts():
  dataset, split = sources.load(_fixture_cfg(min_rating=4))
  assert dataset.num_interactions == 168 + 131
  assert dataset.num_items == 60  # the catalog stays
  assert split.protocol.startswith("rating>=4; random")
  dataset, split = sources.load(_fixture_cfg(min_rating=4, kcore=5, split="loo"))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (187, 23, 26)
  assert np.bincount(dataset.users).min() == 5 and np.bincount(dataset.items).min() == 5
  assert split.protocol == "rating>=4, 5-core; temporal leave-one-out"


def test_full_min_rating_and_kcore_counts():
  dataset, _ = sources.load(_full_cfg(min_rating=4))
  assert dataset.num_interactions == 34_174 + 21_201 and dataset.num_items == 1_682
  dataset, split = sources.load(_full_cfg(min_rating=4, kcore=5, split="loo"))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (54_413, 938, 1_008)
  assert np.bincount(dataset.users).min() >= 5 and np.bincount(dataset.items).min() >= 5


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


def _check_train_fraction(dataset, cfg):
  full = make_split(dataset, cfg)
  half = make_split(dataset, dataclasses.replace(cfg, train_fraction=0.5))
  assert set(half.train.tolist()) <= set(full.train.tolist())
  np.testing.assert_array_equal(half.test, full.test)
  return len(full.train), len(half.train)


def test_train_fraction_keeps_a_seeded_share(ml100k):
  full, half = _check_train_fraction(ml100k, _fixture_cfg())
  assert full == 485 and abs(half - full / 2) < 45  # 4 standard deviations of Binomial(485, 0.5)


def test_full_train_fraction(ml100k_full):
  full, half = _check_train_fraction(ml100k_full, _full_cfg())
  assert full == 80_808 and abs(half - 40_404) < 600


def _check_describe(dataset, cfg):
  split = make_split(dataset, cfg)
  counts = describe(dataset, split)
  assert json.loads(json.dumps(counts)) == counts
  assert counts["data/density"] == pytest.approx(dataset.num_interactions / (dataset.num_users * dataset.num_items))
  keys = ("data/users", "data/items", "data/interactions", "data/train", "data/valid", "data/test", "data/cold_items")
  return tuple(counts[k] for k in keys)


def test_describe_is_flat_json(ml100k):
  assert _check_describe(ml100k, _fixture_cfg()) == (30, 60, 577, 485, 46, 46, 0)


def test_full_describe(ml100k_full):
  assert _check_describe(ml100k_full, _full_cfg()) == (943, 1_682, 100_000, 80_808, 9_596, 9_596, 0)


def _timed(users, times) -> Dataset:
  """A hand-built dataset: one item per interaction, so a row's item names the row."""
  n = len(users)
  names = tuple(f"i{k}" for k in range(n))
  return Dataset(name="timed", users=np.asarray(users, np.int32), items=np.arange(n, dtype=np.int32),
                 timestamps=np.asarray(times, np.int64), item_text=names, item_titles=names,
                 item_raw_ids=np.arange(n), user_raw_ids=np.arange(max(users) + 1)).validate()


def test_temporal_split_exact_rows():
  # u0: 10 rows stored newest first (times 100..10); u1: 3 rows with a tie at 5 (file order
  # breaks it: row 10 before row 12); u2: 2 rows; u3: 1 row; u4: 4 rows interleaved in the file.
  users = [0] * 10 + [1, 1, 1, 2, 2, 3, 4, 4, 4, 4]
  times = list(range(100, 0, -10)) + [5, 9, 5, 7, 3, 1, 40, 10, 30, 20]
  dataset = _timed(users, times)
  split = make_split(dataset, DataConfig(split="temporal"))
  # u0 (n=10): 8/1/1 -> oldest 8 (rows 9..2) train, row 1 (time 90) valid, row 0 (time 100) test.
  # u1 (n=3): 1/1/1 in time order 10 (t5), 12 (t5), 11 (t9). u2 (n=2): 1/0/1, the earlier (14) trains.
  # u3 (n=1): its only row trains. u4 (n=4): 2/1/1 in time order 17, 19, 18, 16.
  assert split.train.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 17, 19]
  assert split.valid.tolist() == [1, 12, 18]
  assert split.test.tolist() == [0, 11, 13, 16]
  assert split.protocol == "temporal 0.8:0.1:0.1 per user"
  other = make_split(dataset, DataConfig(split="temporal", split_ratios=(0.5, 0.25, 0.25)))
  # u0 (n=10): floors 2/2, train 6 -> rows 9..4 train, 3 and 2 valid, 1 and 0 test.
  assert other.test.tolist()[:2] == [0, 1] and other.valid.tolist()[:2] == [2, 3]
  assert other.protocol == "temporal 0.5:0.25:0.25 per user"


def test_temporal_split_refuses_file_order_time():
  dataset = dataclasses.replace(_timed([0, 0, 0], [1, 2, 3]), has_time=False)
  with pytest.raises(ValueError, match="data.split=temporal needs timestamps, but dataset 'timed' has none"):
    make_split(dataset, DataConfig(split="temporal"))
  with pytest.raises(ValueError, match="needs timestamps"):  # the ML-1M pairs file has no time
    sources.load(DataConfig(source="ml1m", path=fixture_path("ml-1m"), split="temporal"))


def _check_temporal(dataset, split):
  """A partition; each user's train all no later than their valid, valid no later than test."""
  all_rows = np.concatenate([split.train, split.valid, split.test])
  np.testing.assert_array_equal(np.sort(all_rows), np.arange(dataset.num_interactions))
  users = dataset.num_users
  last_train = np.full(users, np.iinfo(np.int64).min)
  np.maximum.at(last_train, dataset.users[split.train], dataset.timestamps[split.train])
  first_valid, first_test = np.full(users, np.iinfo(np.int64).max), np.full(users, np.iinfo(np.int64).max)
  np.minimum.at(first_valid, dataset.users[split.valid], dataset.timestamps[split.valid])
  np.minimum.at(first_test, dataset.users[split.test], dataset.timestamps[split.test])
  assert (last_train <= first_valid).all() and (last_train <= first_test).all()
  last_valid = np.full(users, np.iinfo(np.int64).min)
  np.maximum.at(last_valid, dataset.users[split.valid], dataset.timestamps[split.valid])
  assert (last_valid <= first_test).all()
  per_user = np.bincount(dataset.users, minlength=users)
  expected = np.array([_ratio_counts(int(n), (0.8, 0.1, 0.1)) for n in per_user])
  for part, column in ((split.train, 0), (split.valid, 1), (split.test, 2)):
    np.testing.assert_array_equal(np.bincount(dataset.users[part], minlength=users), expected[:, column])


def test_temporal_split_on_the_fixture(ml100k):
  split = make_split(ml100k, _fixture_cfg(split="temporal"))
  _check_temporal(ml100k, split)
  assert (len(split.train), len(split.valid), len(split.test)) == (485, 46, 46)  # the random split's counts
  assert not _pairs(ml100k, split.test) & _pairs(ml100k, split.train)


def test_temporal_and_loo_on_the_synthetic_world():
  from jaxrec.config import SyntheticConfig
  from jaxrec.data import synthetic

  # Per user, valid and test take floor(0.1 n) (at least one): with ~20 interactions a user that
  # has 19 gives 17/1/1, so over the default world train holds 85%, not 80%. Longer histories
  # bring the shares to 8:1:1.
  for per_user, shares_expected, atol in ((24, (0.85, 0.075, 0.075), 0.005), (100, (0.8, 0.1, 0.1), 0.02)):
    world = SyntheticConfig(num_users=300, num_items=400, cold_item_fraction=0.0, interactions_per_user=per_user)
    dataset, _ = synthetic.generate(world)
    split = make_split(dataset, DataConfig(split="temporal", synthetic=world))
    _check_temporal(dataset, split)
    assert len(np.unique(dataset.users[split.test])) == 300  # every synthetic user has >= 3 interactions
    shares = np.array([len(split.train), len(split.valid), len(split.test)]) / dataset.num_interactions
    np.testing.assert_allclose(shares, shares_expected, atol=atol)
  assert (len(split.train), len(split.valid), len(split.test)) == (14_516, 1_650, 1_650)

  # Through the loader, with the world's own cold items moved to test as for every split.
  cfg = DataConfig(split="temporal", synthetic=SyntheticConfig(num_users=300, num_items=200))
  dataset, split = sources.load(cfg)
  assert not split.cold_items[dataset.items[split.train]].any()
  assert not split.cold_items[dataset.items[split.valid]].any()
  assert np.isin(np.flatnonzero(split.cold_items[dataset.items]), split.test).all()
  assert split.protocol == "temporal 0.8:0.1:0.1 per user, 20 cold items held out"
  dataset, split = sources.load(dataclasses.replace(cfg, split="loo"))
  assert split.protocol == "temporal leave-one-out, 20 cold items held out"
  assert not split.cold_items[dataset.items[split.train]].any()
