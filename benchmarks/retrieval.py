"""Exact batched top-k: jaxrec.topk side by side with faiss IndexFlatIP and numpy, one process.

Dimensions: B queries, N corpus rows, d embedding dims, K top-k.

For every (B, N, d, k) the same L2-normalised random data goes to each method; each method is
warmed up (jaxrec's compile is not timed) and timed `--repeats` times. Reported per method:
queries/s, GFLOP/s (2*B*N*d / median time), fraction of this machine's float32 matmul peak
(measured at start-up in the same process: best median of a square 4096 sgemm in numpy and
JAX), ratio vs faiss (t_faiss / t_method), recall vs faiss (strict, and tie-tolerant: a slot
counts if its float64 score reaches faiss's k-th score - 1e-5), peak-RSS rise, and the 1-minute
load average (the machine is shared; compare ratios, not absolute numbers across runs).

  python benchmarks/retrieval.py --quick                 # the issue's two target cells + d=384
  python benchmarks/retrieval.py                          # full grid B{256,4096} N{1e5,1e6} d{64,384} k{10,100}
  python benchmarks/retrieval.py --B 4096 --N 1000000 --d 64 --k 100 --repeats 3 --json out.json
  git show HEAD:jaxrec/retrieval.py > /tmp/before.py    # kernel change: before/after, same run
  python benchmarks/retrieval.py --quick --before /tmp/before.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import numpy as np

QUICK = [(4096, 1_000_000, 64, 100), (256, 1_000_000, 64, 10), (4096, 100_000, 384, 10),
         (4096, 100_000, 384, 100)]


def unit_rows(rng, n, d):
  out = np.empty((n, d), np.float32)
  for s in range(0, n, 262144):
    x = rng.standard_normal((min(262144, n - s), d), dtype=np.float32)
    out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def reset_peak_rss():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def peak_rss_mib():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def timed(fn, repeats, max_run_s=60.0):
  """(run times, last output); the warm-up run (compile, index build) is not timed."""
  out = fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    if times[-1] > max_run_s:
      break
  return times, out


def measure_peak(repeats=5, n=4096):
  """Best median GFLOP/s of a square float32 matmul (numpy/OpenBLAS and JAX/XLA)."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  c = np.empty_like(a)
  flops = 2.0 * n ** 3
  out = {"numpy": flops / statistics.median(timed(lambda: np.matmul(a, b, out=c), repeats)[0]) / 1e9}
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  out["jax"] = flops / statistics.median(timed(lambda: mm(ja, jb).block_until_ready(), repeats)[0]) / 1e9
  out["peak"] = max(out["numpy"], out["jax"])
  return out


# -- methods: fn(q, c, k) -> (scores, indices) as numpy ------------------------------------------


def method_jaxrec(q, c, k, state):
  import jax
  from jaxrec.retrieval import topk
  if "jax" not in state:  # placed once, untimed: host->device copies are not the kernel's cost
    state["jax"] = (jax.device_put(q), jax.device_put(c))
  qj, cj = state["jax"]
  s, i = topk(qj, cj, k)
  return np.asarray(s), np.asarray(i)


def method_faiss(q, c, k, state):
  import faiss
  if "faiss" not in state:
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    state["faiss"] = index
  return state["faiss"].search(q, k)


def method_numpy(q, c, k, state, tile_bytes=256 << 20):
  """Blocked sgemm + argpartition + merge (score tile <= 256 MiB)."""
  num_b = q.shape[0]
  block = max(k, tile_bytes // (4 * num_b))
  best_s = np.full((num_b, k), -np.inf, np.float32)
  best_i = np.full((num_b, k), -1, np.int64)
  rows = np.arange(num_b)[:, None]
  for s0 in range(0, c.shape[0], block):
    s = q @ c[s0:s0 + block].T
    kk = min(k, s.shape[1])
    part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    cat_s = np.concatenate([best_s, s[rows, part]], axis=1)
    cat_i = np.concatenate([best_i, part + s0], axis=1)
    top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
    best_s, best_i = cat_s[rows, top], cat_i[rows, top]
  order = np.argsort(-best_s, axis=1, kind="stable")
  return best_s[rows, order], best_i[rows, order]


METHODS = {"faiss_flatip": method_faiss, "jaxrec_topk": method_jaxrec, "numpy_blocked": method_numpy}


def add_before(path):
  """Method `jaxrec_before`: `topk` of another copy of jaxrec/retrieval.py, timed in this run.

  Load moves absolute numbers by up to 2x between runs on the shared machine, so a kernel change
  is judged against the old kernel on the same data under the same load.
  """
  import importlib.util
  spec = importlib.util.spec_from_file_location("jaxrec_retrieval_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def method_before(q, c, k, state):
    import jax
    if "jax" not in state:
      state["jax"] = (jax.device_put(q), jax.device_put(c))
    s, i = module.topk(*state["jax"], k)
    return np.asarray(s), np.asarray(i)

  METHODS["jaxrec_before"] = method_before


def recall(q, c, ref_i, got_i, k, tol=1e-5):
  strict = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ref_i, got_i)])
  q64 = q.astype(np.float64)
  kth = np.einsum("bd,bd->b", q64, c[ref_i[:, -1]].astype(np.float64))
  got = np.einsum("bd,bkd->bk", q64, c[np.maximum(got_i, 0)].astype(np.float64))
  tolerant = np.mean((got >= kth[:, None] - tol) & (got_i >= 0))
  return float(strict), float(tolerant)


def run_cell(num_b, num_n, d, k, repeats, methods, peak, seed=0):
  rng = np.random.default_rng(seed)
  c = unit_rows(rng, num_n, d)
  q = unit_rows(rng, num_b, d)
  flops = 2.0 * num_b * num_n * d
  results, state = [], {}
  ref_i = None
  for name in methods:
    fn = METHODS[name]
    reset_peak_rss()
    base = peak_rss_mib()
    times, (_, idx) = timed(lambda: fn(q, c, k, state), repeats)
    rss = peak_rss_mib() - base
    if name == "faiss_flatip":
      ref_i = idx
    t = statistics.median(times)
    r = dict(method=name, B=num_b, N=num_n, d=d, k=k, time_s=t, times=times, qps=num_b / t,
             gflops=flops / t / 1e9, frac_peak=flops / t / 1e9 / peak, rss_rise_mib=rss,
             load1=os.getloadavg()[0], idx=idx)
    results.append(r)
    state.pop("jax", None)
  faiss_t = next((r["time_s"] for r in results if r["method"] == "faiss_flatip"), None)
  for r in results:
    r["vs_faiss"] = faiss_t / r["time_s"] if faiss_t else float("nan")
    r["recall_strict"], r["recall_tol"] = (recall(q, c, ref_i, r.pop("idx"), k) if ref_i is not None
                                           else (float("nan"),) * 2)
  return results


def fmt_row(r):
  return (f"| {r['k']} | {r['B']} | {r['N']:,} | {r['d']} | {r['method']} | {r['qps']:,.0f} | "
          f"{r['gflops']:.1f} | {100 * r['frac_peak']:.0f}% | {r['vs_faiss']:.2f}x | "
          f"{r['recall_strict']:.4f} / {r['recall_tol']:.4f} | {r['rss_rise_mib']:.0f} | "
          f"{r['load1']:.1f} | {len(r['times'])} |")


HEADER = ("| k | B | N | d | method | qps | GFLOP/s | % of peak | vs faiss | recall strict / tol | "
          "+RSS MiB | load | n |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="only " + ", ".join(map(str, QUICK)))
  ap.add_argument("--B", type=int, nargs="+", default=[256, 4096])
  ap.add_argument("--N", type=int, nargs="+", default=[100_000, 1_000_000])
  ap.add_argument("--d", type=int, nargs="+", default=[64, 384])
  ap.add_argument("--k", type=int, nargs="+", default=[10, 100])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  ap.add_argument("--json", default=None)
  ap.add_argument("--before", default=None, metavar="PATH",
                  help="also time topk from this copy of jaxrec/retrieval.py (jaxrec_before)")
  args = ap.parse_args(argv)
  if args.before:
    add_before(args.before)
    if "jaxrec_before" not in args.methods:
      args.methods.insert(args.methods.index("jaxrec_topk") if "jaxrec_topk" in args.methods
                          else len(args.methods), "jaxrec_before")
  cells = QUICK if args.quick else list(itertools.product(args.B, args.N, args.d, args.k))
  print(f"# load at start: {os.getloadavg()}", flush=True)
  peak = measure_peak()
  print(f"# measured f32 matmul peak: numpy {peak['numpy']:.1f}, jax {peak['jax']:.1f} GFLOP/s "
        f"-> peak {peak['peak']:.1f}; load {os.getloadavg()[0]:.1f}", flush=True)
  print(HEADER, flush=True)
  rows = []
  for (num_b, num_n, d, k) in cells:
    for r in run_cell(num_b, num_n, d, k, args.repeats, args.methods, peak["peak"]):
      rows.append(r)
      print(fmt_row(r), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak": peak, "argv": sys.argv, "results": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
