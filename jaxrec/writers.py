"""Metric writers behind one interface: ``write(step, scalars)`` and ``close()``.

``train.writers`` names them (``tensorboard,jsonl,wandb``): TensorBoard event files under
``WORKDIR/tb`` (the default), JSON lines in ``WORKDIR/metrics.jsonl``, and Weights & Biases or
MLflow when their package is installed (a missing one is one line naming the ``pip install``).
The trainer hands every writer the same scalars, named ``train/loss``, ``train/learning_rate``,
``valid/recall_at_10``, ``eval/ndcg_at_10`` (``@`` spelled ``_at_``, which every backend accepts).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from typing import Any, Mapping, Protocol

from jaxrec.config import ConfigError

# name -> (module to import, what to pip install, the service's name); None: no extra package.
WRITERS: dict[str, tuple[str, str, str] | None] = {
    "tensorboard": None,  # tensorboardX, a jaxrec dependency
    "jsonl": None,
    "wandb": ("wandb", "wandb", "Weights & Biases"),
    "mlflow": ("mlflow", "mlflow", "MLflow"),
}


class MetricWriter(Protocol):
  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Record ``scalars`` (name -> value) at training step ``step``."""

  def close(self) -> None:
    """Flush and release; the writer is not used afterwards."""


class TensorBoardWriter:
  """Event files for ``tensorboard --logdir WORKDIR/tb``."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)

  def close(self) -> None:
    self._writer.close()


class JsonLinesWriter:
  """``WORKDIR/metrics.jsonl``: one object per write, ``{"step": s, name: value, ...}``, appended
  (a resumed run goes on in the same file) and flushed, so a crashed run keeps every line written.
  Non-finite values are written as null (JSON has no NaN)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) if math.isfinite(v) else None for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class WandbWriter:
  """A Weights & Biases run named after the workdir (project ``WANDB_PROJECT``, else ``jaxrec``),
  with the resolved config; ``wandb login`` or ``WANDB_MODE=offline`` as wandb itself asks."""

  def __init__(self, workdir: str, config: dict[str, Any] | None = None):
    import wandb
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jaxrec"), name=os.path.basename(workdir),
                           dir=workdir, config=config or {})

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=int(step))

  def close(self) -> None:
    self._run.finish()


class MlflowWriter:
  """An MLflow run named after the workdir (tracking URI and experiment from MLflow's own
  ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``), with the config's keys as parameters."""

  def __init__(self, workdir: str, config: dict[str, Any] | None = None):
    import mlflow
    self._mlflow = mlflow
    mlflow.start_run(run_name=os.path.basename(workdir))
    if config:
      flat = {}
      for section, values in config.items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
          flat[f"{section}.{key}" if key else section] = str(value)[:500]  # MLflow's parameter value limit
      mlflow.log_params(flat)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._mlflow.log_metrics({k: float(v) for k, v in scalars.items()}, step=int(step))

  def close(self) -> None:
    self._mlflow.end_run()


class Writers:
  """Every configured writer as one: each ``write`` goes to all of them."""

  def __init__(self, writers: list[MetricWriter]):
    self.writers = writers

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if scalars:
      for writer in self.writers:
        writer.write(step, scalars)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def _installed(module: str) -> bool:
  if module in sys.modules:  # imported already (or blocked: None)
    return sys.modules[module] is not None
  return importlib.util.find_spec(module) is not None


def check(names: tuple[str, ...]) -> None:
  """Raises ConfigError in one line for an unknown writer or one whose package is missing."""
  for name in names:
    if name not in WRITERS:
      raise ConfigError(f"config key 'train.writers' names {name!r}; writers are {', '.join(WRITERS)}")
    needs = WRITERS[name]
    if needs is not None and not _installed(needs[0]):
      raise ConfigError(f"train.writers={name} needs {needs[2]}, which is not installed: pip install {needs[1]}")


def open_writers(names: tuple[str, ...], workdir: str, config: dict[str, Any] | None = None) -> Writers:
  """The writers ``names`` (``train.writers``) for a run in ``workdir``; ``config`` (the resolved
  config as a dict) goes to the services that keep it with the run."""
  check(names)
  made = {"tensorboard": lambda: TensorBoardWriter(workdir), "jsonl": lambda: JsonLinesWriter(workdir),
          "wandb": lambda: WandbWriter(workdir, config), "mlflow": lambda: MlflowWriter(workdir, config)}
  return Writers([made[name]() for name in dict.fromkeys(names)])
