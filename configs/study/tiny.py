"""A tiny study for the smoke test: the synthetic world of configs/tiny.py, the ID-only, text-only
and hybrid models, two seeds at the full training set, two training fractions, a few steps per
cell (seconds each on a CPU); the EASE and ItemKNN baselines once each (closed form, no seeds).

The text models use the packaged MiniLM unless overridden; the test passes a tiny random BERT
(`encoder.path=...`) so the grid runs in well under a minute."""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

ID = Model("id", ("model.use_text=false", "encoder.mode=none", "model.use_item_features=false"), "ID-only two-tower")
TEXT = Model("text", ("model.use_text=true", "encoder.mode=frozen", "model.use_item_ids=false"), "text-only item tower")
HYBRID = Model("hybrid", ("model.use_text=true", "encoder.mode=frozen"), "hybrid text + ids")
EASE = Model("ease", label="EASE", kind="ease")
ITEMKNN = Model("itemknn", label="ItemKNN", kind="itemknn")

SYNTHETIC = DatasetSpec("synthetic", "configs/tiny.py", ("encoder.max_length=32",))
COLD = SplitSpec("cold", ("data.synthetic.cold_item_fraction=0.15",))


def get_study() -> Study:
  return Study(
      name="tiny",
      # One device: the tests simulate 8, and partitioning a 90-item model 8 ways only costs compile time.
      overrides=("train.steps=8", "train.progress=false", "eval.batch_size=64", "mesh.num_devices=1"),
      grids=(
          Grid(models=(ID, HYBRID), datasets=(SYNTHETIC,), splits=(COLD,), train_fractions=(0.5, 1.0), seeds=(0,)),
          Grid(models=(ID, TEXT, HYBRID), datasets=(SYNTHETIC,), splits=(COLD,), seeds=(1,)),
          # Two lams and two shrinks: the validation pick, at a fraction of the default grids' cost.
          Grid(models=(EASE, ITEMKNN), datasets=(SYNTHETIC,), splits=(COLD,),
               overrides=("baseline.lams=100,1000", "baseline.ks=50", "baseline.shrinks=0,10")),
      ),
  )
