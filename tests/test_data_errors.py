"""Bad input fails with the file, the line number and what was expected."""

import json
import os

import numpy as np
import pytest

from jaxrec.config import DataConfig
from jaxrec.data import movielens, sources
from jaxrec.data.parsing import DataError, int_table

U_ITEM = ("1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
          "543|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n")
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n"
U_DATA = "1\t1\t5\t874965758\n2\t543\t3\t876893171\n1\t543\t4\t878542960\n"


def _ml100k(tmp_path, u_data=U_DATA, u_item=U_ITEM, u_user=U_USER, item_bytes=None):
  (tmp_path / "u.data").write_bytes(u_data.encode("latin-1") if isinstance(u_data, str) else u_data)
  (tmp_path / "u.item").write_bytes(item_bytes if item_bytes is not None else u_item.encode("latin-1"))
  (tmp_path / "u.user").write_bytes(u_user.encode("latin-1"))
  return str(tmp_path)


def _load(path, **kw):
  return sources.load(DataConfig(source="ml100k", path=path, split_ratios=(0.34, 0.33, 0.33), **kw))


def test_tiny_fixture_loads(tmp_path):
  dataset = movielens.load_ml100k(_ml100k(tmp_path))
  assert dataset.num_interactions == 3 and dataset.item_titles[1] == "Misérables, Les (1995)"


def test_missing_file(tmp_path):
  path = _ml100k(tmp_path)
  os.remove(os.path.join(path, "u.user"))
  with pytest.raises(DataError, match=r"u\.user: expected MovieLens-100K user list u\.user; got no such file"):
    _load(path)
  with pytest.raises(DataError, match=r"ml-nowhere/u\.data: expected MovieLens-100K ratings u\.data .*no such file"):
    _load(str(tmp_path / "ml-nowhere"))
  with pytest.raises(DataError, match="data.path set to the dataset's directory"):
    sources.load(DataConfig(source="ml100k", path=""))


@pytest.mark.parametrize("u_data, line, got", [
    (U_DATA + "2\tx1\t3\t876893171\n", 4, "non-numeric text 'x1' as item_id"),
    (U_DATA + "2\t1\t3.5\t876893171\n", 4, "a non-integer number '3.5' as rating"),
    ("1 1 5 874965758\n" + U_DATA, 1, r"1 field\(s\) in '1 1 5 874965758'"),
    (U_DATA + "\n\n2\t1\t3\n", 6, r"3 field\(s\) in '2\\t1\\t3'"),  # truncated last line, after blank lines
    (U_DATA + "2\t1\t3\t8768\t9\n", 4, r"5 field\(s\)"),
    ("user_id\titem_id\trating\ttimestamp\n" + U_DATA + "user_id\titem_id\trating\ttimestamp\n", 5, "a duplicate header line"),
    (b"1\t1\t5\t874965758\n2\t5\xe943\t3\t876893171\n", 2, "non-numeric text '5\xe943' as item_id"),
])
def test_malformed_ratings_line(tmp_path, u_data, line, got):
  path = _ml100k(tmp_path, u_data=u_data)
  with pytest.raises(DataError, match=rf"u\.data, line {line}: expected 4 '\\t'-separated integers \(user_id, item_id, "
                                      rf"rating, timestamp\).*; got {got}") as info:
    _load(path)
  assert info.value.line == line and info.value.path.endswith("u.data")


def test_one_header_is_fine(tmp_path):
  path = _ml100k(tmp_path, u_data="user_id\titem_id\trating\ttimestamp\n" + U_DATA)
  assert movielens.load_ml100k(path).num_interactions == 3


def test_unknown_ids_name_the_line(tmp_path):
  path = _ml100k(tmp_path, u_data=U_DATA + "\n1\t999\t3\t876893171\n")
  with pytest.raises(DataError, match=r"u\.data, line 5: expected a movie id listed in the catalog file; got unknown movie id 999"):
    _load(path)
  path = _ml100k(tmp_path, u_data=U_DATA + "7\t1\t3\t876893171\n")
  with pytest.raises(DataError, match=r"u\.data, line 4: .*unknown user id 7"):
    _load(path)


def test_malformed_catalog_lines(tmp_path):
  path = _ml100k(tmp_path, u_item=U_ITEM + "7|Short line|01-Jan-1995\n")
  with pytest.raises(DataError, match=r"u\.item, line 3: expected 24 '\|'-separated fields .*got 3 field\(s\)"):
    _load(path)
  path = _ml100k(tmp_path, u_item=U_ITEM.replace("|0|0|0|1|1|1|", "|0|0|0|1|x|1|", 1))
  with pytest.raises(DataError, match=r"u\.item, line 1: expected 19 genre flags"):
    _load(path)
  path = _ml100k(tmp_path, u_item=U_ITEM + U_ITEM.splitlines(keepends=True)[0])
  with pytest.raises(DataError, match=r"u\.item, line 3: expected each movie id once; got a second line for movie id 1"):
    _load(path)
  path = _ml100k(tmp_path, u_user=U_USER + "3|33|X|writer|1\n")
  with pytest.raises(DataError, match=r"u\.user, line 3: expected gender M or F; got 'X'"):
    _load(path)


def test_bad_encoding_in_utf8_files(tmp_path):
  for name, text in (("movies.dat", "1::Toy Story (1995)::Animation\n"), ("users.dat", "1::F::1::10::48067\n"),
                     ("interactions_implicit.tsv", "user_id\tmovie_id\n1\t1\n")):
    (tmp_path / name).write_text(text)
  (tmp_path / "movies_extrainfos.dat").write_bytes(
      b"1::Toy Story::1995::G::x::y::John::w::Tom::A boy.::u\r\n2::Bad::1995::G::x::y::J\xe9r\xf4me::w::a::p::u\r\n")
  with pytest.raises(DataError, match=r"movies_extrainfos\.dat, line 2: expected text in utf-8; got byte 0xe9 that is not valid utf-8"):
    movielens.load_ml1m(str(tmp_path), "title+plot")
  assert movielens.load_ml1m(str(tmp_path)).num_interactions == 1  # the extra file is read only when asked for


def test_ml1m_ratings_dat_separator(tmp_path):
  (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
  (tmp_path / "users.dat").write_text("1::F::1::10::48067\n")
  (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n1:1::3::978302109\n")
  with pytest.raises(DataError, match=r"ratings\.dat, line 2: expected 4 '::'-separated integers .*3 field\(s\) in '1:1::3::978302109'"):
    movielens.load_ml1m(str(tmp_path))
  (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n1::1\t::3::978302109\n")
  with pytest.raises(DataError, match=r"ratings\.dat, line 2: .*a stray tab in '1\\t' as MovieID"):
    movielens.load_ml1m(str(tmp_path))


def test_duplicate_header_in_interactions(tmp_path):
  (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
  (tmp_path / "users.dat").write_text("1::F::1::10::48067\n")
  (tmp_path / "interactions_implicit.tsv").write_text("user_id\tmovie_id\n1\t1\nuser_id\tmovie_id\n1\t1\n")
  with pytest.raises(DataError, match=r"interactions_implicit\.tsv, line 3: .*a duplicate header line 'user_id\\tmovie_id'"):
    movielens.load_ml1m(str(tmp_path))


def test_empty_after_filtering(tmp_path):
  path = _ml100k(tmp_path)
  with pytest.raises(DataError, match=rf"{path}: expected some interactions left after data.min_rating=6; got none"):
    _load(path, min_rating=6)
  with pytest.raises(DataError, match="data.kcore=3"):
    _load(path, kcore=3)
  (tmp_path / "u.data").write_text("\n\n")
  with pytest.raises(ValueError, match="no interactions"):
    _load(path)


def test_min_rating_needs_ratings(tmp_path):
  (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
  (tmp_path / "users.dat").write_text("1::F::1::10::48067\n")
  (tmp_path / "interactions_implicit.tsv").write_text("user_id\tmovie_id\n1\t1\n")
  with pytest.raises(DataError, match="expected ratings for data.min_rating=4; got dataset 'ml1m' without ratings"):
    sources.load(DataConfig(source="ml1m", path=str(tmp_path), min_rating=4))


def test_amazon_bad_lines(tmp_path):
  good = json.dumps({"reviewerID": "u", "asin": "i", "overall": 5.0, "unixReviewTime": 1, "summary": "ok"})
  path = tmp_path / "reviews.json"
  path.write_text(good + "\n" + good[:-20] + "\n")
  with pytest.raises(DataError, match=r"reviews\.json, line 2: expected one JSON object per line .*invalid JSON"):
    sources.load(DataConfig(source="amazon", path=str(path)))
  path.write_text(good + "\n\n" + json.dumps({"reviewerID": "u", "overall": 5.0}) + "\n")
  with pytest.raises(DataError, match=r"line 3: .*got no asin, unixReviewTime"):
    sources.load(DataConfig(source="amazon", path=str(path)))
  path.write_bytes(good.encode() + b"\n" + good.replace("ok", "caf\xe9").encode("latin-1") + b"\n")
  with pytest.raises(DataError, match=r"reviews\.json, line 2: expected text in utf-8"):
    sources.load(DataConfig(source="amazon", path=str(path)))
  (tmp_path / "more.json").write_text(good)
  with pytest.raises(DataError, match=r"exactly one Amazon reviews \*\.json.*got 2 such files"):
    sources.load(DataConfig(source="amazon", path=str(tmp_path)))


def test_int_table_fast_path_matches_line_walk(tmp_path):
  rows = np.random.default_rng(0).integers(0, 10**6, size=(5_000, 3))
  text = "\n".join("\t".join(map(str, r)) for r in rows) + "\n"
  (tmp_path / "t.tsv").write_text(text)
  np.testing.assert_array_equal(int_table(tmp_path / "t.tsv", ("a", "b", "c"), "\t"), rows)
  (tmp_path / "t.tsv").write_text(text.replace("\n", "\t\n", 4_321).replace("\t\n", "\n", 4_320))
  with pytest.raises(DataError, match=r"t\.tsv, line 4321: .*4 field\(s\)"):
    int_table(tmp_path / "t.tsv", ("a", "b", "c"), "\t")
