"""The study runner on configs/study/tiny.py: every cell trains (the EASE and ItemKNN baselines
fit), the tables hold numbers, the plots are labelled matplotlib charts of those numbers, and a
second run resumes by reading the finished cells."""

import dataclasses
import io
import json
import math
import os
import shlex
import struct

import numpy as np
import pytest
from matplotlib.container import BarContainer
from PIL import Image

from fixtures import tiny_bert
from jaxrec import study
from jaxrec.report import plots, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "study", "tiny.py")
BASELINE_ROWS = ("ease", "ease_trainvalid", "itemknn")


def _write_study(tmp_path, *overrides) -> str:
  path = tmp_path / "baseline_study.py"
  path.write_text("from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study\n\n"
                  "def get_study():\n"
                  "  return Study('b', (Grid((Model('ease', kind='ease'),),\n"
                  "                          (DatasetSpec('synthetic', 'configs/tiny.py'),), (SplitSpec('s'),),\n"
                  f"                          overrides={overrides!r}),))\n")
  return str(path)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("study")
  encoder = tiny_bert.write(tmp / "tiny_bert")
  out = tmp / "out"
  argv = ["--config", TINY, "--out", str(out), f"encoder.path={encoder}", f"encoder.cache_dir={tmp / 'cache'}"]
  assert study.main(argv) == 0
  return out, argv


@pytest.mark.slow
def test_every_cell_trains_and_the_tables_hold_numbers(tiny_study):
  out, _ = tiny_study
  cells = tables.read_csv(out / "cells.csv")
  trained = [r for r in cells if r["model"] not in (study.POPULARITY, *BASELINE_ROWS)]
  assert sorted((r["model"], r["train_fraction"], r["seed"]) for r in trained) == [
      ("hybrid", 0.5, 0.0), ("hybrid", 1.0, 0.0), ("hybrid", 1.0, 1.0), ("id", 0.5, 0.0), ("id", 1.0, 0.0),
      ("id", 1.0, 1.0), ("text", 1.0, 1.0)]
  for row in cells:
    for name in ("recall@10", "ndcg@10", "mrr@10", "hit@10", "recall@50", "warm/recall@10", "cold/recall@10",
                 "coverage@10"):
      assert 0.0 <= row[name] <= 1.0, (row["model"], name, row[name])
    assert row["recall@50"] >= row["recall@10"]
  # The popularity ranking and the item-item baselines never recommend an item without training
  # interactions: nothing scores it.
  assert all(r["cold/recall@10"] == 0.0 for r in cells if r["model"] in (study.POPULARITY, *BASELINE_ROWS))
  # The baselines: one cell each (seed 0, full training set), EASE's refit on train + valid a row of its own.
  baseline_rows = {r["model"]: r for r in cells if r["model"] in BASELINE_ROWS}
  assert sorted(baseline_rows) == sorted(BASELINE_ROWS)
  assert all(r["seed"] == 0 and r["train_fraction"] == 1.0 and r["steps"] == 0 for r in baseline_rows.values())
  ease = json.loads((out / "synthetic" / "cold" / "ease" / "f1" / "s0" / "metrics.json").read_text())
  assert baseline_rows["ease"]["recall@10"] == pytest.approx(ease["recall@10"], abs=1e-6)
  assert baseline_rows["ease_trainvalid"]["recall@10"] == pytest.approx(ease["refit/recall@10"], abs=1e-6)
  assert ease["baseline/lam"] in (100.0, 1000.0) and ease["popularity/recall@10"] == pytest.approx(
      next(r["recall@10"] for r in cells if r["model"] == study.POPULARITY and r["train_fraction"] == 1.0), abs=1e-6)
  knn = json.loads((out / "synthetic" / "cold" / "itemknn" / "f1" / "s0" / "metrics.json").read_text())
  assert knn["baseline/k"] == 50 and knn["baseline/shrink"] in (0.0, 10.0)
  assert baseline_rows["itemknn"]["seconds"] == pytest.approx(
      json.loads((out / "synthetic" / "cold" / "itemknn" / "f1" / "s0" / "study_cell.json").read_text())["seconds"],
      rel=1e-5)  # cells.csv keeps 6 significant digits

  results = tables.read_csv(out / "results.csv")
  by_key = {(r["model"], r["train_fraction"]): r for r in results}
  assert set(by_key) == {("popularity", 1.0), ("id", 1.0), ("text", 1.0), ("hybrid", 1.0), ("popularity", 0.5),
                         ("id", 0.5), ("hybrid", 0.5), ("ease", 1.0), ("ease_trainvalid", 1.0), ("itemknn", 1.0)}
  hybrid = by_key[("hybrid", 1.0)]
  assert hybrid["n"] == 2 and hybrid["seeds"] == "0 1"
  seeds = [r["recall@10"] for r in trained if r["model"] == "hybrid" and r["train_fraction"] == 1.0]
  assert hybrid["recall@10_mean"] == pytest.approx(sum(seeds) / 2, abs=1e-5)
  assert hybrid["recall@10_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2), abs=1e-5)
  assert by_key[("text", 1.0)]["n"] == 1 and math.isnan(by_key[("text", 1.0)]["recall@10_std"])

  table = (out / "results.md").read_text()
  assert "| hybrid text + ids | 1 | 2 | " + f"{hybrid['recall@10_mean']:.4f} ± {hybrid['recall@10_std']:.4f}" in table
  assert "| popularity | 0.5 | 1 | " in table
  assert f"| EASE | 1 | 1 | {by_key[('ease', 1.0)]['recall@10_mean']:.4f} | " in table
  assert "| EASE, refit on train + valid | 1 | 1 | " in table and "| ItemKNN | 1 | 1 | " in table
  # Table order: popularity, the trained models in study order, then each baseline and its refit.
  rows_at_1 = [line.split(" | ")[0][2:] for line in table.splitlines()
               if line.startswith("| ") and line.split(" | ")[1] == "1"]
  assert rows_at_1 == ["popularity", "ID-only two-tower", "hybrid text + ids", "text-only item tower", "EASE",
                       "EASE, refit on train + valid", "ItemKNN"]
  commands = (out / "commands.sh").read_text()
  assert commands.count("jaxrec train --config configs/tiny.py") == 7
  assert commands.count("python -m jaxrec.baselines --kind ease --config configs/tiny.py") == 1
  assert commands.count("python -m jaxrec.baselines --kind itemknn --config configs/tiny.py") == 1


@pytest.mark.slow
def test_a_baseline_cells_command_reproduces_it(tiny_study, tmp_path):
  from jaxrec import baselines
  out, _ = tiny_study
  line = next(l for l in (out / "commands.sh").read_text().splitlines() if "--kind itemknn" in l)
  args = shlex.split(line)[3:]  # after `python -m jaxrec.baselines`
  assert args[-1].startswith("workdir=") and "baseline.shrinks=0,10" in args
  assert baselines.main(args[:-1] + [f"workdir={tmp_path}"]) == 0
  again = json.loads((tmp_path / "metrics.json").read_text())
  saved = json.loads((out / "synthetic" / "cold" / "itemknn" / "f1" / "s0" / "metrics.json").read_text())
  assert {k: v for k, v in again.items() if k != "baseline/seconds"} == {
      k: v for k, v in saved.items() if k != "baseline/seconds"}


@pytest.mark.slow
def test_plots_are_pngs_of_the_figure_size(tiny_study):
  out, _ = tiny_study
  assert sorted(p.name for p in out.glob("*.png")) == ["efficiency_synthetic_cold.png", "recall_synthetic_cold.png"]
  for name, size in (("recall_synthetic_cold.png", (1000, 480)), ("efficiency_synthetic_cold.png", (1200, 450))):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == size
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (image != 255).any(axis=-1).mean() > 0.03  # axes, bars or lines and labels, not a blank canvas


def _bars(ax) -> list[list[float]]:
  return [[bar.get_height() for bar in c] for c in ax.containers if isinstance(c, BarContainer)]


@pytest.mark.slow
def test_study_figures_label_their_axes_and_plot_the_results(tiny_study):
  out, _ = tiny_study
  results = tables.read_csv(out / "results.csv")
  labels = {"id": "ID-only two-tower", "text": "text-only item tower", "hybrid": "hybrid text + ids"}
  figures = plots.study_figures(results, [study.POPULARITY, "id", "text", "hybrid"], labels)
  assert sorted(figures) == ["efficiency_synthetic_cold.png", "recall_synthetic_cold.png"]
  row = {(r["model"], r["train_fraction"]): r for r in results}

  bars = figures["recall_synthetic_cold.png"]
  (ax,) = bars.axes
  assert ax.get_ylabel() == "Recall@10" and "restricted to" in ax.get_xlabel()
  assert "synthetic / cold" in ax.get_title() and "mean ± std over seeds" in ax.get_title()
  assert [t.get_text() for t in ax.get_xticklabels()] == [plots.GROUP_NAMES[g] for g in ("", "warm/", "cold/")]
  assert [t.get_text() for t in bars.legends[0].get_texts()] == ["popularity", *labels.values()]
  expected = [[row[(m, 1.0)][f"{g}recall@10_mean"] for g in ("", "warm/", "cold/")]
              for m in (study.POPULARITY, "id", "text", "hybrid")]
  np.testing.assert_allclose(_bars(ax), expected, atol=1e-6)
  # Two seeds: the hybrid's error bars span mean ± sample std; one seed (text): no error bars.
  hybrid = [c for c in ax.containers if isinstance(c, BarContainer)][3]
  spans = [seg[1][1] - seg[0][1] for seg in hybrid.errorbar.lines[2][0].get_segments()]
  np.testing.assert_allclose(spans, [2 * row[("hybrid", 1.0)][f"{g}recall@10_std"] for g in ("", "warm/", "cold/")],
                             atol=1e-6)
  assert [c for c in ax.containers if isinstance(c, BarContainer)][2].errorbar is None

  lines = figures["efficiency_synthetic_cold.png"]
  overall, cold = lines.axes
  assert [a.get_title() for a in (overall, cold)] == [plots.GROUP_NAMES[""], plots.GROUP_NAMES["cold/"]]
  assert overall.get_ylabel() == "Recall@10" and overall.get_xlabel().startswith("training fraction")
  assert overall.get_xscale() == "linear"  # 0.5 to 1 is not worth a log axis
  swept = {study.POPULARITY: "popularity", "id": labels["id"], "hybrid": labels["hybrid"]}  # ran at both fractions
  assert [t.get_text() for t in lines.legends[0].get_texts()] == list(swept.values())
  for ax, group in ((overall, ""), (cold, "cold/")):
    plotted = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers}
    assert plotted == {label: ([0.5, 1.0], [pytest.approx(row[(m, f)][f"{group}recall@10_mean"], abs=1e-6)
                                            for f in (0.5, 1.0)]) for m, label in swept.items()}


def test_efficiency_lines_use_a_log_axis_when_fractions_span_a_decade():
  values_MxF = np.array([[0.1, 0.2, 0.3]])
  fig = plots.efficiency_lines(["id"], [0.05, 0.5, 1.0], [("all", values_MxF, np.full_like(values_MxF, np.nan))], "t")
  (ax,) = fig.axes
  assert ax.get_xscale() == "log"
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0.05", "0.5", "1"]
  assert not fig.legends  # one model: nothing to tell apart


@pytest.mark.slow
def test_a_second_run_reads_finished_cells_instead_of_training(tiny_study):
  out, argv = tiny_study
  stamps = {p: os.path.getmtime(p) for p in out.rglob("metrics.json")}
  assert len(stamps) == 9
  assert study.main(argv) == 0
  assert {p: os.path.getmtime(p) for p in out.rglob("metrics.json")} == stamps


@pytest.mark.slow
def test_a_cell_whose_config_changed_is_refused(tiny_study):
  out, argv = tiny_study
  with pytest.raises(study.StudyError, match="holds a run of a different config"):
    study.main(argv + ["model.temperature=0.2"])
  # A baseline cell reads its finished fit whatever the trained cells' keys, but not with other options.
  cells = {c.id: c for c in study.plan(study.load_study(TINY), str(out), argv[4:] + ["model.temperature=0.2"])}
  assert study.run_cell(cells["synthetic/cold/ease/f1/s0"])[1] is False
  with pytest.raises(study.StudyError, match=r"ease/f1/s0: .* different config \(baseline options\)"):
    study.main(argv + ["baseline.lams=7"])


def test_a_baseline_model_takes_one_cell_and_an_unknown_kind_is_refused(tmp_path):
  grid = study.Grid(models=(study.Model("id"), study.Model("ease", kind="ease")),
                    datasets=(study.DatasetSpec("synthetic", "configs/tiny.py"),), splits=(study.SplitSpec("s"),),
                    seeds=(3, 4))
  cells = study.plan(study.Study("t", (grid,)), str(tmp_path))
  assert [c.id for c in cells] == ["synthetic/s/id/f1/s3", "synthetic/s/id/f1/s4", "synthetic/s/ease/f1/s0"]
  assert study.command(cells[2]).startswith("python -m jaxrec.baselines --kind ease --config configs/tiny.py ")
  bad = dataclasses.replace(grid, models=(study.Model("knn", kind="knn"),))
  with pytest.raises(study.StudyError, match="model 'knn': unknown kind 'knn'; kinds: train, ease, itemknn"):
    study.plan(study.Study("t", (bad,)), str(tmp_path))
  with pytest.raises(study.StudyError, match="cell synthetic/s/ease/f1/s0: unknown baseline option 'baseline.lamz=1'"):
    study.main(["--config", _write_study(tmp_path, "baseline.lamz=1"), "--out", str(tmp_path / "o"), "--list"])


def test_bad_study_files_fail_before_training(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return None\n")
  with pytest.raises(study.StudyError, match="defines no get_study"):
    study.main(["--config", str(bad), "--out", str(tmp_path / "o")])
  with pytest.raises(study.StudyError, match="cell synthetic/cold/id/f0.5/s0: .*train.stpes"):
    study.main(["--config", TINY, "--out", str(tmp_path / "o"), "train.stpes=3"])


@pytest.mark.slow
def test_reevaluate_recomputes_metrics_from_the_checkpoint_and_keeps_training_stats(tiny_study):
  import json
  out, argv = tiny_study
  paths = sorted(p for p in out.rglob("metrics.json") if p.parent.parent.parent.name not in BASELINE_ROWS)
  target = paths[0]
  original = json.loads(target.read_text())
  tampered = dict(original, **{"recall@10": -1.0})
  target.write_text(json.dumps(tampered))
  others = {p: os.path.getmtime(p) for p in paths[1:]}
  cell_id = os.path.relpath(target.parent, out)
  assert study.main(argv + ["--reevaluate", "--only", cell_id]) == 0
  fresh = json.loads(target.read_text())
  assert fresh["recall@10"] == pytest.approx(original["recall@10"], abs=1e-6)  # same code, same checkpoint
  assert fresh["train/final_loss"] == original["train/final_loss"]
  assert "reevaluated_utc" in fresh
  assert {p: os.path.getmtime(p) for p in paths[1:]} == others
  cells = tables.read_csv(out / "cells.csv")
  assert min(float(r["recall@10"]) for r in cells) >= 0  # the tables were rebuilt from the fresh metrics

  # A baseline has no checkpoint: re-evaluating fits it again, with the same numbers.
  target = out / "synthetic" / "cold" / "ease" / "f1" / "s0" / "metrics.json"
  original = json.loads(target.read_text())
  target.write_text(json.dumps(dict(original, **{"recall@10": -1.0})))
  assert study.main(argv + ["--reevaluate", "--only", "synthetic/cold/ease/*"]) == 0
  fresh = json.loads(target.read_text())
  assert fresh["recall@10"] == original["recall@10"] and fresh["refit/recall@10"] == original["refit/recall@10"]
  assert "reevaluated_utc" in fresh
