import hashlib

import numpy as np
import pytest

from jaxrec.config import DataConfig, SyntheticConfig
from jaxrec.data import synthetic
from jaxrec.data.sources import load
from jaxrec.data.splits import make_split


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


def _digest(ds, cold) -> str:
  h = hashlib.sha256()
  for array, dtype in ((ds.users, "<i4"), (ds.items, "<i4"), (ds.timestamps, "<i8"), (cold, "?")):
    h.update(np.ascontiguousarray(array, dtype).tobytes())
  h.update("\n".join(ds.item_text).encode())
  h.update("\n".join(ds.item_titles).encode())
  return h.hexdigest()


def test_default_world_never_changes():
  # The README quotes `make demo` numbers on this world: a generator change (an extra rng draw, a
  # new knob whose default is not a no-op) must show up here, not as a silently different demo.
  ds, cold = synthetic.generate(SyntheticConfig())
  assert ds.num_interactions == 31_427
  assert _digest(ds, cold) == "f1a788da8b12689754b4bc8c2d128e651d6dced353aadaaafc1ef413d87ea20c"
  # item_topics is the generator's own first draw: the category feature copies it for half the
  # items (and matches by chance for 1/16 of the rest), where an unrelated draw would match 1/16.
  agree = (synthetic.item_topics(SyntheticConfig()) + 1 == ds.item_features["category"][:, 0]).mean()
  assert 0.45 < agree < 0.6


def _next_topic_hit_rates(drift: float) -> dict[str, float]:
  """How often each guess names the topic of a user's leave-one-out test item.

  Order-aware guesses read the item just before the test one (loo's valid item): ``last`` (its
  topic again) and ``successor`` (the next topic on the drift ring). Bag guesses read only the
  counts of the user's topics over everything before the test item: ``mode`` and its successor.
  """
  world = SyntheticConfig(num_users=600, num_items=400, cold_item_fraction=0.0, topic_drift=drift)
  ds, _ = synthetic.generate(world)
  split = make_split(ds, DataConfig(split="loo"))
  n = world.num_topics
  topic = synthetic.item_topics(world)
  target, last = np.empty(ds.num_users, np.int64), np.empty(ds.num_users, np.int64)
  target[ds.users[split.test]] = topic[ds.items[split.test]]
  last[ds.users[split.valid]] = topic[ds.items[split.valid]]
  before = np.concatenate([split.train, split.valid])
  counts_UxT = np.bincount(ds.users[before] * n + topic[ds.items[before]], minlength=ds.num_users * n).reshape(-1, n)
  mode = counts_UxT.argmax(axis=1)
  assert len(split.test) == len(split.valid) == ds.num_users  # each user has one of each
  return {"successor": float(np.mean(target == synthetic.successor(last, n))), "last": float(np.mean(target == last)),
          "mode": float(np.mean(target == mode)), "mode_successor": float(np.mean(target == synthetic.successor(mode, n)))}


def test_topic_drift_puts_the_signal_in_the_order():
  # Without drift the next topic is the current one again (users keep a topic with chance 0.6 a
  # step) or a fresh draw from their preferences; its successor is right about 1 time in 20.
  still = _next_topic_hit_rates(0.0)
  assert still["successor"] < 0.06 and still["last"] > 0.55
  # With drift 0.5 the successor of the last item's topic is the best single guess, over twice
  # as often right as anything the bag of the same user's topics can name.
  drifting = _next_topic_hit_rates(0.5)
  bag_best = max(drifting["mode"], drifting["mode_successor"])
  assert drifting["successor"] > 0.4 and drifting["successor"] > drifting["last"]
  assert drifting["successor"] > 2 * bag_best, drifting


def test_topic_drift_is_seeded_and_checked():
  world = SyntheticConfig(num_users=50, num_items=40, topic_drift=0.3)
  a, _ = synthetic.generate(world)
  b, _ = synthetic.generate(world)
  still, _ = synthetic.generate(SyntheticConfig(num_users=50, num_items=40))
  np.testing.assert_array_equal(a.items, b.items)
  assert not np.array_equal(a.items, still.items) and a.item_text == still.item_text  # only the walks change
  with pytest.raises(ValueError, match=r"topic_drift must be in \[0, 1\]; got 1.5"):
    synthetic.generate(SyntheticConfig(topic_drift=1.5))
