"""Train/valid/test protocols: random ratio per user (RecBole's default), temporal ratio per user,
temporal leave-one-out, and cold items whose every interaction is kept out of training."""

from __future__ import annotations

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data.dataset import Dataset, Split


def _ratio_counts(total: int, ratios: tuple[float, ...]) -> list[int]:
  """RecBole's ``_calcu_split_ids``: floor each part, give the rest to train, and let a
  small part that rounded to zero take one interaction while train keeps more than one."""
  counts = [int(r * total) for r in ratios]
  counts[0] = total - sum(counts[1:])
  for i in range(1, len(ratios)):
    if counts[0] <= 1:
      break
    if 0 < ratios[-i] * total < 1:
      counts[-i] += 1
      counts[0] -= 1
  return counts


def _user_groups(dataset: Dataset, rng: np.random.Generator | None) -> list[np.ndarray]:
  """Interaction indices per user; time-ordered, or shuffled when ``rng`` is given."""
  order = np.lexsort((np.arange(dataset.num_interactions), dataset.timestamps, dataset.users))
  bounds = np.searchsorted(dataset.users[order], np.arange(dataset.num_users + 1))
  groups = [order[bounds[u]:bounds[u + 1]] for u in range(dataset.num_users)]
  if rng is not None:
    groups = [rng.permutation(g) for g in groups]
  return groups


def _cut_by_ratio(groups: list[np.ndarray], ratios: tuple[float, ...]) -> tuple[np.ndarray, ...]:
  """Each group's leading ``_ratio_counts`` to train, the next to valid, the rest to test."""
  parts = ([], [], [])
  for group in groups:
    if len(group) == 0:
      continue
    bounds = np.cumsum(_ratio_counts(len(group), ratios))[:-1]
    for part, chunk in zip(parts, np.split(group, bounds)):
      part.append(chunk)
  return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts)


def random_split(dataset: Dataset, ratios: tuple[float, ...], seed: int) -> tuple[np.ndarray, ...]:
  return _cut_by_ratio(_user_groups(dataset, np.random.default_rng(seed)), ratios)


def temporal_split(dataset: Dataset, ratios: tuple[float, ...]) -> tuple[np.ndarray, ...]:
  """Each user's interactions in time order (ties by interaction index), cut by ``ratios``: the
  earliest go to train, the next to valid, the latest to test (RecBole's "TO + RS, group_by user").

  The per-user counts are ``_ratio_counts``, the same rounding as the random split: valid gets
  ``floor(r_valid * n)``, test ``floor(r_test * n)``, train the rest; then test, and after it valid,
  takes one interaction from train if its share ``r * n`` lies in (0, 1) and train still holds more
  than one. With 8:1:1 that gives, for n = 1, 2, 3, 4, 10, 19, 20: 1/0/0, 1/0/1, 1/1/1, 2/1/1,
  8/1/1, 17/1/1, 16/2/2. So whenever ``r_train > 0`` every user keeps at least their earliest
  interaction in train (the floors sum to at most ``(1 - r_train) * n < n``, and the top-up
  never empties train); with 8:1:1 a user with n >= 3 gets one of each part and a user with 1
  or 2 keeps the earliest in train (and with 2, the latest is test).
  """
  return _cut_by_ratio(_user_groups(dataset, None), ratios)


def leave_one_out(dataset: Dataset) -> tuple[np.ndarray, ...]:
  """Last interaction in time -> test, second to last -> valid; users with < 3 stay in train."""
  train, valid, test = [], [], []
  for group in _user_groups(dataset, None):
    if len(group) < 3:
      train.append(group)
      continue
    train.append(group[:-2])
    valid.append(group[-2:-1])
    test.append(group[-1:])
  return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in (train, valid, test))


def make_split(dataset: Dataset, cfg: DataConfig, cold_items: np.ndarray | None = None,
               predefined: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Split:
  """Applies ``cfg.split``, then the cold-item hold-out, then ``cfg.train_fraction``."""
  if cfg.split == "random":
    train, valid, test = random_split(dataset, cfg.split_ratios, cfg.split_seed)
    protocol = "random " + ":".join(f"{r:g}" for r in cfg.split_ratios) + " per user"
  elif cfg.split == "loo":
    if not dataset.has_time:
      raise ValueError(f"data.split=loo needs timestamps, but dataset {dataset.name!r} has none")
    train, valid, test = leave_one_out(dataset)
    protocol = "temporal leave-one-out"
  elif cfg.split == "temporal":
    if not dataset.has_time:
      raise ValueError(f"data.split=temporal needs timestamps, but dataset {dataset.name!r} has none")
    train, valid, test = temporal_split(dataset, cfg.split_ratios)
    protocol = "temporal " + ":".join(f"{r:g}" for r in cfg.split_ratios) + " per user"
  elif cfg.split == "predefined":
    if predefined is None:
      raise ValueError(f"data.split=predefined needs train/valid/test files; source {cfg.source!r} gave none")
    train, valid, test = predefined
    protocol = "predefined files"
  else:
    raise ValueError(f"unknown data.split {cfg.split!r}")

  cold = np.zeros(dataset.num_items, bool) if cold_items is None else cold_items.copy()
  if cfg.cold_item_fraction > 0:
    rng = np.random.default_rng(cfg.split_seed + 1)
    n_extra = int(round(cfg.cold_item_fraction * dataset.num_items))
    cold[rng.choice(dataset.num_items, size=n_extra, replace=False)] = True
  if cold.any():
    # Every interaction with a cold item is evaluated, none is trained on or validated.
    is_cold = cold[dataset.items]
    test = np.union1d(test, np.concatenate([train[is_cold[train]], valid[is_cold[valid]]]))
    train, valid = train[~is_cold[train]], valid[~is_cold[valid]]
    protocol += f", {int(cold.sum())} cold items held out"

  if cfg.train_fraction < 1.0:
    rng = np.random.default_rng(cfg.split_seed + 2)
    keep = rng.random(len(train)) < cfg.train_fraction
    train = train[keep]
    protocol += f", {cfg.train_fraction:g} of training interactions"
  if len(train) == 0:
    raise ValueError(f"dataset {dataset.name!r}: the split left no training interactions")
  return Split(train=train, valid=valid, test=test, cold_items=cold, protocol=protocol)


def describe(dataset: Dataset, split: Split) -> dict:
  """The protocol and the counts it produced, as flat ``data/*`` keys for ``metrics.json``."""
  in_train = np.zeros(dataset.num_items, bool)
  in_train[dataset.items[split.train]] = True
  return {
      "data/name": dataset.name,
      "data/protocol": split.protocol,
      "data/has_time": bool(dataset.has_time),
      "data/users": dataset.num_users,
      "data/items": dataset.num_items,
      "data/interactions": dataset.num_interactions,
      "data/duplicates_dropped": int(split.duplicates_dropped),
      "data/density": dataset.num_interactions / max(1, dataset.num_users * dataset.num_items),
      "data/train": int(len(split.train)),
      "data/valid": int(len(split.valid)),
      "data/test": int(len(split.test)),
      "data/train_users": int(len(np.unique(dataset.users[split.train]))),
      "data/test_users": int(len(np.unique(dataset.users[split.test]))),
      "data/cold_items": int(split.cold_items.sum()),
      "data/cold_test": int(split.cold_items[dataset.items[split.test]].sum()),
      "data/items_without_train": int((~in_train).sum()),
  }
