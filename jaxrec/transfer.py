"""A trained recommender on other data: zero-shot evaluation and recommendation on another catalog
(``jaxrec evaluate --workdir W data.*=...``), and training that starts from a trained model
(``checkpoint.init_from``).

Parameters travel by name and shape. Those indexed by one dataset's rows (the item and user id
tables, the history id table, the tables of categorical features) travel only where the rows mean
the same thing in both: the same catalog rows, the same users, or a feature vocabulary both
datasets share (``Dataset.feature_vocabularies``). A training run records what its rows mean in
``WORKDIR/inputs.json``. Zero-shot, every item of the new catalog takes the source's shared cold
id row, the one ``model.id_dropout`` trains for items it has never seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxrec.checkpoint import Checkpointer
from jaxrec.config import Config, ConfigError, from_dict
from jaxrec.data.dataset import Dataset
from jaxrec.files import write_json_atomically

log = logging.getLogger("jaxrec")

INPUTS = "inputs.json"


class TransferError(ConfigError):
  """A trained model that cannot serve the requested data as asked (the message names the keys)."""


# ------------------------------------------------------------------ what a model's rows mean

def _digest(*parts: Any) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else str(part).encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def inputs_of(cfg: Config, dataset: Dataset, id_row_N: np.ndarray) -> dict:
  """What the model's indexed tables mean on ``dataset``: a digest of the catalog in id-row
  order, of the users, and each used feature's vocabulary (a shared one by name)."""
  catalog = _digest(dataset.name, dataset.item_raw_ids, "\n".join(dataset.item_text))
  users = _digest(dataset.name, dataset.user_raw_ids, catalog)

  def vocabularies(features: dict, own: str) -> dict[str, str]:
    return {name: dataset.feature_vocabularies.get(name, f"{name}@{own}") for name in sorted(features)}

  return {"dataset": dataset.name, "item_rows": _digest(catalog, np.asarray(id_row_N, np.int32)), "users": users,
          "item_features": vocabularies(dataset.item_features if cfg.model.use_item_features else {}, catalog),
          "user_features": vocabularies(dataset.user_features if cfg.model.use_user_features else {}, users)}


def write_inputs(workdir: str, inputs: dict) -> None:
  if jax.process_index() == 0:
    write_json_atomically(os.path.join(workdir, INPUTS), inputs)


# Parameters indexed by one dataset's rows: (path prefix, what their rows mean, the config key that
# takes them out of a model). A feature's table is keyed by the feature's name, the path's 3rd part.
_INDEXED = ((("item_tower", "ids"), "item_rows", ""),
            (("query_tower", "history_ids"), "item_rows", "model.history_ids=false"),
            (("query_tower", "ids"), "users", "model.use_user_ids=false"),
            (("item_tower", "features"), "item_features", "model.use_item_features=false"),
            (("query_tower", "features"), "user_features", "model.use_user_features=false"))


def _indexed(name: str) -> tuple[str | None, str]:
  """``(key, remedy)`` of a parameter (``'item_tower/ids/embedding'``): which meaning of rows it is
  indexed by (``'item_rows'``, ``'item_features/genre'``, ...; None if none) and the key that
  removes it."""
  parts = tuple(name.split("/"))
  for prefix, meaning, remedy in _INDEXED:
    if parts[:2] == prefix:
      return (f"{meaning}/{parts[2]}" if meaning.endswith("features") else meaning), remedy
  return None, ""


def _meaning(inputs: dict, key: str) -> str | None:
  group, _, feature = key.partition("/")
  return inputs.get(group, {}).get(feature) if feature else inputs.get(group)


# ------------------------------------------------------------------ the plan

def locate(source: str) -> tuple[str, str]:
  """``(workdir, checkpoints directory)`` of a workdir or a checkpoints directory."""
  source = os.path.abspath(source)
  if os.path.isdir(os.path.join(source, "checkpoints")):
    return source, os.path.join(source, "checkpoints")
  if os.path.isdir(source):
    return os.path.dirname(source), source
  raise TransferError(f"no trained model at {source}: give a workdir (with checkpoints/) or a checkpoints directory")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where each of a model's parameters comes from when it starts from ``directory``'s step."""

  directory: str
  step: int
  loaded: tuple[str, ...]  # read from the source as they are
  cold_rows: tuple[str, ...]  # zero-shot: every row takes the source's shared cold row (row 0)
  new: dict[str, str]  # parameter -> why it starts fresh
  dropped: tuple[str, ...]  # the source's parameters this model has no place for
  source_shapes: dict[str, jax.ShapeDtypeStruct]

  def summary(self) -> str:
    return (f"{len(self.loaded)} parameters loaded from {self.directory} step {self.step}"
            + (f", {len(self.cold_rows)} id tables from its shared cold row" if self.cold_rows else "")
            + f", {len(self.new)} new, {len(self.dropped)} dropped")

  def log(self) -> None:
    log.info("init: %s", self.summary())
    for name in self.loaded:
      log.info("  loaded   %s", name)
    for name in self.cold_rows:
      log.info("  cold row %s (every item of this catalog takes the source's shared cold row)", name)
    for name, why in self.new.items():
      log.info("  new      %s (%s)", name, why)
    for name in self.dropped:
      log.info("  dropped  %s", name)


def _flat(tree: dict) -> dict[str, Any]:
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def plan(source: str, target_params: dict, target_inputs: dict, cfg: Config, *, zero_shot: bool,
         step: int | None = None) -> Plan:
  """Matches ``target_params`` (abstract, ``Recommender.abstract_params()["params"]``) to the
  source's saved parameters by name, shape and (for indexed tables) the meaning of their rows."""
  workdir, directory = locate(source)
  ckpt = Checkpointer(directory, cfg.checkpoint)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise TransferError(f"no checkpoint in {directory} to start from")
    saved = {k[len("params/"):]: v for k, v in ckpt.saved_shapes(step).items() if k.startswith("params/")}
  finally:
    ckpt.close()
  source_inputs = read_inputs(workdir)
  loaded, cold, new = [], [], {}
  for name, want in _flat(target_params).items():
    have, (key, _) = saved.get(name), _indexed(name)
    if have is None:
      new[name] = "not in the source model"
    elif key is not None and (source_inputs is None or _meaning(source_inputs, key) != _meaning(target_inputs, key)):
      if zero_shot and name == "item_tower/ids/embedding" and have.shape[1:] == want.shape[1:]:
        cold.append(name)
      else:
        new[name] = "the source's rows are unknown (no inputs.json)" if source_inputs is None else _why_not(key)
    elif have.shape != want.shape:
      new[name] = f"shape {have.shape} in the source, {want.shape} here"
    else:
      loaded.append(name)
  names = set(_flat(target_params))
  return Plan(directory=directory, step=int(step), loaded=tuple(loaded), cold_rows=tuple(cold), new=new,
              dropped=tuple(k for k in saved if k not in names), source_shapes=saved)


def _why_not(key: str) -> str:
  if key == "item_rows":
    return "another catalog or split"
  if key == "users":
    return "other users"
  return f"feature {key.split('/')[1]} has another vocabulary"


def read_inputs(workdir: str) -> dict | None:
  path = os.path.join(workdir, INPUTS)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def refuse_unless_complete(p: Plan, dataset_name: str) -> None:
  """Zero-shot needs every parameter from the source: one line naming the keys that make a
  transferable model otherwise."""
  if not p.new:
    return
  remedies = []
  for name in p.new:
    remedy = _indexed(name)[1]
    if remedy and remedy not in remedies:
      remedies.append(remedy)
  first = next(iter(p.new.items()))
  raise TransferError(
      f"the model in {os.path.dirname(p.directory)} cannot score {dataset_name} without training: "
      f"{len(p.new)} of its parameters do not carry over ({first[0]}: {first[1]}"
      + (f"; and {len(p.new) - 1} more" if len(p.new) > 1 else "") + "); "
      + (f"a transferable model is trained with {' '.join(remedies)}" if remedies else
         "evaluate with the source's model.* and encoder.* settings")
      + f", or fine-tune one with checkpoint.init_from={os.path.dirname(p.directory)}")


def load(p: Plan, params: dict, shardings: dict, cfg: Config) -> dict:
  """``params`` with the plan's loaded leaves (and cold-row tables) read from the source, placed
  with ``shardings``; the new leaves keep their values."""
  flat_params = traverse_util.flatten_dict(params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  by_name = {"/".join(map(str, k)): k for k in flat_params}
  request = {}
  for name in p.loaded:
    key = by_name[name]
    request[key] = jax.ShapeDtypeStruct(flat_params[key].shape, flat_params[key].dtype, sharding=flat_shardings[key])
  replicated = jax.sharding.NamedSharding(next(iter(flat_shardings.values())).mesh, jax.sharding.PartitionSpec())
  for name in p.cold_rows:
    src = p.source_shapes[name]
    request[by_name[name]] = jax.ShapeDtypeStruct(src.shape, src.dtype, sharding=replicated)
  if not request:
    return params
  ckpt = Checkpointer(p.directory, cfg.checkpoint)
  try:
    _, restored = ckpt.restore_part({"params": traverse_util.unflatten_dict(request)}, step=p.step, leaves=True)
  finally:
    ckpt.close()
  values = traverse_util.flatten_dict(restored["params"])
  out = dict(flat_params)
  for name in p.loaded:
    out[by_name[name]] = values[by_name[name]]
  for name in p.cold_rows:
    key = by_name[name]
    target = flat_params[key]
    out[key] = jax.jit(lambda table: jnp.broadcast_to(table[0], target.shape).astype(target.dtype),
                       out_shardings=flat_shardings[key])(values[key])
  return traverse_util.unflatten_dict(out)


def train_only_new(tx: optax.GradientTransformationExtraArgs, p: Plan, params: dict) -> optax.GradientTransformationExtraArgs:
  """``checkpoint.init_trainable=new``: ``tx`` whose updates are zero for the parameters the plan
  loaded, except the text encoder's adapters (parameter-efficient transfer: adapters, the new id
  and feature tables, and whatever else did not fit train; the rest stays the source's)."""
  loaded = set(p.loaded)
  names = {k: "/".join(map(str, k)) for k in traverse_util.flatten_dict(params)}
  frozen = {k: name in loaded and "lora" not in name for k, name in names.items()}
  log.info("init_trainable=new: %d of %d parameter arrays stay as loaded", sum(frozen.values()), len(frozen))
  mask = traverse_util.unflatten_dict(frozen)
  return optax.chain(tx, optax.masked(optax.set_to_zero(), mask))


# ------------------------------------------------------------------ zero-shot on another dataset

def _data_without_path(cfg: Config):
  return dataclasses.replace(cfg.data, path="")


def changes_data(saved: Config, cfg: Config) -> bool:
  """Whether ``cfg`` asks a workdir's model about other data than it was trained on (another
  spelling of the same directory is the same data)."""
  a, b = saved.data.path, cfg.data.path
  same_path = a == b or bool(a and b) and os.path.realpath(a) == os.path.realpath(b)
  return not same_path or _data_without_path(saved) != _data_without_path(cfg)


def saved_config(workdir: str) -> Config:
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    return from_dict(json.load(f))


def check_config(cfg: Config) -> None:
  """What the config alone shows a model cannot carry to another dataset's users (before any data
  loads). A change of ``data.path`` alone may be a copy of the same data: the plan, with both
  datasets' row digests, decides that one."""
  keys = [k for k, on in (("model.use_user_ids=false", cfg.model.use_user_ids),
                          ("model.history_ids=false", cfg.model.history_ids)) if on]
  if keys and _data_without_path(saved_config(cfg.workdir)) != _data_without_path(cfg):
    raise TransferError(f"the model in {cfg.workdir} cannot score another dataset's users without training: its query "
                        f"tower embeds the ids of the users (or history items) it trained on; a transferable model "
                        f"is trained with {' '.join(keys)}, or fine-tune one with checkpoint.init_from={cfg.workdir}")


def zero_shot(cfg: Config, step: int | None = None):
  """``(recommender, plan, params, tables)``: ``cfg.workdir``'s trained model on ``cfg.data``,
  every item of the new catalog described by its text and shared features, every user by their
  history there."""
  from jaxrec import recommender
  from jaxrec.mesh import mesh_fitting_devices
  check_config(cfg)
  if not os.path.isdir(os.path.join(cfg.workdir, "checkpoints")):
    raise TransferError(f"no checkpoints in workdir {cfg.workdir}")
  rec = recommender.build(mesh_fitting_devices(cfg))
  p = plan(cfg.workdir, rec.abstract_params()["params"], inputs_of(cfg, rec.dataset, rec.id_row), cfg,
           zero_shot=True, step=step)
  refuse_unless_complete(p, rec.dataset.name)
  params, tables = rec.init_params(cfg.train.seed)  # tables: this catalog's constants (text vectors, features)
  params = load(p, params, rec.param_shardings, cfg)
  log.info("zero-shot: %s", p.summary())
  return rec, p, params, tables


def _title_key(title: str) -> str:
  return " ".join(title.lower().split())


def source_overlap(cfg: Config, dataset: Dataset) -> np.ndarray | None:
  """bool [N]: which of ``dataset``'s items the workdir's model trained on a namesake of (same
  title, year included for MovieLens); None when the source's data cannot be read here."""
  from jaxrec.data import sources
  try:
    source, _ = sources.load(saved_config(cfg.workdir).data)
  except Exception as e:  # moved or missing source files: the overall metrics stand without the split
    log.warning("the source's catalog is not readable (%s): no in_source/new_to_source metrics", str(e).splitlines()[0])
    return None
  titles = {_title_key(t) for t in source.item_titles}
  return np.array([_title_key(t) in titles for t in dataset.item_titles], bool)


def evaluate(cfg: Config, step: int | None = None, split: str | None = None) -> dict[str, Any]:
  """Full-ranking metrics of ``cfg.workdir``'s model on ``cfg.data`` with no training there; also
  on the held-out items whose title the source catalog has (``in_source/``) and lacks
  (``new_to_source/``), so memorised titles are not mistaken for transfer."""
  rec, p, params, tables = zero_shot(cfg, step)
  overlap = source_overlap(cfg, rec.dataset)
  groups = None if overlap is None else {"in_source": overlap, "new_to_source": ~overlap}
  result = rec.evaluate(params, tables, split, groups)
  result.update(step=p.step, transfer={"source": os.path.dirname(p.directory), "dataset": rec.dataset.name,
                                       "cold_rows": list(p.cold_rows),
                                       "items_in_source": None if overlap is None else int(overlap.sum()),
                                       "items": rec.dataset.num_items})
  return result


def index_for_users(cfg: Config, users_raw: list, step: int | None = None):
  """An ``ItemIndex`` of ``cfg.workdir``'s model on ``cfg.data``'s catalog with the query vectors of
  ``users_raw`` (ids as in that dataset) from their known items there: ``jaxrec recommend`` on
  another dataset. Unknown ids raise naming one."""
  from jaxrec.data.pipeline import Sequences
  from jaxrec.retrieval import ItemIndex
  rec, p, params, tables = zero_shot(cfg, step)
  ds, sp = rec.dataset, rec.split
  rows = {str(u): i for i, u in enumerate(ds.user_raw_ids)}
  missing = [u for u in users_raw if str(u) not in rows]
  if missing:
    raise TransferError(f"unknown user id {missing[0]!r} in {ds.name} ({ds.num_users} users, e.g. "
                        f"{', '.join(str(u) for u in ds.user_raw_ids[:3])})")
  users = np.array([rows[str(u)] for u in users_raw], np.int32)
  known = Sequences.from_interactions(ds, np.concatenate([sp.train, sp.valid]))
  text_NxD = rec.catalog_text(params, tables)
  user_vectors = np.asarray(rec.query_vectors(params, tables, users, known, text_NxD))
  seen = [known.items[known.start[u]:known.start[u + 1]] for u in users]
  indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
  return ItemIndex(np.asarray(rec.item_vectors(params, tables, text_NxD=text_NxD)), ds.item_raw_ids,
                   list(ds.item_titles), metadata={"step": p.step, "dataset": ds.name, "model": "two_tower",
                                                   "source": os.path.dirname(p.directory)},
                   user_vectors=user_vectors, user_ids=ds.user_raw_ids[users],
                   user_seen=(indptr, np.concatenate(seen).astype(np.int64) if seen else np.zeros(0, np.int64)))
