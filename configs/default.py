"""What `jaxrec train` runs with no --config: the embedded synthetic world, frozen MiniLM text
tower + ids + categorical features, a few hundred steps on one CPU."""

import dataclasses

from jaxrec.config import Config, TrainConfig


def get_config() -> Config:
  # Ten steps per jitted call: the same losses as one (tested), and on 2 CPU cores the loop
  # otherwise waits 8-12% of its time on per-step batch hand-off and dispatch (3% at ten).
  return Config(workdir="runs/default", train=dataclasses.replace(TrainConfig(), steps_per_call=10))
