"""The run directory's guards: one trainer per workdir and a checkpoint directory proven writable
before training starts (files in it are written by ``jaxrec.files``, whose failures name the file).

The lock is ``fcntl.flock`` on an open file, so the kernel drops it the moment its holder dies
(SIGKILL included); the file's JSON body names the holder so a refusal can say who it is. A body
left behind by a dead holder is therefore stale and taken over with a warning.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import socket
import time

from jaxrec.files import describe_os_error

log = logging.getLogger("jaxrec")

LOCK_NAME = ".jaxrec.lock"


class WorkdirError(RuntimeError):
  pass


class WorkdirBusy(WorkdirError):
  pass


class WorkdirLock:
  """Held for a whole training run; ``hold=False`` (every process but 0 of a multi-process run) is a no-op."""

  def __init__(self, workdir: str, hold: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.hold = hold
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    if not self.hold or self._fd is not None:
      return self
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"cannot lock workdir {self.workdir}: {describe_os_error(e)}") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusy(f"workdir {self.workdir} is in use by another trainer ({_describe(holder)}); wait for it to "
                        f"finish or stop it, or train in another --workdir") from None
    except OSError as e:
      os.close(fd)
      raise WorkdirError(f"cannot lock workdir {self.workdir} ({self.path}): {describe_os_error(e)}") from e
    previous = _read_holder(fd)
    if previous:
      log.warning("taking over the stale lock %s of a trainer that is gone (%s)", self.path, _describe(previous))
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an empty lock file marks a clean exit: nothing stale to report later
    finally:
      os.close(fd)  # closing the last descriptor drops the flock

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def holding_workdir_lock(run):
  """Wraps ``Trainer.run``: process 0 holds the workdir's lock for the whole run (released on any
  exit), and every process proves the checkpoint directory writable before the first step."""

  @functools.wraps(run)
  def locked_run(trainer, *args, **kwargs):
    import jax
    workdir = os.path.abspath(trainer.cfg.workdir)
    with WorkdirLock(workdir, hold=jax.process_index() == 0):
      ensure_writable_dir(os.path.join(workdir, "checkpoints"))
      return run(trainer, *args, **kwargs)

  return locked_run


def _read_holder(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode()
    return json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {"host": "unknown (unreadable lock file)"}


def _describe(holder: dict) -> str:
  if not holder:
    return "holder unknown"
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def ensure_writable_dir(path: str) -> None:
  """Creates ``path`` and proves a file can be written there, so a bad checkpoint directory fails
  in one line before training rather than at the first save."""
  try:
    os.makedirs(path, exist_ok=True)
  except FileExistsError as e:
    raise WorkdirError(f"checkpoint directory {path} is not a directory (a file is in its place)") from e
  except OSError as e:
    raise WorkdirError(f"cannot create checkpoint directory {path}: {describe_os_error(e)}") from e
  probe = os.path.join(path, f".write-probe-{socket.gethostname()}-{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("jaxrec")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"checkpoint directory {path} is not writable: {describe_os_error(e)}") from e
