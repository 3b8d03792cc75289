"""``data.source=table``: your own interactions, item and user tables, with column roles from
``data.table.*`` (``TableConfig``).

Each file is CSV, TSV, JSON lines or Parquet, by its extension (``.csv``, ``.tsv``/``.tab``,
``.jsonl``/``.ndjson``/``.json``, ``.parquet``/``.pq``); text files have a header line naming the
columns, and CSV fields may be quoted (holding commas, quotes or newlines). Column kinds:

- ``user``, ``item`` (ids, kept as strings), ``time`` (integer or float seconds, or an ISO date),
  ``label`` (a number: the dataset's ratings);
- item ``text`` columns, their values joined in the order given by ``". "`` (empty cells skipped; an
  item without any text reads as its id); the title is ``item_title`` or the first text column;
- categorical columns (single-valued, or several values per cell split on ``multi_value_sep``):
  vocabulary ids from 1 in sorted order, 0 = missing/padding;
- numeric columns: float, NaN where the cell is empty; standardised later on the training split
  (``standardise_numeric``, called by ``sources.load``), the towers impute and flag the missing ones;
- context columns on interactions (categorical or numeric), the query's context.

Every row-level problem raises ``DataError`` naming the file, the line (text files; a quoted field
spanning lines counts from the row's first line) or row (Parquet, from 1) and the column.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any, Iterable

import numpy as np

from jaxrec.config import TableConfig
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.parsing import DataError, decode, json_lines, read_bytes

log = logging.getLogger("jaxrec")

TEXT_FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSON_FORMATS = (".jsonl", ".ndjson", ".json")
PARQUET_FORMATS = (".parquet", ".pq")


class Table:
  """One file's columns (name -> list of cells: str, number, list or None) and each row's line."""

  def __init__(self, path: str, columns: dict[str, list[Any]], lines: list[int], unit: str):
    self.path, self.columns, self.lines, self.unit = path, columns, lines, unit

  def __len__(self) -> int:
    return len(self.lines)

  def where(self, row: int) -> int:
    return self.lines[row]

  def error(self, row: int | None, column: str, expected: str, got: str | None = None) -> DataError:
    """A DataError at ``row`` (an index into this table; None = the whole file) naming the column."""
    if row is None:
      return DataError(self.path, None, f"{expected} (column {column!r})", got=got)
    return DataError(f"{self.path}, {self.unit} {self.lines[row]}, column {column!r}", None, expected, got=got)

  def column(self, name: str, role: str) -> list[Any]:
    if name not in self.columns:
      raise DataError(self.path, None, f"a column {name!r} ({role})",
                      got=f"columns {', '.join(map(repr, self.columns)) or 'none'}")
    return self.columns[name]


def _read_text(path: str, delimiter: str) -> Table:
  text = decode(read_bytes(path, "a table with a header line"), path, ("utf-8",))
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
  try:
    header = next(reader, None)
    if header is None:
      raise DataError(path, 1, "a header line naming the columns", got="an empty file")
    header = [h.strip() for h in header]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
      raise DataError(path, 1, "distinct column names in the header", got=f"{duplicated[0]!r} more than once")
    rows, lines = [], []
    start = reader.line_num + 1
    for fields in reader:
      if not fields or (len(fields) == 1 and not fields[0].strip()):
        start = reader.line_num + 1
        continue
      if len(fields) != len(header):
        column = header[len(fields)] if len(fields) < len(header) else f"after {header[-1]}"
        raise DataError(f"{path}, line {start}, column {column!r}", None,
                        f"{len(header)} fields as in the header ({', '.join(header)})",
                        got=f"{len(fields)} field(s)")
      rows.append(fields)
      lines.append(start)
      start = reader.line_num + 1
  except csv.Error as e:
    raise DataError(path, reader.line_num, "well-formed delimited fields (quotes closed)", got=str(e)) from None
  columns = {name: [r[j] for r in rows] for j, name in enumerate(header)}
  return Table(path, columns, lines, "line")


def _read_json_lines(path: str) -> Table:
  text = decode(read_bytes(path, "a JSON lines table"), path, ("utf-8",))
  records, lines = [], []
  for number, record in json_lines(text, path, "one JSON object per line"):
    records.append(record)
    lines.append(number)
  names = list(dict.fromkeys(k for r in records for k in r))
  return Table(path, {n: [r.get(n) for r in records] for n in names}, lines, "line")


def _read_parquet(path: str) -> Table:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(path, None, "pyarrow to read Parquet (pip install pyarrow)", got="no pyarrow module") from None
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow's own errors name no row: report the file and the reason
    raise DataError(path, None, "a readable Parquet file", got=str(e).split("\n")[0]) from None
  return Table(path, {name: table.column(name).to_pylist() for name in table.column_names},
               list(range(1, table.num_rows + 1)), "row")


def read(path: str) -> Table:
  """The table in ``path``, by its extension."""
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise DataError(path, None, "a table file (data.table.* names files inside data.path)", got="no such file")
  if ext in TEXT_FORMATS:
    return _read_text(path, TEXT_FORMATS[ext])
  if ext in JSON_FORMATS:
    return _read_json_lines(path)
  if ext in PARQUET_FORMATS:
    return _read_parquet(path)
  known = sorted([*TEXT_FORMATS, *JSON_FORMATS, *PARQUET_FORMATS])
  raise DataError(path, None, f"a file ending in one of {', '.join(known)}", got=repr(ext or "no extension"))


# ---------------------------------------------------------------- cells -> arrays


def _missing(cell: Any) -> bool:
  return cell is None or (isinstance(cell, str) and not cell.strip()) or (isinstance(cell, float) and np.isnan(cell))


def ids(table: Table, name: str, role: str) -> np.ndarray:
  """An id column as strings; an empty id is an error naming its row."""
  cells = table.column(name, role)
  out = []
  for row, cell in enumerate(cells):
    if _missing(cell):
      raise table.error(row, name, f"a non-empty {role}", got="an empty cell")
    out.append(str(cell).strip() if not isinstance(cell, float) or not cell.is_integer() else str(int(cell)))
  return np.asarray(out, dtype=str)


def numeric(table: Table, name: str, role: str = "numeric feature") -> np.ndarray:
  """float32 [rows], NaN for empty cells; anything else that is not a number names its row."""
  out = np.full(len(table), np.nan, np.float32)
  for row, cell in enumerate(table.column(name, role)):
    if _missing(cell):
      continue
    if isinstance(cell, bool) or not isinstance(cell, (int, float, str)):
      raise table.error(row, name, f"a number ({role})", got=repr(cell))
    try:
      value = float(cell)
    except ValueError:
      raise table.error(row, name, f"a number ({role}) or an empty cell", got=repr(cell)) from None
    if not np.isfinite(value):
      raise table.error(row, name, f"a finite number ({role}) or an empty cell", got=repr(cell))
    out[row] = value
  return out


def times(table: Table, name: str) -> np.ndarray:
  """int64 seconds from integer/float seconds or ISO dates (``2024-05-01``, ``2024-05-01T10:00:00``)."""
  out = np.zeros(len(table), np.int64)
  for row, cell in enumerate(table.column(name, "timestamp")):
    if _missing(cell):
      raise table.error(row, name, "a timestamp (seconds or an ISO date)", got="an empty cell")
    try:
      out[row] = int(float(cell))
    except (TypeError, ValueError):
      try:
        out[row] = np.datetime64(str(cell).strip(), "s").astype(np.int64)
      except ValueError:
        raise table.error(row, name, "a timestamp (seconds or an ISO date)", got=repr(cell)) from None
  return out


def categorical(table: Table, name: str, sep: str) -> tuple[np.ndarray, int]:
  """int32 [rows, M] vocabulary ids (from 1, sorted values; 0 = missing/padding) and the vocabulary size."""
  cells = []
  for cell in table.column(name, "categorical feature"):
    if _missing(cell):
      cells.append([])
    elif isinstance(cell, (list, tuple)):  # JSON lines / Parquet lists
      cells.append([str(v).strip() for v in cell if not _missing(v)])
    elif sep and isinstance(cell, str):
      cells.append([v.strip() for v in cell.split(sep) if v.strip()])
    else:
      cells.append([str(cell).strip()])
  vocab = {v: i + 1 for i, v in enumerate(sorted({v for c in cells for v in c}))}
  width = max(1, max((len(c) for c in cells), default=1))
  out = np.zeros((len(cells), width), np.int32)
  for row, values in enumerate(cells):
    out[row, :len(values)] = [vocab[v] for v in values]
  return out, len(vocab) + 1


def _index_table(table: Table, key: str, role: str, known: np.ndarray) -> np.ndarray:
  """Row of ``table`` for each of ``known`` ids (-1 where the table has none); repeated ids are errors."""
  raw = ids(table, key, role)
  order = np.argsort(raw, kind="stable")
  repeated = np.flatnonzero(raw[order][1:] == raw[order][:-1])
  if repeated.size:
    row = int(order[repeated[0] + 1])
    raise table.error(row, key, f"each {role} once", got=f"{str(raw[row])!r} again (first at {table.unit} {table.where(int(order[repeated[0]]))})")
  where = np.searchsorted(raw[order], known)
  where = np.minimum(where, len(raw) - 1)
  found = raw[order][where] == known if len(raw) else np.zeros(len(known), bool)
  return np.where(found, order[where], -1)


def _spread(values: np.ndarray, rows: np.ndarray, fill) -> np.ndarray:
  """``values[rows]`` with ``fill`` where ``rows`` is -1."""
  out = np.full((len(rows), *values.shape[1:]), fill, values.dtype)
  out[rows >= 0] = values[rows[rows >= 0]]
  return out


def _features(table: Table, rows: np.ndarray, categorical_cols: Iterable[str], numeric_cols: Iterable[str],
              sep: str) -> tuple[dict, dict, dict]:
  cats, sizes, nums = {}, {}, {}
  for name in categorical_cols:
    values, size = categorical(table, name, sep)
    cats[name], sizes[name] = _spread(values, rows, 0), size
  for name in numeric_cols:
    nums[name] = _spread(numeric(table, name), rows, np.nan)
  return cats, sizes, nums


def load(directory: str, cfg: TableConfig) -> Dataset:
  """The dataset of ``directory``'s tables with ``cfg``'s column roles (numeric values raw)."""
  path = lambda name: os.path.join(directory, name)  # noqa: E731
  _check_tables(directory, cfg)
  return build(read(path(cfg.interactions)), read(path(cfg.items)) if cfg.items else None,
               read(path(cfg.users)) if cfg.users else None, cfg,
               os.path.basename(os.path.normpath(directory)) or "table")


def _check_tables(where: str, cfg: TableConfig) -> None:
  """Item or user columns named without their table would be silently unread: refused."""
  for kind, columns in (("items", cfg.item_text + cfg.item_categorical + cfg.item_numeric + (cfg.item_title,)),
                        ("users", cfg.user_categorical + cfg.user_numeric)):
    if any(columns) and not getattr(cfg, kind):
      raise DataError(where, None, f"an {kind[:-1]} table (data.table.{kind}, or from_frames' {kind}=) holding "
                      f"{', '.join(c for c in columns if c)}", got="none")


def frame_table(frame: Any, what: str) -> Table:
  """A Table of an in-memory frame: a pandas (or any) DataFrame with ``columns`` and ``frame[name]``,
  a pyarrow Table, or a dict of equal-length arrays/lists. Rows are numbered from 1 in errors."""
  if hasattr(frame, "column_names") and hasattr(frame, "column"):  # pyarrow.Table
    columns = {str(name): frame.column(name).to_pylist() for name in frame.column_names}
  elif isinstance(frame, dict):
    columns = {str(name): list(v) if isinstance(v, (list, tuple)) else np.asarray(v).tolist() for name, v in frame.items()}
  elif hasattr(frame, "columns") and hasattr(frame, "__getitem__"):
    columns = {str(name): list(frame[name].tolist() if hasattr(frame[name], "tolist") else frame[name])
               for name in frame.columns}
  else:
    raise TypeError(f"{what}: expected a DataFrame, a pyarrow Table or a dict of arrays; got {type(frame).__name__}")
  lengths = {name: len(values) for name, values in columns.items()}
  if len(set(lengths.values())) > 1:
    first = next(iter(lengths))
    odd = next(n for n, k in lengths.items() if k != lengths[first])
    raise DataError(what, None, f"columns of equal length (column {odd!r})",
                    got=f"{lengths[odd]} values, {first!r} has {lengths[first]}")
  rows = next(iter(lengths.values()), 0)
  return Table(what, columns, list(range(1, rows + 1)), "row")


def build(inter: Table, items_table: Table | None, users_table: Table | None, cfg: TableConfig, name: str) -> Dataset:
  """The dataset of these tables with ``cfg``'s column roles (numeric values raw)."""
  _check_tables(name, cfg)
  if not len(inter):
    raise DataError(inter.path, None, "at least one interaction row", got="none")
  user_raw, item_raw = ids(inter, cfg.user, "user id"), ids(inter, cfg.item, "item id")
  stamps = times(inter, cfg.time) if cfg.time else np.arange(len(inter), dtype=np.int64)
  ratings = numeric(inter, cfg.label, "label") if cfg.label else None
  if ratings is not None and np.isnan(ratings).any():
    row = int(np.argmax(np.isnan(ratings)))
    raise inter.error(row, cfg.label, "a number (label)", got="an empty cell")
  context, context_sizes = {}, {}
  for name in cfg.context_categorical:
    context[name], context_sizes[name] = categorical(inter, name, cfg.multi_value_sep)
  context_numeric = {name: numeric(inter, name, "context feature") for name in cfg.context_numeric}
  if context or context_numeric:
    log.warning("context columns %s are read and checked, but not yet fed to the query tower (issue #27 item 2)",
                ", ".join([*context, *context_numeric]))

  # The catalog is every item of the item table (items without interactions are cold candidates)
  # and every item interacted with; an interaction's item missing from a given item table is an error.
  catalog_raw = np.unique(np.concatenate([item_raw] + ([ids(items_table, cfg.item, "item id")] if items_table else [])))
  item_uniq, items = catalog_raw, np.searchsorted(catalog_raw, item_raw).astype(np.int32)
  user_uniq = np.unique(np.concatenate([user_raw] + ([ids(users_table, cfg.user, "user id")] if users_table else [])))
  users = np.searchsorted(user_uniq, user_raw).astype(np.int32)

  item_text = tuple(item_uniq.tolist())
  item_titles = item_text
  item_cats, item_sizes, item_nums = {}, {}, {}
  if items_table is not None:
    item_rows = _index_table(items_table, cfg.item, "item id", item_uniq)
    absent = np.flatnonzero(item_rows[items] < 0)
    if absent.size:
      raise inter.error(int(absent[0]), cfg.item, f"an item listed in {items_table.path}", got=repr(str(item_raw[absent[0]])))
    if cfg.item_text:
      texts = [items_table.column(c, "item text") for c in cfg.item_text]
      joined = [". ".join(str(t[r]).strip() for t in texts if not _missing(t[r])) for r in range(len(items_table))]
      item_text = tuple(joined[r] if r >= 0 and joined[r] else raw for r, raw in zip(item_rows, item_uniq))
    title_col = cfg.item_title or (cfg.item_text[0] if cfg.item_text else "")
    if title_col:
      titles = items_table.column(title_col, "item title")
      item_titles = tuple(str(titles[r]).strip() if r >= 0 and not _missing(titles[r]) else raw
                          for r, raw in zip(item_rows, item_uniq))
    item_cats, item_sizes, item_nums = _features(items_table, item_rows, cfg.item_categorical, cfg.item_numeric,
                                                 cfg.multi_value_sep)
  user_cats, user_sizes, user_nums = {}, {}, {}
  if users_table is not None:
    user_rows = _index_table(users_table, cfg.user, "user id", user_uniq)
    user_cats, user_sizes, user_nums = _features(users_table, user_rows, cfg.user_categorical, cfg.user_numeric,
                                                 cfg.multi_value_sep)
  return Dataset(name=name, users=users, items=items,
                 timestamps=stamps, item_text=item_text, item_titles=item_titles, item_raw_ids=item_uniq,
                 user_raw_ids=user_uniq, ratings=ratings, item_features=item_cats, item_feature_sizes=item_sizes,
                 user_features=user_cats, user_feature_sizes=user_sizes, has_time=bool(cfg.time),
                 item_numeric=item_nums, user_numeric=user_nums, context_features=context,
                 context_feature_sizes=context_sizes, context_numeric=context_numeric).validate()


# ---------------------------------------------------------------- standardisation


def _statistics(values: np.ndarray, fit: np.ndarray) -> tuple[float, float]:
  """The mean and std of ``values[fit]``'s present entries; std 1 for a column without spread (or
  without training values), which is then only centred."""
  seen = values[fit]
  seen = seen[~np.isnan(seen)].astype(np.float64)
  mean = float(seen.mean()) if seen.size else 0.0
  std = float(seen.std()) if seen.size else 0.0
  return mean, std if std > 1e-12 else 1.0


def standardise_numeric(dataset: Dataset, split: Split) -> Dataset:
  """Every numeric feature standardised with the statistics of the training split only: items and
  users that have a training interaction, and the training interactions' context."""
  import dataclasses
  if not (dataset.item_numeric or dataset.user_numeric or dataset.context_numeric):
    return dataset
  trained_items = np.zeros(dataset.num_items, bool)
  trained_items[dataset.items[split.train]] = True
  trained_users = np.zeros(dataset.num_users, bool)
  trained_users[dataset.users[split.train]] = True
  train_rows = np.zeros(dataset.num_interactions, bool)
  train_rows[split.train] = True
  stats, out = {}, {}
  for kind, fit in (("item", trained_items), ("user", trained_users), ("context", train_rows)):
    out[kind] = {}
    for key, values in getattr(dataset, f"{kind}_numeric").items():
      mean, std = stats[f"{kind}:{key}"] = _statistics(values, fit)
      out[kind][key] = ((values - mean) / std).astype(np.float32)  # NaN (missing) stays NaN
  return dataclasses.replace(dataset, item_numeric=out["item"], user_numeric=out["user"],
                             context_numeric=out["context"], numeric_stats=stats)
