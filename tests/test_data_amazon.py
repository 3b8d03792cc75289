"""Amazon 5-core reviews: the synthetic JSON-lines file in tests/fixtures (plain and gzipped) on
every run, the real Musical Instruments file's counts when JAXREC_DATA points at it, and item
text that only ever comes from training reviews."""

import gzip
import json

import numpy as np
import pytest

from fixtures.data_roots import fixture_path, full_data_path
from jaxrec.config import DataConfig
from jaxrec.data import amazon, sources


@pytest.fixture(scope="module")
def loaded():
  return amazon.load(fixture_path("amazon-5core"))


def test_counts(loaded):
  dataset, reviews = loaded
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (221, 30, 20)
  values, counts = np.unique(dataset.ratings, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {1.0: 21, 2.0: 13, 3.0: 27, 4.0: 44, 5.0: 116}
  assert np.bincount(dataset.users).min() == 5 and np.bincount(dataset.items).min() == 6
  assert sum(1 for t in reviews.texts if not t) == 3
  # An all-digit asin stays a string id, as it is in the file.
  assert dataset.item_raw_ids.dtype.kind == "U" and dataset.item_raw_ids[dataset.items[0]] == "0739045873"
  assert dataset.user_raw_ids[dataset.users[0]] == "A0QQLDMKQ6SMAU"
  assert dataset.has_time and dataset.timestamps[0] == 1_350_604_800
  assert (dataset.timestamps.min(), dataset.timestamps.max()) == (1_263_686_400, 1_403_740_800)
  assert reviews.helpful.sum() == 272 and reviews.helpful.max() == 12


def test_one_review_parsed(loaded):
  dataset, reviews = loaded
  # Line 8 escapes its non-ASCII letters and quotes as \u00e9 and \", as the published file does.
  assert (dataset.user_raw_ids[dataset.users[7]], dataset.item_raw_ids[dataset.items[7]]) == ("A22R6T6EOCUK05", "B001SP6JLQ")
  assert reviews.texts[7] == 'Café-quality tone from a "budget" pick. Ünexpected!'
  assert (reviews.summaries[7], reviews.helpful[7], dataset.ratings[7], dataset.timestamps[7]) == (
      "Stopped working?", 0, 5.0, 1_301_616_000)


def test_gzipped_copy_reads_the_same(loaded):
  dataset, reviews = loaded
  zipped, zipped_reviews = amazon.load(fixture_path("amazon-5core-gz"))
  for key in ("users", "items", "timestamps", "ratings", "item_raw_ids", "user_raw_ids"):
    np.testing.assert_array_equal(getattr(zipped, key), getattr(dataset, key))
  assert zipped_reviews.texts == reviews.texts and zipped_reviews.summaries == reviews.summaries


def test_already_5core_and_min_rating():
  path = fixture_path("amazon-5core")
  dataset, _ = sources.load(DataConfig(source="amazon", path=path, kcore=5))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (221, 30, 20)
  dataset, _ = sources.load(DataConfig(source="amazon", path=path, kcore=6))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (191, 25, 19)
  dataset, _ = sources.load(DataConfig(source="amazon", path=path, min_rating=4))
  assert dataset.num_interactions == 44 + 116


def _assert_no_held_out_review_in_item_text(path: str, min_held_out: int) -> None:
  dataset, reviews = amazon.load(path)
  data, split = sources.load(DataConfig(source="amazon", path=path, item_text="reviews"))
  train_text = {reviews.texts[r] for r in split.train}
  held_out = [r for r in np.concatenate([split.valid, split.test])
              if len(reviews.texts[r]) > 40 and reviews.texts[r] not in train_text]
  assert len(held_out) >= min_held_out
  # Reviews of an item are concatenated most-helpful-first and cut at MAX_TEXT_CHARS: check a
  # held-out review's opening words never appear in its item's text.
  leaks = [r for r in held_out if reviews.texts[r][:40] in data.item_text[dataset.items[r]]]
  assert leaks == []
  assert max(len(t) for t in data.item_text) <= amazon.MAX_TEXT_CHARS


def test_item_text_has_no_held_out_review():
  _assert_no_held_out_review_in_item_text(fixture_path("amazon-5core"), 57)


def test_item_text_is_cut_at_max_chars():
  data, split = sources.load(DataConfig(source="amazon", path=fixture_path("amazon-5core")))
  assert (len(split.train), len(split.valid), len(split.test)) == (161, 30, 30)
  # The fixture's first item has long reviews: its text is cut exactly at the limit; summaries come first.
  assert len(data.item_text[0]) == amazon.MAX_TEXT_CHARS
  assert data.item_text[0].startswith("Great value. Five stars. Good enough. Not bad. This clip mic ")
  assert sorted(len(t) for t in data.item_text)[-2] < amazon.MAX_TEXT_CHARS


def _record(user, item, t, summary, text, helpful=0):
  return {"reviewerID": user, "asin": item, "overall": 5.0, "unixReviewTime": t, "summary": summary,
          "reviewText": text, "helpful": [helpful, helpful]}


def test_text_from_training_rows_only(tmp_path):
  rows = [_record(f"u{u}", f"i{i}", 1000 + 10 * u + i, f"s{u}x{i}", f"t{u}x{i}") for u in range(6) for i in range(4)]
  with gzip.open(tmp_path / "reviews_Toy_5.json.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  dataset, split = sources.load(DataConfig(source="amazon", path=str(tmp_path), split="loo"))
  assert dataset.num_interactions == 24 and len(split.test) == 6
  for part, expect_in_text in ((split.train, True), (split.valid, False), (split.test, False)):
    for r in part:
      u, i = dataset.users[r], dataset.items[r]
      marker = f"s{dataset.user_raw_ids[u][1:]}x{dataset.item_raw_ids[i][1:]}."
      assert (marker in dataset.item_text[i]) == expect_in_text, (marker, dataset.item_text[i])
  # Leave-one-out by time puts every user's i3 in test and i2 in valid: neither item has a
  # training review, so neither has text.
  for held_out in ("i2", "i3"):
    assert dataset.item_text[int(np.flatnonzero(dataset.item_raw_ids == held_out)[0])] == amazon.NO_REVIEWS
  assert dataset.item_text[int(np.flatnonzero(dataset.item_raw_ids == "i0")[0])].startswith("s0x0. s1x0.")


def test_most_helpful_first(tmp_path):
  rows = [_record("a", "x", 1, "meh", "fine"), _record("b", "x", 2, "Great tuner!", "Holds pitch.", helpful=9)]
  (tmp_path / "r.json").write_text("\n".join(json.dumps(r) for r in rows))
  dataset, reviews = amazon.load(str(tmp_path / "r.json"))
  text = amazon.with_training_text(dataset, reviews, np.array([0, 1]), "summaries+reviews").item_text[0]
  assert text == "Great tuner. meh. Holds pitch. fine"
  assert amazon.with_training_text(dataset, reviews, np.array([0]), "summaries").item_text[0] == "meh."


def test_bad_text_field():
  with pytest.raises(ValueError, match="unknown field.*title.*summaries, reviews"):
    sources.load(DataConfig(source="amazon", path=fixture_path("amazon-5core"), item_text="title"))


# The real Musical Instruments 5-core file (JAXREC_DATA): the published counts.

def test_full_counts():
  path = full_data_path("amazon-musical-instruments-5core")
  dataset, reviews = amazon.load(path)
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (10_261, 1_429, 900)
  values, counts = np.unique(dataset.ratings, return_counts=True)
  assert dict(zip(values.tolist(), counts.tolist())) == {1.0: 217, 2.0: 250, 3.0: 772, 4.0: 2_084, 5.0: 6_938}
  assert np.bincount(dataset.users).min() == 5 and np.bincount(dataset.items).min() == 5
  assert sum(1 for t in reviews.texts if not t) == 7
  assert dataset.item_raw_ids[dataset.items[0]] == "1384719342"
  assert dataset.user_raw_ids[dataset.users[0]] == "A2IBPI20UZIR0U"
  assert dataset.has_time and dataset.timestamps[0] == 1393545600


def test_full_already_5core_and_min_rating():
  path = full_data_path("amazon-musical-instruments-5core")
  dataset, _ = sources.load(DataConfig(source="amazon", path=path, kcore=5))
  assert (dataset.num_interactions, dataset.num_users, dataset.num_items) == (10_261, 1_429, 900)
  dataset, _ = sources.load(DataConfig(source="amazon", path=path, min_rating=4))
  assert dataset.num_interactions == 6_938 + 2_084


def test_full_item_text_has_no_held_out_review():
  _assert_no_held_out_review_in_item_text(full_data_path("amazon-musical-instruments-5core"), 2_000)
