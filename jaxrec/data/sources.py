"""From ``DataConfig`` to (Dataset, Split): the one place that knows every source."""

from __future__ import annotations

from jaxrec.config import DataConfig
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.splits import make_split


def load(cfg: DataConfig) -> tuple[Dataset, Split]:
  cold = None
  predefined = None
  if cfg.source == "synthetic":
    from jaxrec.data import synthetic
    dataset, cold = synthetic.generate(cfg.synthetic)
  else:
    raise ValueError(f"data.source={cfg.source!r} is not available in this build")
  return dataset, make_split(dataset, cfg, cold_items=cold, predefined=predefined)
