"""Charts of finished runs, drawn with matplotlib: the study's Recall@10 bars and data-efficiency
lines, and data stats' item popularity.

Each chart is a function returning a ``matplotlib.figure.Figure`` (so tests can read its axes)
built on the Agg canvas directly, never through pyplot: no global figure registry, no backend
switch, no rcParams changes in the process that imports jaxrec. ``save_png`` writes one atomically.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from jaxrec.files import write_atomically
from jaxrec.report.tables import GROUPS, POPULARITY

DPI = 100
BASELINE_COLOR = "0.55"  # popularity: grey, so the trained models stand out
# matplotlib's default cycle without its grey (C7), which the baseline uses.
MODEL_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")
WARM_COLOR, COLD_COLOR = "C0", "C1"
GROUP_NAMES = {"": "all test items", "warm/": "warm items (seen in training)", "cold/": "cold items (unseen)"}


def new_figure(width_in: float, height_in: float) -> Figure:
  """A figure on its own Agg canvas; constrained layout keeps labels and an outside legend inside it."""
  fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def png_bytes(fig: Figure) -> bytes:
  """The figure as a PNG of exactly figsize x dpi pixels."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor="white")
  return buffer.getvalue()


def save_png(fig: Figure, path: str) -> None:
  write_atomically(path, png_bytes(fig))


def model_colors(order: Sequence[str]) -> dict[str, str]:
  """One colour per model, the same in every chart of a study; the popularity baseline is grey."""
  trained = [m for m in order if m != POPULARITY]
  colors = {m: MODEL_COLORS[i % len(MODEL_COLORS)] for i, m in enumerate(trained)}
  colors[POPULARITY] = BASELINE_COLOR
  return colors


def recall_bars(models: Sequence[str], groups: Sequence[str], values_MxG: np.ndarray, errors_MxG: np.ndarray,
                title: str, labels: dict[str, str] | None = None, colors: dict[str, str] | None = None) -> Figure:
  """Grouped bars: ``values_MxG[model, group]``, one colour per model, error bars of
  ``errors_MxG`` (the standard deviation over seeds; NaN, e.g. one seed, draws none)."""
  labels, colors = labels or {}, colors or model_colors(models)
  fig = new_figure(10, 4.8)
  ax = fig.add_subplot()
  width = 0.8 / max(len(models), 1)
  x_G = np.arange(len(groups))
  for m, model in enumerate(models):
    shown = np.isfinite(values_MxG[m])
    errors = errors_MxG[m][shown]
    ax.bar(x_G[shown] - 0.4 + width * (m + 0.5), values_MxG[m][shown], width * 0.92,
           yerr=errors if np.isfinite(errors).any() else None, capsize=3, error_kw={"elinewidth": 1},
           color=colors.get(model), label=labels.get(model, model))
  ax.set_xticks(x_G, list(groups))
  ax.set_xlabel("test items the ground truth is restricted to")
  ax.set_ylabel("Recall@10")
  ax.set_ylim(bottom=0)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.4)
  ax.set_axisbelow(True)
  if len(models) > 1:
    fig.legend(loc="outside right upper", frameon=False)
  return fig


def efficiency_lines(models: Sequence[str], fractions: Sequence[float],
                     panels: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str,
                     labels: dict[str, str] | None = None, colors: dict[str, str] | None = None) -> Figure:
  """Side-by-side panels ``(title, values_MxF, errors_MxF)``: Recall@10 of each model against the
  training fraction, with error bars where several seeds ran."""
  labels, colors = labels or {}, colors or model_colors(models)
  fig = new_figure(5 * max(len(panels), 1) + 2, 4.5)
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
  fractions = np.asarray(fractions, np.float64)
  for ax, (panel_title, values_MxF, errors_MxF) in zip(axes, panels):
    for m, model in enumerate(models):
      shown = np.isfinite(values_MxF[m])
      if not shown.any():
        continue
      errors = errors_MxF[m][shown]
      ax.errorbar(fractions[shown], values_MxF[m][shown], yerr=errors if np.isfinite(errors).any() else None,
                  marker="o", capsize=3, color=colors.get(model), label=labels.get(model, model))
    # Fractions from 0.01 to 1 crowd into the left edge of a linear axis.
    if len(fractions) and fractions.min() > 0 and fractions.max() / fractions.min() >= 10:
      ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("training fraction (share of training interactions kept)")
    ax.set_ylabel("Recall@10")
    ax.set_ylim(bottom=0)
    ax.set_title(panel_title)
    ax.grid(alpha=0.4)
  fig.suptitle(title)
  if len(models) > 1:
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", frameon=False)
  return fig


def study_figures(results: Sequence[dict[str, Any]], order: Sequence[str],
                  labels: dict[str, str] | None = None) -> dict[str, Figure]:
  """``{file name: figure}`` from aggregated results rows (``tables.aggregate``): per (dataset,
  split), ``recall_<dataset>_<split>.png`` at the largest training fraction and, when several
  fractions ran, ``efficiency_<dataset>_<split>.png``. ``order`` lists the models as the tables do."""
  figures = {}
  colors = model_colors(order)
  for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in results):
    part = [r for r in results if r["dataset"] == dataset and r["split"] == split]
    models = [m for m in order if any(r["model"] == m for r in part)]
    largest = max(r["train_fraction"] for r in part)
    full = {r["model"]: r for r in part if r["train_fraction"] == largest}
    groups = [g for g in GROUPS if any(math.isfinite(r[f"{g}recall@10_mean"]) for r in full.values())]
    values = np.array([[full.get(m, {}).get(f"{g}recall@10_mean", np.nan) for g in groups] for m in models])
    errors = np.array([[full.get(m, {}).get(f"{g}recall@10_std", np.nan) for g in groups] for m in models])
    figures[f"recall_{dataset}_{split}.png"] = recall_bars(
        models, [GROUP_NAMES[g] for g in groups], values, errors,
        f"Recall@10, {dataset} / {split}, training fraction {largest:g} (mean ± std over seeds)", labels, colors)
    fractions = sorted({r["train_fraction"] for r in part})
    if len(fractions) > 1:
      swept = [m for m in models if sum(r["model"] == m for r in part) > 1]
      by_key = {(r["model"], r["train_fraction"]): r for r in part}
      panels = []
      for g in ("", "cold/"):
        values = np.array([[by_key.get((m, f), {}).get(f"{g}recall@10_mean", np.nan) for f in fractions]
                           for m in swept])
        errors = np.array([[by_key.get((m, f), {}).get(f"{g}recall@10_std", np.nan) for f in fractions]
                           for m in swept])
        if np.isfinite(values).any():
          panels.append((GROUP_NAMES[g], values, errors))
      figures[f"efficiency_{dataset}_{split}.png"] = efficiency_lines(
          swept, fractions, panels, f"Recall@10 against training data, {dataset} / {split}", labels, colors)
  return figures


def item_popularity(counts_N: np.ndarray, cold_N: np.ndarray) -> Figure:
  """Interactions per item against the item's popularity rank, both on log scales (counts span
  decades, and a long tail is a straight-ish line there); cold items are marked where they rank.
  Items without interactions have no place on a log axis: the title counts them."""
  counts_N = np.asarray(counts_N)
  order = np.argsort(-counts_N, kind="stable")
  ranked, cold = counts_N[order], np.asarray(cold_N, bool)[order]
  rank = np.arange(1, len(ranked) + 1)
  shown = ranked > 0
  fig = new_figure(8, 4.8)
  ax = fig.add_subplot()
  ax.plot(rank[shown], ranked[shown], color=WARM_COLOR, linewidth=1.5, label=f"all items ({len(ranked):,})")
  marked = shown & cold
  if cold.any():
    ax.scatter(rank[marked], ranked[marked], s=14, color=COLD_COLOR, zorder=3,
               label=f"cold items ({int(cold.sum()):,}, held out of training)")
  if shown.any():
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # 20, 300 rather than 2x10^1, 3x10^2
      axis.set_major_formatter(LogFormatter())
      axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
  ax.set_xlabel("item popularity rank (1 = most interactions)")
  ax.set_ylabel("interactions per item")
  missing = int((~shown).sum())
  ax.set_title(f"Item popularity: {int(ranked.sum()):,} interactions over {len(ranked):,} items"
               + (f"\nitems without interactions (not on the log axes): {missing:,}" if missing else ""))
  ax.grid(which="major", alpha=0.4)
  if cold.any():
    ax.legend(loc="lower left", frameon=False)  # a falling curve leaves that corner empty
  return fig
