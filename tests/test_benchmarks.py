"""Smoke test of the training-throughput benchmark at tiny size.

jaxrec's side always runs and must report a finite throughput; each peer (TensorFlow Recommenders,
PyTorch) runs only where its interpreter is installed ($JAXREC_TFRS_PYTHON / $JAXREC_TORCH_PYTHON
or the default paths in benchmarks/train_throughput.py) and is skipped with the reason otherwise.
"""

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrec import host_memory

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"


@functools.cache
def _benchmark():
  """The benchmark script as a module, for its own helpers (it is not a package)."""
  spec = importlib.util.spec_from_file_location("_jaxrec_bench_train_throughput", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("train_throughput") / "results.json"
  # The benchmark runs on one device like a user's single-CPU run, not on the tests' 8 virtual ones.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| id |" in proc.stdout and "| frozen |" in proc.stdout, proc.stdout
  results = json.loads(out.read_text())
  # Run as a program, the benchmark restarts itself with huge pages where they apply, as jaxrec does.
  expected = host_memory.with_huge_pages(env) if host_memory.restart_wanted(env) else env
  assert results["header"]["glibc_tunables"] == expected.get("GLIBC_TUNABLES", ""), results["header"]
  return {r["config"]: r for r in results["results"]}


@pytest.mark.parametrize("config", ["id", "frozen"])
def test_jaxrec_side_reports_finite_throughput_and_quality(smoke, config):
  result = smoke[config]
  assert "jaxrec" in result, result.get("jaxrec_error")
  side = result["jaxrec"]
  assert math.isfinite(side["examples_per_sec"]) and side["examples_per_sec"] > 0
  assert math.isfinite(side["final_loss"])
  assert 0.0 <= side["quality"]["recall@10"] <= 1.0
  assert result["timed_steps"] > 0


@pytest.mark.parametrize("config,peer", [("id", "tfrs"), ("frozen", "torch")])
def test_peer_side_reports_finite_throughput_and_quality(smoke, config, peer):
  result = smoke[config]
  if "peer_skipped" in result:
    pytest.skip(f"{peer} peer not available: {result['peer_skipped']}")
  side = result["peer_result"]
  assert math.isfinite(side["examples_per_sec"]) and side["examples_per_sec"] > 0
  assert math.isfinite(side["final_loss"])
  assert 0.0 <= side["quality"]["recall@10"] <= 1.0
  assert math.isfinite(result["ratio"]) and result["ratio"] > 0


@pytest.mark.slow
def test_full_fine_tuning_smoke_runs_jaxrec_in_bf16_and_probes_the_peer_in_both_precisions(tmp_path):
  out = tmp_path / "full.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--configs", "full", "--json", str(out)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())["results"][0]
  assert "encoder.dtype=bfloat16" in result["overrides"]
  side = result["jaxrec"]
  assert math.isfinite(side["examples_per_sec"]) and side["examples_per_sec"] > 0
  assert math.isfinite(side["final_loss"]) and 0.0 <= side["quality"]["recall@10"] <= 1.0
  if "peer_skipped" in result:
    pytest.skip(f"torch peer not available: {result['peer_skipped']}")
  label = _benchmark().allocator_label
  allocators = [label(h) for h in ((True, False) if host_memory.thp_tunable_applies() else (None,))]
  assert set(result["peer_probe"]) == {f"1 thr {p}{a}" for p in ("float32", "bfloat16") for a in allocators}
  best = max(result["peer_probe"], key=result["peer_probe"].get)
  assert best == f"{result['peer_threads']} thr {result['peer_precision']}{label(result['peer_huge_pages'])}"
  assert ("bf16 autocast" in result["peer_result"]["name"]) == (result["peer_precision"] == "bfloat16")
  assert math.isfinite(result["peer_result"]["final_loss"]) and math.isfinite(result["ratio"])


@pytest.mark.slow
def test_gpu_suite_runs_every_cell_at_toy_size_on_any_backend(tmp_path):
  # The accelerator suite's own logic (cells, overrides, summary) at toy size on CPU with a tiny
  # BERT; its sizes and timings are for one GPU and are recorded in benchmarks/README.md.
  from fixtures import tiny_bert
  encoder = tiny_bert.write(tmp_path / "tiny_bert")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAXREC_SUITE_SIZE="tiny", JAXREC=f"{sys.executable} -m jaxrec.cli", PYTHON=sys.executable,
             JAXREC_ENCODER_PATH=str(encoder), JAXREC_CACHE=str(tmp_path / "cache"))
  proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "out")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "failed" not in proc.stdout, proc.stdout
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  for cell in ("frozen", "lora", "full"):
    assert summary[cell]["train/examples_per_sec"] > 0 and summary[cell]["train/step_tflops"] > 0, summary[cell]
    assert math.isfinite(summary[cell]["train/final_loss"])
  assert [r["recall_strict"] for r in summary["retrieval"]["results"]] == [1.0, 1.0]


@functools.cache
def _recbole_sasrec():
  path = REPO / "benchmarks" / "peers" / "recbole_sasrec.py"
  spec = importlib.util.spec_from_file_location("_jaxrec_bench_recbole_sasrec", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _read_examples(path):
  with open(path) as f:
    header = f.readline().rstrip("\n").split("\t")
    return header, [line.rstrip("\n").split("\t") for line in f]


def test_recbole_sasrec_export_writes_jaxrec_loo_histories_and_score_uses_jaxrec_protocol(tmp_path, monkeypatch):
  # The export and score phases run in jaxrec's venv; RecBole (the run phase) is not needed here.
  import argparse

  import numpy as np

  peer = _recbole_sasrec()
  data = REPO / "tests" / "fixtures" / "ml-100k"
  length = 3  # short, so histories are cut to their last L items
  args = argparse.Namespace(data="ml100k", data_path=str(data), dir=str(tmp_path / "rb"), max_len=length)
  peer.export(args)
  out = tmp_path / "rb" / "ml100k-jaxrec-loo"
  # Each user's interactions in time order (file row on ties), straight from u.data.
  raw = np.loadtxt(data / "u.data", dtype=np.int64)
  seqs = {}
  for row in np.lexsort((np.arange(len(raw)), raw[:, 3], raw[:, 0])):
    seqs.setdefault(str(raw[row, 0]), []).append((str(raw[row, 1]), float(raw[row, 3])))
  loo = {u: s for u, s in seqs.items() if len(s) >= 3}
  files = {part: _read_examples(out / f"ml100k-jaxrec-loo.{part}.inter") for part in ("train", "valid", "test")}
  for header, _ in files.values():
    assert header == ["user_id:token", "item_id_list:token_seq", "item_id:token", "timestamp:float"]
  train_seqs = {u: s[:-2] if u in loo else s for u, s in seqs.items()}
  expected = {
      "train": sorted((u, " ".join(i for i, _ in s[max(0, k - length):k]), s[k][0], str(s[k][1]))
                      for u, s in train_seqs.items() for k in range(1, len(s))),
      "valid": sorted((u, " ".join(i for i, _ in s[:-2][-length:]), s[-2][0], str(s[-2][1])) for u, s in loo.items()),
      "test": sorted((u, " ".join(i for i, _ in s[:-1][-length:]), s[-1][0], str(s[-1][1])) for u, s in loo.items()),
  }
  for part, (_, rows) in files.items():
    assert sorted(map(tuple, rows)) == expected[part], part
  summary = json.loads((out / "export.json").read_text())
  assert summary["files"]["test"]["examples"] == len(loo) and summary["jaxrec_split"]["test"] == len(loo)
  known = dict(line.rstrip("\n").split("\t") for line in open(out / "known.tsv"))
  assert known == {u: " ".join(i for i, _ in s[:-1]) for u, s in loo.items()}
  catalog = [line.strip() for line in open(out / "ml100k-jaxrec-loo.item")][1:]
  assert len(catalog) == summary["num_items"] == len(set(catalog))

  # score: a top-k list with each test item first and unknown items after it recalls everything
  # through jaxrec's own full ranking; popularity is jaxrec's evaluator's. Top 10, not 50: the
  # fixture's 60 items leave some users fewer than 50 unknown ones.
  monkeypatch.setattr(peer, "KS", (2, 5, 10))
  monkeypatch.setattr(peer, "TOPK", 10)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "recbole_sasrec.json").write_text(json.dumps({"test_result_recbole_known_items_ranked": {}}))
  with open(run_dir / "topk.tsv", "w") as f:
    for u, s in loo.items():
      rest = [i for i in catalog if i not in {j for j, _ in s}]
      f.write(f"{u}\t{' '.join([s[-1][0]] + rest[:peer.TOPK - 1])}\n")
  score_args = argparse.Namespace(data="ml100k", data_path=str(data), dir=str(tmp_path / "rb"), out=str(run_dir),
                                  model="SASRec", max_len=length)
  peer.score(score_args)
  result = json.loads((run_dir / "recbole_sasrec.json").read_text())
  mine = result["test_result_jaxrec_known_items_excluded"]
  assert mine["users"] == len(loo)
  assert mine["recall@2"] == mine["ndcg@2"] == mine["mrr@10"] == mine["hit@10"] == 1.0
  assert 0.0 <= result["test_result_jaxrec_popularity"]["recall@10"] < 1.0
  # A list holding an item the user already knows is refused: jaxrec never ranks known items.
  u, s = next(iter(loo.items()))
  lines = open(run_dir / "topk.tsv").read().splitlines()
  lines[0] = f"{u}\t{' '.join([s[0][0]] + lines[0].split(chr(9))[1].split()[1:])}"
  (run_dir / "topk.tsv").write_text("\n".join(lines) + "\n")
  with pytest.raises(SystemExit, match="already knows"):
    peer.score(score_args)


SEQ_SCRIPT = REPO / "benchmarks" / "seq_throughput.py"


def test_seq_throughput_smoke_counts_targets_and_reads_quality_files(tmp_path):
  # jaxrec's transformer side always runs; RecBole's SASRec only where its interpreter is installed.
  out = tmp_path / "seq.json"
  metrics = tmp_path / "jaxrec_run" / "metrics.json"
  metrics.parent.mkdir()
  metrics.write_text(json.dumps({"hit@10": 0.25, "ndcg@10": 0.125, "protocol": "temporal leave-one-out"}))
  (metrics.parent / "config.json").write_text(json.dumps({"train": {"batch_size": 128, "steps": 1500},
                                                          "model": {"query_dropout": 0.5}}))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(SEQ_SCRIPT), "--smoke", "--json", str(out), "--jaxrec-metrics", str(metrics),
                         "--recbole-result", str(tmp_path / "absent.json")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  side = result["jaxrec"]
  assert side["targets_per_sec"] > 0 and math.isfinite(side["final_loss"])
  # Every real history slot is a target: at most history_len (50) per window, at least one.
  assert 1.0 <= side["targets_per_window"] <= 50.0
  assert side["targets_per_sec"] == pytest.approx(side["windows_per_sec"] * side["targets_per_window"], rel=1e-9)
  assert result["quality"]["jaxrec"]["hit@10"] == 0.25 and result["quality"]["jaxrec"]["ndcg@10"] == 0.125
  assert "train.batch_size=128" in result["quality"]["jaxrec"]["settings"]
  assert "absent.json does not exist" in result["quality"]["recbole"]["missing"]
  assert "jaxrec quality: HR@10 0.2500" in proc.stdout and "recbole quality: MISSING" in proc.stdout
  if "recbole_skipped" in result:
    pytest.skip(f"RecBole peer not available (interpreter $JAXREC_RECBOLE_PYTHON or /tmp/recboleenv/bin/python): "
                f"{result['recbole_skipped']}")
  recbole = result["recbole"]
  assert recbole["instances_per_sec"] > 0 and recbole["batch_size"] == 64
  assert {k.split(" thr")[0] for k in recbole["probe"]} == {"1", "2"}
  assert recbole["instances_per_sec"] == pytest.approx(max(recbole["rounds"]))
  assert result["ratio"] == pytest.approx(side["targets_per_sec"] / recbole["instances_per_sec"])
  assert result["ratio_own_units"] == pytest.approx(side["windows_per_sec"] / recbole["instances_per_sec"])
  assert recbole["model_config"]["hidden_size"] == 64 and recbole["model_config"]["n_layers"] == 2
