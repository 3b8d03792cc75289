"""The train state, the loss and the train step: pure module-level functions, jitted once with
explicit shardings and a donated state.

The state is a plain pytree ``{"params", "tables", "opt", "step"}`` of pure dicts: ``params``
are the trained weights, ``tables`` the model's constants (see ``recommender.py``), ``opt`` the
optax state; with ``encoder.mode=adalora`` also ``adalora``, the rank allocator's state
(``adalora.Allocator.init``). Everything static that the step needs travels in one ``StepSpec``.

Dimension legend: B global batch, L history length, U distinct items of a batch, M mixed
negatives, N catalog items, D text width, E tower output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrec import adalora, losses, optim, sharding
from jaxrec.batch import BatchLayout
from jaxrec.config import Config
from jaxrec.models.encoder import AdaLoRAParam
from jaxrec.models.two_tower import TwoTower
from jaxrec.recommender import Recommender


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
  """What the step needs besides the state and the batch."""

  graphdef: Any  # the model's nnx graph (merged with params and tables)
  tx: optax.GradientTransformationExtraArgs
  layout: BatchLayout
  negatives: str  # in_batch | catalog
  logq_correction: bool
  remove_accidental_hits: bool
  seed: int
  candidates_N: np.ndarray  # bool [N]: items that may compete in the catalog softmax (those trained on)
  allocator: adalora.Allocator | None = None  # encoder.mode=adalora: the rank allocator

  @classmethod
  def of(cls, recommender: Recommender, tx: optax.GradientTransformationExtraArgs, layout: BatchLayout) -> "StepSpec":
    train = recommender.cfg.train
    return cls(graphdef=recommender.graphdef, tx=tx, layout=layout, negatives=train.negatives,
               logq_correction=train.logq_correction, remove_accidental_hits=train.remove_accidental_hits,
               seed=train.seed, candidates_N=recommender.item_trained, allocator=allocator_of(recommender))


def allocator_of(recommender: Recommender) -> adalora.Allocator | None:
  """AdaLoRA's allocator for the model's AdaLoRA adapters (found by their Variable type); None in
  every other mode, and when the model carries no live encoder."""
  cfg = recommender.cfg
  if cfg.encoder.mode != "adalora":
    return None
  found = []

  def find(params, tables):  # the paths are static: recorded while tracing shapes
    model = nnx.merge(recommender.graphdef, params, tables)
    found.extend((path[:-1], v.get_value().shape[0]) for path, v in nnx.to_flat_state(nnx.state(model, AdaLoRAParam))
                 if path[-1] == "e")
    return 0

  abstract = recommender.abstract_params()
  jax.eval_shape(find, abstract["params"], abstract["tables"])
  if not found:
    return None
  enc = cfg.encoder
  return adalora.Allocator(groups=tuple(p for p, _ in found), ranks=tuple(r for _, r in found),
                           target_rank=enc.adalora_target_rank, tinit=enc.adalora_tinit, tfinal=enc.adalora_tfinal,
                           total_steps=cfg.train.steps, delta_t=enc.adalora_delta_t, beta1=enc.adalora_beta1,
                           beta2=enc.adalora_beta2, orth_reg=enc.adalora_orth_reg, clip_norm=cfg.train.clip_norm)


def make_optimizer(cfg: Config) -> optax.GradientTransformationExtraArgs:
  return optim.make_optimizer(cfg.train, cfg.encoder,
                              lambda path: any(getattr(p, "key", None) == "text_encoder" for p in path))


# ------------------------------------------------------------------ state

def _abstract_allocator_state(allocator: adalora.Allocator, abstract_params: dict) -> dict:
  return jax.eval_shape(lambda params: allocator.init(allocator.adapters(params)), abstract_params)


def state_shardings(recommender: Recommender, tx: optax.GradientTransformationExtraArgs) -> dict:
  params = recommender.param_shardings
  abstract_opt = jax.eval_shape(tx.init, recommender.abstract_params()["params"])
  out = {"params": params, "tables": recommender.table_shardings,
         "opt": sharding.like_params(abstract_opt, params, recommender.mesh),
         "step": sharding.replicated(recommender.mesh)}
  allocator = allocator_of(recommender)
  if allocator is not None:  # the EMAs and the mask shard like the adapter entries they score
    abstract = _abstract_allocator_state(allocator, recommender.abstract_params()["params"])
    out["adalora"] = sharding.like_params(abstract, params, recommender.mesh)
  return out


def abstract_state(recommender: Recommender, tx: optax.GradientTransformationExtraArgs) -> dict:
  """Shapes, dtypes and target shardings of the train state: the restore target."""
  model = recommender.abstract_params()
  shapes = {**model, "opt": jax.eval_shape(tx.init, model["params"]), "step": jax.ShapeDtypeStruct((), jnp.int32)}
  allocator = allocator_of(recommender)
  if allocator is not None:
    shapes["adalora"] = _abstract_allocator_state(allocator, model["params"])
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      state_shardings(recommender, tx))


def init_state(recommender: Recommender, tx: optax.GradientTransformationExtraArgs, seed: int) -> dict:
  """A fresh train state on the mesh (a live encoder's weights from its pretrained checkpoint)."""
  params, tables = recommender.init_params(seed)
  shardings = state_shardings(recommender, tx)
  opt = jax.jit(tx.init, out_shardings=shardings["opt"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  state = {"params": params, "tables": tables, "opt": opt, "step": step}
  allocator = allocator_of(recommender)
  if allocator is not None:
    init = jax.jit(lambda p: allocator.init(allocator.adapters(p)), out_shardings=shardings["adalora"])
    state["adalora"] = init(params)
  return state


# ------------------------------------------------------------------ loss and step

def loss_fn(params: dict, tables: dict, batch: dict, key: jax.Array, spec: StepSpec) -> tuple[jax.Array, dict]:
  """The batch's retrieval loss and ``{"logits_shape"}``.

  With ``train.mixed_negatives`` M > 0 each query also scores the batch's M sampled negatives
  (rows of the same item-tower pass as the positives, so the logits are [B, B + M]). Their
  columns, like the positives', are corrected by the logQ of the mixture the candidates come from,
  ``q_j = (B * p_data(j) + M * p_sampler(j)) / (B + M)`` (``data.pipeline.item_log_q``), and a
  sampled negative equal to a row's positive is masked for that row as an accidental hit.
  """
  model: TwoTower = nnx.merge(spec.graphdef, params, tables)
  layout = spec.layout
  mesh, rules = layout.mesh, dict(layout.rules)
  if spec.negatives == "catalog":
    return _catalog_loss(model, batch, key, spec)
  text = layout.text_inputs(batch)
  text_UxD = None if text is None else model.text_vectors(text)
  items_UxE = model.items(batch["unique_items"], text_UxD, dropout_key=key)
  if layout.query == "transformer":
    return _next_item_loss(model, batch, items_UxE, key, spec)
  pos_BxE = items_UxE[batch["item_slot"]]
  q_BxE = _queries(model, batch, lambda: items_UxE[batch["history_slot"]])
  # Rows of both towers' outputs stay with their batch shard; the loss then gathers the
  # positives once so every query meets the global batch's candidates.
  q_BxE = sharding.constrain(q_BxE, mesh, ("batch", "tower_out"), rules)
  pos_BxE = sharding.constrain(pos_BxE, mesh, ("batch", "tower_out"), rules)
  extra = {}
  if layout.mixed_negatives:
    neg_MxE = sharding.constrain(items_UxE[batch["negative_slot"]], mesh, ("batch", "tower_out"), rules)
    extra = {"extra_NxE": neg_MxE, "extra_ids_N": batch["negative"], "extra_log_q_N": batch["negative_log_q"]}
  loss, aux = losses.in_batch_softmax(
      q_BxE, pos_BxE, batch["item"], model.temperature, log_q_B=batch["log_q"] if spec.logq_correction else None,
      remove_accidental_hits=spec.remove_accidental_hits, weights_B=batch.get("weight"), **extra)
  return loss, {"logits_shape": jnp.asarray(aux["logits"].shape)}


def _queries(model: TwoTower, batch: dict, history_BxLxE) -> jax.Array:
  """The batch's queries [B, E]: the history's item-tower rows (``history_BxLxE()``) pooled, or
  with ``model.query=text`` the encoder's vector of its titles (built from the history ids here,
  with the item tower's encoder weights in lora/full, so their gradients meet)."""
  if model.query_text:
    return model.queries(batch["user"], batch["history"], batch["history_mask"])
  return model.query_tower(batch["user"], history_BxLxE(), batch["history_mask"], batch["history"])


def _next(values_BxL: jax.Array, last_B: jax.Array) -> jax.Array:
  """What each history slot predicts: the next slot's item, and after the last slot the batch's
  positive. History is left-padded, so a real slot's next item is always real."""
  return jnp.concatenate([values_BxL[:, 1:], last_B[:, None]], axis=1)


def _slot_weights(batch: dict) -> jax.Array:
  """[B * L]: 1 for each real history slot (times the example's weight), 0 for padding."""
  weights_BxL = batch["history_mask"].astype(jnp.float32)
  if "weight" in batch:
    weights_BxL = weights_BxL * batch["weight"][:, None]
  return weights_BxL.reshape(-1)


def _sequence_queries(model: TwoTower, batch: dict, history_BxLxE: jax.Array, key: jax.Array,
                      spec: StepSpec) -> jax.Array:
  """The transformer's query at every slot, flattened [B * L, E] and kept with its batch shard."""
  q_BxLxE = model.query_tower.sequence_queries(batch["user"], history_BxLxE, batch["history_mask"],
                                               dropout_key=jax.random.fold_in(key, 1))
  b, l = batch["history_mask"].shape
  return sharding.constrain(q_BxLxE.reshape(b * l, q_BxLxE.shape[-1]), spec.layout.mesh, ("batch", "tower_out"),
                            dict(spec.layout.rules))


def _next_item_loss(model: TwoTower, batch: dict, items_UxE: jax.Array, key: jax.Array,
                    spec: StepSpec) -> tuple[jax.Array, dict]:
  """SASRec's all-positions objective: every real history slot's query against its next item,
  over the batch's targets as in-batch candidates (``losses.next_item_softmax``)."""
  q_RxE = _sequence_queries(model, batch, items_UxE[batch["history_slot"]], key, spec)
  target_slot_R = _next(batch["history_slot"], batch["item_slot"]).reshape(-1)
  loss, aux = losses.next_item_softmax(
      q_RxE, items_UxE, target_slot_R, _slot_weights(batch), model.temperature,
      log_q_U=batch["unique_log_q"] if spec.logq_correction else None,
      remove_accidental_hits=spec.remove_accidental_hits)
  return loss, {"logits_shape": jnp.asarray(aux["logits"].shape)}


def _catalog_loss(model: TwoTower, batch: dict, key: jax.Array, spec: StepSpec) -> tuple[jax.Array, dict]:
  """Full softmax over the catalog: the item tower runs once on every item, positives and history
  are rows of it, and only items with training interactions compete as negatives."""
  items_NxE = model.items(jnp.arange(len(spec.candidates_N), dtype=jnp.int32), None, dropout_key=key)
  if spec.layout.query == "transformer":  # every real slot's next item, over the whole catalog
    q_RxE = _sequence_queries(model, batch, items_NxE[jnp.maximum(batch["history"], 0)], key, spec)
    targets_R = jnp.maximum(_next(batch["history"], batch["item"]).reshape(-1), 0)
    loss, aux = losses.catalog_softmax(q_RxE, items_NxE, targets_R, model.temperature,
                                       candidate_mask_N=jnp.asarray(spec.candidates_N), weights_B=_slot_weights(batch))
    return loss, {"logits_shape": jnp.asarray(aux["logits"].shape)}
  q_BxE = _queries(model, batch, lambda: items_NxE[jnp.maximum(batch["history"], 0)])
  q_BxE = sharding.constrain(q_BxE, spec.layout.mesh, ("batch", "tower_out"), dict(spec.layout.rules))
  loss, aux = losses.catalog_softmax(q_BxE, items_NxE, batch["item"], model.temperature,
                                     candidate_mask_N=jnp.asarray(spec.candidates_N), weights_B=batch.get("weight"))
  return loss, {"logits_shape": jnp.asarray(aux["logits"].shape)}


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _adalora_objective(params: dict, tables: dict, batch: dict, key: jax.Array,
                       spec: StepSpec) -> tuple[jax.Array, dict]:
  """AdaLoRA's training objective: the retrieval loss plus ``orth_reg`` times the orthogonality
  penalty of P and Q. The aux ``loss`` is the retrieval loss alone, comparable across modes."""
  loss, aux = loss_fn(params, tables, batch, key, spec)
  allocator = spec.allocator
  orth = adalora.orthogonality(allocator.adapters(params), allocator.groups)
  return loss + allocator.orth_reg * orth, {**aux, "loss": loss, "adalora/orth_reg": orth}


def train_step(state: dict, batch: dict, spec: StepSpec) -> tuple[dict, dict]:
  """One optimizer step; a step whose loss or gradient is not finite leaves the state as it was.

  With AdaLoRA (``spec.allocator``) the objective carries the orthogonality penalty, and after
  the optimizer's update the rank allocator scores, re-allocates and masks (``Allocator.step``);
  its state rides through the same cond as the parameters."""
  key = jax.random.fold_in(jax.random.key(spec.seed), state["step"])
  allocator = spec.allocator
  loss_of = functools.partial(loss_fn if allocator is None else _adalora_objective, spec=spec)
  (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"], state["tables"], batch, key)
  loss = aux.get("loss", loss)  # AdaLoRA's objective reports the retrieval loss without its penalty
  grad_norm = global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  step = state["step"] + 1
  extra = {} if allocator is None else {"adalora": state["adalora"]}

  def update(params, opt, extra, grads):
    updates, opt = spec.tx.update(grads, opt, params, grad_norm=grad_norm)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    if allocator is not None:
      params, allocated = allocator.step(params, grads, extra["adalora"], step, grad_norm)
      extra = {"adalora": allocated}
    return params, opt, extra

  # The host loop then stops or skips (train.nan_policy). A cond, not jnp.where(finite, new, old)
  # per leaf: with a select each AdamW moment is read by two fusions while its donated buffer is
  # rewritten, and XLA copies every moment first (348 copies, 45 MB more temporaries a step when
  # fine-tuning MiniLM).
  params, opt, extra = jax.lax.cond(finite, update, lambda params, opt, extra, grads: (params, opt, extra),
                                    state["params"], state["opt"], extra, grads)
  new_state = {"params": params, "tables": state["tables"], "opt": opt, "step": step, **extra}
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "logits_shape": aux["logits_shape"]}
  if allocator is not None:
    metrics.update({"adalora/orth_reg": aux["adalora/orth_reg"], **allocator.metrics(extra["adalora"], step)})
  return new_state, metrics


def train_call(state: dict, batches: dict, spec: StepSpec) -> tuple[dict, dict]:
  """K steps in one call over batches stacked ``[K, B, ...]``; metrics come back ``[K]``."""
  return jax.lax.scan(functools.partial(train_step, spec=spec), state, batches)


def jit_step(spec: StepSpec, shardings: dict, *, stacked: bool = False):
  """``train_step`` (or, ``stacked``, ``train_call``) jitted with explicit shardings and the state donated."""
  fn = train_call if stacked else train_step
  replicated = sharding.replicated(spec.layout.mesh)
  return jax.jit(functools.partial(fn, spec=spec),
                 in_shardings=(shardings, spec.layout.shardings(1 if stacked else None)),
                 out_shardings=(shardings, replicated), donate_argnums=0)
