"""MovieLens loaders: the synthetic GroupLens-format files in tests/fixtures on every run, and the
real releases' published counts when JAXREC_DATA points at them (skipped otherwise)."""

import os
import shutil
import time

import numpy as np
import pytest

from fixtures.data_roots import fixture_path, full_data_path
from jaxrec.data import movielens
from jaxrec.data.movielens import GENRES


@pytest.fixture(scope="module")
def ml100k():
  return movielens.load_ml100k(fixture_path("ml-100k"))


@pytest.fixture(scope="module")
def ml1m():
  return movielens.load_ml1m(fixture_path("ml-1m"))


def _item(dataset, raw_id):
  index = int(np.searchsorted(dataset.item_raw_ids, raw_id))
  assert dataset.item_raw_ids[index] == raw_id
  return index


def _user(dataset, raw_id):
  index = int(np.searchsorted(dataset.user_raw_ids, raw_id))
  assert dataset.user_raw_ids[index] == raw_id
  return index


def test_ml100k_counts(ml100k):
  assert (ml100k.num_interactions, ml100k.num_users, ml100k.num_items) == (577, 30, 60)
  assert len(np.unique(ml100k.items)) == 58  # 59 and 60 are never rated but stay in the catalog
  values, counts = np.unique(ml100k.ratings, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {1.0: 44, 2.0: 69, 3.0: 165, 4.0: 168, 5.0: 131}
  assert ml100k.has_time and ml100k.timestamps.min() == 875_014_039 and ml100k.timestamps.max() == 892_994_890
  assert np.bincount(ml100k.users).min() == 8 and np.bincount(ml100k.users).max() == 29
  # First line of u.data: 30 14 4 880156392.
  first = (ml100k.user_raw_ids[ml100k.users[0]], ml100k.item_raw_ids[ml100k.items[0]], ml100k.ratings[0], ml100k.timestamps[0])
  assert first == (30, 14, 4.0, 880_156_392)


def test_ml100k_latin1_titles_genres_and_text(ml100k):
  assert ml100k.item_titles[_item(ml100k, 7)] == "Garçon Rêveur, Le (1992)"
  assert ml100k.item_titles[_item(ml100k, 21)] == "Smörgåsbord Nights (1997)"
  lanterns = _item(ml100k, 1)
  assert ml100k.item_text[lanterns] == "Paper Lanterns (1995). Genres: Animation, Children's, Comedy."
  genre = ml100k.item_features["genre"][lanterns]
  assert [GENRES[g - 1] for g in genre if g] == ["Animation", "Children's", "Comedy"]
  assert ml100k.item_features["decade"][lanterns, 0] == (1995 - 1900) // 10 + 1
  # Item 13 is "unknown" with only the unknown-genre flag: all padding.
  assert ml100k.item_titles[_item(ml100k, 13)] == "unknown"
  assert ml100k.item_features["genre"][_item(ml100k, 13)].sum() == 0
  untitled = _item(ml100k, 33)  # no "(year)" in the title: decade 0
  assert ml100k.item_text[untitled] == "Untitled Harbor Project. Genres: Documentary."
  assert ml100k.item_features["decade"][untitled, 0] == 0


def test_ml100k_user_features(ml100k):
  first = _user(ml100k, 1)  # 1|19|F|student|40217
  assert ml100k.user_features["gender"][first, 0] == 2
  assert ml100k.user_features["age"][first, 0] == 2  # 18-24
  assert ml100k.user_features["occupation"][first, 0] == 8  # "student": 8th of the 10 occupations, sorted
  assert ml100k.user_feature_sizes == {"age": 8, "gender": 3, "occupation": 11}
  assert np.bincount(ml100k.user_features["gender"][:, 0]).tolist() == [0, 14, 16]


def test_ml1m_pairs_without_ratings_file(ml1m):
  assert (ml1m.num_interactions, ml1m.num_users, ml1m.num_items) == (756, 40, 80)
  assert len(np.unique(ml1m.items)) == 72  # the 8 ids ending in 9 stay in the catalog as cold items
  assert ml1m.ratings is None and not ml1m.has_time
  np.testing.assert_array_equal(ml1m.timestamps, np.arange(756))
  first = [int(ml1m.item_raw_ids[i]) for i in ml1m.items[:10]]
  assert first == [22, 4, 27, 34, 38, 46, 77, 65, 43, 52]
  assert np.bincount(ml1m.users).min() == 11 and np.bincount(ml1m.users).max() == 25


def test_ml1m_titles_features(ml1m):
  assert ml1m.item_titles[_item(ml1m, 11)] == "Misère Dorée, La (1996)"
  assert ml1m.item_titles[_item(ml1m, 17)] == "Kärlek på Is (1994)"
  assert ml1m.item_text[_item(ml1m, 2)] == "Frozen Compass (1995). Genres: Adventure, Children's, Fantasy."
  user = _user(ml1m, 2)  # 2::M::50::7::61820
  assert ml1m.user_features["gender"][user, 0] == 1 and ml1m.user_features["age"][user, 0] == 6
  assert ml1m.user_features["occupation"][user, 0] == 8


def test_ml1m_plot_text():
  dataset = movielens.load_ml1m(fixture_path("ml-1m"), "title+genres+director+plot")
  assert dataset.item_text[_item(dataset, 2)] == (
      "Frozen Compass (1995). Genres: Adventure, Children's, Fantasy. Directed by Kira Okafor. "
      "Friends brother of map old the archivist with their finds lighthouse friends of lighthouse.")
  # 23 and 61 have no line in movies_extrainfos.dat: title and genres only.
  assert dataset.item_text[_item(dataset, 23)] == "Wild Engine (1988). Genres: Sci-Fi."
  assert dataset.item_text[_item(dataset, 61)] == "Velvet Mirror (1978). Genres: Animation, Musical."
  # Movie 5's director is "N/A": the sentence is left out, the plot stays.
  assert dataset.item_text[_item(dataset, 5)].startswith("Crimson Mirror (1939). Genres: Drama, War. Young ago own")
  with_cast = movielens.load_ml1m(fixture_path("ml-1m"), "title+actors")
  assert with_cast.item_text[_item(with_cast, 11)] == ("Misère Dorée, La (1996). Starring Luca Okafor, Pavel Hollis, "
                                                       "Carla Falkner, Salomé Ferrand.")


def test_ml1m_ratings_dat_adds_ratings_and_time(ml1m):
  dataset = movielens.load_ml1m(fixture_path("ml-1m-ratings"))
  assert dataset.has_time and (dataset.num_interactions, dataset.num_users, dataset.num_items) == (756, 40, 80)
  # The same (user, movie) rows as the pairs file, now with a rating and a time each.
  np.testing.assert_array_equal(dataset.users, ml1m.users)
  np.testing.assert_array_equal(dataset.items, ml1m.items)
  values, counts = np.unique(dataset.ratings, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {1.0: 52, 2.0: 95, 3.0: 197, 4.0: 257, 5.0: 155}
  # First line of ratings.dat: 1::22::4::1007900948.
  assert (dataset.ratings[0], dataset.timestamps[0]) == (4.0, 1_007_900_948)
  assert dataset.timestamps.min() == 957_143_722 and dataset.timestamps.max() == 1_046_266_185


def test_unknown_text_field():
  with pytest.raises(ValueError, match="unknown field.*synopsis.*title, genres"):
    movielens.load_ml100k(fixture_path("ml-100k"), "title+synopsis")
  with pytest.raises(ValueError, match="plot"):
    movielens.text_fields("plot", movielens.BASE_FIELDS)


def test_pairs_file_without_header(tmp_path):
  for name in ("movies.dat", "users.dat"):
    shutil.copy(os.path.join(fixture_path("ml-1m"), name), tmp_path / name)
  with open(os.path.join(fixture_path("ml-1m"), "interactions_implicit.tsv"), "rb") as f:
    (tmp_path / "interactions_implicit.tsv").write_bytes(f.read().split(b"\n", 1)[1])
  dataset = movielens.load_ml1m(str(tmp_path))
  assert dataset.num_interactions == 756 and int(dataset.item_raw_ids[dataset.items[0]]) == 22


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


# The real releases (JAXREC_DATA): the published counts and a few known rows.

@pytest.fixture(scope="module")
def ml100k_full():
  return movielens.load_ml100k(full_data_path("ml-100k"))


@pytest.fixture(scope="module")
def ml1m_full():
  return movielens.load_ml1m(full_data_path("ml-1m"))


def test_full_ml100k_counts(ml100k_full):
  ml100k = ml100k_full
  assert (ml100k.num_interactions, ml100k.num_users, ml100k.num_items) == (100_000, 943, 1_682)
  assert len(np.unique(ml100k.items)) == 1_682
  values, counts = np.unique(ml100k.ratings, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {1.0: 6_110, 2.0: 11_370, 3.0: 27_145, 4.0: 34_174, 5.0: 21_201}
  assert ml100k.has_time and ml100k.timestamps.min() == 874_724_710 and ml100k.timestamps.max() == 893_286_638
  assert np.bincount(ml100k.users).min() == 20
  # First line of u.data: 196 242 3 881250949.
  assert (ml100k.user_raw_ids[ml100k.users[0]], ml100k.item_raw_ids[ml100k.items[0]], ml100k.ratings[0]) == (196, 242, 3.0)


def test_full_ml100k_accented_titles_and_text(ml100k_full):
  ml100k = ml100k_full
  assert ml100k.item_titles[_item(ml100k, 543)] == "Misérables, Les (1995)"
  assert ml100k.item_titles[_item(ml100k, 1005)] == "Double vie de Véronique, La (Double Life of Veronique, The) (1991)"
  toy = _item(ml100k, 1)
  assert ml100k.item_text[toy] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
  assert ml100k.item_titles[_item(ml100k, 267)] == "unknown"
  assert ml100k.item_features["genre"][_item(ml100k, 267)].sum() == 0


def test_full_ml100k_user_features(ml100k_full):
  ml100k = ml100k_full
  first = _user(ml100k, 1)  # 1|24|M|technician|85711
  assert ml100k.user_features["gender"][first, 0] == 1
  assert ml100k.user_features["age"][first, 0] == 2  # 18-24
  assert ml100k.user_feature_sizes == {"age": 8, "gender": 3, "occupation": 22}
  assert np.bincount(ml100k.user_features["gender"][:, 0]).tolist() == [0, 670, 273]


def test_full_ml1m_counts_without_ratings_file(ml1m_full):
  ml1m = ml1m_full
  assert (ml1m.num_interactions, ml1m.num_users, ml1m.num_items) == (1_000_209, 6_040, 3_883)
  assert len(np.unique(ml1m.items)) == 3_706  # rated; the other 177 stay in the catalog as cold items
  assert ml1m.ratings is None and not ml1m.has_time
  np.testing.assert_array_equal(ml1m.timestamps, np.arange(1_000_209))
  first = [int(ml1m.item_raw_ids[i]) for i in ml1m.items[:10]]
  assert first == [1193, 661, 914, 3408, 2355, 1197, 1287, 2804, 594, 919]
  assert np.bincount(ml1m.users).min() == 20 and np.bincount(ml1m.users).max() == 2_314


def test_full_ml1m_titles_features(ml1m_full):
  ml1m = ml1m_full
  assert ml1m.item_titles[_item(ml1m, 73)] == "Misérables, Les (1995)"
  assert ml1m.item_titles[_item(ml1m, 1149)] == "JLG/JLG - autoportrait de décembre (1994)"
  assert ml1m.item_titles[_item(ml1m, 570)] == "Slingshot, The (Kådisbellan ) (1993)"
  assert ml1m.item_text[_item(ml1m, 2)] == "Jumanji (1995). Genres: Adventure, Children's, Fantasy."
  user = _user(ml1m, 2)  # 2::M::56::16::70072
  assert ml1m.user_features["gender"][user, 0] == 1 and ml1m.user_features["age"][user, 0] == 7
  assert ml1m.user_features["occupation"][user, 0] == 17


def test_full_ml1m_plot_text():
  path = full_data_path("ml-1m")
  dataset = movielens.load_ml1m(path, "title+genres+director+plot")
  toy = dataset.item_text[_item(dataset, 1)]
  assert toy.startswith("Toy Story (1995). Genres: Animation, Children's, Comedy. Directed by John Lasseter. "
                        "A little boy named Andy loves to be in his room")
  # 860 and 1795 are missing from the MeLU file: title and genres only.
  assert dataset.item_text[_item(dataset, 860)] == "Maybe, Maybe Not (Bewegte Mann, Der) (1994). Genres: Comedy."
  assert "Directed by Claude Lelouch. Henri Fortin" in dataset.item_text[_item(dataset, 73)]
  with_cast = movielens.load_ml1m(path, "title+actors")
  assert with_cast.item_text[_item(with_cast, 73)] == ("Misérables, Les (1995). Starring Jean-Paul Belmondo, "
                                                       "Michel Boujenah, Alessandra Martines, Salomé Lelouch.")


def test_full_ml1m_parses_fast():
  path = full_data_path("ml-1m")
  start = time.perf_counter()
  movielens.load_ml1m(path)
  # About 0.4 s here; a per-line Python parser takes several times longer.
  assert time.perf_counter() - start < 5.0
