"""jaxrec.flops: matmul FLOPs counted from the jaxpr, against hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.flops import matmul_flops
from jaxrec.models.encoder import BertConfig, BertEncoder


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_scan_bodies_count_once_per_iteration_and_gradients_count_their_dots():
  def f(x_BxD, w_DxD):
    def body(c, _):
      return jnp.tanh(c @ w_DxD), None
    y = jax.lax.scan(body, x_BxD, None, length=3)[0]
    return jax.grad(lambda w: (y @ w).sum())(w_DxD)

  # three scanned [8,4]x[4,4] dots, the forward dot outside, and its weight gradient [4,8]x[8,4]
  assert matmul_flops(f, _spec(8, 4), _spec(4, 4)) == 3 * 2 * 8 * 4 * 4 + 2 * 8 * 4 * 4 + 2 * 4 * 8 * 4


def test_batched_dots_and_the_costliest_branch_of_a_cond():
  bmm = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
  assert matmul_flops(bmm, _spec(5, 6, 7), _spec(5, 7, 3)) == 2 * 5 * 6 * 7 * 3

  def branchy(flag, x):
    return jax.lax.cond(flag, lambda v: v @ v.T @ v, lambda v: v * 2.0, x)

  assert matmul_flops(branchy, jax.ShapeDtypeStruct((), jnp.bool_), _spec(4, 6)) == 2 * 4 * 6 * 4 + 2 * 4 * 4 * 6


def test_shard_map_bodies_count_once_per_shard():
  mesh = jax.make_mesh((4,), ("x",))
  fn = jax.jit(jax.shard_map(lambda a: a @ a.T, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  x = jax.device_put(np.ones((8, 3), np.float32), NamedSharding(mesh, P("x")))
  assert matmul_flops(fn, x) == 4 * (2 * 2 * 3 * 2)  # four shards of [2,3]x[3,2]


def test_a_bert_encoder_forward_matches_the_textbook_count():
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                   max_position_embeddings=32)
  graphdef, state = nnx.split(BertEncoder(cfg, rngs=nnx.Rngs(0)))
  batch, length = 3, 10

  def forward(state, ids_BxL, mask_BxL):
    return nnx.merge(graphdef, state)(ids_BxL, mask_BxL)

  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  counted = matmul_flops(forward, state, ids, ids)
  h, i, tokens = cfg.hidden_size, cfg.intermediate_size, batch * length
  per_layer = 2 * tokens * (4 * h * h + 2 * h * i) + 2 * 2 * batch * length * length * h  # projections + QK^T, AV
  token_types = 2 * tokens * cfg.type_vocab_size * h  # the embeddings' one-hot token-type matmul
  assert counted == pytest.approx(cfg.num_hidden_layers * per_layer + token_types, rel=1e-12)
