"""`jaxrec export` pointed at the wrong place: one line, a non-zero exit, and nothing of the run lost."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrec.retrieval import ItemIndex

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def jaxrec(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxrec.cli", *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)


def snapshot(root: Path) -> dict[str, str]:
  """Every file and directory under root -> its content hash ("dir" for directories)."""
  out = {}
  for path in sorted(root.rglob("*")):
    rel = str(path.relative_to(root))
    out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def refused(proc, path):
  assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxrec export: error:")]
  assert len(lines) == 1 and str(path) in lines[0], proc.stderr[-2000:]
  return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  work = tmp_path_factory.mktemp("run") / "w"
  proc = jaxrec("train", "--config", TINY, "--workdir", str(work), "train.steps=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any((work / "checkpoints").iterdir())
  return work


def test_export_refuses_the_workdir_itself_and_keeps_every_checkpoint(workdir):
  before = snapshot(workdir)
  line = refused(jaxrec("export", "--workdir", str(workdir), "--out", str(workdir)), workdir)
  assert "without an ItemIndex manifest" in line
  assert snapshot(workdir) == before
  assert not [p for p in workdir.parent.iterdir() if p.name != workdir.name]  # no temporary left


def test_export_refuses_an_existing_file(workdir, tmp_path):
  target = tmp_path / "notes.txt"
  target.write_text("mine")
  before = snapshot(workdir)
  line = refused(jaxrec("export", "--workdir", str(workdir), "--out", str(target)), target)
  assert "exists and is not a directory" in line
  assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  assert snapshot(workdir) == before


def test_export_replaces_an_earlier_index_and_nothing_else(workdir):
  index_dir = workdir / "index"
  others = {k: v for k, v in snapshot(workdir).items() if not k.startswith("index")}
  proc = jaxrec("export", "--workdir", str(workdir), "--out", str(index_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {k: v for k, v in snapshot(workdir).items() if not k.startswith("index")} == others
  assert len(ItemIndex.load(str(index_dir))) > 0


@pytest.mark.parametrize("damage", ['{"train": {"steps": 4', '[1, 2]', '{"no_such_group": {}}'])
def test_a_damaged_workdir_config_json_names_the_file(tmp_path, damage):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text(damage)
  proc = subprocess.run([sys.executable, "-m", "jaxrec.cli", "evaluate", "--workdir", str(workdir)],
                        capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env=dict(os.environ, JAXREC_HUGE_PAGES="0", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr
  assert f"the workdir's config {workdir / 'config.json'} is damaged" in lines[0]
