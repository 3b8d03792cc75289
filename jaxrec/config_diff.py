"""What changed between the config a workdir was trained with and the one a new run brings.

A rerun of ``jaxrec train`` on a workdir resumes its latest checkpoint. That is only the same
experiment if the config is the same, so every changed key is sorted into one of three kinds:

- bookkeeping: keys that cannot change the trained numbers (where and how often to save, log or
  evaluate, the device mesh, input threads, ``train.steps`` to extend a run). Resuming with
  them changed is allowed and logged.
- adjustable: optimisation knobs whose new value applies from the resumed step on without
  invalidating the saved state (learning rate, schedule, regularisation, clipping, numeric
  formats), and ``data.path`` (the same files moved). Resuming with them changed needs
  ``--resume-with-changes``.
- everything else (data, split, model shape, encoder, seed, batch size, loss): the saved state and
  data position belong to another experiment, so resuming is refused; start a new workdir,
  optionally from these weights with ``checkpoint.resume_from``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.config import Config, to_dict

# Prefixes (a group ends with '.') or exact keys.
BOOKKEEPING = ("workdir", "train.steps", "train.log_every", "train.eval_every", "train.progress", "train.profile",
               "train.writers",
               "train.steps_per_call", "data.num_threads", "checkpoint.", "eval.", "mesh.", "encoder.cache_dir",
               "encoder.batch_size")
ADJUSTABLE = ("data.path", "train.learning_rate", "train.warmup_steps", "train.end_lr_fraction", "train.weight_decay",
              "train.clip_norm", "train.nan_policy", "encoder.lr_multiplier", "encoder.shape_buckets",
              "encoder.token_stream", "encoder.dtype", "model.dtype", "model.id_dropout", "data.history_dropout")


class ResumeRefused(RuntimeError):
  """The workdir's saved run and the new config are different experiments."""


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


@dataclasses.dataclass(frozen=True)
class ConfigDiff:
  """``changes`` maps each changed dotted key to ``(saved, new)``."""

  changes: dict[str, tuple[Any, Any]]

  @classmethod
  def between(cls, saved: dict | Config, new: Config) -> "ConfigDiff":
    """A key added to Config since ``saved`` was written reads as its default there; a key removed
    since does not count."""
    old = flatten(to_dict(saved) if isinstance(saved, Config) else saved)
    default, now = flatten(to_dict(Config())), flatten(to_dict(new))
    changes = {k: (old.get(k, default.get(k)), v) for k, v in now.items() if old.get(k, default.get(k)) != v}
    if "encoder.pooling" in changes and _same_pooling(*changes["encoder.pooling"], new.encoder.path):
      del changes["encoder.pooling"]
    return cls(changes)

  def keys(self, kind: str) -> list[str]:
    def kind_of(key):
      return "bookkeeping" if _matches(key, BOOKKEEPING) else "adjustable" if _matches(key, ADJUSTABLE) else "fixed"
    return [k for k in self.changes if kind_of(k) == kind]

  def describe(self, keys: list[str], limit: int = 6) -> str:
    shown = [f"{k}: {_short(self.changes[k][0])} -> {_short(self.changes[k][1])}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more

  def check_resume(self, workdir: str, allow_changes: bool) -> list[str]:
    """Raises ResumeRefused (one line: the diff and what to do) unless resuming is allowed; returns
    the changed keys the resumed run goes on with."""
    fixed, adjustable = self.keys("fixed"), self.keys("adjustable")
    if fixed:
      raise ResumeRefused(
          f"workdir {workdir} holds a run of a different experiment ({self.describe(fixed + adjustable)}): "
          f"{', '.join(fixed[:3])}{' ...' if len(fixed) > 3 else ''} cannot change on resume; train in a new "
          f"--workdir (checkpoint.resume_from={workdir}/checkpoints starts it from these weights)")
    if adjustable and not allow_changes:
      raise ResumeRefused(
          f"workdir {workdir} was trained with other settings ({self.describe(adjustable)}); rerun with "
          f"--resume-with-changes to continue this run with them, or train in a new --workdir")
    return self.keys("bookkeeping") + adjustable


def _same_pooling(saved: str, new: str, encoder_path: str) -> bool:
  """encoder.pooling="" reads the model directory's own pooling (since the key's default became "";
  runs saved before say "mean" for the same vectors): equal when both name the same mode there."""
  if "" not in (saved, new):
    return False
  import os
  from jaxrec import text_encoder
  path = encoder_path or text_encoder.default_model_dir()
  if not os.path.isdir(path):  # a hub id: reading its pooling could need the network
    return False
  try:
    own = text_encoder._pooling_from_dir(path)
  except Exception:  # an unreadable pooling stage: training will say so itself
    return False
  return (saved or own) == (new or own)


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."
