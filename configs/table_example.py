"""Your own data, named by columns only: the CSV files of ``examples/table`` (written by
``examples/table/make_example.py``) through ``data.source=table``. ID, categorical (multi-valued
genres, the user's segment) and numeric (year) features; no text encoder, so it trains on CPU in
seconds: ``jaxrec train --config configs/table_example.py``."""

import dataclasses
import os

from jaxrec.config import Config, DataConfig, EncoderConfig, ModelConfig, TableConfig, TrainConfig

HERE = os.path.dirname(os.path.realpath(__file__))  # the repository's, also through a linked configs/


def get_config() -> Config:
  base = Config()
  return dataclasses.replace(
      base,
      workdir="runs/table_example",
      data=DataConfig(
          source="table", path=os.path.join(HERE, "..", "examples", "table"), split="random", history_len=5,
          table=TableConfig(interactions="interactions.csv", items="items.csv", users="users.csv",
                            user="user", item="item", time="timestamp",
                            item_text=("title", "genres"), item_categorical=("genres",), item_numeric=("year",),
                            user_categorical=("segment",), multi_value_sep="|")),
      encoder=EncoderConfig(mode="none"),
      model=ModelConfig(embed_dim=16, id_dim=16, feature_dim=8, mlp_dims=(32,), use_text=False),
      train=TrainConfig(steps=150, batch_size=32, warmup_steps=10, log_every=50, progress=False),
  )
