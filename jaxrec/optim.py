"""The optax chain: AdamW with warmup + cosine decay and global-norm clipping.

Parameters are grouped by path: the text encoder's weights (full fine-tuning) get their own
learning-rate multiplier; parameters outside the trainable set are never updated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxrec.config import EncoderConfig, TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def _adamw(lr: optax.Schedule | float, cfg: TrainConfig) -> optax.GradientTransformation:
  # No weight decay on biases, norms and the temperature: only matrices and embedding tables.
  return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """``optax.clip_by_global_norm`` that takes the gradients' global norm as the extra argument
  ``grad_norm`` when the caller has it: the train step computes it anyway (to skip non-finite
  steps), and inside the step's ``lax.cond`` XLA cannot merge a second pass over every gradient
  with the first. Its state is optax's (empty), so optimizer states and checkpoints are unchanged."""

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(norm < max_norm)  # optax's own clip, so clipped updates match it
    return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(cfg: TrainConfig, encoder_cfg: EncoderConfig,
                   is_encoder_param: Callable[[tuple], bool] | None = None) -> optax.GradientTransformationExtraArgs:
  """``is_encoder_param(path)`` says which leaves belong to the text encoder (full mode). Its
  ``update`` takes ``grad_norm=`` (the gradients' global norm) to clip without recomputing it."""
  lr = schedule(cfg)
  if is_encoder_param is None or encoder_cfg.mode != "full":
    tx = _adamw(lr, cfg)
  else:
    encoder_lr = lambda step: lr(step) * encoder_cfg.lr_multiplier  # noqa: E731
    labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "encoder" if is_encoder_param(path) else "towers", params)
    tx = optax.multi_transform({"towers": _adamw(lr, cfg), "encoder": _adamw(encoder_lr, cfg)}, labels)
  # clip_norm=0 turns clipping off (clipping to a norm of zero would freeze training).
  return optax.chain(clip_by_global_norm(cfg.clip_norm), tx) if cfg.clip_norm > 0 else optax.with_extra_args_support(tx)


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
