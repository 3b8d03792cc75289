"""``encoder.path=org/name``: a Hugging Face hub id resolved to a local model directory.

A path that names a directory is used as it is. Anything else shaped like a hub id
(``org/name``, optionally ``org/name@revision`` to pin a branch, tag or commit) goes through
``huggingface_hub.snapshot_download`` into the normal Hugging Face cache: first from the cache
alone (no network once downloaded), then from the hub. Only the files a sentence encoder needs
are fetched (configs, tokenizer files, safetensors weights; ``pytorch_model.bin`` only when the
repository has no safetensors). The commit the files came from is logged, so a run can be pinned
to it. Without a network, the error names the local-directory alternative.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

log = logging.getLogger("jaxrec")

# org/name[@revision]: hub repository ids are letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# What a sentence encoder reads: every JSON config (model, tokenizer, sentence-transformers' stages),
# vocabularies and merges, sentencepiece models, the safetensors weights, and a Dense stage's weights
# in its folder (2_Dense/); never ONNX/OpenVINO/other exports.
ALLOW_PATTERNS = ("*.json", "*.txt", "*.model", "model.safetensors", "model-*-of-*.safetensors",
                  "*_Dense/model.safetensors", "*_Dense/pytorch_model.bin")
_FALLBACK_WEIGHTS = ("pytorch_model.bin",)


class HubError(ValueError):
  """A hub id could not be resolved to a local directory; the message names the offline alternative."""


@dataclasses.dataclass(frozen=True)
class Resolved:
  path: str  # the local model directory
  repo: str = ""  # the hub id it came from ("" for a local directory)
  revision: str = ""  # the commit the files are from ("" for a local directory)


def _snapshot_download(**kwargs) -> str:
  from huggingface_hub import snapshot_download  # imported late: local directories never need it
  return snapshot_download(**kwargs)


def _has_weights(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


def _offline_message(repo: str, revision: str | None, error: Exception) -> str:
  at = f" --revision {revision}" if revision else ""
  return (f"encoder.path={repo!r} is not a local directory and the Hugging Face hub could not provide it "
          f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); on a connected machine "
          f"run `huggingface-cli download {repo}{at} --local-dir DIR` (or any copy of the model's directory), then "
          f"pass encoder.path=DIR")


def revision_of(path: str) -> str:
  """The revision a hub id pins (``org/name@rev`` -> ``rev``), "" when it pins none or is no hub id."""
  match = _HUB_ID.match(os.fspath(path))
  return (match["revision"] or "") if match else ""


def resolve(path: str) -> Resolved:
  """The local directory of ``path``: itself when it is not a hub id, else the downloaded snapshot
  (cached: a second call reads the cache, no network). Raises ``HubError`` when it cannot."""
  path = os.fspath(path)
  match = _HUB_ID.match(path)
  if match is None or os.path.exists(path):
    return Resolved(path)
  repo, revision = match["repo"], match["revision"]
  kwargs = dict(repo_id=repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
  try:
    local = _snapshot_download(**kwargs, local_files_only=True)
    source = "the Hugging Face cache"
  except Exception:  # not cached yet (huggingface_hub raises its own types): ask the hub
    try:
      local = _snapshot_download(**kwargs)
    except Exception as e:  # offline, unknown repository, gated, bad revision: all mean the same here
      raise HubError(_offline_message(repo, revision, e)) from e
    source = "the Hugging Face hub"
  if not _has_weights(local):  # an older repository with only torch weights
    try:
      local = _snapshot_download(**{**kwargs, "allow_patterns": list(_FALLBACK_WEIGHTS)})
    except Exception as e:
      raise HubError(_offline_message(repo, revision, e)) from e
  commit = os.path.basename(os.path.normpath(local))  # the cache keeps snapshots/<commit>/
  log.info("encoder.path=%s: revision %s from %s (%s); pin it with encoder.path=%s@%s", repo, commit, source, local,
           repo, commit)
  return Resolved(local, repo=repo, revision=commit)
