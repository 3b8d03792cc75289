"""The paradigm study: one command trains and evaluates a grid of experiments and tabulates them.

A study file (``configs/study/*.py``) defines ``get_study() -> Study``: named models, datasets and
splits, each a set of ``key=value`` overrides of an ordinary config file, crossed with training
fractions and seeds in one or more ``Grid`` blocks (several blocks let the headline cells take
more seeds than the data-efficiency sweep). Every cell is an ordinary ``jaxrec.train(cfg)`` run in
its own workdir under the study's output directory, so any cell can be rerun alone with the
``jaxrec train`` command the runner writes to ``commands.sh``. A cell whose ``metrics.json``
exists is read instead of retrained, so an interrupted study resumes where it stopped.

Outputs under the study directory: ``cells.csv`` (one row per run), ``results.csv`` and
``results.md`` (mean and sample standard deviation over seeds), ``commands.sh``, and PNG plots
(tables and plots are drawn by ``jaxrec.report``):
``recall_<dataset>_<split>.png`` (Recall@10 overall/warm/cold per model) and
``efficiency_<dataset>_<split>.png`` (Recall@10 against the training fraction, overall and cold).
The popularity baseline is not trained: its row is read from the ``popularity/`` keys that every
run reports for the same split.

A model of a baseline kind (``Model("ease", kind="ease")``, ``kind="itemknn"``: ``jaxrec.baselines``)
is fitted in closed form instead of trained, its parameters picked on the validation split, and
scored by the same evaluator into the same metrics.json keys, so it is a row like any other. It is
deterministic: it runs once per dataset, split and fraction (seed 0, whatever the grid's seeds).
``baseline.*`` overrides are its options (``baseline.lams=100,1000``); trained cells ignore them.
Its command is ``python -m jaxrec.baselines --kind ...``. EASE's refit on train + valid is its own
row, ``<name>_trainvalid``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import os
import shlex
import sys
import time
from typing import Any, Sequence

from jaxrec.config import Config, ConfigError, call_python_file, load_config, shipped_config_path
from jaxrec.config_diff import ConfigDiff
from jaxrec.files import write_atomically, write_json_atomically
from jaxrec.report.tables import POPULARITY, aggregate, markdown, metric_names, write_csv

log = logging.getLogger("jaxrec.study")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "train"
BASELINE_KINDS = ("ease", "itemknn")  # jaxrec.baselines.KINDS (not imported here: every command imports this file)
BASELINE_PREFIX = "baseline."  # jaxrec.baselines.PREFIX
REFIT = "_trainvalid"  # the row of a baseline's refit/ keys (EASE fitted on train + valid)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model of the study: config overrides that select its towers and encoder mode."""

  name: str
  overrides: tuple[str, ...] = ()
  label: str = ""  # longer name for tables and plots
  # "train": jaxrec.train(cfg); a jaxrec.baselines kind ("ease", "itemknn"): fitted in closed form
  kind: str = TRAIN

  @property
  def is_baseline(self) -> bool:
    return self.kind != TRAIN


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
            if model.kind not in (TRAIN, *BASELINE_KINDS):
              raise StudyError(f"model {model.name!r}: unknown kind {model.kind!r}; kinds: "
                               f"{', '.join((TRAIN, *BASELINE_KINDS))}")
            # A baseline is deterministic: one cell, whatever seeds the grid's trained models take.
            for seed in (0,) if model.is_baseline else grid.seeds:
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


def _config_overrides(cell: Cell) -> tuple[str, ...]:
  return tuple(o for o in cell.overrides if not o.startswith(BASELINE_PREFIX))


def cell_config(cell: Cell) -> Config:
  # A shipped config (the checkout's configs/, or the installed package's) before other files
  # relative to the repository root.
  path = shipped_config_path(cell.dataset.config) or os.path.join(REPO, cell.dataset.config)
  return load_config(path, _config_overrides(cell))


def baseline_options(cell: Cell):
  """A baseline cell's ``jaxrec.baselines.Options`` from its ``baseline.*`` overrides."""
  from jaxrec import baselines
  try:
    return baselines.parse_options([o for o in cell.overrides if o.startswith(BASELINE_PREFIX)])
  except baselines.BaselineError as e:
    raise StudyError(f"cell {cell.id}: {e}") from e


def command(cell: Cell) -> str:
  """The command that reproduces this cell alone, ``jaxrec train`` or ``python -m jaxrec.baselines``
  (workdir last, as the study sets it; relative to the current directory when below it, so the
  command is portable)."""
  parts = []
  for item in cell.overrides if cell.model.is_baseline else _config_overrides(cell):
    if item.startswith("workdir=") and not os.path.relpath(item[8:]).startswith(".."):
      item = "workdir=" + os.path.relpath(item[8:])
    parts.append(shlex.quote(item))
  head = (f"python -m jaxrec.baselines --kind {cell.model.kind} --config" if cell.model.is_baseline
          else "jaxrec train --config")
  return " ".join([head, shlex.quote(cell.dataset.config), *parts])


# ---------------------------------------------------------------------------------------- running


_NOT_COMPARED = ("workdir", "train.progress", "train.log_every", "train.profile")


def _config_changes(saved: dict, cfg: Config) -> list[str]:
  """Keys whose value differs between a cell's saved config and the study's."""
  return sorted(k for k in ConfigDiff.between(saved, cfg).changes if k not in _NOT_COMPARED)


def _check_saved_config(cell: Cell, cfg: Config, workdir: str) -> None:
  """Refuses a workdir whose finished run was trained with a different config than the cell's (for
  a baseline: different data or evaluation keys, or different ``baseline.*`` options)."""
  saved_path = os.path.join(workdir, "config.json")
  if os.path.isfile(saved_path):
    with open(saved_path) as f:
      changed = _config_changes(json.load(f), cfg)
    if cell.model.is_baseline:  # nothing of model, train, encoder or mesh reaches a closed-form fit
      changed = [k for k in changed if k.startswith(("data.", "eval."))]
      from jaxrec import baselines
      metrics_path = os.path.join(workdir, "metrics.json")
      if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
          saved_options = json.load(f).get("baseline/options")
        if saved_options != baselines.options_string(baseline_options(cell)):
          changed.append("baseline options")
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
  start = time.perf_counter()
  if cell.model.is_baseline:
    from jaxrec import baselines
    result = baselines.run(cfg, cell.model.kind, baseline_options(cell))
  else:
    from jaxrec.trainer import train
    result = train(cfg)
  write_json_atomically(os.path.join(workdir, "study_cell.json"),
                        {"cell": cell.id, "seconds": time.perf_counter() - start, "command": command(cell)})
  return result, True


def reevaluate_cell(cell: Cell) -> dict[str, Any]:
  """Evaluates a finished cell's final checkpoint again with the current evaluation code and
  rewrites its metrics.json (training statistics kept) and exported index, without retraining.
  For changes to the evaluation protocol: the trained parameters are the same as a rerun's would
  be up to the float summation order of the training code that produced them."""
  cfg = cell_config(cell)
  workdir = os.path.abspath(cfg.workdir)
  metrics_path = os.path.join(workdir, "metrics.json")
  if not os.path.isfile(metrics_path):
    raise StudyError(f"cell {cell.id}: nothing to re-evaluate, {metrics_path} does not exist")
  with open(metrics_path) as f:
    saved = json.load(f)
  _check_saved_config(cell, cfg, workdir)
  if cell.model.is_baseline:  # no checkpoint: the closed-form fit is rerun (it is deterministic)
    from jaxrec import baselines
    result = baselines.evaluate(cfg, cell.model.kind, baseline_options(cell))
    result["reevaluated_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_json_atomically(metrics_path, result)
    return result
  from jaxrec.recommender import build
  rec = build(cfg, restore_only=True)
  step, params, tables = rec.restore(cfg.train.steps)
  fresh = rec.evaluate(params, tables)
  result = dict(saved, **fresh)
  result["reevaluated_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  rec.build_index(params, tables, step).save(os.path.join(workdir, "index"))
  # Atomic: the old metrics survive a failure mid-write.
  write_json_atomically(metrics_path, result)
  return result


def _seconds(cell_dir: str) -> float:
  path = os.path.join(cell_dir, "study_cell.json")
  if not os.path.isfile(path):
    return float("nan")
  with open(path) as f:
    return float(json.load(f)["seconds"])


# ---------------------------------------------------------------------------------------- collecting


def cell_rows(cells: Sequence[Cell], results: dict[tuple, dict]) -> list[dict[str, Any]]:
  """One row per trained run or baseline (and one for a baseline's ``refit/`` keys, model
  ``<name>_trainvalid``), plus one popularity row per (dataset, split, fraction, seed)."""
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
    if cell.model.is_baseline and "refit/recall@10" in result:
      refit = dict(row, model=cell.model.name + REFIT)
      refit.update({name: result.get(f"refit/{name}", float("nan")) for name in metric_names()})
      rows.append(refit)
    pop_key = (cell.dataset.name, cell.split.name, cell.train_fraction, cell.seed)
    if pop_key not in seen_popularity:
      seen_popularity.add(pop_key)
      pop = dict(base, model=POPULARITY, seconds=float("nan"), steps=0, examples_per_sec=float("nan"))
      pop.update({name: result.get(f"{POPULARITY}/{name}", float("nan")) for name in metric_names()})
      rows.append(pop)
  return rows


# ---------------------------------------------------------------------------------------- main


def write_outputs(study: Study, cells: Sequence[Cell], results: dict[tuple, dict], out: str) -> dict[str, Any]:
  # matplotlib loads here, not with the module: every `jaxrec` command imports this file for its flags.
  from jaxrec.report import plots
  rows = cell_rows(cells, results)
  labels = {c.model.name: c.model.label or c.model.name for c in cells}
  model_order = []
  for name in dict.fromkeys(c.model.name for c in cells):
    model_order.append(name)
    if any(r["model"] == name + REFIT for r in rows):  # a refit row right after its model's
      model_order.append(name + REFIT)
      labels[name + REFIT] = f"{labels[name]}, refit on train + valid"
  table = aggregate(rows, model_order)
  write_csv(os.path.join(out, "cells.csv"), rows)
  write_csv(os.path.join(out, "results.csv"), table)
  write_atomically(os.path.join(out, "results.md"), markdown(table, labels, f"Study `{study.name}`"))
  written = []
  for name, figure in plots.study_figures(table, [POPULARITY, *model_order], labels).items():
    written.append(os.path.join(out, name))
    plots.save_png(figure, written[-1])
  return {"rows": rows, "results": table, "plots": written}


def write_commands(cells: Sequence[Cell], out: str) -> None:
  lines = ["#!/usr/bin/env bash",
           "# One command per study cell: `jaxrec train` (the runner calls jaxrec.train with the same config) or, "
           "for a baseline, `python -m jaxrec.baselines`.",
           "set -euo pipefail"]
  lines += [f"# {cell.id}\n{command(cell)}" for cell in cells]
  write_atomically(os.path.join(out, "commands.sh"), "\n".join(lines) + "\n")


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
    if cell.model.is_baseline:
      baseline_options(cell)
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
    done_how = ("fitted" if cell.model.is_baseline else "trained") if trained else "read"
    log.info("[%d/%d] %s %s in %.0f s: R@10 %.4f (warm %s, cold %s)", i + 1, len(cells), cell.id,
             done_how, time.perf_counter() - start, r.get("recall@10", float("nan")),
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
