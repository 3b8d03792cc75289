"""Every test sees 8 CPU devices, set before JAX initialises its backend."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
