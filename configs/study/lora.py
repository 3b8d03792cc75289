"""LoRA cells of the paradigm study, for an accelerator: the hybrid model with rank-8 adapters on
MiniLM's attention, trained live (the unique items of every batch are re-encoded each step).

On the 2-core CPU this project's study ran on, a LoRA step of MiniLM takes seconds even at
batch 16, so these cells were not run there. On a GPU/TPU they use the same datasets, splits,
training settings and seeds as paradigm.py's frozen cells, so their table lines up with it:

  jaxrec study --config configs/study/lora.py --out runs/study/lora
"""

import importlib.util
import os

from jaxrec.study import Grid, Model, Study

_spec = importlib.util.spec_from_file_location("paradigm_study", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                              "paradigm.py"))
_paradigm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paradigm)

LORA = Model("lora", ("model.use_text=true", "encoder.mode=lora", "encoder.lora_rank=8", "encoder.lora_alpha=16"),
             "hybrid, LoRA MiniLM")


def get_study() -> Study:
  return Study(
      name="lora",
      overrides=("train.progress=false",),
      grids=(
          Grid(models=(LORA,), datasets=(_paradigm.ML1M,), splits=(_paradigm.RANDOM,), seeds=(0, 1, 2)),
          Grid(models=(LORA,), datasets=(_paradigm.ML100K,), splits=(_paradigm.COLD20,), seeds=(0, 1, 2)),
      ),
  )
