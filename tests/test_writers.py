"""Metric writers (jaxrec/writers.py): every writer records the same scalars, the learning rate
with the loss; a missing package is one line naming its pip install."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import jaxrec
from jaxrec import cli, optim, writers
from jaxrec.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


class FakeRun:
  """What the trainer touches of a wandb run: ``log(data, step=)`` and ``finish()``."""

  def __init__(self, **kwargs):
    self.init, self.logged, self.finished = kwargs, [], False

  def log(self, data, step):
    self.logged.append((step, dict(data)))

  def finish(self):
    self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
  runs = []
  module = types.ModuleType("wandb")
  module.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
  monkeypatch.setitem(sys.modules, "wandb", module)
  return runs


def _tensorboard(path) -> dict[tuple[str, int], float]:
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(path))
  events.Reload()
  return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def test_wandb_and_jsonl_record_the_same_scalars_as_tensorboard(tmp_path, fake_wandb):
  cfg = load_config(TINY, [f"workdir={tmp_path}", "train.steps=10", "train.log_every=5", "train.eval_every=5",
                           "checkpoint.async_save=false", "train.writers=tensorboard,jsonl,wandb"])
  jaxrec.train(cfg)
  board = _tensorboard(tmp_path / "tb")
  (run,) = fake_wandb
  assert run.finished and run.init["name"] == tmp_path.name and run.init["config"]["train"]["steps"] == 10
  wandb = {(tag, step): value for step, data in run.logged for tag, value in data.items()}
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  jsonl = {(tag, row["step"]): value for row in lines for tag, value in row.items() if tag != "step"}
  assert set(wandb) == set(board) == set(jsonl)
  # TensorBoard keeps float32; the others the float itself.
  for key, value in board.items():
    assert np.float32(wandb[key]) == np.float32(value) and np.float32(jsonl[key]) == np.float32(value), key
  # The learning rate goes with the loss: the schedule's rate of the update each logged step made.
  rates = optim.schedule(cfg.train)
  for step in (5, 10):
    assert ("train/loss", step) in board
    np.testing.assert_allclose(wandb["train/learning_rate", step], float(rates(step - 1)), rtol=1e-6)
  assert ("valid/recall_at_10", 5) in board and ("eval/recall_at_10", 10) in board
  np.testing.assert_allclose(wandb["eval/recall_at_10", 10],
                             json.loads((tmp_path / "metrics.json").read_text())["recall@10"], rtol=1e-7)


def test_a_missing_package_or_an_unknown_writer_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed, wherever the suite runs
  argv = ["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "train.writers=tensorboard,mlflow"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err == "jaxrec train: error: train.writers=mlflow needs MLflow, which is not installed: pip install mlflow"
  assert not (tmp_path / "w" / "checkpoints").exists()
  with pytest.raises(ConfigError, match="'train.writers' names 'neptune'; writers are tensorboard, jsonl, wandb, mlflow"):
    load_config(TINY, ["train.writers=tensorboard,neptune"])


def test_jsonl_appends_one_flushed_object_per_write_with_null_for_non_finite(tmp_path):
  first = writers.open_writers(("jsonl",), str(tmp_path))
  first.write(1, {"train/loss": 2.5, "train/grad_norm": float("nan")})
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.5, "train/grad_norm": None}
  first.close()
  again = writers.open_writers(("jsonl",), str(tmp_path))  # a resumed run goes on in the same file
  again.write(2, {"train/loss": 2.0})
  again.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]


def test_the_logged_learning_rate_is_the_schedule_across_its_host_blocks():
  from jaxrec import optim
  from jaxrec.trainer import _LearningRates
  cfg = load_config(TINY, ["train.steps=20000", "train.warmup_steps=5000"]).train
  rates, schedule = _LearningRates(cfg), optim.schedule(cfg)
  for count in (0, 1, 4095, 4096, 4097, 12345, 19999, 3):  # back to an earlier block too
    # float32 arithmetic: XLA may round a lone count's rate apart from a block's by one ulp
    assert rates[count] == pytest.approx(float(np.asarray(schedule(np.arange(count, count + 1)))[0]), rel=1e-6), count
