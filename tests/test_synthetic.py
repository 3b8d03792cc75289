import numpy as np

from jaxrec.config import DataConfig, SyntheticConfig
from jaxrec.data import synthetic
from jaxrec.data.sources import load


def test_deterministic_for_a_seed_and_different_across_seeds():
  a, cold_a = synthetic.generate(SyntheticConfig(num_users=50, num_items=40, seed=3))
  b, cold_b = synthetic.generate(SyntheticConfig(num_users=50, num_items=40, seed=3))
  c, _ = synthetic.generate(SyntheticConfig(num_users=50, num_items=40, seed=4))
  np.testing.assert_array_equal(a.users, b.users)
  np.testing.assert_array_equal(a.items, b.items)
  np.testing.assert_array_equal(a.timestamps, b.timestamps)
  np.testing.assert_array_equal(cold_a, cold_b)
  assert a.item_text == b.item_text
  assert a.item_text != c.item_text or not np.array_equal(a.items, c.items)


def test_world_shape_and_text():
  cfg = SyntheticConfig(num_users=80, num_items=60, num_topics=5, cold_item_fraction=0.2)
  ds, cold = synthetic.generate(cfg)
  assert ds.num_users == 80 and ds.num_items == 60
  assert cold.sum() == 12
  assert len(set(ds.item_text)) == 60  # every item has its own description
  assert all(len(t.split()) >= 8 for t in ds.item_text)
  for u in range(ds.num_users):  # each user's interactions are time-ordered and without repeats
    mine = ds.users == u
    assert np.all(np.diff(ds.timestamps[mine]) > 0)
    assert len(np.unique(ds.items[mine])) == mine.sum()
  assert set(ds.item_features) == {"category", "format"} and ds.item_features["category"].shape == (60, 1)


def test_cold_items_never_train_and_are_all_tested():
  cfg = DataConfig(synthetic=SyntheticConfig(num_users=200, num_items=100, cold_item_fraction=0.2))
  ds, split = load(cfg)
  assert split.cold_items.sum() == 20
  assert not split.cold_items[ds.items[split.train]].any()
  assert not split.cold_items[ds.items[split.valid]].any()
  cold_interactions = np.flatnonzero(split.cold_items[ds.items])
  assert len(cold_interactions) > 0
  assert np.isin(cold_interactions, split.test).all()
  everything = np.concatenate([split.train, split.valid, split.test])
  assert len(everything) == ds.num_interactions and len(np.unique(everything)) == ds.num_interactions
