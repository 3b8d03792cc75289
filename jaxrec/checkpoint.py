"""Orbax checkpoints holding the train state, the data iterator and the config, per step.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it once
complete, so a crash mid-save leaves nothing that restore will pick up). Restore walks the
steps newest first and falls back to an older one if the newest cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxrec.config import CheckpointConfig

log = logging.getLogger("jaxrec")


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, directory: str, cfg: CheckpointConfig, best_metric: str = ""):
    """``best_metric``: keep only the single best step by this metric (higher is better)."""
    self.directory = os.path.abspath(directory)
    best = {"best_fn": lambda metrics: metrics[best_metric], "best_mode": "max"} if best_metric else {}
    options = ocp.CheckpointManagerOptions(max_to_keep=1 if best_metric else max(cfg.keep, 1),
                                           enable_async_checkpointing=cfg.async_save, create=True, **best)
    # Handlers named up front, so a fresh process can read a step's metadata before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "losses": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None, config_json: str, losses: list[float] | None = None,
           force: bool = False, metrics: dict | None = None) -> bool:
    """Saves asynchronously; ``losses`` (the loss of every step so far) travels with the state."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config_json)),
            "losses": ocp.args.JsonSave({"losses": list(losses or [])})}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      return self.manager.save(step, args=ocp.args.Composite(**args), force=force, metrics=metrics)
    except OSError as e:
      raise CheckpointError(f"could not write checkpoint {step} under {self.directory}: {e}; earlier checkpoints are intact") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, abstract_state: Any, data_iter: Any | None = None,
              step: int | None = None) -> tuple[int, Any, list[float]]:
    """Restores ``step`` (default: the newest readable one) onto ``abstract_state``'s shardings.

    Returns ``(step, state, losses)``."""
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    errors = []
    for s in candidates:
      self._check_compatible(s, abstract_state)
      args = {"state": ocp.args.StandardRestore(abstract_state), "losses": ocp.args.JsonRestore()}
      if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**args))
      except Exception as e:  # a truncated or corrupted step: fall back to the previous one
        errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory, errors[-1])
        continue
      return s, restored["state"], list(restored["losses"]["losses"])
    raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises one error listing every parameter whose saved shape differs from the model's.

    An unreadable metadata file means a damaged step, which restore handles by falling back."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
      saved = {_path_name(path): tuple(leaf.shape)
               for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(metadata, "tree", metadata))[0]
               if hasattr(leaf, "shape")}
    except Exception:  # damaged metadata: let the restore loop report and fall back
      return
    if not saved:
      return
    wanted = {_path_name(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = [f"{k}: checkpoint {saved[k]} vs model {v}" for k, v in wanted.items() if k in saved and saved[k] != v]
    problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
    problems += [f"{k}: in the checkpoint but not in the model" for k in saved if k not in wanted]
    if problems:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this config "
                            f"({len(problems)} mismatched parameters): " + "; ".join(problems))

  def saved_config(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _path_name(path) -> str:
  """'params/item_tower/mlp/out/kernel' whether the tree holds dicts, lists or named tuples."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's sharding: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x, tree)
