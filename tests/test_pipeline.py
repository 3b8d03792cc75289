import numpy as np
import pytest

from jaxrec.config import DataConfig, SyntheticConfig
from jaxrec.batch import BatchLayout
from jaxrec.data import pipeline
from jaxrec.data.pipeline import Sequences, item_log_q, train_batches
from jaxrec.data.sources import load


def BatchBuilder(seqs, log_q, batch_size, history_len, seed, *, unique_capacity=0, row_buckets=(), tokens=None,
                 length_buckets=(), stream_buckets=(), user_weight_power=0.0, mixed_negatives=0, **options):
  """A builder of the layout these arguments describe (the trainer derives it from the config)."""
  layout = BatchLayout(batch_size, history_len, weighted=bool(user_weight_power), unique_capacity=unique_capacity,
                       mixed_negatives=mixed_negatives,
                       row_buckets=row_buckets, text="none" if tokens is None else "stream" if stream_buckets else "rows",
                       token_width=0 if tokens is None else tokens["input_ids"].shape[1],
                       length_buckets=length_buckets, stream_buckets=stream_buckets)
  return pipeline.BatchBuilder(layout, seqs, log_q, seed, tokens=tokens, user_weight_power=user_weight_power, **options)


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


def test_several_batch_threads_give_the_same_batches_in_order_and_resume_alike():
  _, _, seqs, log_q = _setup()
  builder = BatchBuilder(seqs, log_q, 8, 3, seed=2)
  one = [b["item"] for b in train_batches(builder, 0, 12)]
  threaded = iter(train_batches(builder, 0, 12, num_threads=4))
  for want in one[:5]:
    np.testing.assert_array_equal(next(threaded)["item"], want)
  resumed = iter(train_batches(builder, 0, 12, num_threads=3))
  resumed.set_state(threaded.get_state())
  for want in one[5:]:
    np.testing.assert_array_equal(next(resumed)["item"], want)


def test_history_dropout_masks_about_that_share_keeps_one_item_and_is_a_function_of_the_batch():
  _, _, seqs, log_q = _setup()
  whole = BatchBuilder(seqs, log_q, 256, 8, seed=3, history="sampled")
  dropped = BatchBuilder(seqs, log_q, 256, 8, seed=3, history="sampled", history_dropout=0.5)
  slots = kept = 0
  for b in range(6):
    full, part = whole.map(b), dropped.map(b)
    np.testing.assert_array_equal(part["history"], full["history"])  # same draws, fewer of them unmasked
    assert not (part["history_mask"] & ~full["history_mask"]).any()
    had = full["history_mask"].any(axis=1)
    assert part["history_mask"][had].any(axis=1).all()  # nobody loses the whole profile
    slots, kept = slots + full["history_mask"].sum(), kept + part["history_mask"].sum()
    np.testing.assert_array_equal(dropped.map(b)["history_mask"], part["history_mask"])
  # Half of the slots masked, a little less since every row keeps one: binomial sd ~ 0.5/sqrt(slots).
  assert slots > 5000 and 0.47 < kept / slots < 0.56, kept / slots
  import pytest
  with pytest.raises(ValueError, match="history_dropout"):
    BatchBuilder(seqs, log_q, 256, 8, seed=3, history_dropout=1.0)


def test_distinct_draws_are_distinct_in_range_and_uniform():
  from jaxrec.data.pipeline import _distinct_draws
  rng = np.random.default_rng(0)
  counts = np.array([0, 2, 5, 6, 19, 21, 500] * 400)  # every regime: all, argsort, with replacement
  draws = _distinct_draws(counts, 5, rng)
  for row, n in zip(draws, counts):
    got = row[row >= 0]
    assert len(got) == min(n, 5) or n > 20  # large rows may lose a repeat to the mask
    assert len(set(got)) == len(got) and np.all(got < n)
  assert (draws[counts == 500] >= 0).sum(1).mean() > 4.9  # repeats are rare when count >> length
  # 400 rows x 5 draws of 19 offsets: each offset drawn ~105 times when uniform.
  freq = np.bincount(draws[counts == 19].ravel(), minlength=19)
  assert freq.min() > 60 and freq.max() < 150, freq


def test_sampled_history_draws_the_users_other_training_items():
  ds, split, seqs, _ = _setup()
  pos = np.arange(len(seqs))
  hist, mask = seqs.sampled_history(pos, 4, np.random.default_rng(3))
  for p in pos[:300]:
    u = seqs.user[p]
    others = list(np.delete(seqs.items[seqs.start[u]:seqs.start[u + 1]], p - seqs.start[u]))
    got = list(hist[p][mask[p]])
    assert len(got) == min(4, len(others))
    for item in got:  # a multiset inclusion: the target's own slot is never drawn
      others.remove(item)
    assert np.all(hist[p][~mask[p]] == -1)
  eval_hist, eval_mask = seqs.sampled_items(np.arange(ds.num_users), 4, seed=0)
  again, _ = seqs.sampled_items(np.arange(ds.num_users), 4, seed=0)
  np.testing.assert_array_equal(eval_hist, again)
  for u in range(ds.num_users):
    mine = list(seqs.items[seqs.start[u]:seqs.start[u + 1]])
    assert eval_mask[u].sum() == min(4, len(mine))
    for item in eval_hist[u][eval_mask[u]]:
      mine.remove(item)
  # A user's eval draw is the same whatever other users share the call (evaluate and build_index
  # batch users differently).
  users = np.random.default_rng(1).permutation(ds.num_users)
  for chunk in np.array_split(users, 7):
    part, part_mask = seqs.sampled_items(chunk, 4, seed=0)
    np.testing.assert_array_equal(part, eval_hist[chunk])
    np.testing.assert_array_equal(part_mask, eval_mask[chunk])
  assert not np.array_equal(seqs.sampled_items(np.arange(ds.num_users), 4, seed=1)[0], eval_hist)


def test_eval_draws_are_uniform_subsets():
  from jaxrec.data.pipeline import Sequences
  # One user with 10 items: over many seeds each item is drawn about 3/10 of the time.
  seqs = Sequences(items=np.arange(10, dtype=np.int32), start=np.array([0, 10]), user=np.zeros(10, np.int32))
  counts = np.zeros(10)
  for seed in range(3000):
    hist, mask = seqs.sampled_items(np.array([0]), 3, seed)
    assert mask.sum() == 3 and len(set(hist[0].tolist())) == 3
    counts[hist[0]] += 1
  np.testing.assert_allclose(counts / 3000, 0.3, atol=0.03)


def test_sampled_batches_are_reproducible_and_split_across_processes():
  _, _, seqs, log_q = _setup()
  whole = BatchBuilder(seqs, log_q, 16, 4, seed=7, history="sampled", unique_capacity=64)
  assert not np.array_equal(whole.map(0)["history"], BatchBuilder(seqs, log_q, 16, 4, seed=7).map(0)["history"])
  full = whole.map(5)
  np.testing.assert_array_equal(full["history"], whole.map(5)["history"])
  halves = [BatchBuilder(seqs, log_q, 16, 4, seed=7, process_index=i, process_count=2, history="sampled",
                         unique_capacity=64).map(5) for i in range(2)]
  for key in full:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


def test_auto_history_is_recent_only_for_temporal_protocols():
  from jaxrec.data.pipeline import history_mode
  assert history_mode(DataConfig(split="random"), True) == "sampled"
  assert history_mode(DataConfig(split="loo"), True) == "recent"
  assert history_mode(DataConfig(split="predefined"), True) == "recent"
  assert history_mode(DataConfig(split="predefined"), False) == "sampled"
  assert history_mode(DataConfig(split="random", history="recent"), False) == "recent"


def test_distinct_items_and_their_tokens_pad_to_the_smallest_buckets_that_hold_them():
  from jaxrec.data.pipeline import StackedBatches
  ds, _, seqs, log_q = _setup()
  rng = np.random.default_rng(0)
  count_N = np.where(rng.random(ds.num_items) < 0.8, rng.integers(2, 12, ds.num_items), rng.integers(12, 30, ds.num_items))
  mask_NxT = (np.arange(32)[None, :] < count_N[:, None]).astype(np.int32)
  tokens = {"input_ids": (np.arange(ds.num_items)[:, None] * 100 + np.arange(32)) * mask_NxT,
            "attention_mask": mask_NxT, "token_type_ids": np.zeros_like(mask_NxT)}
  kwargs = dict(unique_capacity=64, history="sampled", row_buckets=(16, 32, 48), tokens=tokens, length_buckets=(8, 16))
  whole = BatchBuilder(seqs, log_q, 8, 2, seed=3, **kwargs)
  shapes = set()
  for b in range(12):
    batch, unique = whole.parts(b)
    padded = whole.map(b)
    rows, length = padded["unique_input_ids"].shape
    shapes.add((rows, length))
    # the smallest buckets that hold the batch: rows from (16, 32, 48, 64), tokens from (8, 16, 32)
    assert rows == min(r for r in (16, 32, 48, 64) if r >= len(unique))
    assert length == min(t for t in (8, 16, 32) if t >= count_N[unique].max())
    np.testing.assert_array_equal(padded["unique_items"][:len(unique)], unique)
    for name, table_NxT in tokens.items():
      np.testing.assert_array_equal(padded["unique_" + name], table_NxT[padded["unique_items"], :length])
    np.testing.assert_array_equal(unique[padded["item_slot"]], batch["item"])
    np.testing.assert_array_equal(unique[padded["history_slot"]][batch["history_mask"]],
                                  batch["history"][batch["history_mask"]])
    # processes hold shares of the same global shape
    halves = [BatchBuilder(seqs, log_q, 8, 2, seed=3, process_index=i, process_count=2, **kwargs).map(b)
              for i in range(2)]
    for key in padded:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), padded[key])
  assert len(shapes) > 1, shapes  # the batches really land in different buckets
  # K batches of one call share the largest shape any of them needs; their contents are unchanged
  short = StackedBatches(whole, 4, stop=7).map(1)  # a run of 7 steps: its last call holds batches 4-6
  assert short["item_slot"].shape[0] == 3
  stacked = StackedBatches(whole, 4).map(1)
  singles = [whole.map(b) for b in range(4, 8)]
  rows = max(s["unique_items"].shape[0] for s in singles)
  length = max(s["unique_input_ids"].shape[1] for s in singles)
  assert stacked["unique_input_ids"].shape == (4, rows, length)
  for i, single in enumerate(singles):
    np.testing.assert_array_equal(stacked["item_slot"][i], single["item_slot"])
    n = single["unique_input_ids"].shape
    np.testing.assert_array_equal(stacked["unique_input_ids"][i, :n[0], :n[1]], single["unique_input_ids"])
    assert not stacked["unique_attention_mask"][i, :, n[1]:].any()  # the extra tokens are padding


def test_token_stream_holds_each_distinct_items_tokens_once_end_to_end():
  from jaxrec.data.pipeline import StackedBatches
  ds, _, seqs, log_q = _setup()
  rng = np.random.default_rng(1)
  count_N = rng.integers(2, 30, ds.num_items)
  mask_NxT = (np.arange(32)[None, :] < count_N[:, None]).astype(np.int32)
  tokens = {"input_ids": (np.arange(ds.num_items)[:, None] * 100 + np.arange(32) + 1) * mask_NxT,
            "attention_mask": mask_NxT, "token_type_ids": (np.arange(32)[None, :] % 2) * mask_NxT}
  kwargs = dict(unique_capacity=64, history="sampled", row_buckets=(16, 32, 48), tokens=tokens,
                length_buckets=(8, 16), stream_buckets=tuple(range(100, 2049, 100)) + (2048,))
  whole = BatchBuilder(seqs, log_q, 8, 2, seed=3, **kwargs)
  for b in range(12):
    batch, unique = whole.parts(b)
    streamed = whole.map(b)
    rows, length, width = whole.shape_of(unique)
    assert length == min(t for t in kwargs["stream_buckets"] if t >= count_N[unique].sum())  # the smallest that holds it
    assert width == min(t for t in (8, 16, 32) if t >= count_N[unique].max())  # attention's text length
    assert streamed["unique_input_ids"].shape == (length,) and streamed["unique_stream_index"].shape == (rows, width)
    index_RxT = streamed["unique_stream_index"]
    for slot, item in enumerate(unique):
      at = index_RxT[slot, :count_N[item]]
      np.testing.assert_array_equal(at, at[0] + np.arange(count_N[item]))  # one run of the stream
      assert (index_RxT[slot, count_N[item]:] == length).all()  # past the text: the padding marker
      np.testing.assert_array_equal(streamed["unique_input_ids"][at], tokens["input_ids"][item, :count_N[item]])
      np.testing.assert_array_equal(streamed["unique_token_type_ids"][at], tokens["token_type_ids"][item, :count_N[item]])
      np.testing.assert_array_equal(streamed["unique_position_ids"][at], np.arange(count_N[item]))
      assert (streamed["unique_segment_ids"][at] == slot).all()
    assert (index_RxT[len(unique):] == length).all()  # padding items have no tokens
    real = streamed["unique_segment_ids"] >= 0
    assert real.sum() == count_N[unique].sum() and not streamed["unique_input_ids"][~real].any()
    # two processes: each streams its share of the items into its half of the stream, with global
    # slots and stream indices, so the halves put together resolve every text as the whole does
    halves = [BatchBuilder(seqs, log_q, 8, 2, seed=3, process_index=i, process_count=2, **kwargs).map(b)
              for i in range(2)]
    shares = [count_N[unique[i * rows // 2:(i + 1) * rows // 2]].sum() for i in range(2)]
    half_length = min(t for t in kwargs["stream_buckets"] if t >= 2 * max(shares))
    joined = {key: np.concatenate([h[key] for h in halves]) for key in halves[0]}
    assert joined["unique_input_ids"].shape == (half_length,)
    for slot, item in enumerate(unique):
      at = joined["unique_stream_index"][slot, :count_N[item]]
      np.testing.assert_array_equal(joined["unique_input_ids"][at], tokens["input_ids"][item, :count_N[item]])
      assert (joined["unique_segment_ids"][at] == slot).all()
  stacked = StackedBatches(whole, 4).map(0)
  assert stacked["unique_input_ids"].shape == (4, max(whole.map(b)["unique_input_ids"].shape[0] for b in range(4)))
  with pytest.raises(ValueError, match="over the largest token stream bucket 100"):
    BatchBuilder(seqs, log_q, 8, 2, seed=3, **dict(kwargs, stream_buckets=(100,))).map(0)


def test_user_weights_are_inverse_profile_sizes_with_mean_one():
  _, _, seqs, log_q = _setup()
  assert "weight" not in BatchBuilder(seqs, log_q, 16, 4, seed=7).map(0)
  counts_U = np.diff(seqs.start)
  for power in (0.5, 1.0):
    builder = BatchBuilder(seqs, log_q, 16, 4, seed=7, user_weight_power=power)
    all_w = np.concatenate([builder.map(b)["weight"] for b in range(len(seqs) // 16)])
    all_u = np.concatenate([builder.map(b)["user"] for b in range(len(seqs) // 16)])
    ratio = all_w * counts_U[all_u] ** power  # the same constant for every example
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    np.testing.assert_allclose(builder.weight_T.mean(), 1.0, rtol=1e-5)
  # Power 1: every user's examples carry the same total weight.
  builder = BatchBuilder(seqs, log_q, 16, 4, seed=7, user_weight_power=1.0)
  per_user = np.bincount(seqs.user, weights=builder.weight_T)
  np.testing.assert_allclose(per_user[counts_U > 0], per_user[counts_U > 0][0], rtol=1e-5)


def test_mixed_log_q_is_the_mixture_of_in_batch_and_sampled_slots():
  train_items = np.array([0, 0, 0, 1, 2, 2, 4, 4, 4, 4], np.int32)  # item 3 has no training interaction
  plain = item_log_q(train_items, 5)
  # M = 0 is today's unigram, bit for bit, whatever the other arguments say.
  np.testing.assert_array_equal(plain, np.log(np.array([3, 1, 2, 0.5, 4]) / 10).astype(np.float32))
  np.testing.assert_array_equal(item_log_q(train_items, 5, batch_size=8, mixed_sampler="popularity"), plain)
  # B = 8 positives, M = 4 uniform samples over the 4 trained items: (8 * p + 4 * 1/4) / 12.
  want = np.log([(8 * 0.3 + 1) / 12, (8 * 0.1 + 1) / 12, (8 * 0.2 + 1) / 12, 8 * 0.05 / 12, (8 * 0.4 + 1) / 12])
  np.testing.assert_allclose(item_log_q(train_items, 5, batch_size=8, mixed_negatives=4), want, rtol=1e-6)
  # Popularity samples follow the data: the mixture is the unigram again (the unseen floor shrinks).
  pop = item_log_q(train_items, 5, batch_size=8, mixed_negatives=4, mixed_sampler="popularity")
  np.testing.assert_allclose(np.delete(pop, 3), np.delete(plain, 3), rtol=1e-6)
  np.testing.assert_allclose(pop[3], np.log(8 * 0.05 / 12), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown mixed negative sampler 'zipf'"):
    item_log_q(train_items, 5, batch_size=8, mixed_negatives=4, mixed_sampler="zipf")


def _mixed(seqs, log_q, seed=7, sampler="uniform", **options):
  return BatchBuilder(seqs, log_q, 16, 4, seed=seed, unique_capacity=96, mixed_negatives=8, mixed_sampler=sampler,
                      **options)


def test_mixed_negatives_are_a_function_of_seed_and_batch_split_over_processes_and_join_the_distinct_items():
  ds, split, seqs, _ = _setup()
  log_q = item_log_q(ds.items[split.train], ds.num_items, batch_size=16, mixed_negatives=8)
  whole = _mixed(seqs, log_q)
  full = whole.map(5)
  assert full["negative"].shape == full["negative_slot"].shape == full["negative_log_q"].shape == (8,)
  for key, value in _mixed(seqs, log_q).map(5).items():  # a rerun
    np.testing.assert_array_equal(value, full[key])
  halves = [_mixed(seqs, log_q, process_index=i, process_count=2).map(5) for i in range(2)]
  for key in full:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
  assert not np.array_equal(whole.map(6)["negative"], full["negative"])
  assert not np.array_equal(_mixed(seqs, log_q, seed=8).negatives(5), full["negative"])
  # The step finds each negative at its slot of the distinct items, with the mixture's logQ.
  np.testing.assert_array_equal(full["unique_items"][full["negative_slot"]], full["negative"])
  np.testing.assert_array_equal(full["negative_log_q"], log_q[full["negative"]])
  np.testing.assert_array_equal(full["log_q"], log_q[full["item"]])
  # The other fields are those of the same batch without negatives.
  plain = BatchBuilder(seqs, log_q, 16, 4, seed=7, unique_capacity=96).map(5)
  for key in ("user", "item", "history", "history_mask", "log_q"):
    np.testing.assert_array_equal(plain[key], full[key])
  with pytest.raises(ValueError, match="8 mixed negatives are not divisible by 3 processes"):
    BatchBuilder(seqs, log_q, 15, 4, seed=7, unique_capacity=96, mixed_negatives=8, process_count=3)


def test_mixed_negatives_follow_their_sampler():
  ds, split, seqs, _ = _setup()
  counts = np.bincount(ds.items[split.train], minlength=ds.num_items)
  trained = np.flatnonzero(counts)
  assert len(trained) < ds.num_items  # cold items are held out: no sampler may draw them
  # The two samplers differ by more than the tolerance below, so each check tells them apart.
  assert np.abs(counts / counts.sum() - (counts > 0) / len(trained)).max() > 0.02
  for sampler, want in (("popularity", counts / counts.sum()), ("uniform", (counts > 0) / len(trained))):
    log_q = item_log_q(ds.items[split.train], ds.num_items, batch_size=16, mixed_negatives=8, mixed_sampler=sampler)
    builder = _mixed(seqs, log_q, sampler=sampler)
    draws = np.concatenate([builder.negatives(b) for b in range(4000)])
    assert np.isin(draws, trained).all(), sampler
    freq = np.bincount(draws, minlength=ds.num_items) / len(draws)
    # 32,000 draws: each frequency within 0.005 of its probability (about 5 standard deviations).
    np.testing.assert_allclose(freq, want, atol=0.005, err_msg=sampler)
    other = (counts > 0) / len(trained) if sampler == "popularity" else counts / counts.sum()
    assert np.abs(freq - other).max() > 0.015, sampler
    assert 0.5 * np.abs(freq - want).sum() < 0.02, sampler
