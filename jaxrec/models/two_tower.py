"""Both towers and the temperature: the model the trainer optimises.

Dimension legend: B batch, L history length, N items, D text width, E tower output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.config import ModelConfig
from jaxrec.models.encoder import PADDED_INPUTS, BertConfig, BertEncoder, sentence_vectors
from jaxrec.models.towers import Catalog, ItemTower, QueryTower, Table, Users


class TwoTower(nnx.Module):
  """With ``encoder_cfg`` the model carries a live text encoder (LoRA or full fine-tuning) and the
  catalog's tokens ``[N, T]``; without it, item text comes from the cached vectors in the catalog."""

  def __init__(self, catalog: Catalog, users: Users, cfg: ModelConfig, text_dim: int, *,
               encoder_cfg: BertConfig | None = None, tokens: dict | None = None, pooling: str = "mean",
               row_multiple: int = 1, rngs: nnx.Rngs):
    self.pooling = pooling
    if encoder_cfg is not None:
      self.text_encoder = BertEncoder(encoder_cfg, rngs=rngs)
      self.tokens = nnx.Dict({name: Table(jnp.asarray(tokens[name], jnp.int32)) for name in PADDED_INPUTS})
    else:
      self.text_encoder = None
    self.item_tower = ItemTower(catalog, cfg, text_dim, row_multiple=row_multiple, rngs=rngs)
    self.query_tower = QueryTower(users, cfg, catalog=catalog, row_multiple=row_multiple, rngs=rngs)
    log_t = jnp.asarray(math.log(cfg.temperature), jnp.float32)
    # A learnt temperature is a Param; a fixed one a Table, so the optimizer never sees it.
    self.log_temperature = nnx.Param(log_t) if cfg.learn_temperature else Table(log_t)

  @property
  def temperature(self) -> jax.Array:
    return jnp.exp(self.log_temperature[...])

  def encode_text(self, items_U: jax.Array) -> jax.Array:
    """Pooled, L2-normalised text vectors [U, D] of these items through the live encoder."""
    return self.text_vectors({name: self.tokens[name][...][items_U] for name in PADDED_INPUTS})

  def text_vectors(self, inputs: dict[str, jax.Array]) -> jax.Array:
    """Pooled, L2-normalised text vectors [U, D] through the live encoder of tokens already looked
    up, as padded rows [U, T] (any T up to the table's: padding is masked) or as one token stream
    (row u the text that ``inputs["stream_index"][u]`` points at; zeros for a row with none): the
    two key sets of ``jaxrec.models.encoder.sentence_vectors``."""
    return sentence_vectors(self.text_encoder, inputs, self.pooling, normalize=True)

  def items(self, items_N: jax.Array, text_NxD: jax.Array | None = None,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Item vectors [N, E] (L2-normalised)."""
    return self.item_tower(items_N, text_NxD, dropout_key)

  def queries(self, users_B: jax.Array, history_BxL: jax.Array, history_mask_BxL: jax.Array,
              history_text_BxLxD: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """Query vectors [B, E] from user ids and the item indices of their recent history (-1 = padding)."""
    b, l = history_BxL.shape
    flat_text = None
    if history_text_BxLxD is not None:
      flat_text = history_text_BxLxD.reshape(b * l, history_text_BxLxD.shape[-1])  # explicit D: L may be 0
    hist_BxLxE = self.item_tower(jnp.maximum(history_BxL, 0).reshape(-1), flat_text, dropout_key)
    hist_BxLxE = hist_BxLxE.reshape(b, l, hist_BxLxE.shape[-1])  # explicit E: L may be 0
    return self.query_tower(users_B, hist_BxLxE, history_mask_BxL, history_BxL)
