"""MovieLens-1M with a frozen MiniLM text tower over title, genres and plot (MeLU's OMDb text).

The shared copy has no ratings.dat: interactions are implicit (user, movie) pairs without time,
so the split is random 8:1:1 per user (leave-one-out needs timestamps). All 3,883 movies are in
the catalog; 10% are held out cold. Use data.item_text=title+genres for short texts.
"""

import dataclasses
import os

from jaxrec.config import Config, DataConfig, EncoderConfig, TrainConfig

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> Config:
  base = Config()
  return dataclasses.replace(
      base,
      workdir="runs/ml1m_text",
      data=DataConfig(source="ml1m", path=os.path.normpath(os.path.join(_REPO, "../shared/data/ml-1m")),
                      item_text="title+genres+plot", split="random", split_ratios=(0.8, 0.1, 0.1),
                      cold_item_fraction=0.1, history_len=10),
      encoder=dataclasses.replace(EncoderConfig(), mode="frozen", max_length=128),
      # About one epoch of the 805K training pairs: what a shared 2-core CPU trains in minutes.
      # history_len=10 (was 20) halves the item-tower work of every step, which dominates it.
      train=dataclasses.replace(TrainConfig(), steps=800, batch_size=1024, learning_rate=5e-3),
  )
