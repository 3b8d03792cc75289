"""A trained model on other data: zero-shot on another synthetic world, and checkpoint.init_from."""

import json
import os

import numpy as np
import pytest
from flax import traverse_util

import jaxrec
from jaxrec import cli, transfer
from jaxrec.config import load_config
from jaxrec.trainer import Trainer

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
# A text-aware model with nothing tied to one dataset's users or categories: it can move.
TRANSFERABLE = ["model.use_text=true", "encoder.mode=frozen", "model.use_user_ids=false",
                "mesh.num_devices=1", "checkpoint.async_save=false", "train.steps=12"]
# The second world: another catalog (more items, other texts and topics) and other users.
OTHER_WORLD = ["data.synthetic.seed=7", "data.synthetic.num_items=110", "data.synthetic.num_users=90"]


def flat(tree):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  from fixtures import tiny_bert
  return tiny_bert.write(tmp_path_factory.mktemp("encoder") / "tiny_bert")


@pytest.fixture(scope="module")
def source(tmp_path_factory, encoder_dir):
  """A transferable model trained on the first world: (workdir, its params)."""
  workdir = tmp_path_factory.mktemp("source")
  cfg = load_config(TINY, [*TRANSFERABLE, f"encoder.path={encoder_dir}", f"encoder.cache_dir={workdir / 'cache'}",
                           f"workdir={workdir}"])
  jaxrec.train(cfg)
  trainer = Trainer(cfg)
  _, state = trainer.restore()
  return workdir, cfg, flat(state["params"])


def target_config(source_workdir, *overrides):
  """The source's saved config with data overrides, as ``jaxrec evaluate --workdir W data.*=...`` builds it."""
  saved = transfer.saved_config(str(source_workdir))
  from jaxrec.config import apply_overrides, validate
  return validate(apply_overrides(saved, list(overrides)))


def test_the_workdir_records_what_its_rows_mean(source):
  workdir, _, _ = source
  inputs = json.loads((workdir / "inputs.json").read_text())
  assert inputs["dataset"] == "synthetic"
  # The synthetic world's formats come from one fixed list; its categories are its own topics.
  assert inputs["item_features"]["format"] == "synthetic-formats"
  assert inputs["item_features"]["category"].startswith("category@")


def test_parameters_that_cannot_move_are_refused_naming_the_keys(source):
  workdir, _, _ = source
  cfg = target_config(workdir, *OTHER_WORLD, "model.use_item_features=false")
  # The source trained with item features; asking without them changes the item tower's MLP.
  with pytest.raises(transfer.TransferError, match="do not carry over"):
    transfer.evaluate(cfg)
  cfg = target_config(workdir, *OTHER_WORLD)
  # The source's category vocabulary is its world's own topics: refused, naming the key.
  with pytest.raises(transfer.TransferError, match="model.use_item_features=false"):
    transfer.evaluate(cfg)


@pytest.fixture(scope="module")
def transferable_source(tmp_path_factory, encoder_dir):
  """The same, without the world's own categorical features."""
  workdir = tmp_path_factory.mktemp("source_nofeat")
  cfg = load_config(TINY, [*TRANSFERABLE, "model.use_item_features=false", f"encoder.path={encoder_dir}",
                           f"encoder.cache_dir={workdir / 'cache'}", f"workdir={workdir}"])
  jaxrec.train(cfg)
  _, state = Trainer(cfg).restore()
  return workdir, cfg, flat(state["params"])


def test_a_model_evaluates_zero_shot_on_a_world_with_another_catalog(transferable_source):
  workdir, _, source_params = transferable_source
  cfg = target_config(workdir, *OTHER_WORLD)
  rec, plan, params, tables = transfer.zero_shot(cfg)
  assert rec.dataset.num_items == 110 and rec.dataset.num_users == 90
  assert plan.new == {} and plan.cold_rows == ("item_tower/ids/embedding",)
  got = flat(params)
  assert set(got) == set(source_params)
  for name, value in got.items():
    if name == "item_tower/ids/embedding":  # every row of the new catalog is the source's shared cold row
      assert value.shape[0] >= 111 and np.array_equal(value, np.broadcast_to(source_params[name][0], value.shape))
    else:
      assert np.array_equal(value, source_params[name]), name
  result = jaxrec.evaluate(cfg)  # the public API takes the same path when the data differ
  assert result["transfer"]["dataset"] == "synthetic" and result["step"] == 12
  for key in ("recall@10", "ndcg@10", "popularity/recall@10"):
    assert 0.0 <= result[key] <= 1.0
  # Held-out items split by whether the source catalog has their title: the two groups' users
  # add up to at least the overall count (a user may hold items of both).
  overlap = transfer.source_overlap(cfg, rec.dataset)
  assert result["transfer"]["items_in_source"] == int(overlap.sum())
  assert result.get("in_source/users", 0) + result.get("new_to_source/users", 0) >= result["users"]
  # The query of a user comes from their history in the new world: the scores are the towers'.
  vectors = np.asarray(rec.item_vectors(params, tables))
  assert vectors.shape == (110, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_the_command_line_evaluates_and_recommends_on_another_world(transferable_source, capsys):
  workdir, _, _ = transferable_source
  assert cli.main(["evaluate", "--workdir", str(workdir), *OTHER_WORLD]) == 0
  out = capsys.readouterr().out
  assert "zero-shot on synthetic" in out
  written = [p for p in os.listdir(workdir) if p.startswith("eval_step12_on_")]
  assert written == ["eval_step12_on_synthetic_random.json"]
  assert cli.main(["recommend", "--workdir", str(workdir), "--user", "3", "--k", "5", *OTHER_WORLD]) == 0
  out = capsys.readouterr().out
  assert "top 5 recommendations" in out


def test_a_model_with_user_ids_is_refused_before_any_data_loads(source, capsys):
  workdir, _, _ = source
  assert cli.main(["evaluate", "--workdir", str(workdir), *OTHER_WORLD, "model.use_user_ids=true"]) == 2
  err = capsys.readouterr().err
  assert "model.use_user_ids=false" in err and len(err.strip().splitlines()) == 1


def test_init_from_loads_the_shared_parameters_bit_exactly_and_reports_the_new(transferable_source, tmp_path,
                                                                              encoder_dir, caplog):
  workdir, _, source_params = transferable_source
  cfg = load_config(TINY, [*TRANSFERABLE, "model.use_item_features=false", *OTHER_WORLD,
                           f"encoder.path={encoder_dir}", f"encoder.cache_dir={tmp_path / 'cache'}",
                           f"workdir={tmp_path / 'target'}", f"checkpoint.init_from={workdir}"])
  trainer = Trainer(cfg)
  plan = trainer.init_plan
  assert plan.new == {"item_tower/ids/embedding": "another catalog or split"}
  assert plan.dropped == () and len(plan.loaded) == len(source_params) - 1
  start = flat(trainer.init_state()["params"])
  for name in plan.loaded:
    assert np.array_equal(start[name], source_params[name]), name
  assert not np.array_equal(start["item_tower/ids/embedding"][:2], source_params["item_tower/ids/embedding"][:2])
  with caplog.at_level("INFO", logger="jaxrec"):
    trainer.run()
  assert any("parameters loaded from" in r.getMessage() and "1 new" in r.getMessage() for r in caplog.records)
  assert any("new      item_tower/ids/embedding" in r.getMessage() for r in caplog.records)


def test_init_trainable_new_trains_only_what_was_not_loaded(transferable_source, tmp_path, encoder_dir):
  workdir, _, source_params = transferable_source
  cfg = load_config(TINY, [*TRANSFERABLE, "model.use_item_features=false", *OTHER_WORLD,
                           f"encoder.path={encoder_dir}", f"encoder.cache_dir={tmp_path / 'cache'}",
                           f"workdir={tmp_path / 'target'}", f"checkpoint.init_from={workdir}",
                           "checkpoint.init_trainable=new", "train.steps=6"])
  trainer = Trainer(cfg)
  start = flat(trainer.init_state()["params"])
  trainer.run()
  _, state = trainer.restore()
  end = flat(state["params"])
  for name in trainer.init_plan.loaded:
    assert np.array_equal(end[name], source_params[name]), name
  assert not np.array_equal(end["item_tower/ids/embedding"], start["item_tower/ids/embedding"])


def test_init_from_the_same_data_loads_the_id_tables_too(transferable_source, tmp_path, encoder_dir):
  workdir, _, source_params = transferable_source
  cfg = load_config(TINY, [*TRANSFERABLE, "model.use_item_features=false", f"encoder.path={encoder_dir}",
                           f"encoder.cache_dir={tmp_path / 'cache'}", f"workdir={tmp_path / 'again'}",
                           f"checkpoint.init_from={workdir / 'checkpoints'}"])
  trainer = Trainer(cfg)
  assert trainer.init_plan.new == {} and "item_tower/ids/embedding" in trainer.init_plan.loaded
  start = flat(trainer.init_state()["params"])
  assert set(start) == set(source_params)
  assert all(np.array_equal(start[name], source_params[name]) for name in source_params)


def test_the_popularity_prior_ranks_by_cosine_over_temperature_plus_beta_log_count(transferable_source):
  """eval.popularity_prior against a direct numpy ranking of every evaluated user."""
  import dataclasses

  from jaxrec.data.pipeline import Sequences
  workdir, _, _ = transferable_source
  cfg = target_config(workdir, *OTHER_WORLD, "eval.popularity_prior=1.5")
  rec, _, params, tables = transfer.zero_shot(cfg)
  result = rec.evaluate(params, tables)
  ds, sp = rec.dataset, rec.split
  counts = np.bincount(ds.items[sp.train], minlength=ds.num_items)
  known = Sequences.from_interactions(ds, np.concatenate([sp.train, sp.valid]))
  users = np.unique(ds.users[sp.test])
  q = np.asarray(rec.query_vectors(params, tables, users, known), np.float64)
  v = np.asarray(rec.item_vectors(params, tables), np.float64)
  scores = q @ v.T / cfg.model.temperature + 1.5 * np.log1p(counts)[None, :]
  recalls = []
  for row, user in enumerate(users):
    seen = known.items[known.start[user]:known.start[user + 1]]
    s = scores[row].copy()
    s[seen] = -np.inf
    top = np.argsort(-s, kind="stable")[:10]
    truth = set(ds.items[sp.test][ds.users[sp.test] == user])
    recalls.append(len(truth & set(top)) / len(truth))
  assert result["recall@10"] == pytest.approx(np.mean(recalls), abs=1e-9)
  without = dataclasses.replace(rec.cfg, eval=dataclasses.replace(rec.cfg.eval, popularity_prior=0.0))
  rec.cfg = without
  assert rec.evaluate(params, tables)["recall@10"] != result["recall@10"]


def test_another_spelling_of_the_training_data_is_not_another_dataset(tmp_path):
  from jaxrec.config import load_config as load
  (tmp_path / "data").mkdir()
  saved = load(TINY, [f"data.path={tmp_path / 'data'}"])
  assert not transfer.changes_data(saved, load(TINY, [f"data.path={tmp_path / 'data' / '..' / 'data'}"]))
  assert transfer.changes_data(saved, load(TINY, [f"data.path={tmp_path}"]))
  assert transfer.changes_data(saved, load(TINY, [f"data.path={tmp_path / 'data'}", "data.split=loo"]))
