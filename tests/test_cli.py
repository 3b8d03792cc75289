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


@pytest.mark.slow
def test_train_writes_metrics_index_and_prints_a_table(trained):
  workdir, proc = trained
  metrics = json.loads((workdir / "metrics.json").read_text())
  for key in ("recall@10", "ndcg@10", "mrr@10", "hit@10", "recall@50", "popularity/recall@10", "cold/recall@10",
              "warm/recall@10", "train/final_loss", "train/examples_per_sec", "steps", "protocol"):
    assert key in metrics, key
  assert len(metrics["train/losses"]) == 30 and metrics["steps"] == 30
  assert (workdir / "index").is_dir() and (workdir / "checkpoints").is_dir() and (workdir / "tb").is_dir()
  assert "popularity" in proc.stdout and "R@10" in proc.stdout


@pytest.mark.slow
def test_recommend_prints_history_and_titles(trained):
  workdir, _ = trained
  proc = jaxrec("recommend", "--workdir", str(workdir), "--user", "3", "--k", "5", check=True)
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("user 3:")
  recs = [line for line in lines if line.strip()[:2].strip().rstrip(".").isdigit()]
  assert len(recs) == 5
  assert all("#" in line for line in recs)  # synthetic titles end in "#<item id>"


@pytest.mark.slow
def test_evaluate_restores_the_latest_checkpoint(trained):
  workdir, _ = trained
  proc = jaxrec("evaluate", "--workdir", str(workdir), check=True)
  assert "step 30" in proc.stdout
  again = json.loads(next(workdir.glob("eval_step30.json")).read_text())
  final = json.loads((workdir / "metrics.json").read_text())
  assert again["recall@10"] == pytest.approx(final["recall@10"], abs=1e-9)


@pytest.mark.slow
def test_unknown_user(trained):
  workdir, _ = trained
  _one_line_error(jaxrec("recommend", "--workdir", str(workdir), "--user", "no-such-user"), 2,
                  "unknown user id 'no-such-user'")


def test_bad_config_key_and_type(tmp_path):
  _one_line_error(jaxrec("train", "--config", TINY, "--workdir", str(tmp_path), "train.stpes=3"), 2,
                  "unknown config key 'train.stpes'; did you mean 'train.steps'?")
  _one_line_error(jaxrec("train", "--config", TINY, "--workdir", str(tmp_path), "train.steps=many"), 2,
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


def _table(stdout: str) -> dict[str, list[str]]:
  """``jaxrec config show``'s rows: key -> [type, value, default] (the comment's further lines skipped)."""
  rows = {}
  for line in stdout.splitlines()[1:]:
    if line[2:3].strip():
      key, *cells = line[2:].split(maxsplit=4)
      rows[key] = cells[:3]
  return rows


def test_config_show_lists_every_key_with_its_type_value_default_and_comment(tmp_path):
  from jaxrec.config import all_keys, load_config
  proc = jaxrec("config", "show", "--config", TINY, "train.steps=5", "model.mlp_dims=8,4", check=True)
  lines = proc.stdout.splitlines()
  assert lines[0].split() == ["key", "type", "value", "default", "comment"]
  rows = _table(proc.stdout)
  assert list(rows) == all_keys(load_config(TINY))
  assert rows["train.steps"] == ["int", "5", "600"] and rows["model.mlp_dims"] == ["tuple[int,", "...]", "8,4"]
  assert rows["model.use_text"] == ["bool", "false", "true"]
  assert any(line.startswith("* train.steps ") for line in lines)
  assert next(line for line in lines if line[2:].startswith("data.split ")).endswith("random | loo | temporal | predefined")
  # No --config: the default config; --workdir alone: that run's saved config.
  assert _table(jaxrec("config", "show", check=True).stdout)["train.steps_per_call"][1] == "10"
  (tmp_path / "config.json").write_text(json.dumps(json.loads(
      __import__("jaxrec.config").config.to_json(load_config(TINY, ["train.steps=7"])))))
  assert _table(jaxrec("config", "show", "--workdir", str(tmp_path), check=True).stdout)["train.steps"][1] == "7"


def test_overrides_may_follow_an_option():
  # argparse alone gives the positional overrides only their first run of words.
  rows = _table(jaxrec("config", "show", "--config", TINY, "train.steps=5", "--debug", "eval.split=valid",
                       check=True).stdout)
  assert rows["train.steps"][1] == "5" and rows["eval.split"][1] == "valid"
  proc = jaxrec("config", "show", "--config", TINY, "--bogus")
  assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_config_errors_exit_2_as_bad_usage(tmp_path):
  _one_line_error(jaxrec("config", "show", "--config", TINY, "model.use_text=yes"), 2,
                  "config key 'model.use_text' expects bool (true, false, 1 or 0), got 'yes'")
  _one_line_error(jaxrec("config", "show", "--config", str(tmp_path / "missing.py")), 2, "config file not found")
  _one_line_error(jaxrec("train", "--config", TINY, "--workdir", str(tmp_path), "train.steps=0"), 2,
                  "config key 'train.steps' must be positive")
  assert not (tmp_path / "metrics.json").exists()


def test_config_paths_and_python_m_jaxrec_work_from_any_directory(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "jaxrec", "config", "show", "--config", "configs/tiny.py",
                         "train.steps=3"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _table(proc.stdout)["workdir"][1] == "runs/tiny" and _table(proc.stdout)["train.steps"][1] == "3"
  proc = subprocess.run([sys.executable, "-m", "jaxrec", "study", "--config", "configs/study/tiny.py", "--out",
                         str(tmp_path / "s"), "--list"], capture_output=True, text=True, env=env, cwd=tmp_path,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "synthetic/cold/id/f0.5/s0" in proc.stdout.split()


def test_ctrl_c_outside_the_train_loop_is_one_line_and_exit_130(monkeypatch, capsys):
  from jaxrec import cli

  def interrupted(args):
    raise KeyboardInterrupt
  monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
  assert cli.main(["train"]) == 130
  assert capsys.readouterr().err.strip() == "jaxrec train: interrupted"
