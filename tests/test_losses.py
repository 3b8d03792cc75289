import numpy as np
import jax.numpy as jnp

from jaxrec.losses import MASKED_LOGIT, catalog_softmax, in_batch_softmax


def _reference(q, c, pos_ids, cand_ids, temperature, log_q, remove_hits):
  """Direct numpy softmax cross-entropy, row by row."""
  losses = []
  for b in range(len(q)):
    logits = (c @ q[b]).astype(np.float64) / temperature
    if log_q is not None:
      logits = logits - log_q
    if remove_hits:
      for j in range(len(c)):
        if j != b and cand_ids[j] == pos_ids[b]:
          logits[j] = MASKED_LOGIT
    m = logits.max()
    losses.append(m + np.log(np.exp(logits - m).sum()) - logits[b])
  return float(np.mean(losses))


def _data(seed=0, b=6, e=4):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, e)).astype(np.float32)
  p = rng.normal(size=(b, e)).astype(np.float32)
  ids = np.array([3, 5, 3, 7, 5, 1], np.int32)[:b]
  log_q = np.log(rng.uniform(0.01, 0.3, size=b)).astype(np.float32)
  return q, p, ids, log_q


def test_matches_numpy_with_logq_and_accidental_hits():
  q, p, ids, log_q = _data()
  got, aux = in_batch_softmax(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), 0.5, log_q_B=jnp.asarray(log_q))
  want = _reference(q, p, ids, ids, 0.5, log_q, True)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert aux["logits"].shape == (6, 6)
  # Row 0's positive is item 3, which is also column 2's: that column must be masked.
  assert float(aux["logits"][0, 2]) == MASKED_LOGIT
  assert float(aux["logits"][2, 0]) == MASKED_LOGIT
  assert float(aux["logits"][0, 0]) != MASKED_LOGIT


def test_each_correction_changes_the_loss_as_the_reference_does():
  q, p, ids, log_q = _data(1)
  for use_logq in (False, True):
    for remove in (False, True):
      got, _ = in_batch_softmax(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), 0.2,
                                log_q_B=jnp.asarray(log_q) if use_logq else None, remove_accidental_hits=remove)
      want = _reference(q, p, ids, ids, 0.2, log_q if use_logq else None, remove)
      np.testing.assert_allclose(float(got), want, rtol=1e-5)
  no_fix, _ = in_batch_softmax(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), 0.2, remove_accidental_hits=False)
  fix, _ = in_batch_softmax(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), 0.2, remove_accidental_hits=True)
  assert float(fix) < float(no_fix)  # masking removes competitors


def test_extra_negatives_extend_the_softmax():
  q, p, ids, log_q = _data(2)
  rng = np.random.default_rng(9)
  extra = rng.normal(size=(3, 4)).astype(np.float32)
  extra_ids = np.array([5, 9, 10], np.int32)
  extra_lq = np.log(np.full(3, 0.05, np.float32))
  got, aux = in_batch_softmax(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), 0.5, log_q_B=jnp.asarray(log_q),
                              extra_NxE=jnp.asarray(extra), extra_ids_N=jnp.asarray(extra_ids),
                              extra_log_q_N=jnp.asarray(extra_lq))
  want = _reference(q, np.concatenate([p, extra]), ids, np.concatenate([ids, extra_ids]), 0.5,
                    np.concatenate([log_q, extra_lq]), True)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert aux["logits"].shape == (6, 9)


def test_repeated_extra_negatives_are_columns_each_and_a_hit_is_masked_only_in_its_row():
  q, p, ids, log_q = _data(3)
  rng = np.random.default_rng(4)
  extra = rng.normal(size=(4, 4)).astype(np.float32)
  extra[2] = extra[1]
  extra_ids = np.array([7, 11, 11, 3], np.int32)  # 7 and 3 are positives of rows 3 and 0, 2
  extra_lq = np.log(np.array([0.02, 0.1, 0.1, 0.05], np.float32))
  weights = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
  got, aux = in_batch_softmax(jnp.asarray(q), jnp.asarray(p), jnp.asarray(ids), 0.5, log_q_B=jnp.asarray(log_q),
                              extra_NxE=jnp.asarray(extra), extra_ids_N=jnp.asarray(extra_ids),
                              extra_log_q_N=jnp.asarray(extra_lq), weights_B=jnp.asarray(weights))
  logits = np.asarray(aux["logits"])
  assert logits[3, 6] == MASKED_LOGIT and logits[0, 9] == logits[2, 9] == MASKED_LOGIT
  assert (logits[[0, 1, 2, 4, 5], 6] != MASKED_LOGIT).all() and (logits[[1, 3, 4, 5], 9] != MASKED_LOGIT).all()
  np.testing.assert_allclose(logits[:, 7], logits[:, 8])  # a repeated draw is a second, equal column
  rows = [_reference(q[[b]], np.concatenate([p[[b]], np.delete(p, b, 0), extra]), ids[[b]],
                     np.concatenate([ids[[b]], np.delete(ids, b), extra_ids]), 0.5,
                     np.concatenate([log_q[[b]], np.delete(log_q, b), extra_lq]), True) for b in range(6)]
  np.testing.assert_allclose(float(got), np.sum(np.array(rows) * weights) / np.sum(weights), rtol=1e-5)


def test_catalog_softmax_matches_numpy_and_masks_only_non_candidates():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(5, 4)).astype(np.float32)
  items = rng.normal(size=(9, 4)).astype(np.float32)
  pos = np.array([0, 4, 4, 8, 2], np.int32)
  mask = np.ones(9, bool)
  mask[[2, 6, 7]] = False  # item 2 is also a label: its own row keeps it
  loss, aux = catalog_softmax(jnp.asarray(q), jnp.asarray(items), jnp.asarray(pos), 0.1,
                              candidate_mask_N=jnp.asarray(mask))
  expected = []
  for b in range(5):
    logits = (items @ q[b]).astype(np.float64) / 0.1
    keep = mask.copy()
    keep[pos[b]] = True
    logits = logits[keep]
    label = int(np.flatnonzero(keep).tolist().index(pos[b]))
    m = logits.max()
    expected.append(m + np.log(np.exp(logits - m).sum()) - logits[label])
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
  assert aux["logits"].shape == (5, 9)
  # With every item a candidate it is the in-batch softmax whose candidates are the whole catalog.
  distinct = np.array([0, 4, 8, 2], np.int32)
  full, _ = catalog_softmax(jnp.asarray(q[:4]), jnp.asarray(items), jnp.asarray(distinct), 0.1)
  rest = np.setdiff1d(np.arange(9), distinct).astype(np.int32)
  ref, _ = in_batch_softmax(jnp.asarray(q[:4]), jnp.asarray(items[distinct]), jnp.asarray(distinct), 0.1,
                            extra_NxE=jnp.asarray(items[rest]), extra_ids_N=jnp.asarray(rest))
  np.testing.assert_allclose(float(full), float(ref), rtol=1e-5)
