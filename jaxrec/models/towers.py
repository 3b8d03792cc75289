"""Query and item towers, and the fusion MLP they share.

Dimension legend: B batch, L history length, N items, D text width, E tower output,
F MLP width, M values per categorical feature.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrec.config import ModelConfig
from jaxrec.models.sequence import SequenceEncoder
from jaxrec.sharding import round_up


class Table(nnx.Variable):
  """Constant lookup data carried by the model (feature ids, cached text vectors): never trained."""


def _dtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class FusionMLP(nnx.Module):
  """[*, in] -> hidden layers (GELU) -> [*, E], L2-normalised in float32; with ``scalar_head``
  also an unnormalised scalar from the last hidden layer, appended: [*, E + 1]."""

  def __init__(self, in_dim: int, cfg: ModelConfig, *, scalar_head: bool = False, rngs: nnx.Rngs):
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    dims = (in_dim, *cfg.mlp_dims)
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                   bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)))
        for a, b in zip(dims[:-1], dims[1:])])
    self.out = nnx.Linear(dims[-1], cfg.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "tower_out")),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("tower_out",)))
    # Zero-initialised: training starts from the model without the scalar.
    self.scalar = nnx.Linear(dims[-1], 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp", None)),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,))) if scalar_head else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.hidden:
      x = jax.nn.gelu(layer(x))
    out = l2_normalize(self.out(x))
    if self.scalar is None:
      return out
    return jnp.concatenate([out, self.scalar(x).astype(jnp.float32)], axis=-1)


def check_sum_widths(widths: dict[str, int], embed_dim: int, tower: str) -> None:
  """``model.fusion=sum`` adds a tower's inputs, so each must be ``embed_dim`` wide."""
  for key, width in widths.items():
    if width != embed_dim:
      raise ValueError(f"model.fusion=sum adds the {tower}'s inputs, which must be model.embed_dim={embed_dim} "
                       f"wide; {key} is {width}")


def fuse_sum(parts: list[jax.Array]) -> jax.Array:
  """``model.fusion=sum``: the inputs ``[*, E]`` added, then L2-normalised in float32."""
  return l2_normalize(sum(p.astype(jnp.float32) for p in parts))


class CategoricalBag(nnx.Module):
  """Sum of embeddings of a ``[rows, M]`` id table (0 = padding); rows are looked up by index."""

  def __init__(self, values_RxM: np.ndarray, vocab: int, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.values = Table(jnp.asarray(values_RxM, jnp.int32))
    self.embed = nnx.Embed(vocab, dim, param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.05), (None, "embed")))

  def __call__(self, rows_N: jax.Array) -> jax.Array:
    ids_NxM = self.values[...][rows_N]
    vecs_NxMxF = self.embed(ids_NxM) * (ids_NxM > 0)[..., None]
    return vecs_NxMxF.sum(axis=1)


def numeric_table(columns: dict[str, np.ndarray]) -> np.ndarray | None:
  """float32 [rows, K] of the numeric features (standardised, NaN = missing), sorted by name; None without any."""
  if not columns:
    return None
  return np.stack([np.asarray(columns[name], np.float32) for name in sorted(columns)], axis=1)


class NumericFeatures(nnx.Module):
  """A ``[rows, K]`` table of standardised numeric features (NaN = missing) -> [N, F]: each missing
  value imputed with 0 (the training mean) and flagged, values and flags through one linear layer."""

  def __init__(self, values_RxK: np.ndarray, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.values = Table(jnp.asarray(values_RxK, jnp.float32))
    self.proj = nnx.Linear(2 * values_RxK.shape[1], dim, param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
                           kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "embed")),
                           bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))

  def __call__(self, rows_N: jax.Array) -> jax.Array:
    values_NxK = self.values[...][rows_N]
    missing_NxK = jnp.isnan(values_NxK)
    x_Nx2K = jnp.concatenate([jnp.where(missing_NxK, 0.0, values_NxK), missing_NxK.astype(jnp.float32)], axis=-1)
    return self.proj(x_Nx2K)


@dataclasses.dataclass(frozen=True)
class Catalog:
  """What the item tower needs to know about items, as arrays (built by the trainer from a Dataset)."""

  num_items: int
  num_id_rows: int  # rows the id table needs (1 + items with a row of their own)
  id_row: np.ndarray  # int32 [N]: row of each item in the id table; 0 = the shared cold row
  features: dict[str, np.ndarray]  # name -> int32 [N, M]
  feature_sizes: dict[str, int]
  text_NxD: np.ndarray | None  # float32 cached text vectors (frozen encoder), else None
  numeric_NxK: np.ndarray | None = None  # float32 standardised numeric features (NaN = missing), else None


def id_table(rows: int, cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Embed:
  """An id embedding table [rows, id_dim], sharded by rows (``id_rows``)."""
  return nnx.Embed(rows, cfg.id_dim, param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
                   embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.05), ("id_rows", "embed")))


class ItemTower(nnx.Module):
  """Item index -> text vector ++ id embedding ++ categorical embeddings ++ numeric features -> fusion MLP (or their
  sum, ``model.fusion=sum``) -> [N, E]."""

  def __init__(self, catalog: Catalog, cfg: ModelConfig, text_dim: int, *, row_multiple: int = 1, rngs: nnx.Rngs):
    self.use_ids, self.use_text, self.id_dropout = cfg.use_item_ids, cfg.use_text, cfg.id_dropout
    in_dim = 0
    if self.use_text:
      in_dim += text_dim
      self.text = None if catalog.text_NxD is None else Table(jnp.asarray(catalog.text_NxD, jnp.float32))
    if self.use_ids:
      rows = round_up(catalog.num_id_rows, row_multiple)  # padding rows are never indexed
      self.id_row = Table(jnp.asarray(catalog.id_row, jnp.int32))
      self.ids = id_table(rows, cfg, rngs=rngs)
      in_dim += cfg.id_dim
    self.features = nnx.Dict({name: CategoricalBag(values, catalog.feature_sizes[name], cfg.feature_dim, cfg, rngs=rngs)
                              for name, values in sorted(catalog.features.items())})
    in_dim += cfg.feature_dim * len(catalog.features)
    self.numeric = None if catalog.numeric_NxK is None else NumericFeatures(catalog.numeric_NxK, cfg.feature_dim, cfg,
                                                                            rngs=rngs)
    in_dim += cfg.feature_dim if self.numeric is not None else 0
    if cfg.fusion == "sum":
      check_sum_widths({**({"the text vector": text_dim} if self.use_text else {}),
                        **({"model.id_dim": cfg.id_dim} if self.use_ids else {}),
                        **({"model.feature_dim": cfg.feature_dim} if catalog.features or self.numeric else {})},
                       cfg.embed_dim, "item tower")
    self.mlp = FusionMLP(in_dim, cfg, scalar_head=cfg.item_bias, rngs=rngs) if cfg.fusion == "mlp" else None
    # The bias column is stored times the configured temperature, so that q . v / temperature adds
    # exactly b to the cosine term at that temperature.
    self.bias_scale = cfg.temperature if cfg.item_bias else None

  def __call__(self, items_N: jax.Array, text_NxD: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """[N, E] unit vectors, or [N, E + 1] with ``model.item_bias`` (last column temperature * b)."""
    parts = []
    if self.use_text:
      parts.append(self.text[...][items_N] if text_NxD is None else text_NxD.astype(jnp.float32))
    if self.use_ids:
      rows_N = self.id_row[...][items_N]
      if dropout_key is not None and self.id_dropout > 0:
        # Trains the shared row that cold items use, and keeps the text path from idling.
        rows_N = jnp.where(jax.random.bernoulli(dropout_key, self.id_dropout, rows_N.shape), 0, rows_N)
      parts.append(self.ids(rows_N))
    parts.extend(bag(items_N) for bag in self.features.values())
    if self.numeric is not None:
      parts.append(self.numeric(items_N))
    if self.mlp is None:
      return fuse_sum(parts)
    x = jnp.concatenate([p.astype(self.mlp.out.kernel[...].dtype) for p in parts], axis=-1)
    out = self.mlp(x)
    if self.bias_scale is None:
      return out
    return out.at[..., -1].multiply(self.bias_scale)


@dataclasses.dataclass(frozen=True)
class Users:
  num_users: int
  features: dict[str, np.ndarray]  # name -> int32 [U, M]
  feature_sizes: dict[str, int]
  numeric_UxK: np.ndarray | None = None  # float32 standardised numeric features (NaN = missing), else None


class QueryTower(nnx.Module):
  """User id ++ user features ++ the history -> fusion MLP (or their sum, ``model.fusion=sum``)
  -> [B, E]. The history is read by ``model.query``: ``pool`` takes the mean of the item-tower
  vectors of its L items; ``transformer`` reads them in order (``models/sequence.py``), and
  ``sequence_queries`` gives the query of every slot, [B, L, E], for next-item training; ``text``
  takes the text encoder's vector of the history's titles [B, D] (``from_text``)."""

  def __init__(self, users: Users, cfg: ModelConfig, *, catalog: Catalog | None = None, row_multiple: int = 1,
               text_dim: int = 0, rngs: nnx.Rngs):
    self.use_ids = cfg.use_user_ids
    self.embed_dim, self.item_bias, self.query = cfg.embed_dim, cfg.item_bias, cfg.query
    in_dim = text_dim if cfg.query == "text" else cfg.embed_dim  # the history's text vector, or pooled (attended) history
    self.sequence = SequenceEncoder(cfg, rngs=rngs) if cfg.query == "transformer" else None
    self.profile = cfg.query == "transformer" and cfg.query_profile
    if self.profile:
      in_dim += cfg.embed_dim
    self.use_history_ids = cfg.history_ids
    if self.use_history_ids:
      self.history_row = Table(jnp.asarray(catalog.id_row, jnp.int32))
      self.history_ids = id_table(round_up(catalog.num_id_rows, row_multiple), cfg, rngs=rngs)
      in_dim += cfg.id_dim
    if self.use_ids:
      # Row 0 is the shared row for users unknown at training time.
      self.ids = id_table(round_up(users.num_users + 1, row_multiple), cfg, rngs=rngs)
      in_dim += cfg.id_dim
    self.features = nnx.Dict({name: CategoricalBag(values, users.feature_sizes[name], cfg.feature_dim, cfg, rngs=rngs)
                              for name, values in sorted(users.features.items())})
    in_dim += cfg.feature_dim * len(users.features)
    self.numeric = None if users.numeric_UxK is None else NumericFeatures(users.numeric_UxK, cfg.feature_dim, cfg,
                                                                          rngs=rngs)
    in_dim += cfg.feature_dim if self.numeric is not None else 0
    if cfg.fusion == "sum":
      check_sum_widths({**({"the history text vector": text_dim} if cfg.query == "text" else {}),
                        **({"model.id_dim": cfg.id_dim} if self.use_ids or self.use_history_ids else {}),
                        **({"model.feature_dim": cfg.feature_dim} if users.features or self.numeric else {})},
                       cfg.embed_dim, "query tower")
    self.mlp = FusionMLP(in_dim, cfg, rngs=rngs) if cfg.fusion == "mlp" else None

  def __call__(self, users_B: jax.Array, history_BxLxE: jax.Array, history_mask_BxL: jax.Array,
               history_BxL: jax.Array | None = None) -> jax.Array:
    """[B, E] unit vectors, or [B, E + 1] with ``model.item_bias`` (last column 1, which picks up
    the items' bias column). History rows may carry that column; only their first E are read."""
    history_BxLxE = history_BxLxE[..., :self.embed_dim]
    if self.sequence is not None:  # the query of the last slot: the newest item sits there
      return self.sequence_queries(users_B, history_BxLxE, history_mask_BxL)[:, -1]
    mask_BxL = history_mask_BxL.astype(jnp.float32)
    count_Bx1 = jnp.maximum(mask_BxL.sum(1, keepdims=True), 1.0)
    masked_mean = lambda x_BxLxF: (x_BxLxF * mask_BxL[..., None]).sum(1) / count_Bx1  # noqa: E731
    parts = [masked_mean(history_BxLxE)]
    if self.use_history_ids:
      parts.append(masked_mean(self.history_ids(self.history_row[...][jnp.maximum(history_BxL, 0)])))
    return self._fuse(parts, users_B)

  def from_text(self, users_B: jax.Array, text_BxD: jax.Array, history_BxL: jax.Array,
                history_mask_BxL: jax.Array) -> jax.Array:
    """``model.query=text``: [B, E] (or [B, E + 1]) from the encoder's vector of each history's
    text, with the user id, features and (``model.history_ids``) the history's pooled id rows."""
    parts = [text_BxD.astype(jnp.float32)]
    if self.use_history_ids:
      mask_BxL = history_mask_BxL.astype(jnp.float32)
      ids_BxLxF = self.history_ids(self.history_row[...][jnp.maximum(history_BxL, 0)])
      parts.append((ids_BxLxF * mask_BxL[..., None]).sum(1) / jnp.maximum(mask_BxL.sum(1, keepdims=True), 1.0))
    return self._fuse(parts, users_B)

  def sequence_queries(self, users_B: jax.Array, history_BxLxE: jax.Array, history_mask_BxL: jax.Array,
                       dropout_key: jax.Array | None = None) -> jax.Array:
    """The transformer's query at every history slot, [B, L, E] (or [B, L, E + 1]): slot t reads
    the items at slots <= t, so its query is for the item after slot t."""
    history_BxLxE = history_BxLxE[..., :self.embed_dim]
    b, l = history_mask_BxL.shape
    read_BxLxE = self.sequence(history_BxLxE, history_mask_BxL, dropout_key)
    parts = [read_BxLxE.reshape(b * l, -1)]
    if self.profile:  # the mean of slots <= t: causal like the attention
      mask_BxLx1 = history_mask_BxL.astype(jnp.float32)[..., None]
      total_BxLxE = jnp.cumsum(history_BxLxE.astype(jnp.float32) * mask_BxLx1, axis=1)
      profile_BxLxE = total_BxLxE / jnp.maximum(jnp.cumsum(mask_BxLx1, axis=1), 1.0)
      parts.append(profile_BxLxE.reshape(b * l, -1))
    users_R = jnp.repeat(users_B, l)
    q_RxE = self._fuse(parts, users_R)
    return q_RxE.reshape(b, l, -1)

  def _fuse(self, parts: list[jax.Array], users_B: jax.Array) -> jax.Array:
    if self.use_ids:
      parts.append(self.ids(users_B + 1))
    parts.extend(bag(users_B) for bag in self.features.values())
    if self.numeric is not None:
      parts.append(self.numeric(users_B))
    if self.mlp is None:
      return fuse_sum(parts)
    x = jnp.concatenate([p.astype(self.mlp.out.kernel[...].dtype) for p in parts], axis=-1)
    q_BxE = self.mlp(x)
    if not self.item_bias:
      return q_BxE
    return jnp.concatenate([q_BxE, jnp.ones_like(q_BxE[..., :1])], axis=-1)
