"""The study runner on configs/study/tiny.py: every cell trains, the tables hold numbers, the
plots are labelled matplotlib charts of those numbers, and a second run resumes by reading the
finished cells."""

import io
import math
import os
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
  trained = [r for r in cells if r["model"] != study.POPULARITY]
  assert sorted((r["model"], r["train_fraction"], r["seed"]) for r in trained) == [
      ("hybrid", 0.5, 0.0), ("hybrid", 1.0, 0.0), ("hybrid", 1.0, 1.0), ("id", 0.5, 0.0), ("id", 1.0, 0.0),
      ("id", 1.0, 1.0), ("text", 1.0, 1.0)]
  for row in cells:
    for name in ("recall@10", "ndcg@10", "mrr@10", "hit@10", "recall@50", "warm/recall@10", "cold/recall@10",
                 "coverage@10"):
      assert 0.0 <= row[name] <= 1.0, (row["model"], name, row[name])
    assert row["recall@50"] >= row["recall@10"]
  # The popularity ranking never recommends an item without training interactions.
  assert all(r["cold/recall@10"] == 0.0 for r in cells if r["model"] == study.POPULARITY)

  results = tables.read_csv(out / "results.csv")
  by_key = {(r["model"], r["train_fraction"]): r for r in results}
  assert set(by_key) == {("popularity", 1.0), ("id", 1.0), ("text", 1.0), ("hybrid", 1.0), ("popularity", 0.5),
                         ("id", 0.5), ("hybrid", 0.5)}
  hybrid = by_key[("hybrid", 1.0)]
  assert hybrid["n"] == 2 and hybrid["seeds"] == "0 1"
  seeds = [r["recall@10"] for r in trained if r["model"] == "hybrid" and r["train_fraction"] == 1.0]
  assert hybrid["recall@10_mean"] == pytest.approx(sum(seeds) / 2, abs=1e-5)
  assert hybrid["recall@10_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2), abs=1e-5)
  assert by_key[("text", 1.0)]["n"] == 1 and math.isnan(by_key[("text", 1.0)]["recall@10_std"])

  table = (out / "results.md").read_text()
  assert "| hybrid text + ids | 1 | 2 | " + f"{hybrid['recall@10_mean']:.4f} ± {hybrid['recall@10_std']:.4f}" in table
  assert "| popularity | 0.5 | 1 | " in table
  assert (out / "commands.sh").read_text().count("jaxrec train --config configs/tiny.py") == 7


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
  assert len(stamps) == 7
  assert study.main(argv) == 0
  assert {p: os.path.getmtime(p) for p in out.rglob("metrics.json")} == stamps


@pytest.mark.slow
def test_a_cell_whose_config_changed_is_refused(tiny_study):
  out, argv = tiny_study
  with pytest.raises(study.StudyError, match="holds a run of a different config"):
    study.main(argv + ["model.temperature=0.2"])


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
  paths = sorted(out.rglob("metrics.json"))
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
