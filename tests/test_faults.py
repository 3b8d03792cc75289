"""Faults around the run directory, through the command line: a second trainer on a busy workdir,
a damaged final checkpoint, an unusable checkpoint directory, a full disk, and SIGKILL at random
moments. Each case exits with one line naming the problem (no traceback) and loses nothing saved."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrec.config import load_config
from jaxrec.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", JAXREC_HUGE_PAGES="0")

# Runs the command line with a full disk simulated under orbax (its background JSON writer, so the
# failure surfaces asynchronously) or under every file Python opens for writing, at the step or file named.
FULL_DISK = """
import builtins, errno, os, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from jaxrec.cli import main

def no_space(path):
  return OSError(errno.ENOSPC, "No space left on device", str(path))

real_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn
async def save_fn(self, x, directory):
  if directory.parent.name.split(".")[0] == os.environ.get("FULL_AT_STEP"):
    raise no_space(directory)
  return await real_save(self, x, directory)
json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_fn

class FullFile:
  def __init__(self, path): self.path = path
  def __enter__(self): return self
  def __exit__(self, *exc): return False
  def write(self, data): raise no_space(self.path)
  def close(self): pass

real_open = builtins.open
def full_open(path, mode="r", *args, **kwargs):
  if ("w" in mode or "x" in mode) and os.path.basename(str(path)).startswith(os.environ.get("FULL_AT_FILE", "-")):
    return FullFile(path)
  return real_open(path, mode, *args, **kwargs)
builtins.open = full_open
sys.exit(main())  # the process's entry point, as the jaxrec command is
"""


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "jaxrec.cli", "train", "--config", TINY, "--workdir", str(workdir), *overrides]


def _train(workdir, *overrides, env_extra=None, timeout=300, full_disk=False):
  cmd = _train_cmd(workdir, *overrides)
  if full_disk:
    cmd = [sys.executable, "-c", FULL_DISK, *cmd[3:]]
  return subprocess.run(cmd, capture_output=True, text=True, env=dict(ENV, **(env_extra or {})), cwd=ROOT,
                        timeout=timeout)


def _error_line(proc) -> str:
  """The run's one error line; nothing else on stderr is an error or a traceback."""
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  *before, last = proc.stderr.splitlines()
  assert last.startswith("jaxrec train: error: "), proc.stderr[-3000:]
  assert not [line for line in before if "ERROR" in line or "error:" in line], proc.stderr[-3000:]
  return last


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _restore(workdir, step):
  trainer = Trainer(load_config(TINY, ["mesh.num_devices=1", f"workdir={workdir}"]))
  restored, state = trainer.restore(step)
  assert restored == step
  return state


def _losses(workdir) -> list[float]:
  return json.loads((Path(workdir) / "metrics.json").read_text())["train/losses"]


def _wait_for(proc, marker: str, deadline_s: float = 300) -> None:
  deadline = time.time() + deadline_s
  for line in proc.stderr:
    if marker in line:
      return
    assert time.time() < deadline, f"no {marker!r} within {deadline_s} s"
  raise AssertionError(f"the run ended (rc {proc.wait()}) before {marker!r}")


@pytest.mark.slow
def test_second_trainer_on_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
  first = subprocess.Popen(_train_cmd(tmp_path, "train.steps=1000000", "checkpoint.every=0"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
  try:
    _wait_for(first, "train step compiled")
    holder = json.loads((tmp_path / ".jaxrec.lock").read_text())
    assert holder["pid"] == first.pid
    second = _train(tmp_path, "train.steps=4")
    assert second.returncode == 1, second.stderr[-3000:]
    line = _error_line(second)
    assert f"workdir {tmp_path} is in use by another trainer (host {holder['host']}, pid {first.pid}, " \
           f"started {holder['started']})" in line
    assert first.poll() is None  # the holder trains on, untouched
    assert json.loads((tmp_path / ".jaxrec.lock").read_text()) == holder
    assert not (tmp_path / "metrics.json").exists()
  finally:
    first.kill()
    first.communicate()
  # The kernel dropped the dead holder's flock: the next trainer takes the lock over and says whose it was.
  after = _train(tmp_path, "train.steps=4")
  assert after.returncode == 0, after.stderr[-3000:]
  assert f"taking over the stale lock {tmp_path / '.jaxrec.lock'} of a trainer that is gone (host {holder['host']}, " \
         f"pid {first.pid}" in after.stderr
  assert (tmp_path / ".jaxrec.lock").read_text() == ""  # released cleanly: nothing stale for the next run


@pytest.mark.slow
def test_damaged_final_step_is_moved_aside_and_saved_again(tmp_path):
  common = ["train.steps=30", "checkpoint.every=10"]
  straight = _train(tmp_path / "straight", *common)
  assert straight.returncode == 0, straight.stderr[-3000:]
  damaged = tmp_path / "damaged"
  first = _train(damaged, *common)
  assert first.returncode == 0, first.stderr[-3000:]
  arrays = [f for f in (damaged / "checkpoints" / "30" / "state").rglob("*")
            if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower()]
  assert arrays
  for f in arrays:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])

  rerun = _train(damaged, *common)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Traceback" not in rerun.stderr
  (moved,) = (damaged / "checkpoints" / "damaged").iterdir()
  assert moved.name.startswith("30-")
  assert f"checkpoint step 30 in {damaged / 'checkpoints'} is unreadable" in rerun.stderr
  assert f"moved it to {moved}" in rerun.stderr
  assert "resuming from checkpoint step 20" in rerun.stderr
  assert _steps(damaged) == [10, 20, 30]  # step 30 saved again; the earlier ones kept
  want, got = _losses(tmp_path / "straight"), _losses(damaged)
  assert len(got) == 30 and got == want
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, _restore(damaged, 30)["params"]),
               jax.tree.map(np.asarray, _restore(tmp_path / "straight", 30)["params"]))

  again = _train(damaged, *common)  # nothing damaged any more: the finished run just evaluates
  assert again.returncode == 0, again.stderr[-3000:]
  assert "unreadable" not in again.stderr and "resuming from checkpoint step 30" in again.stderr


def test_checkpoint_directory_that_is_a_file_fails_before_training(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  proc = _train(tmp_path, "train.steps=4", timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _error_line(proc) == (f"jaxrec train: error: checkpoint directory {tmp_path / 'checkpoints'} is not a "
                               f"directory (a file is in its place)")
  assert "train step compiled" not in proc.stderr  # refused before the first step, not at the first save
  assert (tmp_path / "checkpoints").read_text() == "not a directory"


def test_unwritable_checkpoint_directory_fails_before_training(tmp_path):
  if os.geteuid() == 0:  # root writes through any mode bits; sysfs takes no new files from anyone
    target = Path("/sys/kernel")
  else:
    target = tmp_path / "read-only"
    target.mkdir(mode=0o555)
  (tmp_path / "checkpoints").symlink_to(target)
  proc = _train(tmp_path, "train.steps=4", timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _error_line(proc)
  assert line.startswith(f"jaxrec train: error: checkpoint directory {tmp_path / 'checkpoints'} is not writable: ")
  assert "permission denied" in line
  assert "train step compiled" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("full_at", [10, 20])  # a periodic save (seen at the next save) and the final one (at close)
def test_disk_full_during_an_async_save_is_one_line_and_keeps_earlier_steps(tmp_path, full_at):
  proc = _train(tmp_path, "train.steps=20", "checkpoint.every=5", "checkpoint.async_save=true", full_disk=True,
                env_extra={"FULL_AT_STEP": str(full_at)})
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _error_line(proc)
  earlier = [s for s in (5, 10, 15) if s < full_at]
  state = _restore(tmp_path, earlier[-1])  # what was saved before the full disk still restores
  needed = sum(x.nbytes for x in jax.tree.leaves(state))
  assert line == (f"jaxrec train: error: could not write checkpoint {full_at} to {tmp_path / 'checkpoints' / str(full_at)}: "
                  f"no space left on device (the checkpoint needs {needed:,} bytes); earlier checkpoints are intact")
  assert len(proc.stderr.splitlines()) < 20  # orbax's per-thread tracebacks stay out of the way
  assert _steps(tmp_path) == earlier
  assert not (tmp_path / "metrics.json").exists()

  rerun = _train(tmp_path, "train.steps=20", "checkpoint.every=5")  # space freed: the run resumes and finishes
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resuming from checkpoint step {earlier[-1]}" in rerun.stderr
  assert _steps(tmp_path) == [10, 15, 20]


@pytest.mark.slow
def test_disk_full_writing_metrics_json_names_the_file(tmp_path):
  proc = _train(tmp_path, "train.steps=10", "checkpoint.every=5", full_disk=True, env_extra={"FULL_AT_FILE": "metrics.json"})
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _error_line(proc)
  assert line.startswith(f"jaxrec train: error: could not write {tmp_path / 'metrics.json'}: no space left on device (")
  assert not list(tmp_path.glob("metrics.json*"))  # neither the file nor its temporary
  assert _steps(tmp_path) == [5, 10]
  _restore(tmp_path, 10)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_finishing_equals_an_uninterrupted_run(tmp_path):
  common = ["train.steps=300", "checkpoint.every=10", "checkpoint.async_save=true"]
  straight = _train(tmp_path / "straight", *common)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = tmp_path / "killed"
  rng = random.Random(31)
  for attempt in range(3):
    proc = subprocess.Popen(_train_cmd(killed, *common), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    try:
      _wait_for(proc, "train step compiled")
      time.sleep(rng.uniform(0.0, 2.0))  # within the loop (300 steps take over 3 s): mid-step, mid-save, between saves
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"attempt {attempt} ended by itself (rc {proc.returncode})"
    assert not (killed / "metrics.json").exists()
  finished = _train(killed, *common)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "taking over the stale lock" in finished.stderr
  want, got = _losses(tmp_path / "straight"), _losses(killed)
  assert len(got) == 300 and got == want  # bitwise: same program, same data, same state
