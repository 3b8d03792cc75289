"""The TFDS adapter on mocked movielens data (never a real download)."""

import numpy as np
import pytest

from jaxrec.config import DataConfig
from jaxrec.data import sources
from jaxrec.data import tfds as jtfds
from jaxrec.data.parsing import DataError

tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed: pip install 'jaxrec[tfds]'")


def _example(user, movie, title, genres, rating, t, male=True, age=25.0, occupation=3):
  return {"user_id": user.encode(), "movie_id": movie.encode(), "movie_title": title.encode("utf-8"),
          "movie_genres": np.array(genres, np.int64), "user_rating": np.float32(rating), "timestamp": np.int64(t),
          "user_gender": np.bool_(male), "bucketized_user_age": np.float32(age), "raw_user_age": np.float32(age),
          "user_occupation_label": np.int64(occupation), "user_occupation_text": b"x", "user_zip_code": b"55455"}


EXAMPLES = [
    _example("196", "242", "Kolya (1996)", [4], 3, 881250949),
    _example("186", "302", "L.A. Confidential (1997)", [5, 10, 16], 3, 891717742, male=False, age=35.0),
    _example("196", "543", "Misérables, Les (1995)", [7, 12], 5, 881251000),
]


def test_mapped_structure_from_known_examples():
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: EXAMPLES):
    dataset, split = sources.load(DataConfig(source="tfds", path="movielens/100k-ratings", split="loo"))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (3, 2, 3)
  assert dataset.has_time and dataset.ratings.tolist() == [3.0, 3.0, 5.0]
  misérables = int(np.flatnonzero(dataset.item_raw_ids == "543")[0])
  assert dataset.item_titles[misérables] == "Misérables, Les (1995)"
  assert dataset.item_text[misérables] == "Misérables, Les (1995). Genres: Drama, Musical."
  user_186 = int(np.flatnonzero(dataset.user_raw_ids == "186")[0])
  assert dataset.user_features["gender"][user_186, 0] == 2 and dataset.user_features["age"][user_186, 0] == 4
  assert dataset.user_feature_sizes["occupation"] == 23 and dataset.item_feature_sizes["genre"] == 22
  # User 196 has two ratings: leave-one-out needs three, so both stay in training.
  assert len(split.train) == 3 and len(split.test) == 0


def test_random_mock_examples_validate():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    dataset = jtfds.load("movielens/100k-ratings")
  assert dataset.num_interactions == 40
  assert dataset.item_features["genre"].shape[0] == dataset.num_items
  assert set(dataset.user_features) == {"gender", "age", "occupation"}


def test_unprepared_or_unknown_builders_fail_without_downloading(tmp_path):
  with pytest.raises(DataError, match="no_such_dataset: expected a registered TFDS builder.*no such builder"):
    jtfds.load("no_such_dataset")
  with pytest.raises(DataError, match="no-such-dataset: expected a registered TFDS builder"):
    jtfds.load("no-such-dataset")
  # No mock and an empty data_dir: as_data_source only reads, so this fails fast instead of
  # trying the network.
  with pytest.raises(DataError, match=r"movielens/100k-ratings: expected split 'train' prepared as array_record"):
    jtfds.load("movielens/100k-ratings", data_dir=str(tmp_path))


def test_missing_extra_is_a_clear_error(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "tensorflow_datasets":
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(ImportError, match=r"pip install 'jaxrec\[tfds\]'"):
    jtfds.import_tfds()
