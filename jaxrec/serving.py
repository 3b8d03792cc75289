"""The servable query tower: the trained query tower and its parameters as one ``jax.export`` artifact.

``export_query_tower`` traces the model's own query forward pass (``TwoTower.queries``, the same
code that computed ``user_vectors.npy``) with every parameter and table it reads closed over as a
constant, lowers it with a symbolic batch dimension for CPU and the platform it runs on, and
serialises it. A server then needs only ``jax`` and ``numpy``: ``jax.export.deserialize(blob)
.call(*inputs)`` gives the query vectors, which score items as ``q @ vectors.npy.T``
(docs/serving.md).

Inputs, in this order (``query_tower.json`` lists them with dtype, shape and meaning):
  history_items  int32 [b, L]  rows of ``item_ids.npy``, -1 padded, most recent last
  user_rows      int32 [b]     rows of ``user_ids.npy``, -1 for a user unknown at training
                               (only where the model has user ids)
  user_<name>    int32 [b, M]  a categorical user feature's value ids, 0 = unknown (only where
                               the model reads user features); a known user's row is in
                               ``query_tower_user_features.npz``
  user_numeric   float32 [b, K] the numeric user features (data.table.user_numeric, sorted by
                               name), standardised with the spec's ``mean``/``std``, NaN = missing
                               (only where the model reads them; a known user's row is in
                               ``query_tower_user_features.npz`` under ``user_numeric``)

The model reads a user's id row and features by the user's index; the exported function gives
query j the index j of per-call tables built from its inputs (the id table's rows of
``user_rows``, the feature ids passed in), so known and new users go through the same code.

Dimension legend: B batch (symbolic ``b`` in the artifact), L history length, M values per
feature, E query width (E + 1 with ``model.item_bias``), N items, D text width.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger("jaxrec")

EXPORT_FILE = "query_tower.jaxexport"
SPEC_FILE = "query_tower.json"
EXAMPLES_FILE = "query_tower_examples.npz"
USER_FEATURES_FILE = "query_tower_user_features.npz"
FILES = (EXPORT_FILE, SPEC_FILE, EXAMPLES_FILE, USER_FEATURES_FILE)
NUM_EXAMPLES = 16  # users known at training whose inputs and outputs the artifact ships with
SPEC_FORMAT = "jaxrec-query-tower"
SPEC_VERSION = 1


class QueryTowerError(ValueError):
  """Inputs that do not fit the exported query tower, or a model it cannot export."""


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _npz_arrays(blob: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


@dataclasses.dataclass
class QueryTower:
  """An exported query tower: ``serialized`` (the ``jax.export`` bytes), ``spec`` (the contents of
  ``query_tower.json``), ``examples`` (inputs of the first users known at training, and their
  ``query_vectors``) and ``user_features`` (name -> int32 [U, M], row = row of ``user_ids.npy``).
  Call it with the inputs by name: ``tower(history_items=h_BxL, user_rows=u_B)`` -> float32 [B, E]."""

  serialized: bytes
  spec: dict[str, Any]
  examples: dict[str, np.ndarray]
  user_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._exported = None

  @property
  def input_names(self) -> list[str]:
    return [entry["name"] for entry in self.spec["inputs"]]

  @property
  def history_len(self) -> int:
    return int(self.spec["inputs"][0]["shape"][1])

  @property
  def width(self) -> int:
    return int(self.spec["output"]["shape"][1])

  def _check(self, inputs: dict[str, Any]) -> list[np.ndarray]:
    names = self.input_names
    missing, unknown = [n for n in names if n not in inputs], [n for n in inputs if n not in names]
    if missing or unknown:
      raise QueryTowerError(f"the query tower takes {', '.join(names)}; "
                            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"))
    arrays, batch = [], None
    for entry in self.spec["inputs"]:
      value = np.asarray(inputs[entry["name"]])
      floating = entry["dtype"].startswith("float")
      if value.dtype.kind not in ("iuf" if floating else "iu"):
        raise QueryTowerError(f"query tower input {entry['name']} must be {'numbers' if floating else 'integers'}, "
                              f"got {value.dtype}")
      fixed = entry["shape"][1:]
      if value.ndim != len(entry["shape"]) or list(value.shape[1:]) != fixed:
        raise QueryTowerError(f"query tower input {entry['name']} must be [batch{''.join(f', {d}' for d in fixed)}], "
                              f"got {list(value.shape)}")
      if batch is not None and value.shape[0] != batch:
        raise QueryTowerError(f"query tower inputs disagree on the batch: {entry['name']} has {value.shape[0]} rows, "
                              f"{names[0]} {batch}")
      batch = value.shape[0]
      low, high = entry["range"] or (-np.inf, np.inf)
      if value.size and (value.min() < low or value.max() > high):  # XLA would clamp the lookup silently
        bad = value[(value < low) | (value > high)].flat[0]
        raise QueryTowerError(f"query tower input {entry['name']} holds {bad}, outside [{low}, {high}]")
      arrays.append(value.astype(entry["dtype"]))
    return arrays

  def __call__(self, **inputs) -> np.ndarray:
    """Query vectors float32 [B, width] of the inputs named in ``spec`` (any batch size)."""
    arrays = self._check(inputs)
    if not len(arrays[0]):  # jax.export's symbolic dimensions are >= 1
      return np.zeros((0, self.width), np.float32)
    if self._exported is None:
      self._exported = jax.export.deserialize(bytearray(self.serialized))
    return np.asarray(self._exported.call(*arrays))

  def history_rows(self, item_rows: np.ndarray) -> np.ndarray:
    """One history as the ``history_items`` row the tower reads: the last L item rows, most recent
    last, -1 padded in front (as ``Sequences.last_items`` pads a short history)."""
    rows = np.asarray(item_rows, np.int32)[-self.history_len:] if self.history_len else np.zeros(0, np.int32)
    return np.concatenate([np.full(self.history_len - len(rows), -1, np.int32), rows])

  def new_user_inputs(self, histories: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs for users unknown at training: their histories (item rows, most recent last), user
    row -1 and every user feature unknown (0; numeric features NaN, imputed as missing)."""
    batch = len(histories)
    inputs = {"history_items": np.stack([self.history_rows(h) for h in histories]) if batch else
              np.zeros((0, self.history_len), np.int32)}
    for entry in self.spec["inputs"][1:]:
      unknown = np.nan if entry["dtype"].startswith("float") else -1 if entry["name"] == "user_rows" else 0
      inputs[entry["name"]] = np.full([batch, *entry["shape"][1:]], unknown, entry["dtype"])
    return inputs

  # -- files ----------------------------------------------------------------------------------

  def files(self) -> dict[str, bytes]:
    """The artifact's files by name (``FILES``), as ``ItemIndex.save`` writes them."""
    return {EXPORT_FILE: bytes(self.serialized),
            SPEC_FILE: json.dumps(self.spec, indent=1).encode(),
            EXAMPLES_FILE: _npz_bytes(self.examples),
            USER_FEATURES_FILE: _npz_bytes(self.user_features)}

  @classmethod
  def from_files(cls, blobs: dict[str, bytes], where: str = "") -> "QueryTower":
    """From the bytes of ``FILES``; a spec of another format raises QueryTowerError naming ``where``."""
    spec = json.loads(blobs[SPEC_FILE].decode())
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
      raise QueryTowerError(f"{where or SPEC_FILE}: not a {SPEC_FORMAT} spec of version {SPEC_VERSION}")
    return cls(blobs[EXPORT_FILE], spec, _npz_arrays(blobs[EXAMPLES_FILE]), _npz_arrays(blobs[USER_FEATURES_FILE]))


# ------------------------------------------------------------------------------------------------
# Export


def export_platforms() -> tuple[str, ...]:
  """CPU (where a server without an accelerator runs it) and the platform this process runs on."""
  here = jax.export.default_export_platform()
  return ("cpu",) if here == "cpu" else ("cpu", here)


def _user_features(rec) -> dict[str, np.ndarray]:
  """The categorical user features the query tower reads (``towers.Users``), by name."""
  ds = rec.dataset
  return {name: np.asarray(values, np.int32) for name, values in sorted(ds.user_features.items())
          if rec.cfg.model.use_user_features}


def _user_numeric(rec) -> np.ndarray | None:
  """float32 [U, K] standardised numeric user features (NaN = missing), as the query tower reads them."""
  from jaxrec.models.towers import numeric_table
  return numeric_table(rec.dataset.user_numeric) if rec.cfg.model.use_user_features else None


def _inputs_spec(rec, num_users: int) -> list[dict[str, Any]]:
  cfg = rec.cfg
  length = cfg.data.history_len
  inputs = [{"name": "history_items", "dtype": "int32", "shape": ["b", length], "range": [-1, rec.dataset.num_items - 1],
             "meaning": f"the user's history: rows of item_ids.npy, most recent last, -1 padded in front; "
                        + (f"its {length} most recent items" if rec.history_mode == "recent" else
                           f"up to {length} of its items (the model trained on a random sample of each history, "
                           f"data.history=sampled; the known users' rows here are such samples)")}]
  if cfg.model.use_user_ids:
    inputs.append({"name": "user_rows", "dtype": "int32", "shape": ["b"], "range": [-1, num_users - 1],
                   "meaning": f"the user's row of user_ids.npy ({num_users} users known at training); -1 for a user "
                              f"unknown at training time (the model's shared unknown-user row)"})
  for name, values_UxM in _user_features(rec).items():
    inputs.append({"name": f"user_{name}", "dtype": "int32", "shape": ["b", int(values_UxM.shape[1])],
                   "range": [0, rec.dataset.user_feature_sizes[name] - 1],
                   "meaning": f"user feature {name!r}: value ids as the training data numbered them "
                              f"(1..{rec.dataset.user_feature_sizes[name] - 1}, 0 = unknown or padding); a known user's "
                              f"row is row user_rows of {name} in {USER_FEATURES_FILE}"})
  numeric_UxK = _user_numeric(rec)
  if numeric_UxK is not None:
    names = sorted(rec.dataset.user_numeric)
    stats = [rec.dataset.numeric_stats.get(f"user:{name}", (0.0, 1.0)) for name in names]
    inputs.append({"name": "user_numeric", "dtype": "float32", "shape": ["b", len(names)], "range": None,
                   "columns": names, "mean": [m for m, _ in stats], "std": [d for _, d in stats],
                   "meaning": f"numeric user features {', '.join(names)}: (raw - mean) / std with this entry's mean "
                              f"and std (the training split's), NaN where missing; a known user's row is row "
                              f"user_rows of user_numeric in {USER_FEATURES_FILE}"})
  return inputs


def export_query_tower(rec, params: dict, tables: dict, *, user_vectors: np.ndarray | None = None,
                       text_NxD: jax.Array | None = None, platforms: tuple[str, ...] | None = None) -> QueryTower:
  """The query tower of ``rec`` (a ``recommender.Recommender``) with these parameters as a
  ``QueryTower``. ``user_vectors`` (the index's [U, E] rows) are checked against the artifact's
  output for the example users; ``text_NxD`` is the catalog's live text (LoRA / full fine-tuning)."""
  from jaxrec import sharding
  from jaxrec.data.pipeline import Sequences
  from jaxrec.models.towers import Table
  cfg, ds, sp = rec.cfg, rec.dataset, rec.split
  # Gathered to every process's host: the artifact holds the values, not their sharding.
  replicated = sharding.replicated(rec.mesh)
  host_params, host_tables = jax.tree.map(np.asarray, jax.jit(lambda p, t: (p, t), out_shardings=replicated)(
      params, tables))
  if rec.text.live and text_NxD is None:
    text_NxD = rec.catalog_text(params, tables)
  host_text = None if text_NxD is None or rec.text.history is not None else np.asarray(text_NxD)
  user_features = _user_features(rec)
  feature_names = list(user_features)
  numeric_UxK = _user_numeric(rec)
  num_users = ds.num_users

  def queries(history_BxL, *user_inputs):
    # The barrier keeps XLA from folding and re-laying out the weights as constants, which changes
    # the last bit of the vectors (measured: 9e-8 off the index's); behind it they are plain
    # operands, so the artifact computes what the jitted model computes, bit for bit.
    *weights, text = jax.lax.optimization_barrier(jax.tree.map(jnp.asarray, (host_params, host_tables, host_text)))
    model = rec.model(*weights)
    qt = model.query_tower
    b = history_BxL.shape[0]
    rest = list(user_inputs)
    if qt.use_ids:  # query j reads id row j + 1: the trained row of its user (row 0 for an unknown one)
      rows_B = rest.pop(0)
      table_RxF = qt.ids.embedding[...]
      qt.ids.embedding = nnx.Param(jnp.concatenate([table_RxF[:1], table_RxF[rows_B + 1]]))
    for name, ids_BxM in zip(feature_names, rest):  # query j reads feature row j: its own ids
      qt.features[name].values = Table(ids_BxM)
    if numeric_UxK is not None:  # and numeric row j: its own values
      qt.numeric.values = Table(rest[len(feature_names)])
    mask_BxL = history_BxL >= 0
    history_text = None if text is None else text[jnp.maximum(history_BxL, 0)]
    return model.queries(jnp.arange(b, dtype=jnp.int32), history_BxL, mask_BxL, history_text)

  spec_inputs = _inputs_spec(rec, num_users)
  (b,) = jax.export.symbolic_shape("b")
  args = [jax.ShapeDtypeStruct(tuple(b if d == "b" else d for d in entry["shape"]), jnp.dtype(entry["dtype"]))
          for entry in spec_inputs]
  platforms = platforms or export_platforms()
  try:
    exported = jax.export.export(jax.jit(queries), platforms=platforms)(*args)
  except Exception as e:  # a tracing or lowering failure of some model variant: one line naming the model
    raise QueryTowerError(f"cannot export the query tower of model.query={cfg.model.query}: "
                          f"{' '.join(str(e).split())[:300]}") from e
  width = int(exported.out_avals[0].shape[1])

  # The users of the index's first batch (``Recommender.build_index`` computes user_vectors in
  # batches of eval.batch_size), with the history it pooled for them. XLA's CPU matmuls tile by
  # the batch, so the same row in batches of other sizes may differ in the last bit (~1e-7); in
  # the index's own batch the artifact must give the index's rows exactly.
  known = Sequences.from_interactions(ds, np.concatenate([sp.train, sp.valid]))
  users = np.arange(min(cfg.eval.batch_size, num_users), dtype=np.int32)
  history, _ = known.query_history(users, cfg.data.history_len, rec.history_mode, cfg.train.seed)
  batch = {"history_items": history.astype(np.int32)}
  if cfg.model.use_user_ids:
    batch["user_rows"] = users
  for name in feature_names:
    batch[f"user_{name}"] = user_features[name][users]
  if numeric_UxK is not None:
    if "user_numeric" in user_features:
      raise QueryTowerError("a categorical user feature named 'user_numeric' collides with the numeric features' input")
    batch["user_numeric"] = numeric_UxK[users]
    user_features = {**user_features, "user_numeric": numeric_UxK}
  spec = {
      "format": SPEC_FORMAT, "version": SPEC_VERSION, "query": cfg.model.query, "platforms": list(platforms),
      "inputs": spec_inputs,
      "output": {"name": "query_vectors", "dtype": "float32", "shape": ["b", width],
                 "meaning": "query vectors: an item's score is q . v with v its row of vectors.npy (the order of "
                            "cosine / temperature" + (", plus the item's bias, the last column" if width !=
                                                      cfg.model.embed_dim else "") + ")"},
      "examples": f"{EXAMPLES_FILE}: the inputs of the users in rows 0..{min(NUM_EXAMPLES, num_users) - 1} of "
                  f"user_ids.npy and their query_vectors, rows 0..{min(NUM_EXAMPLES, num_users) - 1} of "
                  f"user_vectors.npy (bit-equal in a batch of the first {len(users)} users, as the index computed "
                  f"them; in a batch of another size within float32 rounding)",
      "call": "jax.export.deserialize(open('query_tower.jaxexport', 'rb').read()).call(*inputs in this order)",
  }
  artifact = QueryTower(bytes(exported.serialize()), spec, {}, user_features)
  q_BxE = artifact(**batch)
  if user_vectors is not None:
    diff = float(np.max(np.abs(q_BxE - user_vectors[users]), initial=0.0))
    if diff > 1e-4:  # the same computation on the same values: a mismatch is a bug, not rounding
      raise QueryTowerError(f"the exported query tower gives the first {len(users)} users query vectors up to "
                            f"{diff:.3g} away from the index's user_vectors")
    if diff:  # another platform's kernels (an accelerator) may round differently
      log.warning("the exported query tower's vectors of the first %d users are within %.3g of the index's "
                  "user_vectors, not bit-equal", len(users), diff)
  artifact.examples = {**{name: values[:NUM_EXAMPLES] for name, values in batch.items()},
                       "query_vectors": q_BxE[:NUM_EXAMPLES]}
  return artifact
