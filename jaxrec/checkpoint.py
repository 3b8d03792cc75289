"""Orbax checkpoints holding the train state, the data iterator and the config, per step.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it once
complete, so a crash mid-save leaves nothing that restore will pick up). A failed save, whether
it fails at once or in the background, becomes one CheckpointError naming the step's path.
Restore walks the steps newest first and falls back to an older one if the newest cannot be
read; a trainer moves such a damaged step aside (``damaged/``), so the rerun can save it again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxrec.config import CheckpointConfig

log = logging.getLogger("jaxrec")


def _drop_closed_loop_callbacks(previous):
  """After a failed save or restore, orbax closes the operation's event loop while tensorstore
  still completes the other reads and writes; each late completion then reports an unraisable
  "Event loop is closed" with a traceback (dozens of them), and the writes never started warn at
  exit that their coroutines were never awaited. They say nothing the CheckpointError or the
  damaged-step warning does not."""

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  return hook


sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
warnings.filterwarnings("ignore", r"coroutine '.*serialize.*' was never awaited", RuntimeWarning)


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, directory: str, cfg: CheckpointConfig, best_metric: str = ""):
    """``best_metric``: keep only the single best step by this metric (higher is better)."""
    self.directory = os.path.abspath(directory)
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the save that may still be running
    # With best_metric, orbax drops a step that is not the best right after writing it.
    self._keeps_every_save = not best_metric
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
    """Saves asynchronously; ``losses`` (the loss of every step so far) travels with the state.

    A failure of the previous asynchronous save surfaces here, naming that step."""
    self.wait()
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(json.loads(config_json)),
            "losses": ocp.args.JsonSave({"losses": list(losses or [])})}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    needed = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force, metrics=metrics)
    except Exception as e:
      raise self._save_failed(step, needed, e) from e
    if saved:
      self._pending = (step, needed)
    return saved

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises CheckpointError if it failed."""
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if pending is None:
        raise
      raise self._save_failed(*pending, e) from e
    if pending is not None and self._keeps_every_save and jax.process_index() == 0 \
        and not os.path.isdir(self._step_path(pending[0])):
      # orbax logs some background failures instead of raising them; the missing step tells
      raise CheckpointError(f"could not write checkpoint {pending[0]} to {self._step_path(pending[0])}: the save "
                            f"did not complete; earlier checkpoints are intact")

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _save_failed(self, step: int, needed: int, error: BaseException) -> CheckpointError:
    if is_no_space(error):
      reason = f"no space left on device (the checkpoint needs {needed:,} bytes)"
    else:
      reason = _first_line(error)
    return CheckpointError(f"could not write checkpoint {step} to {self._step_path(step)}: {reason}; "
                           f"earlier checkpoints are intact")

  def restore(self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None,
              move_damaged_aside: bool = False) -> tuple[int, Any, list[float]]:
    """Restores ``step`` (default: the newest readable one) onto ``abstract_state``'s shardings.

    ``move_damaged_aside``: the trainer that owns this directory moves unreadable steps into
    ``damaged/`` (kept for inspection), so it saves those steps again instead of colliding
    with them; readers such as evaluate leave the directory alone. Returns ``(step, state, losses)``."""

    def args(_):
      out = {"state": ocp.args.StandardRestore(abstract_state), "losses": ocp.args.JsonRestore()}
      if data_iter is not None:
        out["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      return out
    s, restored = self._restore_newest(self.manager, abstract_state, args, step, move_damaged_aside)
    return s, restored["state"], list(restored["losses"]["losses"])

  def restore_part(self, abstract_part: Any, step: int | None = None, *, leaves: bool = False) -> tuple[int, Any]:
    """Restores only the top-level entries of the saved state that ``abstract_part`` names (e.g.
    the parameters without the optimizer state): the rest is never read. Returns ``(step, part)``.
    ``leaves``: ``abstract_part`` names single leaves of those entries (a model taking some of
    another's parameters), so saved leaves it does not name are not a mismatch."""
    # The state was saved by the standard handler; the pytree handler reads the same files and,
    # unlike it, can leave entries of the saved tree unread.
    reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                   item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_part)

    def args(_):
      return {"state": ocp.args.PyTreeRestore(abstract_part, restore_args=restore_args, partial_restore=True)}
    try:
      s, restored = self._restore_newest(reader, abstract_part, args, step, False, partial="leaves" if leaves else True)
    finally:
      reader.close()
    return s, restored["state"]

  def _restore_newest(self, manager, abstract: Any, args, step: int | None, move_damaged_aside: bool,
                      partial: bool | str = False) -> tuple[int, Any]:
    saved = self.steps()
    if step is not None and step not in saved:
      raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; saved steps: "
                            f"{', '.join(map(str, saved)) or 'none'}")
    candidates = [step] if step is not None else sorted(saved, reverse=True)
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    errors = []
    for s in candidates:
      self._check_compatible(s, abstract, partial)
      try:
        restored = manager.restore(s, args=ocp.args.Composite(**args(s)))
      except Exception as e:  # a truncated or corrupted step: fall back to the previous one
        # tensorstore appends its JSON specs to the message: the first part says what is wrong
        reason = re.sub(r" \[tensorstore_spec.*", "", str(e).splitlines()[0] if str(e) else "")
        errors.append(f"step {s}: {type(e).__name__}: {reason}")
        if move_damaged_aside:
          log.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s; trying an older one", s,
                      self.directory, errors[-1], self._move_aside(s))
        else:
          log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory, errors[-1])
        continue
      return s, restored
    raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

  def _check_compatible(self, step: int, abstract_state: Any, partial: bool | str = False) -> None:
    """Raises one error listing every parameter whose saved shape differs from the model's
    (``partial``: the model names a part of the saved state; the rest is not compared).

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
    if partial:
      parts = {name.split("/")[0] for name in wanted}
      saved = {k: v for k, v in saved.items() if k.split("/")[0] in parts}
    problems = [f"{k}: checkpoint {saved[k]} vs model {v}" for k, v in wanted.items() if k in saved and saved[k] != v]
    problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
    if partial != "leaves":
      problems += [f"{k}: in the checkpoint but not in the model" for k in saved if k not in wanted]
    if problems:
      # The first line is what the command line prints; the whole list follows it for --debug and the API.
      shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this config "
                            f"({len(problems)} mismatched parameters: {shown}); train in a new --workdir "
                            f"(checkpoint.resume_from cannot take weights of another shape either)\n"
                            + "\n".join(problems))

  def saved_shapes(self, step: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Every saved leaf of a step's state, ``'params/item_tower/mlp/out/kernel'`` -> its shape and
    dtype, read from the metadata alone."""
    metadata = self.manager.item_metadata(step)["state"]
    return {_path_name(path): jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
            for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(metadata, "tree", metadata))[0]
            if hasattr(leaf, "shape")}

  def saved_config(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of orbax's sight (process 0 moves; every process rereads the steps)."""
    target = os.path.join(self.directory, "damaged", f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(self._step_path(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxrec: checkpoint step {step} moved aside")
    self.manager.reload()
    return target

  def close(self) -> None:
    try:
      self.wait()
    except CheckpointError:
      try:  # the save error is the one to report, not a second one from shutting down after it
        self.manager.close()
      except Exception:
        log.debug("closing the checkpoint manager after a failed save", exc_info=True)
      raise
    self.manager.close()


def is_no_space(error: BaseException) -> bool:
  """ENOSPC anywhere in the chain, as an OSError or in tensorstore's text ([os_error_code='28'])."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if re.search(r"No space left on device|os_error_code='?%d\b" % errno.ENOSPC, str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException) -> str:
  text = str(error).splitlines()[0] if str(error) else ""
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _path_name(path) -> str:
  """'params/item_tower/mlp/out/kernel' whether the tree holds dicts, lists or named tuples."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)
