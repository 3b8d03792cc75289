"""MovieLens 100K and 1M from the GroupLens files, as a ``Dataset``.

The catalog is every movie in ``u.item`` / ``movies.dat``, rated or not: ML-1M has 3,883 movies of
which 3,706 are rated, and the unrated ones are legitimate cold items for a text tower.

Item text is chosen by ``data.item_text``: ``default`` or fields joined by ``+`` from
``title``, ``genres``, and for ML-1M with ``movies_extrainfos.dat`` (MeLU's OMDb scrape) also
``plot``, ``director``, ``writers``, ``actors``, ``rated``. Example: ``title+genres+plot``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxrec.data.dataset import Dataset
from jaxrec.data.parsing import DataError, decode, int_table, parse_int, read_bytes, split_lines

# Both releases share this genre list; ML-100K's extra "unknown" flag maps to padding (0).
GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western")
# ML-1M's age codes are the lower edges of its buckets; ML-100K's raw ages are bucketed the same way.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
OCCUPATIONS_1M = 21
DECADES = 13  # 1900s .. 2020s; 0 = no year in the title
# Both MovieLens loaders build these from the constants above, so ML-100K and ML-1M agree on them;
# occupations are coded differently in the two releases.
SHARED_VOCABULARIES = {"genre": "movielens-genres", "decade": "decades-1900", "age": "movielens-age-buckets",
                       "gender": "gender-MF"}

DEFAULT_TEXT = "title+genres"
BASE_FIELDS = ("title", "genres")
EXTRA_FIELDS = ("plot", "director", "writers", "actors", "rated")
_EXTRA_FILE = "movies_extrainfos.dat"
_MOVIE_ENCODINGS = ("utf-8", "latin-1")


def text_fields(spec: str, available: tuple[str, ...]) -> tuple[str, ...]:
  fields = tuple((DEFAULT_TEXT if spec in ("", "default") else spec).split("+"))
  unknown = [f for f in fields if f not in available]
  if unknown:
    raise ValueError(f"data.item_text={spec!r}: unknown field(s) {', '.join(unknown)}; "
                     f"choose 'default' or fields joined by '+' from {', '.join(available)}")
  return fields


def _genre_table(genre_lists: list[list[str]]) -> np.ndarray:
  width = max(1, max(len(g) for g in genre_lists))
  table = np.zeros((len(genre_lists), width), np.int32)
  index = {g: i + 1 for i, g in enumerate(GENRES)}
  for row, genres in enumerate(genre_lists):
    table[row, :len(genres)] = [index[g] for g in genres]
  return table


def _decade(titles: list[str]) -> np.ndarray:
  years = np.array([int(m.group(1)) if (m := re.search(r"\((\d{4})\)\s*$", t)) else 0 for t in titles])
  return np.where(years > 0, np.clip((years - 1900) // 10, 0, DECADES - 1) + 1, 0).astype(np.int32)[:, None]


def _age_bucket(ages: np.ndarray) -> np.ndarray:
  return (np.searchsorted(np.asarray(AGE_EDGES), ages, side="right") + 1).astype(np.int32)[:, None]


def _movie_text(title: str, genres: list[str], extra: dict[str, str], fields: tuple[str, ...]) -> str:
  parts = []
  for field in fields:
    if field == "title":
      parts.append(f"{title}.")
    elif field == "genres" and genres:
      parts.append(f"Genres: {', '.join(genres)}.")
    elif field in extra:
      value = extra[field]
      parts.append({"plot": value, "director": f"Directed by {value}.", "writers": f"Written by {value}.",
                    "actors": f"Starring {value}.", "rated": f"Rated {value}."}[field])
  return " ".join(parts)


def _index_of(raw: np.ndarray, catalog: np.ndarray, path: str, data: bytes, header_lines: int, what: str) -> np.ndarray:
  """Dense index of each raw id in the sorted ``catalog``; an unknown id is reported by line."""
  pos = np.searchsorted(catalog, raw).clip(max=len(catalog) - 1)
  bad = np.flatnonzero(catalog[pos] != raw)
  if len(bad):
    row = int(bad[0])
    raise DataError(path, _line_of_row(data, row, header_lines), f"a {what} listed in the catalog file",
                    got=f"unknown {what} {int(raw[row])}")
  return pos.astype(np.int32)


def _line_of_row(data: bytes, row: int, header_lines: int) -> int:
  """1-based line of the ``row``-th non-blank data line (numpy's row count skips blank lines)."""
  seen = -1
  for number, line in enumerate(data.split(b"\n"), start=1):
    if number <= header_lines or not line.strip():
      continue
    seen += 1
    if seen == row:
      return number
  return number


def _has_header(data: bytes, header: tuple[str, ...], sep: str) -> int:
  first = data.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
  return int(tuple(first.split(sep)) == header)


def load_ml100k(path: str, item_text: str = "default") -> Dataset:
  fields = text_fields(item_text, BASE_FIELDS)
  data_path = os.path.join(path, "u.data")
  raw = read_bytes(data_path, "MovieLens-100K ratings u.data (user id, item id, rating, timestamp; tab-separated)")
  header = ("user_id", "item_id", "rating", "timestamp")
  table = int_table(data_path, header, "\t", header=header, data=raw)

  item_path = os.path.join(path, "u.item")
  text = decode(read_bytes(item_path, "MovieLens-100K movie list u.item"), item_path, _MOVIE_ENCODINGS)
  rows = split_lines(text, item_path, "|", 24, "movie id|title|release date|video date|IMDb URL|19 genre flags")
  item_ids = np.array([parse_int(f[0], item_path, n, "movie id") for n, f in rows], np.int64)
  titles, genre_lists = [], []
  for number, f in rows:
    flags = f[5:]
    if any(x not in ("0", "1") for x in flags):
      raise DataError(item_path, number, "19 genre flags of 0 or 1 after the IMDb URL", got=repr("|".join(flags)))
    titles.append(f[1])
    genre_lists.append([GENRES[i - 1] for i, x in enumerate(flags) if x == "1" and i > 0])
  order = _sorted_unique(item_ids, item_path, rows, "movie id")

  user_path = os.path.join(path, "u.user")
  text = decode(read_bytes(user_path, "MovieLens-100K user list u.user"), user_path, ("utf-8", "latin-1"))
  urows = split_lines(text, user_path, "|", 5, "user id|age|gender|occupation|zip code")
  user_ids = np.array([parse_int(f[0], user_path, n, "user id") for n, f in urows], np.int64)
  ages = np.array([parse_int(f[1], user_path, n, "age") for n, f in urows])
  gender = np.array([_gender(f[2], user_path, n) for n, f in urows], np.int32)[:, None]
  occupations, occupation = np.unique([f[3] for _, f in urows], return_inverse=True)
  uorder = _sorted_unique(user_ids, user_path, urows, "user id")

  items = _index_of(table[:, 1], item_ids[order], data_path, raw, _has_header(raw, header, "\t"), "movie id")
  users = _index_of(table[:, 0], user_ids[uorder], data_path, raw, _has_header(raw, header, "\t"), "user id")
  titles = [titles[i] for i in order]
  genre_lists = [genre_lists[i] for i in order]
  return Dataset(
      name="ml100k",
      users=users, items=items,
      timestamps=table[:, 3].astype(np.int64),
      ratings=table[:, 2].astype(np.float32),
      item_text=tuple(_movie_text(t, g, {}, fields) for t, g in zip(titles, genre_lists)),
      item_titles=tuple(titles),
      item_raw_ids=item_ids[order], user_raw_ids=user_ids[uorder],
      item_features={"genre": _genre_table(genre_lists), "decade": _decade(titles)},
      item_feature_sizes={"genre": len(GENRES) + 1, "decade": DECADES + 1},
      feature_vocabularies=dict(SHARED_VOCABULARIES),
      user_features={"age": _age_bucket(ages[uorder]), "gender": gender[uorder],
                     "occupation": (occupation[uorder] + 1).astype(np.int32)[:, None]},
      user_feature_sizes={"age": len(AGE_EDGES) + 2, "gender": 3, "occupation": len(occupations) + 1},
      has_time=True,
  ).validate()


def _gender(value: str, path: str, line: int) -> int:
  if value not in ("M", "F"):
    raise DataError(path, line, "gender M or F", got=repr(value))
  return 1 if value == "M" else 2


def _sorted_unique(ids: np.ndarray, path: str, rows, what: str) -> np.ndarray:
  order = np.argsort(ids, kind="stable")
  dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
  if len(dup):
    number = rows[int(order[dup[0] + 1])][0]
    raise DataError(path, number, f"each {what} once", got=f"a second line for {what} {int(ids[order][dup[0]])}")
  return order


def _read_extra(path: str) -> dict[int, dict[str, str]]:
  text = decode(read_bytes(path, "MeLU movie text movies_extrainfos.dat (11 '::'-separated fields)"), path, ("utf-8",))
  names = ("movie_id", "title", "year", "rated", "released", "genre", "director", "writers", "actors", "plot", "poster")
  extra = {}
  for number, f in split_lines(text, path, "::", len(names), "::".join(names)):
    values = {k: v.strip() for k, v in zip(names, f) if k in EXTRA_FIELDS and v.strip() not in ("", "N/A")}
    extra[parse_int(f[0], path, number, "movie id")] = values
  return extra


def load_ml1m(path: str, item_text: str = "default") -> Dataset:
  """``ratings.dat`` if present (ratings and time), else the (user, movie) pairs of the shared copy."""
  extra_path = os.path.join(path, _EXTRA_FILE)
  fields = text_fields(item_text, BASE_FIELDS + EXTRA_FIELDS)
  extra = _read_extra(extra_path) if any(f in EXTRA_FIELDS for f in fields) else {}

  ratings_path = os.path.join(path, "ratings.dat")
  if os.path.isfile(ratings_path):
    raw = read_bytes(ratings_path, "ratings.dat")
    header = ("UserID", "MovieID", "Rating", "Timestamp")
    table = int_table(ratings_path, header, "::", data=raw)
    source_path, header_lines = ratings_path, 0
    timestamps, ratings, has_time = table[:, 3].astype(np.int64), table[:, 2].astype(np.float32), True
  else:
    source_path = os.path.join(path, "interactions_implicit.tsv")
    raw = read_bytes(source_path, "ratings.dat (UserID::MovieID::Rating::Timestamp) or interactions_implicit.tsv "
                                  "(user_id<TAB>movie_id pairs)")
    header = ("user_id", "movie_id")
    table = int_table(source_path, header, "\t", header=header, data=raw)
    header_lines = _has_header(raw, header, "\t")
    # No time in this copy: file order (grouped by user) stands in, and has_time=False stops
    # anyone from calling it a temporal protocol.
    timestamps, ratings, has_time = np.arange(len(table), dtype=np.int64), None, False

  movies_path = os.path.join(path, "movies.dat")
  text = decode(read_bytes(movies_path, "movies.dat (MovieID::Title::Genres)"), movies_path, _MOVIE_ENCODINGS)
  rows = split_lines(text, movies_path, "::", 3, "MovieID::Title::Genres")
  item_ids = np.array([parse_int(f[0], movies_path, n, "MovieID") for n, f in rows], np.int64)
  titles, genre_lists = [], []
  for number, f in rows:
    genres = [g for g in f[2].strip().split("|") if g]
    unknown = [g for g in genres if g not in GENRES]
    if unknown:
      raise DataError(movies_path, number, f"genres from {', '.join(GENRES)}", got=repr(unknown[0]))
    titles.append(f[1])
    genre_lists.append(genres)
  order = _sorted_unique(item_ids, movies_path, rows, "MovieID")

  users_path = os.path.join(path, "users.dat")
  text = decode(read_bytes(users_path, "users.dat (UserID::Gender::Age::Occupation::Zip-code)"), users_path,
                ("utf-8", "latin-1"))
  urows = split_lines(text, users_path, "::", 5, "UserID::Gender::Age::Occupation::Zip-code")
  user_ids = np.array([parse_int(f[0], users_path, n, "UserID") for n, f in urows], np.int64)
  ages = np.array([parse_int(f[2], users_path, n, "Age") for n, f in urows])
  occupation = np.array([parse_int(f[3], users_path, n, "Occupation") for n, f in urows])
  bad = np.flatnonzero((occupation < 0) | (occupation >= OCCUPATIONS_1M))
  if len(bad):
    raise DataError(users_path, urows[bad[0]][0], f"an Occupation code 0..{OCCUPATIONS_1M - 1}",
                    got=str(occupation[bad[0]]))
  gender = np.array([_gender(f[1], users_path, n) for n, f in urows], np.int32)[:, None]
  uorder = _sorted_unique(user_ids, users_path, urows, "UserID")

  items = _index_of(table[:, 1], item_ids[order], source_path, raw, header_lines, "movie id")
  users = _index_of(table[:, 0], user_ids[uorder], source_path, raw, header_lines, "user id")
  titles = [titles[i] for i in order]
  genre_lists = [genre_lists[i] for i in order]
  texts = tuple(_movie_text(t, g, extra.get(int(m), {}), fields)
                for t, g, m in zip(titles, genre_lists, item_ids[order]))
  return Dataset(
      name="ml1m",
      users=users, items=items, timestamps=timestamps, ratings=ratings,
      item_text=texts, item_titles=tuple(titles),
      item_raw_ids=item_ids[order], user_raw_ids=user_ids[uorder],
      item_features={"genre": _genre_table(genre_lists), "decade": _decade(titles)},
      item_feature_sizes={"genre": len(GENRES) + 1, "decade": DECADES + 1},
      feature_vocabularies=dict(SHARED_VOCABULARIES),
      user_features={"age": _age_bucket(ages[uorder]), "gender": gender[uorder],
                     "occupation": (occupation[uorder] + 1).astype(np.int32)[:, None]},
      user_feature_sizes={"age": len(AGE_EDGES) + 2, "gender": 3, "occupation": OCCUPATIONS_1M + 1},
      has_time=has_time,
  ).validate()
