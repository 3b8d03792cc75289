"""Training throughput of jaxrec's transformer query tower against RecBole's SASRec, in one run.

Same data and model size on both sides: ML-100K's temporal leave-one-out split (jaxrec's, which
RecBole reads through benchmarks/peers/recbole_sasrec.py's export), ID-only items, hidden 64, 2
layers, 2 heads, max length 50, dropout 0.5 (RecBole's SASRec defaults). What differs, by design of
each library: RecBole's feed-forward is 256 wide, jaxrec's 64 (= model.embed_dim); RecBole's loss is
a softmax over the whole catalog, jaxrec's over the batch's distinct items (logQ corrected), which
at batch 128 x 51 items is nearly all of ML-100K's 1,682; jaxrec's item tower adds its fusion MLP.
The parameter counts are printed.

Unit of work: a target, one next-item prediction term of the loss (a (prefix, next item) pair).
RecBole's SASRec trains one per instance (each pre-augmented prefix's last position); jaxrec's
transformer trains every real slot of each window (model.query=transformer, SASRec's all-positions
objective), counted from each batch's ``history_mask``. Both sides also print their own unit:
RecBole's instances/s and jaxrec's windows/s (= its examples/s).

Timing: batches are built before the clock starts on both sides (jaxrec's batch builder; the first
batches of RecBole's dataloader), the first ``--warmup`` steps are excluded, the rest timed end to
end (jaxrec: host-to-device copy and the jitted step; RecBole: Trainer._train_epoch's body, forward,
backward and Adam). RecBole runs at each ``--threads`` count (torch.set_num_threads) and its best is
compared. Quality is not trained here: it is read from result files (``--recbole-result``, RecBole's
run phase + score; ``--jaxrec-metrics``, a `jaxrec train` metrics.json on the same split) and
printed beside the speeds with its source, or named missing.

    .venv/bin/python benchmarks/seq_throughput.py --json /tmp/seq_throughput.json \
        --jaxrec-metrics runs/.../metrics.json
    .venv/bin/python benchmarks/seq_throughput.py --smoke     # tests/fixtures/ml-100k, seconds

RecBole's interpreter: ``--recbole-python`` / ``$JAXREC_RECBOLE_PYTHON`` (default
/tmp/recboleenv/bin/python; setup in benchmarks/README.md); a missing one skips RecBole's side.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from jaxrec import host_memory

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
SPEED = os.path.join(_HERE, "peers", "recbole_sasrec_speed.py")
DEFAULT_RECBOLE_PYTHON = "/tmp/recboleenv/bin/python"
# The SASRec-equivalent: configs/ml100k_text.py's data on the leave-one-out split, ID-only items,
# the transformer at RecBole's SASRec defaults (hidden 64, 2 layers, 2 heads, 50 items, dropout 0.5).
JAXREC_OVERRIDES = ("data.split=loo", "data.cold_item_fraction=0", "model.use_text=false", "encoder.mode=none",
                    "model.use_item_features=false", "model.query=transformer", "data.history_len=50",
                    "model.query_layers=2", "model.query_heads=2", "model.embed_dim=64", "model.query_dropout=0.5",
                    "model.use_user_ids=false", "mesh.num_devices=1", "train.progress=false")
# Keys of a quality run's config.json printed beside its metrics, so a run with other settings shows.
QUALITY_KEYS = (("train", "batch_size"), ("train", "steps"), ("model", "query_dropout"), ("data", "history_len"),
                ("train", "negatives"))


def _module(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def find_python(explicit: str | None) -> tuple[str | None, str]:
  """RecBole's interpreter, or None and why not."""
  python = explicit or os.environ.get("JAXREC_RECBOLE_PYTHON") or DEFAULT_RECBOLE_PYTHON
  if not os.path.exists(python):
    return None, f"no RecBole interpreter at {python} (set --recbole-python or $JAXREC_RECBOLE_PYTHON; see benchmarks/README.md)"
  check = subprocess.run([python, "-c", "import recbole, torch"], capture_output=True, text=True, timeout=300)
  if check.returncode != 0:
    return None, f"{python} cannot `import recbole, torch`: {check.stderr.strip().splitlines()[-1:]}"
  return python, ""


# ---------------------------------------------------------------------------------------------- jaxrec


def jaxrec_trainer(args, workdir: str):
  from jaxrec.config import load_config
  from jaxrec.trainer import Trainer
  overrides = list(JAXREC_OVERRIDES) + [f"data.path={args.data_path}", f"workdir={workdir}",
                                        f"train.batch_size={args.batch_size}",
                                        f"train.steps_per_call={args.steps_per_call}"] + list(args.jaxrec_override)
  cfg = load_config(os.path.join(_REPO, "configs", "ml100k_text.py"), overrides)
  return Trainer(cfg), overrides


def run_jaxrec(trainer, calls: list[dict], warmup: int, bench) -> dict:
  """train_throughput.run_jaxrec's timing, plus targets: the real history slots of the timed batches."""
  k = trainer.cfg.train.steps_per_call
  run = bench.run_jaxrec(trainer, calls, warmup)
  timed_calls = calls[warmup // k:]
  targets = int(sum(np.asarray(c["history_mask"]).sum() for c in timed_calls))
  windows = len(timed_calls) * k * trainer.cfg.train.batch_size
  elapsed = run["ms_per_step"] * len(timed_calls) * k / 1000
  return {"targets_per_sec": targets / elapsed, "windows_per_sec": windows / elapsed, "ms_per_step": run["ms_per_step"],
          "targets_per_window": targets / windows, "final_loss": run["losses"][-1]}


# ---------------------------------------------------------------------------------------------- RecBole


def run_recbole(python: str, args, out_prefix: str, huge_pages: bool | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  if huge_pages is not None:
    env = host_memory.with_huge_pages(env, huge_pages)
  cmd = [python, SPEED, "--data", "ml100k", "--dir", args.recbole_dir, "--out", out_prefix, "--max-len", "50",
         "--batch-size", str(args.recbole_batch_size), "--batches", str(args.recbole_batches),
         "--warmup", str(args.recbole_warmup), "--threads", args.threads]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"RecBole speed run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(out_prefix + ".json") as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------- quality


def recbole_quality(path: str) -> dict:
  if not os.path.exists(path):
    return {"missing": f"{path} does not exist (RecBole's run phase not finished, or not run)"}
  with open(path) as f:
    result = json.load(f)
  scored = result.get("test_result_jaxrec_known_items_excluded")
  if not scored:
    return {"missing": f"{path} has no jaxrec-scored test result (run recbole_sasrec.py score)"}
  return {"source": path, "hit@10": scored["hit@10"], "ndcg@10": scored["ndcg@10"],
          "settings": f"RecBole early stopping: {result.get('epochs_trained')} epochs, best {result.get('best_valid_epoch')}, "
                      f"stopped by {result.get('stopped_by')}"}


def jaxrec_quality(path: str | None) -> dict:
  if not path:
    return {"missing": "no --jaxrec-metrics given"}
  if not os.path.exists(path):
    return {"missing": f"{path} does not exist"}
  with open(path) as f:
    metrics = json.load(f)
  if "hit@10" not in metrics:
    return {"missing": f"{path} has no hit@10"}
  out = {"source": path, "hit@10": metrics["hit@10"], "ndcg@10": metrics.get("ndcg@10", math.nan),
         "protocol": metrics.get("protocol", "")}
  config_path = os.path.join(os.path.dirname(path), "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      cfg = json.load(f)
    out["settings"] = ", ".join(f"{a}.{b}={cfg.get(a, {}).get(b)}" for a, b in QUALITY_KEYS) + \
        f", eval.split={cfg.get('eval', {}).get('split')}"
  return out


# ---------------------------------------------------------------------------------------------- report


def table(result: dict) -> str:
  j, r = result["jaxrec"], result.get("recbole")
  lines = ["| side | batch | targets/s (median) | own unit/s | ms/step | targets/step | ratio (targets/s) | params | HR@10 | NDCG@10 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  q = result["quality"]

  def quality_cells(side: str) -> str:
    s = q[side]
    return "missing | missing" if "missing" in s else f"{s['hit@10']:.4f} | {s['ndcg@10']:.4f}"

  lines.append(f"| jaxrec transformer ({j['device']}) | {j['batch_size']} windows | {j['targets_per_sec']:,.0f} | "
               f"{j['windows_per_sec']:,.0f} windows/s | {j['ms_per_step']:.1f} | {j['targets_per_step']:,.0f} | "
               f"{'**%.2fx**' % result['ratio'] if 'ratio' in result else ''} | {j['params']:,} | {quality_cells('jaxrec')} |")
  if r:
    lines.append(f"| RecBole SASRec ({r['best_threads']} thr{r['allocator']}) | {r['batch_size']} instances | "
                 f"{r['instances_per_sec']:,.0f} | {r['instances_per_sec']:,.0f} instances/s | {r['ms_per_step']:.1f} | "
                 f"{r['batch_size']:,} | 1.00x | {r['params']:,} | {quality_cells('recbole')} |")
  else:
    lines.append(f"| RecBole SASRec | | skipped: {result['recbole_skipped']} | | | | | | | |")
  return "\n".join(lines)


def main(argv=None) -> int:
  if argv is None:  # run as a program: jaxrec's side gets huge pages as the jaxrec command does
    host_memory.restart_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-path", default=os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "ml-100k")))
  parser.add_argument("--batch-size", type=int, default=128, help="jaxrec's windows per step (configs/study/sequences.py's)")
  parser.add_argument("--steps", type=int, default=60, help="jaxrec steps per round, warm-up included")
  parser.add_argument("--warmup", type=int, default=10, help="jaxrec's untimed steps (a multiple of --steps-per-call)")
  parser.add_argument("--steps-per-call", type=int, default=10, help="train.steps_per_call (the sequence study's)")
  parser.add_argument("--recbole-batch-size", type=int, default=2048, help="RecBole's train_batch_size (its default)")
  parser.add_argument("--recbole-batches", type=int, default=10, help="RecBole's timed steps per thread count")
  parser.add_argument("--recbole-warmup", type=int, default=2)
  parser.add_argument("--threads", default="1,2", help="torch thread counts RecBole is timed at; its best is compared")
  parser.add_argument("--rounds", type=int, default=1, help="alternating jaxrec/RecBole rounds; medians reported")
  parser.add_argument("--recbole-python")
  parser.add_argument("--recbole-dir", help="recbole_sasrec.py export's --dir (default: a fresh export in a temp dir)")
  parser.add_argument("--recbole-result", default="/tmp/recbole_sasrec_ml100k/recbole_sasrec.json",
                      help="RecBole's quality: recbole_sasrec.py run + score's result file")
  parser.add_argument("--jaxrec-metrics", help="jaxrec's quality: a `jaxrec train` metrics.json with these settings")
  parser.add_argument("--jaxrec-override", action="append", default=[], help="extra jaxrec key=value")
  parser.add_argument("--smoke", action="store_true", help="tests/fixtures/ml-100k, a few steps (for tests)")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  if args.smoke:
    args.data_path = os.path.join(_REPO, "tests", "fixtures", "ml-100k")
    args.batch_size, args.steps, args.warmup, args.steps_per_call = 16, 4, 2, 1
    args.recbole_batch_size, args.recbole_batches, args.recbole_warmup = 64, 2, 1
  if args.steps <= args.warmup or args.warmup % args.steps_per_call or args.steps % args.steps_per_call:
    parser.error("--steps must exceed --warmup, and both be multiples of --steps-per-call")

  def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

  import jax
  bench = _module("_jaxrec_bench_train_throughput", os.path.join(_HERE, "train_throughput.py"))
  peer = _module("_jaxrec_bench_recbole_sasrec", os.path.join(_HERE, "peers", "recbole_sasrec.py"))
  header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": os.getloadavg(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})", "data_path": args.data_path,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  with tempfile.TemporaryDirectory(prefix="jaxrec_seq_bench_") as tmp:
    trainer, overrides = jaxrec_trainer(args, os.path.join(tmp, "jaxrec"))
    calls = bench.jaxrec_calls(trainer, args.steps)
    python, why = find_python(args.recbole_python)
    if python and not args.recbole_dir:  # RecBole reads jaxrec's own split, exported as its sequence files
      args.recbole_dir = os.path.join(tmp, "recbole")
      with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull  # export prints its summary; keep this run's output the table
        try:
          peer.export(argparse.Namespace(data="ml100k", data_path=args.data_path, dir=args.recbole_dir, max_len=50))
        finally:
          sys.stdout = stdout
    allocators = (True, False) if host_memory.thp_tunable_applies() else (None,)
    jax_runs, recbole_runs = [], []
    for r in range(args.rounds):
      run = run_jaxrec(trainer, calls, args.warmup, bench)
      jax_runs.append(run)
      log(f"round {r + 1}: jaxrec {run['targets_per_sec']:,.0f} targets/s ({run['windows_per_sec']:,.0f} windows/s, "
          f"{run['ms_per_step']:.1f} ms/step)")
      if python:
        # RecBole with and without glibc's THP tunable where it applies (jaxrec runs with it); its best kept.
        for huge_pages in allocators:
          summary = run_recbole(python, args, os.path.join(tmp, f"recbole_{r}_thp-{huge_pages}"), huge_pages)
          for t, tr in summary["runs"].items():
            log(f"round {r + 1}: RecBole {t} thread(s){bench.allocator_label(huge_pages)}: "
                f"{tr['instances_per_sec']:,.0f} instances/s ({tr['ms_per_step']:.1f} ms/step)")
          summary["allocator"] = bench.allocator_label(huge_pages)
          recbole_runs.append(summary)
  header["load_after"] = os.getloadavg()
  k = trainer.cfg.train.steps_per_call
  jaxrec_side = {"device": jax.devices()[0].platform,
                 "batch_size": args.batch_size, "steps_per_call": k, "timed_steps": args.steps - args.warmup,
                 "targets_per_sec": statistics.median(x["targets_per_sec"] for x in jax_runs),
                 "windows_per_sec": statistics.median(x["windows_per_sec"] for x in jax_runs),
                 "ms_per_step": statistics.median(x["ms_per_step"] for x in jax_runs),
                 "targets_per_step": args.batch_size * jax_runs[0]["targets_per_window"],
                 "targets_per_window": jax_runs[0]["targets_per_window"], "final_loss": jax_runs[0]["final_loss"],
                 "rounds": [x["targets_per_sec"] for x in jax_runs], "params": int(trainer.num_params),
                 "overrides": overrides}
  result = {"header": header, "jaxrec": jaxrec_side,
            "quality": {"jaxrec": jaxrec_quality(args.jaxrec_metrics), "recbole": recbole_quality(args.recbole_result)}}
  if recbole_runs:
    # Per round, RecBole's best thread count and allocator; the median over rounds is compared.
    rounds = [max(runs, key=lambda s: s["instances_per_sec"]) for runs in
              (recbole_runs[i:i + len(allocators)] for i in range(0, len(recbole_runs), len(allocators)))]
    best = max(rounds, key=lambda s: s["instances_per_sec"])
    probe = {f"{t} thr{s['allocator']}": tr["instances_per_sec"] for s in recbole_runs[-len(allocators):]
             for t, tr in s["runs"].items()}
    result["recbole"] = {"instances_per_sec": statistics.median(s["instances_per_sec"] for s in rounds),
                         "ms_per_step": statistics.median(s["ms_per_step"] for s in rounds),
                         "best_threads": best["best_threads"], "allocator": best["allocator"],
                         "batch_size": best["batch_size"], "params": best["params"], "probe": probe,
                         "history_len_mean": best["history_len_mean"], "model_config": best["model_config"],
                         "versions": best["versions"], "rounds": [s["instances_per_sec"] for s in rounds]}
    result["ratio"] = jaxrec_side["targets_per_sec"] / result["recbole"]["instances_per_sec"]
    result["ratio_own_units"] = jaxrec_side["windows_per_sec"] / result["recbole"]["instances_per_sec"]
  else:
    result["recbole_skipped"] = why
    log(f"RecBole skipped: {why}")
  print(f"{header['date']}; load average before {header['load_before'][0]:.2f}, after {header['load_after'][0]:.2f} "
        f"({header['cpus']} CPUs; numbers on a loaded machine are indicative only); jaxrec on {header['device']}")
  print("unit: a target = one next-item prediction term of the loss ((prefix, next item) pair); RecBole: one per "
        "instance; jaxrec: every real slot of a window")
  print(table(result))
  if "recbole" in result:
    print(f"ratio in each side's own unit (jaxrec windows/s over RecBole instances/s): {result['ratio_own_units']:.2f}x; "
          f"a jaxrec window holds {jaxrec_side['targets_per_window']:.1f} targets on average, a RecBole instance 1 "
          f"(its history {result['recbole']['history_len_mean']:.1f} items on average)")
    print("RecBole probe instances/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["recbole"]["probe"].items()))
  for side in ("jaxrec", "recbole"):
    q = result["quality"][side]
    print(f"{side} quality: " + (f"MISSING: {q['missing']}" if "missing" in q else
                                 f"HR@10 {q['hit@10']:.4f}, NDCG@10 {q['ndcg@10']:.4f} from {q['source']}"
                                 + (f" ({q['settings']})" if q.get("settings") else "")))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
