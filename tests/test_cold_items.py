"""What each item tower can do for items that never appeared in training."""

from pathlib import Path

import jax
import numpy as np

from jaxrec.config import load_config
from jaxrec.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _cold_vectors(*overrides):
  trainer = Trainer(load_config(TINY, ["mesh.num_devices=1", "train.steps=4", *overrides]))
  state = trainer.init_state()
  cold = trainer.split.cold_items
  assert cold.sum() >= 2 and not trainer.item_trained[cold].any()
  return np.asarray(trainer.item_vectors(state))[cold]


def test_pure_id_tower_gives_every_cold_item_the_same_vector():
  # One shared id row and nothing else: the model cannot rank cold items (its cold recall is chance).
  vectors = _cold_vectors("model.use_item_features=false")
  np.testing.assert_array_equal(vectors, np.broadcast_to(vectors[0], vectors.shape))


def test_item_features_tell_cold_items_apart():
  vectors = _cold_vectors()
  assert len(np.unique(vectors.round(6), axis=0)) > 1
