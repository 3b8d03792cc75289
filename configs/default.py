"""What `jaxrec train` runs with no --config: the embedded synthetic world, frozen MiniLM text
tower + ids + categorical features, a few hundred steps on one CPU."""

from jaxrec.config import Config


def get_config() -> Config:
  return Config(workdir="runs/default")
