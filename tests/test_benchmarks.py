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
