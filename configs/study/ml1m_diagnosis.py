"""Why the first ML-1M cells ranked below popularity: the query tower's history.

A random split holds out items at random positions of a user's profile. With data.history=recent
each training example pools the L items just before its target (file order here: this ML-1M copy
has no time), and evaluation pools the user's last L known items, an order the evaluation never
rewards. data.history=sampled pools L items drawn from the user's other training items instead
(data.history=auto picks it for random splits). One epoch (800 steps of 1,024), one seed:

  jaxrec study --config configs/study/ml1m_diagnosis.py --out runs/study/ml1m_diagnosis
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

_ID = ("model.use_text=false", "encoder.mode=none", "model.use_item_features=false")
_HYBRID = ("model.use_text=true", "encoder.mode=frozen")
MODELS = (
    Model("id_recent", (*_ID, "data.history=recent"), "ID-only, history = the L before the target"),
    Model("id_sampled", (*_ID, "data.history=sampled"), "ID-only, history = L sampled from the profile"),
    Model("hybrid_recent", (*_HYBRID, "data.history=recent"), "hybrid, history = the L before the target"),
    Model("hybrid_sampled", (*_HYBRID, "data.history=sampled"), "hybrid, history = L sampled from the profile"),
)
ML1M = DatasetSpec("ml1m", "configs/ml1m_text.py", ("train.steps=800", "train.steps_per_call=10"))
RANDOM = SplitSpec("random", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0"))


def get_study() -> Study:
  return Study(
      name="ml1m_diagnosis",
      overrides=("train.progress=false", "mesh.num_devices=1"),
      grids=(Grid(models=MODELS, datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),),
  )
