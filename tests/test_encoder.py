"""BertEncoder: logical axis annotations, pooling, padding invariance, config parsing, LoRA."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrec.models.encoder import BertConfig, BertEncoder, ConfigFileError, LoRAParam, TokenStream, pool
from jaxrec.models.encoder import sentence_vectors
from jaxrec.models.encoder import _bf16_matmul, _CpuBf16Linear, _gelu

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                  max_position_embeddings=32)


def _flat(module, filt=nnx.Param):
  return {p: v for p, v in nnx.to_flat_state(nnx.state(module, filt))}


def test_params_carry_logical_axis_names():
  cfg = BertConfig(**{**TINY.__dict__, "lora_rank": 2, "lora_ffn": True})
  module = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  names = {p: v.get_metadata()["out_sharding"] for p, v in _flat(module).items()}
  expected = {
      ("embeddings", "word", "embedding"): ("vocab", "embed"),
      ("embeddings", "position", "embedding"): (None, "embed"),
      ("embeddings", "token_type", "embedding"): (None, "embed"),
      ("embeddings", "norm", "scale"): ("embed",),
      ("layers", 0, "attention", "query", "kernel"): ("embed", "heads"),
      ("layers", 0, "attention", "key", "kernel"): ("embed", "heads"),
      ("layers", 1, "attention", "value", "kernel"): ("embed", "heads"),
      ("layers", 1, "attention", "value", "bias"): ("heads",),
      ("layers", 0, "attention", "out", "kernel"): ("heads", "embed"),
      ("layers", 0, "attention", "out", "bias"): ("embed",),
      ("layers", 0, "attention", "norm", "bias"): ("embed",),
      ("layers", 0, "mlp", "ffn_in", "kernel"): ("embed", "mlp"),
      ("layers", 0, "mlp", "ffn_in", "bias"): ("mlp",),
      ("layers", 0, "mlp", "ffn_out", "kernel"): ("mlp", "embed"),
      ("layers", 0, "attention", "query_lora", "a"): ("embed", None),
      ("layers", 0, "attention", "query_lora", "b"): (None, "heads"),
      ("layers", 0, "mlp", "ffn_in_lora", "b"): (None, "mlp"),
  }
  for path, axes in expected.items():
    assert names[path] == axes, path
  assert all(len(axes) == len(_flat(module)[p].shape) for p, axes in names.items())
  # 2 layers x (query, value, ffn_in, ffn_out) x (a, b)
  assert len(_flat(module, LoRAParam)) == 16


def test_pool_mean_cls_and_normalisation():
  hidden = jnp.array([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                      [[0.0, 4.0], [9.0, 9.0], [9.0, 9.0]]], jnp.bfloat16)
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  mean = pool(hidden, mask, "mean", normalize=False)
  np.testing.assert_allclose(np.asarray(mean), [[2.0, 4.0], [0.0, 4.0]])
  assert mean.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(pool(hidden, mask, "mean")), [[2 / 20 ** 0.5, 4 / 20 ** 0.5], [0.0, 1.0]],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pool(hidden, mask, "cls", normalize=False)), [[1.0, 2.0], [0.0, 4.0]])
  # an all-padding row pools to zeros instead of NaN
  np.testing.assert_array_equal(np.asarray(pool(hidden, jnp.zeros_like(mask))), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="pooling mode 'maximum' must be one of"):
    pool(hidden, mask, "maximum")


def test_pool_max_weightedmean_lasttoken_and_sqrt_len_as_sentence_transformers():
  # Rows of 3, 2 and 0 tokens; padding holds large values that no mode may read.
  hidden = jnp.array([[[1.0, -2.0], [3.0, 6.0], [-5.0, 0.5]],
                      [[0.0, 4.0], [2.0, -1.0], [99.0, 99.0]],
                      [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
  out = lambda mode: np.asarray(pool(hidden, mask, mode, normalize=False))  # noqa: E731
  np.testing.assert_allclose(out("max"), [[3.0, 6.0], [2.0, 4.0], [0.0, 0.0]])
  # weights 1, 2, 3 by position
  np.testing.assert_allclose(out("weightedmean"), [[(1 + 6 - 15) / 6, (-2 + 12 + 1.5) / 6], [4 / 3, 2 / 3], [0, 0]],
                             rtol=1e-6)
  np.testing.assert_allclose(out("lasttoken"), [[-5.0, 0.5], [2.0, -1.0], [0.0, 0.0]])
  np.testing.assert_allclose(out("mean_sqrt_len_tokens"), [[-1 / 3 ** 0.5, 4.5 / 3 ** 0.5], [2 / 2 ** 0.5, 3 / 2 ** 0.5],
                                                           [0, 0]], rtol=1e-6)


@pytest.mark.slow
def test_padding_does_not_change_real_tokens():
  module = BertEncoder(TINY, rngs=nnx.Rngs(0))
  ids = jnp.array([[2, 7, 9, 3]])
  short = module(ids, jnp.ones_like(ids))
  padded_ids = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0]])
  padded = module(padded_ids, (padded_ids > 0).astype(jnp.int32))
  np.testing.assert_allclose(np.asarray(padded[:, :4]), np.asarray(short), atol=1e-6)
  # and the pooled sentence vector is the same
  np.testing.assert_allclose(np.asarray(pool(padded, (padded_ids > 0))), np.asarray(pool(short, jnp.ones_like(ids))),
                             atol=1e-6)


@pytest.mark.parametrize("mode,dtype", [("mean", "float32"), ("cls", "float32"), ("mean", "bfloat16")])
@pytest.mark.slow
def test_a_token_stream_encodes_and_differentiates_as_one_padded_row_per_text(mode, dtype):
  # Three texts end to end in a stream of 16 (three padding tokens), and a fourth text slot that
  # holds no text; the same texts padded one per row of 6.
  module = BertEncoder(BertConfig(**{**TINY.__dict__, "dtype": dtype}), rngs=nnx.Rngs(3))
  atol = 2e-6 if dtype == "float32" else 1e-5  # gradients reach 26 here
  texts = [[2, 7, 9, 3], [2, 11, 12, 13, 14, 3], [2, 5, 3]]
  types = [[0, 0, 1, 1], [0, 1, 1, 0, 0, 0], [0, 1, 1]]
  padded_ids = jnp.array([t + [0] * (6 - len(t)) for t in texts])
  padded_mask = (padded_ids > 0).astype(jnp.int32)
  padded_types = jnp.array([t + [0] * (6 - len(t)) for t in types])
  pad = [0, 0, 0]
  ids = jnp.array(sum(texts, []) + pad)
  stream_types = jnp.array(sum(types, []) + pad)
  positions = jnp.array([j for t in texts for j in range(len(t))] + pad)
  segments = jnp.array([s for s, t in enumerate(texts) for _ in t] + [-1] * 3)
  starts = [0, 4, 10]
  index = jnp.array([[starts[s] + j if j < len(t) else 16 for j in range(6)] for s, t in enumerate(texts)] + [[16] * 6])
  graphdef, state = nnx.split(module)

  def padded_fn(state):
    return pool(nnx.merge(graphdef, state)(padded_ids, padded_mask, padded_types), padded_mask, mode)

  def stream_fn(state):
    stream = TokenStream.build(index, segments, positions)
    return pool(nnx.merge(graphdef, state)(ids, token_type_ids_BxL=stream_types, stream=stream), stream.mask_SxL, mode)

  streamed = stream_fn(state)
  np.testing.assert_allclose(np.asarray(streamed[:3]), np.asarray(padded_fn(state)), atol=atol)
  np.testing.assert_array_equal(np.asarray(streamed[3]), np.zeros(TINY.hidden_size))  # no tokens: zeros, not NaN
  weights = jax.random.normal(jax.random.key(0), (3, TINY.hidden_size))
  grad_padded = jax.grad(lambda s: (padded_fn(s) * weights).sum())(state)
  grad_stream = jax.grad(lambda s: (stream_fn(s)[:3] * weights).sum())(state)
  for a, b in zip(jax.tree.leaves(grad_padded), jax.tree.leaves(grad_stream)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sentence_vectors_takes_either_layout_and_they_agree(dtype):
  # One forward serves both layouts: the same texts give the same vectors whichever way they come
  # (bit for bit on XLA:CPU today; the tolerance leaves room for a backend that tiles [N, D] and
  # [S, L, D] matmuls differently).
  module = BertEncoder(BertConfig(**{**TINY.__dict__, "dtype": dtype}), rngs=nnx.Rngs(5))
  texts, types = [[2, 7, 9, 3], [2, 11, 12, 13, 3]], [[0, 0, 1, 1], [0, 1, 1, 0, 0]]
  padded = {"input_ids": jnp.array([t + [0] * (5 - len(t)) for t in texts]),
            "attention_mask": jnp.array([[1] * len(t) + [0] * (5 - len(t)) for t in texts]),
            "token_type_ids": jnp.array([t + [0] * (5 - len(t)) for t in types])}
  stream = {"input_ids": jnp.array(sum(texts, []) + [0]), "token_type_ids": jnp.array(sum(types, []) + [0]),
            "position_ids": jnp.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 0]),
            "segment_ids": jnp.array([0] * 4 + [1] * 5 + [-1]),
            "stream_index": jnp.array([[0, 1, 2, 3, 10], [4, 5, 6, 7, 8]])}
  for mode in ("mean", "cls"):
    by_rows = sentence_vectors(module, padded, mode)
    assert by_rows.shape == (2, TINY.hidden_size) and by_rows.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(by_rows), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sentence_vectors(module, stream, mode)), np.asarray(by_rows), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(sentence_vectors(module, padded, normalize=False)),
                                np.asarray(pool(module(padded["input_ids"], padded["attention_mask"],
                                                       padded["token_type_ids"]), padded["attention_mask"],
                                                normalize=False)))
  with pytest.raises(ValueError, match=r"padded rows \(input_ids, attention_mask, token_type_ids\).*got "
                                       r"attention_mask, input_ids$"):
    sentence_vectors(module, {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]})
  with pytest.raises(ValueError, match="exactly one"):
    module(padded["input_ids"])


def test_token_types_matter_and_default_to_zero():
  module = BertEncoder(TINY, rngs=nnx.Rngs(1))
  ids, mask = jnp.array([[2, 7, 9, 3]]), jnp.ones((1, 4), jnp.int32)
  base = module(ids, mask)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(module(ids, mask, jnp.zeros_like(ids))))
  assert float(jnp.abs(module(ids, mask, jnp.array([[0, 0, 1, 1]])) - base).max()) > 1e-3


def _write_config(tmp_path, **changes):
  raw = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30, "hidden_size": 12,
         "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 20, "max_position_embeddings": 40,
         "type_vocab_size": 1, "layer_norm_eps": 1e-7, "hidden_act": "gelu", "pad_token_id": 0}
  raw.update(changes)
  raw = {k: v for k, v in raw.items() if v is not None}
  (tmp_path / "config.json").write_text(json.dumps(raw))
  return tmp_path


def test_from_hf_json_reads_fields_and_overrides(tmp_path):
  cfg = BertConfig.from_hf_json(_write_config(tmp_path), lora_rank=4, lora_alpha=8.0)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (30, 12, 3, 3)
  assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (20, 40, 1)
  assert cfg.layer_norm_eps == 1e-7 and cfg.head_dim == 4 and cfg.lora_rank == 4 and cfg.lora_alpha == 8.0
  assert BertConfig.from_hf_json(tmp_path / "config.json") == BertConfig.from_hf_json(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"hidden_act": "gelu_new"}, "only 'gelu'"),
    ({"model_type": "gpt2", "architectures": ["GPT2Model"]}, "model_type 'gpt2'"),
    ({"model_type": None}, "model_type None"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"num_attention_heads": 5}, "not divisible"),
    ({"hidden_size": None}, "lacks hidden_size"),
])
def test_from_hf_json_rejects_unsupported(tmp_path, changes, message):
  _write_config(tmp_path, **changes)
  with pytest.raises(ConfigFileError, match=message) as err:
    BertConfig.from_hf_json(tmp_path)
  assert str(tmp_path / "config.json") in str(err.value)


def test_from_hf_json_missing_and_garbage(tmp_path):
  with pytest.raises(ConfigFileError, match="no config.json"):
    BertConfig.from_hf_json(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigFileError, match="cannot read"):
    BertConfig.from_hf_json(tmp_path)


def _lora_pair(cfg, lora_ffn):
  frozen = BertEncoder(cfg, rngs=nnx.Rngs(0))
  # Pretrained-like scale: with BERT's 0.02 init the blocks barely move the residual stream and
  # adapter gradients vanish below Adam's epsilon, which would make the test vacuous.
  state = nnx.state(frozen, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
  nnx.update(frozen, jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape), state))
  adapted = BertEncoder(BertConfig(**{**cfg.__dict__, "lora_rank": 4, "lora_alpha": 8.0, "lora_ffn": lora_ffn}),
                        rngs=nnx.Rngs(1))
  # same pretrained weights in both; only the adapters are new
  nnx.update(adapted, nnx.state(frozen, nnx.Param))
  return frozen, adapted


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16 on CPU: adapters added to float32 projections
@pytest.mark.parametrize("lora_ffn", [False, True])
@pytest.mark.slow
def test_lora_zero_b_equals_frozen_then_only_adapters_train(lora_ffn, dtype):
  frozen, adapted = _lora_pair(BertConfig(**{**TINY.__dict__, "dtype": dtype}), lora_ffn)
  ids = jnp.array([[2, 7, 9, 11, 3, 0], [2, 4, 5, 3, 0, 0]])
  mask = (ids > 0).astype(jnp.int32)
  np.testing.assert_array_equal(np.asarray(adapted(ids, mask)), np.asarray(frozen(ids, mask)))
  assert all(float(jnp.abs(v[...]).max()) == 0.0 for p, v in _flat(adapted, LoRAParam).items() if p[-1] == "b")
  assert all(float(jnp.abs(v[...]).max()) > 0.0 for p, v in _flat(adapted, LoRAParam).items() if p[-1] == "a")

  before = {p: np.asarray(v[...]) for p, v in _flat(adapted).items()}
  optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=LoRAParam)
  target = jax.random.normal(jax.random.key(3), (2, TINY.hidden_size))

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.sum((pool(model(ids, mask), mask, normalize=False) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(adapted, optimizer)) for _ in range(3)]
  after = {p: np.asarray(v[...]) for p, v in _flat(adapted).items()}
  lora_paths = set(_flat(adapted, LoRAParam))
  assert len(lora_paths) == (16 if lora_ffn else 8)
  for path in before:
    if path in lora_paths:
      assert np.abs(after[path] - before[path]).max() > 0, path
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
  assert losses[-1] < losses[0]
  assert float(jnp.abs(adapted(ids, mask) - frozen(ids, mask)).max()) > 1e-4


def test_bfloat16_compute_stays_close_and_pools_float32():
  module = BertEncoder(TINY, rngs=nnx.Rngs(0))
  bf16 = BertEncoder(BertConfig(**{**TINY.__dict__, "dtype": "bfloat16"}), rngs=nnx.Rngs(0))
  ids = jnp.array([[2, 7, 9, 11, 3]])
  mask = jnp.ones_like(ids)
  ref = pool(module(ids, mask), mask)
  out = pool(bf16(ids, mask), mask)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.05


def test_gelu_is_the_exact_erf_gelu_and_its_derivative():
  # Hugging Face's formula; jax.nn.gelu(approximate=False) is the same function written with erfc.
  x = jnp.linspace(-12.0, 12.0, 4801)
  np.testing.assert_allclose(np.asarray(_gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)), rtol=1e-6, atol=1e-6)
  derivative = jax.vmap(jax.grad(_gelu))(x)
  expected = jax.scipy.stats.norm.cdf(x) + x * jax.scipy.stats.norm.pdf(x)
  np.testing.assert_allclose(np.asarray(derivative), np.asarray(expected), rtol=1e-5, atol=1e-6)
  assert float(_gelu(jnp.float32(1.0))) == pytest.approx(0.8413447, abs=1e-6)  # 1 * Phi(1)


def _bf16_rounded(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("k,n", [(8, 24), (24, 8)])  # both ways of transposing for the weight gradient
def test_bf16_matmul_is_the_float32_product_of_bf16_operands_forward_and_backward(k, n):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w, g = jax.random.normal(kx, (40, k)), jax.random.normal(kw, (k, n)), jax.random.normal(kg, (40, n))
  exact = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  y, vjp = jax.vjp(_bf16_matmul, x, w)
  grad_x, grad_w = vjp(g)
  assert y.dtype == grad_x.dtype == grad_w.dtype == jnp.float32
  rx, rw, rg = _bf16_rounded(x), _bf16_rounded(w), _bf16_rounded(g)
  np.testing.assert_allclose(np.asarray(y), np.asarray(exact(rx, rw)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_x), np.asarray(exact(rg, rw.T)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_w), np.asarray(exact(rx.T, rg)), rtol=1e-5, atol=1e-5)
  # and bf16 rounding did happen: the float32 product differs
  assert float(jnp.abs(y - exact(x, w)).max()) > 1e-3


@pytest.mark.slow
def test_cpu_bfloat16_encoder_runs_bf16_matmuls_and_its_gradients_track_float32():
  cfg16 = BertConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
  exact, fast = BertEncoder(TINY, rngs=nnx.Rngs(0)), BertEncoder(cfg16, rngs=nnx.Rngs(0))
  assert all(isinstance(layer.attention.query, _CpuBf16Linear) for layer in fast.layers)
  assert not any(isinstance(layer.attention.query, _CpuBf16Linear) for layer in exact.layers)
  # pretrained-like scale, so that every block moves the residual stream
  state = nnx.state(exact, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), state)
  nnx.update(exact, state)
  nnx.update(fast, state)
  ids = jnp.array([[2, 7, 9, 11, 3, 0], [2, 4, 5, 3, 0, 0]])
  mask = (ids > 0).astype(jnp.int32)
  target = jax.random.normal(jax.random.key(3), (2, TINY.hidden_size))

  def grads(module):
    graphdef, params = nnx.split(module)
    return jax.grad(lambda p: (pool(nnx.merge(graphdef, p)(ids, mask), mask) * target).sum())(params)

  g32, g16 = grads(exact), grads(fast)
  leaves32, leaves16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
  assert len(leaves32) == len(leaves16)
  overall = max(float(jnp.abs(a).max()) for a in leaves32)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), leaves16):
    assert b.dtype == jnp.float32
    scale = float(jnp.abs(a).max())
    if "key" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
      # The key bias's gradient is zero in exact arithmetic (softmax ignores a constant shift of a
      # query's scores), so it holds only rounding: bf16 attention's, small against the rest.
      assert scale < 1e-6 and float(jnp.abs(b).max()) <= 0.01 * overall
      continue
    assert float(jnp.abs(a - b).max()) <= 0.05 * scale + 1e-6
  flat32, flat16 = jnp.concatenate([x.ravel() for x in leaves32]), jnp.concatenate([x.ravel() for x in leaves16])
  assert float(jnp.abs(flat16 - flat32).max()) > 0  # bf16 did compute
