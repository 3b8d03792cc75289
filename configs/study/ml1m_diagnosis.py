"""Why the ML-1M two-towers rank below popularity at a CPU budget: the ID-only model at 300 steps
with the default temperature, a softer temperature, without the logQ correction, and with a
five times longer history (the user profile the query tower pools).

  jaxrec study --config configs/study/ml1m_diagnosis.py --out runs/study/ml1m_diagnosis
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

_ID = ("model.use_text=false", "encoder.mode=none")
MODELS = (
    Model("id", _ID, "ID-only, temperature 0.05, logQ"),
    Model("id_tau0.2", (*_ID, "model.temperature=0.2"), "ID-only, temperature 0.2, logQ"),
    Model("id_no_logq", (*_ID, "train.logq_correction=false"), "ID-only, temperature 0.05, no logQ"),
    Model("id_hist50", (*_ID, "data.history_len=50"), "ID-only, 50 history items (10 elsewhere)"),
)
ML1M = DatasetSpec("ml1m", "configs/ml1m_text.py")
RANDOM = SplitSpec("random", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0"))


def get_study() -> Study:
  return Study(
      name="ml1m_diagnosis",
      overrides=("train.progress=false", "mesh.num_devices=1", "train.steps=300"),
      grids=(Grid(models=MODELS, datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),),
  )
