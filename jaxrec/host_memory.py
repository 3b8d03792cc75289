"""Transparent huge pages for XLA:CPU's buffers, through glibc's malloc.

XLA:CPU allocates every execution's temporaries afresh: about 1 GB for a step that fine-tunes
MiniLM at batch 32. glibc serves allocations that large with mmap and returns them to the kernel
when they are freed. So each step faults its temporaries in again, one zeroed 4 KiB page at a
time: about 250,000 faults, a fifth of the step on a 2-core VM. With glibc's
``glibc.malloc.hugetlb=1`` tunable (glibc 2.35+) those mappings are advised for transparent huge
pages, 2 MiB per fault, and the step loses that cost (benchmarks/README.md has the numbers).

glibc reads tunables once, at process start. So the ``jaxrec`` command restarts itself once with
the tunable added (``JAXREC_HUGE_PAGES=0`` opts out), and the Python API logs how to set it. Both
only where JAX will compute on the CPU (``runs_on_cpu``): on a GPU or TPU host the steps' buffers
live on the device, and the restart would only cost start-up time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import sys
from typing import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JAXREC_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
HINT = ("XLA:CPU re-faults its temporaries every step; start Python with "
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for transparent huge pages (the jaxrec command does this itself)")

log = logging.getLogger("jaxrec")


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'); None where unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_has_tunable(libc: tuple[str, str] | None = None) -> bool:
  """Whether this process's C library is glibc 2.35 or newer, the first with malloc.hugetlb."""
  name, version = libc if libc is not None else platform.libc_ver()
  if name != "glibc":
    return False
  try:
    major, minor = (int(part) for part in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def _tunables(env: Mapping[str, str]) -> list[str]:
  """GLIBC_TUNABLES's ``name=value`` items."""
  return [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]


def _is_hugetlb(item: str) -> bool:
  return item.split("=", 1)[0] == TUNABLE


def tunable_set(env: Mapping[str, str]) -> bool:
  """Whether GLIBC_TUNABLES in ``env`` already chooses malloc.hugetlb, to any value."""
  return any(_is_hugetlb(item) for item in _tunables(env))


def with_huge_pages(env: Mapping[str, str], enabled: bool = True) -> dict[str, str]:
  """A copy of ``env`` whose GLIBC_TUNABLES has malloc.hugetlb=1 added (``enabled``; a value the
  user chose stays) or removed (not ``enabled``); the other tunables are kept."""
  out = dict(env)
  items = _tunables(env)
  if enabled and not any(map(_is_hugetlb, items)):
    items.append(f"{TUNABLE}=1")
  elif not enabled:
    items = [item for item in items if not _is_hugetlb(item)]
  if items:
    out["GLIBC_TUNABLES"] = ":".join(items)
  else:
    out.pop("GLIBC_TUNABLES", None)
  return out


def thp_tunable_applies(mode: str | None = None, libc: tuple[str, str] | None = None,
                        system: str | None = None) -> bool:
  """Whether the tunable changes anything on this machine: Linux with glibc 2.35+ and the
  kernel's THP mode 'madvise' (under 'always' large mappings get huge pages anyway, under 'never'
  nothing does)."""
  if (system or platform.system()) != "Linux" or not glibc_has_tunable(libc):
    return False
  return (mode if mode is not None else thp_mode()) == "madvise"


def accelerator_plugins(env: Mapping[str, str] | None = None) -> list[str]:
  """The GPU/TPU back ends JAX would find in this environment, looked for as JAX looks (its
  ``discover_pjrt_plugins`` and ``cloud_tpu_init``) without importing it, which would be slow and
  must not happen before a restart: the ``jax_plugins`` entry points and the modules of the
  ``jax_plugins`` namespace package (jax_cuda12_plugin, jax_cuda13_plugin, jax_rocm7_plugin, ...),
  and libtpu or ``TPU_LIBRARY_PATH``."""
  env = os.environ if env is None else env
  found = {entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")}
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace is not None and namespace.submodule_search_locations:
    found.update(f"jax_plugins.{info.name}" for info in pkgutil.iter_modules(namespace.submodule_search_locations))
  if importlib.util.find_spec("libtpu") is not None:
    found.add("libtpu")
  if os.path.isfile(env.get("TPU_LIBRARY_PATH", "")):
    found.add(env["TPU_LIBRARY_PATH"])
  return sorted(found)


def runs_on_cpu(env: Mapping[str, str] | None = None, plugins: Sequence[str] | None = None) -> bool:
  """Whether JAX will compute on the CPU, decided without starting it: ``JAX_PLATFORMS`` (or the
  older ``JAX_PLATFORM_NAME``) names cpu first, or names nothing and no accelerator back end is
  installed (``plugins``: default ``accelerator_plugins``), where JAX would prefer a GPU or TPU."""
  env = os.environ if env is None else env
  chosen = (env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME") or "").split(",")[0].strip().lower()
  if chosen:
    return chosen == "cpu"
  return not (accelerator_plugins(env) if plugins is None else plugins)


def restart_wanted(env: Mapping[str, str] | None = None, mode: str | None = None,
                   libc: tuple[str, str] | None = None, system: str | None = None,
                   plugins: Sequence[str] | None = None) -> bool:
  """Whether starting this process again with the tunable would change anything: it applies
  here (``thp_tunable_applies``), JAX will compute on the CPU (``runs_on_cpu``, given ``plugins``),
  the tunable is not chosen yet, and ``JAXREC_HUGE_PAGES=0`` does not opt out."""
  env = os.environ if env is None else env
  if env.get(OPT_OUT, "1") == "0" or tunable_set(env):
    return False
  return thp_tunable_applies(mode, libc, system) and runs_on_cpu(env, plugins)


def restart_with_huge_pages() -> None:
  """Replaces this process with the same command and the tunable set, where ``restart_wanted``;
  returns only where not. Call it first thing in a program's entry point, before work starts."""
  if not restart_wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_huge_pages(os.environ))


def log_hint_if_wanted() -> None:
  """For the Python API, where the process is already running: says how to set the tunable."""
  if restart_wanted():
    log.info(HINT)
