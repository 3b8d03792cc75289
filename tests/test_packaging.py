"""What `pip install .` ships and how the installed package finds its files: every module, the
configs (as jaxrec/configs, while the repository keeps them at configs/), py.typed, `python -m
jaxrec`, and the lazily imported public names."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import jaxrec

ROOT = Path(__file__).resolve().parents[1]


def _sources(folder: Path) -> list[Path]:
  return sorted(p.relative_to(folder) for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  # Built from a copy, so the build's own folders (build/, *.egg-info) stay out of the working tree.
  source = tmp_path_factory.mktemp("source")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for name in ("jaxrec", "configs"):
    shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  out = tmp_path_factory.mktemp("wheel")
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = out.glob("jaxrec-*.whl")
  return path


def test_the_wheel_ships_every_module_the_configs_and_py_typed(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {f"jaxrec/{p.as_posix()}" for p in _sources(ROOT / "jaxrec")} <= names  # pyproject lists every package
  configs = {f"jaxrec/configs/{p.as_posix()}" for p in _sources(ROOT / "configs")}
  assert {"jaxrec/configs/default.py", "jaxrec/configs/tiny.py", "jaxrec/configs/study/tiny.py"} <= configs <= names
  assert {"jaxrec/py.typed", "jaxrec/__main__.py"} <= names


def test_the_installed_package_finds_its_configs_from_any_directory(wheel, tmp_path):
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages, for a pure-Python wheel
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu", JAXREC_HUGE_PAGES="0")
  code = textwrap.dedent("""
    import jaxrec, jaxrec.cli, jaxrec.study
    from jaxrec.config import configs_dir, load_config
    print(jaxrec.__file__)
    print(configs_dir())
    print(jaxrec.cli.DEFAULT_CONFIG, load_config(jaxrec.cli.DEFAULT_CONFIG).workdir)
    print(load_config("configs/tiny.py").workdir, load_config("study/../tiny.py").workdir)
    study = jaxrec.study.load_study("configs/study/tiny.py")
    cell = jaxrec.study.plan(study, "out")[0]
    print(jaxrec.study.cell_config(cell).data.synthetic.num_items)
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=elsewhere,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [
      str(site / "jaxrec" / "__init__.py"),
      str(site / "jaxrec" / "configs"),
      f"{site / 'jaxrec' / 'configs' / 'default.py'} runs/default",
      "runs/tiny runs/tiny",
      "90",
  ]
  proc = subprocess.run([sys.executable, "-m", "jaxrec", "study", "--config", "configs/study/tiny.py", "--out", "s",
                         "--list"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "synthetic/cold/hybrid/f1/s1" in proc.stdout.split()


def test_dir_lists_the_lazily_imported_public_names():
  names = dir(jaxrec)
  assert set(jaxrec.__all__) <= set(names) and {"load_config", "train", "ItemIndex", "__version__"} <= set(names)
  assert names == sorted(names)


def test_no_module_shadows_a_public_function():
  # Importing jaxrec.X binds the submodule as the package's attribute X: a module named like a
  # public function (train.py, evaluate.py) would turn `jaxrec.train(cfg)` into a module.
  import importlib
  import pkgutil
  for module in pkgutil.walk_packages(jaxrec.__path__, "jaxrec."):
    if not module.name.endswith("__main__"):
      importlib.import_module(module.name)
  for name in jaxrec.__all__:
    if name[0].islower() and name != "__version__":
      assert callable(getattr(jaxrec, name)) and not isinstance(getattr(jaxrec, name), type(jaxrec)), name


def test_python_m_jaxrec_is_the_jaxrec_command(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "jaxrec", "config", "show", "--config", "configs/tiny.py", "nope=1"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip() == "jaxrec config: error: unknown config key 'nope'", proc.stderr
  proc = subprocess.run([sys.executable, "-m", "jaxrec", "--help"], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: jaxrec ")
