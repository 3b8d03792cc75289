"""MovieLens-100K with a frozen MiniLM text tower over "title. Genres: ..." plus ids and features.

Random 8:1:1 per user as RecBole, plus 10% of the movies held out cold so warm and cold
metrics show what the text tower adds; set data.cold_item_fraction=0 for RecBole-comparable
overall numbers. The data lives in $JAXREC_DATA, else in ../shared/data beside the repository
(never committed).
"""

import dataclasses
import os

from jaxrec.config import Config, DataConfig, EncoderConfig, TrainConfig, data_root


def get_config() -> Config:
  base = Config()
  return dataclasses.replace(
      base,
      workdir="runs/ml100k_text",
      data=DataConfig(source="ml100k", path=os.path.join(data_root(), "ml-100k"),
                      item_text="title+genres", split="random", split_ratios=(0.8, 0.1, 0.1),
                      cold_item_fraction=0.1, history_len=10),
      encoder=dataclasses.replace(EncoderConfig(), mode="frozen", max_length=64),
      # 600 x 256 = about two epochs of the training pairs; history_len=10 (was 20) halves each step.
      train=dataclasses.replace(TrainConfig(), steps=600, batch_size=256),
  )
