"""The peers' side of the train_throughput.py protocol: the command line, the input .npz and the
outputs. Plain numpy and the standard library, so both peer environments (TensorFlow, PyTorch)
import it from this directory without jaxrec."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def parse(description: str, extra=None) -> tuple[argparse.Namespace, dict[str, np.ndarray], dict, float]:
  """Parses the shared flags (plus ``extra(parser)``'s) and loads the input.

  Returns ``(args, arrays, config, start time)``; ``--threads``/``--steps`` override the config.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--data", required=True, help="input .npz from train_throughput.py")
  parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.npz and PREFIX.json")
  parser.add_argument("--threads", type=int, help="intra-op threads (default: the input's config)")
  parser.add_argument("--steps", type=int, help="train only this many of the batches (a probe run)")
  if extra is not None:
    extra(parser)
  args = parser.parse_args()
  started = time.perf_counter()
  with np.load(args.data, allow_pickle=False) as f:
    data = {k: f[k] for k in f.files}
  cfg = json.loads(str(data.pop("config")))
  cfg.update({k: v for k, v in (("threads", args.threads), ("steps", args.steps)) if v})
  return args, data, cfg, started


def write(out: str, items_NxE: np.ndarray, queries_UxE: np.ndarray, *, peer: str, version: str, threads: int,
          timed_steps: int, elapsed: float, batch_size: int, losses: list[float], started: float, params: int) -> None:
  """PREFIX.npz (the trained vectors, scored by train_throughput.py) and PREFIX.json (timings)."""
  np.savez(out + ".npz", item_vectors=items_NxE, query_vectors=queries_UxE)
  summary = {"peer": peer, "version": version, "threads": threads, "timed_steps": timed_steps,
             "elapsed_s": elapsed, "examples_per_sec": timed_steps * batch_size / elapsed,
             "ms_per_step": 1000 * elapsed / timed_steps, "losses": losses,
             "wall_s": time.perf_counter() - started, "params": params}
  with open(out + ".json", "w") as f:
    json.dump(summary, f)
