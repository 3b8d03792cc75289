"""RecBole's SASRec training throughput on recbole_sasrec.py's exported files, in RecBole's venv.

Builds what run_recbole builds (Config with recbole_sasrec.recbole_config's settings, create_dataset,
data_preparation, the model and RecBole's own trainer for its optimizer), takes the first
``--warmup + --batches`` training batches out of RecBole's dataloader before any clock starts (so
both sides of benchmarks/seq_throughput.py time the step alone, not batch building), then for each
``--threads`` count times ``--batches`` steps of exactly Trainer._train_epoch's body: zero_grad,
calculate_loss (CE over the whole catalog), loss.item(), backward, gradient clipping when
configured, optimizer.step (Adam). The model and optimizer are rebuilt from the same seed for each
thread count, after ``--warmup`` untimed steps.

Unit: an instance, one (item_id_list -> item_id) row of the .train.inter file; SASRec's CE loss
reads the sequence output at the instance's last real position only, so an instance is one
next-item prediction term (a target). Writes <out>.json.

  /tmp/recboleenv/bin/python benchmarks/peers/recbole_sasrec_speed.py --dir /tmp/recbole_seq \
      --out /tmp/sasrec_speed --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="ml100k")
  parser.add_argument("--dir", required=True, help="recbole_sasrec.py export's --dir")
  parser.add_argument("--out", required=True, help="results go to <out>.json")
  parser.add_argument("--max-len", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=2048, help="train_batch_size (recbole_sasrec.py's, RecBole's default)")
  parser.add_argument("--batches", type=int, default=10, help="timed steps per thread count")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the clock starts")
  parser.add_argument("--threads", default="1,2", help="torch intra-op thread counts to time")
  parser.add_argument("--seed", type=int, default=2020)
  args = parser.parse_args()

  import numpy as np
  import torch
  from recbole.config import Config
  from recbole.data import create_dataset, data_preparation
  from recbole.utils import get_model, get_trainer, init_seed

  import recbole_sasrec
  from recbole_common import versions

  work = tempfile.mkdtemp(prefix="recbole_speed_")
  os.chdir(work)  # RecBole's trainer writes ./log_tensorboard relative to the working directory
  cfg_args = argparse.Namespace(dir=args.dir, max_len=args.max_len, epochs=1, seed=args.seed, out=work)
  config_dict = recbole_sasrec.recbole_config(cfg_args)
  config_dict["train_batch_size"] = args.batch_size
  config = Config(model="SASRec", dataset=recbole_sasrec.dataset_name(args.data), config_dict=config_dict)
  init_seed(config["seed"], config["reproducibility"])
  dataset = create_dataset(config)
  train_data, _, _ = data_preparation(config, dataset)
  needed = args.warmup + args.batches
  batches = []
  while len(batches) < needed:  # a small dataset's epoch may hold fewer batches: go round again
    for interaction in train_data:
      batches.append(interaction.to(config["device"]))
      if len(batches) == needed:
        break

  def build():
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return model, trainer

  def step(model, trainer, interaction) -> float:
    trainer.optimizer.zero_grad()
    loss = model.calculate_loss(interaction)
    value = loss.item()  # RecBole's loop reads every batch's loss back (total_loss, _check_nan)
    loss.backward()
    if trainer.clip_grad_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), **trainer.clip_grad_norm)
    trainer.optimizer.step()
    return value

  timed = batches[args.warmup:]
  instances = int(sum(len(b) for b in timed))
  runs = {}
  for threads in sorted({int(t) for t in args.threads.split(",") if t}):
    torch.set_num_threads(threads)
    model, trainer = build()
    model.train()
    for interaction in batches[:args.warmup]:
      step(model, trainer, interaction)
    t0 = time.perf_counter()
    losses = [step(model, trainer, interaction) for interaction in timed]
    elapsed = time.perf_counter() - t0
    runs[str(threads)] = {"threads": threads, "instances_per_sec": instances / elapsed,
                          "ms_per_step": 1000 * elapsed / len(timed), "losses": losses}
    print(f"RecBole SASRec, {threads} thread(s): {instances / elapsed:,.0f} instances/s "
          f"({1000 * elapsed / len(timed):.1f} ms/step)", flush=True)
  best = max(runs.values(), key=lambda r: r["instances_per_sec"])
  model_config = {k: config[k] for k in ("n_layers", "n_heads", "hidden_size", "inner_size", "hidden_dropout_prob",
                                         "attn_dropout_prob", "hidden_act", "loss_type", "learner", "learning_rate",
                                         "weight_decay", "MAX_ITEM_LIST_LENGTH", "train_batch_size")}
  lengths = np.concatenate([b["item_length"].numpy() for b in timed])
  summary = {"model": "SASRec", "dataset": recbole_sasrec.dataset_name(args.data), "batch_size": args.batch_size,
             "timed_steps": len(timed), "warmup_steps": args.warmup, "instances_timed": instances,
             "history_len_mean": float(lengths.mean()), "num_items": int(train_data._dataset.item_num),
             "params": int(sum(p.numel() for p in model.parameters())), "runs": runs,
             "best_threads": best["threads"], "instances_per_sec": best["instances_per_sec"],
             "ms_per_step": best["ms_per_step"], "model_config": model_config, "versions": versions()}
  with open(args.out + ".json", "w") as f:
    json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
  main()
