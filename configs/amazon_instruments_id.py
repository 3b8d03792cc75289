"""Amazon Musical Instruments 5-core, ID features only: the same data and split as
amazon_instruments_text.py."""

import dataclasses
import os

from jaxrec.config import Config, load_config


def get_config() -> Config:
  base = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "amazon_instruments_text.py"))
  return dataclasses.replace(
      base,
      workdir="runs/amazon_instruments_id",
      encoder=dataclasses.replace(base.encoder, mode="none"),
      model=dataclasses.replace(base.model, use_text=False),
  )
