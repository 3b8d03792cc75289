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


# Words of the tiny BERT's vocabulary ("query" and "passage" are not: they tokenize to [UNK]).
TITLES = ["the movie", "a great war story", "love", "the old city at night", "dog and cat", "sad",
          "a new hero of the sea and the sky", "red house"]


def _prompted_bert(path, prompts: dict) -> str:
  from fixtures import tiny_bert
  path = tiny_bert.write(path)
  with open(os.path.join(path, "config_sentence_transformers.json"), "w") as f:
    json.dump({"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}, f)
  return path


def test_prefixes_default_to_the_models_own_prompts_and_an_explicit_one_wins(tmp_path):
  from fixtures import tiny_bert
  e5 = _prompted_bert(tmp_path / "e5", {"query": "query: ", "passage": "passage: "})
  tok = TextTokenizer.from_pretrained(e5)
  assert (tok.item_prefix, tok.query_prefix) == ("passage: ", "query: ")
  bge = _prompted_bert(tmp_path / "bge", {"query": "the sky of the movie ", "document": ""})
  assert (TextEncoder.from_pretrained(bge).item_prefix, TextEncoder.from_pretrained(bge).query_prefix) == (
      "", "the sky of the movie ")
  explicit = TextTokenizer.from_pretrained(e5, item_prefix="", query_prefix="a ")
  assert (explicit.item_prefix, explicit.query_prefix) == ("", "a ")
  plain = TextTokenizer.from_pretrained(tiny_bert.write(tmp_path / "plain"))
  assert (plain.item_prefix, plain.query_prefix) == ("", "")


def test_the_item_prefix_reaches_frozen_vectors_and_live_tokens(tmp_path):
  from jaxrec.catalog_text import catalog_text
  from jaxrec.data.sources import load
  path = _prompted_bert(tmp_path / "e5", {"query": "query: ", "document": "the movie : "})
  base = ["model.use_text=true", f"encoder.path={path}", f"encoder.cache_dir={tmp_path / 'cache'}"]
  cfg = load_config(TINY, base + ["encoder.mode=frozen"])
  dataset, _ = load(cfg.data)
  texts = list(dataset.item_text)
  encoder = TextEncoder.from_pretrained(path)
  frozen = catalog_text(cfg, dataset)
  np.testing.assert_allclose(frozen.vectors, encoder.encode(["the movie : " + t for t in texts]), rtol=0, atol=1e-6)
  assert np.abs(frozen.vectors - encoder.encode(texts)).max() > 1e-2
  live = catalog_text(load_config(TINY, base + ["encoder.mode=lora"]), dataset)
  np.testing.assert_array_equal(live.tokens["input_ids"], encoder.tokenize(["the movie : " + t for t in texts])["input_ids"])
  unprefixed = catalog_text(load_config(TINY, base + ["encoder.mode=lora", "encoder.item_prefix="]), dataset)
  np.testing.assert_array_equal(unprefixed.tokens["input_ids"], encoder.tokenize(texts)["input_ids"])


def test_history_rows_carry_the_query_prefix_after_cls(tmp_path):
  from jaxrec.catalog_text import HistoryText
  from jaxrec.models.two_tower import history_text_rows
  path = _prompted_bert(tmp_path / "q", {"query": "the sky : "})
  tokenizer = TextTokenizer.from_pretrained(path, max_length=16)
  ht = HistoryText.of(tokenizer, TITLES, " ; ", prefix=tokenizer.query_prefix)
  assert ht.prefix_ids == tuple(tokenizer.pieces(["the sky : "])[0]) and len(ht.prefix_ids) == 3
  # 11 tokens after [CLS] and the prefix's 3 (16 - 2 - 3): "sad ; a new hero ... sky" is 1 + 1 + 9.
  assert ht.kept([0, 1, 7, 5, 6]) == [5, 6]
  assert ht.text(TITLES, [2, 4]) == "the sky : love ; dog and cat"
  rng = np.random.default_rng(0)
  history = rng.integers(0, len(TITLES), (32, 6)).astype(np.int32)
  mask = rng.random((32, 6)) < 0.7
  mask[0] = False  # no history: "[CLS] the sky : [SEP]"
  history = np.where(mask, history, -1)
  width = ht.width(6)
  assert width == 16
  got = {k: np.asarray(v) for k, v in history_text_rows(
      jnp.asarray(ht.titles_NxW), jnp.asarray(ht.lengths_N), jnp.asarray(history), jnp.asarray(mask),
      separator=ht.separator_ids, cls_id=ht.cls_id, sep_id=ht.sep_id, pad_id=ht.pad_id, width=width,
      prefix=ht.prefix_ids).items()}
  want = tokenizer.tokenize([ht.text(TITLES, h[m]) for h, m in zip(history, mask)], max_length=16)
  for name in ("input_ids", "attention_mask"):
    padded = np.full((32, width), tokenizer.special_ids[2] if name == "input_ids" else 0, np.int32)
    padded[:, :want[name].shape[1]] = want[name]
    np.testing.assert_array_equal(got[name], padded, err_msg=name)
  assert got["attention_mask"][0].sum() == 2 + 3
  with pytest.raises(ValueError, match="encoder.query_prefix"):
    HistoryText.of(tokenizer, TITLES, " ; ", prefix="the " * 14)


def _fake_hub(monkeypatch, tmp_path, *, online: bool = True):
  """huggingface_hub.snapshot_download over a cache in tmp_path: nothing reaches a network."""
  import huggingface_hub
  from huggingface_hub.errors import LocalEntryNotFoundError
  from fixtures import tiny_bert
  snapshot = tiny_bert.write(tmp_path / "hf" / "models--org--tiny" / "snapshots" / "0123abcd")
  calls, cached = [], []

  def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
    calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, local=local_files_only))
    if repo_id != "org/tiny" or (local_files_only and not cached) or not online:
      raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has "
                                    "been disabled.")
    cached.append(True)  # downloaded once: in the cache from now on
    return snapshot

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  return snapshot, calls


def test_a_hub_id_resolves_through_snapshot_download_once_then_from_the_cache(tmp_path, monkeypatch, caplog):
  import logging
  snapshot, calls = _fake_hub(monkeypatch, tmp_path)
  with caplog.at_level(logging.INFO, logger="jaxrec"):
    enc = TextEncoder.from_pretrained("org/tiny")
  assert enc.path == snapshot
  # First the cache alone, then the hub; only the files an encoder reads.
  assert [c["local"] for c in calls[:2]] == [True, False]
  assert "model.safetensors" in calls[1]["allow_patterns"] and "*.onnx" not in calls[1]["allow_patterns"]
  assert "encoder.path=org/tiny: revision 0123abcd from the Hugging Face hub" in caplog.text
  assert "pin it with encoder.path=org/tiny@0123abcd" in caplog.text
  np.testing.assert_array_equal(enc.encode(["the movie"]), TextEncoder.from_pretrained(snapshot).encode(["the movie"]))
  calls.clear()
  from jaxrec import hub
  pinned = hub.resolve("org/tiny@0123abcd")
  assert (pinned.path, pinned.repo, pinned.revision) == (snapshot, "org/tiny", "0123abcd")
  assert calls == [dict(repo_id="org/tiny", revision="0123abcd", allow_patterns=calls[0]["allow_patterns"], local=True)]
  # The trainer's catalog goes the same way (frozen vectors, and the live encoder's directory).
  from jaxrec.catalog_text import catalog_text
  from jaxrec.data.sources import load
  cfg = load_config(TINY, ["model.use_text=true", "encoder.path=org/tiny", "encoder.mode=lora"])
  assert catalog_text(cfg, load(cfg.data)[0]).encoder_path == snapshot


def test_a_run_from_a_hub_id_saves_the_commit_it_read_and_resumes_from_it(tmp_path, monkeypatch):
  import json
  import jaxrec
  _fake_hub(monkeypatch, tmp_path)
  workdir = tmp_path / "run"
  overrides = ["model.use_text=true", "encoder.path=org/tiny", "encoder.mode=frozen", "train.steps=2",
               "mesh.num_devices=1", "checkpoint.async_save=false", f"encoder.cache_dir={tmp_path / 'cache'}",
               f"workdir={workdir}"]
  first = jaxrec.train(load_config(TINY, overrides))
  assert json.loads((workdir / "config.json").read_text())["encoder"]["path"] == "org/tiny@0123abcd"
  # The same command again is the same experiment (the cache gives the same commit): it extends the run.
  resumed = jaxrec.train(load_config(TINY, [*overrides, "train.steps=3"]))
  assert resumed["train/losses"][:2] == first["train/losses"] and len(resumed["train/losses"]) == 3


def test_an_unreachable_hub_names_the_local_directory_alternative(tmp_path, monkeypatch):
  from jaxrec.hub import HubError
  _fake_hub(monkeypatch, tmp_path, online=False)
  with pytest.raises(HubError, match=r"encoder.path='org/tiny' is not a local directory and the Hugging Face hub "
                                     r"could not provide it \(LocalEntryNotFoundError: .*\); on a connected machine "
                                     r"run `huggingface-cli download org/tiny --local-dir DIR`.*encoder.path=DIR"):
    TextEncoder.from_pretrained("org/tiny")
  # A local directory of that name wins, without asking the hub.
  from fixtures import tiny_bert
  monkeypatch.chdir(tmp_path)
  tiny_bert.write(tmp_path / "org" / "tiny")
  assert TextEncoder.from_pretrained("org/tiny").path == "org/tiny"


# ------------------------------------------------------------------------------ encoder families

FIXTURES = ROOT / "tests" / "fixtures" / "families"  # made by tests/fixtures/make_family_fixtures.py
FAMILIES = ("roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert")


def _stream_inputs(padded: dict) -> dict:
  """The padded rows' texts end to end as one token stream (``STREAM_INPUTS``), two padding tokens after."""
  mask = np.asarray(padded["attention_mask"]) > 0
  rows, length = mask.shape
  lengths = mask.sum(1)
  n = int(lengths.sum()) + 2
  stream_index = np.full((rows, length), n, np.int32)
  ids, types, positions, segments = (np.zeros(n, np.int32) for _ in range(4))
  segments[:] = -1
  at = 0
  for r in range(rows):
    k = int(lengths[r])
    ids[at:at + k], types[at:at + k] = padded["input_ids"][r, :k], padded["token_type_ids"][r, :k]
    positions[at:at + k], segments[at:at + k] = np.arange(k), r
    stream_index[r, :k] = np.arange(at, at + k)
    at += k
  return {"input_ids": ids, "token_type_ids": types, "position_ids": positions, "segment_ids": segments,
          "stream_index": stream_index}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_matches_sentence_transformers(family):
  from jaxrec.models.encoder import sentence_vectors
  path = str(FIXTURES / family)
  ref = np.load(os.path.join(path, "reference.npz"))
  texts = [str(t) for t in ref["texts"]]  # empty, CJK, Cyrillic, emoji, and texts past max_seq_length
  enc = TextEncoder.from_pretrained(path)
  assert (enc.config.model_type, enc.pooling, enc.max_length) == (family, str(ref["pooling"]), 24)
  # The tokenizer feeds the model what sentence-transformers fed it (truncation included) ...
  tokens = enc.tokenizer._token_lists(texts, enc.max_length)["input_ids"]
  np.testing.assert_array_equal([len(t) for t in tokens], ref["token_lengths"])
  np.testing.assert_array_equal(np.concatenate(tokens), ref["token_ids"])
  assert max(ref["token_lengths"]) == 24 and min(ref["token_lengths"]) == 2
  # ... and the vectors are its vectors, whatever the batches' padding.
  for batch_size in (1, 4, 64):
    np.testing.assert_allclose(enc.encode(texts, batch_size=batch_size), ref["embeddings"], rtol=0, atol=1e-5)
  # The token stream (what training feeds the encoder) gives the padded rows' vectors.
  padded = enc.tokenize(texts)
  streamed = sentence_vectors(enc.module, {k: jnp.asarray(v) for k, v in _stream_inputs(padded).items()}, enc.pooling)
  np.testing.assert_allclose(np.asarray(streamed), ref["embeddings"], rtol=0, atol=1e-5)
  # bfloat16 compute tracks float32.
  fast = TextEncoder.from_pretrained(path, dtype="bfloat16").encode(texts)
  assert 0 < np.abs(fast - ref["embeddings"]).max() < 0.05


def test_a_family_checkpoint_reports_every_mismatch_at_once(tmp_path):
  import shutil
  from safetensors.numpy import load_file, save_file
  from jaxrec.weights import WeightsError
  path = tmp_path / "mpnet"
  shutil.copytree(FIXTURES / "mpnet", path)
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["encoder.relative_attention_bias.weight"], tensors["encoder.layer.1.attention.attn.o.bias"]
  tensors["encoder.layer.0.attention.attn.q.weight"] = tensors["encoder.layer.0.attention.attn.q.weight"][:, :8]
  tensors["encoder.layer.2.output.dense.bias"] = np.zeros(16, np.float32)  # a third layer config.json lacks
  save_file(tensors, str(path / "model.safetensors"))
  with pytest.raises(WeightsError) as err:
    TextEncoder.from_pretrained(str(path))
  message = str(err.value)
  assert "4 problem(s) loading into mpnet encoder" in message
  for part in ("missing key 'encoder.relative_attention_bias.weight' (for relative_bias.embedding)",
               "missing key 'encoder.layer.1.attention.attn.o.bias'",
               "encoder.layer.0.attention.attn.q.weight: shape (8, 16) (transpose of (16, 8)) does not match the "
               "model's (16, 16)",
               "unexpected key 'encoder.layer.2.output.dense.bias' (not used by a 2-layer mpnet encoder)"):
    assert part in message, message
  # A BERT checkpoint under a DistilBERT config: DistilBERT's names are each reported missing.
  bert = tmp_path / "bert_as_distilbert"
  shutil.copytree(FIXTURES / "roberta", bert)
  with open(bert / "config.json") as f:
    config = json.load(f)
  with open(bert / "config.json", "w") as f:
    json.dump({"model_type": "distilbert", "vocab_size": config["vocab_size"], "dim": 16, "n_layers": 2, "n_heads": 2,
               "hidden_dim": 24, "max_position_embeddings": 42, "activation": "gelu"}, f)
  with pytest.raises(WeightsError, match=r"(?s)missing key 'transformer.layer.0.attention.q_lin.weight'.*"
                                         r"missing key 'transformer.layer.1.output_layer_norm.bias'.*"
                                         r"unexpected key 'embeddings.token_type_embeddings.weight'"):
    TextEncoder.from_pretrained(str(bert))


def _family_losses(family: str, tmp_path, mode: str, *mesh: str, steps: int = 3) -> np.ndarray:
  trainer = Trainer(load_config(TINY, [
      "model.use_text=true", f"encoder.mode={mode}", f"encoder.path={FIXTURES / family}",
      f"workdir={tmp_path / (family + mode + '_'.join(mesh))}", "train.batch_size=16", "train.warmup_steps=0",
      "train.learning_rate=0.01", "checkpoint.async_save=false", "encoder.lora_ffn=true", *mesh]))
  assert trainer.recommender.text.encoder_config.model_type == family
  state, builder, out = trainer.init_state(), trainer.batch_builder(), []
  for i in range(steps):
    state, metrics = trainer.train_step(state, trainer.layout.put(builder.map(i)))
    out.append(float(metrics["loss"]))
  return np.array(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_each_family_trains_with_lora_to_equal_losses_on_8_devices_and_on_1(tmp_path, family):
  reference = _family_losses(family, tmp_path, "lora", "mesh.num_devices=1")
  assert np.isfinite(reference).all() and reference[-1] != reference[0]
  sharded = _family_losses(family, tmp_path, "lora", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  np.testing.assert_allclose(sharded, reference, rtol=1e-5)


@pytest.mark.parametrize("family", ["mpnet", "modernbert"])  # the two that are not BERT's blocks with other names
@pytest.mark.slow
def test_full_fine_tuning_gives_equal_losses_on_8_devices_and_on_1(tmp_path, family):
  reference = _family_losses(family, tmp_path, "full", "mesh.num_devices=1")
  np.testing.assert_allclose(_family_losses(family, tmp_path, "full", "mesh.data=4", "mesh.tensor=2"), reference,
                             rtol=1e-5)


def _config(tmp_path, raw: dict):
  from jaxrec.models.encoder import BertConfig
  (tmp_path / "config.json").write_text(json.dumps(raw))
  return BertConfig.from_hf_json(tmp_path)


def test_family_configs_map_to_the_switches_of_one_encoder(tmp_path):
  from jaxrec.models.encoder import ConfigFileError
  base = dict(vocab_size=30, hidden_size=12, num_hidden_layers=3, num_attention_heads=3, intermediate_size=20)
  roberta = _config(tmp_path, dict(base, model_type="xlm-roberta", max_position_embeddings=514, type_vocab_size=1,
                                   pad_token_id=1))
  assert (roberta.position_offset, roberta.max_positions, roberta.type_vocab_size) == (2, 512, 1)
  distil = _config(tmp_path, dict(model_type="distilbert", vocab_size=30, dim=12, n_layers=2, n_heads=3, hidden_dim=20,
                                  activation="gelu", max_position_embeddings=512))
  assert (distil.hidden_size, distil.num_hidden_layers, distil.num_attention_heads, distil.intermediate_size,
          distil.type_vocab_size, distil.position_offset, distil.layer_norm_eps) == (12, 2, 3, 20, 0, 0, 1e-12)
  mpnet = _config(tmp_path, dict(base, model_type="mpnet", max_position_embeddings=514, pad_token_id=1))
  assert (mpnet.relative_attention_num_buckets, mpnet.position_offset, mpnet.type_vocab_size) == (32, 2, 0)
  # The released ModernBERT checkpoints' keys (transformers 5 writes layer_types and rope_parameters).
  modern = _config(tmp_path, dict(base, model_type="modernbert", hidden_activation="gelu", norm_eps=1e-5,
                                  global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160000.0,
                                  local_rope_theta=10000.0, num_hidden_layers=4, max_position_embeddings=8192))
  assert modern.layer_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
  assert (modern.sliding_window, modern.rope_theta, modern.local_rope_theta, modern.layer_norm_eps) == (
      64, 160000.0, 10000.0, 1e-5)
  for changes, message in [({"mlp_bias": True}, "mlp_bias=true is not supported"),
                           ({"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}, "rope_type 'default'"),
                           ({"hidden_activation": "silu"}, "hidden_act 'silu'")]:
    with pytest.raises(ConfigFileError, match=message):
      _config(tmp_path, dict(base, model_type="modernbert", **changes))
  with pytest.raises(ConfigFileError, match="supported model_type: bert, roberta, xlm-roberta, distilbert, mpnet, "
                                            "modernbert"):
    _config(tmp_path, dict(base, model_type="t5"))


@pytest.mark.slow
def test_a_dense_stage_runs_as_sentence_transformers_and_trains_in_the_item_tower(tmp_path):
  path = str(FIXTURES / "distilbert-dense")  # sentence-transformers' own save: mean pooling, 2_Dense 16 -> 8 tanh
  ref = np.load(os.path.join(path, "reference.npz"))
  texts = [str(t) for t in ref["texts"]]
  enc = TextEncoder.from_pretrained(path)
  assert enc.config.dense == (("2_Dense", 16, 8, True, "tanh"),) and enc.hidden_size == 8
  np.testing.assert_allclose(enc.encode(texts, batch_size=4), ref["embeddings"], rtol=0, atol=1e-5)
  # Fine-tuned in full, the item tower reads the Dense stage's 8-wide vectors, which train too.
  trainer = Trainer(load_config(TINY, ["model.use_text=true", "encoder.mode=full", f"encoder.path={path}",
                                       "mesh.num_devices=1", f"workdir={tmp_path / 'run'}", "train.batch_size=16",
                                       "train.learning_rate=0.01", "checkpoint.async_save=false"]))
  assert trainer.recommender.text.dim == 8
  state = trainer.init_state()
  dense_before = np.asarray(state["params"]["text_encoder"]["dense"][0]["linear"]["kernel"])
  for i in range(2):
    state, _ = trainer.train_step(state, trainer.layout.put(trainer.batch_builder().map(i)))
  assert np.abs(np.asarray(state["params"]["text_encoder"]["dense"][0]["linear"]["kernel"]) - dense_before).max() > 1e-4
  model = trainer.recommender.model(state["params"], state["tables"])
  items = np.arange(6, dtype=np.int32)
  current = TextEncoder(TextTokenizer.from_pretrained(path), model.text_encoder)
  np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(items))),
                             current.encode([trainer.dataset.item_text[i] for i in items]), rtol=0, atol=2e-6)


@pytest.mark.parametrize("family", ["roberta", "modernbert", "xlm-roberta", "mpnet"])
def test_history_rows_of_each_familys_tokenizer_are_its_tokens_of_the_history_text(family):
  from jaxrec.catalog_text import HistoryText
  from jaxrec.models.two_tower import history_text_rows
  tokenizer = TextTokenizer.from_pretrained(str(FIXTURES / family))
  titles = ["The Shawshank Redemption (1994)", "Toy Story (1995)", "love", "a great war story", "Heat", "the movie"]
  ht = HistoryText.of(tokenizer, titles, " ; ", prefix="query: ")
  # Byte-level BPE reads every title after a space (its tokens differ at a text's start).
  assert ht.lead == (" " if family in ("roberta", "modernbert") else "")
  assert ht.text(titles, [4, 2]) == "query: Heat ; love"  # the same text: the space moved to the title
  rng = np.random.default_rng(1)
  history = rng.integers(0, len(titles), (32, 4)).astype(np.int32)
  mask = rng.random((32, 4)) < 0.8
  history = np.where(mask, history, -1)
  width = ht.width(4)
  got = {k: np.asarray(v) for k, v in history_text_rows(
      jnp.asarray(ht.titles_NxW), jnp.asarray(ht.lengths_N), jnp.asarray(history), jnp.asarray(mask),
      separator=ht.separator_ids, cls_id=ht.cls_id, sep_id=ht.sep_id, pad_id=ht.pad_id, width=width,
      prefix=ht.prefix_ids).items()}
  want = tokenizer.tokenize([ht.text(titles, h[m]) for h, m in zip(history, mask)], max_length=width)
  for name in ("input_ids", "attention_mask"):
    padded = np.full((32, width), tokenizer.special_ids[2] if name == "input_ids" else 0, np.int32)
    padded[:, :want[name].shape[1]] = want[name]
    np.testing.assert_array_equal(got[name], padded, err_msg=name)
