"""Atomic file writes: a file appears whole or not at all, and a failed write names the file.

Every file jaxrec writes for a reader to trust (metrics.json, config.json, study tables and plots,
data stats, the text-embedding cache) goes through here. The bytes go to a uniquely named sibling
``<name>.<random>.tmp``, are fsynced, and are renamed over the target: rename within a directory
is atomic, so a reader (or a rerun after a crash or a full disk) sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from typing import Any, BinaryIO, Iterator


class FileWriteError(RuntimeError):
  """One line naming the file and why it could not be written; the OSError is its ``__cause__``."""


def describe_os_error(error: OSError) -> str:
  return error.strerror.lower() if error.strerror else str(error)


@contextlib.contextmanager
def atomic_file(path: str, size: int | None = None) -> Iterator[BinaryIO]:
  """A binary file to write ``path``'s new content into; ``path`` is replaced when the block ends
  without an exception, and left as it was otherwise. ``size`` (bytes, when known) goes into the
  message of a full disk."""
  tmp = f"{path}.{secrets.token_hex(4)}.tmp"
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "xb") as f:
      yield f
      f.flush()
      # Delayed-allocation file systems report ENOSPC at writeback; fsync brings it here, before
      # the rename could put a truncated file in place.
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    _remove_quietly(tmp)
    reason = describe_os_error(e)
    if e.errno == errno.ENOSPC and size is not None:
      reason += f" ({size:,} bytes to write)"
    raise FileWriteError(f"could not write {path}: {reason}") from e
  except BaseException:
    _remove_quietly(tmp)
    raise


def write_atomically(path: str, data: bytes | str) -> None:
  """Replaces ``path`` with ``data`` (str is written as UTF-8)."""
  if isinstance(data, str):
    data = data.encode()
  with atomic_file(path, size=len(data)) as f:
    f.write(data)


def write_json_atomically(path: str, obj: Any) -> None:
  """``obj`` as indented JSON with sorted keys (numpy scalars written as floats)."""
  write_atomically(path, json.dumps(obj, indent=1, sort_keys=True, default=float) + "\n")


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
