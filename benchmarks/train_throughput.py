"""Training throughput of jaxrec against its peers, on the same data, in one run on this machine.

Configurations (each a jaxrec run and a peer run on identical batches):

  id      jaxrec ID-only two-tower        vs TensorFlow Recommenders' tutorial retrieval model
  frozen  jaxrec text two-tower, cached   vs a PyTorch implementation of the same model
          (frozen) MiniLM item vectors
  full    jaxrec with MiniLM fine-tuned   vs the same PyTorch model fine-tuning MiniLM
          in the item tower (bf16 matmul     (at its faster precision: float32, or bf16
          operands; --full-dtype)            matmuls under torch.autocast)

Each peer runs at its fastest probed thread count (``--peer-threads``), and the PyTorch peer in
``full`` at its fastest probed precision (``--peer-precisions``); the probes are printed.

How it is fair: the benchmark builds every training batch once with jaxrec's own batch builder
(user, positive item, last-L history, logQ) and writes them, with the catalog and user tables,
to an .npz; each peer runs in its own virtualenv as a subprocess, trains on exactly those batches
in the same order with the same batch size, model sizes, loss, optimiser and schedule, and
returns its item and query vectors. Every side then gets the same full-ranking evaluation
(``jaxrec.evaluation``, the one jaxrec's own runs report: held-out split, known items excluded,
jaxrec's top-k and metrics), so a faster side cannot hide a worse model. Throughput is steady
state: the first ``--warmup`` steps (compilation, tracing, allocator warm-up) are excluded, the
rest timed end to end including the per-step host-to-framework copy of the batch. Sides
alternate for ``--rounds`` rounds, because the CPU is shared and its load drifts; the median
round is reported.

    .venv/bin/python benchmarks/train_throughput.py                     # id + frozen (+ full)
    .venv/bin/python benchmarks/train_throughput.py --configs id --rounds 5
    .venv/bin/python benchmarks/train_throughput.py --data ml100k      # ../shared/data/ml-100k
    .venv/bin/python benchmarks/train_throughput.py --smoke            # seconds; used by the tests

Peer interpreters: ``--tfrs-python`` / ``$JAXREC_TFRS_PYTHON`` (default /tmp/tfrsenv/bin/python)
and ``--torch-python`` / ``$JAXREC_TORCH_PYTHON`` (default /tmp/torchenv/bin/python); a missing
one skips that peer with the reason in the output. Setup commands: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxrec import host_memory

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
PEERS = {"tfrs": os.path.join(_HERE, "peers", "tfrs_two_tower.py"),
         "torch": os.path.join(_HERE, "peers", "torch_two_tower.py")}
PEER_PYTHON = {"tfrs": ("JAXREC_TFRS_PYTHON", ("/tmp/tfrsenv/bin/python",)),
               "torch": ("JAXREC_TORCH_PYTHON", ("/tmp/torchenv/bin/python", "/tmp/stenv/bin/python"))}
PEER_CHECK = {"tfrs": "import os; os.environ.setdefault('TF_USE_LEGACY_KERAS', '1'); import tensorflow_recommenders",
              "torch": "import torch, transformers"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One configuration: jaxrec overrides, its peer, and how long to train."""

  name: str
  peer: str
  overrides: tuple[str, ...]
  steps: int
  warmup: int
  drop_features: bool = False  # train from split files, which carry no categorical features


def settings(args) -> dict[str, Setting]:
  # One step per call, as the peers' loops run, unless --jaxrec-override says otherwise
  # (configs/default.py runs ten).
  common = ("mesh.num_devices=1", "train.progress=false", f"train.batch_size={args.batch_size}",
            "train.steps_per_call=1")
  data = {"synthetic": (), "ml100k": ("data.source=ml100k", f"data.path={args.ml100k_path}", "data.item_text=title+genres",
                                      "encoder.max_length=64")}[args.data]
  smoke = ("data.synthetic.num_users=120", "data.synthetic.num_items=90", "data.synthetic.num_topics=6",
           "data.synthetic.interactions_per_user=10") if args.smoke else ()
  steps, warmup = (6, 2) if args.smoke else (args.steps, args.warmup)
  full_steps, full_warmup = (4, 2) if args.smoke else (args.full_steps, 2)
  full_batch = 8 if args.smoke else args.full_batch_size
  return {
      # TFRS's tutorial model: a user-id and an item-id embedding, dot product, nothing else. The
      # same jaxrec model: no history (history_len=0), no categorical features, no id dropout, no
      # fusion weights (fusion=sum of the one input: the id embedding, L2-normalised), and an id
      # row for every catalog item as in TFRS's vocabulary (cold ones never trained).
      "id": Setting("id", "tfrs", common + data + smoke + (
          "model.use_text=false", "encoder.mode=none", "model.use_user_ids=true", "model.fusion=sum",
          "data.history_len=0", "model.id_dropout=0", "model.cold_item_rows=own"), steps, warmup,
          drop_features=True),
      "frozen": Setting("frozen", "torch", common + data + smoke + ("encoder.mode=frozen",), steps, warmup),
      "full": Setting("full", "torch", common[:2] + common[3:] + data + smoke + (
          "encoder.mode=full", f"train.batch_size={full_batch}", f"data.history_len={args.full_history_len}",
          f"encoder.dtype={args.full_dtype}"),
          full_steps, full_warmup),
  }


# ---------------------------------------------------------------------------------------------- data


def write_split_files(cfg, directory: str) -> None:
  """The configured source's split as train/valid/test .npz files (ids and time, nothing else)."""
  from jaxrec.data import sources
  ds, sp = sources.load(cfg.data)
  for name, idx in (("train", sp.train), ("valid", sp.valid), ("test", sp.test)):
    np.savez(os.path.join(directory, name + ".npz"), user=ds.user_raw_ids[ds.users[idx]],
             item=ds.item_raw_ids[ds.items[idx]], timestamp=ds.timestamps[idx])


def make_config(setting: Setting, workdir: str, extra: tuple[str, ...] = ()):
  from jaxrec.config import load_config
  overrides = list(setting.overrides) + [f"workdir={workdir}", f"train.steps={setting.steps}"] + list(extra)
  cfg = load_config(os.path.join(_REPO, "configs", "default.py"), overrides)
  if setting.drop_features:
    split_dir = os.path.join(workdir, "split")
    os.makedirs(split_dir, exist_ok=True)
    write_split_files(cfg, split_dir)
    cfg = load_config(os.path.join(_REPO, "configs", "default.py"),
                      overrides + ["data.source=files", f"data.path={split_dir}", "data.split=predefined"])
  return cfg


def evaluation_protocol(trainer):
  """jaxrec's evaluation protocol (``jaxrec.evaluation``): the held-out split, every user with a
  held-out item, their known items excluded."""
  from jaxrec.evaluation import Protocol
  cfg = trainer.cfg
  return Protocol.of(trainer.dataset, trainer.split, cfg.eval.split, cfg.eval.max_users)


def score(cfg, protocol, items_NxE: np.ndarray, queries_UxE: np.ndarray) -> dict[str, float]:
  """Full ranking of any side's vectors: jaxrec's top-k and metrics, as jaxrec's own evaluation ranks."""
  from jaxrec.evaluation import full_ranking
  return full_ranking(protocol, np.asarray(items_NxE, np.float32), np.asarray(queries_UxE, np.float32),
                      ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)


def jaxrec_vectors(trainer, state, protocol) -> tuple[np.ndarray, np.ndarray]:
  model, params, tables = trainer.recommender, state["params"], state["tables"]
  text = model.catalog_text(params, tables)
  items = np.asarray(model.item_vectors(params, tables, text_NxD=text))
  queries = [np.asarray(model.query_vectors(params, tables, protocol.users[i:i + 512], protocol.known, text))
             for i in range(0, len(protocol.users), 512)]
  return items, np.concatenate(queries)


def catalog_text(cfg, dataset, tokens: bool) -> dict[str, np.ndarray]:
  """The frozen MiniLM vectors jaxrec trains on (through its on-disk cache), or the token table."""
  from jaxrec.text_encoder import TextEncoder, encode_cached
  encoder = TextEncoder.from_pretrained(cfg.encoder.path or None, max_length=cfg.encoder.max_length or None,
                                        pooling=cfg.encoder.pooling)
  if tokens:
    return {"tokens_" + k: np.asarray(v, np.int32) for k, v in encoder.tokenize(list(dataset.item_text)).items()}
  cache = cfg.encoder.cache_dir or os.environ.get("JAXREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxrec")
  return {"text": np.asarray(encode_cached(encoder, list(dataset.item_text), cache, batch_size=cfg.encoder.batch_size),
                             np.float32)}


def peer_inputs(setting: Setting, cfg, trainer, batches: list[dict], protocol, threads: int) -> dict:
  ds = trainer.dataset
  eval_history, eval_mask = protocol.known.last_items(protocol.users, cfg.data.history_len)
  trained = np.bincount(ds.items[trainer.split.train], minlength=ds.num_items) > 0
  m, t = cfg.model, cfg.train
  peer_cfg = {
      "steps": setting.steps, "timing_warmup": setting.warmup, "total_steps": t.steps, "batch_size": t.batch_size,
      "seed": t.seed, "threads": threads, "embed_dim": m.embed_dim, "id_dim": m.id_dim, "feature_dim": m.feature_dim,
      "mlp_dims": list(m.mlp_dims), "temperature": m.temperature, "id_dropout": m.id_dropout,
      "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps, "end_lr_fraction": t.end_lr_fraction,
      "weight_decay": t.weight_decay, "clip_norm": t.clip_norm, "mode": cfg.encoder.mode,
      "encoder_lr_multiplier": cfg.encoder.lr_multiplier, "model_dir": "",
  }
  out = {"num_items": np.int64(ds.num_items), "num_users": np.int64(ds.num_users),
         "id_row": np.where(trained, np.cumsum(trained), 0).astype(np.int32), "num_id_rows": np.int64(trained.sum() + 1),
         "eval_users": protocol.users.astype(np.int32), "eval_history": eval_history, "eval_mask": eval_mask}
  for key in ("user", "item", "history", "history_mask", "log_q"):
    out["batch_" + key] = np.stack([b[key] for b in batches])
  for name, values in ds.item_features.items():
    out["item_feature_" + name], out["size_item_feature_" + name] = values, np.int64(ds.item_feature_sizes[name])
  for name, values in ds.user_features.items():
    out["user_feature_" + name], out["size_user_feature_" + name] = values, np.int64(ds.user_feature_sizes[name])
  if m.use_text:
    out.update(catalog_text(cfg, ds, tokens=cfg.encoder.mode in ("lora", "full")))
    if cfg.encoder.mode in ("lora", "full"):
      from jaxrec.text_encoder import default_model_dir
      peer_cfg["model_dir"] = cfg.encoder.path or default_model_dir()
  out["config"] = np.asarray(json.dumps(peer_cfg))
  return out


# ---------------------------------------------------------------------------------------------- runs


def jaxrec_calls(trainer, num_steps: int) -> list[dict]:
  """The host batches of the trainer's loop, one per jitted call (K stacked when K > 1, sharing one
  shape as the trainer's data pipeline stacks them)."""
  from jaxrec.data.pipeline import StackedBatches
  builder, k = trainer.batch_builder(), trainer.cfg.train.steps_per_call
  return [builder.map(c) if k == 1 else StackedBatches(builder, k).map(c) for c in range(num_steps // k)]


def run_jaxrec(trainer, calls: list[dict], warmup: int) -> dict:
  import jax
  k = trainer.cfg.train.steps_per_call  # the trainer's own loop runs K steps per jitted call
  step_fn = trainer.train_step if k == 1 else trainer.train_call
  state = trainer.init_state()
  # With a live encoder the step has one shape per bucket combination (BatchLayout.shape_of): each shape
  # the timed calls meet is compiled before the clock starts, on a throwaway copy of the state.
  compiled = {trainer.layout.shape_of(c) for c in calls[:warmup // k]}
  for call in calls[warmup // k:]:
    if trainer.layout.shape_of(call) not in compiled:
      compiled.add(trainer.layout.shape_of(call))
      jax.block_until_ready(step_fn(jax.tree.map(jax.numpy.copy, state), trainer.layout.put(call)))
  jax.block_until_ready(state)
  losses = []
  t0 = time.perf_counter()
  for c, call in enumerate(calls):
    if c * k == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, metrics = step_fn(state, trainer.layout.put(call))
    losses.extend([metrics["loss"]] if k == 1 else [metrics["loss"][i] for i in range(k)])
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - t0
  timed = len(calls) * k - warmup
  batch_size = trainer.cfg.train.batch_size
  return {"state": state, "examples_per_sec": timed * batch_size / elapsed, "ms_per_step": 1000 * elapsed / timed,
          "losses": [float(x) for x in losses], "shapes": sorted(compiled)}


def find_python(peer: str, explicit: str | None) -> tuple[str | None, str]:
  """The peer's interpreter, or None and why not."""
  env, defaults = PEER_PYTHON[peer]
  candidates = [explicit] if explicit else ([os.environ[env]] if os.environ.get(env) else list(defaults))
  for python in candidates:
    if not os.path.exists(python):
      continue
    check = subprocess.run([python, "-c", PEER_CHECK[peer]], capture_output=True, text=True, timeout=120)
    if check.returncode == 0:
      return python, ""
    return None, f"{python} cannot `{PEER_CHECK[peer]}`: {check.stderr.strip().splitlines()[-1:]}"
  return None, f"no {peer} interpreter (tried {', '.join(candidates)}; set ${env} or see benchmarks/README.md)"


def run_peer(peer: str, python: str, inputs: str, out_prefix: str, extra: tuple[str, ...] = (),
             huge_pages: bool | None = None) -> dict:
  """``huge_pages``: run the peer with glibc's THP tunable (True), without it (False), or as this
  process's environment has it (None)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  if huge_pages is not None:
    env = host_memory.with_huge_pages(env, huge_pages)
  proc = subprocess.run([python, PEERS[peer], "--data", inputs, "--out", out_prefix, *extra], capture_output=True,
                        text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{peer} peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(out_prefix + ".json") as f:
    summary = json.load(f)
  with np.load(out_prefix + ".npz") as f:
    summary["item_vectors"], summary["query_vectors"] = f["item_vectors"], f["query_vectors"]
  return summary


def allocator_label(huge_pages: bool | None) -> str:
  return {None: "", True: ", THP", False: ", no THP"}[huge_pages]


def quality(scores: dict) -> dict:
  keep = ("recall@10", "ndcg@10", "recall@50", "warm/recall@10", "cold/recall@10")
  return {k: scores[k] for k in keep if k in scores}


def benchmark(setting: Setting, args, tmp: str, log) -> dict:
  from jaxrec.trainer import Trainer
  workdir = os.path.join(tmp, setting.name)
  os.makedirs(workdir, exist_ok=True)
  cfg = make_config(setting, workdir, tuple(args.jaxrec_override))
  result = {"config": setting.name, "peer": setting.peer, "batch_size": cfg.train.batch_size, "steps": setting.steps,
            "timed_steps": setting.steps - setting.warmup, "overrides": list(setting.overrides)}
  try:
    trainer = Trainer(cfg)
  except Exception as e:  # e.g. an encoder mode this trainer does not implement yet
    result["jaxrec_error"] = f"{type(e).__name__}: {e}"
    log(f"[{setting.name}] jaxrec side not available: {result['jaxrec_error']}")
    return result
  builder = trainer.batch_builder()
  batches = [builder.map(b) for b in range(setting.steps)]
  calls = batches if trainer.cfg.train.steps_per_call == 1 else jaxrec_calls(trainer, setting.steps)
  protocol = evaluation_protocol(trainer)
  result["data"] = {"name": trainer.dataset.name, "users": trainer.dataset.num_users, "items": trainer.dataset.num_items,
                    "train_examples": len(trainer.split.train), "eval_users": len(protocol.users)}
  result["jaxrec_params"] = int(trainer.num_params)
  python, why = (None, "--peers excludes it") if setting.peer not in args.peers else find_python(
      setting.peer, args.tfrs_python if setting.peer == "tfrs" else args.torch_python)
  inputs = os.path.join(workdir, "peer_inputs.npz")
  if python:
    np.savez(inputs, **peer_inputs(setting, cfg, trainer, batches, protocol, args.peer_threads[-1]))
  else:
    result["peer_skipped"] = why
    log(f"[{setting.name}] {setting.peer} peer skipped: {why}")
  jax_runs, peer_runs = [], []
  peer_extra = ("--jit-compile",) if setting.peer == "tfrs" and args.tfrs_xla else ()
  if python:
    # On a shared 2-core machine a peer's OpenMP/Eigen pool can run far slower with 2 threads than
    # with 1 (spinning workers starved by the neighbours), so the peer gets its best thread count.
    probe_steps = min(setting.steps, setting.warmup + min(10, max(2, (setting.steps - setting.warmup) // 3)))
    # The PyTorch peer fine-tuning MiniLM also gets its best precision: torch.autocast's bf16
    # matmuls (oneDNN, AVX512-BF16) against jaxrec's bf16 encoder, float32 against float32.
    precisions = args.peer_precisions if (setting.peer, setting.name) == ("torch", "full") else ("float32",)
    def peer_setting(threads: int, precision: str) -> tuple[str, ...]:
      return ("--threads", str(threads)) + (("--autocast", precision) if precision != "float32" else ())

    # jaxrec runs with glibc's transparent-huge-page tunable (jaxrec.host_memory); the peer is
    # probed with and without it where it can matter, and keeps whichever is faster.
    allocators = (True, False) if host_memory.thp_tunable_applies() else (None,)
    probe = {}
    for threads in args.peer_threads:
      for precision in precisions:
        for huge_pages in allocators:
          name = f"probe_{threads}_{precision}_thp-{huge_pages}"  # thp-None: the environment as it is
          run = run_peer(setting.peer, python, inputs, os.path.join(workdir, name),
                         peer_extra + peer_setting(threads, precision) + ("--steps", str(probe_steps)), huge_pages)
          probe[(threads, precision, huge_pages)] = run["examples_per_sec"]
          log(f"[{setting.name}] {setting.peer} probe with {threads} thread(s), {precision}"
              f"{allocator_label(huge_pages)}: {run['examples_per_sec']:,.0f} examples/s")
    best_threads, best_precision, peer_huge_pages = max(probe, key=probe.get)
    result["peer_threads"], result["peer_precision"] = best_threads, best_precision
    result["peer_huge_pages"] = peer_huge_pages
    result["peer_probe"] = {f"{t} thr {p}{allocator_label(h)}": eps for (t, p, h), eps in probe.items()}
    peer_extra += peer_setting(best_threads, best_precision)
  for r in range(args.full_rounds if setting.name == "full" else args.rounds):
    run = run_jaxrec(trainer, calls, setting.warmup)
    jax_runs.append(run)
    log(f"[{setting.name}] round {r + 1}: jaxrec {run['examples_per_sec']:,.0f} examples/s ({run['ms_per_step']:.2f} ms/step; "
        f"step shapes {run['shapes']}: (distinct items, tokens) or, with a token stream, "
        "(distinct items, stream tokens, text length))")
    if python:
      peer = run_peer(setting.peer, python, inputs, os.path.join(workdir, f"peer_{r}"), peer_extra, peer_huge_pages)
      peer_runs.append(peer)
      log(f"[{setting.name}] round {r + 1}: {peer['peer']} {peer['examples_per_sec']:,.0f} examples/s "
          f"({peer['ms_per_step']:.2f} ms/step)")
  first = jax_runs[0]
  items, queries = jaxrec_vectors(trainer, first["state"], protocol)
  result["jaxrec"] = {"examples_per_sec": statistics.median(r["examples_per_sec"] for r in jax_runs),
                      "rounds": [r["examples_per_sec"] for r in jax_runs],
                      "ms_per_step": statistics.median(r["ms_per_step"] for r in jax_runs),
                      "final_loss": first["losses"][-1], "quality": quality(score(cfg, protocol, items, queries)),
                      "shapes": first["shapes"]}
  if peer_runs:
    p = peer_runs[0]
    autocast = ", bf16 autocast" if result["peer_precision"] == "bfloat16" else ""
    result["peer_result"] = {"name": f"{p['peer']} ({p['threads']} thr{autocast}{allocator_label(peer_huge_pages)})", "version": p["version"], "params": p["params"],
                             "examples_per_sec": statistics.median(r["examples_per_sec"] for r in peer_runs),
                             "rounds": [r["examples_per_sec"] for r in peer_runs],
                             "ms_per_step": statistics.median(r["ms_per_step"] for r in peer_runs),
                             "final_loss": p["losses"][-1],
                             "quality": quality(score(cfg, protocol, p["item_vectors"], p["query_vectors"]))}
    result["ratio"] = result["jaxrec"]["examples_per_sec"] / result["peer_result"]["examples_per_sec"]
  return result


def table(results: list[dict]) -> str:
  # Warm and cold R@10 apart: an untrained item is a random vector to the peers and the shared cold
  # row to jaxrec, so the overall R@10 of an ID-only model mixes learning with chance on cold items.
  lines = ["| config | batch | side | examples/s (median) | ms/step | ratio jaxrec/peer | final loss | R@10 | N@10 | "
           "warm R@10 | cold R@10 | params |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "jaxrec" not in r:
      lines.append(f"| {r['config']} | {r['batch_size']} | jaxrec | not available: {r.get('jaxrec_error', '')} | | | | | | | | |")
      continue
    sides = [("jaxrec", r["jaxrec"], r["jaxrec_params"])]
    if "peer_result" in r:
      sides.append((r["peer_result"]["name"], r["peer_result"], r["peer_result"]["params"]))
    for name, side, params in sides:
      ratio = f"**{r['ratio']:.2f}x**" if name == "jaxrec" and "ratio" in r else ""
      q = side["quality"]
      eps = side["examples_per_sec"]
      rate = f"{eps:,.0f}" if eps >= 100 else f"{eps:.2f}"
      lines.append(f"| {r['config']} | {r['batch_size']} | {name} | {rate} | {side['ms_per_step']:.2f} | {ratio} | "
                   f"{side['final_loss']:.4f} | {q.get('recall@10', math.nan):.4f} | {q.get('ndcg@10', math.nan):.4f} | "
                   f"{q.get('warm/recall@10', math.nan):.4f} | {q.get('cold/recall@10', math.nan):.4f} | {params:,} |")
    if "peer_skipped" in r:
      lines.append(f"| {r['config']} | {r['batch_size']} | {r['peer']} | skipped: {r['peer_skipped']} | | | | | | | | |")
  return "\n".join(lines)


def main(argv=None) -> int:
  if argv is None:  # run as a program: jaxrec's side gets huge pages as the jaxrec command does
    host_memory.restart_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="id,frozen,full", help="comma-separated: id, frozen, full")
  parser.add_argument("--peers", default="tfrs,torch", help="peers to run (others are skipped with a reason)")
  parser.add_argument("--data", choices=("synthetic", "ml100k"), default="synthetic")
  parser.add_argument("--ml100k-path", default=os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "ml-100k")))
  parser.add_argument("--steps", type=int, default=300, help="training steps per run (id, frozen)")
  parser.add_argument("--warmup", type=int, default=20, help="untimed steps at the start of every run")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--full-steps", type=int, default=8)
  parser.add_argument("--full-rounds", type=int, default=1)
  parser.add_argument("--full-batch-size", type=int, default=32)
  parser.add_argument("--full-history-len", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3, help="alternating jaxrec/peer rounds; the median is reported")
  parser.add_argument("--peer-threads", default=f"1,{os.cpu_count() or 1}",
                      help="intra-op thread counts to probe for each peer; the fastest is used")
  parser.add_argument("--full-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="jaxrec's encoder.dtype in `full` (bfloat16: bf16 matmul operands, float32 elsewhere)")
  parser.add_argument("--peer-precisions", default="float32,bfloat16",
                      help="precisions the PyTorch peer is probed at in `full` (bfloat16 = torch.autocast); the faster runs")
  parser.add_argument("--tfrs-python")
  parser.add_argument("--torch-python")
  parser.add_argument("--tfrs-xla", action="store_true", help="also compile TFRS's step with XLA (jit_compile=True)")
  parser.add_argument("--smoke", action="store_true", help="tiny world, a few steps, one round (for tests)")
  parser.add_argument("--json", help="write all results here")
  parser.add_argument("--jaxrec-override", action="append", default=[],
                      help="extra jaxrec key=value for every config, e.g. train.steps_per_call=10")
  parser.add_argument("--keep-dir", help="keep the peers' inputs and outputs here instead of a temporary directory")
  args = parser.parse_args(argv)
  if args.smoke:
    args.rounds, args.batch_size = 1, 32
    if args.peer_threads == parser.get_default("peer_threads"):
      args.peer_threads = "1"
    if args.configs == parser.get_default("configs"):
      args.configs = "id,frozen"
  args.peers = tuple(p for p in args.peers.split(",") if p)
  args.peer_threads = sorted({int(t) for t in args.peer_threads.split(",") if t})
  args.peer_precisions = tuple(p for p in args.peer_precisions.split(",") if p)
  if not args.peer_precisions or set(args.peer_precisions) - {"float32", "bfloat16"}:
    parser.error(f"--peer-precisions must name float32 and/or bfloat16; got {args.peer_precisions}")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  all_settings = settings(args)
  names = [c for c in args.configs.split(",") if c]
  unknown = sorted(set(names) - set(all_settings))
  if unknown:
    parser.error(f"unknown config(s) {unknown}; choose from {sorted(all_settings)}")

  def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

  import jax
  header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": os.getloadavg(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "devices": str(jax.devices()[:1]), "data": args.data,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  results = []
  with tempfile.TemporaryDirectory(prefix="jaxrec_bench_") as tmp:
    for name in names:
      results.append(benchmark(all_settings[name], args, args.keep_dir or tmp, log))
  header["load_after"] = os.getloadavg()
  print(f"{header['date']}; load average before {header['load_before'][0]:.2f}, after {header['load_after'][0]:.2f} "
        f"({header['cpus']} CPUs); data {args.data}; jaxrec's GLIBC_TUNABLES: {header['glibc_tunables'] or 'none'}")
  print(table(results))
  for r in results:
    if "peer_probe" in r:
      probes = ", ".join(f"{k} {v:,.2f}" if v < 100 else f"{k} {v:,.0f}" for k, v in r["peer_probe"].items())
      print(f"{r['config']}: {r['peer']} probe examples/s: {probes}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "results": results}, f, indent=1, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
