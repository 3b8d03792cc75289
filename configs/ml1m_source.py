"""MovieLens-1M as a source for transfer: a text-aware two-tower with nothing tied to ML-1M's
users, so its workdir scores other catalogs and users without training there (zero-shot) and
starts fine-tuning runs (checkpoint.init_from).

Items are described by MiniLM's vector of "title. Genres: ..." (the text every MovieLens release
has) and the genre and decade features (vocabularies shared by ML-100K and ML-1M), with no id
table: a new catalog's items look to the model exactly like the ones it trained on. The query
tower pools the history's item vectors with no user id and no user features (ML-100K and ML-1M
code occupations differently). Random 8:1:1 split (the shared ML-1M copy has no timestamps), 10%
of the movies held out cold.

Evaluation adds the split's popularity as a prior (eval.popularity_prior=1: cos/temperature +
log(1 + training count)): text alone cannot know how popular a movie is in a catalog the model
never saw. Zero-shot on ML-100K's leave-one-out split the prior's weight was chosen on the
validation split from 0.5, 1 and 2 (docs/study.md, "Transfer").

  jaxrec train --config configs/ml1m_source.py
  jaxrec evaluate --workdir runs/ml1m_source data.source=ml100k data.path=<ml-100k dir> \\
      data.split=loo data.cold_item_fraction=0
The data lives in $JAXREC_DATA, else in ../shared/data beside the repository (never committed).
"""

import dataclasses
import os

from jaxrec.config import Config, DataConfig, EncoderConfig, EvalConfig, ModelConfig, TrainConfig, data_root


def get_config() -> Config:
  base = Config()
  return dataclasses.replace(
      base,
      workdir="runs/ml1m_source",
      data=DataConfig(source="ml1m", path=os.path.join(data_root(), "ml-1m"), item_text="title+genres",
                      split="random", split_ratios=(0.8, 0.1, 0.1), cold_item_fraction=0.1, history_len=10),
      encoder=dataclasses.replace(EncoderConfig(), mode="frozen", max_length=64),
      model=dataclasses.replace(ModelConfig(), use_item_ids=False, use_user_ids=False, use_user_features=False),
      train=dataclasses.replace(TrainConfig(), steps=4000, batch_size=1024, learning_rate=5e-3, steps_per_call=10),
      eval=dataclasses.replace(EvalConfig(), popularity_prior=1.0),
  )
