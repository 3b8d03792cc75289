"""The command line as a user meets it: one clear line on bad input, sensible output otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def jaxrec(*args, check=False):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "jaxrec.cli", *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _one_line_error(proc, code, text):
  assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
  lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxrec ")]
  assert len(lines) == 1 and text in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  proc = jaxrec("train", "--config", TINY, "--workdir", str(workdir), "train.steps=30", check=True)
  return workdir, proc


def test_train_writes_metrics_index_and_prints_a_table(trained):
  workdir, proc = trained
  metrics = json.loads((workdir / "metrics.json").read_text())
  for key in ("recall@10", "ndcg@10", "mrr@10", "hit@10", "recall@50", "popularity/recall@10", "cold/recall@10",
              "warm/recall@10", "train/final_loss", "train/examples_per_sec", "steps", "protocol"):
    assert key in metrics, key
  assert len(metrics["train/losses"]) == 30 and metrics["steps"] == 30
  assert (workdir / "index").is_dir() and (workdir / "checkpoints").is_dir() and (workdir / "tb").is_dir()
  assert "popularity" in proc.stdout and "R@10" in proc.stdout


def test_recommend_prints_history_and_titles(trained):
  workdir, _ = trained
  proc = jaxrec("recommend", "--workdir", str(workdir), "--user", "3", "--k", "5", check=True)
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("user 3:")
  recs = [line for line in lines if line.strip()[:2].strip().rstrip(".").isdigit()]
  assert len(recs) == 5
  assert all("#" in line for line in recs)  # synthetic titles end in "#<item id>"


def test_evaluate_restores_the_latest_checkpoint(trained):
  workdir, _ = trained
  proc = jaxrec("evaluate", "--workdir", str(workdir), check=True)
  assert "step 30" in proc.stdout
  again = json.loads(next(workdir.glob("eval_step30.json")).read_text())
  final = json.loads((workdir / "metrics.json").read_text())
  assert again["recall@10"] == pytest.approx(final["recall@10"], abs=1e-9)


def test_unknown_user(trained):
  workdir, _ = trained
  _one_line_error(jaxrec("recommend", "--workdir", str(workdir), "--user", "no-such-user"), 2,
                  "unknown user id 'no-such-user'")


def test_bad_config_key_and_type(tmp_path):
  _one_line_error(jaxrec("train", "--config", TINY, "--workdir", str(tmp_path), "train.stpes=3"), 1,
                  "unknown config key 'train.stpes'; did you mean 'train.steps'?")
  _one_line_error(jaxrec("train", "--config", TINY, "--workdir", str(tmp_path), "train.steps=many"), 1,
                  "config key 'train.steps' expects int, got 'many'")
  assert not (tmp_path / "metrics.json").exists()


def test_missing_workdir(tmp_path):
  _one_line_error(jaxrec("evaluate", "--workdir", str(tmp_path / "nope")), 2, "workdir not found")
  _one_line_error(jaxrec("recommend", "--workdir", str(tmp_path / "nope"), "--user", "1"), 2, "workdir not found")


def test_debug_shows_the_traceback(tmp_path):
  proc = jaxrec("--debug", "train", "--config", TINY, "train.stpes=3")
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_study_command_forwards_the_runners_flags(tmp_path):
  proc = jaxrec("study", "--config", str(ROOT / "configs" / "study" / "paradigm.py"), "--out", str(tmp_path / "s"),
                "--list", "--only", "ml1m/random/id/f1/*", check=True)
  listed = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
  assert listed == ["ml1m/random/id/f1/s0", "ml1m/random/id/f1/s1", "ml1m/random/id/f1/s2"]
  assert not list((tmp_path / "s").rglob("metrics.json"))  # --list trains nothing
