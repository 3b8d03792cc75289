"""HF checkpoint loading: exact placement, one report of every problem, torch-free .bin, bad inputs."""

import io
import os
import pickle
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fixtures import tiny_bert
from jaxrec.models.encoder import BertConfig, LoRAParam
from jaxrec.weights import (WeightsError, abstract_encoder, check_vocab, key_table, load_encoder, place,
                            read_checkpoint, read_config, read_encoder_weights)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
IDS = np.array([[2, 5, 9, 13, 3, 0, 0], [2, 30, 39, 7, 11, 17, 3]])
MASK = (IDS > 0).astype(np.int32)
TYPES = np.array([[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]])


def _run(module):
  return np.asarray(module(jnp.asarray(IDS), jnp.asarray(MASK), jnp.asarray(TYPES)))


def test_tiny_checkpoint_loads_exactly_and_matches_numpy_bert(tmp_path):
  path = tiny_bert.write(tmp_path / "tiny")
  module, report = load_encoder(path)
  weights = tiny_bert.tensors()
  # the key table's transforms: Linear weights transposed, everything else copied
  np.testing.assert_array_equal(np.asarray(module.layers[1].attention.query.kernel[...]),
                                weights["encoder.layer.1.attention.self.query.weight"].T)
  np.testing.assert_array_equal(np.asarray(module.layers[0].mlp.ffn_out.kernel[...]),
                                weights["encoder.layer.0.output.dense.weight"].T)
  np.testing.assert_array_equal(np.asarray(module.embeddings.word.embedding[...]),
                                weights["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(np.asarray(module.layers[1].mlp.norm.scale[...]),
                                weights["encoder.layer.1.output.LayerNorm.weight"])
  hidden = _run(module)
  ref = tiny_bert.numpy_bert(weights, IDS, MASK, TYPES)
  assert hidden.shape == (2, 7, 8) and hidden.dtype == np.float32
  real = MASK.astype(bool)
  assert np.abs(hidden[real] - ref[real]).max() < 2e-5
  assert report.unused == ("pooler.dense.bias", "pooler.dense.weight")  # position_ids silently ignored
  assert len(report.loaded) == 5 + 16 * 2 and report.initialised == ()
  assert report.weights_file.endswith("model.safetensors")


def test_prefixed_and_unprefixed_keys_give_the_same_module(tmp_path):
  plain, _ = load_encoder(tiny_bert.write(tmp_path / "plain"))
  prefixed, report = load_encoder(tiny_bert.write(tmp_path / "prefixed", prefix="bert."))
  np.testing.assert_array_equal(_run(plain), _run(prefixed))
  assert report.unused == ("pooler.dense.bias", "pooler.dense.weight")


def test_legacy_gamma_beta_layer_norm_names(tmp_path):
  weights = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in tiny_bert.tensors().items()}
  legacy, _ = load_encoder(tiny_bert.write(tmp_path / "legacy", weights=weights))
  plain, _ = load_encoder(tiny_bert.write(tmp_path / "plain"))
  np.testing.assert_array_equal(_run(legacy), _run(plain))


def test_wrong_shape_and_missing_key_fail_in_one_error(tmp_path):
  weights = tiny_bert.tensors()
  weights["encoder.layer.1.intermediate.dense.weight"] = np.zeros((13, 8), np.float32)  # F is 12
  weights["embeddings.word_embeddings.weight"] = np.zeros((41, 8), np.float32)  # V is 40
  del weights["encoder.layer.0.attention.self.key.bias"]
  del weights["embeddings.LayerNorm.weight"]
  weights["encoder.layer.0.output.LayerNorm.bias"] = np.full(8, np.nan, np.float32)
  weights["encoder.layer.5.output.dense.bias"] = np.zeros(8, np.float32)  # a layer the config lacks
  path = tiny_bert.write(tmp_path / "broken", weights=weights)
  with pytest.raises(WeightsError) as err:
    load_encoder(path)
  message = str(err.value)
  assert message.startswith(os.path.join(path, "model.safetensors"))
  assert "6 problem(s)" in message
  assert "encoder.layer.1.intermediate.dense.weight: shape (8, 13) (transpose of (13, 8)) does not match the model's (8, 12)" in message
  assert "embeddings.word_embeddings.weight: shape (41, 8) does not match the model's (40, 8)" in message
  assert "missing key 'encoder.layer.0.attention.self.key.bias'" in message
  assert "missing key 'embeddings.LayerNorm.weight'" in message
  assert "encoder.layer.0.output.LayerNorm.bias: contains NaN or Inf" in message
  assert "unexpected key 'encoder.layer.5.output.dense.bias'" in message


def test_integer_tensor_is_reported(tmp_path):
  weights = tiny_bert.tensors()
  weights["encoder.layer.0.attention.self.query.bias"] = np.zeros(8, np.int32)
  with pytest.raises(WeightsError, match=r"query.bias: dtype int32 is not floating point"):
    load_encoder(tiny_bert.write(tmp_path / "ints", weights=weights))


def test_half_precision_checkpoint_is_upcast(tmp_path):
  weights = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tiny_bert.tensors().items()}
  module, _ = load_encoder(tiny_bert.write(tmp_path / "fp16", weights=weights))
  assert module.layers[0].attention.query.kernel[...].dtype == jnp.float32
  ref = tiny_bert.numpy_bert({k: v.astype(np.float32) for k, v in weights.items()}, IDS, MASK, TYPES)
  assert np.abs(_run(module)[MASK > 0] - ref[MASK > 0]).max() < 2e-5


def test_torch_bin_is_read_without_torch_and_matches_torch():
  path = os.path.join(FIXTURES, "tiny_bert_torch")
  assert not os.path.exists(os.path.join(path, "model.safetensors"))
  module, report = load_encoder(path)
  ref = np.load(os.path.join(path, "reference.npz"))
  hidden = np.asarray(module(jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]),
                             jnp.asarray(ref["token_type_ids"])))
  real = ref["attention_mask"] > 0
  assert np.abs(hidden[real] - ref["hidden"][real]).max() < 1e-5
  assert report.weights_file.endswith("pytorch_model.bin")
  assert report.unused == ("pooler.dense.bias", "pooler.dense.weight")
  assert "torch" not in sys.modules


def test_torch_bin_with_code_in_its_pickle_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
  tiny_bert.write(tmp_path / "evil")
  os.remove(tmp_path / "evil" / "model.safetensors")
  (tmp_path / "evil" / "pytorch_model.bin").write_bytes(buf.getvalue())
  with pytest.raises(WeightsError, match=r"pytorch_model.bin: cannot read torch checkpoint.*refusing to load global"):
    load_encoder(tmp_path / "evil")


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", b"\x00" * 5, "corrupted or not a safetensors file"),
    ("model.safetensors", None, "corrupted or not a safetensors file"),  # truncated real file
    ("pytorch_model.bin", b"PK\x03\x04garbage", "not a torch zip archive"),
    ("pytorch_model.bin", b"\x80\x02legacy pickle", "not a torch zip archive"),
])
def test_corrupted_weights_file(tmp_path, name, content, message):
  path = tiny_bert.write(tmp_path / "bad")
  weights_file = os.path.join(path, "model.safetensors")
  if content is None:
    data = open(weights_file, "rb").read()
    content = data[: len(data) // 2]
  os.remove(weights_file)
  with open(os.path.join(path, name), "wb") as f:
    f.write(content)
  with pytest.raises(WeightsError, match=message) as err:
    load_encoder(path)
  assert os.path.join(path, name) in str(err.value)


def test_directory_without_config_or_weights(tmp_path):
  with pytest.raises(WeightsError, match="not a directory"):
    load_encoder(tmp_path / "nowhere")
  path = tiny_bert.write(tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(WeightsError, match=r"no weights file .*holds: config.json, tokenizer_config.json, vocab.txt") as err:
    load_encoder(path)
  assert path in str(err.value)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(WeightsError, match="no config.json") as err:
    load_encoder(path)
  assert path in str(err.value)


def test_non_bert_architecture(tmp_path):
  config = {**tiny_bert.CONFIG, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
  path = tiny_bert.write(tmp_path / "gpt", config=config, weights=tiny_bert.tensors())
  with pytest.raises(WeightsError, match=r"model_type 'gpt2' \(architectures \['GPT2LMHeadModel'\]\) is not a supported"):
    load_encoder(path)


def test_tokenizer_vocab_larger_than_model():
  cfg = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12)
  check_vocab(40, cfg, "some/dir")  # a smaller or equal tokenizer is fine (MiniLM: 30522 == 30522)
  with pytest.raises(WeightsError, match="some/dir: tokenizer/vocab mismatch: the tokenizer has 41 tokens but "
                                         "the model's vocab_size is 40"):
    check_vocab(41, cfg, "some/dir")


def test_lora_adapters_are_the_only_fresh_params(tmp_path):
  path = tiny_bert.write(tmp_path / "tiny")
  base, _ = load_encoder(path)
  adapted, report = load_encoder(path, lora_rank=2, lora_ffn=True, seed=3)
  assert len(report.initialised) == 2 * 4 * 2
  assert all(p.split(".")[-1] in ("a", "b") for p in report.initialised)
  lora = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(adapted, LoRAParam))}
  assert all(float(jnp.abs(v).max()) == 0 for p, v in lora.items() if p[-1] == "b")
  assert all(float(jnp.abs(v).max()) > 0 for p, v in lora.items() if p[-1] == "a")
  np.testing.assert_array_equal(_run(adapted), _run(base))


@pytest.mark.parametrize("overrides", [{}, {"lora_rank": 2, "lora_ffn": True}, {"dtype": "bfloat16"}])
def test_read_encoder_weights_are_the_loaded_modules_state_leaf_for_leaf(tmp_path, overrides):
  path = tiny_bert.write(tmp_path / "tiny", prefix="bert.")
  module, loaded_report = load_encoder(path, seed=3, **overrides)
  values, report = read_encoder_weights(path, read_config(path, **overrides))
  assert report == loaded_report
  state = dict(nnx.to_flat_state(nnx.state(module)))
  base = {p: v for p, v in state.items() if not isinstance(v, LoRAParam)}
  assert set(values) == set(base) and len(values) == 5 + 16 * 2
  assert ("layers", 0, "attention", "query", "kernel") in values
  for p, v in base.items():
    assert isinstance(values[p], np.ndarray) and values[p].dtype == v[...].dtype, p
    np.testing.assert_array_equal(values[p], np.asarray(v[...]), err_msg=str(p))
  np.testing.assert_array_equal(values[("layers", 1, "mlp", "ffn_in", "kernel")],
                                tiny_bert.tensors()["encoder.layer.1.intermediate.dense.weight"].T)
  assert len(report.initialised) == (16 if overrides.get("lora_rank") else 0)


def test_read_encoder_weights_reports_every_problem_once(tmp_path):
  weights = tiny_bert.tensors()
  weights["encoder.layer.0.attention.self.key.weight"] = np.zeros((8, 5), np.float32)
  del weights["embeddings.LayerNorm.bias"]
  path = tiny_bert.write(tmp_path / "bad", weights=weights)
  with pytest.raises(WeightsError, match=r"2 problem\(s\)") as err:
    read_encoder_weights(path, read_config(path))
  assert "missing key 'embeddings.LayerNorm.bias'" in str(err.value)
  assert "encoder.layer.0.attention.self.key.weight: shape (5, 8) (transpose of (8, 5))" in str(err.value)


def test_place_puts_a_value_by_sharding_or_function():
  mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
  value = np.arange(32, dtype=np.float32).reshape(4, 8)
  plain = place(value, ("w",), ("embed", "mlp"), None)
  np.testing.assert_array_equal(np.asarray(plain), value)
  seen = []

  def sharding(path, names, shape):
    seen.append((path, names, shape))
    return NamedSharding(mesh, P(None, "tensor"))
  placed = place(value, ("w",), ("embed", "mlp"), sharding)
  assert seen == [(("w",), ("embed", "mlp"), (4, 8))]
  assert placed.sharding.spec == P(None, "tensor") and len(placed.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(placed), value)


def test_placement_with_a_sharding_function(tmp_path):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"vocab": "tensor", "heads": "tensor", "mlp": "tensor", "embed": "fsdp"}
  seen = {}

  def sharding(path, names, shape):
    seen[path] = names
    axes = tuple(rules.get(n) if n and shape[i] % mesh.shape[rules[n]] == 0 else None for i, n in enumerate(names))
    return NamedSharding(mesh, P(*axes))

  module, _ = load_encoder(tiny_bert.write(tmp_path / "tiny"), sharding=sharding)
  kernel = module.layers[0].mlp.ffn_in.kernel[...]
  assert kernel.sharding.spec == P("fsdp", "tensor") and len(kernel.sharding.device_set) == 8
  assert module.embeddings.word.embedding[...].sharding.spec == P("tensor", "fsdp")
  assert seen[("layers", 1, "attention", "out", "kernel")] == ("heads", "embed")
  ref, _ = load_encoder(tiny_bert.write(tmp_path / "ref"))
  np.testing.assert_allclose(_run(module), _run(ref), atol=1e-6)


def test_key_table_covers_every_module_param():
  cfg = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=12)
  abstract = abstract_encoder(cfg)
  params = {p for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  table = key_table(3)
  assert {p for _, p, _ in table} == params
  assert len({k for k, _, _ in table}) == len(table) == 5 + 16 * 3


def test_read_checkpoint_returns_numpy(tmp_path):
  path = tiny_bert.write(tmp_path / "tiny")
  tensors = read_checkpoint(os.path.join(path, "model.safetensors"))
  assert tensors["embeddings.position_ids"].dtype == np.int64
  assert set(tensors) == set(tiny_bert.tensors())
