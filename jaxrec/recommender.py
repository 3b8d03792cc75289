"""One config's model on one dataset and mesh: what training, evaluation and export share.

A ``Recommender`` holds the dataset and split, the arrays the model reads (catalog ids and
features, the catalog text, user features), the model's graph with its abstract parameters and
their shardings, and the forward passes that turn parameters into item and query vectors. It
holds no optimizer state and builds no training batches: ``jaxrec evaluate``, ``export`` and the
study restore parameters only (``restore``), while ``step.py`` adds the optimizer on top.

Parameters are split in two pure dicts: ``params`` (what the optimizer may update) and
``tables`` (the model's constants: feature ids, cached text vectors, frozen encoder weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxrec import host_memory, sharding
from jaxrec.catalog_text import CatalogText, catalog_text
from jaxrec.checkpoint import Checkpointer
from jaxrec.config import Config, to_json
from jaxrec.data import sources
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.pipeline import Sequences, history_mode
from jaxrec.mesh import make_mesh, maybe_initialize_distributed, mesh_fitting_devices
from jaxrec.models.towers import Catalog, Users, numeric_table
from jaxrec.models.two_tower import TwoTower

log = logging.getLogger("jaxrec")


def trainable_filter(mode: str):
  """Which Params the optimizer updates: in LoRA (and AdaLoRA) mode only the adapters of the text encoder; in
  full mode all of it; otherwise none of it (a frozen encoder, which ``model.query=text`` carries)."""
  towers = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text_encoder")))
  if mode in ("lora", "adalora"):
    return nnx.Any(nnx.LoRAParam, towers)
  return nnx.Param if mode == "full" else towers


def load_data(cfg: Config, dataset: Dataset | None = None) -> tuple[Dataset, Split]:
  """``cfg.data``'s dataset and split; with ``dataset`` (built in Python), that one split by ``cfg.data``."""
  started = time.perf_counter()
  if dataset is None:
    log.info("loading data: source=%s%s", cfg.data.source, f" path={cfg.data.path}" if cfg.data.path else "")
  else:
    log.info("splitting the in-memory dataset %r (data.source is not read)", dataset.name)
  dataset, split = sources.load(cfg.data, dataset)
  log.info("loaded %s: %d users, %d items, %d interactions (train %d, valid %d, test %d) in %.1f s", dataset.name,
           dataset.num_users, dataset.num_items, dataset.num_interactions, len(split.train), len(split.valid),
           len(split.test), time.perf_counter() - started)
  return dataset, split


def config_hash(cfg: Config) -> str:
  return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:16]


class Recommender:
  """The model of ``cfg`` over ``dataset``, its parameters laid out on ``mesh`` by ``rules``."""

  def __init__(self, cfg: Config, dataset: Dataset, split: Split, mesh: jax.sharding.Mesh,
               rules: dict[str, tuple[str, ...]], text: CatalogText):
    self.cfg, self.dataset, self.split, self.mesh, self.rules, self.text = cfg, dataset, split, mesh, rules, text
    self.history_mode = history_mode(cfg.data, dataset.has_time, cfg.model.query)
    if cfg.model.query == "transformer" and not (dataset.has_time and cfg.data.split in ("loo", "temporal")):
      log.warning("model.query=transformer reads the history in time order, but on data.split=%s%s the held-out "
                  "items are not the next ones in time: the order it learns is arbitrary for this evaluation",
                  cfg.data.split, "" if dataset.has_time else f" of {dataset.name}, which has no timestamps,")
    self.item_trained = np.bincount(dataset.items[split.train], minlength=dataset.num_items) > 0
    # Row 0 is the shared cold row; items own the rows after it (only trained ones, by default).
    owns_row = self.item_trained if cfg.model.cold_item_rows == "shared" else np.ones_like(self.item_trained)
    self.id_row = np.where(owns_row, np.cumsum(owns_row), 0).astype(np.int32)
    catalog = Catalog(num_items=dataset.num_items, num_id_rows=int(owns_row.sum()) + 1,
                      id_row=self.id_row,
                      features=dataset.item_features if cfg.model.use_item_features else {},
                      feature_sizes=dataset.item_feature_sizes, text_NxD=text.vectors,
                      numeric_NxK=numeric_table(dataset.item_numeric) if cfg.model.use_item_features else None)
    users = Users(num_users=dataset.num_users,
                  features=dataset.user_features if cfg.model.use_user_features else {},
                  feature_sizes=dataset.user_feature_sizes,
                  numeric_UxK=numeric_table(dataset.user_numeric) if cfg.model.use_user_features else None)
    history = text.history  # model.query=text: the catalog's title tokens
    self._arrays = {"id_row": catalog.id_row, "features": dict(catalog.features), "text": text.vectors,
                    "user_features": dict(users.features), "tokens": text.tokens,
                    "numeric": catalog.numeric_NxK, "user_numeric": users.numeric_UxK,
                    "titles": None if history is None else history.titles_NxW,
                    "title_lengths": None if history is None else history.lengths_N}
    self.trainable = trainable_filter(cfg.encoder.mode)

    def construct(arrays, seed):
      cat = dataclasses.replace(catalog, id_row=arrays["id_row"], features=arrays["features"], text_NxD=arrays["text"],
                                numeric_NxK=arrays["numeric"])
      usr = dataclasses.replace(users, features=arrays["user_features"], numeric_UxK=arrays["user_numeric"])
      hist = None if history is None else dataclasses.replace(history, titles_NxW=arrays["titles"],
                                                              lengths_N=arrays["title_lengths"])
      return TwoTower(cat, usr, cfg.model, text.dim, encoder_cfg=text.encoder_config, tokens=arrays["tokens"],
                      pooling=text.pooling, row_multiple=cfg.model.id_row_multiple, history_text=hist,
                      history_len=cfg.data.history_len, rngs=nnx.Rngs(seed))

    self._construct = construct
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda a: construct(a, 0), self._arrays)
    self.graphdef, abs_params, abs_tables = nnx.split(abstract, self.trainable, ...)
    self.param_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh, rules))
    self.table_shardings = nnx.to_pure_dict(sharding.state_shardings(abs_tables, mesh, rules))
    self._abstract = {"params": nnx.to_pure_dict(abs_params), "tables": nnx.to_pure_dict(abs_tables)}
    replicated = sharding.replicated(mesh)
    self._item_vectors = jax.jit(self._items_fn, out_shardings=replicated)
    self._query_vectors = jax.jit(self._queries_fn, out_shardings=replicated)
    self._catalog_text = jax.jit(self._text_fn, out_shardings=replicated)

  # ---------------------------------------------------------------- parameters

  def model(self, params: dict, tables: dict) -> TwoTower:
    return nnx.merge(self.graphdef, params, tables)

  def abstract_params(self) -> dict:
    """``{"params", "tables"}`` as ShapeDtypeStructs with their target shardings: a restore target."""
    shardings = {"params": self.param_shardings, "tables": self.table_shardings}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self._abstract, shardings)

  def init_params(self, seed: int) -> tuple[dict, dict]:
    """Fresh ``(params, tables)`` placed on the mesh; a pretrained encoder's weights (when the
    model carries one) are read once and placed straight into their shards (adapters start fresh)."""
    values = {}
    if self.text.encoder_config is not None:
      from jaxrec.weights import read_encoder_weights
      values, _ = read_encoder_weights(self.text.encoder_path, self.text.encoder_config)
    pretrained = {("text_encoder", *path): value for path, value in values.items()}
    construct, trainable = self._construct, self.trainable

    def unfilled(tree):  # the checkpoint's leaves leave the jit empty, so XLA never draws their random init
      flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
      return traverse_util.unflatten_dict({k: None if k in pretrained else v for k, v in flat.items()})

    def init(arrays):
      with nnx.use_eager_sharding(False):
        model = construct(arrays, seed)
      _, params, tables = nnx.split(model, trainable, ...)
      return unfilled(nnx.to_pure_dict(params)), unfilled(nnx.to_pure_dict(tables))

    out_shardings = (unfilled(self.param_shardings), unfilled(self.table_shardings))
    groups = jax.jit(init, out_shardings=out_shardings)(self._arrays)
    if not pretrained:
      return groups
    from jaxrec.weights import place
    filled = []
    for group, shardings in zip(groups, (self.param_shardings, self.table_shardings)):
      flat = traverse_util.flatten_dict(group, keep_empty_nodes=True)
      for key, target in traverse_util.flatten_dict(shardings).items():
        if key in pretrained:
          flat[key] = place(pretrained[key], key[1:], None, target)
      filled.append(traverse_util.unflatten_dict(flat))
    return tuple(filled)

  def restore(self, step: int | None = None, directory: str | None = None) -> tuple[int, dict, dict]:
    """``(step, params, tables)`` of a saved step (default the newest readable one) of this config's
    workdir, or of ``directory``'s checkpoints; the optimizer state stays on disk."""
    directory = directory or os.path.join(os.path.abspath(self.cfg.workdir), "checkpoints")
    ckpt = Checkpointer(directory, self.cfg.checkpoint)
    try:
      step, restored = ckpt.restore_part(self.abstract_params(), step=step)
    finally:
      ckpt.close()
    return step, restored["params"], restored["tables"]

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params()["params"]))

  # ---------------------------------------------------------------- forward passes

  def _items_fn(self, params: dict, tables: dict, items_N: jax.Array, text_NxD: jax.Array | None) -> jax.Array:
    return self.model(params, tables).items(items_N, text_NxD)

  def _queries_fn(self, params: dict, tables: dict, users_B, history_BxL, mask_BxL,
                  history_text_BxLxD: jax.Array | None) -> jax.Array:
    return self.model(params, tables).queries(users_B, history_BxL, mask_BxL, history_text_BxLxD)

  def _text_fn(self, params: dict, tables: dict, items_N: jax.Array) -> jax.Array:
    return self.model(params, tables).encode_text(items_N)

  def _chunked(self, fn, params: dict, tables: dict, n: int, chunk: int, *extra) -> jax.Array:
    """``fn(params, tables, ids, *extra[ids])`` over 0..n-1 in fixed-size chunks (one compile)."""
    outs = []
    for start in range(0, n, chunk):
      ids = np.arange(start, min(start + chunk, n), dtype=np.int32)
      ids = np.pad(ids, (0, chunk - len(ids))) if n > chunk else ids
      args = [None if x is None else x[ids] for x in extra]
      outs.append(fn(params, tables, ids, *args)[:min(chunk, n - start)])
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]

  def catalog_text(self, params: dict, tables: dict) -> jax.Array | None:
    """Text vectors [N, D] of every item through the (fine-tuned) live encoder; None otherwise."""
    if not self.text.live:
      return None
    return self._chunked(self._catalog_text, params, tables, self.dataset.num_items, self.cfg.encoder.batch_size)

  def item_vectors(self, params: dict, tables: dict, chunk: int = 4096,
                   text_NxD: jax.Array | None = None) -> jax.Array:
    """All catalog item vectors [N, E] (float32, replicated)."""
    if self.text.live and text_NxD is None:
      text_NxD = self.catalog_text(params, tables)
    return self._chunked(self._item_vectors, params, tables, self.dataset.num_items, chunk, text_NxD)

  def query_vectors(self, params: dict, tables: dict, users: np.ndarray, known: Sequences,
                    text_NxD: jax.Array | None = None) -> jax.Array:
    """Query vectors [B, E] of ``users`` from their ``known`` items (the history the config pools;
    with ``model.query=text`` the text of its titles, ``history_text``, through the encoder)."""
    history, mask = known.query_history(users, self.cfg.data.history_len, self.history_mode, self.cfg.train.seed)
    query_text = self.text.history is not None  # reads titles, not the history items' text vectors
    history_text = None if text_NxD is None or query_text else text_NxD[np.maximum(history, 0)]
    return self._query_vectors(params, tables, np.asarray(users, np.int32), history, mask, history_text)

  def history_text(self, users: np.ndarray, known: Sequences) -> list[str]:
    """``model.query=text``: the text each user's query reads (their history's titles, most recent
    last, as many as fit the encoder), built from their ``known`` items as ``query_vectors`` builds it."""
    if self.text.history is None:
      raise ValueError("history_text belongs to model.query=text")
    history, mask = known.query_history(users, self.cfg.data.history_len, self.history_mode, self.cfg.train.seed)
    return [self.text.history.text(self.dataset.item_titles, h[m]) for h, m in zip(history, mask)]

  # ---------------------------------------------------------------- evaluation and export

  def evaluate(self, params: dict, tables: dict, split: str | None = None,
               groups: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Full-catalog ranking of every user with held-out items of ``split``, known items excluded;
    ``groups`` (name -> bool [N]) adds metrics on the held-out items of each group, ``name/...``."""
    from jaxrec import evaluation
    protocol = evaluation.Protocol.of(self.dataset, self.split, split or self.cfg.eval.split, self.cfg.eval.max_users)
    if groups:
      protocol = dataclasses.replace(protocol, groups={**protocol.groups, **groups})
    text_NxD = self.catalog_text(params, tables)
    items_NxE = self.item_vectors(params, tables, text_NxD=text_NxD)
    queries = lambda users, known: self.query_vectors(params, tables, users, known, text_NxD)  # noqa: E731
    beta = self.cfg.eval.popularity_prior
    if beta:
      # cos / t + beta * log(1 + n_i) = (q . v + t * beta * log(1 + n_i)) / t: one more column
      # ([v, t beta log(1 + n)] against [q, 1]), so the same top-k kernel ranks it.
      prior_N = self.cfg.model.temperature * beta * np.log1p(protocol.train_counts_N.astype(np.float64))
      items_NxE = jnp.concatenate([items_NxE, jnp.asarray(prior_N, jnp.float32)[:, None]], axis=1)
      scores = queries
      queries = lambda users, known: jnp.concatenate(  # noqa: E731
          [scores(users, known), jnp.ones((len(users), 1), jnp.float32)], axis=1)
    return evaluation.full_ranking(protocol, items_NxE, queries, ks=self.cfg.eval.ks,
                                   batch_size=self.cfg.eval.batch_size, mesh=self.mesh, rules=self.rules)

  def build_index(self, params: dict, tables: dict, step: int):
    """The serving artifact: every item's vector, every user's query vector and known items, and
    the query tower exported with its parameters (``serving.py``) for histories of new users."""
    from jaxrec.retrieval import ItemIndex
    from jaxrec.serving import export_query_tower
    ds, sp, cfg = self.dataset, self.split, self.cfg
    known = Sequences.from_interactions(ds, np.concatenate([sp.train, sp.valid]))
    users = np.arange(ds.num_users, dtype=np.int32)
    bs = cfg.eval.batch_size
    text_NxD = self.catalog_text(params, tables)
    user_vectors = np.concatenate([np.asarray(self.query_vectors(params, tables, users[i:i + bs], known, text_NxD))
                                   for i in range(0, len(users), bs)])
    try:
      query_tower = export_query_tower(self, params, tables, user_vectors=user_vectors, text_NxD=text_NxD)
    except Exception as e:  # the index without it is still the index: a finished run keeps its metrics
      log.warning("the index is written without the query tower, which failed to export: %s",
                  " ".join(str(e).split())[:500] or type(e).__name__)
      query_tower = None
    return ItemIndex(np.asarray(self.item_vectors(params, tables, text_NxD=text_NxD)), ds.item_raw_ids,
                     list(ds.item_titles),
                     metadata={"config_hash": config_hash(cfg), "step": int(step), "dataset": ds.name,
                               "model": "two_tower", "text_encoder": cfg.encoder.path or "all-MiniLM-L6-v2"
                               if cfg.model.use_text else "none"},
                     user_vectors=user_vectors, user_ids=ds.user_raw_ids,
                     user_seen=(known.start.astype(np.int64), known.items.astype(np.int64)),
                     query_tower=query_tower)


def build(cfg: Config, devices: list | None = None, *, restore_only: bool = False,
          mesh: jax.sharding.Mesh | None = None, rules: dict[str, tuple[str, ...]] | None = None,
          dataset: Dataset | None = None) -> Recommender:
  """Starts the runtime (distributed, mesh), loads the data and builds ``cfg``'s model.
  ``restore_only``: the parameters will come from a checkpoint, so text vectors are not encoded."""
  maybe_initialize_distributed(cfg.mesh)  # before anything touches the backend
  if jax.default_backend() == "cpu":
    host_memory.log_hint_if_wanted()
  mesh = mesh or make_mesh(cfg.mesh, devices)
  rules = rules or sharding.rules_from_config(cfg.mesh.rules)
  dataset, split = load_data(cfg, dataset)
  return Recommender(cfg, dataset, split, mesh, rules, catalog_text(cfg, dataset, abstract=restore_only))


def evaluate(cfg: Config, step: int | None = None, split: str | None = None) -> dict[str, Any]:
  """Public API: full-ranking metrics of a saved checkpoint of ``cfg.workdir`` (on the devices
  present; the parameters alone are restored). When ``cfg.data`` is not the data the workdir's
  model trained on, the model is scored zero-shot on it (``transfer.evaluate``)."""
  from jaxrec import transfer
  if os.path.isfile(os.path.join(cfg.workdir, "config.json")) and \
      transfer.changes_data(transfer.saved_config(cfg.workdir), cfg):
    return transfer.evaluate(cfg, step, split)
  rec = build(mesh_fitting_devices(cfg), restore_only=True)
  step, params, tables = rec.restore(step)
  return dict(rec.evaluate(params, tables, split), step=step)
