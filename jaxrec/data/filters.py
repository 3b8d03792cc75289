"""Interaction filters applied before splitting: minimum rating and k-core (as RecBole's
``val_interval`` / ``user_inter_num_interval`` + ``item_inter_num_interval``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data.dataset import Dataset
from jaxrec.data.parsing import DataError


def subset(dataset: Dataset, rows: np.ndarray, keep_users: np.ndarray, keep_items: np.ndarray) -> Dataset:
  """Keeps interactions ``rows`` (bool [I]) and users/items masks (bool), re-indexing densely.
  Every kept row must belong to a kept user and item."""
  user_map = np.cumsum(keep_users, dtype=np.int64) - 1
  item_map = np.cumsum(keep_items, dtype=np.int64) - 1
  item_idx = np.flatnonzero(keep_items)
  return dataclasses.replace(
      dataset,
      users=user_map[dataset.users[rows]].astype(np.int32),
      items=item_map[dataset.items[rows]].astype(np.int32),
      timestamps=dataset.timestamps[rows],
      ratings=None if dataset.ratings is None else dataset.ratings[rows],
      item_text=tuple(dataset.item_text[i] for i in item_idx),
      item_titles=tuple(dataset.item_titles[i] for i in item_idx),
      item_raw_ids=dataset.item_raw_ids[keep_items],
      user_raw_ids=dataset.user_raw_ids[keep_users],
      item_features={k: v[keep_items] for k, v in dataset.item_features.items()},
      user_features={k: v[keep_users] for k, v in dataset.user_features.items()},
      item_numeric={k: v[keep_items] for k, v in dataset.item_numeric.items()},
      user_numeric={k: v[keep_users] for k, v in dataset.user_numeric.items()},
      context_features={k: v[rows] for k, v in dataset.context_features.items()},
      context_numeric={k: v[rows] for k, v in dataset.context_numeric.items()},
  )


def first_of_each_pair(dataset: Dataset) -> np.ndarray:
  """Rows, ascending, that keep each (user, item) pair's earliest interaction (ties: file order)."""
  rows = np.arange(dataset.num_interactions)
  order = np.lexsort((rows, dataset.timestamps, dataset.items, dataset.users))
  users, items = dataset.users[order], dataset.items[order]
  first = np.ones(len(order), bool)
  first[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
  return np.sort(order[first])


def _nonempty(dataset: Dataset, source: str, what: str) -> Dataset:
  if dataset.num_interactions == 0:
    raise DataError(source, None, f"some interactions left after {what}", got="none")
  return dataset.validate()


def apply(dataset: Dataset, threshold: float, k: int, source: str) -> tuple[Dataset, np.ndarray]:
  """Minimum rating, then k-core; returns the filtered dataset and the original row of each
  interaction it kept (so per-interaction side data such as review text can follow)."""
  rows = np.arange(dataset.num_interactions)
  if threshold > 0:
    dataset, kept = min_rating(dataset, threshold, source)
    rows = rows[kept]
  if k > 0:
    dataset, kept = kcore(dataset, k, source)
    rows = rows[kept]
  return dataset, rows


def min_rating(dataset: Dataset, threshold: float, source: str) -> tuple[Dataset, np.ndarray]:
  """Keeps ratings >= threshold; users left without interactions go, the item catalog stays."""
  if dataset.ratings is None:
    raise DataError(source, None, f"ratings for data.min_rating={threshold:g}",
                    got=f"dataset {dataset.name!r} without ratings (implicit pairs only)")
  rows = dataset.ratings >= threshold
  users = np.bincount(dataset.users[rows], minlength=dataset.num_users) > 0
  out = subset(dataset, rows, users, np.ones(dataset.num_items, bool))
  return _nonempty(out, source, f"data.min_rating={threshold:g}"), np.flatnonzero(rows)


def kcore(dataset: Dataset, k: int, source: str) -> tuple[Dataset, np.ndarray]:
  """Repeatedly drops users and items with fewer than ``k`` interactions until none remain."""
  rows = np.ones(dataset.num_interactions, bool)
  while True:
    users = np.bincount(dataset.users[rows], minlength=dataset.num_users) >= k
    items = np.bincount(dataset.items[rows], minlength=dataset.num_items) >= k
    keep = rows & users[dataset.users] & items[dataset.items]
    if keep.sum() == rows.sum():
      break
    rows = keep
  out = subset(dataset, rows, users, items)
  return _nonempty(out, source, f"data.kcore={k}"), np.flatnonzero(rows)
