"""Every test sees 8 CPU devices, set before JAX initialises its backend.

Many tests compile the same small programs again, often in subprocesses of the command line, so
the run shares one persistent XLA compilation cache (a fresh directory per test process, removed
at exit; subprocesses inherit it through the environment). It changes no result: a cached
executable is the one the compile would produce.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="jaxrec-tests-xla-cache-")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
