"""Training and evaluation (public entry: `jaxrec.train(cfg)`): state built abstractly and materialised sharded, one pure jitted step.

The train state is a plain pytree ``{"params", "tables", "opt", "step"}`` of pure dicts:
``params`` are the trained weights, ``tables`` the model's constant lookups (feature ids, the
cached text vectors), ``opt`` the optax state. ``train_step(state, batch)`` is jitted once with
explicit shardings and donates ``state``. The loop dispatches step n before reading step n-1's
metrics, so the host never waits on the device in the hot loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec import host_memory, losses, metrics, optim, sharding
from jaxrec.checkpoint import CheckpointError, Checkpointer
from jaxrec.config import Config, to_json
from jaxrec.config_diff import ConfigDiff
from jaxrec.data import sources
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.pipeline import BatchBuilder, Sequences, history_mode, item_log_q, train_batches
from jaxrec.flops import jaxpr_matmul_flops
from jaxrec.mesh import MeshError, make_mesh, maybe_initialize_distributed, mesh_fitting_devices
from jaxrec.models.towers import Catalog, Users
from jaxrec.models.two_tower import TwoTower
from jaxrec.files import write_atomically, write_json_atomically
from jaxrec.workdir import holding_workdir_lock

log = logging.getLogger("jaxrec")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun to resume
EXIT_NONFINITE = 3  # loss became NaN/Inf with train.nan_policy=stop
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # a live encoder's inputs, in its argument order
STREAM_KEYS = ("input_ids", "token_type_ids", "position_ids", "segment_ids")  # ... as one token stream [N]


class TrainingStopped(RuntimeError):
  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


@dataclasses.dataclass
class TextSetup:
  """How item text reaches the item tower."""

  dim: int = 0
  vectors: np.ndarray | None = None  # frozen: cached catalog vectors [N, D]
  encoder: Any = None  # lora/full: the pretrained TextEncoder whose weights seed the model's encoder
  tokens: dict | None = None  # lora/full: catalog tokens, int32 [N, T] each


def cache_dir(cfg: Config) -> str:
  return cfg.encoder.cache_dir or os.environ.get("JAXREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxrec")


def _text_setup(cfg: Config, dataset: Dataset) -> TextSetup:
  if not cfg.model.use_text:
    return TextSetup()
  from jaxrec.text_encoder import TextEncoder, encode_cached
  live = cfg.encoder.mode in ("lora", "full")
  adapters = {"lora_rank": cfg.encoder.lora_rank, "lora_alpha": cfg.encoder.lora_alpha,
              "lora_ffn": cfg.encoder.lora_ffn} if cfg.encoder.mode == "lora" else {}
  log.info("loading the text encoder %s (encoder.mode=%s)", cfg.encoder.path or "all-MiniLM-L6-v2 (packaged)",
           cfg.encoder.mode)
  encoder = TextEncoder.from_pretrained(cfg.encoder.path or None, max_length=cfg.encoder.max_length or None,
                                        pooling=cfg.encoder.pooling, dtype=cfg.encoder.dtype, **adapters)
  if live:
    return TextSetup(dim=encoder.hidden_size, encoder=encoder, tokens=encoder.tokenize(list(dataset.item_text)))
  vectors = encode_cached(encoder, list(dataset.item_text), cache_dir(cfg), batch_size=cfg.encoder.batch_size,
                          progress=cfg.train.progress and jax.process_index() == 0)
  return TextSetup(dim=int(vectors.shape[1]), vectors=np.asarray(vectors, np.float32))


def trainable_filter(mode: str):
  """Which Params the optimizer updates: in LoRA mode only the adapters of the text encoder."""
  if mode == "lora":
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text_encoder"))))
  return nnx.Param


def _take_like(template: Any, source: Any, path: str = "") -> Any:
  """``source``'s values for the leaves of ``template`` (same nesting), placed with their shardings."""
  if isinstance(template, dict):
    return {k: _take_like(v, source[k], f"{path}/{k}") for k, v in template.items()}
  value = np.asarray(source)
  if value.shape != template.shape:
    raise ValueError(f"pretrained encoder weight {path} has shape {value.shape}, the model expects {template.shape}")
  return jax.device_put(value.astype(template.dtype), template.sharding)


class Trainer:
  """Owns one experiment: data, mesh, model, jitted steps. ``run()`` trains and evaluates."""

  def __init__(self, cfg: Config, devices: list | None = None):
    self.cfg = cfg
    maybe_initialize_distributed(cfg.mesh)  # before anything touches the backend
    if jax.default_backend() == "cpu":
      host_memory.log_hint_if_wanted()
    self.mesh = make_mesh(cfg.mesh, devices)
    self.rules = sharding.rules_from_config(cfg.mesh.rules)
    dp = sharding.data_parallel_size(self.mesh, self.rules)
    if cfg.train.batch_size % dp:
      raise MeshError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel size {dp} "
                      f"(mesh {dict(self.mesh.shape)})")
    if cfg.train.batch_size % jax.process_count():
      raise MeshError(f"train.batch_size={cfg.train.batch_size} is not divisible by {jax.process_count()} processes")

    started = time.perf_counter()
    log.info("loading data: source=%s%s", cfg.data.source, f" path={cfg.data.path}" if cfg.data.path else "")
    self.dataset, self.split = sources.load(cfg.data)
    ds, sp = self.dataset, self.split
    log.info("loaded %s: %d users, %d items, %d interactions (train %d, valid %d, test %d) in %.1f s", ds.name,
             ds.num_users, ds.num_items, ds.num_interactions, len(sp.train), len(sp.valid), len(sp.test),
             time.perf_counter() - started)
    self.train_seqs = Sequences.from_interactions(ds, sp.train)
    self.history_mode = history_mode(cfg.data, ds.has_time)
    self.log_q = item_log_q(ds.items[sp.train], ds.num_items)
    self.text = text_setup = _text_setup(cfg, ds)
    text, text_dim = text_setup.vectors, text_setup.dim
    self.live_text = text_setup.encoder is not None

    trained = np.bincount(ds.items[sp.train], minlength=ds.num_items) > 0
    self.item_trained = trained
    # Row 0 is the shared cold row; items own the rows after it (only trained ones, by default).
    owns_row = trained if cfg.model.cold_item_rows == "shared" else np.ones_like(trained)
    catalog = Catalog(num_items=ds.num_items, num_id_rows=int(owns_row.sum()) + 1,
                      id_row=np.where(owns_row, np.cumsum(owns_row), 0).astype(np.int32),
                      features=ds.item_features if cfg.model.use_item_features else {},
                      feature_sizes=ds.item_feature_sizes, text_NxD=text)
    users = Users(num_users=ds.num_users, features=ds.user_features, feature_sizes=ds.user_feature_sizes)
    arrays = {"id_row": catalog.id_row, "features": dict(catalog.features), "text": text,
              "user_features": dict(users.features), "tokens": text_setup.tokens}
    encoder_cfg = text_setup.encoder.config if self.live_text else None
    self.trainable = trainable = trainable_filter(cfg.encoder.mode)
    row_multiple = cfg.model.id_row_multiple
    model_cfg = cfg.model

    def construct(arrays, seed):
      cat = dataclasses.replace(catalog, id_row=arrays["id_row"], features=arrays["features"], text_NxD=arrays["text"])
      usr = dataclasses.replace(users, features=arrays["user_features"])
      return TwoTower(cat, usr, model_cfg, text_dim, encoder_cfg=encoder_cfg, tokens=arrays["tokens"],
                      pooling=cfg.encoder.pooling, row_multiple=row_multiple, rngs=nnx.Rngs(seed))

    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda a: construct(a, 0), arrays)
    self.graphdef, abs_params, abs_tables = nnx.split(abstract, trainable, ...)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abs_params, self.mesh, self.rules))
    table_sh = nnx.to_pure_dict(sharding.state_shardings(abs_tables, self.mesh, self.rules))
    self.tx = optim.make_optimizer(cfg.train, cfg.encoder,
                                   lambda path: any(getattr(p, "key", None) == "text_encoder" for p in path))
    tx = self.tx

    def init(arrays):
      with nnx.use_eager_sharding(False):
        model = construct(arrays, cfg.train.seed)
      _, params, tables = nnx.split(model, trainable, ...)
      params = nnx.to_pure_dict(params)
      return {"params": params, "tables": nnx.to_pure_dict(tables), "opt": tx.init(params),
              "step": jnp.zeros((), jnp.int32)}

    abs_state = jax.eval_shape(init, arrays)
    self.state_shardings = {"params": param_sh, "tables": table_sh,
                            "opt": sharding.like_params(abs_state["opt"], param_sh, self.mesh),
                            "step": sharding.replicated(self.mesh)}
    self._abs_state = abs_state
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self._arrays = arrays
    self.num_params = optim.count_params(abs_state["params"])

    batch_sh = sharding.batch_sharding(self.mesh, 1, self.rules)
    self.batch_shardings = {"user": batch_sh, "item": batch_sh, "log_q": batch_sh,
                            "history": sharding.batch_sharding(self.mesh, 2, self.rules),
                            "history_mask": sharding.batch_sharding(self.mesh, 2, self.rules)}
    if cfg.train.user_weight_power:
      self.batch_shardings["weight"] = batch_sh
    # The item tower (and a live text encoder) runs once per distinct item of the batch, positives
    # and history together, padded to a fixed capacity so the step compiles once; a batch of 256
    # with 10 history items names at most 2,816 items, often far fewer distinct ones.
    multiple = dp * jax.process_count()
    worst = min(ds.num_items, cfg.train.batch_size * (cfg.data.history_len + 1))
    # The catalog softmax runs the item tower on every item, so its batches carry no distinct
    # items (capacity 0: the builder skips np.unique and the slot arrays).
    self.unique_capacity = sharding.round_up(worst, multiple) if cfg.train.negatives == "in_batch" else 0
    # A live encoder is most of the step, so there a batch pads its distinct items only to the
    # smallest of encoder.shape_buckets capacities and its tokens to its longest text's length
    # bucket (one compile per pair met); other modes keep the one worst-case shape.
    buckets = cfg.encoder.shape_buckets if self.live_text else 1
    self.row_buckets = _bucket_ladder(worst, buckets, multiple)
    self.token_width = text_setup.tokens["input_ids"].shape[1] if self.live_text else 0
    self.length_buckets = (tuple(b for b in text_setup.encoder.length_buckets if b < self.token_width)
                           if buckets > 1 else ()) + (self.token_width,)
    # A token stream: the batch's texts end to end, padded only to a bucket of the total (steps of
    # 1/(8 * shape_buckets) of the worst case, every distinct item at the catalog's longest text;
    # that worst case alone at shape_buckets=1).
    self.stream_buckets = ()
    if self.live_text and cfg.encoder.token_stream:
      self.stream_buckets = _bucket_ladder(self.unique_capacity * self.token_width, 8 * buckets if buckets > 1 else 1,
                                           multiple)
    if self.unique_capacity:
      self.batch_shardings.update({"unique_items": batch_sh, "item_slot": batch_sh,
                                   "history_slot": sharding.batch_sharding(self.mesh, 2, self.rules)})
    if self.stream_buckets:
      self.batch_shardings.update({"unique_" + name: batch_sh for name in STREAM_KEYS})
      self.batch_shardings["unique_stream_index"] = sharding.batch_sharding(self.mesh, 2, self.rules)
    elif self.live_text:
      self.batch_shardings.update({"unique_" + name: sharding.batch_sharding(self.mesh, 2, self.rules)
                                   for name in TOKEN_KEYS})
    self._train_step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, self.batch_shardings),
                               out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                               donate_argnums=0)
    # The loop runs train.steps_per_call steps per call: the same step, scanned over stacked batches.
    self.call_shardings = {k: NamedSharding(self.mesh, P(None, *v.spec)) for k, v in self.batch_shardings.items()}
    self._train_call = jax.jit(lambda state, batches: jax.lax.scan(self._step_fn, state, batches),
                               in_shardings=(self.state_shardings, self.call_shardings),
                               out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                               donate_argnums=0)
    self._item_vectors = jax.jit(self._items_fn, out_shardings=sharding.replicated(self.mesh))
    self._query_vectors = jax.jit(self._queries_fn, out_shardings=sharding.replicated(self.mesh))
    self._catalog_text = jax.jit(self._text_fn, out_shardings=sharding.replicated(self.mesh))

  # ---------------------------------------------------------------- pure functions

  def model(self, params: dict, tables: dict) -> TwoTower:
    return nnx.merge(self.graphdef, params, tables)

  def loss_fn(self, params: dict, tables: dict, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    model = self.model(params, tables)
    if self.cfg.train.negatives == "catalog":
      return self._catalog_loss(model, batch, key)
    unique_U = batch["unique_items"]
    text_UxD = None
    if self.stream_buckets:
      text_UxD = model.encode_stream(*(batch["unique_" + name] for name in STREAM_KEYS), batch["unique_stream_index"])
    elif self.live_text:
      text_UxD = model.encode_tokens(*(batch["unique_" + name] for name in TOKEN_KEYS))
    items_UxE = model.items(unique_U, text_UxD, dropout_key=key)
    pos_BxE = items_UxE[batch["item_slot"]]
    q_BxE = model.query_tower(batch["user"], items_UxE[batch["history_slot"]], batch["history_mask"], batch["history"])
    # Rows of both towers' outputs stay with their batch shard; the loss then gathers the
    # positives once so every query meets the global batch's candidates.
    q_BxE = sharding.constrain(q_BxE, self.mesh, ("batch", "tower_out"), self.rules)
    pos_BxE = sharding.constrain(pos_BxE, self.mesh, ("batch", "tower_out"), self.rules)
    loss, aux = losses.in_batch_softmax(
        q_BxE, pos_BxE, batch["item"], model.temperature,
        log_q_B=batch["log_q"] if self.cfg.train.logq_correction else None,
        remove_accidental_hits=self.cfg.train.remove_accidental_hits, weights_B=batch.get("weight"))
    return loss, {"logits_shape": jnp.asarray(aux["logits"].shape)}

  def _catalog_loss(self, model: TwoTower, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    """Full softmax over the catalog: the item tower runs once on every item, positives and history
    are rows of it, and only items with training interactions compete as negatives."""
    items_NxE = model.items(jnp.arange(self.dataset.num_items, dtype=jnp.int32), None, dropout_key=key)
    q_BxE = model.query_tower(batch["user"], items_NxE[jnp.maximum(batch["history"], 0)], batch["history_mask"],
                              batch["history"])
    q_BxE = sharding.constrain(q_BxE, self.mesh, ("batch", "tower_out"), self.rules)
    loss, aux = losses.catalog_softmax(q_BxE, items_NxE, batch["item"], model.temperature,
                                       candidate_mask_N=jnp.asarray(self.item_trained), weights_B=batch.get("weight"))
    return loss, {"logits_shape": jnp.asarray(aux["logits"].shape)}

  def _step_fn(self, state: dict, batch: dict) -> tuple[dict, dict]:
    key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), state["step"])
    (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state["params"], state["tables"], batch, key)
    grad_norm = optax_global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt, grads):
      updates, opt = self.tx.update(grads, opt, params, grad_norm=grad_norm)
      return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), opt

    # A non-finite step leaves the state untouched; the host loop then stops or skips (nan_policy).
    # A cond, not jnp.where(finite, new, old) per leaf: with a select each AdamW moment is read by
    # two fusions while its donated buffer is rewritten, and XLA copies every moment first (348
    # copies, 45 MB more temporaries a step when fine-tuning MiniLM).
    params, opt = jax.lax.cond(finite, update, lambda params, opt, grads: (params, opt),
                               state["params"], state["opt"], grads)
    new_state = {"params": params, "tables": state["tables"], "opt": opt, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, "logits_shape": aux["logits_shape"]}

  def _items_fn(self, params: dict, tables: dict, items_N: jax.Array, text_NxD: jax.Array | None) -> jax.Array:
    return self.model(params, tables).items(items_N, text_NxD)

  def _queries_fn(self, params: dict, tables: dict, users_B, history_BxL, mask_BxL,
                  history_text_BxLxD: jax.Array | None) -> jax.Array:
    return self.model(params, tables).queries(users_B, history_BxL, mask_BxL, history_text_BxLxD)

  def _text_fn(self, params: dict, tables: dict, items_N: jax.Array) -> jax.Array:
    return self.model(params, tables).encode_text(items_N)

  # ---------------------------------------------------------------- state

  def init_state(self) -> dict:
    """Fresh state, with the pretrained encoder's weights when the encoder is part of the model."""
    state = self._init(self._arrays)
    if self.live_text:
      pretrained = nnx.to_pure_dict(nnx.state(self.text.encoder.module))
      for group in ("params", "tables"):
        if "text_encoder" in state[group]:
          state[group]["text_encoder"] = _take_like(state[group]["text_encoder"], pretrained, "text_encoder")
    return state

  def abstract_state(self) -> Any:
    """Shapes, dtypes and target shardings of the train state: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self._abs_state,
                        self.state_shardings)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global batch arrays ([B, ...], or [K, B, ...] stacked for a call)."""
    stacked = batch["user"].ndim == 2
    shardings = self.call_shardings if stacked else self.batch_shardings
    if jax.process_count() == 1:  # one device_put of the whole dict: cheapest on a single host
      return jax.device_put(batch, {k: shardings[k] for k in batch})
    return {k: _process_local(shardings[k], v, stacked) for k, v in batch.items()}

  def batch_builder(self) -> BatchBuilder:
    return BatchBuilder(self.train_seqs, self.log_q, self.cfg.train.batch_size, self.cfg.data.history_len,
                        self.cfg.train.seed, jax.process_index(), jax.process_count(),
                        unique_capacity=self.unique_capacity, history=self.history_mode, row_buckets=self.row_buckets,
                        tokens=self.text.tokens, length_buckets=self.length_buckets,
                        user_weight_power=self.cfg.train.user_weight_power,
                        history_dropout=self.cfg.data.history_dropout, stream_buckets=self.stream_buckets)

  def batch_shape(self, batch: dict) -> tuple[int, ...]:
    """(distinct-item rows, tokens) of a global batch, single or stacked: its compiled shape; with
    a token stream (distinct-item rows, stream tokens, text length)."""
    if "unique_items" not in batch:
      return 0, 0
    processes = 1 if isinstance(batch["unique_items"], jax.Array) else jax.process_count()
    rows = batch["unique_items"].shape[-1] * processes
    if self.stream_buckets:
      return rows, batch["unique_input_ids"].shape[-1] * processes, batch["unique_stream_index"].shape[-1]
    return rows, batch["unique_input_ids"].shape[-1] if self.live_text else 0

  @property
  def worst_shape(self) -> tuple[int, ...]:
    if self.stream_buckets:
      return self.unique_capacity, self.stream_buckets[-1], self.token_width
    return self.unique_capacity, self.token_width

  def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
    return self._train_step(state, batch)

  def train_call(self, state: dict, batches: dict) -> tuple[dict, dict]:
    """K steps in one call over batches stacked ``[K, B, ...]``; metrics come back ``[K]``."""
    return self._train_call(state, batches)

  # ---------------------------------------------------------------- evaluation

  def _chunked(self, fn, state: dict, n: int, chunk: int, *extra) -> jax.Array:
    """``fn(params, tables, ids, *extra[ids])`` over 0..n-1 in fixed-size chunks (one compile)."""
    outs = []
    for start in range(0, n, chunk):
      ids = np.arange(start, min(start + chunk, n), dtype=np.int32)
      ids = np.pad(ids, (0, chunk - len(ids))) if n > chunk else ids
      args = [None if x is None else x[ids] for x in extra]
      outs.append(fn(state["params"], state["tables"], ids, *args)[:min(chunk, n - start)])
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]

  def catalog_text(self, state: dict) -> jax.Array | None:
    """Text vectors [N, D] of every item through the (fine-tuned) live encoder; None when frozen."""
    if not self.live_text:
      return None
    return self._chunked(self._catalog_text, state, self.dataset.num_items, self.cfg.encoder.batch_size)

  def item_vectors(self, state: dict, chunk: int = 4096, text_NxD: jax.Array | None = None) -> jax.Array:
    """All catalog item vectors [N, E] (float32, replicated)."""
    if self.live_text and text_NxD is None:
      text_NxD = self.catalog_text(state)
    return self._chunked(self._item_vectors, state, self.dataset.num_items, chunk, text_NxD)

  def query_vectors(self, state: dict, users: np.ndarray, known: Sequences,
                    text_NxD: jax.Array | None = None) -> jax.Array:
    history, mask = known.query_history(users, self.cfg.data.history_len, self.history_mode, self.cfg.train.seed)
    history_text = None if text_NxD is None else text_NxD[np.maximum(history, 0)]
    return self._query_vectors(state["params"], state["tables"], users.astype(np.int32), history, mask, history_text)

  def evaluate(self, state: dict, split: str | None = None) -> dict[str, float]:
    """Full-catalog ranking of every user with held-out items, known items excluded."""
    from jaxrec.retrieval import topk
    split = split or self.cfg.eval.split
    ds, sp = self.dataset, self.split
    held = sp.test if split == "test" else sp.valid
    known_idx = np.concatenate([sp.train, sp.valid]) if split == "test" else sp.train
    known = Sequences.from_interactions(ds, known_idx)
    truth_order = np.lexsort((ds.items[held], ds.users[held]))
    truth_users, truth_items = ds.users[held][truth_order], ds.items[held][truth_order]
    eval_users = np.unique(truth_users)
    if self.cfg.eval.max_users:
      eval_users = eval_users[:self.cfg.eval.max_users]
    kmax = max(self.cfg.eval.ks)
    cold = sp.cold_items
    groups = {"warm": ~cold, "cold": cold} if cold.any() else {}
    model_acc = metrics.RankingAccumulator(self.cfg.eval.ks, ds.num_items, groups)
    pop_acc = metrics.RankingAccumulator(self.cfg.eval.ks, ds.num_items, groups)
    text_NxD = self.catalog_text(state)
    corpus_NxE = self.item_vectors(state, text_NxD=text_NxD)
    popularity_Nx1 = jnp.asarray(np.bincount(ds.items[sp.train], minlength=ds.num_items).astype(np.float32)[:, None])
    bs = self.cfg.eval.batch_size
    bs = min(bs, len(eval_users))
    # A dense [B, N] mask is the cheapest exclusion while it is small; long id lists cost the
    # kernel more than a mask of a few thousand items.
    use_mask = bs * ds.num_items <= 1 << 26
    for start in range(0, len(eval_users), bs):
      users = eval_users[start:start + bs]
      n = len(users)
      padded = np.pad(users, (0, bs - n), mode="edge")  # fixed batch shape: one compile per run
      seen = _padded_rows(known, padded)
      if use_mask:
        mask = np.zeros((bs, ds.num_items), bool)
        rows, cols = np.nonzero(seen >= 0)
        mask[rows, seen[rows, cols]] = True
        seen = mask
      lo, hi = np.searchsorted(truth_users, [users[0], users[-1] + 1])
      t_users, t_items = truth_users[lo:hi], truth_items[lo:hi]
      q_BxE = self.query_vectors(state, padded, known, text_NxD)
      _, ids = topk(q_BxE, corpus_NxE, kmax, exclude=seen)
      candidates = ds.num_items - (known.start[users + 1] - known.start[users])
      model_acc.add(np.asarray(ids)[:n], users, t_users, t_items, candidates)
      _, pop_ids = topk(jnp.ones((bs, 1), jnp.float32), popularity_Nx1, kmax, exclude=seen)
      pop_acc.add(np.asarray(pop_ids)[:n], users, t_users, t_items)
    out = model_acc.result()
    out.update({f"popularity/{k}": v for k, v in pop_acc.result().items()})
    return out

  def build_index(self, state: dict, step: int):
    """The serving artifact: every item's vector, and every user's query vector and known items."""
    from jaxrec.retrieval import ItemIndex
    ds, sp = self.dataset, self.split
    known = Sequences.from_interactions(ds, np.concatenate([sp.train, sp.valid]))
    users = np.arange(ds.num_users, dtype=np.int32)
    bs = self.cfg.eval.batch_size
    text_NxD = self.catalog_text(state)
    user_vectors = np.concatenate([np.asarray(self.query_vectors(state, users[i:i + bs], known, text_NxD))
                                   for i in range(0, len(users), bs)])
    return ItemIndex(np.asarray(self.item_vectors(state, text_NxD=text_NxD)), ds.item_raw_ids, list(ds.item_titles),
                     metadata={"config_hash": config_hash(self.cfg), "step": int(step), "dataset": ds.name,
                               "model": "two_tower", "text_encoder": self.cfg.encoder.path or "all-MiniLM-L6-v2"
                               if self.cfg.model.use_text else "none"},
                     user_vectors=user_vectors, user_ids=ds.user_raw_ids,
                     user_seen=(known.start.astype(np.int64), known.items.astype(np.int64)))

  def restore(self, step: int | None = None) -> tuple[int, dict]:
    """The train state of a saved step of this workdir (default: the newest readable one)."""
    ckpt = Checkpointer(os.path.join(os.path.abspath(self.cfg.workdir), "checkpoints"), self.cfg.checkpoint)
    try:
      saved = ckpt.steps()
      if step is not None and step not in saved:
        raise CheckpointError(f"no checkpoint of step {step} in {ckpt.directory}; saved steps: "
                              f"{', '.join(map(str, saved)) or 'none'}")
      step, state, _ = ckpt.restore(self.abstract_state(), step=step)
    finally:
      ckpt.close()
    return step, state

  # ---------------------------------------------------------------- loop

  @holding_workdir_lock
  def run(self, resume: bool = True, resume_with_changes: bool = False) -> dict[str, Any]:
    """Trains (resuming this workdir's run when there is one), evaluates, exports the index and
    writes ``metrics.json``. ``resume_with_changes`` lets a resumed run go on with changed
    optimisation settings (``config_diff.ADJUSTABLE``); other changes are always refused."""
    cfg = self.cfg
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    state, start_step, data_iter, history = self._restore_or_init(ckpt, resume, resume_with_changes)
    log.info("model: %s parameters; mesh %s; %d training examples", f"{self.num_params:,}", dict(self.mesh.shape),
             len(self.train_seqs))
    # Compile ahead of time so the per-device memory is known before the first step runs: the
    # worst-case shape up front, any smaller bucket shape when a batch first needs it.
    k = cfg.train.steps_per_call
    abstract_state, executables, shape_flops = self.abstract_like(state), {}, {}

    def executable(shape, steps=k):  # steps < K only for the last call of a run whose length K does not divide
      if (steps, shape) not in executables:
        started = time.perf_counter()
        traced = self._train_call.trace(abstract_state, self.abstract_batch(steps, shape))
        executables[steps, shape] = traced.lower().compile()
        shape_flops[steps, shape] = jaxpr_matmul_flops(traced.jaxpr) / steps
        if len(executables) > 1:
          log.info("train step compiled for %d steps of shape %s (%s) in %.1f s", steps, shape,
                   "distinct items, stream tokens, text length" if self.stream_buckets else "distinct items, tokens",
                   time.perf_counter() - started)
      return executables[steps, shape]

    log.info("compiling the train step (%d step%s a call)", k, "s" if k > 1 else "")
    memory = executable(self.worst_shape).memory_analysis()
    if memory is not None:
      log.info("train step compiled: %.1f MiB temporaries, %.1f MiB arguments per device",
               memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20)
    if (cfg.train.steps - start_step) % k:  # the shorter last call, compiled before the clock starts too
      executable(self.worst_shape, (cfg.train.steps - start_step) % k)

    writer = _summary_writer(os.path.join(workdir, "tb")) if is_main else None
    progress = _progress(cfg, start_step) if is_main else None
    best = Checkpointer(os.path.join(workdir, "checkpoints", "best"), cfg.checkpoint, cfg.checkpoint.best_metric) \
        if cfg.checkpoint.best_metric else None
    stop_signal = _SignalFlag()
    pending = None  # (step, device metrics) of the step dispatched last, read one step late
    flops_done = 0.0
    profiler = _Profiler(os.path.join(workdir, "profile"), start_step + 3 * k, 5 * k) if cfg.train.profile and is_main else None
    timer_start, examples, data_wait = time.perf_counter(), 0, 0.0
    every = cfg.checkpoint.every
    if start_step < cfg.train.steps:
      log.info("training steps %d-%d, batch %d", start_step + 1, cfg.train.steps, cfg.train.batch_size)
    try:
      for step in range(start_step, cfg.train.steps, k):
        if profiler is not None:
          profiler.at(step)
        waited = time.perf_counter()
        batches = next(data_iter)
        data_wait += time.perf_counter() - waited
        shape, steps = self.batch_shape(batches), min(k, cfg.train.steps - step)
        state, call_metrics = executable(shape, steps)(state, batches)
        flops_done += steps * shape_flops[steps, shape]
        examples += steps * cfg.train.batch_size
        if pending is not None:
          self._record(*pending, history, writer, progress, ckpt)
        pending = (step, call_metrics)
        done = step + steps
        interrupted = stop_signal.raised is not None
        validate = bool(cfg.train.eval_every) and done % cfg.train.eval_every == 0 and done < cfg.train.steps
        save = interrupted or (every and done % every == 0 and done < cfg.train.steps)
        if validate or save:  # both need the loss history up to ``done``
          self._record(*pending, history, writer, progress, ckpt)
          pending = None
        if validate:
          self._validate(done, state, data_iter, history, writer, best)
        if save:
          ckpt.save(done, state, data_iter, to_json(cfg), history, force=interrupted)
        if interrupted:
          ckpt.close()
          raise TrainingStopped(f"received {stop_signal.raised}; saved checkpoint at step {done} in "
                                f"{ckpt.directory}; rerun the same command to resume", EXIT_PREEMPTED)
      if pending is not None:
        self._record(*pending, history, writer, progress, ckpt)
      jax.block_until_ready(state)
      elapsed = time.perf_counter() - timer_start
      if profiler is not None:
        profiler.stop()
      if cfg.train.steps > start_step or ckpt.latest_step() is None:
        ckpt.save(cfg.train.steps, state, data_iter, to_json(cfg), history, force=True)
    except BaseException:
      stop_signal.restore()
      raise
    finally:
      if progress is not None:
        progress.close()
      ckpt.close()
      if best is not None:
        best.close()

    # SIGTERM/SIGINT stays a flag through evaluation and export: the final checkpoint is saved by
    # now, so a preempted run stops between phases with exit 75 and its rerun only evaluates.
    try:
      return self._finish(state, history, stop_signal, start_step, elapsed, examples, data_wait, flops_done, writer)
    finally:
      stop_signal.restore()

  def _finish(self, state, history, stop_signal, start_step, elapsed, examples, data_wait, flops_done,
              writer) -> dict[str, Any]:
    """After the last step: final evaluation, the item index, metrics.json and config.json."""
    cfg = self.cfg
    workdir = os.path.abspath(cfg.workdir)
    is_main = jax.process_index() == 0

    def stop_if_signalled(phase):
      if stop_signal.raised is not None:
        raise TrainingStopped(f"received {stop_signal.raised} {phase}; the final checkpoint (step {cfg.train.steps}) "
                              f"is saved; rerun the same command to evaluate and export", EXIT_PREEMPTED)

    stop_if_signalled("after training")
    # Bucketed shapes differ in work: the mean over the steps run, not the worst case's.
    flops_per_step = flops_done / max(cfg.train.steps - start_step, 1)
    ms_per_step = 0.0
    if elapsed > 0 and cfg.train.steps > start_step:
      steps_done = cfg.train.steps - start_step
      ms_per_step = 1e3 * elapsed / steps_done
      log.info("%.2f ms/step: %.1f%% waiting for data, the rest dispatching/computing; %.3f TFLOP/s achieved",
               ms_per_step, 100 * data_wait / elapsed, flops_per_step * steps_done / elapsed / 1e12)
    log.info("final parameter checksum %s", parameter_checksum(state["params"]))
    log.info("evaluating on the %s split", cfg.eval.split)
    result = self.evaluate(state)
    stop_if_signalled("during the final evaluation")
    result.update(sources_describe(self.dataset, self.split))
    result.update({
        "steps": cfg.train.steps,
        "train/final_loss": history[-1] if history else float("nan"),
        "train/losses": history,
        "train/examples_per_sec": examples / elapsed if elapsed > 0 and examples else 0.0,
        "train/data_wait_fraction": data_wait / elapsed if elapsed > 0 else 0.0,
        "train/ms_per_step": ms_per_step,
        **_utilisation(flops_per_step, (cfg.train.steps - start_step) / elapsed if elapsed > 0 else 0.0, self.mesh),
        "protocol": f"{self.split.protocol}; full ranking of {self.dataset.num_items} items, the user's known items "
                    f"excluded; evaluated on {cfg.eval.split}",
        "model/params": self.num_params,
    })
    log.info("building the item index")
    index = self.build_index(state, cfg.train.steps)
    if is_main:
      index.save(os.path.join(workdir, "index"))
      log.info("wrote %s", os.path.join(workdir, "index"))
      write_json_atomically(os.path.join(workdir, "metrics.json"), result)
      write_atomically(os.path.join(workdir, "config.json"), to_json(cfg))
      if writer is not None:
        for key, value in result.items():
          if isinstance(value, float):
            writer.add_scalar("eval/" + key.replace("@", "_at_"), value, cfg.train.steps)
        writer.close()
    self.state = state
    return result

  def _validate(self, step: int, state: dict, data_iter, history, writer, best) -> None:
    """Validation metrics mid-training; with checkpoint.best_metric, keeps the best step's state."""
    metrics_ = self.evaluate(state, "valid")
    log.info("step %d validation: %s", step, ", ".join(f"{k}={metrics_[k]:.4f}" for k in ("recall@10", "ndcg@10")
                                                     if k in metrics_))
    if writer is not None:
      for key, value in metrics_.items():
        if isinstance(value, float) and not key.startswith("popularity/"):
          writer.add_scalar("valid/" + key.replace("@", "_at_"), value, step)
    if best is not None:
      if self.cfg.checkpoint.best_metric not in metrics_:
        raise ValueError(f"checkpoint.best_metric={self.cfg.checkpoint.best_metric!r} is not a validation metric "
                         f"(e.g. {', '.join(sorted(metrics_)[:4])})")
      best.save(step, state, data_iter, to_json(self.cfg), history, metrics={k: float(v) for k, v in metrics_.items()
                                                                              if isinstance(v, (int, float))})

  def _record(self, first_step, call_metrics, history, writer, progress, ckpt) -> None:
    """Host side of one finished call (``[K]`` metrics of K steps)."""
    host = jax.device_get({k: call_metrics[k] for k in ("loss", "finite", "grad_norm")})
    for i in range(len(host["loss"])):
      self._record_step(first_step + i, {k: v[i] for k, v in host.items()}, history, writer, progress, ckpt)

  def _record_step(self, step, step_metrics, history, writer, progress, ckpt) -> None:
    """Host side of one finished step: NaN policy, loss history, progress bar, TensorBoard."""
    loss = float(step_metrics["loss"])
    done = step + 1
    if not bool(step_metrics["finite"]):
      if self.cfg.train.nan_policy == "stop":
        last = ckpt.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}" if last is not None else
                "no checkpoint was saved before it")
        raise TrainingStopped(f"loss is {loss} at step {done}; training stopped (train.nan_policy=stop); {kept}",
                              EXIT_NONFINITE)
      log.warning("non-finite loss at step %d: update skipped (train.nan_policy=skip)", done)
    history.append(loss)
    log_now = done % max(self.cfg.train.log_every, 1) == 0 or done == self.cfg.train.steps
    if progress is not None:
      progress.update(1)
      if log_now:
        rate = progress.format_dict.get("rate") or 0.0
        progress.set_postfix(loss=f"{loss:.4f}", examples_per_s=f"{rate * self.cfg.train.batch_size:,.0f}")
    if writer is not None and log_now:
      writer.add_scalar("train/loss", loss, done)
      writer.add_scalar("train/grad_norm", float(step_metrics["grad_norm"]), done)

  def _restore_or_init(self, ckpt: Checkpointer, resume: bool, resume_with_changes: bool = False):
    """Restore order: this workdir's latest checkpoint, then checkpoint.resume_from, then scratch
    (with the pretrained text encoder's vectors when the model uses text)."""
    data_iter = iter(train_batches(self.batch_builder(), 0, self.cfg.train.steps, to_device=self.put_batch,
                                   steps_per_call=self.cfg.train.steps_per_call, num_threads=self.cfg.data.num_threads))
    if resume and ckpt.latest_step() is not None:
      check_resumable(self.cfg, ckpt, resume_with_changes)
      step, state, history = ckpt.restore(self.abstract_state(), data_iter, move_damaged_aside=True)
      log.info("resuming from checkpoint step %d in %s", step, ckpt.directory)
      return state, step, data_iter, history[:step]
    if self.cfg.checkpoint.resume_from:
      other = Checkpointer(self.cfg.checkpoint.resume_from, self.cfg.checkpoint)
      try:
        step, state, _ = other.restore(self.abstract_state())
      finally:
        other.close()
      log.info("initialised from %s (step %d); data and step counter start fresh", self.cfg.checkpoint.resume_from, step)
      state = dict(state, step=jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"]))
      return state, 0, data_iter, []
    log.info("starting from scratch%s", " with the pretrained text encoder's catalog vectors" if self.cfg.model.use_text else "")
    return self.init_state(), 0, data_iter, []

  def abstract_like(self, state: dict) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

  def abstract_batch(self, steps_per_call: int | None = None, shape: tuple[int, ...] | None = None) -> dict:
    """Abstract global batch of ``shape`` (``batch_shape``'s; default the worst case);
    with ``steps_per_call`` K, K of them stacked for one call."""
    b, l = self.cfg.train.batch_size, self.cfg.data.history_len
    shape = shape or self.worst_shape
    rows, length = shape[0], shape[1]
    shapes = {"user": ((b,), jnp.int32), "item": ((b,), jnp.int32), "log_q": ((b,), jnp.float32),
              "history": ((b, l), jnp.int32), "history_mask": ((b, l), jnp.bool_)}
    if self.cfg.train.user_weight_power:
      shapes["weight"] = ((b,), jnp.float32)
    if self.unique_capacity:
      shapes.update({"unique_items": ((rows,), jnp.int32), "item_slot": ((b,), jnp.int32),
                     "history_slot": ((b, l), jnp.int32)})
    if self.stream_buckets:
      shapes.update({"unique_" + name: ((length,), jnp.int32) for name in STREAM_KEYS})
      shapes["unique_stream_index"] = ((rows, shape[2]), jnp.int32)
    elif self.live_text:
      shapes.update({"unique_" + name: ((rows, length), jnp.int32) for name in TOKEN_KEYS})
    if steps_per_call is None:
      return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_shardings[k]) for k, (s, d) in shapes.items()}
    return {k: jax.ShapeDtypeStruct((steps_per_call, *s), d, sharding=self.call_shardings[k])
            for k, (s, d) in shapes.items()}


def _bucket_ladder(worst: int, count: int, multiple: int) -> tuple[int, ...]:
  """Shape buckets ``worst * i / count`` for i = 1..count, each rounded up to ``multiple``."""
  return tuple(sorted({sharding.round_up(-(-worst * i // count), multiple) for i in range(1, count + 1)}))


def _process_local(sharding_: NamedSharding, local: np.ndarray, stacked: bool) -> jax.Array:
  """A global array from this process's rows; rows are the batch axis (axis 1 when stacked)."""
  if not stacked:
    return jax.make_array_from_process_local_data(sharding_, local)
  shape = list(local.shape)
  shape[1] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding_, local, tuple(shape))


def config_hash(cfg: Config) -> str:
  import hashlib
  return hashlib.sha256(to_json(cfg).encode()).hexdigest()[:16]


# Dense peak FLOP/s per chip for the MFU estimate (bf16 for accelerators); CPUs have no fixed
# peak, so on CPU only the achieved FLOP/s is reported.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12}


def _utilisation(flops_per_step: float, steps_per_sec: float, mesh) -> dict[str, float]:
  achieved = flops_per_step * steps_per_sec
  out = {"train/step_tflops": flops_per_step / 1e12, "train/achieved_tflops_per_sec": achieved / 1e12}
  kind = mesh.devices.flat[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), 0.0)
  if peak:
    out["train/mfu"] = achieved / (peak * mesh.size)
  return out


class _Profiler:
  """A jax.profiler trace of ``num_steps`` steps starting at ``first`` (open it with TensorBoard or Perfetto)."""

  def __init__(self, directory: str, first: int, num_steps: int):
    self.directory, self.first, self.last, self.active = directory, first, first + num_steps, False

  def at(self, step: int) -> None:
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True
      log.info("profiling steps %d-%d into %s", self.first, self.last - 1, self.directory)
    elif step == self.last:
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def parameter_checksum(params: Any) -> str:
  """A digest of every parameter's full value as this process sees it (gathered across processes)."""
  import hashlib
  from jax.experimental import multihost_utils
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = multihost_utils.process_allgather(leaf, tiled=True) if jax.process_count() > 1 else np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]


def optax_global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _padded_rows(seqs: Sequences, users: np.ndarray) -> np.ndarray:
  """Each user's known items as a [B, M] array padded with -1 (the top-k kernel's exclude form)."""
  starts, ends = seqs.start[users], seqs.start[users + 1]
  width = max(int((ends - starts).max(initial=0)), 1)
  offsets = starts[:, None] + np.arange(width)[None, :]
  valid = offsets < ends[:, None]
  return np.where(valid, seqs.items[np.minimum(offsets, max(len(seqs.items) - 1, 0))], -1).astype(np.int32)


def sources_describe(dataset: Dataset, split: Split) -> dict[str, Any]:
  describe = getattr(sources, "describe", None)
  if describe is not None:
    return describe(dataset, split)
  return {"data/users": dataset.num_users, "data/items": dataset.num_items,
          "data/interactions": dataset.num_interactions, "data/train": int(len(split.train)),
          "data/valid": int(len(split.valid)), "data/test": int(len(split.test)),
          "data/cold_items": int(split.cold_items.sum())}


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries."""

  def __init__(self):
    self.raised = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass

  def _handle(self, signum, frame):
    self.raised = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _progress(cfg: Config, start: int):
  if not cfg.train.progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _summary_writer(path: str):
  from tensorboardX import SummaryWriter
  return SummaryWriter(path)


def train(cfg: Config, *, resume_with_changes: bool = False) -> dict[str, Any]:
  """Public API: trains ``cfg``, evaluates, writes ``cfg.workdir``; returns the final metrics.

  A workdir with checkpoints resumes them; a changed config is refused unless its changes are
  safe (``resume_with_changes=True`` for optimisation settings, see ``jaxrec.config_diff``)."""
  _show_progress_logs()
  checkpoints = os.path.join(os.path.abspath(cfg.workdir), "checkpoints")
  if os.path.isdir(checkpoints):  # refuse a different experiment before loading data and compiling
    ckpt = Checkpointer(checkpoints, cfg.checkpoint)
    try:
      check_resumable(cfg, ckpt, resume_with_changes, announce=False)
    finally:
      ckpt.close()
  return Trainer(cfg).run(resume_with_changes=resume_with_changes)


def check_resumable(cfg: Config, ckpt: Checkpointer, resume_with_changes: bool, announce: bool = True) -> None:
  """Refuses to resume a different experiment (the newest step whose config reads is the reference)."""
  for step in sorted(ckpt.steps(), reverse=True):
    try:
      saved = ckpt.saved_config(step)
    except Exception:  # a damaged step: restore reports it and falls back
      continue
    diff = ConfigDiff.between(saved, cfg)
    changed = diff.check_resume(cfg.workdir, resume_with_changes)
    if changed and announce:
      log.info("resuming with changed settings: %s", diff.describe(changed, 20))
    return


def _show_progress_logs() -> None:
  """Python's default shows warnings only, so a ``jaxrec.train`` call would sit silent through loading,
  encoding and compiling; unless the program set jaxrec's (or the root) level itself, jaxrec's own
  logger passes its phase lines on, to a stderr handler of its own when no handler exists."""
  jaxrec_log = logging.getLogger("jaxrec")
  if jaxrec_log.getEffectiveLevel() <= logging.INFO:
    return
  jaxrec_log.setLevel(logging.INFO)
  if not logging.getLogger().handlers and not jaxrec_log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jaxrec %(message)s", datefmt="%H:%M:%S"))
    jaxrec_log.addHandler(handler)

def evaluate(cfg: Config, step: int | None = None, split: str | None = None) -> dict[str, Any]:
  """Public API: full-ranking metrics of a saved checkpoint of ``cfg.workdir`` (on the devices present)."""
  trainer = Trainer(mesh_fitting_devices(cfg))
  step, state = trainer.restore(step)
  return dict(trainer.evaluate(state, split), step=step)
