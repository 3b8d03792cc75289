"""data.source=table: column roles over CSV, TSV, JSON lines and Parquet; errors naming file, line
and column; numeric features standardised on the training split and learned by the towers; the
Python dataset API (Dataset.from_frames, jaxrec.train(cfg, dataset=ds))."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxrec
from jaxrec.config import TableConfig
from jaxrec.data import sources, table
from jaxrec.data.parsing import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ITEMS = [("item", "title", "genres", "year"),
         ("a", "Heat, the film", "Action|Crime", "1995"),
         ("b", 'The "Big" One', "Comedy", ""),
         ("c", "Plain", "", "2001")]
USERS = [("user", "segment", "age"), ("u1", "x", "30"), ("u2", "y", ""), ("u3", "x", "50")]
INTERACTIONS = [("user", "item", "ts", "rating", "device"),
                ("u1", "a", "10", "4", "phone"), ("u1", "b", "20", "5", "tv"), ("u2", "a", "15", "3", "phone"),
                ("u2", "c", "25", "1", ""), ("u3", "b", "30", "2", "tv")]
ROLES = TableConfig(items="items.csv", users="users.csv", user="user", item="item", time="ts", label="rating",
                    item_text=("title", "genres"), item_categorical=("genres",), item_numeric=("year",),
                    user_categorical=("segment",), user_numeric=("age",), context_categorical=("device",),
                    multi_value_sep="|")


def write(directory, name, rows, fmt):
  path = os.path.join(directory, f"{name}.{fmt}")
  header, body = rows[0], rows[1:]
  if fmt in ("csv", "tsv"):
    with open(path, "w", newline="") as f:
      csv.writer(f, delimiter="," if fmt == "csv" else "\t").writerows(rows)
  elif fmt == "jsonl":
    with open(path, "w") as f:
      for row in body:
        f.write(json.dumps({k: v for k, v in zip(header, row) if v != ""}) + "\n")
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({k: [row[j] or None for row in body] for j, k in enumerate(header)}), path)
  return os.path.basename(path)


def tables(directory, fmt):
  names = {kind: write(directory, kind, rows, fmt) for kind, rows in
           (("interactions", INTERACTIONS), ("items", ITEMS), ("users", USERS))}
  return dataclasses.replace(ROLES, **names)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_reads_the_same_dataset(tmp_path, fmt):
  if fmt == "parquet":  # optional: a fresh install has no pyarrow
    pytest.importorskip("pyarrow", reason="Parquet tables need pyarrow (pip install pyarrow)")
  ds = table.load(str(tmp_path), tables(str(tmp_path), fmt))
  assert ds.item_raw_ids.tolist() == ["a", "b", "c"] and ds.user_raw_ids.tolist() == ["u1", "u2", "u3"]
  assert ds.users.tolist() == [0, 0, 1, 1, 2] and ds.items.tolist() == [0, 1, 0, 2, 1]
  assert ds.timestamps.tolist() == [10, 20, 15, 25, 30] and ds.ratings.tolist() == [4, 5, 3, 1, 2]
  # Text columns joined in the order given; the quoted comma and quotes survive; title = first text column.
  assert ds.item_text == ("Heat, the film. Action|Crime", 'The "Big" One. Comedy', "Plain")
  assert ds.item_titles == ("Heat, the film", 'The "Big" One', "Plain")
  # Multi-valued genres: sorted vocabulary from 1, 0 pads and marks a missing cell.
  assert ds.item_features["genres"].tolist() == [[1, 3], [2, 0], [0, 0]] and ds.item_feature_sizes["genres"] == 4
  assert ds.user_features["segment"].tolist() == [[1], [2], [1]]
  np.testing.assert_array_equal(ds.item_numeric["year"], [1995, np.nan, 2001])
  np.testing.assert_array_equal(ds.user_numeric["age"], [30, np.nan, 50])
  assert ds.context_features["device"].tolist() == [[1], [2], [1], [0], [2]]


def test_numeric_features_are_standardised_on_the_training_split_only(tmp_path):
  cfg = jaxrec.load_config(os.path.join(ROOT, "configs/tiny.py"), ["data.source=table", f"data.path={tmp_path}"])
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, table=tables(str(tmp_path), "csv")))
  ds, split = sources.load(cfg.data)
  raw = table.load(str(tmp_path), cfg.data.table)
  trained = np.unique(raw.items[split.train])
  years = raw.item_numeric["year"][trained]
  years = years[~np.isnan(years)]
  expect = (raw.item_numeric["year"] - years.mean()) / (years.std() if years.std() > 0 else 1.0)
  np.testing.assert_allclose(ds.item_numeric["year"], expect, rtol=1e-6)
  assert np.isnan(ds.item_numeric["year"][1])  # still missing: the towers impute 0 and flag it


def error_of(tmp_path, roles=None, **files):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(DataError) as e:
    table.load(str(tmp_path), roles or TableConfig(items="items.csv" if "items.csv" in files else "",
                                                    item_numeric=("year",) if "items.csv" in files else ()))
  return str(e.value)


def test_row_level_errors_name_file_line_and_column(tmp_path):
  good = "user,item\nu1,a\nu2,b\n"
  bad_row = error_of(tmp_path, **{"interactions.csv": 'user,item\nu1,a\n"u2,\nx",b\nu3,b,extra\n'})
  assert "interactions.csv, line 5, column 'after item': expected 2 fields" in bad_row, bad_row
  missing = error_of(tmp_path, TableConfig(user="customer"), **{"interactions.csv": good})
  assert "interactions.csv: expected a column 'customer' (user id); got columns 'user', 'item'" in missing, missing
  nan = error_of(tmp_path, **{"interactions.csv": good, "items.csv": "item,year\na,1999\nb,late nineties\n"})
  assert "items.csv, line 3, column 'year': expected a number (numeric feature) or an empty cell; got 'late nineties'" \
      in nan, nan
  unknown = error_of(tmp_path, **{"interactions.csv": good + "u3,zz\n", "items.csv": "item,year\na,1\nb,2\n"})
  assert "interactions.csv, line 4, column 'item': expected an item listed in" in unknown, unknown
  twice = error_of(tmp_path, **{"interactions.csv": good, "items.csv": "item,year\na,1\nb,2\na,3\n"})
  assert "items.csv, line 4, column 'item': expected each item id once; got 'a' again (first at line 2)" in twice
  jsonl = tmp_path / "j"
  jsonl.mkdir()
  (jsonl / "events.jsonl").write_text('{"user": "u1", "item": "a"}\n\n{"user": "u2", "item": \n')
  with pytest.raises(DataError, match=r"events.jsonl, line 3: expected one JSON object per line"):
    table.load(str(jsonl), TableConfig(interactions="events.jsonl"))
  (jsonl / "events.jsonl").write_text('{"user": "u1", "item": "a"}\n{"user": "u2"}\n')
  with pytest.raises(DataError, match=r"events.jsonl, line 2, column 'item': expected a non-empty item id; got an empty cell"):
    table.load(str(jsonl), TableConfig(interactions="events.jsonl"))


def test_example_config_trains_beats_popularity_and_a_bad_file_is_one_line(tmp_path):
  """The acceptance: committed CSV files, a config naming columns only; then the same files with a
  non-numeric year: one line naming file, line and column, and the workdir's files stay."""
  env = dict(os.environ, JAXREC_HUGE_PAGES="0")
  work = tmp_path / "run"
  run = subprocess.run([sys.executable, "-m", "jaxrec", "train", "--config", "configs/table_example.py",
                        "--workdir", str(work), "train.steps=150"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  metrics = json.loads((work / "metrics.json").read_text())
  assert metrics["recall@10"] > metrics["popularity/recall@10"] + 0.05, metrics
  assert metrics["ndcg@10"] > metrics["popularity/ndcg@10"] + 0.05, metrics

  data = tmp_path / "data"
  data.mkdir()
  for name in ("interactions.csv", "users.csv"):
    (data / name).write_bytes((ROOT_EXAMPLE / name).read_bytes())
  lines = (ROOT_EXAMPLE / "items.csv").read_text().splitlines()
  lines[3] = lines[3].rsplit(",", 1)[0] + ",nineteen-eighty"
  (data / "items.csv").write_text("\n".join(lines) + "\n")
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("kept")
  bad = subprocess.run([sys.executable, "-m", "jaxrec", "train", "--config", "configs/table_example.py",
                        "--workdir", str(other), f"data.path={data}", "train.steps=150"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert bad.returncode != 0
  message = [line for line in bad.stderr.splitlines() if "error" in line]
  assert len(message) == 1 and "items.csv, line 4, column 'year': expected a number" in message[0], bad.stderr[-2000:]
  assert (other / "notes.txt").read_text() == "kept"  # nothing already written is lost
  assert json.loads((work / "metrics.json").read_text()) == metrics


ROOT_EXAMPLE = __import__("pathlib").Path(ROOT) / "examples" / "table"


def numeric_world(directory, shuffle: bool):
  """Users and items on a line: each user's items are among the 12 nearest to the user's position.
  Only the numeric columns tell positions (no ids, no history), so the towers must read them; a few
  item positions are missing (imputed and flagged)."""
  rng = np.random.default_rng(0)
  num_users, num_items = 200, 100
  taste, place = rng.random(num_users), rng.random(num_items)
  rows = [("user", "item", "ts")]
  for u in range(num_users):
    near = np.argsort(np.abs(place - taste[u]))[:12]
    rows += [(f"u{u}", f"i{i}", str(t)) for t, i in enumerate(rng.choice(near, 8, replace=False))]
  shown = rng.permutation(place) if shuffle else place
  items = [("item", "place")] + [(f"i{i}", "" if i % 25 == 3 else f"{10 * shown[i]:.4f}") for i in range(num_items)]
  users = [("user", "taste")] + [(f"u{u}", f"{10 * taste[u]:.4f}") for u in range(num_users)]
  for name, table_rows in (("interactions", rows), ("items", items), ("users", users)):
    write(str(directory), name, table_rows, "csv")


def train_numeric_world(tmp_path, shuffle: bool) -> dict:
  data = tmp_path / ("shuffled" if shuffle else "data")
  data.mkdir()
  numeric_world(data, shuffle)
  cfg = jaxrec.load_config(os.path.join(ROOT, "configs/tiny.py"), [
      "data.source=table", f"data.path={data}", "data.table.items=items.csv", "data.table.users=users.csv",
      "data.table.time=ts", "data.table.item_numeric=place", "data.table.user_numeric=taste", "data.history_len=0",
      "model.use_item_ids=false", "model.use_user_ids=false", "train.steps=300", "train.batch_size=64",
      "train.learning_rate=0.01", f"workdir={tmp_path / ('run_shuffled' if shuffle else 'run')}"])
  return jaxrec.train(cfg)


def test_a_numeric_feature_that_determines_the_target_is_learned_and_shuffling_it_hurts(tmp_path):
  learned = train_numeric_world(tmp_path, shuffle=False)
  assert learned["recall@10"] > 2 * learned["popularity/recall@10"], learned
  assert learned["recall@10"] > 0.4, learned
  shuffled = train_numeric_world(tmp_path, shuffle=True)
  assert shuffled["recall@10"] < 0.6 * learned["recall@10"], (shuffled["recall@10"], learned["recall@10"])


def columns_of(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return {name: np.asarray([r[j] for r in rows[1:]]) for j, name in enumerate(rows[0])}


EXAMPLE_ROLES = dict(user="user", item="item", time="timestamp", item_text=["title", "genres"],
                     item_categorical=["genres"], item_numeric=["year"], user_categorical="segment",
                     multi_value_sep="|")


def test_from_frames_equals_the_table_source_and_names_frame_row_and_column():
  frames = {kind: columns_of(ROOT_EXAMPLE / f"{kind}.csv") for kind in ("interactions", "items", "users")}
  frames["items"]["year"] = np.asarray([float(y) if y else np.nan for y in frames["items"]["year"]])  # as pandas reads it
  ds = jaxrec.Dataset.from_frames(frames["interactions"], frames["items"], frames["users"], name="table",
                                  **EXAMPLE_ROLES)
  cfg = jaxrec.load_config(os.path.join(ROOT, "configs/table_example.py"))
  ref = table.load(cfg.data.path, cfg.data.table)
  assert ds.item_text == ref.item_text and ds.item_titles == ref.item_titles
  for field in ("users", "items", "timestamps", "item_raw_ids", "user_raw_ids"):
    np.testing.assert_array_equal(getattr(ds, field), getattr(ref, field))
  np.testing.assert_array_equal(ds.item_features["genres"], ref.item_features["genres"])
  np.testing.assert_array_equal(ds.user_features["segment"], ref.user_features["segment"])
  np.testing.assert_array_equal(ds.item_numeric["year"], ref.item_numeric["year"])
  assert np.isnan(ds.item_numeric["year"]).sum() == 1

  with pytest.raises(DataError, match=r"^items, row 2, column 'year': expected a number"):
    jaxrec.Dataset.from_frames({"user": [1, 2], "item": [10, 11]}, {"item": [10, 11], "year": [1999, "soon"]},
                               item_numeric=["year"])
  with pytest.raises(DataError, match=r"^interactions: expected columns of equal length \(column 'item'\)"):
    jaxrec.Dataset.from_frames({"user": [1, 2], "item": [10]})
  with pytest.raises(TypeError, match="unknown column role"):
    jaxrec.Dataset.from_frames({"user": [1], "item": [10]}, genres=["g"])
  # A categorical cell may hold a list (JSON, Parquet, pandas object columns); integer ids read as their digits.
  ds = jaxrec.Dataset.from_frames({"user": np.array([7, 7, 8]), "item": np.array([1, 2, 1])},
                                  {"item": [1, 2], "tags": [["a", "b"], []]}, item_categorical=["tags"])
  assert ds.item_raw_ids.tolist() == ["1", "2"] and ds.item_features["tags"].tolist() == [[1, 2], [0, 0]]


def test_train_on_an_in_memory_dataset(tmp_path):
  """jaxrec.train(cfg, dataset=ds): cfg.data only splits it (data.source is never read)."""
  frames = {kind: columns_of(ROOT_EXAMPLE / f"{kind}.csv") for kind in ("interactions", "items", "users")}
  ds = jaxrec.Dataset.from_frames(frames["interactions"], frames["items"], frames["users"], **EXAMPLE_ROLES)
  cfg = jaxrec.load_config(os.path.join(ROOT, "configs/table_example.py"),
                           ["data.source=ml1m", "data.path=/nonexistent", "data.split=loo", f"workdir={tmp_path}"])
  result = jaxrec.train(cfg, dataset=ds)
  assert result["data/interactions"] == 474 and result["data/users"] == 60
  assert "leave-one-out" in result["protocol"] or "loo" in result["protocol"], result["protocol"]
  assert result["popularity/users"] == 60  # leave-one-out: every user has one test item
  assert result["recall@10"] > result["popularity/recall@10"], result


def test_the_exported_query_tower_takes_numeric_user_features(tmp_path):
  """user_numeric is an input of the artifact: a known user's stored row gives its user_vectors row
  bit for bit, another value changes the query, and a new user's missing values (NaN) serve."""
  numeric_world(tmp_path, shuffle=False)
  cfg = jaxrec.load_config(os.path.join(ROOT, "configs/tiny.py"), [
      "data.source=table", f"data.path={tmp_path}", "data.table.items=items.csv", "data.table.users=users.csv",
      "data.table.time=ts", "data.table.item_numeric=place", "data.table.user_numeric=taste", "train.steps=30",
      f"workdir={tmp_path / 'run'}"])
  jaxrec.train(cfg)
  index = jaxrec.ItemIndex.load(str(tmp_path / "run" / "index"))
  tower = index.query_tower
  spec = {entry["name"]: entry for entry in tower.spec["inputs"]}
  assert spec["user_numeric"]["dtype"] == "float32" and spec["user_numeric"]["columns"] == ["taste"]
  raw = table.load(str(tmp_path), cfg.data.table).user_numeric["taste"]
  mean, std = spec["user_numeric"]["mean"][0], spec["user_numeric"]["std"][0]
  np.testing.assert_allclose(tower.user_features["user_numeric"][:, 0], (raw - mean) / std, rtol=1e-5, atol=1e-6)
  examples = {name: tower.examples[name] for name in tower.input_names}
  np.testing.assert_array_equal(tower.examples["query_vectors"], index.user_vectors[:len(examples["user_rows"])])
  moved = dict(examples, user_numeric=examples["user_numeric"] + 3.0)
  assert np.abs(tower(**moved) - tower.examples["query_vectors"]).max() > 1e-3
  new = tower.new_user_inputs([np.array([0, 1, 2])])
  assert np.isnan(new["user_numeric"]).all()
  q = tower(**new)
  assert q.shape == (1, tower.width) and np.isfinite(q).all()


def test_list_cells_and_iso_dates(tmp_path):
  """JSON lines hold multi-valued cells as lists; ISO dates are timestamps."""
  (tmp_path / "events.jsonl").write_text(
      '{"user": "u1", "item": "a", "when": "2024-05-01", "tags": ["x", "y"]}\n'
      '{"user": "u2", "item": "a", "when": "2024-05-01T00:00:10", "tags": []}\n')
  ds = table.load(str(tmp_path), TableConfig(interactions="events.jsonl", time="when", context_categorical=("tags",)))
  assert ds.timestamps.tolist() == [1714521600, 1714521610] and ds.has_time
  assert ds.context_features["tags"].tolist() == [[1, 2], [0, 0]]


def test_parquet_missing_values_and_row_numbered_errors(tmp_path):
  """Parquet errors name the row (from 1)."""
  pytest.importorskip("pyarrow", reason="Parquet tables need pyarrow (pip install pyarrow)")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"user": ["u1", "u2"], "item": ["a", "b"], "price": [1.5, None]}), tmp_path / "e.parquet")
  ds = table.load(str(tmp_path), TableConfig(interactions="e.parquet", context_numeric=("price",)))
  np.testing.assert_array_equal(ds.context_numeric["price"], [1.5, np.nan])
  pq.write_table(pa.table({"user": ["u1", "u2"], "item": ["a", None]}), tmp_path / "bad.parquet")
  with pytest.raises(DataError, match=r"bad.parquet, row 2, column 'item': expected a non-empty item id"):
    table.load(str(tmp_path), TableConfig(interactions="bad.parquet"))


def test_parquet_without_pyarrow_is_one_line_naming_the_install(tmp_path, monkeypatch):
  import sys
  (tmp_path / "e.parquet").write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow then raises ImportError
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(DataError, match=r"e.parquet: expected pyarrow to read Parquet \(pip install pyarrow\)"):
    table.load(str(tmp_path), TableConfig(interactions="e.parquet"))
