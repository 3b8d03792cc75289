"""The full-ranking evaluation protocol over any query and item vectors.

Dimensions: U evaluated users, B users per batch, N catalog items, E embedding dims, K top-k,
M known items per user, S item shards.

Every user with a held-out item ranks the whole catalog; the items the user already knows are
excluded, and the top max(ks) are scored against the held-out items (``jaxrec.metrics``),
overall and, when the split has cold items, restricted to warm and to cold ground truth. The
same ranking by training popularity (most-interacted items first, lower index on ties) is
reported under ``popularity/``: the baseline any model must beat on this split.

Nothing here knows the model: ``full_ranking`` takes item vectors and either a function that
makes query vectors for a batch of users or the query vectors themselves (a peer library's,
say), so jaxrec's own runs and the benchmarks' peers are scored by one piece of code.

With a mesh, the item vectors are split over the mesh axes the ``items`` rule names (rows padded
to a multiple of the shard count, the padding never returned), placed once per evaluation, and
every batch runs the sharded top-k kernel; its results equal the replicated kernel's exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec import metrics, sharding
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.pipeline import Sequences
from jaxrec.retrieval import topk

# Above this many [B, N] mask cells an exclusion mask costs more memory than the id lists cost
# the kernel; below it a dense mask is the cheapest exclusion (long id lists slow the kernel
# more than a mask of a few thousand items).
DENSE_MASK_CELLS = 1 << 26


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Who is evaluated on which held-out items, and what each user already knows."""

  users: np.ndarray  # int32 [U] evaluated users, ascending (the max_users cut applied)
  known: Sequences  # the interactions each user already has (excluded from their ranking)
  truth_users: np.ndarray  # int32 [T] held-out (user, item) pairs, sorted by (user, item)
  truth_items: np.ndarray  # int32 [T]
  num_items: int
  train_counts_N: np.ndarray  # int64 [N] training interactions per item (the popularity ranking)
  groups: dict[str, np.ndarray]  # {"warm": bool [N], "cold": bool [N]} when the split has cold items, else {}

  @classmethod
  def of(cls, dataset: Dataset, split: Split, which: str = "test", max_users: int = 0) -> "Protocol":
    """``which="test"``: train + valid known, test held out; ``"valid"``: train known, valid held
    out. ``max_users`` > 0 keeps the first that many users (by index)."""
    if which not in ("test", "valid"):
      raise ValueError(f"evaluation split must be 'test' or 'valid', got {which!r}")
    held = split.test if which == "test" else split.valid
    known_idx = np.concatenate([split.train, split.valid]) if which == "test" else split.train
    order = np.lexsort((dataset.items[held], dataset.users[held]))
    truth_users = dataset.users[held][order].astype(np.int32)
    truth_items = dataset.items[held][order].astype(np.int32)
    users = np.unique(truth_users)
    if max_users:
      users = users[:max_users]
    cold = split.cold_items
    return cls(users=users, known=Sequences.from_interactions(dataset, known_idx), truth_users=truth_users,
               truth_items=truth_items, num_items=dataset.num_items,
               train_counts_N=np.bincount(dataset.items[split.train], minlength=dataset.num_items),
               groups={"warm": ~cold, "cold": cold} if cold.any() else {})


def known_rows(known: Sequences, users: np.ndarray) -> np.ndarray:
  """Each user's known items as int32 [B, M] padded with -1 (the top-k kernel's exclude form)."""
  starts, ends = known.start[users], known.start[users + 1]
  width = max(int((ends - starts).max(initial=0)), 1)
  offsets = starts[:, None] + np.arange(width)[None, :]
  valid = offsets < ends[:, None]
  return np.where(valid, known.items[np.minimum(offsets, max(len(known.items) - 1, 0))], -1).astype(np.int32)


def _put(x: np.ndarray, target: NamedSharding) -> jax.Array:
  # Built shard by shard from the host copy every process holds: correct on any process count.
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def place_items(items_NxE, mesh: Mesh | None = None,
                rules: dict[str, tuple[str, ...]] = sharding.RULES) -> jax.Array:
  """float32 item rows on the devices, as ``full_ranking`` scores them.

  Without a mesh (or when the ``items`` rule names no axis of it) the rows stay as they are,
  replicated. With one, rows are padded with zeros to a multiple of the shard count and split
  over the ``items`` axes; rows past N are padding, which ``full_ranking`` marks invalid.
  """
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in rules["items"] if a in mesh.shape)
  axes = () if mesh is None else tuple(a for a in rules["items"] if a in mesh.shape)
  if not axes:
    return jnp.asarray(items_NxE, jnp.float32)
  num_n = items_NxE.shape[0]
  padded_shape = (sharding.round_up(num_n, shards), items_NxE.shape[1])
  target = NamedSharding(mesh, sharding.resolve(("items", None), padded_shape, mesh, rules))
  if isinstance(items_NxE, jax.Array):
    # Device vectors (the trainer's) are padded and resharded on the devices, never via the host.
    pad = lambda x: jnp.pad(x.astype(jnp.float32), ((0, padded_shape[0] - num_n), (0, 0)))
    return jax.jit(pad, out_shardings=target)(items_NxE)
  host = np.zeros(padded_shape, np.float32)
  host[:num_n] = np.asarray(items_NxE, np.float32)
  return _put(host, target)


def _items_axes(placed: jax.Array) -> tuple[str, ...]:
  """The mesh axes the rows of a placed item array are split over (() when replicated)."""
  spec = getattr(placed.sharding, "spec", P())
  first = spec[0] if len(spec) else None
  return () if first is None else (first,) if isinstance(first, str) else tuple(first)


QueryFn = Callable[[np.ndarray, Sequences], jax.Array]


def full_ranking(protocol: Protocol, items_NxE, queries: QueryFn | np.ndarray | jax.Array, *,
                 ks: tuple[int, ...], batch_size: int, mesh: Mesh | None = None,
                 rules: dict[str, tuple[str, ...]] = sharding.RULES) -> dict[str, float]:
  """Full-catalog ranking metrics of every protocol user, and the popularity baseline's.

  Args:
    protocol: who is evaluated on what (``Protocol.of``).
    items_NxE: every catalog item's vector, row = item index.
    queries: ``fn(users_B, known) -> q_BxE`` (users int32, padded to ``batch_size`` by repeating
      the last user), or the query vectors ``[U, E]`` of ``protocol.users`` in order.
    ks: cut-offs; the ranking keeps max(ks).
    batch_size: users per top-k call; every call has this shape, so the kernel compiles once.
    mesh, rules: with a mesh, the items are split over the axes of ``rules["items"]``.

  Returns ``metrics.RankingAccumulator.result()`` of the model (recall@K, ndcg@K, ..., warm/ and
  cold/ when the split has cold items, chance_recall@K, coverage@K, users) and the same keys
  prefixed ``popularity/`` for the popularity ranking.
  """
  users_U = np.asarray(protocol.users, np.int32)
  num_u, num_n = len(users_U), protocol.num_items
  if items_NxE.shape[0] != num_n:
    raise ValueError(f"items_NxE has {items_NxE.shape[0]} rows, the protocol's catalog {num_n} items")
  if not callable(queries):
    queries_UxE = np.asarray(queries, np.float32)
    if queries_UxE.ndim != 2 or queries_UxE.shape[0] != num_u:
      raise ValueError(f"query vectors must be [{num_u}, E] (one row per protocol user), got {queries_UxE.shape}")
  kmax = max(ks)
  k_cols = min(kmax, num_n)  # the replicated kernel's width; padding rows must not widen it
  corpus = place_items(items_NxE, mesh, rules)
  axes = _items_axes(corpus)
  num_padded = corpus.shape[0]
  # Popularity ranks through the same kernel as a [N, 1] corpus scored by a query of ones.
  popularity = place_items(protocol.train_counts_N.astype(np.float32)[:, None], mesh, rules)
  valid_N = None if num_padded == num_n else np.arange(num_padded) < num_n
  kernel = dict(mesh=mesh, items_axes=axes) if axes else {}
  if valid_N is not None:
    valid_N = _put(valid_N, NamedSharding(mesh, P(axes)))
  model_acc = metrics.RankingAccumulator(ks, num_n, protocol.groups)
  pop_acc = metrics.RankingAccumulator(ks, num_n, protocol.groups)
  bs = max(1, min(batch_size, num_u))
  ones_Bx1 = jnp.ones((bs, 1), jnp.float32)
  use_mask = bs * num_n <= DENSE_MASK_CELLS
  mask_sharding = NamedSharding(mesh, P(None, axes)) if axes else None
  known = protocol.known
  for start in range(0, num_u, bs):
    users = users_U[start:start + bs]
    n = len(users)
    padded = np.pad(users, (0, bs - n), mode="edge")  # fixed batch shape: one compile per run
    exclude = known_rows(known, padded)
    if use_mask:
      mask_BxN = np.zeros((bs, num_padded), bool)
      rows, cols = np.nonzero(exclude >= 0)
      mask_BxN[rows, exclude[rows, cols]] = True
      # On the devices once for both rankings, split like the items when they are.
      exclude = jnp.asarray(mask_BxN) if mask_sharding is None else _put(mask_BxN, mask_sharding)
    if callable(queries):
      q_BxE = queries(padded, known)
    else:
      q_BxE = np.pad(queries_UxE[start:start + n], ((0, bs - n), (0, 0)), mode="edge")
    lo, hi = np.searchsorted(protocol.truth_users, [users[0], users[-1] + 1])
    t_users, t_items = protocol.truth_users[lo:hi], protocol.truth_items[lo:hi]
    _, ids_BxK = topk(q_BxE, corpus, kmax, exclude=exclude, valid=valid_N, **kernel)
    candidates = num_n - (known.start[users + 1] - known.start[users])
    model_acc.add(np.asarray(ids_BxK)[:n, :k_cols], users, t_users, t_items, candidates)
    _, pop_BxK = topk(ones_Bx1, popularity, kmax, exclude=exclude, valid=valid_N, **kernel)
    pop_acc.add(np.asarray(pop_BxK)[:n, :k_cols], users, t_users, t_items)
  out = model_acc.result()
  out.update({f"popularity/{k}": v for k, v in pop_acc.result().items()})
  return out
