"""jaxrec.baselines: EASE and ItemKNN against direct computations, their evaluation against a brute
force of the protocol, the memory refusal, and the fit on configs/tiny.py's world (cold items: 0)."""

import dataclasses
import json

import numpy as np
import pytest

from jaxrec import baselines, evaluation
from jaxrec.config import load_config
from jaxrec.data import sources
from test_evaluation import KS, brute_force, check_against


def _binary(seed, users, items, density):
  return (np.random.default_rng(seed).random((users, items)) < density).astype(np.float32)


def test_ease_is_the_zero_diagonal_ridge_regression():
  x_UxN = _binary(0, 40, 7, 0.4)
  lam = 3.0
  w = baselines.ease(x_UxN, lam)
  assert w.dtype == np.float32 and w.shape == (7, 7)
  assert np.all(np.diag(w) == 0.0)
  # Column j regresses item j on every other item: (X_-j^T X_-j + lam I)^-1 X_-j^T x_j.
  x = x_UxN.astype(np.float64)
  for j in range(7):
    others = [i for i in range(7) if i != j]
    xo = x[:, others]
    want = np.linalg.solve(xo.T @ xo + lam * np.eye(6), xo.T @ x[:, j])
    np.testing.assert_allclose(w[others, j], want, rtol=1e-5, atol=1e-7)


def test_ease_gives_an_item_without_interactions_a_zero_column_and_row():
  x_UxN = _binary(1, 30, 6, 0.5)
  x_UxN[:, 2] = 0.0
  w = baselines.ease(x_UxN, 10.0)
  assert not w[:, 2].any() and not w[2, :].any()


def _knn_brute_force(x_UxN, k, shrink):
  """RecBole's formula, one similarity at a time; each column keeps its k largest (lower index first)."""
  x = x_UxN.astype(np.float64)
  n = x.shape[1]
  counts = [float(x[:, i] @ x[:, i]) for i in range(n)]
  w = np.zeros((n, n), np.float32)
  for j in range(n):
    sims = [0.0 if i == j else float(x[:, i] @ x[:, j]) / (np.sqrt(counts[i]) * np.sqrt(counts[j]) + shrink + 1e-6)
            for i in range(n)]
    for i in sorted(range(n), key=lambda i: (-sims[i], i))[:k]:
      w[i, j] = sims[i]
  return w


@pytest.mark.parametrize("k,shrink", [(3, 0.0), (3, 10.0), (5, 2.5), (50, 0.0)])
def test_item_knn_equals_brute_force_cosine_with_shrinkage_and_top_k(k, shrink):
  # Few users, so equal similarities (ties) are common and the lower-index rule is exercised.
  x_UxN = _binary(2, 12, 11, 0.35)
  x_UxN[:, 4] = 0.0  # an item nobody has: similarity 0 with everything, never a nonzero neighbour
  w = baselines.item_knn(x_UxN, k, shrink)
  want = _knn_brute_force(x_UxN, k, shrink)
  np.testing.assert_array_equal(w, want)
  assert w.dtype == np.float32 and np.all(np.diag(w) == 0.0)
  assert (np.count_nonzero(w, axis=0) <= k).all() and not w[4, :].any() and not w[:, 4].any()


def test_item_knn_similarity_values():
  # Items 0 and 1 share one of 2 and 3 users: cosine 1 / sqrt(6); with shrink 10: 1 / (sqrt(6) + 10).
  x_UxN = np.array([[1, 1], [1, 0], [0, 1], [0, 1]], np.float32)
  s = 1 / (np.sqrt(6) + 1e-6)
  np.testing.assert_allclose(baselines.item_knn(x_UxN, 1, 0.0), [[0, s], [s, 0]], rtol=1e-6)
  np.testing.assert_allclose(baselines.item_knn(x_UxN, 1, 10.0)[0, 1], 1 / (np.sqrt(6) + 10 + 1e-6), rtol=1e-6)


@pytest.fixture(scope="module")
def world():
  dataset, split = sources.load(load_config("configs/tiny.py").data)
  return dataset, split


def _dense_known(protocol, num_users):
  known_UxN = np.zeros((num_users, protocol.num_items), np.float32)
  known_UxN[protocol.known.user, protocol.known.items] = 1.0
  return known_UxN


@pytest.mark.parametrize("which,batch_size", [("test", 32), ("valid", 7)])
def test_scoring_equals_a_brute_force_ranking_of_the_protocol(world, which, batch_size):
  """Scores x_u @ W, unfitted items last: the brute force of tests/test_evaluation.py on the
  vectors [W^T | 0 or UNSCORED] and [x_u | 1]. W is dyadic, so every float32 sum is exact."""
  dataset, split = world
  n = dataset.num_items
  rng = np.random.default_rng(3)
  w_NxN = (rng.integers(-8, 9, (n, n)) / 8).astype(np.float32)
  fitted_N = np.bincount(dataset.items[split.train], minlength=n) > 0
  fitted_N[:5] = False  # besides the cold items, a few that the fit never saw
  protocol = evaluation.Protocol.of(dataset, split, which)
  got = baselines.score(protocol, w_NxN, fitted_N, ks=KS, batch_size=batch_size)
  items_NxE = np.concatenate([w_NxN.T, np.where(fitted_N, 0.0, baselines.UNSCORED)[:, None]], 1).astype(np.float32)
  users_UxE = np.concatenate([_dense_known(protocol, dataset.num_users), np.ones((dataset.num_users, 1))], 1)
  want = brute_force(dataset, split, which, items_NxE, users_UxE.astype(np.float32))
  check_against(got, want)
  if which == "test":  # cold items (unfitted) are ranked after the fitted ones: never in a top 20
    assert got["cold/users"] > 0 and got["cold/recall@20"] == 0.0 and got["cold/hit@20"] == 0.0


def test_scores_are_the_known_rows_times_the_weights(world, monkeypatch):
  """What the kernel gets: item vectors W's columns, queries the users' known-item rows."""
  dataset, split = world
  n = dataset.num_items
  w_NxN = np.random.default_rng(4).normal(size=(n, n)).astype(np.float32)
  protocol = evaluation.Protocol.of(dataset, split, "test")
  seen = []
  real = evaluation.full_ranking
  def spy(protocol_, items_NxE, queries, **kwargs):
    seen.append((items_NxE, queries(protocol_.users[:16], protocol_.known)))
    return real(protocol_, items_NxE, queries, **kwargs)
  monkeypatch.setattr(evaluation, "full_ranking", spy)
  baselines.score(protocol, w_NxN, np.ones(n, bool), ks=(10,), batch_size=16)
  items_NxE, q_BxE = seen[0]
  known = _dense_known(protocol, dataset.num_users)[protocol.users[:16]]
  scores = np.asarray(q_BxE) @ items_NxE.T
  np.testing.assert_allclose(scores, known @ w_NxN, rtol=1e-5, atol=1e-5)


def test_a_too_large_catalog_is_refused_naming_n_and_the_bytes():
  with pytest.raises(baselines.BaselineError) as e:
    baselines.check_memory("ease", 1_000_000, 250_000, max_bytes=64 << 30)
  message = str(e.value)
  assert "\n" not in message
  assert "N=250,000 items" in message and "250,000 x 250,000" in message
  need = baselines.BYTES_PER_CELL * 250_000 ** 2 + 4 * 1_000_000 * 250_000
  assert f"about {need / 1e9:.1f} GB" in message and "limit of 68.7 GB" in message and need / 1e9 > 2500
  baselines.check_memory("ease", 1000, 500, max_bytes=baselines.dense_bytes(1000, 500))  # exactly fits


def test_the_fit_refuses_before_allocating(world):
  cfg = load_config("configs/tiny.py")
  with pytest.raises(baselines.BaselineError, match=r"itemknn on N=90 items .*about 0\.4 MB .*limit of 1000 bytes"):
    baselines.evaluate(cfg, "itemknn", baselines.Options(max_bytes=1000), data=world)


def test_options_parse_and_round_trip():
  options = baselines.parse_options(["baseline.lams=10,20.5", "baseline.ks=5", "baseline.refit=false",
                                     "baseline.max_bytes=1e9"])
  assert options == baselines.Options(lams=(10.0, 20.5), ks=(5,), refit=False, max_bytes=10 ** 9)
  assert baselines.parse_options(baselines.options_string(options).split()) == dataclasses.replace(options, max_bytes=0)
  with pytest.raises(baselines.BaselineError, match="unknown baseline option 'baseline.lam=1'"):
    baselines.parse_options(["baseline.lam=1"])
  with pytest.raises(baselines.BaselineError, match="cannot parse 'x'"):
    baselines.parse_options(["baseline.ks=x"])
  assert baselines.split_overrides(["a=1", "baseline.ks=3", "b=2"]) == (("a=1", "b=2"), ("baseline.ks=3",))


@pytest.mark.parametrize("kind", baselines.KINDS)
def test_the_fit_picks_on_valid_and_reports_test_with_cold_items_at_zero(world, kind, tmp_path):
  dataset, split = world
  cfg = load_config("configs/tiny.py", [f"workdir={tmp_path}", "eval.batch_size=50"])
  options = baselines.Options(lams=(1.0, 100.0), ks=(5, 50), shrinks=(0.0, 10.0))
  result = baselines.evaluate(cfg, kind, options, data=world)
  grid = baselines.grid(kind, options)
  names = [",".join(f"{k}={v:g}" for k, v in p.items()) for p in grid]
  valid = [result[f"baseline/valid/{name}/recall@10"] for name in names]
  best = grid[int(np.argmax(valid))]
  assert {k: result[f"baseline/{k}"] for k in best} == best

  # The test metrics are the chosen weights' through the same scoring, popularity included.
  train_UxN = baselines.interactions(dataset.num_users, dataset.num_items, dataset.users[split.train],
                                     dataset.items[split.train])
  weights = baselines.fit(kind, train_UxN, **best)
  protocol = evaluation.Protocol.of(dataset, split, "test")
  want = baselines.score(protocol, weights, train_UxN.any(0), ks=cfg.eval.ks, batch_size=50)
  assert {k: result[k] for k in want} == want
  assert result["popularity/recall@10"] == want["popularity/recall@10"]
  assert result["model/params"] == np.count_nonzero(weights) and result["steps"] == 0
  for valid_name, value in zip(names, valid):
    assert 0.0 <= value <= 1.0, valid_name

  # The cold items have no training interaction: nothing scores them, and they are ranked last.
  assert split.cold_items.sum() == 9 and result["cold/users"] > 0
  assert all(result[f"cold/{m}@{k}"] == 0.0 for m in ("recall", "ndcg", "hit") for k in (10, 20))
  assert result["warm/recall@10"] > result["popularity/warm/recall@10"]
  if kind == "ease":  # refit on train + valid: different weights, the same protocol
    assert result["refit/users"] == result["users"] and result["refit/cold/recall@10"] == 0.0
    assert result["refit/recall@10"] != result["recall@10"]
  else:
    assert not any(k.startswith("refit/") for k in result)


def test_main_writes_metrics_and_config(tmp_path, capsys):
  workdir = tmp_path / "ease"
  assert baselines.main(["--kind", "ease", "--config", "configs/tiny.py", f"workdir={workdir}",
                         "baseline.lams=50", "eval.batch_size=64"]) == 0
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["baseline/lam"] == 50.0 and metrics["baseline/kind"] == "ease"
  assert metrics["baseline/options"].startswith("baseline.lams=50 ")
  assert json.loads((workdir / "config.json").read_text())["eval"]["batch_size"] == 64
  for key in ("recall@10", "ndcg@10", "mrr@10", "hit@10", "recall@50", "warm/recall@10", "cold/recall@10",
              "coverage@10", "popularity/recall@10", "protocol", "data/items"):
    assert key in metrics, key
  assert f"\"recall@10\": {round(metrics['recall@10'], 4)}" in capsys.readouterr().out
