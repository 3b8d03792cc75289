import numpy as np

from jaxrec.config import DataConfig, SyntheticConfig
from jaxrec.data.pipeline import BatchBuilder, Sequences, item_log_q, train_batches
from jaxrec.data.sources import load


def _setup():
  ds, split = load(DataConfig(synthetic=SyntheticConfig(num_users=60, num_items=40, num_topics=4)))
  seqs = Sequences.from_interactions(ds, split.train)
  return ds, split, seqs, item_log_q(ds.items[split.train], ds.num_items)


def test_history_is_the_users_previous_training_items_in_time_order():
  ds, split, seqs, _ = _setup()
  pos = np.arange(len(seqs))
  hist, mask = seqs.history_before(pos, 3)
  for p in pos[:200]:
    u = seqs.user[p]
    mine = split.train[ds.users[split.train] == u]
    mine = mine[np.lexsort((mine, ds.timestamps[mine]))]
    k = p - seqs.start[u]
    assert ds.items[mine[k]] == seqs.items[p]
    want = ds.items[mine[max(0, k - 3):k]]
    got = hist[p][mask[p]]
    np.testing.assert_array_equal(got, want)
    assert np.all(hist[p][~mask[p]] == -1)


def test_batch_is_a_pure_function_of_seed_and_index_and_processes_split_it():
  _, _, seqs, log_q = _setup()
  whole = BatchBuilder(seqs, log_q, 16, 4, seed=7)
  again = BatchBuilder(seqs, log_q, 16, 4, seed=7)
  other = BatchBuilder(seqs, log_q, 16, 4, seed=8)
  for b in (0, 3, 40):  # 40 crosses several epochs
    a, c = whole.map(b), again.map(b)
    for key in a:
      np.testing.assert_array_equal(a[key], c[key])
  assert not np.array_equal(whole.map(0)["item"], other.map(0)["item"])
  halves = [BatchBuilder(seqs, log_q, 16, 4, seed=7, process_index=i, process_count=2).map(5) for i in range(2)]
  full = whole.map(5)
  for key in full:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
  np.testing.assert_allclose(full["log_q"], log_q[full["item"]])


def test_each_epoch_visits_every_example_once():
  _, _, seqs, log_q = _setup()
  n = len(seqs)
  builder = BatchBuilder(seqs, log_q, 8, 2, seed=0)
  positions = np.concatenate([builder.positions(b) for b in range(n // 8)])
  assert len(np.unique(positions)) == len(positions)


def test_grain_iterator_state_resumes_exactly():
  _, _, seqs, log_q = _setup()
  builder = BatchBuilder(seqs, log_q, 8, 3, seed=1)
  it = iter(train_batches(builder, 0, 10))
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it)["item"] for _ in range(3)]
  resumed = iter(train_batches(builder, 0, 10))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["item"], want)
