"""The paradigm study: one command trains and evaluates a grid of experiments and tabulates them.

A study file (``configs/study/*.py``) defines ``get_study() -> Study``: named models, datasets and
splits, each a set of ``key=value`` overrides of an ordinary config file, crossed with training
fractions and seeds in one or more ``Grid`` blocks (several blocks let the headline cells take
more seeds than the data-efficiency sweep). Every cell is an ordinary ``jaxrec.train(cfg)`` run in
its own workdir under the study's output directory, so any cell can be rerun alone with the
``jaxrec train`` command the runner writes to ``commands.sh``. A cell whose ``metrics.json``
exists is read instead of retrained, so an interrupted study resumes where it stopped.

Outputs under the study directory: ``cells.csv`` (one row per run), ``results.csv`` and
``results.md`` (mean and sample standard deviation over seeds), ``commands.sh``, and PNG plots:
``recall_<dataset>_<split>.png`` (Recall@10 overall/warm/cold per model) and
``efficiency_<dataset>_<split>.png`` (Recall@10 against the training fraction, overall and cold).
The popularity baseline is not trained: its row is read from the ``popularity/`` keys that every
run reports for the same split.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import io
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np

from jaxrec.config import Config, ConfigError, call_python_file, load_config, shipped_config_path, to_json
from jaxrec.data.plot import GLYPHS, png_bytes, write_atomic

log = logging.getLogger("jaxrec.study")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POPULARITY = "popularity"
GROUPS = ("", "warm/", "cold/")
METRICS = ("recall", "ndcg", "mrr", "hit")
KS = (10, 50)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model of the study: config overrides that select its towers and encoder mode."""

  name: str
  overrides: tuple[str, ...] = ()
  label: str = ""  # longer name for tables and plots


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset: a config file (relative to the repository root) plus overrides."""

  name: str
  config: str
  overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """A protocol on a dataset, e.g. ``cold`` = ``data.cold_item_fraction=0.2``."""

  name: str
  overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Grid:
  """The cartesian product of its axes; ``overrides`` apply to its cells only."""

  models: tuple[Model, ...]
  datasets: tuple[DatasetSpec, ...]
  splits: tuple[SplitSpec, ...]
  train_fractions: tuple[float, ...] = (1.0,)
  seeds: tuple[int, ...] = (0,)
  overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  grids: tuple[Grid, ...]
  overrides: tuple[str, ...] = ()  # every cell, before the dataset's, split's, grid's and model's
  out: str = ""  # default output directory; "" = runs/study/<name>
  # Per-dataset model overrides, {(dataset, model): (...)}, applied after the model's own: a
  # model's best learning rate or temperature differs between a 1,000- and a 1,000,000-row dataset.
  tuned: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


@dataclasses.dataclass(frozen=True)
class Cell:
  dataset: DatasetSpec
  split: SplitSpec
  model: Model
  train_fraction: float
  seed: int
  overrides: tuple[str, ...]  # everything after the dataset's config file, in order

  @property
  def key(self) -> tuple:
    return (self.dataset.name, self.split.name, self.model.name, self.train_fraction, self.seed)

  @property
  def id(self) -> str:
    return f"{self.dataset.name}/{self.split.name}/{self.model.name}/f{self.train_fraction:g}/s{self.seed}"


class StudyError(ValueError):
  """The study file is wrong, or a cell's saved run does not match the study."""


# ---------------------------------------------------------------------------------------- planning


def load_study(path: str) -> Study:
  study = call_python_file(path, "get_study", "study", StudyError)
  if not isinstance(study, Study):
    raise StudyError(f"study file {path}: get_study() returned {type(study).__name__}, expected jaxrec.study.Study")
  return study


def plan(study: Study, out: str, extra: Sequence[str] = ()) -> list[Cell]:
  """Every distinct cell in grid order; the same cell in two grids must resolve identically."""
  tuned = {(d, m): tuple(o) for d, m, o in study.tuned}
  cells: dict[tuple, Cell] = {}
  for grid in study.grids:
    for dataset in grid.datasets:
      for split in grid.splits:
        for fraction in grid.train_fractions:
          for model in grid.models:
            if model.name == POPULARITY:
              raise StudyError("'popularity' is reported from every run's popularity/ keys; do not list it as a model")
            for seed in grid.seeds:
              cell = Cell(dataset, split, model, float(fraction), int(seed), ())
              workdir = os.path.join(out, *cell.id.split("/"))
              # A grid's overrides are its cells' own (e.g. the steps of a training fraction), so
              # they win over the dataset's and split's defaults; the model's come last.
              overrides = (*study.overrides, *dataset.overrides, *split.overrides, *grid.overrides, *model.overrides,
                           *tuned.get((dataset.name, model.name), ()), f"data.train_fraction={fraction:g}",
                           f"train.seed={seed}", *extra, f"workdir={workdir}")
              cell = dataclasses.replace(cell, overrides=overrides)
              if cell.key in cells and cells[cell.key].overrides != overrides:
                raise StudyError(f"cell {cell.id} appears in two grids with different overrides")
              cells.setdefault(cell.key, cell)
  return list(cells.values())


def cell_config(cell: Cell) -> Config:
  # A shipped config (the checkout's configs/, or the installed package's) before other files
  # relative to the repository root.
  path = shipped_config_path(cell.dataset.config) or os.path.join(REPO, cell.dataset.config)
  return load_config(path, cell.overrides)


def command(cell: Cell) -> str:
  """The ``jaxrec train`` command that reproduces this cell alone (workdir last, as the study sets
  it; relative to the current directory when below it, so the command is portable)."""
  parts = []
  for item in cell.overrides:
    if item.startswith("workdir=") and not os.path.relpath(item[8:]).startswith(".."):
      item = "workdir=" + os.path.relpath(item[8:])
    parts.append(shlex.quote(item))
  return " ".join(["jaxrec train --config", shlex.quote(cell.dataset.config), *parts])


# ---------------------------------------------------------------------------------------- running


_NOT_COMPARED = ("workdir", "train.progress", "train.log_every", "train.profile")


def _flat(config: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _config_changes(saved: dict, cfg: Config) -> list[str]:
  """Keys whose value differs between a cell's saved config and the study's. A field added to
  Config since the run counts only when set away from its default; a removed field not at all."""
  now, then = _flat(json.loads(to_json(cfg))), _flat(saved)
  default = _flat(json.loads(to_json(Config())))
  return sorted(k for k, v in now.items()
                if k not in _NOT_COMPARED and then.get(k, default.get(k)) != v)


def _check_saved_config(cell: Cell, cfg: Config, workdir: str) -> None:
  """Refuses a workdir whose finished run was trained with a different config than the cell's."""
  saved_path = os.path.join(workdir, "config.json")
  if os.path.isfile(saved_path):
    with open(saved_path) as f:
      changed = _config_changes(json.load(f), cfg)
    if changed:
      raise StudyError(f"cell {cell.id}: {workdir} holds a run of a different config ({', '.join(changed[:3])}); "
                       "use another --out or delete that directory")


def run_cell(cell: Cell) -> tuple[dict[str, Any], bool]:
  """Trains and evaluates one cell, or reads its finished run. Returns (metrics, trained_now)."""
  cfg = cell_config(cell)
  workdir = os.path.abspath(cfg.workdir)
  metrics_path = os.path.join(workdir, "metrics.json")
  if os.path.isfile(metrics_path):
    _check_saved_config(cell, cfg, workdir)
    with open(metrics_path) as f:
      return json.load(f), False
  from jaxrec.trainer import train
  start = time.perf_counter()
  result = train(cfg)
  with open(os.path.join(workdir, "study_cell.json"), "w") as f:
    json.dump({"cell": cell.id, "seconds": time.perf_counter() - start, "command": command(cell)}, f, indent=1)
  return result, True


def reevaluate_cell(cell: Cell) -> dict[str, Any]:
  """Evaluates a finished cell's final checkpoint again with the current evaluation code and
  rewrites its metrics.json (training statistics kept) and exported index, without retraining.
  For changes to the evaluation protocol: the trained parameters are the same as a rerun's would
  be up to the float summation order of the training code that produced them."""
  from jaxrec.trainer import Trainer
  cfg = cell_config(cell)
  workdir = os.path.abspath(cfg.workdir)
  metrics_path = os.path.join(workdir, "metrics.json")
  if not os.path.isfile(metrics_path):
    raise StudyError(f"cell {cell.id}: nothing to re-evaluate, {metrics_path} does not exist")
  with open(metrics_path) as f:
    saved = json.load(f)
  _check_saved_config(cell, cfg, workdir)
  trainer = Trainer(cfg)
  step, state = trainer.restore(cfg.train.steps)
  fresh = trainer.evaluate(state)
  result = dict(saved, **fresh)
  result["reevaluated_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  trainer.build_index(state, step).save(os.path.join(workdir, "index"))
  # Atomic: the old metrics survive a failure mid-write.
  write_atomic(metrics_path, json.dumps(result, indent=1, sort_keys=True, default=float).encode())
  return result


def _seconds(cell_dir: str) -> float:
  path = os.path.join(cell_dir, "study_cell.json")
  if not os.path.isfile(path):
    return float("nan")
  with open(path) as f:
    return float(json.load(f)["seconds"])


# ---------------------------------------------------------------------------------------- tables


def metric_names() -> list[str]:
  names = [f"{g}{m}@{k}" for g in GROUPS for m in METRICS for k in KS]
  return names + [f"coverage@{k}" for k in KS]


def cell_rows(cells: Sequence[Cell], results: dict[tuple, dict]) -> list[dict[str, Any]]:
  """One row per trained run, plus one popularity row per (dataset, split, fraction, seed)."""
  rows, seen_popularity = [], set()
  for cell in cells:
    if cell.key not in results:
      continue
    result = results[cell.key]
    base = {"dataset": cell.dataset.name, "split": cell.split.name, "train_fraction": cell.train_fraction,
            "seed": cell.seed}
    workdir = os.path.abspath(cell_config(cell).workdir)
    row = dict(base, model=cell.model.name, seconds=_seconds(workdir), steps=result.get("steps"),
               examples_per_sec=result.get("train/examples_per_sec"))
    row.update({name: result.get(name, float("nan")) for name in metric_names()})
    rows.append(row)
    pop_key = (cell.dataset.name, cell.split.name, cell.train_fraction, cell.seed)
    if pop_key not in seen_popularity:
      seen_popularity.add(pop_key)
      pop = dict(base, model=POPULARITY, seconds=float("nan"), steps=0, examples_per_sec=float("nan"))
      pop.update({name: result.get(f"{POPULARITY}/{name}", float("nan")) for name in metric_names()})
      rows.append(pop)
  return rows


def aggregate(rows: Sequence[dict[str, Any]], model_order: Sequence[str]) -> list[dict[str, Any]]:
  """Mean and sample standard deviation over seeds of every (dataset, split, model, fraction)."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["dataset"], row["split"], row["model"], row["train_fraction"]), []).append(row)
  rank = {name: i for i, name in enumerate([POPULARITY, *model_order])}
  out = []
  for (dataset, split, model, fraction), members in groups.items():
    agg = {"dataset": dataset, "split": split, "model": model, "train_fraction": fraction, "n": len(members),
           "seeds": " ".join(str(m["seed"]) for m in sorted(members, key=lambda m: m["seed"]))}
    for name in ["seconds", *metric_names()]:
      values = np.array([m[name] for m in members], np.float64)
      values = values[np.isfinite(values)]
      agg[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
      agg[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    out.append(agg)
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  splits = list(dict.fromkeys(r["split"] for r in rows))
  out.sort(key=lambda r: (datasets.index(r["dataset"]), splits.index(r["split"]), -r["train_fraction"],
                          rank.get(r["model"], len(rank))))
  return out


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  if not rows:
    return
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
  write_atomic(path, buffer.getvalue().encode())


def read_csv(path: str) -> list[dict[str, Any]]:
  """Rows of a results/cells CSV with numbers parsed back (``nan`` for an empty standard deviation)."""
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for key, value in row.items():
      if key in ("dataset", "split", "model", "seeds"):
        continue
      try:
        row[key] = float(value)
      except ValueError:
        pass
  return rows


def _pm(row: dict, name: str, digits: int = 4) -> str:
  mean, std = row[f"{name}_mean"], row[f"{name}_std"]
  if not math.isfinite(mean):
    return "–"
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


MAIN_COLUMNS = (("R@10", "recall@10"), ("N@10", "ndcg@10"), ("MRR@10", "mrr@10"), ("Hit@10", "hit@10"),
                ("R@50", "recall@50"), ("N@50", "ndcg@50"), ("warm R@10", "warm/recall@10"),
                ("cold R@10", "cold/recall@10"), ("cold N@10", "cold/ndcg@10"), ("cov@10", "coverage@10"))


def markdown(results: Sequence[dict[str, Any]], labels: dict[str, str], title: str = "") -> str:
  """Tables generated from ``results.csv`` rows: per (dataset, split), the models at each fraction."""
  lines = [f"# {title}", ""] if title else []
  sections = list(dict.fromkeys((r["dataset"], r["split"]) for r in results))
  for dataset, split in sections:
    part = [r for r in results if r["dataset"] == dataset and r["split"] == split]
    lines += [f"### {dataset}, split `{split}`", ""]
    has_cold = any(math.isfinite(r["cold/recall@10_mean"]) for r in part)
    columns = [c for c in MAIN_COLUMNS if has_cold or not c[1].startswith(("warm/", "cold/"))]
    lines.append("| model | train frac | seeds | " + " | ".join(c[0] for c in columns) + " | s/run |")
    lines.append("|---|---:|---:|" + "---:|" * len(columns) + "---:|")
    for r in part:
      seconds = f"{r['seconds_mean']:.0f}" if math.isfinite(r["seconds_mean"]) else "–"
      cells = " | ".join(_pm(r, c[1]) for c in columns)
      lines.append(f"| {labels.get(r['model'], r['model'])} | {r['train_fraction']:g} | {int(r['n'])} | {cells} | {seconds} |")
    lines.append("")
  lines.append("Mean ± sample standard deviation over the seeds listed (one seed: no ±). R = Recall, N = NDCG, "
               "cov = share of the catalog in anyone's top 10. Warm/cold restrict the ground truth to items "
               "seen/unseen in training.")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plots

_INK, _GRID, _WHITE = (40, 40, 40), (225, 225, 225), (255, 255, 255)
PALETTE = ((120, 120, 120), (49, 104, 176), (230, 120, 30), (60, 160, 80), (200, 50, 60), (140, 90, 180),
           (150, 110, 60))


def _text(img: np.ndarray, x: int, y: int, text: str, color=_INK, scale: int = 2) -> None:
  for i, ch in enumerate(text.upper()):
    rows = GLYPHS.get(ch, ("   ",) * 5)
    glyph = np.kron(np.array([[c == "#" for c in row] for row in rows]), np.ones((scale, scale), bool))
    x0 = x + i * 4 * scale
    h, w = glyph.shape
    if 0 <= y and y + h <= img.shape[0] and 0 <= x0 and x0 + w <= img.shape[1]:
      img[y:y + h, x0:x0 + w][glyph] = color


def _line(img: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], color, width: int = 3) -> None:
  n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
  xs = np.round(np.linspace(p0[0], p1[0], n)).astype(int)
  ys = np.round(np.linspace(p0[1], p1[1], n)).astype(int)
  r = width // 2
  for dx in range(-r, r + 1):
    for dy in range(-r, r + 1):
      img[np.clip(ys + dy, 0, img.shape[0] - 1), np.clip(xs + dx, 0, img.shape[1] - 1)] = color


def _box(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
  img[max(min(y0, y1), 0):max(y0, y1), max(min(x0, x1), 0):max(x0, x1)] = color


def _nice_top(value: float) -> float:
  if not math.isfinite(value) or value <= 0:
    return 1.0
  step = 10 ** math.floor(math.log10(value))
  for m in (1, 2, 2.5, 5, 10):
    if m * step >= value:
      return m * step
  return 10 * step


class _Panel:
  """A plot area with a y axis from 0 to ``top`` and gridlines at quarters."""

  def __init__(self, img, left, top, width, height, y_top, title):
    self.img, self.left, self.top, self.width, self.height, self.y_top = img, left, top, width, height, y_top
    for q in range(5):
      y = self.y(q / 4 * y_top)
      img[y, left:left + width] = _GRID
      _text(img, max(0, left - 52), y - 5, f"{q / 4 * y_top:.3f}"[:5], scale=2)
    img[top:top + height + 1, left] = _INK
    img[top + height, left:left + width] = _INK
    _text(img, left, max(0, top - 22), title, scale=2)

  def y(self, value: float) -> int:
    value = min(max(value, 0.0), self.y_top)
    return int(round(self.top + self.height - value / self.y_top * self.height))


def _legend(img, x, y, names, colors) -> None:
  for i, (name, color) in enumerate(zip(names, colors)):
    _box(img, x, y + i * 18, x + 14, y + i * 18 + 10, color)
    _text(img, x + 20, y + i * 18, name, scale=2)


def bar_image(models: Sequence[str], groups: Sequence[str], values: np.ndarray, errors: np.ndarray, title: str,
              colors: Sequence[tuple] | None = None, width: int = 900, height: int = 420) -> np.ndarray:
  """uint8 RGB: ``values[model, group]`` as grouped bars (one colour per model), error ticks = std."""
  img = np.full((height, width, 3), 255, np.uint8)
  colors = colors or [PALETTE[m % len(PALETTE)] for m in range(len(models))]
  legend_w = 190
  panel = _Panel(img, 70, 50, width - 70 - legend_w - 20, height - 50 - 50,
                 _nice_top(float(np.nanmax(values + np.nan_to_num(errors), initial=0.0)) * 1.05), title)
  n_groups, n_models = len(groups), len(models)
  slot = panel.width / max(n_groups, 1)
  bar = max(2, int(slot * 0.8 / max(n_models, 1)))
  for g, group in enumerate(groups):
    x_start = int(panel.left + g * slot + slot * 0.1)
    for m in range(n_models):
      v = values[m, g]
      if not math.isfinite(v):
        continue
      x0 = x_start + m * bar
      _box(img, x0, panel.y(v), x0 + bar - 2, panel.y(0), colors[m])
      e = errors[m, g]
      if math.isfinite(e) and e > 0:
        cx = x0 + (bar - 2) // 2
        img[panel.y(v + e):panel.y(v - e) + 1, cx] = _INK
    _text(img, int(panel.left + g * slot + slot / 2 - 4 * len(group)), panel.top + panel.height + 12, group)
  _legend(img, width - legend_w, 60, models, colors)
  return img


def lines_image(models: Sequence[str], xs: Sequence[float], panels: Sequence[tuple[str, np.ndarray]],
                colors: Sequence[tuple] | None = None, width: int = 1000, height: int = 420) -> np.ndarray:
  """uint8 RGB: side-by-side panels; in each, ``values[model, x]`` as a line per model over
  categorical x positions (the training fractions, evenly spaced)."""
  img = np.full((height, width, 3), 255, np.uint8)
  colors = colors or [PALETTE[m % len(PALETTE)] for m in range(len(models))]
  legend_w = 190
  pw = (width - legend_w - 40) // max(len(panels), 1)
  for p, (title, values) in enumerate(panels):
    top_value = _nice_top(float(np.nanmax(np.where(np.isfinite(values), values, 0.0), initial=0.0)) * 1.05)
    panel = _Panel(img, 70 + p * pw, 50, pw - 90, height - 50 - 50, top_value, title)
    positions = [panel.left + int((i + 0.5) * panel.width / len(xs)) for i in range(len(xs))]
    for i, x in enumerate(xs):
      img[panel.top + panel.height:panel.top + panel.height + 5, positions[i]] = _INK
      label = f"{x:g}"
      _text(img, positions[i] - 4 * len(label), panel.top + panel.height + 12, label)
    for m in range(len(models)):
      color = colors[m]
      points = [(positions[i], panel.y(values[m, i])) for i in range(len(xs)) if math.isfinite(values[m, i])]
      for a, b in zip(points[:-1], points[1:]):
        _line(img, a, b, color)
      for x, y in points:
        _box(img, x - 4, y - 4, x + 5, y + 5, color)
  _text(img, 70, height - 20, "TRAINING FRACTION", scale=2)
  _legend(img, width - legend_w, 60, models, colors)
  return img


def write_plots(results: Sequence[dict[str, Any]], out: str, model_order: Sequence[str]) -> list[str]:
  """Per (dataset, split): the Recall@10 bars at the full training set, and the efficiency lines."""
  written = []
  order = [POPULARITY, *model_order]
  color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(order)}  # one colour per model in every plot
  for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in results):
    part = [r for r in results if r["dataset"] == dataset and r["split"] == split]
    models = [m for m in order if any(r["model"] == m for r in part)]
    full = {r["model"]: r for r in part if r["train_fraction"] == max(x["train_fraction"] for x in part)}
    groups = [g for g in GROUPS if any(math.isfinite(r[f"{g}recall@10_mean"]) for r in full.values())]
    values = np.array([[full[m][f"{g}recall@10_mean"] if m in full else np.nan for g in groups] for m in models])
    errors = np.array([[full[m][f"{g}recall@10_std"] if m in full else np.nan for g in groups] for m in models])
    names = [g[:-1] if g else "overall" for g in groups]
    path = os.path.join(out, f"recall_{dataset}_{split}.png")
    write_atomic(path, png_bytes(bar_image(models, names, values, errors, f"RECALL@10 {dataset} {split}",
                                           [color[m] for m in models])))
    written.append(path)
    fractions = sorted({r["train_fraction"] for r in part})
    if len(fractions) > 1:
      swept = [m for m in models if sum(r["model"] == m for r in part) > 1]
      panels = []
      for g in ("", "cold/"):
        grid = np.array([[next((r[f"{g}recall@10_mean"] for r in part if r["model"] == m and r["train_fraction"] == f),
                               np.nan) for f in fractions] for m in swept])
        if np.isfinite(grid).any():
          panels.append((f"RECALL@10 {'OVERALL' if not g else 'COLD'} {dataset} {split}", grid))
      path = os.path.join(out, f"efficiency_{dataset}_{split}.png")
      write_atomic(path, png_bytes(lines_image(swept, fractions, panels, [color[m] for m in swept])))
      written.append(path)
  return written


# ---------------------------------------------------------------------------------------- main


def write_outputs(study: Study, cells: Sequence[Cell], results: dict[tuple, dict], out: str) -> dict[str, Any]:
  model_order = list(dict.fromkeys(c.model.name for c in cells))
  labels = {c.model.name: c.model.label or c.model.name for c in cells}
  rows = cell_rows(cells, results)
  table = aggregate(rows, model_order)
  _write_csv(os.path.join(out, "cells.csv"), rows)
  _write_csv(os.path.join(out, "results.csv"), table)
  write_atomic(os.path.join(out, "results.md"), markdown(table, labels, f"Study `{study.name}`").encode())
  plots = write_plots(table, out, model_order) if table else []
  return {"rows": rows, "results": table, "plots": plots}


def write_commands(cells: Sequence[Cell], out: str) -> None:
  lines = ["#!/usr/bin/env bash", "# One `jaxrec train` per study cell (the runner calls jaxrec.train with the same config).",
           "set -euo pipefail"]
  lines += [f"# {cell.id}\n{command(cell)}" for cell in cells]
  write_atomic(os.path.join(out, "commands.sh"), ("\n".join(lines) + "\n").encode())


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The runner's flags, shared by ``python -m jaxrec.study`` and ``jaxrec study``."""
  parser.add_argument("--config", required=True, help="study file defining get_study()")
  parser.add_argument("--out", help="output directory (default: the study's own)")
  parser.add_argument("--only", action="append", default=[],
                      help="run only cells whose id (dataset/split/model/fFRAC/sSEED) matches this glob; repeatable")
  parser.add_argument("--list", action="store_true", help="print the cells and their commands, train nothing")
  parser.add_argument("--report-only", action="store_true", help="rebuild tables and plots from finished cells")
  parser.add_argument("--reevaluate", action="store_true",
                      help="evaluate the selected finished cells' final checkpoints again with the current "
                           "evaluation code (training kept), then rebuild the tables")
  parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxrec study", description=__doc__.split("\n\n")[0])
  add_arguments(parser)
  return run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))


def run(args: argparse.Namespace) -> int:
  """The study of ``args`` (parsed with ``add_arguments``'s flags): trains, re-evaluates or reports."""
  study = load_study(args.config)
  out = os.path.abspath(args.out or study.out or os.path.join("runs", "study", study.name))
  cells = plan(study, out, args.overrides)
  for cell in cells:  # every config must parse before the first of possibly hours of training
    try:
      cell_config(cell)
    except ConfigError as e:
      raise StudyError(f"cell {cell.id}: {e}") from e
  selected = [c for c in cells if not args.only or any(fnmatch.fnmatch(c.id, p) for p in args.only)]
  os.makedirs(out, exist_ok=True)
  write_commands(cells, out)
  if args.list:
    for cell in selected:
      print(f"{cell.id}\n  {command(cell)}")
    return 0
  results, failed = {}, []
  for i, cell in enumerate(cells):
    done = os.path.isfile(os.path.join(os.path.abspath(cell_config(cell).workdir), "metrics.json"))
    if cell not in selected or args.report_only:
      if done:
        results[cell.key], _ = run_cell(cell)
      continue
    start = time.perf_counter()
    if args.reevaluate:
      if done:
        results[cell.key] = reevaluate_cell(cell)
        log.info("[%d/%d] %s re-evaluated in %.0f s: R@10 %.4f", i + 1, len(cells), cell.id,
                 time.perf_counter() - start, results[cell.key].get("recall@10", float("nan")))
      continue
    try:
      results[cell.key], trained = run_cell(cell)
    except StudyError:
      raise
    except Exception as e:  # one broken cell must not cost the rest of the grid
      from jaxrec.trainer import EXIT_PREEMPTED, TrainingStopped
      if isinstance(e, TrainingStopped) and e.exit_code == EXIT_PREEMPTED:
        raise  # SIGTERM/SIGINT stops the study; the cell saved a checkpoint and resumes on the next run
      log.error("cell %s failed: %s: %s", cell.id, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      failed.append(cell.id)
      continue
    r = results[cell.key]
    log.info("[%d/%d] %s %s in %.0f s: R@10 %.4f (warm %s, cold %s)", i + 1, len(cells), cell.id,
             "trained" if trained else "read", time.perf_counter() - start, r.get("recall@10", float("nan")),
             f"{r['warm/recall@10']:.4f}" if "warm/recall@10" in r else "-",
             f"{r['cold/recall@10']:.4f}" if "cold/recall@10" in r else "-")
    if trained:  # tables after every new cell, so a long study is readable while it runs
      write_outputs(study, cells, results, out)
  outputs = write_outputs(study, cells, results, out)
  print(f"study {study.name}: {len(results)}/{len(cells)} cells finished; wrote {out}/results.csv, results.md, "
        f"cells.csv, commands.sh and {len(outputs['plots'])} plots")
  if failed:
    print(f"study {study.name}: {len(failed)} cells failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  # Study files import jaxrec.study; run that module's main so its Study class is the one checked.
  from jaxrec import study as _study
  sys.exit(_study.main())
