"""The paradigm study: does a pretrained text encoder in the item tower change what a two-tower
recommender can do? Run with `jaxrec study --config configs/study/paradigm.py`.

Models (popularity is read from every run's popularity/ keys, not trained):
  id      ID-only two-tower: item id + genre/decade embeddings, no text
  text    text-only item tower: frozen MiniLM vector + genre/decade, no item ids
  hybrid  text + ids through the fusion MLP (the design's default)

Datasets and splits:
  ml1m/random     MovieLens-1M, random 8:1:1 per user, no cold items: the RecBole general
                  protocol (full ranking, the user's known items excluded)
  ml100k/cold20   MovieLens-100K, random 8:1:1 per user, then 20% of the catalog held out
                  entirely (all its interactions are test rows): cold-start and data efficiency

Sized for a shared 2-core CPU (see docs/study.md for what was cut and why): the headline cells
(hybrid on ML-1M; every model on the ML-100K cold split) take three seeds, the ML-1M ID-only
baseline and the data-efficiency sweep one. LoRA cells are accelerator-only, in lora.py.
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

ID = Model("id", ("model.use_text=false", "encoder.mode=none"), "ID-only two-tower")
TEXT = Model("text", ("model.use_text=true", "encoder.mode=frozen", "model.use_item_ids=false"), "text-only item tower")
HYBRID = Model("hybrid", ("model.use_text=true", "encoder.mode=frozen"), "hybrid text + ids")

ML1M = DatasetSpec("ml1m", "configs/ml1m_text.py")
ML100K = DatasetSpec("ml100k", "configs/ml100k_text.py")

RANDOM = SplitSpec("random", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0"))
COLD20 = SplitSpec("cold20", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0.2"))


def get_study() -> Study:
  return Study(
      name="paradigm",
      overrides=("train.progress=false", "mesh.num_devices=1"),
      grids=(  # the first grid a model appears in sets its row order in the tables
          Grid(models=(ID, TEXT, HYBRID), datasets=(ML100K,), splits=(COLD20,), seeds=(0, 1, 2)),
          # Same epochs at every fraction (about 2.4 of the kept pairs, as the full-data cells): a
          # fixed 600 steps would be 24 epochs of a 10% sample, which measures overfitting instead.
          Grid(models=(ID, TEXT, HYBRID), datasets=(ML100K,), splits=(COLD20,), train_fractions=(0.1,), seeds=(0,),
               overrides=("train.steps=60", "train.warmup_steps=5")),
          Grid(models=(ID, TEXT, HYBRID), datasets=(ML100K,), splits=(COLD20,), train_fractions=(0.5,), seeds=(0,),
               overrides=("train.steps=300", "train.warmup_steps=25")),
          Grid(models=(ID,), datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),
          Grid(models=(HYBRID,), datasets=(ML1M,), splits=(RANDOM,), seeds=(0, 1, 2)),
      ),
  )
