"""Retrieval losses as pure functions.

Dimension legend: B global batch, N extra negatives (or the catalog), E tower output.
Logits and softmax are float32 whatever the towers computed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_precision() -> jax.lax.Precision:
  """Full float32 for the logits matmul. Accelerators need HIGHEST for that (their default passes
  are bf16); on CPU every precision is float32 already, and HIGHEST only steers XLA:CPU to a
  slower kernel for the backward matmul (174 vs 80 us per step measured on the ID benchmark)."""
  return jax.lax.Precision.DEFAULT if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


# Masked logits use a finite floor (as TFRS does) so an all-masked row cannot turn into NaN.
MASKED_LOGIT = -1e9


def _cross_entropy(logits_BxC: jax.Array, label_BxC: jax.Array, weights_B: jax.Array | None) -> jax.Array:
  """Softmax cross-entropy of each row against its one-hot label column; the (weighted) mean."""
  loss_B = jax.nn.logsumexp(logits_BxC, axis=1) - jnp.sum(jnp.where(label_BxC, logits_BxC, 0.0), axis=1)
  if weights_B is None:
    return jnp.mean(loss_B)
  w = weights_B.astype(jnp.float32)
  return jnp.sum(loss_B * w) / jnp.maximum(jnp.sum(w), 1.0)


def in_batch_softmax(
    q_BxE: jax.Array,
    pos_BxE: jax.Array,
    pos_ids_B: jax.Array,
    temperature: jax.Array | float,
    log_q_B: jax.Array | None = None,
    remove_accidental_hits: bool = True,
    extra_NxE: jax.Array | None = None,
    extra_ids_N: jax.Array | None = None,
    extra_log_q_N: jax.Array | None = None,
    weights_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sampled softmax where every other positive of the (global) batch is a negative.

  Row ``b`` scores query ``b`` against all ``B`` positives (and ``N`` extra negatives); the
  label is column ``b``. ``log_q`` is the log probability that an item appears as a sampled
  candidate; subtracting it from every column (the logQ correction of Yi et al. 2019, as TFRS
  applies it) stops popular items from being over-penalised as negatives. A column holding the
  same item id as row ``b``'s positive is an accidental hit and is masked out (except the label).

  The extra negatives are mixed negative sampling (Yang et al. 2020): N items sampled for the
  whole batch, e.g. uniformly, which reach the tail that in-batch positives rarely hold. A
  candidate column then holds an item drawn from a mixture of the two samplers, so ``log_q_B`` and
  ``extra_log_q_N`` must both be the mixture's ``log((B * p_data + N * p_sampler) / (B + N))``
  (``data.pipeline.item_log_q``), not each sampler's own. Extra negatives drawn with replacement
  may repeat; each copy is a column, as the mixture's expected counts assume.
  Returns the weighted mean loss and ``{"logits": [B, B+N]}``.
  """
  q = q_BxE.astype(jnp.float32)
  cands_CxE = pos_BxE.astype(jnp.float32)
  cand_ids_C = pos_ids_B
  cand_log_q_C = log_q_B
  if extra_NxE is not None:
    cands_CxE = jnp.concatenate([cands_CxE, extra_NxE.astype(jnp.float32)], axis=0)
    cand_ids_C = jnp.concatenate([pos_ids_B, extra_ids_N])
    if log_q_B is not None:
      cand_log_q_C = jnp.concatenate([log_q_B, extra_log_q_N])
  logits_BxC = jnp.einsum("be,ce->bc", q, cands_CxE, precision=logit_precision()) / temperature
  if cand_log_q_C is not None:
    logits_BxC = logits_BxC - cand_log_q_C[None, :].astype(jnp.float32)
  b = q.shape[0]
  label_BxC = jnp.arange(logits_BxC.shape[1])[None, :] == jnp.arange(b)[:, None]
  if remove_accidental_hits:
    hit_BxC = (cand_ids_C[None, :] == pos_ids_B[:, None]) & ~label_BxC
    logits_BxC = jnp.where(hit_BxC, MASKED_LOGIT, logits_BxC)
  return _cross_entropy(logits_BxC, label_BxC, weights_B), {"logits": logits_BxC}


def catalog_softmax(
    q_BxE: jax.Array,
    items_NxE: jax.Array,
    pos_ids_B: jax.Array,
    temperature: jax.Array | float,
    candidate_mask_N: jax.Array | None = None,
    weights_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Full softmax of each query over the whole catalog; the label is column ``pos_ids_B[b]``.

  Nothing is sampled, so there is no sampling bias to correct (no logQ) and no accidental hit.
  ``candidate_mask_N`` (bool) keeps only the items that may compete, e.g. those with training
  interactions: an item held out cold must not be taught to lose before anyone has seen it.
  The label column is always kept. Returns the weighted mean loss and ``{"logits": [B, N]}``.
  """
  q = q_BxE.astype(jnp.float32)
  logits_BxN = jnp.einsum("be,ne->bn", q, items_NxE.astype(jnp.float32), precision=logit_precision())
  logits_BxN = logits_BxN / temperature
  label_BxN = jnp.arange(logits_BxN.shape[1])[None, :] == pos_ids_B[:, None]
  if candidate_mask_N is not None:
    logits_BxN = jnp.where(candidate_mask_N[None, :] | label_BxN, logits_BxN, MASKED_LOGIT)
  return _cross_entropy(logits_BxN, label_BxN, weights_B), {"logits": logits_BxN}


def next_item_softmax(
    q_RxE: jax.Array,
    cands_UxE: jax.Array,
    target_slot_R: jax.Array,
    weights_R: jax.Array,
    temperature: jax.Array | float,
    log_q_U: jax.Array | None = None,
    remove_accidental_hits: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The in-batch softmax of every (query, next item) pair of a batch of sequences, over the
  batch's distinct items; equal to ``in_batch_softmax`` over all R targets as candidates.

  R = B * L query slots, each with the slot of its target among U distinct items and a weight
  (0 for padding). The in-batch candidates are the R targets of the real slots, so item u stands
  as ``count_u`` identical columns; here it is one column whose exponent counts ``count_u`` times
  (its logit plus ``log count_u``): the same softmax on U columns instead of R. An accidental hit
  is a column equal to the row's own target other than the label: with hits removed, the target's
  column counts once. Items no real slot targets are not candidates. Returns the weighted mean
  loss and ``{"logits": [R, U]}``.
  """
  weights_R = weights_R.astype(jnp.float32)
  real_R = weights_R > 0
  count_U = jnp.zeros(cands_UxE.shape[0], jnp.float32).at[target_slot_R].add(real_R.astype(jnp.float32))
  logits_RxU = jnp.einsum("re,ue->ru", q_RxE.astype(jnp.float32), cands_UxE.astype(jnp.float32),
                          precision=logit_precision()) / temperature
  if log_q_U is not None:
    logits_RxU = logits_RxU - log_q_U[None, :].astype(jnp.float32)
  label_RxU = jnp.arange(cands_UxE.shape[0])[None, :] == target_slot_R[:, None]
  label_logit_R = jnp.sum(jnp.where(label_RxU, logits_RxU, 0.0), axis=1)
  multiplicity_RxU = jnp.where(label_RxU & remove_accidental_hits, 1.0, count_U[None, :])
  logits_RxU = jnp.where(multiplicity_RxU > 0, logits_RxU + jnp.log(jnp.maximum(multiplicity_RxU, 1.0)), MASKED_LOGIT)
  loss_R = jax.nn.logsumexp(logits_RxU, axis=1) - label_logit_R
  loss_R = jnp.where(real_R, loss_R, 0.0)
  return jnp.sum(loss_R * weights_R) / jnp.maximum(jnp.sum(weights_R), 1.0), {"logits": logits_RxU}
