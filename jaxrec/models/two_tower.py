"""Both towers and the temperature: the model the trainer optimises.

Dimension legend: B batch, L history length, N items, D text width, E tower output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.config import ModelConfig
from jaxrec.models.encoder import PADDED_INPUTS, BertConfig, encoder_module, sentence_vectors
from jaxrec.models.towers import Catalog, ItemTower, QueryTower, Table, Users


def history_text_rows(titles_NxW: jax.Array, lengths_N: jax.Array, history_BxL: jax.Array, mask_BxL: jax.Array, *,
                      separator: tuple[int, ...], cls_id: int, sep_id: int, pad_id: int, width: int,
                      prefix: tuple[int, ...] = ()) -> dict[str, jax.Array]:
  """Each history's text as padded token rows [B, T=width] (``PADDED_INPUTS``): ``[CLS]``, the
  prefix's tokens, the titles of its real slots in slot order (most recent last) joined by the
  separator's tokens, ``[SEP]``. Only the newest titles that fit in ``width - 2 - len(prefix)``
  tokens are kept, whole (the newest
  always, cut to fit): ``catalog_text.HistoryText.kept``. Pure and shape-static, so the step builds
  the rows from the batch's history ids on the device."""
  b, l = history_BxL.shape
  s, room = len(separator), width - 2 - len(prefix)
  real_BxL = mask_BxL.astype(bool)
  items_BxL = jnp.maximum(history_BxL, 0)
  length_BxL = jnp.where(real_BxL, lengths_N[items_BxL], 0)
  # Tokens of the titles from slot j to the newest with separators between them: the older titles
  # are kept while that fits.
  suffix_BxL = jnp.cumsum(jnp.where(real_BxL, length_BxL + s, 0)[:, ::-1], axis=1)[:, ::-1] - s
  later_BxL = jnp.cumsum(real_BxL[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1] - real_BxL
  kept_BxL = real_BxL & ((suffix_BxL <= room) | (later_BxL == 0))
  # Each kept title's segment: the separator before it (not before the first), then its tokens.
  earlier_BxL = jnp.cumsum(kept_BxL.astype(jnp.int32), axis=1) - kept_BxL
  lead_BxL = jnp.where(kept_BxL & (earlier_BxL > 0), s, 0)
  end_BxL = jnp.cumsum(jnp.where(kept_BxL, length_BxL + lead_BxL, 0), axis=1)
  start_BxL = end_BxL - jnp.where(kept_BxL, length_BxL + lead_BxL, 0)
  total_B = jnp.minimum(end_BxL[:, -1], room)
  # Content token p belongs to the segment whose span holds it: the count of segments ending at or before p.
  p_K = jnp.arange(room)
  slot_BxK = jnp.minimum((end_BxL[:, None, :] <= p_K[None, :, None]).sum(-1), l - 1)
  offset_BxK = p_K[None, :] - jnp.take_along_axis(start_BxL, slot_BxK, axis=1)
  lead_BxK = jnp.take_along_axis(lead_BxL, slot_BxK, axis=1)
  item_BxK = jnp.take_along_axis(items_BxL, slot_BxK, axis=1)
  separator_S = jnp.asarray(separator or (pad_id,), jnp.int32)
  title_BxK = titles_NxW[item_BxK, jnp.clip(offset_BxK - lead_BxK, 0, titles_NxW.shape[1] - 1)]
  content_BxK = jnp.where(offset_BxK < lead_BxK, separator_S[jnp.clip(offset_BxK, 0, len(separator_S) - 1)], title_BxK)
  content_BxK = jnp.where(p_K[None, :] < total_B[:, None], content_BxK, pad_id)
  lead_BxP = jnp.broadcast_to(jnp.asarray((cls_id, *prefix), jnp.int32)[None], (b, 1 + len(prefix)))
  ids_BxT = jnp.concatenate([lead_BxP, content_BxK.astype(jnp.int32), jnp.full((b, 1), pad_id, jnp.int32)], axis=1)
  t_T = jnp.arange(width)
  end_B = total_B + 1 + len(prefix)  # where [SEP] goes
  ids_BxT = jnp.where(t_T[None, :] == end_B[:, None], sep_id, ids_BxT)
  return {"input_ids": ids_BxT, "attention_mask": (t_T[None, :] <= end_B[:, None]).astype(jnp.int32),
          "token_type_ids": jnp.zeros((b, width), jnp.int32)}


class TwoTower(nnx.Module):
  """With ``encoder_cfg`` the model carries a text encoder: with the catalog's tokens ``[N, T]`` a
  live one (LoRA or full fine-tuning) that the item tower runs; without them, item text comes from
  the cached vectors in the catalog. ``history_text`` (``catalog_text.HistoryText``, with
  ``model.query=text``) gives the model the catalog's title tokens, from which the query tower's
  history text is built and read by that encoder (frozen: its weights are constants)."""

  def __init__(self, catalog: Catalog, users: Users, cfg: ModelConfig, text_dim: int, *,
               encoder_cfg: BertConfig | None = None, tokens: dict | None = None, pooling: str = "mean",
               row_multiple: int = 1, history_text=None, history_len: int = 0, rngs: nnx.Rngs):
    self.pooling = pooling
    self.text_encoder = encoder_module(encoder_cfg, rngs=rngs) if encoder_cfg is not None else None
    if tokens is not None:
      self.tokens = nnx.Dict({name: Table(jnp.asarray(tokens[name], jnp.int32)) for name in PADDED_INPUTS})
    self.query_text = history_text is not None
    if self.query_text:
      self.titles = Table(jnp.asarray(history_text.titles_NxW, jnp.int32))
      self.title_lengths = Table(jnp.asarray(history_text.lengths_N, jnp.int32))
      # Static (ints): part of the graph, so the step's shapes follow from them.
      self.separator_ids, self.special_ids = history_text.separator_ids, (history_text.cls_id, history_text.sep_id,
                                                                          history_text.pad_id)
      self.prefix_ids = history_text.prefix_ids  # encoder.query_prefix's tokens
      self.history_text_width = history_text.width(history_len)
    self.item_tower = ItemTower(catalog, cfg, text_dim, row_multiple=row_multiple, rngs=rngs)
    self.query_tower = QueryTower(users, cfg, catalog=catalog, row_multiple=row_multiple, text_dim=text_dim,
                                  rngs=rngs)
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

  def history_text_inputs(self, history_BxL: jax.Array, mask_BxL: jax.Array) -> dict[str, jax.Array]:
    """``model.query=text``: each history's text as padded token rows [B, T] (``history_text_rows``)."""
    cls_id, sep_id, pad_id = self.special_ids
    return history_text_rows(self.titles[...], self.title_lengths[...], history_BxL, mask_BxL,
                             separator=self.separator_ids, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id,
                             width=self.history_text_width, prefix=self.prefix_ids)

  def history_text_vectors(self, history_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """``model.query=text``: the encoder's pooled, L2-normalised vector [B, D] of each history's text."""
    return self.text_vectors(self.history_text_inputs(history_BxL, mask_BxL))

  def items(self, items_N: jax.Array, text_NxD: jax.Array | None = None,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Item vectors [N, E] (L2-normalised)."""
    return self.item_tower(items_N, text_NxD, dropout_key)

  def queries(self, users_B: jax.Array, history_BxL: jax.Array, history_mask_BxL: jax.Array,
              history_text_BxLxD: jax.Array | None = None, dropout_key: jax.Array | None = None) -> jax.Array:
    """Query vectors [B, E] from user ids and the item indices of their recent history (-1 = padding)."""
    if self.query_text:  # the history's titles through the encoder; the item tower plays no part
      return self.query_tower.from_text(users_B, self.history_text_vectors(history_BxL, history_mask_BxL),
                                        history_BxL, history_mask_BxL)
    b, l = history_BxL.shape
    flat_text = None
    if history_text_BxLxD is not None:
      flat_text = history_text_BxLxD.reshape(b * l, history_text_BxLxD.shape[-1])  # explicit D: L may be 0
    hist_BxLxE = self.item_tower(jnp.maximum(history_BxL, 0).reshape(-1), flat_text, dropout_key)
    hist_BxLxE = hist_BxLxE.reshape(b, l, hist_BxLxE.shape[-1])  # explicit E: L may be 0
    return self.query_tower(users_B, hist_BxLxE, history_mask_BxL, history_BxL)
