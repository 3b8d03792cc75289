"""The transfer study: does a model trained on ML-1M help on ML-100K, and with how much data?
Run with `jaxrec study --config configs/study/transfer.py` from the repository root.

Four sources are trained first, as the study's first cells (configs/ml1m_source.py: text and
genre/decade features, no id table; source_ids: the same with an item id table; source_text: text
only; source_union: text only, on ML-1M and Amazon Musical Instruments as one catalog); the target
cells start from their workdirs. Target: ML-100K, temporal leave-one-out and its random 8:1:1
split (3 seeds each), with a share of its training interactions (data.train_fraction; valid and
test stay whole), 300 steps of 256 for every cell, the model's scores alone (no popularity prior).

Models on the target:
  scratch      from scratch, the source's architecture (text + features, no ids)
  hybrid       from scratch, with item ids, user ids and user features (the usual in-domain hybrid)
  finetune     configs/ml1m_source.py's parameters, all trained on the target (checkpoint.init_from)
  scratch_ids  from scratch, with item ids (source_ids' architecture)
  finetune_ids source_ids' parameters, all trained; the target's id table is new
  adapt_ids    source_ids' parameters kept, only the target's new id table trained
               (checkpoint.init_trainable=new: parameter-efficient transfer)
  adalora      configs/ml1m_source.py's parameters kept, the text encoder trained through new
               AdaLoRA adapters (encoder.mode=adalora, checkpoint.init_trainable=new); one seed at
               10%, 300 steps of 128: a live MiniLM is slow on 2 CPU cores

Text only, to compare the union with ML-1M alone (scratch_text, finetune_text, finetune_union).

Amazon Musical Instruments (random 8:1:1, 100 steps of 256, text only: it has no genres) takes
scratch, scratch_ids and finetune from source_text, the ML-1M source without genre features.

Zero-shot (no target training) is one command per source, not a cell:
  jaxrec evaluate --workdir runs/study/transfer/ml1m/random/source/f1/s0 data.source=ml100k \\
      data.split=loo data.cold_item_fraction=0 [data.train_fraction=0.1]
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

OUT = "runs/study/transfer"
FROM = f"checkpoint.init_from={OUT}/ml1m/random/source/f1/s0"
FROM_IDS = f"checkpoint.init_from={OUT}/ml1m/random/source_ids/f1/s0"
FROM_TEXT = f"checkpoint.init_from={OUT}/ml1m/random/source_text/f1/s0"
FROM_UNION = f"checkpoint.init_from={OUT}/ml1m+amazon/random/source_union/f1/s0"
IDS = ("model.use_item_ids=true",)

SOURCE = DatasetSpec("ml1m", "configs/ml1m_source.py")
TARGET = DatasetSpec("ml100k", "configs/ml1m_source.py", ("data.source=ml100k", "data.path=", "train.steps=300",
                                                          "train.batch_size=256", "eval.popularity_prior=0"))
# Amazon Musical Instruments has no genres: its cells (and their source) use text alone.
AMAZON = DatasetSpec("amazon", "configs/ml1m_source.py",
                     ("data.source=amazon", "data.path=", "data.item_text=summaries+reviews",
                      "model.use_item_features=false", "train.steps=100", "eval.popularity_prior=0"))
# ML-1M and Amazon Musical Instruments as one source (data.source=union): one catalog of both, users
# apart, each split alone; text only (Amazon has no genres).
UNION = DatasetSpec("ml1m+amazon", "configs/ml1m_source.py",
                    ("data.source=union", "data.path=", "data.union=ml1m:title+genres,amazon:summaries+reviews",
                     "model.use_item_features=false"))
RANDOM = SplitSpec("random")
LOO = SplitSpec("loo", ("data.split=loo", "data.cold_item_fraction=0"))
RANDOM_WARM = SplitSpec("random", ("data.split=random", "data.cold_item_fraction=0"))

SOURCES = (Model("source", (), "ML-1M source, text + features"),
           Model("source_ids", (*IDS, "eval.popularity_prior=0"), "ML-1M source with item ids"),
           Model("source_text", ("model.use_item_features=false",), "ML-1M source, text only"))
# A model name has one description across grids (tables and plots are keyed by name): "the source's
# inputs" are text + features on ML-100K and text alone on Amazon.
AMAZON_MODELS = (
    Model("scratch", (), "from scratch, the source's inputs"),
    Model("scratch_ids", IDS, "from scratch, the source's inputs + ids"),
    Model("finetune", (FROM_TEXT,), "ML-1M source, fine-tuned"),
)
MODELS = (
    Model("scratch", (), "from scratch, the source's inputs"),
    Model("hybrid", (*IDS, "model.use_user_ids=true", "model.use_user_features=true"), "from scratch, hybrid"),
    Model("finetune", (FROM,), "ML-1M source, fine-tuned"),
    Model("scratch_ids", IDS, "from scratch, the source's inputs + ids"),
    Model("finetune_ids", (*IDS, FROM_IDS), "ML-1M with ids, fine-tuned"),
    Model("adapt_ids", (*IDS, FROM_IDS, "checkpoint.init_trainable=new"), "ML-1M with ids, new id table trained"),
)

# A live MiniLM costs ~3.4 s per 64 texts-with-history on 2 CPU cores, so this arm trains 300 steps
# of 128 (half the other cells' examples) on texts cut to 32 tokens (MovieLens' "title. Genres: ..."
# fits); the rank budget shrinks from 12 to 8 per adapter between steps 30 and 240.
# Does the union transfer better than ML-1M alone? Both sources are text only, so are these target cells.
UNION_MODELS = (
    Model("scratch_text", ("model.use_item_features=false",), "from scratch, text only"),
    Model("finetune_text", ("model.use_item_features=false", FROM_TEXT), "ML-1M text-only source, fine-tuned"),
    Model("finetune_union", ("model.use_item_features=false", FROM_UNION), "ML-1M + Amazon source, fine-tuned"),
)

ADALORA = Model("adalora", (FROM, "encoder.mode=adalora", "checkpoint.init_trainable=new", "train.batch_size=128",
                            "encoder.max_length=32", "train.steps_per_call=1", "encoder.adalora_tinit=30",
                            "encoder.adalora_tfinal=60", "encoder.adalora_delta_t=10"),
                "ML-1M, AdaLoRA adapters trained")


def get_study() -> Study:
  return Study(
      name="transfer",
      out=OUT,
      overrides=("train.progress=false",),
      grids=(
          Grid(models=SOURCES, datasets=(SOURCE,), splits=(RANDOM,)),
          Grid(models=(Model("source_union", (), "ML-1M + Amazon source, text only"),), datasets=(UNION,),
               splits=(RANDOM,)),
          Grid(models=MODELS, datasets=(TARGET,), splits=(LOO,), train_fractions=(0.01, 0.05, 0.1, 0.25, 1.0),
               seeds=(0, 1, 2)),
          Grid(models=UNION_MODELS, datasets=(TARGET,), splits=(LOO,), train_fractions=(0.01, 0.1, 1.0),
               seeds=(0, 1, 2)),
          Grid(models=(ADALORA,), datasets=(TARGET,), splits=(LOO,), train_fractions=(0.1,)),
          Grid(models=MODELS, datasets=(TARGET,), splits=(RANDOM_WARM,), train_fractions=(0.1, 1.0),
               seeds=(0, 1, 2)),
          Grid(models=AMAZON_MODELS, datasets=(AMAZON,), splits=(RANDOM_WARM,), train_fractions=(0.1, 1.0),
               seeds=(0, 1, 2)),
      ),
  )
