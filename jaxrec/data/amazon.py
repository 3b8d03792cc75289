"""Amazon review data (McAuley et al. 2014, 5-core JSON lines) as a ``Dataset``.

These files carry no item metadata, so an item is described by what reviewers wrote about it.
That text must come from TRAINING reviews only: a test review's words would tell the model which
items the test users picked. ``load`` therefore returns the reviews beside a dataset whose item
text is empty, and ``with_training_text`` fills it in once the split is known.

``data.item_text``: ``default`` or fields joined by ``+`` from ``summaries`` (review titles) and
``reviews`` (review bodies), e.g. ``summaries`` alone for short texts.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

from jaxrec.data.dataset import Dataset
from jaxrec.data.parsing import DataError, decode, json_lines, read_bytes, strip_bom

FIELDS = ("summaries", "reviews")
DEFAULT_TEXT = "summaries+reviews"
# The text encoder reads at most a few hundred tokens; longer strings only bloat the cache.
MAX_TEXT_CHARS = 2000
NO_REVIEWS = "No reviews yet."
_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime")


@dataclasses.dataclass(frozen=True)
class Reviews:
  """Per-interaction review text, parallel to the dataset's interaction arrays."""

  summaries: tuple[str, ...]
  texts: tuple[str, ...]
  helpful: np.ndarray  # int64 [I] helpful votes, used to put the most useful reviews first

  def take(self, rows: np.ndarray) -> "Reviews":
    return Reviews(tuple(self.summaries[r] for r in rows), tuple(self.texts[r] for r in rows), self.helpful[rows])


def text_fields(spec: str) -> tuple[str, ...]:
  fields = tuple((DEFAULT_TEXT if spec in ("", "default") else spec).split("+"))
  unknown = [f for f in fields if f not in FIELDS]
  if unknown:
    raise ValueError(f"data.item_text={spec!r}: unknown field(s) {', '.join(unknown)}; "
                     f"choose 'default' or fields joined by '+' from {', '.join(FIELDS)}")
  return fields


def review_file(path: str) -> str:
  """``path`` itself, or the one ``*.json`` / ``*.json.gz`` file in the directory ``path``."""
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.endswith((".json", ".json.gz")))
    if len(found) != 1:
      raise DataError(path, None, "a directory with exactly one Amazon reviews *.json or *.json.gz file",
                      got=f"{len(found)} such files" + (f" ({', '.join(found)})" if found else ""))
    return os.path.join(path, found[0])
  return path


def load(path: str, name: str = "amazon") -> tuple[Dataset, Reviews]:
  path = review_file(path)
  data = read_bytes(path, "Amazon reviews as JSON lines (reviewerID, asin, overall, unixReviewTime, ...)")
  if path.endswith(".gz"):
    try:
      data = strip_bom(gzip.decompress(data))
    except (OSError, EOFError) as e:
      raise DataError(path, None, "a complete gzip file", got=str(e)) from None
  text = decode(data, path, ("utf-8",))
  users, items, stamps, ratings, summaries, bodies, helpful = [], [], [], [], [], [], []
  expected = "one JSON object per line with " + ", ".join(_KEYS)
  for number, record in json_lines(text, path, expected):
    missing = [k for k in _KEYS if k not in record]
    if missing:
      raise DataError(path, number, expected, got=f"no {', '.join(missing)}")
    try:
      stamps.append(int(record["unixReviewTime"]))
      ratings.append(float(record["overall"]))
    except (TypeError, ValueError):
      raise DataError(path, number, "a numeric overall and an integer unixReviewTime",
                      got=f"{record['overall']!r} and {record['unixReviewTime']!r}") from None
    users.append(str(record["reviewerID"]))
    items.append(str(record["asin"]))
    summaries.append(str(record.get("summary") or "").strip())
    bodies.append(str(record.get("reviewText") or "").strip())
    votes = record.get("helpful") or [0, 0]
    helpful.append(int(votes[0]) if isinstance(votes, list) and votes and isinstance(votes[0], int) else 0)

  user_raw, user_idx = np.unique(np.asarray(users, dtype=str), return_inverse=True)
  item_raw, item_idx = np.unique(np.asarray(items, dtype=str), return_inverse=True)
  dataset = Dataset(
      name=name,
      users=user_idx.astype(np.int32), items=item_idx.astype(np.int32),
      timestamps=np.asarray(stamps, np.int64), ratings=np.asarray(ratings, np.float32),
      item_text=("",) * len(item_raw), item_titles=tuple(str(a) for a in item_raw),
      item_raw_ids=item_raw, user_raw_ids=user_raw,
      has_time=True,
  )
  if dataset.num_interactions == 0:
    raise DataError(path, None, expected, got="no reviews")
  return dataset.validate(), Reviews(tuple(summaries), tuple(bodies), np.asarray(helpful, np.int64))


def with_training_text(dataset: Dataset, reviews: Reviews, train: np.ndarray, spec: str = "default") -> Dataset:
  """Item text from the ``train`` interactions' reviews only: most helpful first, then oldest."""
  fields = text_fields(spec)
  order = np.lexsort((train, dataset.timestamps[train], -reviews.helpful[train], dataset.items[train]))
  rows = train[order]
  bounds = np.searchsorted(dataset.items[rows], np.arange(dataset.num_items + 1))
  texts = []
  for item in range(dataset.num_items):
    mine = rows[bounds[item]:bounds[item + 1]]
    parts = []
    if "summaries" in fields:
      parts.extend(s.rstrip(".!?") + "." for s in (reviews.summaries[r] for r in mine) if s)
    if "reviews" in fields:
      parts.extend(t for t in (reviews.texts[r] for r in mine) if t)
    text = " ".join(parts)[:MAX_TEXT_CHARS]
    texts.append(text or NO_REVIEWS)
  return dataclasses.replace(dataset, item_text=tuple(texts))
