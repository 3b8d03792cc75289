"""Full-ranking metrics with RecBole's definitions, overall and split into warm and cold items.

Per user: Recall@K = hits in the top K / number of the user's test items; NDCG@K = DCG / ideal
DCG with min(#test items, K) ideal hits; MRR@K = 1 / rank of the first hit (0 if none in the top
K); Hit@K = 1 if any hit. Each is averaged over users with at least one test item. The warm/cold
breakdown ranks the full catalog once and restricts the ground truth to warm or cold items,
averaging over users with at least one such item.
"""

from __future__ import annotations

import numpy as np

METRICS = ("recall", "ndcg", "mrr", "hit")


def hit_matrix(topk_UxK: np.ndarray, users_U: np.ndarray, truth_users: np.ndarray, truth_items: np.ndarray,
               num_items: int) -> np.ndarray:
  """bool [U, K]: is ``topk[u, j]`` one of user ``users[u]``'s ground-truth items? (-1 never is)."""
  keys = users_U.astype(np.int64)[:, None] * (num_items + 1) + topk_UxK.astype(np.int64)
  truth_keys = truth_users.astype(np.int64) * (num_items + 1) + truth_items.astype(np.int64)
  return np.isin(keys, truth_keys) & (topk_UxK >= 0)


def per_user(hits_UxK: np.ndarray, num_truth_U: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Per-user metric values (float64 [U]) for users with ``num_truth > 0``."""
  out = {}
  discounts = 1.0 / np.log2(np.arange(hits_UxK.shape[1]) + 2.0)
  ideal_cumsum = np.concatenate([[0.0], np.cumsum(discounts)])
  for k in ks:
    top = hits_UxK[:, :k]
    n_hits = top.sum(1)
    out[f"recall@{k}"] = n_hits / num_truth_U
    dcg = (top * discounts[:top.shape[1]]).sum(1)
    out[f"ndcg@{k}"] = dcg / ideal_cumsum[np.minimum(num_truth_U, top.shape[1])]
    first = np.where(top.any(1), top.argmax(1), -1)
    out[f"mrr@{k}"] = np.where(first >= 0, 1.0 / (np.maximum(first, 0) + 1.0), 0.0)
    out[f"hit@{k}"] = (n_hits > 0).astype(np.float64)
  return out


class RankingAccumulator:
  """Sums per-user metrics batch by batch, overall and per item group (e.g. warm/cold)."""

  def __init__(self, ks: tuple[int, ...], num_items: int, groups: dict[str, np.ndarray] | None = None):
    self.ks, self.num_items = tuple(sorted(ks)), num_items
    self.groups = {"": None, **{f"{name}/": mask for name, mask in (groups or {}).items()}}
    self.sums = {prefix: {} for prefix in self.groups}
    self.users = {prefix: 0 for prefix in self.groups}
    self.recommended = {k: np.zeros(num_items, bool) for k in self.ks}

  def add(self, topk_UxK: np.ndarray, users_U: np.ndarray, truth_users: np.ndarray, truth_items: np.ndarray,
          candidates_U: np.ndarray | None = None) -> None:
    """``truth_users``/``truth_items``: the (user, item) ground-truth pairs of these users.

    With ``candidates_U`` (how many items each user's ranking chose from), also sums the Recall@K
    a uniformly random ranking would reach in expectation, K / candidates: the chance level.
    """
    for k in self.ks:
      ids = topk_UxK[:, :k]
      self.recommended[k][ids[ids >= 0]] = True
    for prefix, mask in self.groups.items():
      keep = np.ones(len(truth_items), bool) if mask is None else mask[truth_items]
      t_users, t_items = truth_users[keep], truth_items[keep]
      num_truth = np.bincount(np.searchsorted(users_U, t_users), minlength=len(users_U)) if len(t_users) else np.zeros(len(users_U), int)
      has = num_truth > 0
      if not has.any():
        continue
      hits = hit_matrix(topk_UxK[has], users_U[has], t_users, t_items, self.num_items)
      values_by_name = per_user(hits, num_truth[has], self.ks)
      if candidates_U is not None:
        cand = np.maximum(candidates_U[has], 1).astype(np.float64)
        values_by_name.update({f"chance_recall@{k}": np.minimum(k, cand) / cand for k in self.ks})
      for name, values in values_by_name.items():
        self.sums[prefix][name] = self.sums[prefix].get(name, 0.0) + float(values.sum())
      self.users[prefix] += int(has.sum())

  def result(self) -> dict[str, float]:
    out = {}
    for prefix, sums in self.sums.items():
      n = self.users[prefix]
      if n == 0:
        continue
      for name, total in sums.items():
        out[prefix + name] = total / n
      out[prefix + "users"] = n
    for k in self.ks:
      out[f"coverage@{k}"] = float(self.recommended[k].mean())
    return out
