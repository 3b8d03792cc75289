"""The one in-memory structure every data source returns.

Interactions are compact parallel numpy arrays (no per-example Python objects), indexed densely:
users are ``0..num_users-1`` and items ``0..num_items-1``. The original ids are kept in
``user_raw_ids`` / ``item_raw_ids`` so the CLI can speak the dataset's own ids.

Categorical features are int32 tables of shape ``[rows, M]``: ``M`` values per row (``M = 1`` for a
single-valued feature such as gender, ``M > 1`` for multi-valued ones such as genres), with ``0``
reserved for padding/unknown. Their vocabulary sizes (including the 0 row) are in ``*_feature_sizes``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  users: np.ndarray  # int32 [I] dense user index per interaction
  items: np.ndarray  # int32 [I] dense item index per interaction
  timestamps: np.ndarray  # int64 [I]; file order when the source has no time
  item_text: tuple[str, ...]  # [num_items] text fed to the text encoder
  item_titles: tuple[str, ...]  # [num_items] short human-readable names
  item_raw_ids: np.ndarray  # [num_items] ids as in the source files
  user_raw_ids: np.ndarray  # [num_users]
  ratings: np.ndarray | None = None  # float32 [I]
  item_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  item_feature_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  user_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  user_feature_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  has_time: bool = True  # False when timestamps are only file order
  # Feature name -> the name of its vocabulary where value i means the same thing in every dataset
  # built on that vocabulary (MovieLens genres in ML-100K and ML-1M): such features carry across
  # datasets (``transfer.py``). Features not named here are this dataset's own.
  feature_vocabularies: dict[str, str] = dataclasses.field(default_factory=dict)
  # Numeric features: name -> float32 [rows], NaN where the value is missing. A source gives raw
  # values; ``sources.load`` standardises them on the training split (``standardise_numeric``), and
  # the towers impute the missing ones (0, the training mean) and read a missing flag beside each.
  item_numeric: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  user_numeric: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # Per-interaction context (the query's c_v: device, hour of day), [I, M] int32 ids / float32 [I].
  context_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  context_feature_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  context_numeric: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # "item:<name>" / "user:<name>" / "context:<name>" -> (mean, std) the numeric feature was standardised
  # with (training split): how a server standardises a new user's raw value.
  numeric_stats: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_frames(cls, interactions, items=None, users=None, *, name: str = "frames", **roles) -> "Dataset":
    """A dataset from in-memory tables: pandas DataFrames, pyarrow Tables or dicts of arrays/lists.

    ``roles`` name the columns exactly as ``data.table.*`` does (``TableConfig``): ``user`` and
    ``item`` (default ``"user"``/``"item"``), ``time``, ``label``, ``item_text``, ``item_title``,
    ``item_categorical``, ``item_numeric``, ``user_categorical``, ``user_numeric``,
    ``context_categorical``, ``context_numeric`` (lists of column names) and ``multi_value_sep``.
    A categorical cell may also hold a list of values. Numeric features stay raw here;
    ``jaxrec.train(cfg, dataset=ds)`` splits the dataset by ``cfg.data`` and standardises them on
    its training split. Errors name the table (``interactions``/``items``/``users``), row and column.
    """
    from jaxrec.config import TableConfig
    from jaxrec.data import table
    fields = {f.name: f.type for f in dataclasses.fields(TableConfig)}
    unknown = sorted(set(roles) - set(fields) - {"interactions", "items", "users"}) + \
        sorted({"interactions", "items", "users"} & set(roles))
    if unknown:
      raise TypeError(f"Dataset.from_frames: unknown column role(s) {', '.join(unknown)}; roles are "
                      f"{', '.join(k for k in fields if k not in ('interactions', 'items', 'users'))}")
    roles = {k: (v,) if isinstance(v, str) and k not in ("user", "item", "time", "label", "item_title",
                                                        "multi_value_sep") else
             tuple(v) if isinstance(v, (list, tuple)) else v for k, v in roles.items()}
    cfg = TableConfig(**roles, items="items" if items is not None else "", users="users" if users is not None else "")
    return table.build(table.frame_table(interactions, "interactions"),
                       None if items is None else table.frame_table(items, "items"),
                       None if users is None else table.frame_table(users, "users"), cfg, name)

  @property
  def num_users(self) -> int:
    return len(self.user_raw_ids)

  @property
  def num_items(self) -> int:
    return len(self.item_raw_ids)

  @property
  def num_interactions(self) -> int:
    return len(self.users)

  def validate(self) -> "Dataset":
    """Checks shapes and index ranges; raises ValueError naming the field."""
    n = len(self.users)
    for field in ("items", "timestamps"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"dataset {self.name!r}: {field} has {len(getattr(self, field))} rows, users has {n}")
    if self.ratings is not None and len(self.ratings) != n:
      raise ValueError(f"dataset {self.name!r}: ratings has {len(self.ratings)} rows, users has {n}")
    if n == 0:
      raise ValueError(f"dataset {self.name!r} has no interactions")
    if self.users.min() < 0 or self.users.max() >= self.num_users:
      raise ValueError(f"dataset {self.name!r}: user index out of range [0, {self.num_users})")
    if self.items.min() < 0 or self.items.max() >= self.num_items:
      raise ValueError(f"dataset {self.name!r}: item index out of range [0, {self.num_items})")
    for field in ("item_text", "item_titles"):
      if len(getattr(self, field)) != self.num_items:
        raise ValueError(f"dataset {self.name!r}: {field} has {len(getattr(self, field))} entries, expected {self.num_items}")
    for table, rows, sizes in ((self.item_features, self.num_items, self.item_feature_sizes),
                               (self.user_features, self.num_users, self.user_feature_sizes)):
      for key, values in table.items():
        if values.ndim != 2 or values.shape[0] != rows:
          raise ValueError(f"dataset {self.name!r}: feature {key!r} has shape {values.shape}, expected [{rows}, M]")
        if key not in sizes or values.max(initial=0) >= sizes[key] or values.min(initial=0) < 0:
          raise ValueError(f"dataset {self.name!r}: feature {key!r} values outside [0, {sizes.get(key)})")
    for table, rows in ((self.item_numeric, self.num_items), (self.user_numeric, self.num_users),
                        (self.context_numeric, n)):
      for key, values in table.items():
        if values.shape != (rows,):
          raise ValueError(f"dataset {self.name!r}: numeric feature {key!r} has shape {values.shape}, expected [{rows}]")
    for key, values in self.context_features.items():
      if values.ndim != 2 or values.shape[0] != n:
        raise ValueError(f"dataset {self.name!r}: context feature {key!r} has shape {values.shape}, expected [{n}, M]")
      if key not in self.context_feature_sizes or values.max(initial=0) >= self.context_feature_sizes[key]:
        raise ValueError(f"dataset {self.name!r}: context feature {key!r} values outside [0, {self.context_feature_sizes.get(key)})")
    return self


@dataclasses.dataclass(frozen=True)
class Split:
  """Which interactions train, validate and test, and which items are cold.

  ``train``/``valid``/``test`` are int64 index arrays into the dataset's interaction arrays.
  ``cold_items`` is a bool ``[num_items]`` mask of items with no training interaction by design.
  """

  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  cold_items: np.ndarray
  protocol: str
  duplicates_dropped: int = 0  # repeated (user, item) rows removed before splitting (data.duplicates=drop)


def remap_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense index for raw ids: returns (unique_raw_ids sorted, index of each raw id)."""
  uniq, idx = np.unique(raw, return_inverse=True)
  return uniq, idx.astype(np.int32)
