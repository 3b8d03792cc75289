"""MovieLens-1M with a frozen MiniLM text tower over title, genres and plot (MeLU's OMDb text).

The shared copy has no ratings.dat: interactions are implicit (user, movie) pairs without time,
so the split is random 8:1:1 per user (leave-one-out needs timestamps), and the query tower's
history is sampled from the user's profile (data.history=auto). All 3,883 movies are in
the catalog; 10% are held out cold. Use data.item_text=title+genres for short texts.
"""

import dataclasses
import os

from jaxrec.config import Config, DataConfig, EncoderConfig, TrainConfig, data_root


def get_config() -> Config:
  base = Config()
  return dataclasses.replace(
      base,
      workdir="runs/ml1m_text",
      data=DataConfig(source="ml1m", path=os.path.join(data_root(), "ml-1m"),
                      item_text="title+genres+plot", split="random", split_ratios=(0.8, 0.1, 0.1),
                      cold_item_fraction=0.1, history_len=10),
      encoder=dataclasses.replace(EncoderConfig(), mode="frozen", max_length=128),
      # Five epochs of the 805K training pairs (about 4 minutes on 2 CPU cores), ten steps per
      # jitted call. The split is random, so the query tower pools 10 items sampled from the
      # user's other training items (data.history=auto), not a file-order window.
      train=dataclasses.replace(TrainConfig(), steps=4000, batch_size=1024, learning_rate=5e-3,
                                steps_per_call=10),
  )
