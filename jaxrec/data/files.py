"""Predefined splits from files, so a run trains and tests on exactly the split a peer library used.

A directory holds ``train``, ``valid`` (optional) and ``test`` as ``.npz`` (arrays ``user``,
``item``, optional ``timestamp``) or ``.tsv`` (``user<TAB>item[<TAB>timestamp]`` raw ids, an
optional header line such as RecBole's ``user_id:token<TAB>item_id:token``). An optional
``items.tsv`` (``item<TAB>title[<TAB>text]``) supplies the catalog and item text; without it the
catalog is the items seen in the splits and each item's text is its id.
"""

from __future__ import annotations

import os

import numpy as np

from jaxrec.data.dataset import Dataset
from jaxrec.data.parsing import DataError, decode, read_bytes

SPLITS = ("train", "valid", "test")
_PAIR = "user<TAB>item[<TAB>timestamp] raw ids"


_USER_NAMES = ("user", "user_id", "userid", "uid")
_ITEM_NAMES = ("item", "item_id", "itemid", "iid", "movie_id", "asin")


def _is_header(fields: list[str]) -> bool:
  names = [f.split(":")[0].strip().lower() for f in fields[:2]]
  return len(names) == 2 and names[0] in _USER_NAMES and names[1] in _ITEM_NAMES


def _read_tsv(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  text = decode(read_bytes(path, f"a split file of {_PAIR}"), path, ("utf-8",))
  lines = text.split("\n")
  header = None
  users, items, stamps = [], [], []
  width = None
  for number, line in enumerate(lines, start=1):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split("\t")
    if _is_header(fields):
      if header is not None or users:
        raise DataError(path, number, _PAIR + " (a header only on the first line)", got=f"a duplicate header line {line!r}")
      header = fields
      continue
    if len(fields) not in (2, 3) or (width is not None and len(fields) != width):
      want = f"{width} tab-separated fields" if width else "2 or 3 tab-separated fields"
      raise DataError(path, number, f"{want} ({_PAIR})", got=f"{len(fields)} field(s) in {line!r}")
    if not fields[0] or not fields[1]:
      raise DataError(path, number, _PAIR, got=f"an empty id in {line!r}")
    width = len(fields)
    users.append(fields[0])
    items.append(fields[1])
    if width == 3:
      try:
        stamps.append(int(fields[2]))
      except ValueError:
        raise DataError(path, number, "an integer timestamp in the third column", got=repr(fields[2])) from None
  return np.asarray(users, str), np.asarray(items, str), (np.asarray(stamps, np.int64) if width == 3 else None)


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise DataError(path, None, "an .npz archive with 1-D arrays 'user' and 'item'", got=str(e)) from None
  if "user" not in arrays or "item" not in arrays:
    raise DataError(path, None, "arrays 'user' and 'item' (optional 'timestamp')", got=f"arrays {sorted(arrays)}")
  user, item, stamp = arrays["user"], arrays["item"], arrays.get("timestamp")
  for key, value in (("user", user), ("item", item), ("timestamp", stamp)):
    if value is not None and (value.ndim != 1 or len(value) != len(user)):
      raise DataError(path, None, f"1-D '{key}' with as many rows as 'user' ({len(user)})", got=f"shape {value.shape}")
  return user.astype(str), item.astype(str), None if stamp is None else stamp.astype(np.int64)


def find_split(path: str, split: str, required: bool = False) -> str | None:
  for ext in (".npz", ".tsv"):
    candidate = os.path.join(path, split + ext)
    if os.path.isfile(candidate):
      return candidate
  if required:
    raise DataError(os.path.join(path, split + ".npz"), None, f"{split}.npz or {split}.tsv ({_PAIR})", got="no such file")
  return None


def _typed(raw: np.ndarray) -> np.ndarray:
  """Integer ids stay integers (so ``jaxrec recommend --user 42`` matches); anything else stays text."""
  if raw.size and np.all(np.char.isdigit(raw)):
    return raw.astype(np.int64)
  return raw


def _read_items(path: str) -> tuple[np.ndarray, list[str], list[str]]:
  text = decode(read_bytes(path, "item<TAB>title[<TAB>text]"), path, ("utf-8",))
  ids, titles, texts = [], [], []
  seen = {}
  for number, line in enumerate(text.split("\n"), start=1):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split("\t")
    if fields[0].split(":")[0].strip().lower() in _ITEM_NAMES and not ids:
      continue
    if len(fields) not in (2, 3) or not fields[0]:
      raise DataError(path, number, "item<TAB>title[<TAB>text]", got=f"{len(fields)} field(s) in {line!r}")
    if fields[0] in seen:
      raise DataError(path, number, "each item once", got=f"item {fields[0]!r} again (first on line {seen[fields[0]]})")
    seen[fields[0]] = number
    ids.append(fields[0])
    titles.append(fields[1])
    texts.append(fields[2] if len(fields) == 3 and fields[2] else fields[1])
  if not ids:
    raise DataError(path, None, "one item<TAB>title[<TAB>text] line per catalog item", got="no items (an empty catalog)")
  return np.asarray(ids, str), titles, texts


def load(path: str, name: str = "files") -> tuple[Dataset, tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
  """Returns the dataset, its (train, valid, test) interaction indices and the cold-item mask
  (items that appear only in test, which the peer's split made cold)."""
  if not os.path.isdir(path):
    raise DataError(path, None, "a directory with train, valid and test split files", got="no such directory")
  parts = []
  for split in SPLITS:
    found = find_split(path, split, required=split != "valid")
    if found is None:
      parts.append((np.zeros(0, str), np.zeros(0, str), np.zeros(0, np.int64)))
      continue
    part = _read_npz(found) if found.endswith(".npz") else _read_tsv(found)
    if split != "valid" and len(part[0]) == 0:
      raise DataError(found, None, f"at least one {split} interaction ({_PAIR})", got="no rows (an empty split file)")
    parts.append(part)
  sizes = [len(p[0]) for p in parts]
  users_raw = np.concatenate([p[0] for p in parts]).astype(str)
  items_raw = np.concatenate([p[1] for p in parts]).astype(str)
  has_time = all(p[2] is not None for p, n in zip(parts, sizes) if n)
  stamps = np.concatenate([p[2] for p in parts]) if has_time else np.arange(sum(sizes), dtype=np.int64)

  items_path = os.path.join(path, "items.tsv")
  if os.path.isfile(items_path):
    catalog, titles, texts = _read_items(items_path)
    missing = np.setdiff1d(items_raw, catalog)
    if len(missing):
      raise DataError(items_path, None, "every item of the split files", got=f"no line for item {missing[0]!r}")
  else:
    catalog = np.unique(items_raw)
    titles = texts = [str(i) for i in catalog]
  item_typed, user_typed = _typed(np.concatenate([catalog, items_raw])), _typed(users_raw)
  catalog_typed, items_typed = item_typed[:len(catalog)], item_typed[len(catalog):]
  order = np.argsort(catalog_typed, kind="stable")
  item_ids = catalog_typed[order]
  user_ids, users = np.unique(user_typed, return_inverse=True)
  items = np.searchsorted(item_ids, items_typed)

  bounds = np.cumsum(sizes)
  predefined = (np.arange(0, bounds[0]), np.arange(bounds[0], bounds[1]), np.arange(bounds[1], bounds[2]))
  seen = np.zeros(len(item_ids), bool)
  seen[items[:bounds[1]]] = True
  cold = np.zeros(len(item_ids), bool)
  cold[items[bounds[1]:]] = True
  cold &= ~seen
  dataset = Dataset(
      name=name,
      users=users.astype(np.int32), items=items.astype(np.int32), timestamps=stamps,
      item_text=tuple(texts[i] for i in order), item_titles=tuple(titles[i] for i in order),
      item_raw_ids=item_ids, user_raw_ids=user_ids, has_time=has_time,
  ).validate()
  return dataset, tuple(p.astype(np.int64) for p in predefined), cold
