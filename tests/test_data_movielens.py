"""MovieLens loaders against the real GroupLens files in ../shared/data (CI has them; missing = failure)."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrec.data import movielens
from jaxrec.data.movielens import GENRES

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared(folder: str) -> str:
  path = SHARED / folder
  assert path.is_dir(), f"shared data missing: {path} (tests read ../shared/data beside the repository)"
  return str(path)


@pytest.fixture(scope="module")
def ml100k():
  return movielens.load_ml100k(_shared("ml-100k"))


@pytest.fixture(scope="module")
def ml1m():
  return movielens.load_ml1m(_shared("ml-1m"))


def _item(dataset, raw_id):
  index = int(np.searchsorted(dataset.item_raw_ids, raw_id))
  assert dataset.item_raw_ids[index] == raw_id
  return index


def test_ml100k_counts(ml100k):
  assert (ml100k.num_interactions, ml100k.num_users, ml100k.num_items) == (100_000, 943, 1_682)
  assert len(np.unique(ml100k.items)) == 1_682
  values, counts = np.unique(ml100k.ratings, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {1.0: 6_110, 2.0: 11_370, 3.0: 27_145, 4.0: 34_174, 5.0: 21_201}
  assert ml100k.has_time and ml100k.timestamps.min() == 874_724_710 and ml100k.timestamps.max() == 893_286_638
  assert np.bincount(ml100k.users).min() == 20
  # First line of u.data: 196 242 3 881250949.
  assert (ml100k.user_raw_ids[ml100k.users[0]], ml100k.item_raw_ids[ml100k.items[0]], ml100k.ratings[0]) == (196, 242, 3.0)


def test_ml100k_accented_titles_and_text(ml100k):
  assert ml100k.item_titles[_item(ml100k, 543)] == "Misérables, Les (1995)"
  assert ml100k.item_titles[_item(ml100k, 1005)] == "Double vie de Véronique, La (Double Life of Veronique, The) (1991)"
  toy = _item(ml100k, 1)
  assert ml100k.item_text[toy] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
  genre = ml100k.item_features["genre"][toy]
  assert [GENRES[g - 1] for g in genre if g] == ["Animation", "Children's", "Comedy"]
  assert ml100k.item_features["decade"][toy, 0] == (1995 - 1900) // 10 + 1
  # Item 267 is "unknown" with only the unknown-genre flag: all padding.
  assert ml100k.item_titles[_item(ml100k, 267)] == "unknown"
  assert ml100k.item_features["genre"][_item(ml100k, 267)].sum() == 0


def test_ml100k_user_features(ml100k):
  first = int(np.searchsorted(ml100k.user_raw_ids, 1))  # 1|24|M|technician|85711
  assert ml100k.user_features["gender"][first, 0] == 1
  assert ml100k.user_features["age"][first, 0] == 2  # 18-24
  assert ml100k.user_feature_sizes == {"age": 8, "gender": 3, "occupation": 22}
  assert np.bincount(ml100k.user_features["gender"][:, 0]).tolist() == [0, 670, 273]


def test_ml1m_counts_without_ratings_file(ml1m):
  assert (ml1m.num_interactions, ml1m.num_users, ml1m.num_items) == (1_000_209, 6_040, 3_883)
  assert len(np.unique(ml1m.items)) == 3_706  # rated; the other 177 stay in the catalog as cold items
  assert ml1m.ratings is None and not ml1m.has_time
  np.testing.assert_array_equal(ml1m.timestamps, np.arange(1_000_209))
  first = [int(ml1m.item_raw_ids[i]) for i in ml1m.items[:10]]
  assert first == [1193, 661, 914, 3408, 2355, 1197, 1287, 2804, 594, 919]
  assert np.bincount(ml1m.users).min() == 20 and np.bincount(ml1m.users).max() == 2_314


def test_ml1m_titles_features(ml1m):
  assert ml1m.item_titles[_item(ml1m, 73)] == "Misérables, Les (1995)"
  assert ml1m.item_titles[_item(ml1m, 1149)] == "JLG/JLG - autoportrait de décembre (1994)"
  assert ml1m.item_titles[_item(ml1m, 570)] == "Slingshot, The (Kådisbellan ) (1993)"
  assert ml1m.item_text[_item(ml1m, 2)] == "Jumanji (1995). Genres: Adventure, Children's, Fantasy."
  user = int(np.searchsorted(ml1m.user_raw_ids, 2))  # 2::M::56::16::70072
  assert ml1m.user_features["gender"][user, 0] == 1 and ml1m.user_features["age"][user, 0] == 7
  assert ml1m.user_features["occupation"][user, 0] == 17


def test_ml1m_plot_text():
  dataset = movielens.load_ml1m(_shared("ml-1m"), "title+genres+director+plot")
  toy = dataset.item_text[_item(dataset, 1)]
  assert toy.startswith("Toy Story (1995). Genres: Animation, Children's, Comedy. Directed by John Lasseter. "
                        "A little boy named Andy loves to be in his room")
  # 860 and 1795 are missing from the MeLU file: title and genres only.
  assert dataset.item_text[_item(dataset, 860)] == "Maybe, Maybe Not (Bewegte Mann, Der) (1994). Genres: Comedy."
  assert "Directed by Claude Lelouch. Henri Fortin" in dataset.item_text[_item(dataset, 73)]
  with_cast = movielens.load_ml1m(_shared("ml-1m"), "title+actors")
  assert with_cast.item_text[_item(with_cast, 73)] == ("Misérables, Les (1995). Starring Jean-Paul Belmondo, "
                                                       "Michel Boujenah, Alessandra Martines, Salomé Lelouch.")


def test_ml1m_parses_fast():
  start = time.perf_counter()
  movielens.load_ml1m(_shared("ml-1m"))
  # About 0.4 s here; a per-line Python parser takes several times longer.
  assert time.perf_counter() - start < 5.0


def test_unknown_text_field():
  with pytest.raises(ValueError, match="unknown field.*synopsis.*title, genres"):
    movielens.load_ml100k(_shared("ml-100k"), "title+synopsis")
  with pytest.raises(ValueError, match="plot"):
    movielens.text_fields("plot", movielens.BASE_FIELDS)


def _write(path, name, text, encoding="latin-1"):
  with open(os.path.join(path, name), "wb") as f:
    f.write(text.encode(encoding))


def test_ml1m_with_ratings_dat(tmp_path):
  _write(tmp_path, "movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n73::Misérables, Les (1995)::Drama|Musical\n"
         "99::Unrated (1999)::Drama\n")
  _write(tmp_path, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
  _write(tmp_path, "ratings.dat", "1::73::5::978300760\n1::1::3::978302109\n2::1::4::978301968\n")
  dataset = movielens.load_ml1m(str(tmp_path))
  assert dataset.has_time and dataset.num_items == 3 and dataset.num_interactions == 3
  np.testing.assert_array_equal(dataset.ratings, [5, 3, 4])
  np.testing.assert_array_equal(dataset.timestamps, [978300760, 978302109, 978301968])
  assert dataset.item_titles[1] == "Misérables, Les (1995)"


def test_utf8_copy_decodes_the_same(tmp_path):
  text = "1::Toy Story (1995)::Animation\n73::Misérables, Les (1995)::Drama|Musical\n"
  _write(tmp_path, "movies.dat", text, encoding="utf-8")
  _write(tmp_path, "users.dat", "1::F::1::10::48067\n")
  _write(tmp_path, "interactions_implicit.tsv", "user_id\tmovie_id\n1\t73\n1\t1\n")
  dataset = movielens.load_ml1m(str(tmp_path))
  assert dataset.item_titles == ("Toy Story (1995)", "Misérables, Les (1995)")
