"""RecBole's SASRec (or GRU4Rec) on exactly jaxrec's temporal leave-one-out split, scored twice:
by RecBole's own full-sort evaluator and by jaxrec's, in three phases and two interpreters.

  export  (jaxrec's venv)   loads the split jaxrec trains and evaluates on (configs/<data>_id.py with
                            data.split=loo, data.cold_item_fraction=0) and writes RecBole's pre-augmented
                            sequential benchmark files, <dir>/<name>/<name>.{train,valid,test}.inter:
                            one row per (history -> next item) example, `item_id_list:token_seq` the
                            last MAX_ITEM_LIST_LENGTH items before the target in jaxrec's time order.
                            train: every prefix of each user's training sequence; valid: the training
                            sequence -> the valid item; test: training + valid -> the test item (the
                            history jaxrec evaluates the test with). Plus <name>.item (the catalog) and
                            known.tsv (each test user's train + valid items, jaxrec's exclusion set).
  run     (a RecBole venv)  run_recbole(model='SASRec', ...) on those files: RecBole's model, trainer,
                            early stopping and full-sort test metrics (which rank the user's known items
                            too); then the best epoch's model scores every test example over the
                            catalog with known.tsv's items at -inf and writes the top 50 (topk.tsv).
  score   (jaxrec's venv)   reads topk.tsv and computes the metrics with jaxrec.evaluation.full_ranking
                            on jaxrec's own test protocol (same users, held-out items, known-item
                            exclusion and candidate counts as `jaxrec train`), popularity beside it.

RecBole 1.2.1's SequentialDataset skips its data augmentation when benchmark_filename is set
(_change_feat_format returns before data_augmentation) and builds no sequence from timestamps: the
files must already hold the (item_id_list, item_id) examples, which is why export writes them
itself. See benchmarks/README.md, "RecBole SASRec on jaxrec's leave-one-out split".

  .venv/bin/python benchmarks/peers/recbole_sasrec.py export --data ml100k --dir /tmp/recbole_seq
  nice -n 19 /tmp/recboleenv/bin/python benchmarks/peers/recbole_sasrec.py run --data ml100k \
      --dir /tmp/recbole_seq --out /tmp/recbole_sasrec_ml100k --max-minutes 90
  .venv/bin/python benchmarks/peers/recbole_sasrec.py score --data ml100k --dir /tmp/recbole_seq \
      --out /tmp/recbole_sasrec_ml100k
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# data name -> (jaxrec config, directory under ../shared/data): the ID-only configs, whose data and
# split settings are the text configs' (the split does not depend on the model).
DATA = {
    "ml100k": ("configs/ml100k_id.py", "ml-100k"),
    "amazon": ("configs/amazon_instruments_id.py", "amazon-musical-instruments-5core"),
}
KS = (10, 20, 50)
TOPK = max(KS)


def dataset_name(data: str) -> str:
  return f"{data}-jaxrec-loo"


def _load_split(args: argparse.Namespace):
  """jaxrec's (Dataset, Split, overrides) for ``args.data``: the split `jaxrec train` would use."""
  sys.path.insert(0, _REPO)  # run as a file, so the repository is not on sys.path by itself
  from jaxrec.config import data_root, load_config
  from jaxrec.data import sources

  config, folder = DATA[args.data]
  path = args.data_path or os.path.join(data_root(), folder)
  overrides = (f"data.path={path}", "data.split=loo", "data.cold_item_fraction=0")
  cfg = load_config(os.path.join(_REPO, config), list(overrides))
  dataset, split = sources.load(cfg.data)
  return cfg, dataset, split, overrides


def _tokens(ids) -> list[str]:
  out = [str(i.item() if hasattr(i, "item") else i) for i in ids]
  bad = [t for t in out if not t or any(c.isspace() for c in t)]
  if bad:  # RecBole splits token_seq fields on spaces and rows on tabs
    raise SystemExit(f"ids with whitespace cannot be RecBole tokens: {bad[:5]}")
  return out


def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def export(args: argparse.Namespace) -> None:
  import numpy as np

  cfg, dataset, split, overrides = _load_split(args)
  from jaxrec import evaluation

  name = dataset_name(args.data)
  out = os.path.join(args.dir, name)
  os.makedirs(out, exist_ok=True)
  # Raw ids, not jaxrec's dense indices: RecBole remaps tokens itself (item_id_list through
  # alias_of_item_id, into item_id's index), and raw ids can be checked against the source files.
  user_tok, item_tok = _tokens(dataset.user_raw_ids), _tokens(dataset.item_raw_ids)
  length = args.max_len
  # Per-user time order exactly as jaxrec's split and its evaluator's Sequences order them (time,
  # then row): interaction rows grouped by user, so each example also carries its target's time.
  def by_user(rows_idx: np.ndarray) -> list[np.ndarray]:
    rows_idx = rows_idx[np.lexsort((rows_idx, dataset.timestamps[rows_idx], dataset.users[rows_idx]))]
    bounds = np.searchsorted(dataset.users[rows_idx], np.arange(dataset.num_users + 1))
    return [rows_idx[bounds[u]:bounds[u + 1]] for u in range(dataset.num_users)]

  train_rows = by_user(split.train)
  known_rows = by_user(np.concatenate([split.train, split.valid]))
  # What jaxrec's test evaluation knows of each user (train + valid, time-ordered): the history its
  # query sees and the items it excludes from the ranking.
  known_seq = evaluation.Protocol.of(dataset, split, "test").known
  header = "user_id:token\titem_id_list:token_seq\titem_id:token\ttimestamp:float\n"

  def example(history_rows: np.ndarray, target: int) -> tuple:
    """(user, the <= L items before the target, the target item, its time)."""
    return (dataset.users[target], dataset.items[history_rows[-length:]], dataset.items[target],
            dataset.timestamps[target])

  # train: every position after a user's first (RecBole's own augmentation of a sequence); valid:
  # the whole training sequence before the valid item; test: training + valid before the test item.
  held = {"valid": (split.valid, train_rows), "test": (split.test, known_rows)}
  parts = {"train": [example(rows_u[:i], rows_u[i]) for rows_u in train_rows for i in range(1, len(rows_u))]}
  for part, (targets, history) in held.items():
    parts[part] = [example(history[dataset.users[row]], row) for row in np.sort(targets)]
  summary = {"config": DATA[args.data][0], "overrides": list(overrides), "protocol": split.protocol,
             "dataset": name, "MAX_ITEM_LIST_LENGTH": length, "num_users": int(dataset.num_users),
             "num_items": int(dataset.num_items),
             "jaxrec_split": {k: int(len(getattr(split, k))) for k in ("train", "valid", "test")}, "files": {}}
  for part, examples in parts.items():
    path = os.path.join(out, f"{name}.{part}.inter")
    with open(path, "w") as f:
      f.write(header)
      f.writelines(f"{user_tok[u]}\t{' '.join(item_tok[i] for i in hist)}\t{item_tok[t]}\t{float(ts)}\n"
                   for u, hist, t, ts in examples)
    lengths = np.array([len(h) for _, h, _, _ in examples])
    summary["files"][part] = {"examples": len(examples), "users": int(len(np.unique([e[0] for e in examples]))),
                              "history_len_min": int(lengths.min()), "history_len_mean": float(lengths.mean()),
                              "history_len_max": int(lengths.max()), "sha256_16": _sha(path)}
  # Every valid/test example must carry a history (RecBole cannot score an empty sequence), and
  # each test history must be the tail of exactly the items jaxrec excludes for that user.
  if summary["files"]["valid"]["history_len_min"] == 0 or summary["files"]["test"]["history_len_min"] == 0:
    raise SystemExit("a valid/test example has an empty history")
  for u, hist, _, _ in parts["test"]:
    known = known_seq.items[known_seq.start[u]:known_seq.start[u + 1]]
    if not np.array_equal(hist, known[-length:]):
      raise SystemExit(f"user {user_tok[u]}: test history differs from jaxrec's known items")
  # The .item file puts every catalog item into RecBole's ranking, rated or not.
  with open(os.path.join(out, f"{name}.item"), "w") as f:
    f.write("item_id:token\n")
    f.writelines(f"{t}\n" for t in item_tok)
  # known.tsv: jaxrec's exclusion set for each test user.
  with open(os.path.join(args.dir, name, "known.tsv"), "w") as f:
    for u in np.unique(dataset.users[split.test]):
      known = known_seq.items[known_seq.start[u]:known_seq.start[u + 1]]
      f.write(f"{user_tok[u]}\t{' '.join(item_tok[i] for i in known)}\n")
  summary["files"]["item"] = {"items": len(item_tok), "sha256_16": _sha(os.path.join(out, f"{name}.item"))}
  with open(os.path.join(out, "export.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=2))


def recbole_config(args: argparse.Namespace) -> dict:
  return {
      "data_path": os.path.abspath(args.dir),
      "benchmark_filename": ["train", "valid", "test"],
      # item_id_list's tokens must share item_id's index (else the history and the scored catalog
      # would be two unrelated vocabularies); RecBole's own sequential benchmark files do the same.
      "alias_of_item_id": ["item_id_list"],
      "load_col": {"inter": ["user_id", "item_id_list", "item_id", "timestamp"], "item": ["item_id"]},
      # With benchmark files, Dataset.build returns the three files as they are (no split, no sort,
      # no _data_filtering); SequentialDataset.build still insists on order TO, and the evaluator
      # reads mode full. LS valid_and_test is what RecBole's sequential quick-start sets.
      "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
      "val_interval": None,
      "filter_inter_by_user_or_item": False,
      "user_inter_num_interval": None,
      "item_inter_num_interval": None,
      "MAX_ITEM_LIST_LENGTH": args.max_len,
      # CE over the whole catalog needs no sampled negatives; RecBole refuses CE with any.
      "loss_type": "CE",
      "train_neg_sample_args": None,
      "metrics": ["Recall", "NDCG", "MRR", "Hit"],
      "topk": list(KS),
      # RecBole's default valid metric (overall.yaml), stated so an upgrade can't move it.
      "valid_metric": "MRR@10",
      # RecBole's defaults (overall.yaml), stated for the same reason; the model's own defaults
      # (properties/model/SASRec.yaml: 2 layers, 2 heads, hidden 64, inner 256, dropout 0.5/0.5,
      # gelu, layer_norm_eps 1e-12, init 0.02) are left to RecBole and recorded in the result.
      "learning_rate": 1e-3,
      "train_batch_size": 2048,
      "epochs": args.epochs,
      "stopping_step": 10,
      "eval_step": 1,
      "eval_batch_size": 4096,
      "device": "cpu",
      "use_gpu": False,
      "seed": args.seed,
      "reproducibility": True,
      "show_progress": False,
      "checkpoint_dir": os.path.abspath(os.path.join(args.out, "saved")),
  }


def _read_lists(path: str) -> dict[str, list[str]]:
  with open(path) as f:
    return {user: items.split() for user, items in (line.rstrip("\n").split("\t") for line in f)}


def run(args: argparse.Namespace) -> None:
  # torch>=2.6 loads checkpoints with weights_only=True, which cannot unpickle the Config object in
  # RecBole's best-model checkpoint; this process's own file, written minutes earlier.
  os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
  import numpy as np
  import torch
  from recbole.quick_start import run_recbole
  from recbole_common import TrainerLog, versions

  name = dataset_name(args.data)
  known_by_user = _read_lists(os.path.join(os.path.abspath(args.dir), name, "known.tsv"))
  os.makedirs(args.out, exist_ok=True)
  os.chdir(args.out)  # RecBole writes ./log and ./log_tensorboard relative to the working directory
  torch.set_num_threads(args.threads)
  log = TrainerLog(args.max_minutes)
  config = recbole_config(args)
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
  log.install()
  result = run_recbole(model=args.model, dataset=name, config_dict=config)
  wall = time.time() - log.start

  # The best epoch's model (the test call reloaded it) scores each test example over the catalog.
  trainer, test_data = log.trainer, log.test_data
  model, dataset = trainer.model, test_data._dataset
  model.eval()
  item_field, user_field = dataset.iid_field, dataset.uid_field
  if list(dataset.field2id_token["item_id_list"]) != list(dataset.field2id_token[item_field]):
    raise SystemExit("item_id_list and item_id were remapped to different indices")
  index_of = {tok: i for i, tok in enumerate(dataset.field2id_token[item_field])}
  lines, raw_hits, examples = [], {k: 0 for k in KS}, 0
  with torch.no_grad():
    for interaction, _, _, positive_i in test_data:
      scores_BxN = model.full_sort_predict(interaction).view(-1, dataset.item_num).clone()
      scores_BxN[:, 0] = -np.inf  # RecBole's [PAD] row, which its evaluator also drops
      # RecBole's own metric, recomputed: Hit@K with the known items ranked (a check of this loop).
      raw_top = torch.topk(scores_BxN, TOPK, dim=1).indices
      for k in KS:
        raw_hits[k] += int((raw_top[:, :k] == positive_i[:, None]).any(1).sum())
      users = dataset.id2token(user_field, interaction[user_field].numpy())
      for b, user in enumerate(users):
        known = [index_of[t] for t in known_by_user[user]]
        scores_BxN[b, known] = -np.inf
      top = torch.topk(scores_BxN, TOPK, dim=1).indices.numpy()
      for b, user in enumerate(users):
        lines.append(f"{user}\t{' '.join(dataset.id2token(item_field, top[b]))}\n")
      examples += len(users)
  with open(os.path.join(args.out, "topk.tsv"), "w") as f:
    f.writelines(lines)

  export_summary = None
  path = os.path.join(os.path.abspath(args.dir), name, "export.json")
  if os.path.exists(path):
    with open(path) as f:
      export_summary = json.load(f)
  model_params = {k: trainer.config[k] for k in (
      "n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob", "attn_dropout_prob",
      "hidden_act", "layer_norm_eps", "initializer_range", "embedding_size", "num_layers", "dropout_prob",
      "loss_type", "learner", "weight_decay", "train_neg_sample_args", "MAX_ITEM_LIST_LENGTH")
      if trainer.config[k] is not None}
  summary = {
      "model": args.model, "dataset": name, "date_utc": when, "wall_s": round(wall, 1),
      "epochs_trained": len(log.curve), "epochs_max": args.epochs, "stopped_by": log.stopped_by,
      "best_valid_epoch": log.best_epoch(config["valid_metric"]),
      "best_valid_score": float(result["best_valid_score"]),
      "best_valid_result": {k: float(v) for k, v in result["best_valid_result"].items()},
      "test_result_recbole_known_items_ranked": {k: float(v) for k, v in result["test_result"].items()},
      "test_examples": examples,
      "hit_recomputed_known_items_ranked": {f"hit@{k}": raw_hits[k] / max(examples, 1) for k in KS},
      "parameters": int(sum(p.numel() for p in model.parameters())),
      "model_config": model_params,
      "versions": versions(), "torch_threads": torch.get_num_threads(),
      "config": config, "export": export_summary, "curve": log.curve,
  }
  with open(os.path.join(args.out, f"recbole_{args.model.lower()}.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  print(json.dumps({k: summary[k] for k in ("date_utc", "wall_s", "epochs_trained", "stopped_by", "best_valid_epoch",
                                            "test_result_recbole_known_items_ranked",
                                            "hit_recomputed_known_items_ranked", "versions")}, indent=2))


def score(args: argparse.Namespace) -> None:
  import numpy as np

  cfg, dataset, split, overrides = _load_split(args)
  from jaxrec import evaluation, metrics

  protocol = evaluation.Protocol.of(dataset, split, "test")
  item_index = {t: i for i, t in enumerate(_tokens(dataset.item_raw_ids))}
  user_index = {t: u for u, t in enumerate(_tokens(dataset.user_raw_ids))}
  lists = _read_lists(os.path.join(args.out, "topk.tsv"))
  users = np.array(sorted(user_index[u] for u in lists), np.int32)
  if not np.array_equal(users, protocol.users):
    raise SystemExit(f"topk.tsv has {len(users)} users, jaxrec's test protocol {len(protocol.users)} (or others)")
  top_UxK = np.array([[item_index[t] for t in lists[_tokens([dataset.user_raw_ids[u]])[0]]] for u in users], np.int32)
  known = evaluation.known_rows(protocol.known, users)
  if (top_UxK[:, :, None] == known[:, None, :]).any():
    raise SystemExit("a top-k list holds an item the user already knows")
  # Through jaxrec's own full_ranking, as `jaxrec train` evaluates: each user's query is a score
  # row over the catalog (identity item vectors), TOPK - rank on the listed items and 0 elsewhere,
  # so the kernel's top-k (known items excluded, ties impossible above 0) is exactly the list.
  queries_UxN = np.zeros((len(users), dataset.num_items), np.float32)
  queries_UxN[np.arange(len(users))[:, None], top_UxK] = TOPK - np.arange(TOPK, dtype=np.float32)
  result = evaluation.full_ranking(protocol, np.eye(dataset.num_items, dtype=np.float32), queries_UxN,
                                   ks=KS, batch_size=cfg.eval.batch_size)
  # The same lists straight into the accumulator: the two must agree.
  acc = metrics.RankingAccumulator(KS, dataset.num_items, protocol.groups)
  acc.add(top_UxK, users, protocol.truth_users, protocol.truth_items,
          dataset.num_items - np.diff(protocol.known.start)[users])
  direct = acc.result()
  for key, value in direct.items():
    if not np.isclose(value, result[key], rtol=1e-6, atol=1e-9):
      raise SystemExit(f"{key}: full_ranking {result[key]} vs accumulator {value}")
  with open(os.path.join(args.out, f"recbole_{args.model.lower()}.json")) as f:
    run_summary = json.load(f)
  run_summary["test_result_jaxrec_known_items_excluded"] = {k: v for k, v in result.items() if "/" not in k}
  run_summary["test_result_jaxrec_popularity"] = {k.split("/", 1)[1]: v for k, v in result.items()
                                                  if k.startswith("popularity/")}
  run_summary["jaxrec_protocol"] = {"config": DATA[args.data][0], "overrides": list(overrides),
                                    "protocol": split.protocol, "users": int(len(users)),
                                    "held_out": int(len(protocol.truth_items)), "ks": list(KS)}
  with open(os.path.join(args.out, f"recbole_{args.model.lower()}.json"), "w") as f:
    json.dump(run_summary, f, indent=2)
  print(json.dumps({k: run_summary[k] for k in ("test_result_recbole_known_items_ranked",
                                                "test_result_jaxrec_known_items_excluded",
                                                "test_result_jaxrec_popularity")}, indent=2))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="phase", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--data", choices=sorted(DATA), default="ml100k")
  common.add_argument("--dir", required=True, help="RecBole data_path; files go to <dir>/<data>-jaxrec-loo/")
  common.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH (RecBole's default)")
  p = sub.add_parser("export", parents=[common], help="write jaxrec's split as RecBole sequential files (jaxrec's venv)")
  p.add_argument("--data-path", default="", help="the dataset directory (default: ../shared/data/<folder>)")
  p = sub.add_parser("run", parents=[common], help="train and test RecBole's model, write topk.tsv (RecBole's venv)")
  p.add_argument("--out", required=True, help="logs, checkpoint, topk.tsv and recbole_<model>.json")
  p.add_argument("--model", default="SASRec", choices=["SASRec", "GRU4Rec"])
  p.add_argument("--epochs", type=int, default=300, help="RecBole's default (stopping_step 10 may end it sooner)")
  p.add_argument("--seed", type=int, default=2020, help="RecBole's default seed")
  p.add_argument("--max-minutes", type=float, default=0, help="stop training after this much wall time (0: none)")
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p = sub.add_parser("score", parents=[common], help="jaxrec's metrics of the run's topk.tsv (jaxrec's venv)")
  p.add_argument("--out", required=True, help="the run phase's --out")
  p.add_argument("--model", default="SASRec", choices=["SASRec", "GRU4Rec"])
  p.add_argument("--data-path", default="", help="as for export")
  args = parser.parse_args()
  {"export": export, "run": run, "score": score}[args.phase](args)


if __name__ == "__main__":
  main()
