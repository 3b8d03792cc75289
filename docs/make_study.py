"""Writes docs/study.md and docs/study/*.png from a finished `jaxrec study` run of
configs/study/paradigm.py. Every number in the page comes from the run's results.csv, its cells'
metrics.json and config.json; the only typed numbers are the published baselines, cited.

  jaxrec study --config configs/study/paradigm.py --out runs/study/paradigm
  python docs/make_study.py --study runs/study/paradigm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))

from jaxrec import study  # noqa: E402
from jaxrec.report import tables  # noqa: E402

# RecBole-GNN's published ML-1M table (random 8:1:1 per user, full ranking, rating >= 3 kept).
PUBLISHED = (("BPR", 0.1776, 0.2401), ("LightGCN", 0.1861, 0.2538), ("XSimGCL", 0.2116, 0.2750))
HEADLINE_TARGET, HEADLINE_AIM, COLD_RATIO_TARGET = 0.19, 0.21, 0.30


def _row(results, dataset, split, model, fraction=1.0):
  for r in results:
    if (r["dataset"], r["split"], r["model"], r["train_fraction"]) == (dataset, split, model, fraction):
      return r
  return None


def _cell_files(out: str, dataset: str, split: str, model: str, fraction: float = 1.0, seed: int = 0):
  cell = os.path.join(out, dataset, split, model, f"f{fraction:g}", f"s{seed}")
  with open(os.path.join(cell, "metrics.json")) as f:
    metrics = json.load(f)
  with open(os.path.join(cell, "config.json")) as f:
    config = json.load(f)
  return metrics, config


def _f(value: float, digits: int = 4) -> str:
  return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _pm(row, name: str) -> str:
  mean, std = row[f"{name}_mean"], row[f"{name}_std"]
  return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else _f(mean)


def protocol_section(out: str, results) -> list[str]:
  lines = ["| dataset / split | protocol (as the run reports it) | users | items | interactions | train | valid | "
           "test | cold items | test rows on cold items |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in results):
    model = next(r["model"] for r in results if r["dataset"] == dataset and r["split"] == split
                 and r["model"] != study.POPULARITY)
    m, _ = _cell_files(out, dataset, split, model)
    lines.append(f"| {dataset} / {split} | {m['protocol']} | {m['data/users']:,} | {m['data/items']:,} | "
                 f"{m['data/interactions']:,} | {m['data/train']:,} | {m['data/valid']:,} | {m['data/test']:,} | "
                 f"{m['data/cold_items']:,} | {m['data/cold_test']:,} |")
  return lines


def settings_section(out: str, results) -> list[str]:
  lines = ["| dataset | item text | steps | batch | lr | temperature | embed / id dim | MLP | history L | "
           "id dropout | logQ | text encoder |", "|---|---|---:|---:|---:|---:|---|---|---:|---:|---|---|"]
  for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in results):
    model = next(r["model"] for r in results if r["dataset"] == dataset and r["split"] == split
                 and r["model"] == "hybrid")
    _, c = _cell_files(out, dataset, split, model)
    t, mo, d, e = c["train"], c["model"], c["data"], c["encoder"]
    lines.append(f"| {dataset} | `{d['item_text']}` | {t['steps']} | {t['batch_size']} | {t['learning_rate']:g} | "
                 f"{mo['temperature']:g} | {mo['embed_dim']} / {mo['id_dim']} | {tuple(mo['mlp_dims'])} | "
                 f"{d['history_len']} | {mo['id_dropout']:g} | {t['logq_correction']} | all-MiniLM-L6-v2 "
                 f"{e['mode']}, max {e['max_length']} tokens |")
  return lines


def acceptance_section(out: str, results) -> list[str]:
  lines = []
  hybrid = _row(results, "ml1m", "random", "hybrid")
  ids = _row(results, "ml1m", "random", "id")
  pop = _row(results, "ml1m", "random", study.POPULARITY)
  dropout = _row(results, "ml1m", "random", "hybrid_profile_dropout_20ep")
  if hybrid is not None:
    r10 = hybrid["recall@10_mean"]
    verdict = "**met**" if r10 >= HEADLINE_TARGET else "**not met**"
    if r10 < HEADLINE_TARGET and dropout is not None and dropout["recall@10_mean"] >= HEADLINE_TARGET:
      verdict += " at five epochs (met by the profile-query cell, last ML-1M line below)"
    lines.append(f"- Hybrid on ML-1M (random 8:1:1, full ranking, training items masked, no cold items): Recall@10 "
                 f"{_pm(hybrid, 'recall@10')} over seeds {hybrid['seeds']} against the target {HEADLINE_TARGET} "
                 f"(aim {HEADLINE_AIM}): {verdict}. NDCG@10 {_pm(hybrid, 'ndcg@10')}."
                 + (f" ID-only beside it: Recall@10 {_pm(ids, 'recall@10')} (seeds {ids['seeds']})." if ids else "")
                 + (f" Popularity: {_f(pop['recall@10_mean'])}." if pop else ""))
    longer = _row(results, "ml1m", "random", "hybrid_10ep")
    if longer is not None:
      lines.append(f"- The same hybrid trained twice as long (10 epochs, seed {longer['seeds']}): Recall@10 "
                   f"{_pm(longer, 'recall@10')}, NDCG@10 {_pm(longer, 'ndcg@10')}.")
    for epochs in (10, 20):
      profile = _row(results, "ml1m", "random", f"hybrid_profile_{epochs}ep")
      if profile is not None:
        lines.append(f"- The hybrid with the ablation's best query tower (100 profile items through a history-item "
                     f"id table, no user id; {epochs} epochs, seed {profile['seeds']}): Recall@10 "
                     f"{_pm(profile, 'recall@10')}, NDCG@10 {_pm(profile, 'ndcg@10')}.")
    if dropout is not None:
      r10 = dropout["recall@10_mean"]
      verdict = ("**met**" + (" and past the aim" if r10 >= HEADLINE_AIM else ", the aim not reached")
                 if r10 >= HEADLINE_TARGET else "**not met**")
      lines.append(f"- The same profile query with history dropout 0.5 (chosen on the validation split), 20 epochs: "
                   f"Recall@10 {_pm(dropout, 'recall@10')} over seeds {dropout['seeds']} against the target "
                   f"{HEADLINE_TARGET} (aim {HEADLINE_AIM}): {verdict}. NDCG@10 {_pm(dropout, 'ndcg@10')}.")
  for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in results):
    part = {r["model"]: r for r in results if r["dataset"] == dataset and r["split"] == split
            and r["train_fraction"] == 1.0}
    if not any(math.isfinite(r["cold/recall@10_mean"]) for r in part.values()):
      continue
    for model in ("text", "hybrid"):
      if model not in part:
        continue
      r = part[model]
      ratio = r["cold/recall@10_mean"] / r["warm/recall@10_mean"] if r["warm/recall@10_mean"] > 0 else float("nan")
      verdict = "**met**" if ratio >= COLD_RATIO_TARGET else "**not met**"
      lines.append(f"- {model} on {dataset}/{split}: cold Recall@10 {_pm(r, 'cold/recall@10')} is "
                   f"{100 * ratio:.0f}% of its warm Recall@10 {_pm(r, 'warm/recall@10')} (target >= "
                   f"{100 * COLD_RATIO_TARGET:.0f}%): {verdict}.")
    if "id" in part:
      r = part["id"]
      chance = _cell_files(out, dataset, split, "id")[0].get("cold/chance_recall@10", float("nan"))
      lines.append(f"- id on {dataset}/{split}: cold Recall@10 {_pm(r, 'cold/recall@10')} (warm "
                   f"{_pm(r, 'warm/recall@10')}); a uniformly random ranking scores {_f(chance)} in expectation "
                   f"(10 / the user's candidate count, averaged), popularity "
                   f"{_f(part[study.POPULARITY]['cold/recall@10_mean']) if study.POPULARITY in part else '–'}. "
                   "Every cold item maps to the one shared id row and the item tower has nothing else, so all "
                   "cold items get the same vector and the same score: the ID-only model cannot rank them.")
  return lines


def efficiency_section(out: str, results) -> list[str]:
  lines = []
  for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in results):
    part = [r for r in results if r["dataset"] == dataset and r["split"] == split]
    fractions = sorted({r["train_fraction"] for r in part})
    if len(fractions) < 2:
      continue
    models = list(dict.fromkeys(r["model"] for r in part))
    budget = []
    for fraction in fractions:
      m, c = _cell_files(out, dataset, split, "hybrid", fraction)
      epochs = c["train"]["steps"] * c["train"]["batch_size"] / m["data/train"]
      budget.append(f"{fraction:g}: {m['data/train']:,} training pairs, {c['train']['steps']} steps of "
                    f"{c['train']['batch_size']} = {epochs:.1f} epochs")
    lines += [f"Each fraction keeps a random share of the training pairs (the same split, valid and test rows) "
              f"and trains for about the same number of epochs ({'; '.join(budget)}).", "",
              f"Recall@10 (overall / cold) by training fraction, {dataset}/{split}:", "",
              "| model | " + " | ".join(f"{f:g}" for f in fractions) + " |", "|---|" + "---:|" * len(fractions)]
    for model in models:
      cells = []
      for fraction in fractions:
        r = _row(part, dataset, split, model, fraction)
        cells.append("–" if r is None else f"{_f(r['recall@10_mean'])} / {_f(r['cold/recall@10_mean'])}")
      lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    for fraction in fractions:
      ids = _row(part, dataset, split, "id", fraction)
      ratios = []
      for model in ("text", "hybrid"):
        r = _row(part, dataset, split, model, fraction)
        if r and ids and ids["recall@10_mean"] > 0:
          ratios.append(f"{model} / ID-only = {r['recall@10_mean'] / ids['recall@10_mean']:.2f}")
      if ratios:
        lines.append(f"- fraction {fraction:g}, overall Recall@10: " + ", ".join(ratios))
    lines.append("")
  return lines


def readme_section(results) -> str:
  """The README's study section (the lead pastes it): the command, the headline rows, a link."""
  lines = ["## The paradigm study", "",
           "Does a pretrained text encoder in the item tower change what a two-tower recommender can do? "
           "One command trains and evaluates the grid (models x datasets x splits x training fractions x "
           "seeds), resumably, and writes a CSV/Markdown table with mean ± std over seeds and PNG plots:", "",
           "```bash", "jaxrec study --config configs/study/paradigm.py --out runs/study/paradigm",
           "python docs/make_study.py --study runs/study/paradigm   # regenerates docs/study.md", "```", "",
           "| dataset / split | model | seeds | Recall@10 | NDCG@10 | warm R@10 | cold R@10 |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in results:
    if r["train_fraction"] != 1.0:
      continue
    lines.append(f"| {r['dataset']} / {r['split']} | {r['model']} | {int(r['n'])} | {_pm(r, 'recall@10')} | "
                 f"{_pm(r, 'ndcg@10')} | {_pm(r, 'warm/recall@10')} | {_pm(r, 'cold/recall@10')} |")
  lines += ["", "Protocol, per-cell commands, the data-efficiency plot, what was cut on the 2-core CPU the "
            "numbers come from, and the comparison with RecBole-GNN's published ML-1M table: "
            "[docs/study.md](docs/study.md). `jaxrec study --config configs/study/tiny.py` runs a tiny grid "
            "in about a minute (the smoke test)."]
  return "\n".join(lines) + "\n"


def recbole_rows(paths) -> list[str]:
  """Rows for RecBole runs on exactly this study's split (benchmarks/peers/recbole_bpr.py JSON)."""
  lines = []
  for path in paths:
    with open(path) as f:
      run = json.load(f)
    test = run["test_result"]
    # EASE has no epochs: RecBole computes its closed form once.
    how = ("closed form" if run["model"] == "EASE" else
           f"{run['epochs_trained']} epochs, best valid epoch {run['best_valid_epoch']}")
    lines.append(f"| {run['model']} (RecBole {run['versions']['recbole']} on this study's split, {how}) | "
                 f"{_f(test['recall@10'])} | {_f(test['ndcg@10'])} |")
  return lines


def ease_section(path: str | None) -> str:
  """The EASE reference and its two-tower-shaped variants (benchmarks/peers/ease_reference.py JSON)."""
  if not path:
    return "(not run)"
  with open(path) as f:
    run = json.load(f)
  lam = f"{run['lam']:g}"
  best_valid = run["ease_valid"][lam]
  lines = ["| model (numpy, jaxrec's evaluator, this split) | split | Recall@10 | NDCG@10 |", "|---|---|---:|---:|",
           f"| EASE, full rank (lambda {lam}, picked on valid) | test | {_f(run['ease_test']['recall@10'])} | "
           f"{_f(run['ease_test']['ndcg@10'])} |",
           f"| EASE, full rank | valid | {_f(best_valid['recall@10'])} | {_f(best_valid['ndcg@10'])} |"]
  for rank, m in run["rank_valid"].items():
    lines.append(f"| EASE cut to rank {rank} (a {rank}-wide dot-product two-tower) | valid | "
                 f"{_f(m['recall@10'])} | {_f(m['ndcg@10'])} |")
  m = run["rank64_cosine_valid"]
  lines.append(f"| rank 64, unit item vectors (cosine scores) | valid | {_f(m['recall@10'])} | {_f(m['ndcg@10'])} |")
  for length, m in run["rank64_history_valid"].items():
    lines.append(f"| rank 64, query from {length} sampled known items | valid | {_f(m['recall@10'])} | "
                 f"{_f(m['ndcg@10'])} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--study", default="runs/study/paradigm", help="output directory of the study run")
  parser.add_argument("--docs", default=DOCS)
  parser.add_argument("--readme", action="store_true", help="also print the README section")
  parser.add_argument("--recbole", action="append", default=[],
                      help="recbole_<model>.json from benchmarks/peers/recbole_bpr.py run (repeatable)")
  parser.add_argument("--ease", help="JSON from benchmarks/peers/ease_reference.py")
  args = parser.parse_args(argv)
  out = os.path.abspath(args.study)
  results = tables.read_csv(os.path.join(out, "results.csv"))
  with open(os.path.join(out, "results.md")) as f:
    table = f.read().split("\n", 2)[2]  # drop the "# Study" title
  with open(os.path.join(out, "commands.sh")) as f:
    commands = f.read()
  images = os.path.join(args.docs, "study")
  os.makedirs(images, exist_ok=True)
  plots = sorted(p for p in os.listdir(out) if p.endswith(".png"))
  for name in plots:
    shutil.copyfile(os.path.join(out, name), os.path.join(images, name))
  template_path = os.path.join(DOCS, "study.template.md")
  with open(template_path) as f:
    template = f.read()
  diagnosis_path = os.path.join(os.path.dirname(out), "ml1m_diagnosis", "results.md")
  diagnosis = "(not run)"
  if os.path.isfile(diagnosis_path):
    with open(diagnosis_path) as f:
      diagnosis = f.read().split("\n", 2)[2].strip()
  ablation_path = os.path.join(os.path.dirname(out), "ml1m_ablation", "results.md")
  ablation = "(not run)"
  if os.path.isfile(ablation_path):
    with open(ablation_path) as f:
      ablation = f.read().split("\n", 2)[2].strip()
  page = template.format(
      diagnosis=diagnosis,
      ablation=ablation,
      ease=ease_section(args.ease),
      protocol="\n".join(protocol_section(out, results)),
      settings="\n".join(settings_section(out, results)),
      table=table.strip(),
      plots="\n\n".join(f"![{p[:-4]}](study/{p})" for p in plots),
      acceptance="\n".join(acceptance_section(out, results)),
      efficiency="\n".join(efficiency_section(out, results)).strip(),
      recbole="\n".join(recbole_rows(args.recbole)),
      published="\n".join(f"| {name} (RecBole-GNN, published) | {r:.4f} | {n:.4f} |" for name, r, n in PUBLISHED),
      ours="\n".join(f"| {label} (jaxrec, this study) | {_pm(r, 'recall@10')} | {_pm(r, 'ndcg@10')} |"
                     for label, r in (("hybrid text + ids, 5 epochs", _row(results, "ml1m", "random", "hybrid")),
                                      ("hybrid text + ids, 10 epochs", _row(results, "ml1m", "random", "hybrid_10ep")),
                                      ("hybrid, profile query, 10 epochs",
                                       _row(results, "ml1m", "random", "hybrid_profile_10ep")),
                                      ("hybrid, profile query, 20 epochs",
                                       _row(results, "ml1m", "random", "hybrid_profile_20ep")),
                                      ("hybrid, profile query, history dropout 0.5, 20 epochs",
                                       _row(results, "ml1m", "random", "hybrid_profile_dropout_20ep")),
                                      ("text-only item tower", _row(results, "ml1m", "random", "text")),
                                      ("ID-only two-tower", _row(results, "ml1m", "random", "id")),
                                      ("popularity", _row(results, "ml1m", "random", study.POPULARITY)))
                     if r is not None),
      commands=commands.strip(),
  )
  with open(os.path.join(args.docs, "study.md"), "w") as f:
    f.write(page)
  print(f"wrote {os.path.join(args.docs, 'study.md')} and {len(plots)} plots under {images}")
  if args.readme:
    print(readme_section(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
