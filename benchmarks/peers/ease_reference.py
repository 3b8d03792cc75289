"""What jaxrec's ML-1M split allows a linear item-item model, and what a two-tower's shape costs it.

EASE (Steck, 2019) is a closed-form, full-rank item-item model: B = argmin |X - XB|^2 + lam |B|^2
with diag(B) = 0, scores = X B for a user's known items X. It runs here with numpy on exactly the
split, known-item masking and metrics jaxrec evaluates with (jaxrec.metrics), on the validation
split (lam picked there) and the test split (known items = train + valid, as jaxrec's test).

Then the same model forced into two-tower shapes, on the validation split:
  rank r       B truncated to its top r singular directions: a query x U_r S_r against item
               vectors V_r, a dot-product two-tower of width r
  cosine       rank 64 with unit item vectors (what cosine scoring imposes)
  history L    rank 64 with the query built from L sampled known items instead of all of them
               (what a query tower pooling L profile items sees)

  .venv/bin/python benchmarks/peers/ease_reference.py --out runs/ease/ease_reference.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(_REPO, "configs", "ml1m_text.py")
OVERRIDES = ("data.cold_item_fraction=0",)  # the study's ML-1M random split, every movie warm


def _known_and_truth(dataset, split, which: str):
  held = split.test if which == "test" else split.valid
  known = np.concatenate([split.train, split.valid]) if which == "test" else split.train
  known_UxN = np.zeros((dataset.num_users, dataset.num_items), np.float32)
  known_UxN[dataset.users[known], dataset.items[known]] = 1.0
  order = np.lexsort((dataset.items[held], dataset.users[held]))
  return known_UxN, dataset.users[held][order], dataset.items[held][order]


def _evaluate(scores_UxN, users_U, known_UxN, truth_users, truth_items, num_items, ks=(10, 50)) -> dict:
  from jaxrec import metrics
  scores = np.array(scores_UxN, np.float32)
  scores[known_UxN[users_U] > 0] = -np.inf
  # Stable argsort: ties go to the lower index, as jaxrec's kernel orders them.
  top = np.argsort(-scores, axis=1, kind="stable")[:, :max(ks)]
  acc = metrics.RankingAccumulator(ks, num_items)
  acc.add(top, users_U, truth_users, truth_items)
  return {k: round(float(v), 4) for k, v in acc.result().items() if k.split("@")[0] in ("recall", "ndcg")}


def ease_weights(train_UxN: np.ndarray, lam: float) -> np.ndarray:
  """EASE's closed form: B = I - P diag(1 / diag(P)), P = (X^T X + lam I)^-1, diag(B) = 0."""
  gram = train_UxN.T.astype(np.float64) @ train_UxN.astype(np.float64)
  gram[np.diag_indices_from(gram)] += lam
  p = np.linalg.inv(gram)
  b = -p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b.astype(np.float32)


def subsample(known_UxN: np.ndarray, length: int, seed: int) -> np.ndarray:
  """Each user's known items cut to ``length`` drawn at random (all of them when fewer)."""
  rng = np.random.default_rng(seed)
  out = known_UxN.copy()
  for u in range(len(out)):
    items = np.flatnonzero(out[u])
    if len(items) > length:
      out[u, rng.choice(items, len(items) - length, replace=False)] = 0.0
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--lams", default="100,300,1000,3000", help="EASE regularisation grid (picked on valid)")
  parser.add_argument("--ranks", default="32,64,128,256,512")
  parser.add_argument("--history", default="10,50", help="query history lengths for the rank-64 probe")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  sys.path.insert(0, _REPO)
  from jaxrec.config import load_config
  from jaxrec.data import sources

  start = time.time()
  dataset, split = sources.load(load_config(CONFIG, OVERRIDES).data)
  n = dataset.num_items
  train_UxN = np.zeros((dataset.num_users, n), np.float32)
  train_UxN[dataset.users[split.train], dataset.items[split.train]] = 1.0
  valid_known, valid_tu, valid_ti = _known_and_truth(dataset, split, "valid")
  valid_users = np.unique(valid_tu)

  def on_valid(scores_UxN):
    return _evaluate(scores_UxN, valid_users, valid_known, valid_tu, valid_ti, n)

  out = {"config": os.path.relpath(CONFIG, _REPO), "overrides": list(OVERRIDES), "protocol": split.protocol,
         "ease_valid": {}}
  weights = {}
  for lam in (float(x) for x in args.lams.split(",")):
    weights[lam] = ease_weights(train_UxN, lam)
    out["ease_valid"][f"{lam:g}"] = on_valid(valid_known[valid_users] @ weights[lam])
    print(f"EASE lam={lam:g} valid {out['ease_valid'][f'{lam:g}']}", flush=True)
  best = max(weights, key=lambda lam: out["ease_valid"][f"{lam:g}"]["recall@10"])
  test_known, test_tu, test_ti = _known_and_truth(dataset, split, "test")
  test_users = np.unique(test_tu)
  out["lam"] = best
  out["ease_test"] = _evaluate(test_known[test_users] @ weights[best], test_users, test_known, test_tu, test_ti, n)
  print(f"EASE lam={best:g} test {out['ease_test']}", flush=True)

  u, s, vt = np.linalg.svd(weights[best].astype(np.float64))
  out["rank_valid"] = {}
  for r in (int(x) for x in args.ranks.split(",")):
    query_map_NxR, items_NxR = u[:, :r] * s[:r], vt[:r].T
    out["rank_valid"][str(r)] = on_valid((valid_known[valid_users] @ query_map_NxR) @ items_NxR.T)
    print(f"rank {r} valid {out['rank_valid'][str(r)]}", flush=True)
  query_map_NxR, items_NxR = u[:, :64] * s[:64], vt[:64].T
  unit_items = items_NxR / np.maximum(np.linalg.norm(items_NxR, axis=1, keepdims=True), 1e-12)
  out["rank64_cosine_valid"] = on_valid((valid_known[valid_users] @ query_map_NxR) @ unit_items.T)
  print(f"rank 64 unit items valid {out['rank64_cosine_valid']}", flush=True)
  out["rank64_history_valid"] = {}
  for length in (int(x) for x in args.history.split(",")):
    cut = subsample(valid_known[valid_users], length, args.seed)
    out["rank64_history_valid"][str(length)] = on_valid((cut @ query_map_NxR) @ items_NxR.T)
    print(f"rank 64 history {length} valid {out['rank64_history_valid'][str(length)]}", flush=True)
  out["wall_s"] = round(time.time() - start, 1)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
