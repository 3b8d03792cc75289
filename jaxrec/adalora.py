"""AdaLoRA's rank allocator (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning"): pure, jit-friendly functions on pytrees.

Each adapted matrix carries an SVD-form adapter (``models.encoder.AdaLoRA``): a group
``{"q": [I, R], "e": [R], "p": [R, O]}``, delta W = Q diag(lambda) P. The allocator keeps, per
entry of every group, an EMA of its sensitivity |w * grad| and of that sensitivity's uncertainty,
scores each triplet (lambda_i, Q's column i, P's row i), and every ``delta_t`` steps keeps the
budget's best triplets over all adapters together, zeroing the others' lambda. The budget falls
from the initial total rank to the target total rank on a cubic schedule between ``tinit`` and
``total_steps - tfinal``; after that the mask stays as the last allocation left it. This follows
peft's ``RankAllocator`` (``peft/tuners/adalora/layer.py``) and the paper's code, with two
choices of our own: the mask lives in the state and is applied after every step (so a pruned
lambda is exactly zero on every step, not only on allocation steps), and ties in the score are
broken by position so exactly the budget's number of triplets survives.

``adapters`` below is a nested dict laid out as the train state's params (only AdaLoRA groups);
the allocator state mirrors it, so ``sharding.like_params`` shards it like the params it shadows.

Dimension legend: I and O an adapted matrix's input and output widths, R its initial rank,
A the number of adapters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_HIGHEST = jax.lax.Precision.HIGHEST  # [R, R] Gram matrices: cheap, and TF32 would blur their distance from I

Path = tuple  # a group's key path in the params, e.g. ("text_encoder", "layers", 0, "attention", "query_lora")


def budget_schedule(t: int, init_total: int, target_total: int, tinit: int, tfinal: int, total_steps: int) -> int:
  """Total rank allowed after ``t`` steps: the initial total through ``tinit``, the target from
  ``total_steps - tfinal`` on, a cubic fall in between (peft's ``budget_schedule``, whose ``int``
  truncation this keeps)."""
  if t <= tinit:
    return init_total
  if t >= total_steps - tfinal:
    return target_total
  left = 1 - (t - tinit) / (total_steps - tfinal - tinit)
  return int((init_total - target_total) * left ** 3 + target_total)


@dataclasses.dataclass(frozen=True)
class Allocator:
  """The static side of AdaLoRA for one model: where its adapters are and the schedule's numbers."""

  groups: tuple[Path, ...]  # key paths of the AdaLoRA groups in the params, in a fixed order
  ranks: tuple[int, ...]  # each group's initial rank R
  target_rank: int  # average rank per adapter at the end
  tinit: int
  tfinal: int
  total_steps: int
  delta_t: int
  beta1: float
  beta2: float
  orth_reg: float
  clip_norm: float = 0.0  # the optimizer's global-norm clip: importance reads the gradient it applies

  @property
  def init_total(self) -> int:
    return sum(self.ranks)

  @property
  def target_total(self) -> int:
    return self.target_rank * len(self.groups)

  def budget(self, t: int) -> int:
    return budget_schedule(t, self.init_total, self.target_total, self.tinit, self.tfinal, self.total_steps)

  @functools.cached_property
  def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step count t = 0..total_steps: the budget, whether the importance EMAs update after step
    t, whether the mask is re-allocated after it. Host-side numpy, indexed in the jitted step, so
    the schedule's arithmetic is peft's float64 arithmetic whatever the device's precision."""
    t = np.arange(self.total_steps + 1)
    final = self.total_steps - self.tfinal
    budget = np.array([self.budget(int(s)) for s in t], np.int32)
    update = t < final  # peft stops scoring once the final allocation is made
    remask = ((t > self.tinit) & (t < final) & (t % self.delta_t == 0)) | (t == final)
    return budget, update, remask

  # ---------------------------------------------------------------- state

  def adapters(self, params: dict) -> dict:
    """The AdaLoRA groups of ``params``, nested as in ``params``."""
    flat = {}
    for path in self.groups:
      node = params
      for key in path:
        node = node[key]
      for name in ("q", "e", "p"):
        flat[(*path, name)] = node[name]
    return traverse_util.unflatten_dict(flat)

  def with_adapters(self, params: dict, adapters: dict) -> dict:
    """``params`` with its AdaLoRA leaves replaced by ``adapters``' (same tree structure otherwise)."""
    flat = traverse_util.flatten_dict(adapters)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: flat.get(tuple(k.key for k in path), leaf), params)

  def init(self, adapters: dict) -> dict:
    """The allocator's train state: ``ipt`` and ``unc`` (EMA sensitivity and uncertainty of every
    entry of every group) and ``mask`` (per group ``{"e": bool [R]}``, every triplet kept)."""
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    mask = traverse_util.unflatten_dict({(*path, "e"): jnp.ones((r,), bool)
                                         for path, r in zip(self.groups, self.ranks)})
    return {"ipt": zeros, "unc": jax.tree.map(jnp.zeros_like, adapters), "mask": mask}

  # ---------------------------------------------------------------- one step

  def step(self, params: dict, grads: dict, state: dict, t: jax.Array, grad_norm: jax.Array) -> tuple[dict, dict]:
    """After the optimizer's update of step ``t`` (1-based): the importance EMAs from the updated
    adapters and the step's gradient, a new mask when the schedule re-allocates, and the mask
    applied to lambda. Returns ``(params, state)``."""
    budget_T, update_T, remask_T = (jnp.asarray(x) for x in self.tables)
    t = jnp.minimum(t, self.total_steps)
    adapters = self.adapters(params)
    adapter_grads = self.adapters(grads)
    if self.clip_norm > 0:  # optax's clip_by_global_norm, as the optimizer applied it
      scale = jnp.where(grad_norm < self.clip_norm, 1.0, self.clip_norm / grad_norm)
      adapter_grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), adapter_grads)
    ipt, unc = jax.lax.cond(update_T[t], lambda: update_importance(state["ipt"], state["unc"], adapters, adapter_grads,
                                                                   self.beta1, self.beta2),
                            lambda: (state["ipt"], state["unc"]))
    mask = jax.lax.cond(remask_T[t], lambda: mask_to_budget(triplet_scores(ipt, unc, self.groups), budget_T[t],
                                                            self.groups),
                        lambda: state["mask"])
    adapters = apply_mask(adapters, mask)
    return self.with_adapters(params, adapters), {"ipt": ipt, "unc": unc, "mask": mask}

  def metrics(self, state: dict, t: jax.Array) -> dict[str, jax.Array]:
    """``adalora/rank``: triplets kept by the current mask over all adapters; ``adalora/budget``:
    the schedule's total rank for step ``t``."""
    budget_T = jnp.asarray(self.tables[0])
    rank = sum(jnp.sum(m.astype(jnp.int32)) for m in jax.tree.leaves(state["mask"]))
    return {"adalora/rank": rank, "adalora/budget": budget_T[jnp.minimum(t, self.total_steps)]}


# ------------------------------------------------------------------ the formulas

def update_importance(ipt: Any, unc: Any, weights: Any, grads: Any, beta1: float,
                      beta2: float) -> tuple[Any, Any]:
  """One step of AdaLoRA's importance EMAs for every entry (eq. 8-9 of the paper):
  I = |w * grad|, I_bar <- beta1 I_bar + (1 - beta1) I, U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|
  (the uncertainty against the updated I_bar, as peft computes it)."""
  sensitivity = jax.tree.map(lambda w, g: jnp.abs(w * g), weights, grads)
  ipt = jax.tree.map(lambda avg, s: beta1 * avg + (1 - beta1) * s, ipt, sensitivity)
  unc = jax.tree.map(lambda avg, s, i: beta2 * avg + (1 - beta2) * jnp.abs(s - i), unc, sensitivity, ipt)
  return ipt, unc


def _group(tree: dict, path: Path) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def triplet_scores(ipt: dict, unc: dict, groups: tuple[Path, ...]) -> list[jax.Array]:
  """Each group's triplet scores [R] (eq. 10): S(lambda_i) + the mean of S over P's row i and over
  Q's column i, with S = I_bar * U_bar per entry."""
  out = []
  for path in groups:
    i, u = _group(ipt, path), _group(unc, path)
    s = {name: i[name] * u[name] for name in ("q", "e", "p")}
    out.append(s["e"] + jnp.mean(s["q"], axis=0) + jnp.mean(s["p"], axis=1))
  return out


def mask_to_budget(scores: list[jax.Array], budget: jax.Array, groups: tuple[Path, ...]) -> dict:
  """Keeps the ``budget`` best-scoring triplets over all groups together: the mask tree
  ``{group: {"e": bool [R]}}``. The lowest ``total - budget`` go (peft's kthvalue threshold, ties
  broken by position so exactly ``budget`` survive)."""
  all_S = jnp.concatenate(scores)
  order_S = jnp.argsort(all_S, stable=True)
  rank_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(all_S.shape[0], dtype=order_S.dtype))
  keep_S = rank_S >= all_S.shape[0] - budget
  out, start = {}, 0
  for path, s in zip(groups, scores):
    out[(*path, "e")] = keep_S[start:start + s.shape[0]]
    start += s.shape[0]
  return traverse_util.unflatten_dict(out)


def apply_mask(adapters: dict, mask: dict) -> dict:
  """``adapters`` with each pruned lambda set to exactly zero."""
  flat_mask = traverse_util.flatten_dict(mask)
  flat = traverse_util.flatten_dict(adapters)
  return traverse_util.unflatten_dict({k: jnp.where(flat_mask[k], v, 0).astype(v.dtype) if k in flat_mask else v
                                       for k, v in flat.items()})


def orthogonality(adapters: dict, groups: tuple[Path, ...]) -> jax.Array:
  """The orthogonality penalty R(P, Q): the mean over every P and Q of ||P P^T - I||_F and
  ||Q^T Q - I||_F ([R, R] each), as peft's ``AdaLoraModel.forward`` and the paper's code
  (``compute_orth_regu``) compute it (the paper writes squared norms summed; the reference
  implementations, whose ``orth_reg_weight`` defaults we use, take the mean of plain norms)."""
  norms = []
  for path in groups:
    g = _group(adapters, path)
    for cov_RxR in (jnp.matmul(g["p"], g["p"].T, precision=_HIGHEST), jnp.matmul(g["q"].T, g["q"], precision=_HIGHEST)):
      eye = jnp.eye(cov_RxR.shape[0], dtype=cov_RxR.dtype)
      norms.append(jnp.sqrt(jnp.sum(jnp.square(cov_RxR - eye))))
  return sum(norms) / len(norms)
