"""Two processes x 4 CPU devices on 127.0.0.1 train exactly like one process x 8 devices, and a run
whose process dies stops everywhere within seconds."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from jaxrec.config import MeshConfig
from jaxrec import mesh
from jaxrec.mesh import MeshError, maybe_initialize_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
ARGS = ["train.steps=20", "mesh.data=8", "checkpoint.async_save=false"]


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "jaxrec.cli", "train", "--config", TINY, "--workdir", str(workdir), *ARGS, *overrides]


LAUNCHER = str(ROOT / "launch" / "local.sh")


def _multi_and_single(tmp_path, *overrides):
  env = dict(os.environ, JAXREC_LOG_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
  multi = subprocess.run(["bash", LAUNCHER, "2", "4",
                          *_train_cmd(tmp_path / "multi", *overrides)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-3000:]
  single_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  single = subprocess.run(_train_cmd(tmp_path / "single", *overrides), capture_output=True, text=True, env=single_env,
                          cwd=ROOT, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  multi_losses = json.loads((tmp_path / "multi" / "metrics.json").read_text())["train/losses"]
  single_losses = json.loads((tmp_path / "single" / "metrics.json").read_text())["train/losses"]
  return multi, multi_losses, single_losses


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  multi, multi_losses, single_losses = _multi_and_single(tmp_path)
  assert len(multi_losses) == 20
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)

  checksum = re.compile(r"final parameter checksum (\w+)")
  process0 = checksum.search(multi.stdout + multi.stderr).group(1)
  process1 = checksum.search((tmp_path / "process_1.log").read_text()).group(1)
  assert process0 == process1
  assert "process 1 of 2" in (tmp_path / "process_1.log").read_text()


@pytest.mark.slow
def test_two_processes_match_one_process_fine_tuning_the_encoder_on_a_token_stream(tmp_path):
  # Each process streams the texts of its share of the batch's distinct items into its half of the
  # global token stream; the encoder must see the same texts as one process does.
  from fixtures import tiny_bert
  encoder = tiny_bert.write(tmp_path / "tiny_bert")
  _, multi_losses, single_losses = _multi_and_single(
      tmp_path, "model.use_text=true", "encoder.mode=full", f"encoder.path={encoder}", "train.steps=6",
      "train.batch_size=32", "data.history=sampled")
  assert len(multi_losses) == 6
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)


@pytest.mark.slow
def test_unreachable_coordinator_fails_with_a_clear_error(tmp_path):
  env = dict(os.environ, JAXREC_COORDINATOR="127.0.0.1:9", JAXREC_NUM_PROCESSES="2", JAXREC_PROCESS_ID="1",
             JAXREC_INIT_TIMEOUT="10", JAX_PLATFORMS="cpu")
  proc = subprocess.run(_train_cmd(tmp_path) + ["mesh.num_devices=0"], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  assert proc.returncode != 0
  assert "could not join the coordinator at 127.0.0.1:9 as process 1 of 2 within 10s" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_heartbeat_and_join_timeouts_must_be_positive():
  with pytest.raises(MeshError, match=r"mesh.heartbeat_timeout_s=0 and mesh.init_timeout_s=300 must both be at least 1"):
    maybe_initialize_distributed(MeshConfig(heartbeat_timeout_s=0))


def test_a_failed_collective_ends_the_process_with_one_line_and_no_shutdown_barrier(monkeypatch, capsys):
  exits = []
  monkeypatch.setattr(mesh.jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(mesh.os, "_exit", exits.append)
  mesh.stop_if_peer_lost("jaxrec train: error: ", "INTERNAL: the loss is negative")
  assert exits == [] and capsys.readouterr().err == ""  # other errors exit normally, through the barrier
  gloo = "UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:4242: Connection reset by peer"
  mesh.stop_if_peer_lost("jaxrec train: error: ", gloo)
  assert exits == [mesh.EXIT_PEER_LOST]
  assert capsys.readouterr().err == (f"jaxrec train: error: process 0 of 1 lost contact with another process ({gloo}); "
                                     "stopping without waiting for it: see the other processes' logs for the first failure\n")


# A stand-in worker: records its pid and a child's, then process FAIL_ID fails; the others wait long.
# Process LOST_ID, when set, first exits as a process whose peer is gone (jaxrec.mesh.EXIT_PEER_LOST).
FAKE_WORKER = """
sleep 600 &
echo "$$ $!" > "$PID_DIR/process_$JAXREC_PROCESS_ID"
if [ "$JAXREC_PROCESS_ID" = "${LOST_ID:-}" ]; then sleep 0.3; exit 76; fi
if [ "$JAXREC_PROCESS_ID" = "$FAIL_ID" ]; then sleep 1; exit 7; fi
wait
"""


@pytest.fixture
def launched():
  """Starts launchers; whatever a failing test leaves running is killed with its whole tree."""
  procs = []

  def launch(args, **kwargs):
    procs.append(subprocess.Popen(["bash", LAUNCHER, *args], cwd=ROOT, text=True, **kwargs))
    return procs[-1]
  yield launch
  for proc in procs:
    if proc.poll() is None:
      for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
      proc.kill()
      proc.wait()


def _fake_run(launched, tmp_path, num, fail_id, lost_id=""):
  env = dict(os.environ, JAXREC_LOG_DIR=str(tmp_path), PID_DIR=str(tmp_path), FAIL_ID=str(fail_id), JAXREC_STOP_GRACE="5",
             LOST_ID=str(lost_id), JAXREC_CAUSE_WAIT="3")
  return launched([str(num), "1", "bash", "-c", FAKE_WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _recorded_pids(tmp_path, num):
  deadline = time.monotonic() + 20
  while len(list(tmp_path.glob("process_?"))) < num or any(not f.read_text().strip() for f in tmp_path.glob("process_?")):
    assert time.monotonic() < deadline, "the stand-in workers did not start"
    time.sleep(0.1)
  return [int(pid) for f in tmp_path.glob("process_?") for pid in f.read_text().split()]


def _alive(pids):
  return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("fail_id", [0, 2])
def test_launcher_stops_every_process_and_names_the_one_that_failed(tmp_path, launched, fail_id):
  started = time.monotonic()
  launcher = _fake_run(launched, tmp_path, 3, fail_id)
  stdout, stderr = launcher.communicate(timeout=60)
  assert launcher.returncode == 7, stderr
  assert time.monotonic() - started < 20
  line = re.compile(rf"launch/local.sh: process {fail_id} of 3 \(pid \d+\) exited with status 7\b.*; stopping the others")
  assert line.search(stderr), stderr
  assert "no such job" not in stderr and "unbound variable" not in stderr and "Killed" not in stderr
  assert _alive(_recorded_pids(tmp_path, 3)) == []  # workers and what they started, not only wrapper shells


@pytest.mark.parametrize("fail_id", [2, -1])
def test_launcher_names_the_failure_that_made_another_process_lose_its_peer(tmp_path, launched, fail_id):
  # Process 0 exits first, as a survivor of a dead peer does; the process that failed on its own a
  # moment later is the cause to report. With none (fail_id -1), the survivor is named after the wait.
  assert mesh.EXIT_PEER_LOST == 76  # the status launch/local.sh knows
  launcher = _fake_run(launched, tmp_path, 3, fail_id, lost_id=0)
  _, stderr = launcher.communicate(timeout=60)
  named, status = (fail_id, 7) if fail_id >= 0 else (0, 76)
  assert launcher.returncode == status, stderr
  assert re.search(rf"launch/local.sh: process {named} of 3 \(pid \d+\) exited with status {status}\b", stderr), stderr
  assert stderr.count("launch/local.sh:") == 1, stderr
  assert _alive(_recorded_pids(tmp_path, 3)) == []


def test_launcher_stops_every_process_when_it_is_terminated(tmp_path, launched):
  launcher = _fake_run(launched, tmp_path, 2, -1)
  pids = _recorded_pids(tmp_path, 2)
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=30)
  assert launcher.returncode == 143
  assert "launch/local.sh: received SIGTERM; stopping all 2 processes" in stderr
  assert _alive(pids) == []


def _jaxrec_processes(root: psutil.Process):
  return [p for p in root.children(recursive=True) if "jaxrec.cli" in " ".join(p.cmdline())]


def _wait_for_training(log: Path, timeout_s=300):
  deadline = time.monotonic() + timeout_s
  while not (log.exists() and "train step compiled" in log.read_text()):
    assert time.monotonic() < deadline, log.read_text() if log.exists() else f"no {log}"
    time.sleep(0.2)
  time.sleep(2)  # into the steps' collectives


LONG_RUN = ["train.steps=100000", "train.eval_every=0"]


@pytest.mark.slow
def test_launcher_stops_a_training_run_whose_worker_was_killed(tmp_path, launched):
  env = dict(os.environ, JAXREC_LOG_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
  launcher = launched(["2", "4", *_train_cmd(tmp_path / "run", *LONG_RUN)], env=env, stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
  _wait_for_training(tmp_path / "process_1.log")
  workers = _jaxrec_processes(psutil.Process(launcher.pid))
  assert len(workers) == 2
  victim = next(p for p in workers if p.environ().get("JAXREC_PROCESS_ID") == "1")
  killed = time.monotonic()
  victim.kill()
  _, stderr = launcher.communicate(timeout=120)
  assert time.monotonic() - killed < 40
  assert launcher.returncode == 137, stderr[-3000:]
  assert re.search(r"launch/local.sh: process 1 of 2 \(pid \d+\) exited with status 137 \(killed by SIGKILL\)", stderr)
  assert _alive([p.pid for p in workers]) == []


@pytest.mark.slow
def test_a_process_whose_peer_died_stops_within_30s_with_one_clear_line(tmp_path):
  # Without a launcher to stop it, the survivor must notice on its own: from the failed collective,
  # or from the coordination service's heartbeat timeout (mesh.heartbeat_timeout_s=10). Process 0
  # survives: it hosts that service, which JAX's default 100 s timeout kept waiting for minutes
  # (a dead process 0 instead fails the others' error polling at once).
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workers = []
  for pid in range(2):
    env = dict(os.environ, JAXREC_COORDINATOR=f"127.0.0.1:{port}", JAXREC_NUM_PROCESSES="2", JAXREC_PROCESS_ID=str(pid),
               JAXREC_LOCAL_DEVICES="4", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    log = open(tmp_path / f"process_{pid}.log", "w")
    workers.append(subprocess.Popen(_train_cmd(tmp_path / "run", *LONG_RUN), env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
  try:
    _wait_for_training(tmp_path / "process_0.log")
    workers[1].kill()
    killed = time.monotonic()
    code = workers[0].wait(timeout=120)
    assert time.monotonic() - killed < 30
  finally:
    for worker in workers:
      if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
  output = (tmp_path / "process_0.log").read_text()
  assert code != 0
  # The collective's error is turned into one line; XLA's heartbeat abort names the cause itself.
  assert ("jaxrec train: error: process 0 of 2 lost contact with another process" in output
          or "This most likely indicates that another task died" in output), output[-3000:]
  assert "Traceback" not in output


class _CoordinationStore:
  """The coordination service's key-value store and barrier as flags_of_all_processes uses them."""

  def __init__(self):
    self.values, self.barriers = {}, 0

  def key_value_set(self, key, value, allow_overwrite=False):
    self.values[key] = value

  def wait_at_barrier(self, barrier_id, timeout_in_ms):
    self.barriers += 1

  def key_value_dir_get(self, prefix):
    return [(key, value) for key, value in self.values.items() if key.startswith(prefix)]


def test_every_process_learns_at_the_same_point_which_one_received_a_signal(monkeypatch):
  from jax._src import distributed
  from jaxrec import trainer
  store = _CoordinationStore()
  monkeypatch.setattr(distributed.global_state, "client", store)
  monkeypatch.setattr(mesh.jax, "process_count", lambda: 2)
  as_process = lambda pid: monkeypatch.setattr(mesh.jax, "process_index", lambda: pid)
  as_process(1)
  assert mesh.flags_of_all_processes("step 4", "SIGTERM") == {1: "SIGTERM"}  # before its barrier at step 4
  as_process(0)
  assert mesh.flags_of_all_processes("step 4", None) == {1: "SIGTERM"}
  assert mesh.flags_of_all_processes("step 40", None) == {}  # a point's keys only, not a longer name's
  assert store.barriers == 3
  flag = trainer._SignalFlag()
  try:
    assert flag.agreed("step 4") == "process 1 of 2 received SIGTERM"  # process 0 received none itself
    flag.raised = "SIGINT"
    assert flag.agreed("after training") == "process 0 of 2 received SIGINT"
    store.values["jaxrec/flags/evaluated/1"] = "SIGINT"
    assert flag.agreed("evaluated") == "processes 0, 1 of 2 received SIGINT"
  finally:
    flag.restore()
  monkeypatch.setattr(mesh.jax, "process_count", lambda: 1)
  assert mesh.flags_of_all_processes("step 4", None) == {} and store.barriers == 6  # one process: no service
  assert mesh.flags_of_all_processes("step 4", "SIGTERM") == {0: "SIGTERM"} and store.barriers == 6


def _start_processes(tmp_path, name, *overrides, num=2):
  """``num`` jaxrec train processes on one coordinator, each in its own session (so a test can
  signal one alone); process i logs to tmp_path/{name}_{i}.log."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workers = []
  for pid in range(num):
    env = dict(os.environ, JAXREC_COORDINATOR=f"127.0.0.1:{port}", JAXREC_NUM_PROCESSES=str(num),
               JAXREC_PROCESS_ID=str(pid), JAXREC_LOCAL_DEVICES=str(8 // num), JAX_PLATFORMS="cpu",
               JAXREC_HUGE_PAGES="0", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num}")
    with open(tmp_path / f"{name}_{pid}.log", "w") as log:
      workers.append(subprocess.Popen(_train_cmd(tmp_path / name, *overrides), env=env, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
  return workers


def _finish(workers, timeout_s):
  try:
    return [worker.wait(timeout=timeout_s) for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)


# warmup 0 and a final rate equal to the peak: the rate no longer depends on train.steps, so a
# run stopped early and resumed to N steps takes the same steps as one trained to N straight.
CONSTANT_RATE = ["train.warmup_steps=0", "train.end_lr_fraction=1.0", "train.eval_every=0"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step_and_the_rerun_is_exact(tmp_path):
  workers = _start_processes(tmp_path, "stopped", "train.steps=100000", *CONSTANT_RATE)
  try:
    _wait_for_training(tmp_path / "stopped_1.log")
    workers[1].send_signal(signal.SIGTERM)  # only process 1, as a preempted host is
    signalled = time.monotonic()
  finally:
    codes = _finish(workers, timeout_s=60)
  assert time.monotonic() - signalled < 30
  logs = [(tmp_path / f"stopped_{pid}.log").read_text() for pid in range(2)]
  assert codes == [75, 75], logs[0][-2000:] + logs[1][-2000:]
  line = re.compile(r"jaxrec train: error: process 1 of 2 received SIGTERM; saved checkpoint at step (\d+) in ")
  saved = [int(line.search(log).group(1)) for log in logs]
  assert saved[0] == saved[1] > 0
  assert sorted(int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir() if p.name.isdigit()) == [saved[0]]
  assert all("Traceback" not in log for log in logs)

  steps = f"train.steps={saved[0] + 3}"
  assert _finish(_start_processes(tmp_path, "stopped", steps, *CONSTANT_RATE), timeout_s=300) == [0, 0]
  assert _finish(_start_processes(tmp_path, "straight", steps, *CONSTANT_RATE), timeout_s=300) == [0, 0]
  assert f"resuming from checkpoint step {saved[0]}" in (tmp_path / "stopped_0.log").read_text()
  resumed, straight = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("stopped", "straight"))
  assert len(resumed["train/losses"]) == saved[0] + 3
  assert resumed["train/losses"] == straight["train/losses"]  # bitwise: same steps on the same data
  checksum = re.compile(r"final parameter checksum (\w+)")
  sums = {checksum.search((tmp_path / f"{name}_{pid}.log").read_text()).group(1)
          for name in ("stopped", "straight") for pid in range(2)}
  assert len(sums) == 1
