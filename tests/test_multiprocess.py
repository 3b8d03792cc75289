"""Two processes x 4 CPU devices on 127.0.0.1 train exactly like one process x 8 devices."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
ARGS = ["train.steps=20", "mesh.data=8", "checkpoint.async_save=false"]


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "jaxrec.cli", "train", "--config", TINY, "--workdir", str(workdir), *ARGS, *overrides]


def _multi_and_single(tmp_path, *overrides):
  env = dict(os.environ, JAXREC_LOG_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
  multi = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", "4",
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


def test_two_processes_match_one_process(tmp_path):
  multi, multi_losses, single_losses = _multi_and_single(tmp_path)
  assert len(multi_losses) == 20
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)

  checksum = re.compile(r"final parameter checksum (\w+)")
  process0 = checksum.search(multi.stdout + multi.stderr).group(1)
  process1 = checksum.search((tmp_path / "process_1.log").read_text()).group(1)
  assert process0 == process1
  assert "process 1 of 2" in (tmp_path / "process_1.log").read_text()


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


def test_unreachable_coordinator_fails_with_a_clear_error(tmp_path):
  env = dict(os.environ, JAXREC_COORDINATOR="127.0.0.1:9", JAXREC_NUM_PROCESSES="2", JAXREC_PROCESS_ID="1",
             JAXREC_INIT_TIMEOUT="10", JAX_PLATFORMS="cpu")
  proc = subprocess.run(_train_cmd(tmp_path) + ["mesh.num_devices=0"], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  assert proc.returncode != 0
  assert "could not join the coordinator at 127.0.0.1:9 as process 1 of 2 within 10s" in proc.stderr
  assert "Traceback" not in proc.stderr
