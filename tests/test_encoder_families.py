"""A model directory's own sentence-transformers settings reach training as they reach TextEncoder."""

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import load_config
from jaxrec.text_encoder import TextEncoder, TextTokenizer
from jaxrec.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _cls_pooled_bert(path) -> str:
  from fixtures import tiny_bert
  path = tiny_bert.write(path)
  os.makedirs(os.path.join(path, "1_Pooling"))
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, f)
  return path


@pytest.mark.slow
def test_a_cls_pooled_model_trains_with_cls_pooling_without_an_override(tmp_path):
  path = _cls_pooled_bert(tmp_path / "bge_like")
  trainer = Trainer(load_config(TINY, ["model.use_text=true", "encoder.mode=full", f"encoder.path={path}",
                                       "mesh.num_devices=1", f"workdir={tmp_path / 'run'}", "train.batch_size=16",
                                       "train.learning_rate=0.01", "checkpoint.async_save=false"]))
  assert trainer.cfg.encoder.pooling == "" and trainer.recommender.text.pooling == "cls"
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, trainer.layout.put(trainer.batch_builder().map(0)))
  assert np.isfinite(float(metrics["loss"]))
  model = trainer.recommender.model(state["params"], state["tables"])
  items = np.arange(6, dtype=np.int32)
  texts = [trainer.dataset.item_text[i] for i in items]
  # The trained encoder's item vectors are TextEncoder's with the model's own (CLS) pooling...
  current = TextEncoder(TextTokenizer.from_pretrained(path), model.text_encoder)
  assert current.pooling == "cls"
  got = np.asarray(model.encode_text(jnp.asarray(items)))
  np.testing.assert_allclose(got, current.encode(texts), rtol=0, atol=2e-6)
  # ... which mean pooling (what training used before the model's own pooling reached it) is not.
  mean = TextEncoder(TextTokenizer.from_pretrained(path, pooling="mean"), model.text_encoder)
  assert np.abs(got - mean.encode(texts)).max() > 0.1
