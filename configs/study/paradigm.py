"""The paradigm study: does a pretrained text encoder in the item tower change what a two-tower
recommender can do? Run with `jaxrec study --config configs/study/paradigm.py`.

Models (popularity is read from every run's popularity/ keys, not trained):
  id      the classic ID-only two-tower: an item id embedding and nothing else in the item tower
  text    text-only item tower: frozen MiniLM vector + the dataset's categorical item features
          (genres, decade, ...), no item ids
  hybrid  text + ids + features through the fusion MLP (the design's default)
  ease, itemknn  closed-form item-item baselines (jaxrec.baselines): EASE's lam and ItemKNN's k and
          shrinkage picked on the validation split, scored by the same evaluator; EASE refit on
          train + valid is the ease_trainvalid row. One cell per dataset and split (deterministic).

Datasets and splits:
  ml1m/random     MovieLens-1M, random 8:1:1 per user, no cold items: the RecBole general
                  protocol (full ranking, the user's known items excluded)
  ml100k/loo      MovieLens-100K, temporal leave-one-out (last item test, second to last valid)
  amazon/random   Amazon Musical Instruments 5-core, random 8:1:1 per user
  */cold20        the same data, random 8:1:1 per user, then 20% of the catalog held out
                  entirely (all its interactions are test rows): cold start
Data efficiency: ml100k/cold20 (all models) and ml1m/random (ID-only and hybrid) at 10%, 25%, 50%
and 100% of the training pairs, each fraction trained for the same number of epochs (steps scaled
with the fraction).

Training lengths are set per dataset below (about five epochs; Amazon's 100 steps were chosen on
its validation split, see configs/amazon_instruments_text.py). Sized for a 2-core CPU: the
headline cells take three seeds, the rest one. LoRA cells are in lora.py.
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

ID = Model("id", ("model.use_text=false", "encoder.mode=none", "model.use_item_features=false"), "ID-only two-tower")
TEXT = Model("text", ("model.use_text=true", "encoder.mode=frozen", "model.use_item_ids=false"), "text-only item tower")
HYBRID = Model("hybrid", ("model.use_text=true", "encoder.mode=frozen"), "hybrid text + ids")
MODELS = (ID, TEXT, HYBRID)
# The training-budget check on the headline cell: the hybrid for ten epochs instead of five.
HYBRID_LONG = Model("hybrid_10ep", (*HYBRID.overrides, "train.steps=8000"), "hybrid text + ids, 10 epochs")
# The best query tower of the ML-1M ablation (validation split), ten epochs, on the test split: the
# profile alone (100 sampled items through their own history-item id table, no user id).
HYBRID_PROFILE = Model("hybrid_profile_10ep", (*HYBRID.overrides, "model.history_ids=true", "data.history_len=100",
                                               "model.use_user_ids=false", "train.steps=8000"),
                       "hybrid, profile query (history ids, 100 items, no user id), 10 epochs")
HYBRID_PROFILE_LONG = Model("hybrid_profile_20ep", (*HYBRID_PROFILE.overrides, "train.steps=16000"),
                            "hybrid, profile query (history ids, 100 items, no user id), 20 epochs")
# The same with data.history_dropout=0.5 (each training history slot masked with chance 0.5), the
# better of 0.5 and 0.75 on the validation split at ten epochs (configs/study/ml1m_ablation.py).
EASE = Model("ease", label="EASE", kind="ease")
ITEMKNN = Model("itemknn", label="ItemKNN (cosine, shrinkage)", kind="itemknn")
BASELINES = (EASE, ITEMKNN)
HYBRID_PROFILE_DROPOUT = Model("hybrid_profile_dropout_20ep", (*HYBRID_PROFILE_LONG.overrides, "data.history_dropout=0.5"),
                               "hybrid, profile query, history dropout 0.5, 20 epochs")

# 805K training pairs / 1,024 per step: 4,000 steps are five epochs.
ML1M = DatasetSpec("ml1m", "configs/ml1m_text.py", ("train.steps=4000", "train.steps_per_call=10"))
# 64K-98K training pairs / 256 per step: 1,500 steps are four to six epochs.
ML100K = DatasetSpec("ml100k", "configs/ml100k_text.py", ("train.steps=1500", "train.steps_per_call=10"))
AMAZON = DatasetSpec("amazon", "configs/amazon_instruments_text.py")

RANDOM = SplitSpec("random", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0"))
LOO = SplitSpec("loo", ("data.split=loo", "data.cold_item_fraction=0"))
COLD20 = SplitSpec("cold20", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0.2"))


def _fractions(dataset: DatasetSpec, split: SplitSpec, full_steps: int, models=MODELS) -> tuple[Grid, ...]:
  """One grid per training fraction, each with the full run's number of epochs."""
  return tuple(Grid(models=models, datasets=(dataset,), splits=(split,), train_fractions=(fraction,), seeds=(0,),
                    overrides=(f"train.steps={max(10, round(full_steps * fraction / 10) * 10)}",
                               f"train.warmup_steps={max(5, round(50 * fraction))}"))
               for fraction in (0.1, 0.25, 0.5))


def get_study() -> Study:
  return Study(
      name="paradigm",
      overrides=("train.progress=false", "mesh.num_devices=1"),
      grids=(  # the first grid a model appears in sets its row order in the tables
          Grid(models=(ID, HYBRID), datasets=(ML1M,), splits=(RANDOM,), seeds=(0, 1, 2)),
          Grid(models=(TEXT,), datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),
          Grid(models=MODELS, datasets=(ML100K,), splits=(LOO,), seeds=(0, 1, 2)),
          Grid(models=MODELS, datasets=(AMAZON,), splits=(RANDOM,), seeds=(0, 1, 2)),
          Grid(models=MODELS, datasets=(ML100K, AMAZON), splits=(COLD20,), seeds=(0, 1, 2)),
          Grid(models=MODELS, datasets=(ML1M,), splits=(COLD20,), seeds=(0,)),
          *_fractions(ML100K, COLD20, 1500),
          *_fractions(ML1M, RANDOM, 4000, models=(ID, HYBRID)),  # text-only cut for CPU time
          Grid(models=(HYBRID_LONG,), datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),
          Grid(models=(HYBRID_PROFILE, HYBRID_PROFILE_LONG), datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),
          Grid(models=(HYBRID_PROFILE_DROPOUT,), datasets=(ML1M,), splits=(RANDOM,), seeds=(0, 1, 2)),
          Grid(models=BASELINES, datasets=(ML1M, AMAZON), splits=(RANDOM, COLD20)),
          Grid(models=BASELINES, datasets=(ML100K,), splits=(LOO, COLD20)),
      ),
  )
