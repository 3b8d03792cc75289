"""MovieLens-100K, ID and categorical features only: the same data and split as ml100k_text.py,
so the two runs differ only in the text tower."""

import dataclasses
import os

from jaxrec.config import Config, load_config


def get_config() -> Config:
  base = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ml100k_text.py"))
  return dataclasses.replace(
      base,
      workdir="runs/ml100k_id",
      encoder=dataclasses.replace(base.encoder, mode="none"),
      model=dataclasses.replace(base.model, use_text=False),
  )
