"""glibc's transparent-huge-page tunable: when the jaxrec command restarts with it, what it does to
GLIBC_TUNABLES, and that it takes XLA:CPU's fresh step buffers from one fault per 4 KiB page to one
per 2 MiB."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

from jaxrec import host_memory

needs_thp = pytest.mark.skipif(not host_memory.thp_tunable_applies(),
                               reason="needs Linux, glibc 2.35+ and transparent huge pages in 'madvise' mode")


def test_with_huge_pages_adds_the_tunable_and_keeps_the_others():
  assert host_memory.with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert host_memory.with_huge_pages(env)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # a copy, not the caller's mapping


def test_with_huge_pages_keeps_a_value_the_user_chose_and_can_remove_only_it():
  chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
  assert host_memory.with_huge_pages(chosen) == chosen
  assert host_memory.with_huge_pages(chosen, enabled=False) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, enabled=False) == {}


@pytest.mark.parametrize("env, mode, libc, system, wanted", [
    ({}, "madvise", ("glibc", "2.36"), "Linux", True),
    ({}, "madvise", ("glibc", "2.40.1"), "Linux", True),
    ({"JAXREC_HUGE_PAGES": "0"}, "madvise", ("glibc", "2.36"), "Linux", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", ("glibc", "2.36"), "Linux", False),
    ({}, "always", ("glibc", "2.36"), "Linux", False),
    ({}, "never", ("glibc", "2.36"), "Linux", False),
    ({}, "", ("glibc", "2.36"), "Linux", False),  # no THP file: mode unknown
    ({}, "madvise", ("glibc", "2.34"), "Linux", False),
    ({}, "madvise", ("", ""), "Linux", False),
    ({}, "madvise", ("glibc", "unknown"), "Linux", False),
    ({}, "madvise", ("glibc", "2.36"), "Darwin", False),
])
def test_restart_is_wanted_only_where_the_tunable_would_change_something(env, mode, libc, system, wanted):
  assert host_memory.restart_wanted(env, mode, libc, system, plugins=()) is wanted


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def _python(code: str, env: dict) -> str:
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), "first", "second arg"], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@needs_thp
def test_restart_runs_the_same_command_again_with_the_tunable():
  env = host_memory.with_huge_pages(os.environ, enabled=False)
  env.pop("JAXREC_HUGE_PAGES", None)
  code = """
    import os, sys
    print("start", os.environ.get("GLIBC_TUNABLES"))
    from jaxrec import host_memory
    host_memory.restart_with_huge_pages()
    print("running", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
  """
  lines = _python(code, env).splitlines()
  assert lines == ["start None", "start glibc.malloc.hugetlb=1",
                   "running glibc.malloc.hugetlb=1 ['first', 'second arg']"]
  assert _python(code, dict(env, JAXREC_HUGE_PAGES="0")).splitlines() == ["start None", "running None ['first', 'second arg']"]


@needs_thp
@pytest.mark.slow
def test_the_tunable_cuts_the_page_faults_of_a_fresh_64_mib_xla_output():
  # XLA:CPU allocates each call's 64 MiB output afresh and glibc maps it anew: 16,384 faults of
  # 4 KiB, or 32 of 2 MiB with huge pages (a few more where the kernel falls back to small pages).
  code = """
    import resource, jax, jax.numpy as jnp
    x = jnp.ones((16 * 2**20,), jnp.float32)
    f = jax.jit(lambda x: x * 1.5 + 1.0)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  plain = float(_python(code, host_memory.with_huge_pages(env, enabled=False)))
  huge = float(_python(code, host_memory.with_huge_pages(env)))
  assert plain > 16384 * 0.9, plain
  assert huge < plain / 8, (huge, plain)


@pytest.mark.parametrize("env, plugins, cpu", [
    ({}, (), True),
    ({}, ("jax_cuda12_plugin",), False),
    ({}, ("libtpu",), False),
    ({"JAX_PLATFORMS": ""}, ("jax_cuda12_plugin",), False),
    ({"JAX_PLATFORMS": "cpu"}, ("jax_cuda12_plugin",), True),  # a GPU host told to compute on its CPU
    ({"JAX_PLATFORMS": "CPU,cuda"}, ("jax_cuda12_plugin",), True),  # the first platform is the default one
    ({"JAX_PLATFORMS": "cuda"}, (), False),
    ({"JAX_PLATFORMS": "tpu,cpu"}, (), False),
    ({"JAX_PLATFORM_NAME": "cpu"}, ("jax_cuda12_plugin",), True),
    ({"JAX_PLATFORM_NAME": "gpu"}, (), False),
    ({"JAX_PLATFORMS": "cuda", "JAX_PLATFORM_NAME": "cpu"}, (), False),  # JAX_PLATFORMS wins
])
def test_runs_on_cpu_reads_the_platform_variables_then_the_installed_back_ends(env, plugins, cpu):
  assert host_memory.runs_on_cpu(env, plugins) is cpu


def test_no_restart_where_jax_will_compute_on_an_accelerator():
  linux = ("madvise", ("glibc", "2.36"), "Linux")
  assert not host_memory.restart_wanted({}, *linux, plugins=["jax_cuda12_plugin"])
  assert not host_memory.restart_wanted({"JAX_PLATFORMS": "tpu"}, *linux, plugins=())
  assert host_memory.restart_wanted({"JAX_PLATFORMS": "cpu"}, *linux, plugins=["jax_cuda12_plugin"])


def test_accelerator_plugins_are_found_as_jax_finds_them_without_importing_them(tmp_path, monkeypatch):
  entry = importlib.metadata.EntryPoint("xla_cuda12", "jax_cuda12_plugin", "jax_plugins")
  monkeypatch.setattr(importlib.metadata, "entry_points",
                      lambda group: [entry] if group == "jax_plugins" else [])
  assert host_memory.accelerator_plugins({}) == ["jax_cuda12_plugin"]
  # A module of the jax_plugins namespace package, libtpu, and a libtpu named by TPU_LIBRARY_PATH; a
  # module that ran would raise.
  (tmp_path / "jax_plugins" / "xla_rocm7").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_rocm7" / "__init__.py").write_text("raise RuntimeError('imported')\n")
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("raise RuntimeError('imported')\n")
  (tmp_path / "libtpu.so").write_bytes(b"")
  monkeypatch.syspath_prepend(str(tmp_path))
  found = host_memory.accelerator_plugins({"TPU_LIBRARY_PATH": str(tmp_path / "libtpu.so")})
  assert found == sorted(["jax_cuda12_plugin", "jax_plugins.xla_rocm7", "libtpu", str(tmp_path / "libtpu.so")])
  assert "libtpu" not in sys.modules and "jax_plugins.xla_rocm7" not in sys.modules
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  assert host_memory.accelerator_plugins({"TPU_LIBRARY_PATH": str(tmp_path / "missing.so")}) == [
      "jax_plugins.xla_rocm7", "libtpu"]


@needs_thp
def test_python_m_jaxrec_restarts_as_python_m_jaxrec(tmp_path):
  # The config file runs after the restart: it sees the tunable, and the command goes on as asked.
  config = tmp_path / "show_env.py"
  config.write_text("import os, sys\nfrom jaxrec.config import Config\n\n"
                    "def get_config():\n  print('tunables', os.environ.get('GLIBC_TUNABLES'), file=sys.stderr)\n"
                    "  return Config(workdir='restarted')\n")
  env = host_memory.with_huge_pages(os.environ, enabled=False)
  env.pop("JAXREC_HUGE_PAGES", None)
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "jaxrec", "config", "show", "--config", str(config), "train.steps=9"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tunables glibc.malloc.hugetlb=1" in proc.stderr.splitlines()
  rows = {line[2:].split()[0]: line[2:].split()[1:3] for line in proc.stdout.splitlines()[1:] if line[2:3].strip()}
  assert rows["workdir"] == ["str", "restarted"] and rows["train.steps"] == ["int", "9"]
