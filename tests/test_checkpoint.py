"""Preemption and restore: resume equals uninterrupted, SIGTERM saves, damaged steps fall back,
checkpoints restore onto other meshes, incompatible configs are refused with a list."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointError, is_no_space
from jaxrec.config import load_config
from jaxrec.trainer import EXIT_PREEMPTED, Trainer
from jaxrec.workdir import LOCK_NAME, WorkdirBusy, WorkdirLock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


# The command, dying as a killed VM would once step ``sys.argv[1]`` has run.
_DIE_AT_STEP = """
import os, signal, sys
from jaxrec import cli, trainer
die_at, record = int(sys.argv.pop(1)), trainer.Trainer._record_step
def record_or_die(self, step, *args, **kwargs):
  if step == die_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return record(self, step, *args, **kwargs)
trainer.Trainer._record_step = record_or_die
sys.exit(cli.main(sys.argv[1:]))
"""


def _cli(workdir, *overrides, env_extra=None, wait=True, die_at_step=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             **(env_extra or {}))
  program = ["-m", "jaxrec.cli"] if die_at_step is None else ["-c", _DIE_AT_STEP, str(die_at_step)]
  cmd = [sys.executable, *program, "train", "--config", TINY, "--workdir", str(workdir), *overrides]
  if not wait:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _final_params(workdir, step):
  trainer = Trainer(load_config(TINY, ["mesh.num_devices=1", f"workdir={workdir}"]))
  restored_step, state = trainer.restore(step)
  assert restored_step == step
  return jax.tree.map(np.asarray, state["params"])


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  common = ["train.steps=40", "checkpoint.every=20", "checkpoint.async_save=false"]
  straight = _cli(tmp_path / "straight", *common)
  assert straight.returncode == 0, straight.stderr[-2000:]

  killed = _cli(tmp_path / "killed", *common, die_at_step=23)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not (tmp_path / "killed" / "metrics.json").exists()
  resumed = _cli(tmp_path / "killed", *common)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from checkpoint step 20" in resumed.stderr

  want = json.loads((tmp_path / "straight" / "metrics.json").read_text())["train/losses"]
  got = json.loads((tmp_path / "killed" / "metrics.json").read_text())["train/losses"]
  assert len(got) == len(want) == 40
  assert got[20:] == want[20:]  # bitwise: same program, same data, same state
  a, b = _final_params(tmp_path / "straight", 40), _final_params(tmp_path / "killed", 40)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes(tmp_path):
  proc = _cli(tmp_path, "train.steps=1000000", wait=False)
  deadline = time.time() + 300
  for line in proc.stderr:  # wait until the loop is running
    if "train step compiled" in line or time.time() > deadline:
      break
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
  assert "received SIGTERM; saved checkpoint at step" in err
  saved = int(err.split("saved checkpoint at step ")[1].split()[0])
  assert saved > 0
  resumed = _cli(tmp_path, f"train.steps={saved + 3}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resuming from checkpoint step {saved}" in resumed.stderr
  assert len(json.loads((tmp_path / "metrics.json").read_text())["train/losses"]) == saved + 3


@pytest.mark.slow
def test_damaged_latest_step_falls_back_with_a_warning(tmp_path, caplog):
  cfg = load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path}", "train.steps=20", "checkpoint.every=10"])
  Trainer(cfg).run()
  state_dir = tmp_path / "checkpoints" / "20" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate the array data
  with caplog.at_level(logging.WARNING, logger="jaxrec"):
    step, _ = Trainer(cfg).restore()
  assert step == 10
  assert "checkpoint step 20" in caplog.text and "unreadable" in caplog.text


@pytest.mark.slow
def test_restore_onto_other_meshes_gives_identical_values(tmp_path):
  base = [f"workdir={tmp_path}", "train.steps=4"]
  Trainer(load_config(TINY, base + ["mesh.data=4", "mesh.fsdp=2"])).run()
  reference = _final_params(tmp_path, 4)
  for mesh in (["mesh.data=2", "mesh.tensor=4"], ["mesh.data=8"], ["mesh.num_devices=1"]):
    trainer = Trainer(load_config(TINY, base + mesh))
    _, state = trainer.restore()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["params"]), reference)
    specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
    assert specs == jax.tree.map(lambda s: s.spec, trainer.state_shardings["params"])


def test_incompatible_checkpoint_lists_the_mismatched_parameters(tmp_path):
  base = ["mesh.num_devices=1", f"workdir={tmp_path}", "train.steps=2"]
  Trainer(load_config(TINY, base)).run()
  with pytest.raises(CheckpointError) as e:
    Trainer(load_config(TINY, base + ["model.embed_dim=24"])).restore()
  message = str(e.value)
  assert "does not fit this config" in message
  assert "params/item_tower/mlp/out/kernel: checkpoint (32, 16) vs model (32, 24)" in message
  assert "params/query_tower/mlp/out/bias: checkpoint (16,) vs model (24,)" in message
  assert "missing" not in message  # only the real differences are listed


@pytest.mark.slow
def test_best_validation_step_is_kept_beside_the_latest(tmp_path):
  cfg = load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path}", "train.steps=12", "train.eval_every=4",
                           "checkpoint.every=4", "checkpoint.keep=1", "checkpoint.best_metric=recall@10",
                           "checkpoint.async_save=false"])
  Trainer(cfg).run()
  best_dir = tmp_path / "checkpoints" / "best"
  kept = sorted(int(p.name) for p in best_dir.iterdir() if p.name.isdigit())
  assert len(kept) == 1 and kept[0] in (4, 8)
  latest = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert latest == [12]


@pytest.mark.slow
def test_failed_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  cfg = load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path}", "train.steps=10", "checkpoint.every=5",
                           "checkpoint.async_save=false"])
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 10:
      raise OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(CheckpointError, match=r"could not write checkpoint 10 to .*/checkpoints/10: no space left on device "
                                            r"\(the checkpoint needs [\d,]+ bytes\); earlier checkpoints are intact"):
    Trainer(cfg).run()
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  step, _ = Trainer(cfg).restore()
  assert step == 5


def test_workdir_lock_refuses_a_second_holder_naming_the_first(tmp_path):
  with WorkdirLock(tmp_path):
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["started"].endswith(" UTC")
    with pytest.raises(WorkdirBusy) as e:
      WorkdirLock(tmp_path).acquire()  # flock conflicts between two opens even in one process
    assert str(e.value).startswith(f"workdir {tmp_path} is in use by another trainer (host {holder['host']}, "
                                   f"pid {os.getpid()}, started {holder['started']}); ")
    assert "\n" not in str(e.value)
  with WorkdirLock(tmp_path):  # released: the next holder gets it
    pass


def test_workdir_lock_of_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
  stale = {"host": "gone-host", "pid": 4242, "started": "2026-01-02 03:04:05 UTC"}
  (tmp_path / LOCK_NAME).write_text(json.dumps(stale))  # a body, but no process holds its flock
  with caplog.at_level(logging.WARNING, logger="jaxrec"), WorkdirLock(tmp_path):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  assert (f"taking over the stale lock {tmp_path / LOCK_NAME} of a trainer that is gone (host gone-host, pid 4242, "
          f"started 2026-01-02 03:04:05 UTC)") in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxrec"), WorkdirLock(tmp_path):  # a clean release leaves nothing stale
    pass
  assert "stale" not in caplog.text


def test_workdir_lock_is_taken_by_process_zero_only(tmp_path):
  with WorkdirLock(tmp_path / "run", hold=False):
    assert not (tmp_path / "run").exists()


def test_no_space_is_recognised_in_orbax_and_tensorstore_errors():
  import errno
  assert is_no_space(OSError(errno.ENOSPC, "No space left on device"))
  wrapped = RuntimeError("commit failed")
  wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
  assert is_no_space(wrapped)
  assert is_no_space(ValueError("OUT_OF_RANGE: Error writing \"a/0\" in OCDBT database: Failed to write 338240 bytes "
                                "to file 4: No space left on device [os_error_code='28']"))
  assert not is_no_space(ValueError("Failed to write 338240 bytes to file 4: File too large [os_error_code='27']"))
  assert not is_no_space(OSError(errno.EIO, "Input/output error"))
