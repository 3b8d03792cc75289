"""Every code block of the README and the docs runs as written.

A fenced block tagged ``bash``, ``sh`` or ``python`` is a command a reader will paste; an untagged
block is output. Blocks run in a scratch directory that holds the repository's folders (and
``.venv``) by link, so ``.venv/bin/jaxrec ... --config configs/tiny.py`` works there verbatim and
``runs/`` lands in the scratch directory. What a block would run for minutes or hours is cut down,
never rewritten:

- README.md and launch/README.md run. A ``jaxrec train`` (also behind ``make demo`` or
  ``launch/local.sh``) gets ``train.steps=3`` and a small evaluation appended (later overrides win);
  ``make`` targets are dry-run (``make -n``), since ``make test`` is this suite.
- docs/*.md list the study's commands (hundreds of multi-hour trainings): each ``jaxrec train``
  there is parsed and its config loaded and validated, each ``jaxrec study`` plans its grid
  (``--list``), and each script answers ``--help``.
- Commands that cannot run on this machine (SLURM, TPU pods, a RecBole interpreter of its own) are
  checked as far as this machine allows: their script is valid bash and their jaxrec command loads.
- A command on the full datasets needs ``JAXREC_DATA``; without it the block is skipped, naming it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md",
        *sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.endswith(".template.md"))]
RUN = {"README.md", "launch/README.md"}  # the rest is checked dry
RUNNABLE = {"bash", "sh", "python"}
SMALL_TRAIN = ["train.steps=3", "eval.max_users=30", "train.progress=false"]
REAL_DATA = re.compile(r"configs/(ml100k|ml1m|amazon)|data\.source=(ml100k|ml1m|amazon)")


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
  """``(language, text, first line)`` of each fenced block."""
  blocks, lang, lines, start = [], None, [], 0
  for number, line in enumerate(path.read_text().splitlines(), 1):
    fence = re.match(r"^\s*```(\w*)\s*$", line)
    if fence and lang is None:
      lang, lines, start = fence.group(1) or "text", [], number
    elif fence:
      blocks.append((lang, "\n".join(lines), start))
      lang = None
    elif lang is not None:
      lines.append(line)
  return blocks


def commands(text: str) -> list[list[str]]:
  """Shell commands of a block: continuations joined, comments and ``set`` lines dropped."""
  out = []
  for line in text.replace("\\\n", " ").splitlines():
    argv = shlex.split(line, comments=True)
    if argv and argv[0] != "set":
      out.append(argv)
  return out


CASES = [pytest.param(path, index, lang, text, id=f"{path.relative_to(ROOT)}:{line}")
         for path in DOCS for index, (lang, text, line) in enumerate(code_blocks(path)) if lang in RUNNABLE]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A directory that looks like the repository root to a reader's commands, with the demo's
  workdir (runs/default, what ``make demo`` trains) already there for the blocks that read it."""
  home = tmp_path_factory.mktemp("reader")
  for name in ("configs", "docs", "benchmarks", "launch", "jaxrec", "Makefile", "pyproject.toml"):
    (home / name).symlink_to(ROOT / name)
  (home / ".venv").symlink_to(VENV_BIN.parent)
  proc = _run([str(VENV_BIN / "jaxrec"), "train", *SMALL_TRAIN], home)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return home


def _env() -> dict:
  env = dict(os.environ, JAXREC_HUGE_PAGES="0", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
  return env


def _run(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)


def _is_jaxrec(word: str) -> bool:
  return os.path.basename(word) == "jaxrec"


def _check_jaxrec(argv: list[str], cwd: Path, run: bool) -> subprocess.CompletedProcess:
  command = argv[1]
  if command == "study":
    return _run([*argv, "--list"], cwd)
  if not run:  # parse the command and load its config, as the command would before any compute
    script = ("import sys; from jaxrec import cli; args = cli._parser().parse_args(sys.argv[1:]); "
              "cli._load_config(args, from_workdir=False)")
    return _run([sys.executable, "-c", script, *argv[1:]], cwd)
  if command == "train":
    argv = [*argv, *SMALL_TRAIN]
  return _run(argv, cwd)


def check_command(argv: list[str], cwd: Path, run: bool) -> subprocess.CompletedProcess | None:
  """Runs (or, where it cannot run here, checks) one reader's command."""
  program = os.path.basename(argv[0])
  if program == "make":
    return _run(["make", "-n", *argv[1:]], ROOT)
  if _is_jaxrec(argv[0]):
    return _check_jaxrec(argv, cwd, run)
  if program == "local.sh":
    if run:
      return _run([*argv, *SMALL_TRAIN], cwd, dict(_env(), XLA_FLAGS=""))
    return _check_jaxrec(argv[3:], cwd, run=False)
  if program in ("srun", "gpu_multinode.sh", "tpu_pod.sh"):  # no SLURM or TPU here
    launcher = next(a for a in argv if a.endswith(".sh"))
    syntax = _run(["bash", "-n", launcher], cwd)
    if syntax.returncode:
      return syntax
    return _check_jaxrec(argv[next(i for i, a in enumerate(argv) if _is_jaxrec(a)):], cwd, run=False)
  if program.startswith("python"):
    script = next(a for a in argv[1:] if a.endswith(".py"))
    return _run([sys.executable, script, "--help"], cwd)
  raise AssertionError(f"no rule for the command {shlex.join(argv)!r}: teach tests/test_docs.py how to run it")


@pytest.mark.slow
@pytest.mark.parametrize("path, index, lang, text", CASES)
def test_code_block_runs(path, index, lang, text, workspace):
  rel = str(path.relative_to(ROOT))
  if lang == "python":
    proc = _run([sys.executable, "-c", text], workspace)
    assert proc.returncode == 0, f"{rel} block {index}:\n{proc.stderr[-3000:]}"
    return
  skipped = []
  for argv in commands(text):
    run = rel in RUN and os.path.basename(argv[0]) not in ("srun", "gpu_multinode.sh", "tpu_pod.sh")
    if run and REAL_DATA.search(shlex.join(argv)) and not os.environ.get("JAXREC_DATA"):
      skipped.append(shlex.join(argv))
      continue
    proc = check_command(argv, workspace, run=rel in RUN)
    assert proc.returncode == 0, f"{rel} block {index}: {shlex.join(argv)}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
  if skipped:
    pytest.skip(f"JAXREC_DATA is not set: {len(skipped)} command(s) of this block read the full datasets (point it "
                f"at a folder with ml-100k/, ml-1m/, amazon-musical-instruments-5core/): {skipped[0]}")


def test_every_runnable_block_has_a_rule():
  """A new kind of command in the docs fails here, before the slow run, instead of going unchecked."""
  known = ("make", "jaxrec", "local.sh", "srun", "gpu_multinode.sh", "tpu_pod.sh")
  for path, _, lang, text in (case.values for case in CASES):
    if lang == "python":
      continue
    for argv in commands(text):
      program = os.path.basename(argv[0])
      assert program in known or program.startswith("python"), f"{path.name}: {shlex.join(argv)}"
  assert len(CASES) >= 8  # README, launch and docs blocks were found


def test_the_architecture_page_names_every_module():
  """docs/architecture.md is where a reader finds the file to change: a module it does not name is lost."""
  page = (ROOT / "docs" / "architecture.md").read_text()
  package = ROOT / "jaxrec"
  named = set(re.findall(r"`([\w/]+(?:\.py|/))`", page))
  missing = []
  for path in sorted(package.rglob("*.py")):
    rel = path.relative_to(package)
    if rel.parts[0] in ("configs",):
      continue
    # a module counts as named by its own path or by its folder's row (``data/``, ``report/``)
    if str(rel) not in named and rel.name not in named and f"{rel.parts[0]}/" not in named:
      missing.append(str(rel))
  assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
