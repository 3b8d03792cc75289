"""Several datasets as one (``data.source=union``): one catalog of all their items, users kept apart.

A pre-training source for transfer (UniSRec's multi-domain pre-training): the item tower sees every
part's items through their text, so a model trained on the union knows more kinds of catalog than
one trained on any part. Each part is read, filtered and split by its own source exactly as alone
(same split settings), so the union's split is the parts' splits side by side: a part's held-out
interactions and cold items are the ones it would hold out alone, and text learned from
interactions (Amazon reviews) comes from that part's training rows only.

Items and users keep their parts apart: raw ids become ``"<part>:<raw id>"``, so a user of one
part never shares a row with a user of another. Features carry over only where every part has
them on the same shared vocabulary (``Dataset.feature_vocabularies``, e.g. MovieLens genres in
ML-100K and ML-1M); the rest would mean different things in different parts and are dropped, with
one log line naming them.

A part is written ``source[:item_text][=path]``: ``ml1m:title+genres`` reads ML-1M from its
default folder under the data root with that item text; ``files=/data/shop`` reads a directory.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data.dataset import Dataset, Split

__all__ = ["Part", "parse_part", "load", "combine"]

log = logging.getLogger("jaxrec")


@dataclasses.dataclass(frozen=True)
class Part:
  source: str
  item_text: str = "default"
  path: str = ""


def parse_part(spec: str) -> Part:
  """``"source[:item_text][=path]"`` -> Part; raises ValueError naming ``data.union`` when malformed."""
  head, _, path = spec.partition("=")
  source, _, item_text = head.partition(":")
  if not source.strip() or source.strip() == "union":
    raise ValueError(f"data.union: part {spec!r} should be source[:item_text][=path], a source other than union "
                     "(e.g. ml1m:title+genres or files=/data/shop)")
  return Part(source.strip(), item_text.strip() or "default", path.strip())


def load(cfg: DataConfig, load_one: Callable[[DataConfig], tuple[Dataset, Split]]) -> tuple[Dataset, Split]:
  """Loads each of ``cfg.union``'s parts with ``load_one`` (the split settings of ``cfg``) and combines them."""
  if len(cfg.union) < 2:
    raise ValueError(f"data.source=union needs at least two parts in data.union (source[:item_text][=path], "
                     f"comma-separated); got {list(cfg.union)}")
  parts = [parse_part(spec) for spec in cfg.union]
  names = [p.source for p in parts]
  if len(set(names)) != len(names):
    raise ValueError(f"data.union names a source more than once ({', '.join(names)}): each part must be its own "
                     "dataset")
  loaded = []
  for part in parts:
    part_cfg = dataclasses.replace(cfg, source=part.source, item_text=part.item_text, path=part.path, union=())
    loaded.append(load_one(part_cfg))
  return combine(names, loaded)


def _prefixed(name: str, raw: np.ndarray) -> np.ndarray:
  return np.array([f"{name}:{r}" for r in raw.tolist()], dtype=str)


def _shared_features(names, tables, sizes, vocabularies, kind: str) -> tuple[dict, dict, dict]:
  """Features every part has on one shared vocabulary, stacked (multi-valued ones padded with 0)."""
  keep, dropped = [], set()
  for key in sorted(set().union(*tables)):
    vocabulary = {v.get(key) for v in vocabularies}
    if all(key in t for t in tables) and len(vocabulary) == 1 and None not in vocabulary:
      keep.append(key)
    else:
      dropped.add(key)
  if dropped:
    log.info("union of %s: %s features %s dropped (not in every part on one shared vocabulary)",
             "+".join(names), kind, ", ".join(sorted(dropped)))
  table, size = {}, {}
  for key in keep:
    width = max(t[key].shape[1] for t in tables)
    table[key] = np.concatenate([np.pad(t[key], ((0, 0), (0, width - t[key].shape[1]))) for t in tables])
    size[key] = max(s[key] for s in sizes)
  return table, size, {key: vocabularies[0][key] for key in keep}


def combine(names: list[str], loaded: list[tuple[Dataset, Split]]) -> tuple[Dataset, Split]:
  """The parts side by side: items, users and interactions offset by the parts before them."""
  datasets = [d for d, _ in loaded]
  item_offsets = np.cumsum([0] + [d.num_items for d in datasets])
  user_offsets = np.cumsum([0] + [d.num_users for d in datasets])
  row_offsets = np.cumsum([0] + [d.num_interactions for d in datasets])
  item_table, item_sizes, item_vocab = _shared_features(
      names, [d.item_features for d in datasets], [d.item_feature_sizes for d in datasets],
      [d.feature_vocabularies for d in datasets], "item")
  user_table, user_sizes, user_vocab = _shared_features(
      names, [d.user_features for d in datasets], [d.user_feature_sizes for d in datasets],
      [d.feature_vocabularies for d in datasets], "user")
  with_ratings = all(d.ratings is not None for d in datasets)
  dataset = Dataset(
      name="+".join(names),
      users=np.concatenate([d.users + off for d, off in zip(datasets, user_offsets)]).astype(np.int32),
      items=np.concatenate([d.items + off for d, off in zip(datasets, item_offsets)]).astype(np.int32),
      timestamps=np.concatenate([d.timestamps for d in datasets]).astype(np.int64),
      item_text=sum((tuple(d.item_text) for d in datasets), ()),
      item_titles=sum((tuple(d.item_titles) for d in datasets), ()),
      item_raw_ids=np.concatenate([_prefixed(n, d.item_raw_ids) for n, d in zip(names, datasets)]),
      user_raw_ids=np.concatenate([_prefixed(n, d.user_raw_ids) for n, d in zip(names, datasets)]),
      ratings=np.concatenate([d.ratings for d in datasets]).astype(np.float32) if with_ratings else None,
      item_features=item_table, item_feature_sizes=item_sizes,
      user_features=user_table, user_feature_sizes=user_sizes,
      has_time=all(d.has_time for d in datasets),
      feature_vocabularies={**item_vocab, **user_vocab},
  ).validate()
  splits = [s for _, s in loaded]
  split = Split(
      train=np.concatenate([s.train + off for s, off in zip(splits, row_offsets)]).astype(np.int64),
      valid=np.concatenate([s.valid + off for s, off in zip(splits, row_offsets)]).astype(np.int64),
      test=np.concatenate([s.test + off for s, off in zip(splits, row_offsets)]).astype(np.int64),
      cold_items=np.concatenate([s.cold_items for s in splits]),
      protocol="union, each part split alone: " + "; ".join(f"{n}: {s.protocol}" for n, s in zip(names, splits)),
      duplicates_dropped=sum(s.duplicates_dropped for s in splits),
  )
  return dataset, split
