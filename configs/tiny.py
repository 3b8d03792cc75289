"""Small CPU smoke config used by the tests: a tiny synthetic world, ID and feature towers only
(no text encoder), a handful of steps."""

import dataclasses

from jaxrec.config import Config, DataConfig, EncoderConfig, ModelConfig, SyntheticConfig, TrainConfig


def get_config() -> Config:
  base = Config()
  return dataclasses.replace(
      base,
      workdir="runs/tiny",
      data=DataConfig(history_len=5, synthetic=SyntheticConfig(num_users=120, num_items=90, num_topics=6,
                                                               interactions_per_user=10)),
      encoder=EncoderConfig(mode="none"),
      model=ModelConfig(embed_dim=16, id_dim=16, feature_dim=8, mlp_dims=(32,), use_text=False),
      train=TrainConfig(steps=20, batch_size=32, warmup_steps=2, log_every=5, progress=False),
  )
