"""The training batch's layout: the one place that maps the config's modes to batch fields, their
shapes, dtypes, shardings and shape buckets.

Dimension legend: B global batch, L history length, M mixed (sampled) negatives, R distinct-item
rows (a bucket of the capacity), T tokens per text (a length bucket), S tokens in a token stream
(a stream bucket).

Every field's leading axis is the batch rule's: rows of examples, of distinct items and of the
token stream are all split over the data-parallel axes. A batch's *shape* is the tuple of its
bucketed sizes, ``(R, T)`` or, with a token stream, ``(R, S, T)``; ``(0, 0)`` when nothing is
bucketed. The step compiles once per shape met.

To add a field: give it a row in ``BatchLayout.fields`` (its dims and dtype, under the mode that
carries it), fill it in ``data.pipeline.BatchBuilder``, read it in ``step.loss_fn``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec import sharding
from jaxrec.config import Config
# A live encoder's inputs: per distinct item as padded rows [R, T] each, or all distinct items'
# texts end to end as one token stream ([S] each, and each item's stream positions [R, T]).
from jaxrec.models.encoder import PADDED_INPUTS, STREAM_INPUTS


def bucket_ladder(worst: int, count: int, multiple: int) -> tuple[int, ...]:
  """Shape buckets ``worst * i / count`` for i = 1..count, each rounded up to ``multiple``."""
  return tuple(sorted({sharding.round_up(-(-worst * i // count), multiple) for i in range(1, count + 1)}))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """What a global training batch holds. ``text``: how a live encoder's tokens travel (``none``
  without a live encoder, ``rows`` padded per item, ``stream`` end to end). ``unique_capacity``
  is the most distinct items a batch can name (0 with the catalog softmax, whose item tower runs on
  every item, so batches carry no distinct-item arrays). ``mixed_negatives`` M > 0 adds M sampled
  negatives shared by the whole batch: their ids, their slots in the distinct items and their logQ
  (rows of the batch rule like every field, so M splits evenly over the data-parallel devices)."""

  batch_size: int
  history_len: int
  weighted: bool = False  # per-example loss weights (train.user_weight_power)
  mixed_negatives: int = 0  # M (train.mixed_negatives)
  query: str = "pool"  # model.query: a transformer trains on every slot's next item, which needs their logQ;
  # the text query's history items are not among the distinct items (it reads their titles instead)
  unique_capacity: int = 0
  row_buckets: tuple[int, ...] = ()
  text: str = "none"  # none | rows | stream
  token_width: int = 0  # the catalog token table's width: the longest length bucket
  length_buckets: tuple[int, ...] = ()
  stream_buckets: tuple[int, ...] = ()
  mesh: Mesh | None = None  # None: a layout for building host batches only (no shardings)
  rules: tuple[tuple[str, tuple[str, ...]], ...] = tuple(sharding.RULES.items())

  def __post_init__(self):
    if self.text not in ("none", "rows", "stream"):
      raise ValueError(f"text layout {self.text!r} must be none, rows or stream")
    if self.text != "none" and not self.unique_capacity:
      raise ValueError("a live encoder's tokens travel with the distinct items: they need a unique_capacity")
    if self.mixed_negatives and not self.unique_capacity:
      raise ValueError("mixed negatives join the distinct items: they need a unique_capacity")
    if self.text == "stream" and not self.stream_buckets:
      raise ValueError("a token stream needs stream_buckets")
    # The capacity is always the largest row bucket, so every batch fits one.
    if self.unique_capacity:
      buckets = tuple(sorted({b for b in self.row_buckets if b < self.unique_capacity} | {self.unique_capacity}))
      object.__setattr__(self, "row_buckets", buckets)
    if self.text != "none":
      lengths = tuple(sorted({b for b in self.length_buckets if b < self.token_width} | {self.token_width}))
      object.__setattr__(self, "length_buckets", lengths)
    object.__setattr__(self, "stream_buckets", tuple(sorted(set(self.stream_buckets))))

  @classmethod
  def from_config(cls, cfg: Config, *, num_items: int, mesh: Mesh, rules: dict[str, tuple[str, ...]],
                  token_width: int = 0, encoder_length_buckets: tuple[int, ...] = ()) -> "BatchLayout":
    """The layout of ``cfg``'s batches over a catalog of ``num_items`` on ``mesh``; ``token_width``
    (the catalog token table's width) > 0 means a live encoder runs in the step."""
    multiple = sharding.data_parallel_size(mesh, rules) * jax.process_count()
    # The item tower (and a live text encoder) runs once per distinct item of the batch, positives
    # and history together, padded to a fixed capacity so the step compiles once; a batch of 256
    # with 10 history items names at most 2,816 items, often far fewer distinct ones. Mixed
    # negatives join them (the tower runs once per distinct item either way).
    mixed = cfg.train.mixed_negatives if cfg.train.negatives == "in_batch" else 0
    # The text query reads its history as titles through the encoder, not as item-tower rows: only
    # the positives (and mixed negatives) go through the item tower.
    history = 0 if cfg.model.query == "text" else cfg.data.history_len
    worst = min(num_items, cfg.train.batch_size * (history + 1) + mixed)
    capacity = sharding.round_up(worst, multiple) if cfg.train.negatives == "in_batch" else 0
    live = token_width > 0
    # A live encoder is most of the step, so there a batch pads its distinct items only to the
    # smallest of encoder.shape_buckets capacities and its tokens to its longest text's length
    # bucket (one compile per pair met); other modes keep the one worst-case shape.
    buckets = cfg.encoder.shape_buckets if live else 1
    text = "none" if not live else "stream" if cfg.encoder.token_stream else "rows"
    # A token stream: the batch's texts end to end, padded only to a bucket of the total (steps of
    # 1/(8 * shape_buckets) of the worst case, every distinct item at the catalog's longest text;
    # that worst case alone at shape_buckets=1).
    stream = bucket_ladder(capacity * token_width, 8 * buckets if buckets > 1 else 1, multiple) \
        if text == "stream" else ()
    return cls(batch_size=cfg.train.batch_size, history_len=cfg.data.history_len,
               weighted=bool(cfg.train.user_weight_power), mixed_negatives=mixed, query=cfg.model.query,
               unique_capacity=capacity,
               row_buckets=bucket_ladder(worst, buckets, multiple) if capacity else (), text=text,
               token_width=token_width,
               length_buckets=tuple(b for b in encoder_length_buckets if b < token_width) if buckets > 1 else (),
               stream_buckets=stream, mesh=mesh, rules=tuple(rules.items()))

  # ------------------------------------------------------------------ fields and shapes

  def fields(self, shape: tuple[int, ...] | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Each field's global shape and dtype in a batch of ``shape`` (default: the worst case)."""
    b, l = self.batch_size, self.history_len
    shape = shape or self.worst_shape
    rows, length = shape[0], shape[-1]
    out = {"user": ((b,), jnp.int32), "item": ((b,), jnp.int32), "log_q": ((b,), jnp.float32),
           "history": ((b, l), jnp.int32), "history_mask": ((b, l), jnp.bool_)}
    if self.weighted:
      out["weight"] = ((b,), jnp.float32)
    if self.unique_capacity:
      out.update({"unique_items": ((rows,), jnp.int32), "item_slot": ((b,), jnp.int32)})
      if self.query != "text":  # the text query's history never meets the item tower
        out["history_slot"] = ((b, l), jnp.int32)
      if self.query == "transformer":
        out["unique_log_q"] = ((rows,), jnp.float32)
    if self.mixed_negatives:
      m = self.mixed_negatives
      out.update({"negative": ((m,), jnp.int32), "negative_slot": ((m,), jnp.int32),
                  "negative_log_q": ((m,), jnp.float32)})
    if self.text == "stream":
      out.update({"unique_" + name: ((rows, length) if name == "stream_index" else (shape[1],), jnp.int32)
                  for name in STREAM_INPUTS})
    elif self.text == "rows":
      out.update({"unique_" + name: ((rows, length), jnp.int32) for name in PADDED_INPUTS})
    return out

  @property
  def worst_shape(self) -> tuple[int, ...]:
    if self.text == "stream":
      return self.unique_capacity, self.stream_buckets[-1], self.token_width
    return self.unique_capacity, self.token_width

  def shape_of(self, batch: dict) -> tuple[int, ...]:
    """The compiled shape of a batch, single or stacked, global (jax) or this process's rows (numpy)."""
    if not self.unique_capacity:
      return 0, 0
    processes = 1 if isinstance(batch["unique_items"], jax.Array) else jax.process_count()
    rows = batch["unique_items"].shape[-1] * processes
    if self.text == "stream":
      return rows, batch["unique_input_ids"].shape[-1] * processes, batch["unique_stream_index"].shape[-1]
    return rows, batch["unique_input_ids"].shape[-1] if self.text == "rows" else 0

  def text_inputs(self, batch: dict) -> dict[str, jax.Array] | None:
    """The distinct items' token inputs of a batch, keyed as the encoder takes them (None without a live encoder)."""
    if self.text == "none":
      return None
    return {name: batch["unique_" + name] for name in (STREAM_INPUTS if self.text == "stream" else PADDED_INPUTS)}

  # ------------------------------------------------------------------ placement

  def _mesh(self) -> Mesh:
    if self.mesh is None:
      raise ValueError("this batch layout has no mesh (built for host batches only)")
    return self.mesh

  def shardings(self, steps: int | None = None) -> dict[str, NamedSharding]:
    """Each field split over the batch rule on its leading axis; with ``steps`` K, stacked [K, ...]."""
    mesh, rules = self._mesh(), dict(self.rules)
    out = {}
    for name, (shape, _) in self.fields().items():
      spec = sharding.batch_sharding(mesh, len(shape), rules).spec
      out[name] = NamedSharding(mesh, P(None, *spec) if steps is not None else spec)
    return out

  def abstract(self, shape: tuple[int, ...] | None = None, steps: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch of ``shape`` (default the worst case); with ``steps`` K, K of them stacked."""
    shardings = self.shardings(steps)
    lead = () if steps is None else (steps,)
    return {name: jax.ShapeDtypeStruct((*lead, *s), d, sharding=shardings[name])
            for name, (s, d) in self.fields(shape).items()}

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global batch arrays ([B, ...], or [K, B, ...] stacked for a call)."""
    stacked = batch["user"].ndim == 2
    shardings = self.shardings(1 if stacked else None)
    if jax.process_count() == 1:  # one device_put of the whole dict: cheapest on a single host
      return jax.device_put(batch, {k: shardings[k] for k in batch})
    return {k: _process_local(shardings[k], v, stacked) for k, v in batch.items()}


def _process_local(sharding_: NamedSharding, local: np.ndarray, stacked: bool) -> jax.Array:
  """A global array from this process's rows; rows are the batch axis (axis 1 when stacked)."""
  if not stacked:
    return jax.make_array_from_process_local_data(sharding_, local)
  shape = list(local.shape)
  shape[1] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding_, local, tuple(shape))
