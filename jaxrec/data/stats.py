"""``jaxrec data-stats``: what a config's data looks like after filtering and splitting.

Prints counts, density, interactions per user and per item (quantiles) and warm/cold counts,
and writes ``stats.json`` and ``item_popularity.png`` to ``--out`` (default
``<workdir>/data_stats``). Files appear whole or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from jaxrec.config import load_config, override
from jaxrec.data import sources
from jaxrec.data.dataset import Dataset, Split
from jaxrec.files import write_json_atomically
from jaxrec.report import plots

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _quantiles(values: np.ndarray, prefix: str) -> dict:
  out = {f"{prefix}/mean": float(values.mean()) if len(values) else 0.0}
  for q in QUANTILES:
    out[f"{prefix}/p{int(q * 100)}"] = float(np.quantile(values, q)) if len(values) else 0.0
  return out


def compute(dataset: Dataset, split: Split) -> dict:
  """``sources.describe`` plus distributions and warm/cold counts; flat keys, JSON-ready."""
  stats = dict(sources.describe(dataset, split))
  per_user = np.bincount(dataset.users, minlength=dataset.num_users)
  per_item = np.bincount(dataset.items, minlength=dataset.num_items)
  train_items = np.bincount(dataset.items[split.train], minlength=dataset.num_items)
  stats.update(_quantiles(per_user, "stats/interactions_per_user"))
  stats.update(_quantiles(per_item, "stats/interactions_per_item"))
  ranked = np.sort(per_item)[::-1]
  top = max(1, dataset.num_items // 10)
  stats.update({
      "stats/items_without_interactions": int((per_item == 0).sum()),
      "stats/warm_items": int((train_items > 0).sum()),
      "stats/cold_items": int(split.cold_items.sum()),
      "stats/cold_items_in_test": int(len(np.unique(dataset.items[split.test][split.cold_items[dataset.items[split.test]]]))),
      "stats/test_on_items_without_train": int((train_items[dataset.items[split.test]] == 0).sum()),
      "stats/top10pct_items_share": float(ranked[:top].sum() / max(1, ranked.sum())),
  })
  return stats


def _report(stats: dict) -> str:
  lines = []
  for key, value in stats.items():
    shown = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    lines.append(f"{key:<40} {shown}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxrec data-stats", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=None, help="config file defining get_config()")
  parser.add_argument("--workdir", default=None, help="run directory (overrides the config's workdir)")
  parser.add_argument("--out", default=None, help="output directory (default: <workdir>/data_stats)")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.kcore=5")
  args = parser.parse_args(argv)
  cfg = load_config(args.config, args.overrides)
  if args.workdir:
    cfg = override(cfg, "workdir", args.workdir)
  dataset, split = sources.load(cfg.data)
  stats = compute(dataset, split)
  out = args.out or os.path.join(cfg.workdir, "data_stats")
  per_item = np.bincount(dataset.items, minlength=dataset.num_items)
  write_json_atomically(os.path.join(out, "stats.json"), stats)
  plots.save_png(plots.item_popularity(per_item, split.cold_items), os.path.join(out, "item_popularity.png"))
  print(_report(stats))
  print(f"wrote {os.path.join(out, 'stats.json')} and {os.path.join(out, 'item_popularity.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
