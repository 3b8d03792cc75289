"""The order-aware reading of a user's history: causal self-attention over item vectors (SASRec).

Dimension legend: B batch, L history slots (most recent last, padding first), E tower width,
H heads, K head width (E // H), F MLP width, P position-table rows.

Slot t sees the items at slots <= t only, so training can ask every slot for the next item (the
all-positions objective) and one forward pass serves a query from its last slot. Blocks are
pre-LayerNorm (as in SASRec's reference code and most current transformers), with dropout on the
inputs, the attention weights and each block's output. A padded slot is never attended to, and
its own output is never read, so nothing a padded slot holds reaches a real one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.config import ModelConfig


def _dtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _linear(cfg: ModelConfig, n_in: int, n_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)))


def _layer_norm(width: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Statistics in float32 whatever the compute dtype.
  return nnx.LayerNorm(width, epsilon=1e-6, dtype=jnp.float32, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class CausalBlock(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e = cfg.embed_dim
    self.heads, self.rate = cfg.query_heads, cfg.query_dropout
    self.attention_norm = _layer_norm(e, rngs=rngs)
    self.query = _linear(cfg, e, e, ("embed", "heads"), rngs=rngs)
    self.key = _linear(cfg, e, e, ("embed", "heads"), rngs=rngs)
    self.value = _linear(cfg, e, e, ("embed", "heads"), rngs=rngs)
    self.out = _linear(cfg, e, e, ("heads", "embed"), rngs=rngs)
    self.mlp_norm = _layer_norm(e, rngs=rngs)
    self.mlp_in = _linear(cfg, e, e, ("embed", "mlp"), rngs=rngs)
    self.mlp_out = _linear(cfg, e, e, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x_BxLxE: jax.Array, bias_BxHxLxL: jax.Array, key: jax.Array | None) -> jax.Array:
    b, l, e = x_BxLxE.shape
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    h_BxLxE = self.attention_norm(x_BxLxE)
    split = lambda t: t.reshape(b, l, self.heads, e // self.heads)  # noqa: E731
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = split(self.query(h_BxLxE)), split(self.key(h_BxLxE)), split(self.value(h_BxLxE))
    scores_BxHxLxL = jnp.einsum("blhk,bmhk->bhlm", q_BxLxHxK, k_BxLxHxK, preferred_element_type=jnp.float32)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL / math.sqrt(e // self.heads) + bias_BxHxLxL, axis=-1)
    probs_BxHxLxL = _dropout(probs_BxHxLxL, self.rate, keys[0])
    ctx_BxLxHxK = jnp.einsum("bhlm,bmhk->blhk", probs_BxHxLxL.astype(v_BxLxHxK.dtype), v_BxLxHxK,
                             preferred_element_type=jnp.float32)
    x_BxLxE = x_BxLxE + _dropout(self.out(ctx_BxLxHxK.reshape(b, l, e)).astype(jnp.float32), self.rate, keys[1])
    h_BxLxE = jax.nn.gelu(self.mlp_in(self.mlp_norm(x_BxLxE)))
    return x_BxLxE + _dropout(self.mlp_out(h_BxLxE).astype(jnp.float32), self.rate, keys[2])


class SequenceEncoder(nnx.Module):
  """History item vectors [B, L, E] and their mask -> one output per slot [B, L, E] (float32),
  slot t reading slots <= t."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e = cfg.embed_dim
    self.rate = cfg.query_dropout
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
    self.positions = nnx.Param(init(rngs.params(), (cfg.query_positions, e), _dtype(cfg.param_dtype)))
    self.blocks = nnx.List([CausalBlock(cfg, rngs=rngs) for _ in range(cfg.query_layers)])
    self.norm = _layer_norm(e, rngs=rngs)

  def __call__(self, items_BxLxE: jax.Array, mask_BxL: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    b, l, e = items_BxLxE.shape
    mask_BxL = mask_BxL.astype(bool)
    keys = [None] * (len(self.blocks) + 1) if dropout_key is None else list(jax.random.split(dropout_key, len(self.blocks) + 1))
    # Positions are slots of the window; the newest item always sits in the last one.
    x_BxLxE = items_BxLxE.astype(jnp.float32) * math.sqrt(e) + self.positions[...][:l].astype(jnp.float32)[None]
    x_BxLxE = _dropout(jnp.where(mask_BxL[..., None], x_BxLxE, 0.0), self.rate, keys[0])
    # The most negative finite float, not -inf: a query slot with no visible key (padding) gets
    # equal weights instead of NaN, and is never read.
    visible_BxLxL = jnp.tril(jnp.ones((l, l), bool))[None] & mask_BxL[:, None, :]
    bias_Bx1xLxL = jnp.where(visible_BxLxL, 0.0, jnp.finfo(jnp.float32).min)[:, None]
    for block, key in zip(self.blocks, keys[1:]):
      x_BxLxE = block(x_BxLxE, bias_Bx1xLxL, key)
    return self.norm(x_BxLxE)
