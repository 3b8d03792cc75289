"""From ``DataConfig`` to (Dataset, Split): the one place that knows every source.

Order matters and is the same for every source: read, resolve repeated (user, item) rows
(``data.duplicates``), filter (minimum rating, k-core), split, and only then build any item text
that is learned from interactions (Amazon reviews), from the training rows alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data import filters
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.parsing import DataError
from jaxrec.data.splits import describe, make_split

__all__ = ["load", "describe"]

log = logging.getLogger("jaxrec")


# Where a source's folder sits under the data root ($JAXREC_DATA, else ../shared/data) when
# data.path is empty: the layout the real-data configs and CI use.
DEFAULT_FOLDERS = {"ml100k": "ml-100k", "ml1m": "ml-1m", "amazon": "amazon-musical-instruments-5core"}


def _directory(cfg: DataConfig) -> str:
  if not cfg.path and cfg.source in DEFAULT_FOLDERS:
    from jaxrec.config import data_root
    path = os.path.join(data_root(), DEFAULT_FOLDERS[cfg.source])
    log.info("data.path is empty: reading data.source=%s from %s", cfg.source, path)
    return os.path.abspath(path)
  if not cfg.path:
    raise DataError(f"data.source={cfg.source}", None, "data.path set to the dataset's directory", got="an empty data.path")
  return os.path.abspath(os.path.expanduser(cfg.path))


def _remap_rows(part: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """Original interaction indices -> indices after filtering (dropped rows disappear)."""
  part = part[np.isin(part, kept)]
  return np.searchsorted(kept, part).astype(np.int64)


def _interactions_file(cfg: DataConfig, origin: str, row: int, predefined) -> str:
  """The file that holds interaction ``row`` as read (before any row was dropped)."""
  if cfg.source == "ml100k":
    return os.path.join(origin, "u.data")
  if cfg.source == "ml1m":
    ratings = os.path.join(origin, "ratings.dat")
    return ratings if os.path.isfile(ratings) else os.path.join(origin, "interactions_implicit.tsv")
  if cfg.source == "amazon":
    from jaxrec.data import amazon
    return amazon.review_file(origin)
  if cfg.source == "table":
    return os.path.join(origin, cfg.table.interactions)
  if cfg.source == "files":
    from jaxrec.data import files
    split = next(name for name, rows in zip(files.SPLITS, predefined) if np.isin(row, rows))
    return files.find_split(origin, split)
  return origin


def _raw(ids: np.ndarray, index: int) -> str:
  return repr(ids[index].item())


def _resolve_duplicates(cfg: DataConfig, dataset: Dataset, origin: str, predefined) -> np.ndarray | None:
  """Bool [I] rows to keep under ``cfg.duplicates`` (None = all), after raising or warning about repeats."""
  if cfg.duplicates not in ("keep", "drop", "error"):
    raise ValueError(f"unknown data.duplicates {cfg.duplicates!r}; choose keep, drop or error")
  if cfg.duplicates == "keep":
    return None
  keep = np.zeros(dataset.num_interactions, bool)
  keep[filters.first_of_each_pair(dataset)] = True
  dropped = int((~keep).sum())
  if dropped == 0:
    return None
  repeat = int(np.argmin(keep))
  file = _interactions_file(cfg, origin, repeat, predefined)
  pair = (f"user {_raw(dataset.user_raw_ids, dataset.users[repeat])}, "
          f"item {_raw(dataset.item_raw_ids, dataset.items[repeat])}")
  if cfg.duplicates == "error":
    raise DataError(file, None, "each (user, item) pair once (data.duplicates=error; drop keeps the earliest)",
                    got=f"{dropped} repeated row(s), the first for {pair}")
  log.warning("%s: dropped %d repeated (user, item) row(s), keeping the earliest of each pair (first: %s); "
              "data.duplicates=keep trains on them", file, dropped, pair)
  return keep


def load(cfg: DataConfig, dataset: Dataset | None = None) -> tuple[Dataset, Split]:
  """``cfg``'s dataset and split; with ``dataset`` (built in Python: ``Dataset.from_frames``) that
  dataset instead of ``cfg.source``'s, split (and filtered) by ``cfg`` as a source's would be."""
  cold = None
  predefined = None
  reviews = None
  if dataset is not None:
    origin = dataset.validate().name
  elif cfg.source == "union":
    from jaxrec.data import union
    return union.load(cfg, load)
  elif cfg.source == "synthetic":
    from jaxrec.data import synthetic
    dataset, cold = synthetic.generate(cfg.synthetic)
    origin = "synthetic"
  elif cfg.source == "ml100k":
    from jaxrec.data import movielens
    origin = _directory(cfg)
    dataset = movielens.load_ml100k(origin, cfg.item_text)
  elif cfg.source == "ml1m":
    from jaxrec.data import movielens
    origin = _directory(cfg)
    dataset = movielens.load_ml1m(origin, cfg.item_text)
  elif cfg.source == "amazon":
    from jaxrec.data import amazon
    amazon.text_fields(cfg.item_text)  # a typo should fail before minutes of parsing and splitting
    origin = _directory(cfg)
    dataset, reviews = amazon.load(origin)
  elif cfg.source == "tfds":
    from jaxrec.data import tfds
    origin = cfg.path or "movielens/100k-ratings"
    dataset = tfds.load(origin, cfg.item_text)
  elif cfg.source == "files":
    from jaxrec.data import files
    origin = _directory(cfg)
    dataset, predefined, cold = files.load(origin)
    if cfg.split != "predefined":  # the peer's test-only items are cold only under the peer's split
      cold = None
  elif cfg.source == "table":
    from jaxrec.data import table
    origin = _directory(cfg)
    dataset = table.load(origin, cfg.table)
  else:
    raise ValueError(f"unknown data.source {cfg.source!r}")
  if cfg.split == "predefined" and predefined is None:
    raise ValueError(f"data.split=predefined needs data.source=files (split files); got data.source={cfg.source!r}")

  applied = []
  duplicates_dropped = 0
  keep = _resolve_duplicates(cfg, dataset, origin, predefined)
  if keep is not None:
    unique_rows = np.flatnonzero(keep)
    duplicates_dropped = dataset.num_interactions - len(unique_rows)
    everyone, every_item = np.ones(dataset.num_users, bool), np.ones(dataset.num_items, bool)
    dataset = filters.subset(dataset, keep, everyone, every_item).validate()
    if predefined is not None:
      predefined = tuple(_remap_rows(p, unique_rows) for p in predefined)
    if reviews is not None:
      reviews = reviews.take(unique_rows)
    applied.append(f"{duplicates_dropped} repeated pairs dropped")
  if cfg.min_rating > 0 or cfg.kcore > 0:
    before = dataset
    dataset, kept = filters.apply(dataset, cfg.min_rating, cfg.kcore, origin)
    if cold is not None:
      cold = np.isin(dataset.item_raw_ids, before.item_raw_ids[cold])
    if predefined is not None:
      predefined = tuple(_remap_rows(p, kept) for p in predefined)
    if reviews is not None:
      reviews = reviews.take(kept)
    applied += ([f"rating>={cfg.min_rating:g}"] if cfg.min_rating > 0 else []) + ([f"{cfg.kcore}-core"] if cfg.kcore > 0 else [])

  split = make_split(dataset, cfg, cold_items=cold, predefined=predefined)
  split = dataclasses.replace(split, duplicates_dropped=duplicates_dropped)
  if applied:
    split = dataclasses.replace(split, protocol=", ".join(applied) + "; " + split.protocol)
  if reviews is not None:
    from jaxrec.data import amazon
    dataset = amazon.with_training_text(dataset, reviews, split.train, cfg.item_text).validate()
  from jaxrec.data.table import standardise_numeric  # numeric features' statistics: the training rows only
  dataset = standardise_numeric(dataset, split)
  return dataset, split
