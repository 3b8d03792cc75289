"""Input pipeline vs train step: examples/s of the grain pipeline alone, and of the train step
fed with batches already on the device, for the same config, in one run.

  .venv/bin/python benchmarks/pipeline_throughput.py                       # the default config
  .venv/bin/python benchmarks/pipeline_throughput.py --config configs/ml1m_text.py --batches 200

The pipeline must outrun the step by a wide margin, or training waits for data.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=None)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args(argv)

  import jax
  from jaxrec.config import load_config
  from jaxrec.data.pipeline import train_batches
  from jaxrec.trainer import Trainer

  cfg = load_config(args.config, [f"train.steps={args.batches}", *args.overrides])
  trainer = Trainer(cfg)
  bs = cfg.train.batch_size

  it = iter(train_batches(trainer.batch_builder(), 0, args.batches))
  next(it)
  start = time.perf_counter()
  for _ in range(args.batches - 1):
    next(it)
  pipeline = (args.batches - 1) * bs / (time.perf_counter() - start)

  start = time.perf_counter()
  device_batches = [trainer.layout.put(b) for b in (trainer.batch_builder().map(i) for i in range(8))]
  transfer = 8 * bs / (time.perf_counter() - start)
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, device_batches[0])
  jax.block_until_ready(metrics)
  steps = max(args.batches // 4, 8)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = trainer.train_step(state, device_batches[i % len(device_batches)])
  jax.block_until_ready(metrics)
  step = steps * bs / (time.perf_counter() - start)

  print(f"config {args.config or 'default'}: batch {bs}, history {cfg.data.history_len}, "
        f"{len(trainer.train_seqs):,} training examples, load {os.getloadavg()[0]:.1f}")
  print(f"pipeline (grain, host batches)   {pipeline:12,.0f} examples/s")
  print(f"build + host -> device transfer  {transfer:12,.0f} examples/s")
  print(f"train step (device batches)      {step:12,.0f} examples/s")
  print(f"pipeline / step                  {pipeline / step:12.1f}x")


if __name__ == "__main__":
  main()
