"""What the RecBole peers (recbole_bpr.py, recbole_sasrec.py) share on RecBole's side: the trainer
instrumentation that records the per-epoch curve and enforces a wall-clock budget, and the
versions block of a result file. Imported only in a RecBole venv (torch, recbole, numpy<1.24)."""

from __future__ import annotations

import sys
import time


class TrainerLog:
  """Wraps RecBole's ``Trainer`` so a run records its own curve and can stop on a time budget.

  ``run_recbole`` returns only the best validation result; the epoch count, the best epoch and the
  curve come from wrapping the trainer's own per-epoch methods, so nothing is recomputed outside
  RecBole. A wall-clock budget for a shared CPU: once it is spent, RecBole's own early-stopping
  check is told to stop, so training ends exactly as a patience stop would (the best epoch so far
  is reloaded and tested) instead of being killed without a test result. ``install()`` patches
  the trainer module; ``start`` is set when it is called, so call it right before ``run_recbole``.
  """

  def __init__(self, max_minutes: float = 0):
    self.max_minutes = max_minutes
    self.curve: list[dict] = []
    self.stopped_by = "epochs"
    self.start = time.time()
    self.trainer = None  # the Trainer whose evaluate() ran last with load_best_model (the test)
    self.test_data = None

  def install(self) -> None:
    from recbole.trainer import trainer as trainer_mod

    train_epoch, valid_epoch = trainer_mod.Trainer._train_epoch, trainer_mod.Trainer._valid_epoch
    evaluate, early_stopping = trainer_mod.Trainer.evaluate, trainer_mod.early_stopping
    log = self

    def counted_train(self, train_data, epoch_idx, *a, **k):
      loss = train_epoch(self, train_data, epoch_idx, *a, **k)
      log.curve.append({"epoch": int(epoch_idx), "loss": float(loss if not isinstance(loss, tuple) else sum(loss)),
                        "s": round(time.time() - log.start, 1)})
      print(f"epoch {epoch_idx} loss {log.curve[-1]['loss']:.4f} at {log.curve[-1]['s']} s", flush=True)
      return loss

    def recorded_valid(self, valid_data, *a, **k):
      score, result = valid_epoch(self, valid_data, *a, **k)
      if log.curve:
        log.curve[-1]["valid"] = {key: float(v) for key, v in result.items()}
        print(f"  valid {dict(result)}", flush=True)
      return score, result

    def budgeted_stopping(value, best, cur_step, max_step, bigger=True):
      best, cur_step, stop, update = early_stopping(value, best, cur_step, max_step, bigger=bigger)
      if stop:
        log.stopped_by = f"early stopping (stopping_step={max_step})"
      elif log.max_minutes and time.time() - log.start > 60 * log.max_minutes:
        log.stopped_by = f"time budget ({log.max_minutes} min)"
        stop = True
      return best, cur_step, stop, update

    def kept_evaluate(self, eval_data, load_best_model=True, *a, **k):
      # run_recbole keeps neither the model nor the test loader; the test call (the one that
      # reloads the best checkpoint) leaves both here, the model holding the best epoch's weights.
      result = evaluate(self, eval_data, load_best_model, *a, **k)
      if load_best_model:
        log.trainer, log.test_data = self, eval_data
      return result

    trainer_mod.Trainer._train_epoch = counted_train
    trainer_mod.Trainer._valid_epoch = recorded_valid
    trainer_mod.Trainer.evaluate = kept_evaluate
    trainer_mod.early_stopping = budgeted_stopping
    self.start = time.time()

  def best_epoch(self, valid_metric: str) -> int | None:
    """The epoch RecBole kept: its early stopping keeps the first strictly better score (first max)."""
    scores = [c["valid"][valid_metric.lower()] for c in self.curve if "valid" in c]
    if not scores:
      return None
    return [c for c in self.curve if "valid" in c][max(range(len(scores)), key=lambda i: (scores[i], -i))]["epoch"]


def versions() -> dict:
  import numpy as np
  import recbole
  import torch

  return {"recbole": recbole.__version__, "torch": torch.__version__, "numpy": np.__version__,
          "python": sys.version.split()[0]}
