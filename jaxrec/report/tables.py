"""The study's tables: per-run rows aggregated over seeds, written as CSV and Markdown.

A row is a dict with ``dataset``, ``split``, ``model``, ``train_fraction`` and ``seed`` and one
value per metric name (``metric_names()``); ``aggregate`` turns rows into one row per (dataset,
split, model, fraction) with ``<name>_mean`` and ``<name>_std`` over the seeds.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

import numpy as np

from jaxrec.files import write_atomically

POPULARITY = "popularity"  # the untrained baseline every run reports; listed first in tables and plots
GROUPS = ("", "warm/", "cold/")
METRICS = ("recall", "ndcg", "mrr", "hit")
KS = (10, 50)


def metric_names() -> list[str]:
  names = [f"{g}{m}@{k}" for g in GROUPS for m in METRICS for k in KS]
  return names + [f"coverage@{k}" for k in KS]


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


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  if not rows:
    return
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
  write_atomically(path, buffer.getvalue())


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
