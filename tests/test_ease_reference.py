"""The EASE reference of docs/study.md: its closed form against a direct constrained solve."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "ease_reference.py"


def _module():
  spec = importlib.util.spec_from_file_location("ease_reference", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_closed_form_is_the_zero_diagonal_ridge_regression():
  ease = _module()
  rng = np.random.default_rng(0)
  x_UxN = (rng.random((40, 7)) < 0.4).astype(np.float32)
  lam = 3.0
  b = ease.ease_weights(x_UxN, lam)
  assert np.all(np.diag(b) == 0.0)
  # Column j regresses item j on every other item: (X_-j^T X_-j + lam I)^-1 X_-j^T x_j.
  x = x_UxN.astype(np.float64)
  for j in range(x.shape[1]):
    others = [i for i in range(x.shape[1]) if i != j]
    xo = x[:, others]
    want = np.linalg.solve(xo.T @ xo + lam * np.eye(len(others)), xo.T @ x[:, j])
    np.testing.assert_allclose(b[others, j], want, rtol=1e-4, atol=1e-6)


def test_subsample_keeps_at_most_length_known_items_of_each_user():
  ease = _module()
  rng = np.random.default_rng(1)
  known = (rng.random((30, 50)) < 0.3).astype(np.float32)
  cut = ease.subsample(known, 5, seed=0)
  assert np.all(cut <= known)  # a subset of each user's items
  np.testing.assert_array_equal(cut.sum(1), np.minimum(known.sum(1), 5))
  np.testing.assert_array_equal(cut, ease.subsample(known, 5, seed=0))
