"""model.query=text: the pretrained text encoder reads a user's history titles as one text (frozen across
meshes: the lora/full step differs only by the encoder's gradient, which the train tests cover)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.catalog_text import HistoryText
from jaxrec.config import ConfigError, load_config
from jaxrec.models.two_tower import history_text_rows
from jaxrec.text_encoder import TextEncoder, TextTokenizer
from jaxrec.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
# Words of the tiny BERT's vocabulary, so titles tokenize to known pieces of known lengths.
TITLES = ["the movie", "a great war story", "love", "the old city at night", "dog and cat", "sad",
          "a new hero of the sea and the sky", "red house"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
  from fixtures import tiny_bert
  return tiny_bert.write(tmp_path_factory.mktemp("encoder") / "tiny_bert")


def _rows(history_text_, history, mask, width):
  return {k: np.asarray(v) for k, v in history_text_rows(
      jnp.asarray(history_text_.titles_NxW), jnp.asarray(history_text_.lengths_N), jnp.asarray(history),
      jnp.asarray(mask), separator=history_text_.separator_ids, cls_id=history_text_.cls_id,
      sep_id=history_text_.sep_id, pad_id=history_text_.pad_id, width=width).items()}


@pytest.mark.parametrize("separator", [" ; ", " [SEP] "])
def test_history_rows_are_the_tokenizers_tokens_of_the_joined_titles_newest_kept(tiny_bert_dir, separator):
  tokenizer = TextTokenizer.from_pretrained(tiny_bert_dir, max_length=16)
  ht = HistoryText.of(tokenizer, TITLES, separator)
  assert ht.lengths_N.tolist() == [2, 4, 1, 5, 3, 1, 9, 2]
  # 14 tokens between [CLS] and [SEP]: "sad ; a new hero ... sky" is 1 + 1 + 9, the next older
  # title (2 + 1 more) would make 14 exactly, one more does not fit.
  assert ht.kept([0, 1, 7, 5, 6]) == [7, 5, 6]
  assert ht.kept([1, 3]) == [1, 3] and ht.kept([6, 6]) == [6] and ht.kept([]) == []
  assert ht.text(TITLES, [2, 4]) == f"love{separator}dog and cat"
  rng = np.random.default_rng(0)
  history = rng.integers(0, len(TITLES), (64, 6)).astype(np.int32)
  mask = rng.random((64, 6)) < 0.7
  mask[0] = False  # no history: "[CLS] [SEP]"
  mask[1] = [False] * 4 + [True] * 2  # left padding (recent histories)
  mask[2] = [True] * 2 + [False] * 4  # right padding (sampled histories)
  history[3], mask[3] = [0, 1, 2, 3, 4, 6], True  # the newest title nearly fills the text
  history = np.where(mask, history, -1)
  texts = [ht.text(TITLES, h[m]) for h, m in zip(history, mask)]
  want = tokenizer.tokenize(texts, max_length=16)
  width = ht.width(6)
  assert width == 16
  got = _rows(ht, history, mask, width)
  for name in ("input_ids", "attention_mask", "token_type_ids"):
    padded = np.full((64, width), tokenizer.special_ids[2] if name == "input_ids" else 0, np.int32)
    padded[:, :want[name].shape[1]] = want[name]
    np.testing.assert_array_equal(got[name], padded, err_msg=name)
  # Row 3 keeps "dog and cat ; a new hero ... sky": 3 + 1 + 9 tokens; the older 5-token title would overflow.
  assert ht.kept(history[3]) == [4, 6] and got["attention_mask"][3].sum() == 2 + 3 + 1 + 9
  assert got["attention_mask"][0].sum() == 2
  # The newest title alone longer than the text: cut where the tokenizer cuts it.
  short = HistoryText.of(TextTokenizer.from_pretrained(tiny_bert_dir, max_length=8), TITLES, separator)
  assert short.kept([0, 6]) == [6]
  np.testing.assert_array_equal(_rows(short, np.array([[0, 6]]), np.ones((1, 2), bool), 8)["input_ids"],
                                TextTokenizer.from_pretrained(tiny_bert_dir, max_length=8).tokenize(
                                    [TITLES[6]])["input_ids"])


def test_a_separator_that_merges_with_the_titles_is_refused(tiny_bert_dir):
  tokenizer = TextTokenizer.from_pretrained(tiny_bert_dir)
  with pytest.raises(ValueError, match="model.query_separator"):
    HistoryText.of(tokenizer, ["the movie", "dog", "a war"], "")  # "moviedog" is one unknown word


def test_config_checks_name_their_keys():
  with pytest.raises(ConfigError, match="'model.query'=text needs model.use_text=true"):
    load_config(TINY, ["model.query=text"])  # the tiny config has no text
  with pytest.raises(ConfigError, match="'model.query'=text .* encoder.mode=none"):
    load_config(TINY, ["model.query=text", "model.use_text=true", "encoder.mode=none"])
  with pytest.raises(ConfigError, match="data.history_len"):
    load_config(TINY, ["model.query=text", "model.use_text=true", "encoder.mode=frozen", "data.history_len=0"])
  with pytest.raises(ConfigError, match="model.query"):
    load_config(TINY, ["model.query=texts"])
  assert load_config(TINY, ["model.query=text", "model.use_text=true", "encoder.mode=frozen"]).model.query_separator == " ; "


def _trainer(encoder_dir, tmp_path, mode, *overrides):
  return Trainer(load_config(TINY, ["model.use_text=true", f"encoder.mode={mode}", f"encoder.path={encoder_dir}",
                                    "model.query=text", f"encoder.cache_dir={tmp_path / 'cache'}",
                                    f"workdir={tmp_path / mode}", "train.batch_size=16", "train.warmup_steps=0",
                                    "train.learning_rate=0.01", "checkpoint.async_save=false", *overrides]))


def _check_parity(trainer, state, encoder: TextEncoder):
  """The query tower's text vector of a user is the encoder's vector of the user's history text."""
  rec = trainer.recommender
  users = np.arange(24, dtype=np.int32)
  texts = rec.history_text(users, trainer.train_seqs)
  assert all(texts) and max(t.count(" ; ") for t in texts) == 4  # five titles, the tiny world's L
  history, mask = trainer.train_seqs.query_history(users, trainer.cfg.data.history_len, rec.history_mode, 0)
  model = rec.model(state["params"], state["tables"])
  got = np.asarray(model.history_text_vectors(jnp.asarray(history), jnp.asarray(mask)))
  want = encoder.encode(texts)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  # ... and what the query vectors of evaluation and export are built from.
  queries = np.asarray(rec.query_vectors(state["params"], state["tables"], users, trainer.train_seqs))
  fused = np.asarray(model.query_tower.from_text(jnp.asarray(users), jnp.asarray(want), jnp.asarray(history),
                                                 jnp.asarray(mask)))
  np.testing.assert_allclose(queries, fused, rtol=0, atol=1e-5)


def _fit(trainer, state, steps=6):
  batch = trainer.layout.put(trainer.batch_builder().map(0))
  losses = []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.3, losses
  return state


@pytest.mark.slow
def test_frozen_text_query_is_the_pretrained_encoders_vector_of_the_history_text_and_trains(tmp_path, tiny_bert_dir):
  trainer = _trainer(tiny_bert_dir, tmp_path, "frozen", "mesh.num_devices=1", "train.steps=4")
  layout = trainer.layout
  # The history goes through the encoder as titles: only the positives meet the item tower.
  assert layout.unique_capacity == 16 and "history_slot" not in layout.fields()
  assert trainer.recommender.history_mode == "recent"
  state = trainer.init_state()
  assert "text_encoder" not in state["params"] and "text_encoder" in state["tables"]
  encoder = TextEncoder.from_pretrained(tiny_bert_dir)
  _check_parity(trainer, state, encoder)
  state = _fit(trainer, state)
  _check_parity(trainer, state, encoder)  # the encoder stayed as it was pretrained
  result = trainer.run()  # evaluation and the index run the query tower over every user
  assert 0.0 <= result["recall@10"] <= 1.0 and len(result["train/losses"]) == 4
  # A restore reads the frozen encoder back from the checkpoint (no pretrained weights needed).
  import jaxrec
  restored = jaxrec.evaluate(trainer.cfg)
  assert restored["step"] == 4 and restored["recall@10"] == pytest.approx(result["recall@10"], abs=1e-6)


@pytest.mark.slow
def test_fine_tuned_text_query_shares_the_item_towers_encoder(tmp_path, tiny_bert_dir):
  trainer = _trainer(tiny_bert_dir, tmp_path, "full", "mesh.num_devices=1")
  state = trainer.init_state()
  assert "text_encoder" in state["params"]
  _check_parity(trainer, state, TextEncoder.from_pretrained(tiny_bert_dir))  # fresh: the pretrained weights
  state = _fit(trainer, state)
  # Trained: the query reads the history through the item tower's encoder with its current weights.
  model = trainer.recommender.model(state["params"], state["tables"])
  tokenizer = TextTokenizer.from_pretrained(tiny_bert_dir)
  current = TextEncoder(tokenizer, model.text_encoder)
  pretrained = TextEncoder.from_pretrained(tiny_bert_dir)
  texts = trainer.recommender.history_text(np.arange(4), trainer.train_seqs)
  assert np.abs(current.encode(texts) - pretrained.encode(texts)).max() > 1e-3  # the encoder did train
  _check_parity(trainer, state, current)
  # The item tower's text is that same encoder's.
  items = np.arange(5, dtype=np.int32)
  np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(items))),
                             current.encode([trainer.dataset.item_text[i] for i in items]), rtol=0, atol=2e-6)


@pytest.mark.slow
def test_text_query_losses_agree_across_meshes(tmp_path, tiny_bert_dir):
  def losses(*mesh):
    trainer = _trainer(tiny_bert_dir, tmp_path, "frozen", *mesh)
    state, builder, out = trainer.init_state(), trainer.batch_builder(), []
    for i in range(4):
      state, metrics = trainer.train_step(state, trainer.layout.put(builder.map(i)))
      out.append(float(metrics["loss"]))
    return np.array(out)

  reference = losses("mesh.num_devices=1")
  np.testing.assert_allclose(losses("mesh.data=4", "mesh.fsdp=2"), reference, rtol=1e-5)
