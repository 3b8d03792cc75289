"""jaxrec.topk on one accelerator (GPU or TPU): TFLOP/s and fraction of the measured matmul peak.

Dimensions: B queries, N corpus rows, d embedding dims, K top-k.

One short script (about 2-4 minutes on one H100/H200 including compiles), run where an
accelerator is the default JAX backend (`pip install "jax[cuda12]"`):

  python benchmarks/retrieval_gpu.py                 # float32 and bfloat16, three shapes
  python benchmarks/retrieval_gpu.py --json gpu.json --repeats 10

Peak = median of a square 8192 matmul in the same dtype (float32 at HIGHEST precision, bf16
with float32 accumulation). Exactness is checked for the first 256 queries against a brute
force `lax.top_k(q @ c.T)` on the same device (strict index agreement and the share of slots
whose score reaches the reference k-th score).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

CELLS = [(4096, 1_000_000, 128, 100), (4096, 1_000_000, 384, 10), (16384, 1_000_000, 128, 100)]


def timed(fn, repeats):
  out = fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main(argv=None):
  import jax
  import jax.numpy as jnp
  from jaxrec.retrieval import topk

  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--json", default=None)
  ap.add_argument("--tiny", action="store_true", help="toy sizes on any backend (the test suite's smoke run)")
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  print(f"# backend {backend}: {jax.devices()[0].device_kind}", flush=True)
  if backend == "cpu" and not args.tiny:
    print("no accelerator: use benchmarks/retrieval.py on CPU")
    return 1
  cells, square = ([(64, 5000, 32, 10)], 256) if args.tiny else (CELLS, 8192)

  hp = jax.lax.Precision.HIGHEST
  peaks = {}
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jax.random.normal(jax.random.key(0), (square, square), dt)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=hp, preferred_element_type=jnp.float32))
    t, _ = timed(lambda: mm(a, a).block_until_ready(), args.repeats)
    peaks[name] = 2 * square ** 3 / t / 1e12
    print(f"# {name} matmul peak: {peaks[name]:.1f} TFLOP/s", flush=True)

  brute = jax.jit(lambda q, c, k: jax.lax.top_k(
      jnp.matmul(q, c.T, precision=hp, preferred_element_type=jnp.float32), k), static_argnums=2)
  rows = []
  print("| dtype | B | N | d | k | qps | TFLOP/s | % of peak | recall strict / tol | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for (num_b, num_n, d, k) in cells:
    kq, kc = jax.random.split(jax.random.key(num_b + d + k))
    q = jax.random.normal(kq, (num_b, d), jnp.float32)
    c = jax.random.normal(kc, (num_n, d), jnp.float32)
    q = q / jnp.linalg.norm(q, axis=1, keepdims=True)
    c = c / jnp.linalg.norm(c, axis=1, keepdims=True)
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
      qd, cd = q.astype(dt), c.astype(dt)
      t0 = time.perf_counter()
      jax.block_until_ready(topk(qd, cd, k))
      compile_s = time.perf_counter() - t0
      t, (s, i) = timed(lambda: jax.block_until_ready(topk(qd, cd, k)), args.repeats)
      ref_s, ref_i = brute(qd[:256], cd, k)
      strict = float(np.mean([len(np.intersect1d(a, b)) / k
                              for a, b in zip(np.asarray(i[:256]), np.asarray(ref_i))]))
      tol = float(np.mean(np.asarray(s[:256]) >= np.asarray(ref_s[:, -1:]) - 1e-6))
      tflops = 2 * num_b * num_n * d / t / 1e12
      r = dict(dtype=name, B=num_b, N=num_n, d=d, k=k, time_s=t, qps=num_b / t, tflops=tflops,
               frac_peak=tflops / peaks[name], recall_strict=strict, recall_tol=tol,
               compile_s=compile_s)
      rows.append(r)
      print(f"| {name} | {num_b} | {num_n:,} | {d} | {k} | {r['qps']:,.0f} | {tflops:.1f} | "
            f"{100 * r['frac_peak']:.0f}% | {strict:.4f} / {tol:.4f} | {compile_s:.1f} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": backend, "device": jax.devices()[0].device_kind, "peaks": peaks,
                 "results": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
