"""data.source=union: several datasets as one catalog, users kept apart, each part split alone."""

import dataclasses
import os

import numpy as np
import pytest

import jaxrec
from fixtures.data_roots import fixture_path
from jaxrec.config import ConfigError, DataConfig, apply_overrides, load_config, validate
from jaxrec.data import sources, union

ML100K = fixture_path("ml-100k")
ML1M = fixture_path("ml-1m")
AMAZON = fixture_path("amazon-5core")
TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def _cfg(*parts, **kwargs):
  return DataConfig(source="union", union=parts, split="random", cold_item_fraction=0.1, **kwargs)


def test_the_union_is_its_parts_side_by_side_each_split_as_alone():
  cfg = _cfg(f"ml1m:title+genres={ML1M}", f"amazon:summaries={AMAZON}")
  data, split = sources.load(cfg)
  alone = [sources.load(dataclasses.replace(cfg, source="ml1m", item_text="title+genres", path=ML1M, union=())),
           sources.load(dataclasses.replace(cfg, source="amazon", item_text="summaries", path=AMAZON, union=()))]
  assert data.name == "ml1m+amazon"
  assert data.num_items == sum(d.num_items for d, _ in alone)
  assert data.num_users == sum(d.num_users for d, _ in alone)
  rows = item_rows = user_rows = 0
  for name, (part, part_split) in zip(("ml1m", "amazon"), alone):
    items = slice(item_rows, item_rows + part.num_items)
    # The same items, texts and users, under ids that say which part they come from.
    assert list(data.item_raw_ids[items]) == [f"{name}:{r}" for r in part.item_raw_ids.tolist()]
    assert data.item_text[items] == tuple(part.item_text)
    assert list(data.user_raw_ids[user_rows:user_rows + part.num_users]) == [f"{name}:{r}" for r in part.user_raw_ids.tolist()]
    np.testing.assert_array_equal(split.cold_items[items], part_split.cold_items)
    for which in ("train", "valid", "test"):
      mine = getattr(split, which)
      mine = mine[(mine >= rows) & (mine < rows + part.num_interactions)] - rows
      np.testing.assert_array_equal(mine, getattr(part_split, which))
      np.testing.assert_array_equal(data.items[getattr(part_split, which) + rows] - item_rows,
                                    part.items[getattr(part_split, which)])
      np.testing.assert_array_equal(data.users[getattr(part_split, which) + rows] - user_rows,
                                    part.users[getattr(part_split, which)])
    rows += part.num_interactions
    item_rows += part.num_items
    user_rows += part.num_users
  assert rows == data.num_interactions and len(split.train) + len(split.valid) + len(split.test) == rows
  # Amazon has no genres: no item feature means the same thing in both parts.
  assert data.item_features == {} and data.user_features == {}
  assert "ml1m: " in split.protocol and "amazon: " in split.protocol


def test_features_on_a_shared_vocabulary_carry_the_rest_are_dropped():
  data, _ = sources.load(_cfg(f"ml100k={ML100K}", f"ml1m={ML1M}"))
  ml100k, _ = sources.load(DataConfig(source="ml100k", path=ML100K))
  ml1m, _ = sources.load(DataConfig(source="ml1m", path=ML1M))
  assert sorted(data.item_features) == ["decade", "genre"]
  assert sorted(data.user_features) == ["age", "gender"]  # occupations are coded differently in the two
  width = data.item_features["genre"].shape[1]
  for part, rows in ((ml100k, slice(0, ml100k.num_items)), (ml1m, slice(ml100k.num_items, None))):
    genre = part.item_features["genre"]
    np.testing.assert_array_equal(data.item_features["genre"][rows, :genre.shape[1]], genre)
    assert not data.item_features["genre"][rows, genre.shape[1]:width].any()  # padding
  assert data.feature_vocabularies["genre"] == ml1m.feature_vocabularies["genre"]


@pytest.mark.parametrize("overrides, message", [
    (["data.source=union", "data.union=ml1m"], r"'data.union' lists two or more parts .* data.union=\['ml1m'\]"),
    (["data.union=ml1m,amazon"], r"exactly when data.source=union; got data.source='synthetic'"),
])
def test_a_union_config_that_cannot_be_read_is_refused_naming_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate(apply_overrides(load_config(TINY), overrides))


def test_a_part_named_twice_or_malformed_is_refused():
  with pytest.raises(ValueError, match=r"data.union names a source more than once \(ml1m, ml1m\)"):
    sources.load(_cfg(f"ml1m={ML1M}", f"ml1m={ML1M}"))
  with pytest.raises(ValueError, match=r"data.union: part ':title' should be source\[:item_text\]\[=path\]"):
    union.parse_part(":title")
  assert union.parse_part("amazon:summaries+reviews=/d/a") == union.Part("amazon", "summaries+reviews", "/d/a")
  assert union.parse_part("ml1m") == union.Part("ml1m", "default", "")


def test_a_model_trained_on_a_union_scores_one_of_its_parts_zero_shot(tmp_path):
  from fixtures import tiny_bert
  encoder = tiny_bert.write(tmp_path / "tiny_bert")
  common = ["model.use_text=true", "encoder.mode=frozen", "model.use_user_ids=false", "model.use_item_ids=false",
            "model.use_user_features=false", "model.use_item_features=false", "mesh.num_devices=1", "checkpoint.async_save=false", "train.steps=6",
            f"encoder.path={encoder}", f"encoder.cache_dir={tmp_path / 'cache'}"]
  workdir = tmp_path / "union"
  cfg = load_config(TINY, [*common, "data.source=union", f"data.union=ml1m={ML1M},amazon:summaries={AMAZON}",
                           "data.cold_item_fraction=0", f"workdir={workdir}"])
  jaxrec.train(cfg)
  from jaxrec import transfer
  target = validate(apply_overrides(transfer.saved_config(str(workdir)),
                                    ["data.source=ml100k", "data.union=", f"data.path={ML100K}"]))
  result = jaxrec.evaluate(target)
  assert result["transfer"]["dataset"] == "ml100k" and result["step"] == 6
  assert isinstance(result["transfer"]["items_in_source"], int)  # titles looked up in the whole union
  for key in ("recall@10", "popularity/recall@10"):
    assert 0.0 <= result[key] <= 1.0
