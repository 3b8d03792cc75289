import numpy as np
import pytest

from jaxrec.metrics import RankingAccumulator, hit_matrix, per_user


def test_hand_computed_user():
  # User 0's test items are {4, 9}; ranking is [4, 1, 9, 2].
  hits = hit_matrix(np.array([[4, 1, 9, 2]]), np.array([0]), np.array([0, 0]), np.array([4, 9]), 10)
  np.testing.assert_array_equal(hits, [[True, False, True, False]])
  m = per_user(hits, np.array([2]), (1, 3))
  assert m["recall@1"][0] == pytest.approx(0.5)
  assert m["recall@3"][0] == pytest.approx(1.0)
  assert m["hit@1"][0] == 1.0
  assert m["mrr@3"][0] == pytest.approx(1.0)
  # DCG = 1/log2(2) + 1/log2(4) = 1.5 ; IDCG = 1 + 1/log2(3)
  assert m["ndcg@3"][0] == pytest.approx(1.5 / (1 + 1 / np.log2(3)))
  assert m["ndcg@1"][0] == pytest.approx(1.0)


def test_first_hit_late_and_no_hit():
  hits = np.array([[False, False, True], [False, False, False]])
  m = per_user(hits, np.array([3, 1]), (3,))
  np.testing.assert_allclose(m["mrr@3"], [1 / 3, 0.0])
  np.testing.assert_allclose(m["recall@3"], [1 / 3, 0.0])
  # user 0: DCG = 1/log2(4) = 0.5; IDCG with 3 relevant = 1 + 1/log2(3) + 1/2
  np.testing.assert_allclose(m["ndcg@3"], [0.5 / (1 + 1 / np.log2(3) + 0.5), 0.0])
  np.testing.assert_allclose(m["hit@3"], [1.0, 0.0])


def test_accumulator_averages_over_users_with_test_items_and_splits_warm_cold():
  cold = np.zeros(10, bool)
  cold[[7, 8]] = True
  acc = RankingAccumulator((2,), 10, {"warm": ~cold, "cold": cold})
  users = np.array([0, 1, 2])
  topk = np.array([[1, 7], [2, 3], [5, -1]])
  truth_users = np.array([0, 0, 1, 2])
  truth_items = np.array([1, 8, 9, 5])
  acc.add(topk, users, truth_users, truth_items)
  r = acc.result()
  # recall@2 per user: u0 1/2, u1 0, u2 1 -> mean 0.5
  assert r["recall@2"] == pytest.approx(0.5)
  assert r["users"] == 3
  # warm truth: u0 {1} -> 1, u1 {9} -> 0, u2 {5} -> 1
  assert r["warm/recall@2"] == pytest.approx(2 / 3)
  # cold truth: only u0 {8}, not retrieved
  assert r["cold/recall@2"] == 0.0 and r["cold/users"] == 1
  assert r["coverage@2"] == pytest.approx(5 / 10)
