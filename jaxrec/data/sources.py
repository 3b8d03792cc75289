"""From ``DataConfig`` to (Dataset, Split): the one place that knows every source.

Order matters and is the same for every source: read, filter (minimum rating, k-core), split,
and only then build any item text that is learned from interactions (Amazon reviews), from the
training rows alone.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data import filters
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.parsing import DataError
from jaxrec.data.splits import describe, make_split

__all__ = ["load", "describe"]


def _directory(cfg: DataConfig) -> str:
  if not cfg.path:
    raise DataError(f"data.source={cfg.source}", None, "data.path set to the dataset's directory", got="an empty data.path")
  return os.path.abspath(os.path.expanduser(cfg.path))


def _remap_rows(part: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """Original interaction indices -> indices after filtering (dropped rows disappear)."""
  part = part[np.isin(part, kept)]
  return np.searchsorted(kept, part).astype(np.int64)


def load(cfg: DataConfig) -> tuple[Dataset, Split]:
  cold = None
  predefined = None
  reviews = None
  if cfg.source == "synthetic":
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
  else:
    raise ValueError(f"unknown data.source {cfg.source!r}")
  if cfg.split == "predefined" and predefined is None:
    raise ValueError(f"data.split=predefined needs data.source=files (split files); got data.source={cfg.source!r}")

  applied = []
  if cfg.min_rating > 0 or cfg.kcore > 0:
    before = dataset
    dataset, kept = filters.apply(dataset, cfg.min_rating, cfg.kcore, origin)
    if cold is not None:
      cold = np.isin(dataset.item_raw_ids, before.item_raw_ids[cold])
    if predefined is not None:
      predefined = tuple(_remap_rows(p, kept) for p in predefined)
    if reviews is not None:
      reviews = reviews.take(kept)
    applied = ([f"rating>={cfg.min_rating:g}"] if cfg.min_rating > 0 else []) + ([f"{cfg.kcore}-core"] if cfg.kcore > 0 else [])

  split = make_split(dataset, cfg, cold_items=cold, predefined=predefined)
  if applied:
    split = dataclasses.replace(split, protocol=", ".join(applied) + "; " + split.protocol)
  if reviews is not None:
    from jaxrec.data import amazon
    dataset = amazon.with_training_text(dataset, reviews, split.train, cfg.item_text).validate()
  return dataset, split
