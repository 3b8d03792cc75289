"""Closed-form item-item baselines, EASE and ItemKNN, fitted on a split and scored by jaxrec's evaluator.

Dimensions: U users, N catalog items, B users per evaluation batch, K neighbours.

Both models are an item-item matrix W_NxN, and a user's scores are ``x_u @ W`` for the binary row
``x_u`` of the items the user already knows (the protocol's known items: train on the validation
split, train + valid on the test split, exactly what the towers' query sees):

  EASE (Steck, 2019)  W = argmin |X - XW|^2 + lam |W|^2 subject to diag(W) = 0, in closed form:
                      P = (X^T X + lam I)^-1,  W_ij = -P_ij / P_jj,  W_jj = 0.
  ItemKNN             RecBole's ItemKNN (``recbole.model.general_recommender.itemknn``,
                      ``ComputeSimilarity.compute_items_similarity``): cosine with shrinkage
                        s_ij = x_i . x_j / (|x_i| |x_j| + shrink + 1e-6),  s_jj = 0,
                      for item columns x_i of the binary train matrix; column j keeps its k largest
                      s_ij (item j's k nearest neighbours i, ties to the lower index here, where
                      RecBole's argpartition leaves them unspecified), every other entry 0.

Scoring goes through ``evaluation.full_ranking`` with the items' vectors ``W[:, j]`` and the users'
known-item rows as queries, so the users, the exclusion of known items, the metrics, the popularity
ranking and the warm/cold groups are the ones every trained run reports. An item the fit saw no
interaction of (a cold item, say) has an all-zero column: the model has nothing to score it by. It
is ranked after every item the fit saw, in index order, the way popularity ranks an item nobody
trained on, so a zero score cannot win a tie or beat EASE's negative scores by luck: cold recall is
0 by construction, and the tables say so.

The regulariser (EASE lam) or (k, shrink) is picked by validation Recall@10 from a small grid; the
test metrics are the chosen fit's. EASE is also refit with the chosen lam on train + valid (its
``refit/`` keys), the usual last step of a closed-form model.

Both need dense [N, N] matrices: a fit over ``max_bytes`` (default half the host's memory) is
refused with one line naming N and the bytes before anything is allocated.

  python -m jaxrec.baselines --kind ease --config configs/ml1m_text.py data.cold_item_fraction=0 \\
      workdir=runs/ease_ml1m [baseline.lams=100,1000 ...]

writes ``metrics.json`` (the keys a trained run writes, with ``steps`` 0, plus ``baseline/*``: the
chosen values, every grid point's validation Recall@10, seconds) and ``config.json`` to the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from jaxrec.config import Config, load_config, to_json

log = logging.getLogger("jaxrec.baselines")

KINDS = ("ease", "itemknn")
EASE_LAMS = (100.0, 250.0, 500.0, 1000.0, 2000.0)
KNN_KS = (50, 100, 200)
KNN_SHRINKS = (0.0, 10.0, 100.0)
PREFIX = "baseline."  # overrides with this prefix are the baseline's options, not config keys
SELECT_ON = "recall@10"
# Peak host bytes per item-item cell of a fit, ItemKNN's (EASE's is lower): the float64 Gram matrix
# kept for the grid, the similarities, their negation and int64 sort order (8 each), then float32
# (4 each): the best weights so far, the current ones, their [N, N+1] item vectors for the ranking
# kernel and the kernel's copy of those (device memory is host memory on a CPU).
BYTES_PER_CELL = 48
# The score of an item the fit has no interaction of: finite (the kernel never returns -inf) and
# large enough that float32 sums with any real score round to exactly this value.
UNSCORED = -1e30


class BaselineError(ValueError):
  """A baseline option is wrong, or the fit would not fit in memory."""


@dataclasses.dataclass(frozen=True)
class Options:
  """The grids each baseline picks from on the validation split, and the memory limit."""

  lams: tuple[float, ...] = EASE_LAMS
  ks: tuple[int, ...] = KNN_KS
  shrinks: tuple[float, ...] = KNN_SHRINKS
  max_bytes: int = 0  # 0 = half the host's physical memory
  refit: bool = True  # EASE: also fit on train + valid with the chosen lam (the refit/ keys)


def split_overrides(overrides: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(config overrides, ``baseline.*`` options) of one override list, each in its order."""
  config = tuple(o for o in overrides if not o.startswith(PREFIX))
  return config, tuple(o for o in overrides if o.startswith(PREFIX))


def parse_options(items: Sequence[str]) -> Options:
  """``baseline.lams=100,1000``, ``baseline.ks=..``, ``baseline.shrinks=..``, ``baseline.max_bytes=..``,
  ``baseline.refit=false``; later items win."""
  fields = {f.name: f for f in dataclasses.fields(Options)}
  values: dict[str, Any] = {}
  for item in items:
    key, eq, value = item.partition("=")
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if not eq or name not in fields:
      raise BaselineError(f"unknown baseline option {item!r}; options: "
                          + ", ".join(f"{PREFIX}{n}=..." for n in fields))
    try:
      if name == "lams" or name == "shrinks":
        values[name] = tuple(float(v) for v in value.split(","))
      elif name == "ks":
        values[name] = tuple(int(v) for v in value.split(","))
      elif name == "max_bytes":
        values[name] = int(float(value))
      else:
        if value.lower() not in ("true", "false"):
          raise ValueError(value)
        values[name] = value.lower() == "true"
    except ValueError:
      raise BaselineError(f"baseline option {item!r}: cannot parse {value!r}") from None
  return Options(**values)


def _option_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple):
    return ",".join(f"{v:g}" for v in value)
  return str(value)


def options_string(options: Options) -> str:
  """The options that shape the result as ``baseline.*`` overrides (what metrics.json records and the
  study compares; ``max_bytes`` only decides whether a fit runs)."""
  return " ".join(f"{PREFIX}{f.name}={_option_value(getattr(options, f.name))}" for f in dataclasses.fields(Options)
                  if f.name != "max_bytes")


# ---------------------------------------------------------------------------------------- fitting


def default_max_bytes() -> int:
  """Half the host's physical memory: room for the data, JAX and the rest of the process."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
  except (ValueError, OSError, AttributeError):
    return 8 << 30


def dense_bytes(num_users: int, num_items: int) -> int:
  """Peak host bytes of a fit: the [N, N] matrices plus the dense float32 [U, N] interactions."""
  return BYTES_PER_CELL * num_items * num_items + 4 * num_users * num_items


def _size(num_bytes: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6)):
    if num_bytes >= scale / 10:
      return f"{num_bytes / scale:.1f} {unit}"
  return f"{num_bytes:.0f} bytes"


def check_memory(kind: str, num_users: int, num_items: int, max_bytes: int = 0) -> None:
  """Refuses, in one line naming N and the bytes, a fit whose dense matrices exceed ``max_bytes``."""
  limit = max_bytes or default_max_bytes()
  need = dense_bytes(num_users, num_items)
  if need > limit:
    raise BaselineError(f"{kind} on N={num_items:,} items needs a dense {num_items:,} x {num_items:,} item-item "
                        f"matrix: about {_size(need)} of host memory ({BYTES_PER_CELL} bytes per cell + the "
                        f"{num_users:,} x {num_items:,} interactions), over the limit of {_size(limit)} "
                        f"({PREFIX}max_bytes); refusing")


def interactions(num_users: int, num_items: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """The binary float32 [U, N] matrix of the given (user, item) pairs (a repeated pair counts once)."""
  x_UxN = np.zeros((num_users, num_items), np.float32)
  x_UxN[users, items] = 1.0
  return x_UxN


def gram(x_UxN: np.ndarray) -> np.ndarray:
  """X^T X as float64 [N, N]: co-occurrence counts, the one product both models start from."""
  # float32 products of 0/1 entries are integer counts below 2^24: exact, at half float64's cost.
  x_UxN = np.asarray(x_UxN, np.float32)
  return (x_UxN.T @ x_UxN).astype(np.float64)


def ease(x_UxN: np.ndarray, lam: float, *, gram_NxN: np.ndarray | None = None) -> np.ndarray:
  """EASE's weights, float32 [N, N] with a zero diagonal: W = I - P diag(1 / diag(P)), P = (X^T X + lam I)^-1.
  ``gram_NxN``: X^T X when already computed (a grid over lam needs it once)."""
  g_NxN = gram(x_UxN) if gram_NxN is None else gram_NxN.copy()
  g_NxN[np.diag_indices_from(g_NxN)] += lam
  p_NxN = np.linalg.inv(g_NxN)
  del g_NxN
  w_NxN = p_NxN / -np.diag(p_NxN)[None, :]
  np.fill_diagonal(w_NxN, 0.0)
  return w_NxN.astype(np.float32)


def item_knn(x_UxN: np.ndarray, k: int, shrink: float, *, gram_NxN: np.ndarray | None = None) -> np.ndarray:
  """RecBole's ItemKNN similarity, float32 [N, N]: column j holds item j's k nearest items i,
  s_ij = x_i . x_j / (|x_i| |x_j| + shrink + 1e-6), diagonal 0, ties to the lower index."""
  sims_NxN = gram(x_UxN) if gram_NxN is None else gram_NxN.copy()
  norms_N = np.sqrt(np.diag(sims_NxN))
  sims_NxN /= norms_N[:, None] * norms_N[None, :] + shrink + 1e-6
  np.fill_diagonal(sims_NxN, 0.0)
  num_n = sims_NxN.shape[0]
  k = min(k, num_n)
  # Selected in float64 (float32 would merge near-equal similarities into ties), stored as float32.
  rows_KxN = np.argsort(-sims_NxN, axis=0, kind="stable")[:k]
  cols_KxN = np.broadcast_to(np.arange(num_n)[None, :], rows_KxN.shape)
  w_NxN = np.zeros((num_n, num_n), np.float32)
  w_NxN[rows_KxN, cols_KxN] = sims_NxN[rows_KxN, cols_KxN]
  return w_NxN


def fit(kind: str, x_UxN: np.ndarray, *, gram_NxN: np.ndarray | None = None, **params) -> np.ndarray:
  """``kind``'s weights with ``params`` (``lam``, or ``k`` and ``shrink``)."""
  if kind == "ease":
    return ease(x_UxN, params["lam"], gram_NxN=gram_NxN)
  if kind == "itemknn":
    return item_knn(x_UxN, params["k"], params["shrink"], gram_NxN=gram_NxN)
  raise BaselineError(f"unknown baseline kind {kind!r}; kinds: {', '.join(KINDS)}")


def grid(kind: str, options: Options) -> list[dict[str, float]]:
  if kind == "ease":
    return [{"lam": float(lam)} for lam in options.lams]
  if kind == "itemknn":
    return [{"k": int(k), "shrink": float(s)} for k in options.ks for s in options.shrinks]
  raise BaselineError(f"unknown baseline kind {kind!r}; kinds: {', '.join(KINDS)}")


def _name(params: dict[str, float]) -> str:
  return ",".join(f"{k}={v:g}" for k, v in params.items())


# ---------------------------------------------------------------------------------------- scoring


def score(protocol, weights_NxN: np.ndarray, fitted_N: np.ndarray, *, ks: Sequence[int], batch_size: int,
          mesh=None) -> dict[str, float]:
  """``evaluation.full_ranking`` of the scores ``x_u @ W`` (x_u: the user's known items), items the
  fit never saw (``fitted_N`` False) ranked after all others.

  The item vectors are W's columns plus one entry, 0 for a fitted item and ``UNSCORED`` for the
  rest, against a query entry of 1: the kernel's score is x_u . W[:, j] exactly for fitted items and
  ``UNSCORED`` for the others, which then tie and go in index order."""
  import jax.numpy as jnp

  from jaxrec import evaluation

  num_n = protocol.num_items
  if weights_NxN.shape != (num_n, num_n):
    raise ValueError(f"weights must be [{num_n}, {num_n}] for the protocol's catalog, got {weights_NxN.shape}")
  items_NxE = np.empty((num_n, num_n + 1), np.float32)
  items_NxE[:, :num_n] = weights_NxN.T
  items_NxE[:, num_n] = np.where(np.asarray(fitted_N, bool), 0.0, UNSCORED)

  def queries(users_B, known):
    rows_BxM = evaluation.known_rows(known, users_B)
    q_BxE = np.zeros((len(users_B), num_n + 1), np.float32)
    r, c = np.nonzero(rows_BxM >= 0)
    q_BxE[r, rows_BxM[r, c]] = 1.0
    q_BxE[:, num_n] = 1.0
    return jnp.asarray(q_BxE)

  return evaluation.full_ranking(protocol, items_NxE, queries, ks=tuple(ks), batch_size=batch_size, mesh=mesh)


def evaluate(cfg: Config, kind: str, options: Options = Options(), data=None) -> dict[str, Any]:
  """Fits ``kind`` on ``cfg.data``'s split, picks its parameters on the validation split and scores
  the pick on ``cfg.eval.split``: the metrics.json dict. ``data``: a loaded (dataset, split)."""
  from jaxrec import evaluation
  from jaxrec.data import sources

  if kind not in KINDS:
    raise BaselineError(f"unknown baseline kind {kind!r}; kinds: {', '.join(KINDS)}")
  start = time.perf_counter()
  dataset, split = data if data is not None else sources.load(cfg.data)
  num_u, num_n = dataset.num_users, dataset.num_items
  check_memory(kind, num_u, num_n, options.max_bytes)
  ks, bs, max_users = tuple(cfg.eval.ks), cfg.eval.batch_size, cfg.eval.max_users
  select = SELECT_ON if 10 in ks else f"recall@{ks[0]}"

  train_UxN = interactions(num_u, num_n, dataset.users[split.train], dataset.items[split.train])
  fitted_N = train_UxN.any(axis=0)
  valid = evaluation.Protocol.of(dataset, split, "valid", max_users)
  result: dict[str, Any] = {}
  best, best_value, best_weights = None, -1.0, None
  train_gram_NxN = gram(train_UxN)
  for params in grid(kind, options):
    t0 = time.perf_counter()
    weights_NxN = fit(kind, train_UxN, gram_NxN=train_gram_NxN, **params)
    value = score(valid, weights_NxN, fitted_N, ks=ks, batch_size=bs)[select]
    result[f"baseline/valid/{_name(params)}/{select}"] = value
    log.info("%s %s: valid %s %.4f (%.1f s)", kind, _name(params), select, value, time.perf_counter() - t0)
    if value > best_value:  # the first of equal values: the grid's order breaks ties
      best, best_value, best_weights = params, value, weights_NxN
    del weights_NxN

  test = evaluation.Protocol.of(dataset, split, cfg.eval.split, max_users)
  result.update(score(test, best_weights, fitted_N, ks=ks, batch_size=bs))
  log.info("%s %s: %s %s %.4f", kind, _name(best), cfg.eval.split, select, result[select])
  params_count = int(np.count_nonzero(best_weights))
  del best_weights, train_gram_NxN
  if kind == "ease" and options.refit and cfg.eval.split == "test":
    both = np.concatenate([split.train, split.valid])
    both_UxN = interactions(num_u, num_n, dataset.users[both], dataset.items[both])
    refit = score(test, ease(both_UxN, best["lam"]), both_UxN.any(axis=0), ks=ks, batch_size=bs)
    result.update({f"refit/{k}": v for k, v in refit.items() if not k.startswith("popularity/")})
    log.info("%s %s refit on train + valid: test %s %.4f", kind, _name(best), select, refit[select])

  from jaxrec.trainer import sources_describe
  result.update(sources_describe(dataset, split))
  result.update({f"baseline/{k}": v for k, v in best.items()})
  result.update({
      "steps": 0,
      "protocol": f"{split.protocol}; full ranking of {num_n} items, the user's known items excluded; "
                  f"evaluated on {cfg.eval.split}",
      "model/params": params_count,
      "baseline/kind": kind,
      "baseline/selected_on": f"valid {select}",
      "baseline/options": options_string(options),
      "baseline/seconds": time.perf_counter() - start,
  })
  if "refit/recall@10" in result:
    result["baseline/refit"] = "refit/ keys: the chosen lam fitted on train + valid, scored on test"
  return result


def run(cfg: Config, kind: str, options: Options = Options()) -> dict[str, Any]:
  """``evaluate``, then ``metrics.json`` and ``config.json`` in ``cfg.workdir``."""
  from jaxrec.files import write_atomically, write_json_atomically

  result = evaluate(cfg, kind, options)
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)
  write_json_atomically(os.path.join(workdir, "metrics.json"), result)
  write_atomically(os.path.join(workdir, "config.json"), to_json(cfg))
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxrec.baselines", description=__doc__.split("\n\n")[0])
  parser.add_argument("--kind", required=True, choices=KINDS)
  parser.add_argument("--config", required=True, help="config file of the dataset and split")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides and baseline.* options")
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  config_items, option_items = split_overrides(args.overrides)
  options = parse_options(option_items)
  cfg = load_config(args.config, config_items)
  result = run(cfg, args.kind, options)
  shown = {k: round(result[k], 4) for k in ("recall@10", "ndcg@10", "refit/recall@10", "refit/ndcg@10",
                                            "warm/recall@10", "cold/recall@10") if k in result}
  print(json.dumps({"kind": args.kind, **{k: v for k, v in result.items() if k.startswith("baseline/")
                                            and "/valid/" not in k}, **shown}))
  print(f"wrote {os.path.join(os.path.abspath(cfg.workdir), 'metrics.json')}")
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  sys.exit(main())
