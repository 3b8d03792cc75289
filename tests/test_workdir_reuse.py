"""Reusing a workdir: a changed config never silently continues another run, saved steps are
listed, checkpoints of any mesh evaluate on the devices present, the final phase honours SIGTERM,
and a run shows what it is doing (phase lines, the loss curve in TensorBoard, ms/step)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import jaxrec
from jaxrec.checkpoint import CheckpointError
from jaxrec.config import load_config
from jaxrec.config_diff import ConfigDiff, ResumeRefused
from jaxrec.trainer import EXIT_PREEMPTED, Trainer, TrainingStopped

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _cfg(workdir, *overrides):
  return load_config(TINY, [f"workdir={workdir}", "mesh.num_devices=1", *overrides])


def _cli(*args, devices=1, env=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             JAXREC_HUGE_PAGES="0", **(env or {}))
  return subprocess.run([sys.executable, "-m", "jaxrec.cli", *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  result = jaxrec.train(_cfg(workdir, "train.steps=10"))
  return workdir, result


def test_changed_learning_rate_refuses_to_resume_with_the_diff(trained):
  workdir, _ = trained
  with pytest.raises(ResumeRefused) as refused:
    jaxrec.train(_cfg(workdir, "train.steps=10", "train.learning_rate=0.01"))
  message = str(refused.value)
  assert "\n" not in message
  assert "train.learning_rate: 0.003 -> 0.01" in message and "--resume-with-changes" in message
  assert "new --workdir" in message


def test_changed_model_shape_is_refused_even_with_resume_with_changes(trained):
  workdir, _ = trained
  with pytest.raises(ResumeRefused, match=r"model.embed_dim: 16 -> 32.*cannot change on resume"):
    jaxrec.train(_cfg(workdir, "model.embed_dim=32"), resume_with_changes=True)


def test_resume_with_changes_continues_with_the_new_value(tmp_path):
  first = jaxrec.train(_cfg(tmp_path, "train.steps=6"))
  resumed = jaxrec.train(_cfg(tmp_path, "train.steps=8", "train.learning_rate=0.01"), resume_with_changes=True)
  assert resumed["train/losses"][:6] == first["train/losses"]
  assert len(resumed["train/losses"]) == 8


def test_bookkeeping_changes_resume_without_the_flag(trained, tmp_path):
  workdir, result = trained
  again = jaxrec.train(_cfg(workdir, "train.steps=10", "eval.batch_size=64", "train.log_every=2",
                            "checkpoint.keep=5"))
  assert again["train/losses"] == result["train/losses"]


def test_config_diff_sorts_keys_and_reads_new_fields_as_defaults():
  saved = json.loads(json.dumps(jaxrec.config.to_dict(load_config(TINY))))
  del saved["data"]["history_dropout"]  # a field added after this run was saved
  saved["train"]["no_longer_a_field"] = 1
  diff = ConfigDiff.between(saved, load_config(TINY, ["train.seed=4", "train.weight_decay=0.1", "mesh.data=2"]))
  assert diff.changes == {"train.seed": (0, 4), "train.weight_decay": (1e-4, 0.1), "mesh.data": (-1, 2)}
  assert diff.keys("fixed") == ["train.seed"]
  assert diff.keys("adjustable") == ["train.weight_decay"]
  assert diff.keys("bookkeeping") == ["mesh.data"]


def test_a_run_saved_with_the_pooling_the_model_directory_names_is_the_same_experiment():
  # encoder.pooling used to default to "mean"; "" now reads the model's own (MiniLM: mean).
  saved = json.loads(json.dumps(jaxrec.config.to_dict(load_config(TINY))))
  saved["encoder"]["pooling"] = "mean"
  assert load_config(TINY).encoder.pooling == ""
  assert "encoder.pooling" not in ConfigDiff.between(saved, load_config(TINY)).changes
  saved["encoder"]["pooling"] = "cls"
  assert ConfigDiff.between(saved, load_config(TINY)).changes["encoder.pooling"] == ("cls", "")


def test_shape_mismatch_names_a_few_parameters_the_count_and_what_to_do(trained, tmp_path):
  workdir, _ = trained
  cfg = _cfg(tmp_path, "train.steps=2", "model.embed_dim=32", "model.id_dim=32",
             f"checkpoint.resume_from={workdir}/checkpoints")
  with pytest.raises(CheckpointError) as error:
    Trainer(cfg).run()
  first_line, *listing = str(error.value).splitlines()  # the command line prints the first line only
  assert len(first_line) < 600 and len(listing) > 3
  assert "mismatched parameters" in first_line and "more" in first_line and "new --workdir" in first_line


def test_missing_step_lists_the_saved_steps(trained):
  workdir, _ = trained
  proc = _cli("evaluate", "--workdir", str(workdir), "--step", "999")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "no checkpoint of step 999" in proc.stderr and "saved steps: 10" in proc.stderr
  assert "unreadable" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_trained_on_8_devices_evaluates_and_exports_on_1(tmp_path):
  workdir = tmp_path / "run"
  trained = _cli("train", "--config", TINY, "--workdir", str(workdir), "train.steps=8", "mesh.data=2", "mesh.fsdp=2",
                 "mesh.tensor=2", devices=8)
  assert trained.returncode == 0, trained.stderr[-2000:]
  evaluated = _cli("evaluate", "--workdir", str(workdir), devices=1)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  want = json.loads((workdir / "metrics.json").read_text())
  got = json.loads((workdir / "eval_step8.json").read_text())
  for key in ("recall@10", "ndcg@10", "recall@50"):
    assert got[key] == pytest.approx(want[key], abs=1e-6), key
  exported = _cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "index"), devices=1)
  assert exported.returncode == 0, exported.stderr[-2000:]


def test_recommend_lists_history_newest_first(trained):
  workdir, _ = trained
  index = jaxrec.ItemIndex.load(str(workdir / "index"))
  user = index.user_ids[3]
  proc = _cli("recommend", "--workdir", str(workdir), "--user", str(user))
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert "newest first" in lines[0]
  listed = [line.split("]")[0].strip(" [") for line in lines[1:] if line.startswith("  [")]
  want = [str(item) for item, _ in index.seen_items(user)][::-1][:10]
  assert listed == want


def test_metrics_report_ms_per_step_and_tensorboard_has_the_loss_curve(trained):
  workdir, result = trained
  assert result["train/ms_per_step"] > 0
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(workdir / "tb"))
  events.Reload()
  steps = [event.step for event in events.Scalars("train/loss")]
  assert steps == [5, 10]  # tiny's train.log_every=5
  assert jaxrec.config.TrainConfig().log_every == 10  # the default draws a curve, not a point per 50 steps
  assert [event.value for event in events.Scalars("train/loss")] == pytest.approx(
      [result["train/losses"][4], result["train/losses"][9]], rel=1e-6)


def test_the_python_api_logs_its_phases(tmp_path):
  script = (f"import jaxrec; cfg = jaxrec.load_config({TINY!r}, ['workdir={tmp_path}', 'train.steps=3', "
            "'mesh.num_devices=1']); jaxrec.train(cfg)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for phase in ("loading data", "loaded synthetic", "compiling the train step", "training steps 1-3",
                "evaluating on the test split", "building the item index"):
    assert phase in proc.stderr, phase


def test_sigterm_during_the_final_evaluation_exits_75_and_the_rerun_evaluates(tmp_path, monkeypatch):
  cfg = _cfg(tmp_path, "train.steps=4")
  evaluate = Trainer.evaluate

  def preempted_evaluate(self, state, split=None):
    os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(self, state, split)

  monkeypatch.setattr(Trainer, "evaluate", preempted_evaluate)
  with pytest.raises(TrainingStopped) as stopped:
    jaxrec.train(cfg)
  assert stopped.value.exit_code == EXIT_PREEMPTED
  assert "final checkpoint (step 4) is saved" in str(stopped.value)
  assert not (tmp_path / "metrics.json").exists()
  monkeypatch.setattr(Trainer, "evaluate", evaluate)
  result = jaxrec.train(cfg)
  assert len(result["train/losses"]) == 4 and (tmp_path / "metrics.json").exists()
