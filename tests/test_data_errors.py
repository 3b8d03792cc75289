"""Bad input fails with the file, the line number and what was expected."""

import gzip
import json
import logging
import os

import numpy as np
import pytest

from jaxrec.config import Config, ConfigError, DataConfig, validate
from jaxrec.data import movielens, sources
from jaxrec.data.parsing import DataError, int_table
from jaxrec.data.splits import describe

U_ITEM = ("1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
          "543|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n")
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n"
U_DATA = "1\t1\t5\t874965758\n2\t543\t3\t876893171\n1\t543\t4\t878542960\n"


def _ml100k(tmp_path, u_data=U_DATA, u_item=U_ITEM, u_user=U_USER, item_bytes=None):
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "u.data").write_bytes(u_data.encode("latin-1") if isinstance(u_data, str) else u_data)
  (tmp_path / "u.item").write_bytes(item_bytes if item_bytes is not None else u_item.encode("latin-1"))
  (tmp_path / "u.user").write_bytes(u_user.encode("latin-1"))
  return str(tmp_path)


def _load(path, **kw):
  return sources.load(DataConfig(source="ml100k", path=path, split_ratios=(0.34, 0.33, 0.33), **kw))


def test_tiny_fixture_loads(tmp_path):
  dataset = movielens.load_ml100k(_ml100k(tmp_path))
  assert dataset.num_interactions == 3 and dataset.item_titles[1] == "Misérables, Les (1995)"


def test_missing_file(tmp_path, monkeypatch):
  path = _ml100k(tmp_path)
  os.remove(os.path.join(path, "u.user"))
  with pytest.raises(DataError, match=r"u\.user: expected MovieLens-100K user list u\.user; got no such file"):
    _load(path)
  with pytest.raises(DataError, match=r"ml-nowhere/u\.data: expected MovieLens-100K ratings u\.data .*no such file"):
    _load(str(tmp_path / "ml-nowhere"))
  # An empty data.path reads the source's folder under the data root: the error names that folder.
  monkeypatch.setenv("JAXREC_DATA", str(tmp_path / "root"))
  with pytest.raises(DataError, match=r"root/ml-100k/u\.data: expected MovieLens-100K ratings u\.data .*no such file"):
    sources.load(DataConfig(source="ml100k", path=""))
  with pytest.raises(DataError, match="data.path set to the dataset's directory"):
    sources.load(DataConfig(source="files", path=""))


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
  with pytest.raises(DataError, match=r"u\.data: expected 4 '\\t'-separated integers .*; got no data lines \(an empty file\)$"):
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


# Odd but legitimate files: a UTF-8 byte-order mark, CRLF line endings, repeated interactions.

BOM = b"\xef\xbb\xbf"
ML1M = {"movies.dat": "1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Action\n",
        "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
        "ratings.dat": "1::1::5::978300760\n2::1::3::978302109\n2::2::4::978301968\n",
        "movies_extrainfos.dat": "1::Toy Story::1995::G::x::y::John::w::Tom::A boy.::u\n"
                                 "2::Heat::1995::R::x::y::Michael::w::Al::A heist.::u\n"}
FILES = {"train.tsv": "user_id:token\titem_id:token\n1\ta\n2\tb\n1\tb\n", "test.tsv": "1\tc\n2\ta\n",
         "items.tsv": "item_id\ttitle\ttext\na\tAlpha\tfirst\nb\tBeta\tsecond\nc\tGamma\tthird\n"}


def _review(user, item, time, summary="ok"):
  return json.dumps({"reviewerID": user, "asin": item, "overall": 4.0, "unixReviewTime": time, "summary": summary})


AMAZON = "\n".join([_review("u1", "i1", 1), _review("u2", "i1", 2), _review("u1", "i2", 3, "fine")]) + "\n"


def _write(directory, files, encode):
  directory.mkdir()
  for name, text in files.items():
    (directory / name).write_bytes(encode(text))
  return str(directory)


def _ml100k_files():
  return {"u.data": U_DATA, "u.item": U_ITEM, "u.user": U_USER}


_LOADERS = {  # name: (files, whole-text encoding, loader)
    "ml100k": (_ml100k_files(), "latin-1", lambda p: movielens.load_ml100k(p)),
    "ml1m": (ML1M, "utf-8", lambda p: movielens.load_ml1m(p, "title+genres+plot")),
    "amazon": ({"reviews.json": AMAZON}, "utf-8", lambda p: sources.load(DataConfig(source="amazon", path=p))[0]),
    "files": (FILES, "utf-8", lambda p: sources.load(DataConfig(source="files", path=p, split="predefined"))[0]),
}


def _assert_same_dataset(a, b):
  for field in ("users", "items", "timestamps", "item_raw_ids", "user_raw_ids"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  assert a.item_text == b.item_text and a.item_titles == b.item_titles
  assert (a.ratings is None) == (b.ratings is None)
  if a.ratings is not None:
    np.testing.assert_array_equal(a.ratings, b.ratings)
  for table in ("item_features", "user_features"):
    assert getattr(a, table).keys() == getattr(b, table).keys()
    for key, values in getattr(a, table).items():
      np.testing.assert_array_equal(values, getattr(b, table)[key], err_msg=key)


@pytest.mark.parametrize("source", sorted(_LOADERS))
@pytest.mark.parametrize("bom, newline", [(False, "\r\n"), (True, "\n"), (True, "\r\n")])
def test_bom_and_crlf_read_like_plain_lf(tmp_path, source, bom, newline):
  files, encoding, load = _LOADERS[source]
  plain = load(_write(tmp_path / "lf", files, lambda t: t.encode(encoding)))
  odd = load(_write(tmp_path / "odd", files, lambda t: (BOM if bom else b"") + t.replace("\n", newline).encode(encoding)))
  _assert_same_dataset(odd, plain)


def test_bom_in_ml1m_implicit_pairs_and_gzipped_amazon(tmp_path):
  files = {k: v for k, v in ML1M.items() if k != "ratings.dat"}
  files["interactions_implicit.tsv"] = "user_id\tmovie_id\n1\t1\n2\t1\n2\t2\n"
  plain = movielens.load_ml1m(_write(tmp_path / "lf", files, str.encode))
  odd = movielens.load_ml1m(_write(tmp_path / "odd", files, lambda t: BOM + t.replace("\n", "\r\n").encode()))
  _assert_same_dataset(odd, plain)
  assert odd.num_interactions == 3  # the header is not an interaction

  gz = tmp_path / "gz"
  gz.mkdir()
  (gz / "reviews.json.gz").write_bytes(gzip.compress(BOM + AMAZON.replace("\n", "\r\n").encode()))
  plain = sources.load(DataConfig(source="amazon", path=_write(tmp_path / "json", {"r.json": AMAZON}, str.encode)))[0]
  _assert_same_dataset(sources.load(DataConfig(source="amazon", path=str(gz)))[0], plain)


@pytest.mark.parametrize("header", [True, False])
def test_bom_before_a_files_split_gives_no_phantom_user(tmp_path, header):
  lines = ("user_id:token\titem_id:token\n" if header else "") + "1\ta\n2\tb\n1\tb\n"
  path = _write(tmp_path / "split", {"train.tsv": lines, "test.tsv": "1\tc\n"}, lambda t: BOM + t.encode())
  dataset, split = sources.load(DataConfig(source="files", path=path, split="predefined"))
  assert dataset.user_raw_ids.tolist() == [1, 2]  # integer ids: no '\ufeff1', no 'user_id:token'
  assert dataset.item_raw_ids.tolist() == ["a", "b", "c"]
  assert len(split.train) == 3 and len(split.test) == 1


def _one_line_error(load, file_name):
  with pytest.raises(DataError) as info:
    load()
  message = str(info.value)
  assert len(message.splitlines()) == 1 and os.path.basename(info.value.path) == file_name, message
  return message


def test_empty_catalogs_and_interaction_files_name_the_file(tmp_path):
  path = _ml100k(tmp_path / "ml100k", u_item="")
  message = _one_line_error(lambda: _load(path), "u.item")
  assert message.endswith("u.item: expected 24 '|'-separated fields (movie id|title|release date|video date|"
                          "IMDb URL|19 genre flags); got no lines (an empty file)")
  path = _ml100k(tmp_path / "ml100k", u_user="\n")
  assert "got no lines (an empty file)" in _one_line_error(lambda: _load(path), "u.user")
  path = _ml100k(tmp_path / "ml100k", u_data="user_id\titem_id\trating\ttimestamp\n")
  assert "got no data lines after the header" in _one_line_error(lambda: _load(path), "u.data")

  ml1m = _write(tmp_path / "ml1m", {**ML1M, "movies.dat": ""}, str.encode)
  assert "got no lines (an empty file)" in _one_line_error(lambda: movielens.load_ml1m(ml1m), "movies.dat")
  (tmp_path / "ml1m" / "movies.dat").write_text(ML1M["movies.dat"])
  (tmp_path / "ml1m" / "ratings.dat").write_text("\r\n")
  assert "got no data lines (an empty file)" in _one_line_error(lambda: movielens.load_ml1m(ml1m), "ratings.dat")

  split = _write(tmp_path / "split", {**FILES, "items.tsv": "item_id\ttitle\n"}, str.encode)
  load_split = lambda: sources.load(DataConfig(source="files", path=split, split="predefined"))  # noqa: E731
  assert "got no items (an empty catalog)" in _one_line_error(load_split, "items.tsv")
  (tmp_path / "split" / "items.tsv").unlink()
  (tmp_path / "split" / "test.tsv").write_text("user_id\titem_id\n")
  assert "test.tsv: expected at least one test interaction" in _one_line_error(load_split, "test.tsv")


# u.data with two repeats: line 4 repeats line 1's pair EARLIER in time (so line 4 stays, line 1
# goes), line 5 repeats line 2's pair later (line 5 goes).
U_DATA_REPEATS = U_DATA + "1\t1\t3\t874965000\n2\t543\t4\t876893999\n"
U_DATA_DEDUPED = "".join(U_DATA_REPEATS.splitlines(keepends=True)[i] for i in (1, 2, 3))


def test_duplicates_drop_keeps_the_earliest_and_warns(tmp_path, caplog):
  caplog.set_level(logging.WARNING, logger="jaxrec")
  dataset, split = _load(_ml100k(tmp_path / "repeats", u_data=U_DATA_REPEATS))
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert "u.data: dropped 2 repeated (user, item) row(s)" in warning and "user 1, item 1" in warning
  clean, clean_split = _load(_ml100k(tmp_path / "clean", u_data=U_DATA_DEDUPED), duplicates="keep")
  _assert_same_dataset(dataset, clean)
  for part in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(split, part), getattr(clean_split, part))
  assert split.protocol == "2 repeated pairs dropped; " + clean_split.protocol
  assert describe(dataset, split)["data/duplicates_dropped"] == 2
  assert describe(clean, clean_split)["data/duplicates_dropped"] == 0
  assert sorted(zip(dataset.users.tolist(), dataset.items.tolist(), dataset.ratings.tolist())) == [
      (0, 0, 3.0), (0, 1, 4.0), (1, 1, 3.0)]  # the earlier rating of each repeated pair


def test_duplicates_error_and_keep(tmp_path):
  path = _ml100k(tmp_path, u_data=U_DATA_REPEATS)
  with pytest.raises(DataError, match=r"u\.data: expected each \(user, item\) pair once .*; got 2 repeated row\(s\), "
                                      r"the first for user 1, item 1$"):
    _load(path, duplicates="error")
  dataset, split = _load(path, duplicates="keep")
  assert dataset.num_interactions == 5 and split.duplicates_dropped == 0
  assert not split.protocol.startswith("0 repeated")
  with pytest.raises(ConfigError, match="config key 'data.duplicates' must be one of keep, drop, error; got 'first'"):
    validate(Config(data=DataConfig(duplicates="first")))


def test_duplicates_across_predefined_files_leave_the_test_file(tmp_path):
  files = {"train.tsv": "u1\ta\nu2\tb\nu1\tb\n", "test.tsv": "u1\tc\nu2\tb\n"}  # (u2, b) is already in train
  path = _write(tmp_path / "split", files, str.encode)
  with pytest.raises(DataError, match=r"test\.tsv: expected each \(user, item\) pair once .*1 repeated row\(s\), "
                                      r"the first for user 'u2', item 'b'"):
    sources.load(DataConfig(source="files", path=path, split="predefined", duplicates="error"))
  dataset, split = sources.load(DataConfig(source="files", path=path, split="predefined"))
  pairs = lambda rows: [(dataset.user_raw_ids[dataset.users[r]], dataset.item_raw_ids[dataset.items[r]]) for r in rows]  # noqa: E731
  assert pairs(split.train) == [("u1", "a"), ("u2", "b"), ("u1", "b")] and pairs(split.test) == [("u1", "c")]


def test_duplicate_reviews_keep_the_earliest_text(tmp_path):
  reviews = [_review("u1", "i1", 5, "later words"), _review("u2", "i1", 2), _review("u1", "i2", 3, "fine"),
             _review("u1", "i1", 0, "first impressions")]
  path = _write(tmp_path / "amazon", {"reviews.json": "\n".join(reviews) + "\n"}, str.encode)
  dataset, split = sources.load(DataConfig(source="amazon", path=path, split_ratios=(1.0, 0.0, 0.0)))
  assert dataset.num_interactions == 3 and split.duplicates_dropped == 1 and len(split.train) == 3
  # The dropped row's review leaves the item text with it; the kept rows' reviews stay aligned.
  assert dataset.item_text[0] == "first impressions. ok." and dataset.item_text[1] == "fine."
