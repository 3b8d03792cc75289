"""What each item tower can do for items that never appeared in training."""

from pathlib import Path

import numpy as np
import pytest

from jaxrec.config import ConfigError, load_config
from jaxrec.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _cold_vectors(*overrides):
  trainer = Trainer(load_config(TINY, ["mesh.num_devices=1", "train.steps=4", *overrides]))
  state = trainer.init_state()
  cold = trainer.split.cold_items
  assert cold.sum() >= 2 and not trainer.recommender.item_trained[cold].any()
  return np.asarray(trainer.recommender.item_vectors(state["params"], state["tables"]))[cold]


def test_pure_id_tower_gives_every_cold_item_the_same_vector():
  # One shared id row and nothing else: the model cannot rank cold items (its cold recall is chance).
  vectors = _cold_vectors("model.use_item_features=false")
  np.testing.assert_array_equal(vectors, np.broadcast_to(vectors[0], vectors.shape))


@pytest.mark.slow
def test_own_cold_item_rows_give_every_item_its_own_untrained_id_row():
  # model.cold_item_rows=own: the full-vocabulary id table of TFRS's and TorchRec's examples. Each
  # cold item keeps its own random row, which no step trains.
  # (no weight decay here: AdamW's decoupled decay would shrink the untrained rows too)
  trainer = Trainer(load_config(TINY, ["mesh.num_devices=1", "model.use_item_features=false",
                                       "model.cold_item_rows=own", "train.weight_decay=0"]))
  cold, num_items = trainer.split.cold_items, trainer.dataset.num_items
  state = trainer.init_state()
  id_row = np.asarray(state["tables"]["item_tower"]["id_row"])
  np.testing.assert_array_equal(id_row, np.arange(1, num_items + 1))  # row 0 stays the shared cold row
  shared = Trainer(load_config(TINY, ["mesh.num_devices=1", "model.use_item_features=false"]))
  assert (np.asarray(shared.init_state()["tables"]["item_tower"]["id_row"])[cold] == 0).all()
  vectors = _cold_vectors("model.use_item_features=false", "model.cold_item_rows=own")
  assert len(np.unique(vectors.round(6), axis=0)) == len(vectors)
  table = lambda s: np.asarray(s["params"]["item_tower"]["ids"]["embedding"])  # noqa: E731
  before = table(state)
  builder = trainer.batch_builder()
  for b in range(3):
    state, _ = trainer.train_step(state, trainer.layout.put(builder.map(b)))
  after = table(state)
  np.testing.assert_array_equal(after[id_row[cold]], before[id_row[cold]])  # cold rows never move...
  trained_rows = id_row[trainer.recommender.item_trained]
  assert not np.array_equal(after[trained_rows], before[trained_rows])  # ...trained ones do
  with pytest.raises(ConfigError, match="model.cold_item_rows"):
    load_config(TINY, ["model.cold_item_rows=random"])


def test_item_features_tell_cold_items_apart():
  vectors = _cold_vectors()
  assert len(np.unique(vectors.round(6), axis=0)) > 1
