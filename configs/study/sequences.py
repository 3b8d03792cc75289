"""The sequence study: what reading the history in order adds, and what text adds on top of it.
Run with `jaxrec study --config configs/study/sequences.py`.

Models (popularity is read from every run's popularity/ keys, not trained):
  id_pool          ID-only two-tower, the history mean-pooled (order-blind)
  hybrid_pool      text + ids + features, mean-pooled history (the paradigm study's hybrid)
  id_seq           ID-only items, transformer query tower: SASRec's architecture
  text_seq         text-only items (frozen MiniLM + features), transformer: UniSRec's inductive setting
  hybrid_seq       text + ids + features, transformer

Datasets and splits: ML-100K and Amazon Musical Instruments 5-core, temporal leave-one-out (each
user's last interaction is test, the one before valid), and its cold variant (loo_cold20: 20% of
the catalog held out entirely, every interaction with it a test row). RecBole's SASRec on the same
split is in benchmarks/README.md ("RecBole SASRec on jaxrec's leave-one-out split").

Sequence settings are configs/ml100k_seq.py's (chosen on ML-100K's validation split); Amazon's
users have about seven interactions, so its history window is 20.
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

ID = ("model.use_text=false", "encoder.mode=none", "model.use_item_features=false")
TEXT = ("model.use_text=true", "encoder.mode=frozen", "model.use_item_ids=false")
HYBRID = ("model.use_text=true", "encoder.mode=frozen")
# configs/ml100k_seq.py's query tower and training, as overrides (so every dataset can take them).
SEQ = ("model.query=transformer", "data.history_len=10", "train.batch_size=128", "model.query_dropout=0.2")

MODELS = (
    Model("id_pool", ID, "ID-only, pooled history"),
    Model("hybrid_pool", HYBRID, "hybrid text + ids, pooled history"),
    Model("id_seq", (*ID, *SEQ), "ID-only, transformer (SASRec)"),
    Model("text_seq", (*TEXT, *SEQ), "text-only items, transformer"),
    Model("hybrid_seq", (*HYBRID, *SEQ), "hybrid text + ids, transformer"),
)

ML100K = DatasetSpec("ml100k", "configs/ml100k_text.py", ("train.steps=1500", "train.steps_per_call=10"))
AMAZON = DatasetSpec("amazon", "configs/amazon_instruments_text.py")

LOO = SplitSpec("loo", ("data.split=loo", "data.cold_item_fraction=0"))
LOO_COLD20 = SplitSpec("loo_cold20", ("data.split=loo", "data.cold_item_fraction=0.2"))


def get_study() -> Study:
  return Study(
      name="sequences",
      overrides=("train.progress=false", "mesh.num_devices=1"),
      grids=(
          Grid(models=MODELS, datasets=(ML100K, AMAZON), splits=(LOO,), seeds=(0, 1, 2)),
          Grid(models=MODELS, datasets=(ML100K,), splits=(LOO_COLD20,), seeds=(0,)),
      ),
      tuned=(("amazon", "id_seq", ("data.history_len=20",)), ("amazon", "text_seq", ("data.history_len=20",)),
             ("amazon", "hybrid_seq", ("data.history_len=20",))),
  )
