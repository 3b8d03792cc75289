"""TensorFlow Datasets builders (e.g. ``movielens/100k-ratings``) as a ``Dataset``.

Reads through ``builder.as_data_source`` (array_record random access), which needs neither
TensorFlow nor a network: the dataset must already be prepared in ``$TFDS_DATA_DIR`` in
array_record format. We never call ``download_and_prepare``; offline it retries for minutes.

Feature names follow the movielens builder; other builders work when they use the same names
(``user_id`` plus ``movie_id`` or ``item_id``; title, rating, time and user features optional).
"""

from __future__ import annotations

import numpy as np

from jaxrec.data.dataset import Dataset
from jaxrec.data.movielens import AGE_EDGES, DEFAULT_TEXT
from jaxrec.data.parsing import DataError

_ITEM_KEYS = ("movie_id", "item_id")
_TITLE_KEYS = ("movie_title", "item_title", "title")
_RATING_KEYS = ("user_rating", "rating")
FIELDS = ("title", "genres")


def import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("data.source=tfds needs tensorflow-datasets: pip install 'jaxrec[tfds]' "
                      f"(tensorflow itself is not required); import failed: {e}") from e
  return tfds


def _builder(tfds, name: str, data_dir: str | None):
  expected = "a registered TFDS builder name such as movielens/100k-ratings"
  for attempt in range(2):
    try:
      return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      if attempt:
        raise DataError(name, None, expected, got="no such builder") from None
      # Structured builders such as movielens register only when their package is imported.
      import tensorflow_datasets.structured  # noqa: F401
    except ValueError as e:  # a malformed name
      raise DataError(name, None, expected, got=str(e).splitlines()[0]) from None


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load(name: str, item_text: str = "default", split: str = "train", data_dir: str | None = None) -> Dataset:
  """``data_dir`` None means TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  tfds = import_tfds()
  fields = tuple((DEFAULT_TEXT if item_text in ("", "default") else item_text).split("+"))
  if any(f not in FIELDS for f in fields):
    raise ValueError(f"data.item_text={item_text!r}: choose 'default' or fields joined by '+' from {', '.join(FIELDS)}")
  builder = _builder(tfds, name, data_dir)
  features = builder.info.features
  item_key = next((k for k in _ITEM_KEYS if k in features), None)
  if "user_id" not in features or item_key is None:
    raise DataError(name, None, "features user_id and movie_id or item_id", got=f"features {sorted(features)}")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # tfds raises several unrelated types for "not prepared here"
    raise DataError(name, None, f"split {split!r} prepared as array_record under $TFDS_DATA_DIR "
                    f"(run `tfds build {name} --file_format=array_record` on a connected machine)",
                    got=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  # Decoding each example dominates; batched __getitems__ would not make it faster.
  records = [source[i] for i in range(len(source))]
  if not records:
    raise DataError(name, None, f"examples in split {split!r}", got="none")
  title_key = next((k for k in _TITLE_KEYS if k in features), None)
  rating_key = next((k for k in _RATING_KEYS if k in features), None)

  user_raw, users = np.unique(np.asarray([_text(r["user_id"]) for r in records], str), return_inverse=True)
  item_raw, first, items = np.unique(np.asarray([_text(r[item_key]) for r in records], str),
                                     return_index=True, return_inverse=True)
  titles = [_text(records[i][title_key]) if title_key else str(item_raw[j]) for j, i in enumerate(first)]
  has_time = "timestamp" in features
  stamps = (np.asarray([int(r["timestamp"]) for r in records], np.int64) if has_time
            else np.arange(len(records), dtype=np.int64))
  ratings = np.asarray([float(r[rating_key]) for r in records], np.float32) if rating_key else None

  item_features, item_sizes, genre_names = {}, {}, []
  if "movie_genres" in features:
    genre_names = list(features["movie_genres"].feature.names)
    lists = [np.asarray(records[i]["movie_genres"], np.int64).reshape(-1) for i in first]
    width = max(1, max(len(g) for g in lists))
    table = np.zeros((len(first), width), np.int32)
    for row, g in enumerate(lists):
      table[row, :len(g)] = g + 1
    item_features["genre"], item_sizes["genre"] = table, len(genre_names) + 1

  user_first = np.unique(users, return_index=True)[1]
  user_features, user_sizes = {}, {}
  if "user_gender" in features:
    # movielens stores gender as a bool "is male".
    user_features["gender"] = np.asarray([2 - int(bool(records[i]["user_gender"])) for i in user_first], np.int32)[:, None]
    user_sizes["gender"] = 3
  if "bucketized_user_age" in features:
    ages = np.asarray([float(records[i]["bucketized_user_age"]) for i in user_first])
    user_features["age"] = (np.searchsorted(np.asarray(AGE_EDGES), ages, side="right") + 1).astype(np.int32)[:, None]
    user_sizes["age"] = len(AGE_EDGES) + 2
  if "user_occupation_label" in features:
    user_features["occupation"] = np.asarray([int(records[i]["user_occupation_label"]) + 1 for i in user_first], np.int32)[:, None]
    user_sizes["occupation"] = features["user_occupation_label"].num_classes + 1

  texts = []
  for row, title in enumerate(titles):
    parts = [f"{title}."] if "title" in fields else []
    if "genres" in fields and genre_names:
      names = [genre_names[g - 1] for g in item_features["genre"][row] if g > 0]
      if names:
        parts.append(f"Genres: {', '.join(names)}.")
    texts.append(" ".join(parts) or title)
  return Dataset(
      name=name, users=users.astype(np.int32), items=items.astype(np.int32), timestamps=stamps, ratings=ratings,
      item_text=tuple(texts), item_titles=tuple(titles), item_raw_ids=item_raw, user_raw_ids=user_raw,
      item_features=item_features, item_feature_sizes=item_sizes,
      user_features=user_features, user_feature_sizes=user_sizes, has_time=has_time,
  ).validate()
