"""Device mesh from config, and multi-process start-up.

Axes are ``data``, ``fsdp`` and ``tensor``; one size may be -1 to take the devices the others
leave. Meshes use Auto axis types so sharding constraints reshard (GSPMD) rather than assert.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxrec.config import Config, MeshConfig
from jaxrec.sharding import MESH_AXES

log = logging.getLogger("jaxrec")


class MeshError(ValueError):
  pass


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh sizes must be positive or -1; got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh: {num_devices} devices cannot be split with fixed axes of total size {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                    f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  if devices is None:
    devices = jax.devices()
    if cfg.num_devices:
      if cfg.num_devices > len(devices):
        raise MeshError(f"mesh.num_devices={cfg.num_devices} but only {len(devices)} devices are available")
      devices = devices[:cfg.num_devices]
  shape = mesh_shape(cfg, len(devices))
  if len(devices) == jax.device_count():
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def _wait_for_coordinator(address: str, timeout_s: int, pid: int, num: int) -> None:
  import socket
  import time
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise MeshError(f"could not join the coordinator at {address} as process {pid} of {num} within "
                        f"{timeout_s}s: {e}") from None
      time.sleep(0.5)


# Messages of a collective (gloo's TCP transport) or a coordination call whose peer process is gone.
_LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
                    "Socket closed", "Read error", "Write error", "heartbeat timeout", "stopped sending heartbeats")


# EX_PROTOCOL: this process failed only because another one is gone. A launcher that sees it reports
# the process that failed first instead (launch/local.sh), since this one's exit is a consequence.
EXIT_PEER_LOST = 76


def stop_if_peer_lost(prefix: str, message: str) -> None:
  """Ends this process at once when its multi-process run failed because another process is gone.

  A collective whose peer died fails at once (gloo: "Connection reset by peer"). A normal exit would
  then run jax.distributed.shutdown, whose barrier waits for every process until the heartbeat
  timeout and then aborts with a C++ stack; so print one line naming the cause and skip it. Other
  errors return and exit normally: the barrier keeps process 0's coordination service up while the
  others still close their checkpoints. The exit status is EXIT_PEER_LOST.
  """
  if not jax.distributed.is_initialized() or not any(sign in message for sign in _LOST_PEER_SIGNS):
    return
  print(f"{prefix}process {jax.process_index()} of {jax.process_count()} lost contact with another process "
        f"({message}); stopping without waiting for it: see the other processes' logs for the first failure",
        file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_PEER_LOST)


def flags_of_all_processes(point: str, flag: str | None, timeout_s: int = 1800) -> dict[int, str]:
  """Every process's ``flag`` (None: not raised) at ``point``, the same dict on every process.

  Each process calls it at the same points in the same order, ``point`` naming each one uniquely.
  Host-side only, through the coordination service (a barrier, plus a key for each raised flag): no
  device work, so the step already dispatched keeps running; about a millisecond on one machine.
  A flag raised after a process passed ``point`` counts at the next point on every process alike:
  a process writes it only before its own barrier, and the keys of each point are read after it.
  """
  from jax._src import distributed  # the coordination service's client (orbax reads it the same way)
  client, keys = distributed.global_state.client, f"jaxrec/flags/{point}/"
  if jax.process_count() == 1 or client is None:  # one process, or one controller of all devices
    return {} if flag is None else {jax.process_index(): flag}
  if flag is not None:
    client.key_value_set(keys + str(jax.process_index()), flag, allow_overwrite=True)
  try:
    client.wait_at_barrier("jaxrec/flags", timeout_s * 1000)  # reusable: the service counts each pass
  except Exception as e:  # a lost peer's error text stays in the first line, for stop_if_peer_lost
    raise MeshError(f"process {jax.process_index()} of {jax.process_count()} waited at '{point}' for the "
                    f"others: {e}") from e
  return {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(keys)}


def maybe_initialize_distributed(cfg: MeshConfig, timeout_s: int | None = None) -> bool:
  """Starts jax.distributed when config or environment asks for several processes.

  Environment (set by launch/*.sh): JAXREC_COORDINATOR, JAXREC_NUM_PROCESSES, JAXREC_PROCESS_ID.
  Returns True when this is a multi-process run. A coordinator that never answers fails after
  ``timeout_s`` (default: JAXREC_INIT_TIMEOUT, else mesh.init_timeout_s) with an error naming the
  address, before any compute. Once running, a process that dies stops the others: at once when they
  fail in a collective, else after mesh.heartbeat_timeout_s.
  """
  if cfg.heartbeat_timeout_s < 1 or cfg.init_timeout_s < 1:
    raise MeshError(f"mesh.heartbeat_timeout_s={cfg.heartbeat_timeout_s} and mesh.init_timeout_s={cfg.init_timeout_s} "
                    "must both be at least 1 second")
  if os.environ.get("JAXREC_TPU_POD") and not jax.distributed.is_initialized():
    # TPU VMs describe the slice to JAX themselves.
    jax.distributed.initialize(initialization_timeout=cfg.init_timeout_s,
                               heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    _reinstate_sigterm_handler()
    return True
  address = cfg.coordinator_address or os.environ.get("JAXREC_COORDINATOR", "")
  num = cfg.num_processes if cfg.num_processes > 1 else int(os.environ.get("JAXREC_NUM_PROCESSES", "1"))
  pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAXREC_PROCESS_ID", "-1"))
  if num <= 1:
    return False
  if not address or pid < 0:
    raise MeshError(f"multi-process run ({num} processes) needs a coordinator address and a process id "
                    "(mesh.coordinator_address / mesh.process_id or JAXREC_COORDINATOR / JAXREC_PROCESS_ID)")
  if jax.distributed.is_initialized():
    return True
  timeout_s = timeout_s or int(os.environ.get("JAXREC_INIT_TIMEOUT", "0")) or cfg.init_timeout_s
  local = os.environ.get("JAXREC_LOCAL_DEVICES")
  if local:
    jax.config.update("jax_num_cpu_devices", int(local))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if pid != 0:
    # XLA's client aborts the whole process when the coordinator is unreachable, so check first.
    _wait_for_coordinator(address, timeout_s, pid, num)
  bind = address if address.startswith("127.") or address.startswith("localhost") else None
  log.info("jax.distributed: process %d of %d, coordinator %s, heartbeat timeout %ds", pid, num, address,
           cfg.heartbeat_timeout_s)
  try:
    # A process whose heartbeats stop for heartbeat_timeout_s counts as dead: the service then fails
    # every other process (XLA logs "Terminating process because the JAX distributed service detected
    # fatal errors" and aborts), so no process outlives a lost peer by much more than that. The
    # client's missed_heartbeat_callback cannot print a friendlier line instead: jaxlib cannot hand the
    # absl::Status it passes to Python (std::bad_cast), so jax.distributed.initialize's own arguments
    # are all there is. Processes inside a collective learn sooner, from its error (stop_if_peer_lost).
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                               coordinator_bind_address=bind, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
  except Exception as e:  # surface one line naming the address instead of a gRPC stack
    raise MeshError(f"could not join the coordinator at {address} as process {pid} of {num} within {timeout_s}s: {e}") from e
  _reinstate_sigterm_handler()
  return True


def _reinstate_sigterm_handler() -> None:
  """Puts back the SIGTERM handler Python had before jax.distributed.initialize.

  initialize starts the coordination service's preemption notifier, whose C++ handler turns SIGTERM
  into a flag that only ``multihost_utils.reached_preemption_sync_point`` reads; jaxrec does not call it
  (the trainer's own handler, which agrees across processes, replaces that one for the loop), so until
  then a SIGTERM would be swallowed and the run would go on. With the handler back, a SIGTERM before
  the loop ends the process as in a one-process run, and the other processes stop as for any lost one.
  """
  try:
    handler = signal.getsignal(signal.SIGTERM)  # Python's record: the C++ handler bypassed it
    if handler is not None:
      signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: signals are not ours to set
    pass


def mesh_fitting_devices(cfg: Config) -> Config:
  """``cfg`` with a data-parallel mesh over the devices present when its own mesh needs devices this
  process lacks: checkpoints restore onto any mesh, so evaluating or exporting a run trained on 8
  devices needs no 8 devices."""
  available = jax.device_count()
  try:
    if cfg.mesh.num_devices > available:
      raise MeshError("too few devices")
    mesh_shape(cfg.mesh, cfg.mesh.num_devices or available)
    return cfg
  except MeshError:
    fitted = dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1, num_devices=0)
    log.info("the run's mesh (data=%d fsdp=%d tensor=%d) does not fit the %d devices here; using data=%d",
             cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, available, available)
    return dataclasses.replace(cfg, mesh=fitted)
