"""Exact batched top-k retrieval: a streaming, shardable kernel and the ItemIndex artifact.

Dimensions: B queries, N candidates (corpus rows), E embedding dims, K top-k, M excluded ids per
query, C corpus rows per block, S corpus shards.

`topk` scores `queries_BxE @ corpus_NxE.T` block by block and keeps a running top-k, so memory
is O(B * (K + C)) and never O(B * N). Ordering is total: score descending, then index ascending,
which makes the result a pure function of the inputs (identical sharded, unsharded, any block).

Items that can never be returned: rows masked by `valid`, ids in `exclude`, corpus rows holding
a NaN or inf, and scores that are -inf or NaN. A query holding a NaN or inf returns nothing.
Slots that no item fills come back as score -inf, index -1.

Exactness: the result is the top-k of the float32 scores under (score desc, index asc). The
kernel's candidate filter uses a fused matmul and the final scores are recomputed for the
candidates; both are float32 dot products (HIGHEST precision) of the same rows, which can differ
in the last bit (summation order), as any two BLAS libraries do. Inputs whose products are
exactly representable (the tests) therefore give bit-identical results to a brute force.
HIGHEST matters on accelerators (bf16 passes otherwise); on XLA:CPU it is the same float32 kernel
as DEFAULT (a 512 x 65,536 x 64 scoring measured identical scores and time), unlike the training
logits, whose backward pass it steers to a slower kernel (see losses.logit_precision).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrec import serving
from jaxrec.sharding import round_up

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# The kernel


def _merge_topk(vals_BxK, idx_BxK, new_vals_BxJ, new_idx_BxJ, k):
  """Top-k of the union; the running set comes first so equal scores keep the lower index."""
  cat_vals = jnp.concatenate([vals_BxK, new_vals_BxJ], axis=1)
  cat_idx = jnp.concatenate([idx_BxK, new_idx_BxJ], axis=1)
  top_vals_BxK, pos_BxK = jax.lax.top_k(cat_vals, k)
  return top_vals_BxK, jnp.take_along_axis(cat_idx, pos_BxK, axis=1)


# The exact kernel. A fused dot + max gives, per query, the maximum of every chunk of `chunk`
# rows (8 or 16, see `_plan`; XLA:CPU fuses the reduce into the matmul, so the [C, T] score
# tile never goes to memory and no per-tile selection runs). Selection then works on these
# maxima, top-down:
#   * the k best groups of GROUP chunks by their maximum contain every top-k element (a group
#     without one has a maximum no better than the k-th element, and at most k groups hold
#     one); ordering groups by (max desc, id asc) keeps this true under exact ties;
#   * the same argument picks k chunks inside those groups;
#   * the k * chunk rows of those chunks are re-scored and the exact top-k is taken.
# Excluded ids can inflate a maximum, so with M excluded ids per query k + M groups and chunks
# are kept (each excluded id spoils at most one of them). `valid`, non-finite rows and bool
# masks are applied to the scores before the maximum, so they never inflate it.
# lax.top_k on XLA:CPU costs ~10-50 us per row at k=100, so the kernel calls it 5 times per
# query per super-block instead of once per corpus block, each time on all T queries at once.
GROUP = 16  # chunks per group
ALIGN = 256  # fused tiles and the padded tail hold whole groups of any chunk size used


def _tile_maxima(q_ExT, c_CxE, ok_C, mask_TxC, chunk):
  """[C/chunk, T] chunk maxima of c @ q; rows with ok False / mask True score -inf."""
  s_CxT = jax.lax.dot_general(c_CxE, q_ExT, (((1,), (0,)), ((), ())),
                              precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)
  if ok_C is not None or mask_TxC is not None:
    keep_CxT = jnp.ones(s_CxT.shape, jnp.bool_)
    if ok_C is not None:
      keep_CxT &= ok_C[:, None]
    if mask_TxC is not None:
      keep_CxT &= ~mask_TxC.T
    s_CxT = jnp.where(keep_CxT, s_CxT, NEG_INF)
  num_c, num_t = s_CxT.shape
  return s_CxT.reshape(num_c // chunk, chunk, num_t).max(axis=1)


def _super_block_topk(q_TxE, c_NxE, ok_N, all_ok, excl_TxM, mask_TxN, *, s0, s1, k, tile,
                      refine_rows, chunk, group):
  """Exact top-k over corpus rows [s0, s1) for T queries -> (vals_TxK, global rows_TxK)."""
  num_t, num_e = q_TxE.shape
  num_n = c_NxE.shape[0]
  q_ExT = q_TxE.T
  rows = s1 - s0
  num_full = rows // tile
  tail = rows - num_full * tile
  tail_pad = round_up(tail, ALIGN)
  num_g1 = (num_full * tile + tail_pad) // chunk

  def full_tiles(masked):
    def body(j, m1_G1xT):
      start = s0 + j * tile
      c_CxE = jax.lax.dynamic_slice_in_dim(c_NxE, start, tile)
      ok_C = jax.lax.dynamic_slice_in_dim(ok_N, start, tile) if masked else None
      mask_TxC = (None if mask_TxN is None else
                  jax.lax.dynamic_slice_in_dim(mask_TxN, start, tile, axis=1))
      m_GxT = _tile_maxima(q_ExT, c_CxE, ok_C, mask_TxC, chunk)
      return jax.lax.dynamic_update_slice_in_dim(m1_G1xT, m_GxT, j * (tile // chunk), 0)
    init = jnp.full((num_g1, num_t), NEG_INF, jnp.float32)
    return jax.lax.fori_loop(0, num_full, body, init) if num_full else init

  if mask_TxN is None and num_full:
    # The common case (every row valid and finite) keeps the mask out of the fused matmul.
    m1_G1xT = jax.lax.cond(all_ok, lambda: full_tiles(False), lambda: full_tiles(True))
  else:
    m1_G1xT = full_tiles(True)
  if tail:
    start = s0 + num_full * tile
    pad = tail_pad - tail
    c_CxE = jnp.pad(c_NxE[start:s1], ((0, pad), (0, 0)))
    ok_C = jnp.pad(ok_N[start:s1], (0, pad), constant_values=False)
    mask_TxC = (None if mask_TxN is None else
                jnp.pad(mask_TxN[:, start:s1], ((0, 0), (0, pad)), constant_values=True))
    m1_G1xT = jax.lax.dynamic_update_slice_in_dim(
        m1_G1xT, _tile_maxima(q_ExT, c_CxE, ok_C, mask_TxC, chunk), num_full * tile // chunk, 0)

  extra = 0 if excl_TxM is None else excl_TxM.shape[1]
  num_g2 = num_g1 // group
  k2 = min(k + extra, num_g2)
  m2_TxG2 = m1_G1xT.reshape(num_g2, group, num_t).max(axis=1).T
  _, g2_TxK2 = jax.lax.top_k(m2_TxG2, k2)
  # Ascending group ids, so that top_k's position tie-break below is the chunk-id tie-break.
  g2_TxK2 = -jax.lax.top_k(-g2_TxK2, k2)[0]
  c1_TxW = (g2_TxK2[:, :, None] * group + jnp.arange(group)).reshape(num_t, k2 * group)
  t_col = jnp.arange(num_t)[:, None]
  v1_TxW = m1_G1xT.reshape(-1)[c1_TxW * num_t + t_col]
  k1 = min(k + extra, k2 * group)
  _, p1_TxK1 = jax.lax.top_k(v1_TxW, k1)
  ch_TxK1 = -jax.lax.top_k(-jnp.take_along_axis(c1_TxW, p1_TxK1, axis=1), k1)[0]
  rows_TxR = s0 + (ch_TxK1[:, :, None] * chunk + jnp.arange(chunk)).reshape(num_t, k1 * chunk)

  def rescore(args):
    q_txE, rows_txR, excl_txM, mask_txN = args
    safe_txR = jnp.minimum(rows_txR, num_n - 1)
    s_txR = jnp.einsum("te,tre->tr", q_txE, c_NxE[safe_txR],
                       precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    keep_txR = (rows_txR < s1) & ok_N[safe_txR] & ~jnp.isnan(s_txR)
    if excl_txM is not None:
      keep_txR &= ~jnp.any(rows_txR[:, :, None] == excl_txM[:, None, :], axis=-1)
    if mask_txN is not None:
      keep_txR &= ~jnp.take_along_axis(mask_txN, safe_txR, axis=1)
    return jnp.where(keep_txR, s_txR, NEG_INF)

  # Re-score in query slices so the gathered [t, R, E] rows stay near `refine_rows` rows; the
  # selection runs once on all T rows, since each lax.map step costs a loop iteration and a
  # top_k call of its own.
  num_r = rows_TxR.shape[1]
  sub = max(1, min(num_t, refine_rows // num_r))
  while num_t % sub:
    sub -= 1
  split = lambda x: None if x is None else x.reshape(num_t // sub, sub, *x.shape[1:])
  s_TxR = jax.lax.map(rescore, (split(q_TxE), split(rows_TxR), split(excl_TxM),
                                split(mask_TxN))).reshape(num_t, num_r)
  kk = min(k, num_r)
  v_TxK, p_TxK = jax.lax.top_k(s_TxR, kk)
  i_TxK = jnp.take_along_axis(rows_TxR, p_TxK, axis=1)
  if kk < k:
    v_TxK = jnp.pad(v_TxK, ((0, 0), (0, k - kk)), constant_values=NEG_INF)
    i_TxK = jnp.pad(i_TxK, ((0, 0), (0, k - kk)), constant_values=-1)
  return v_TxK, i_TxK


def _exact_topk(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, *, k, tile, q_tile, super_rows,
                refine_rows, chunk, group):
  """Exact top-k (local row indices; -inf / any index for empty slots) over the whole corpus."""
  num_b = q_BxE.shape[0]
  num_n = c_NxE.shape[0]
  q_ok_B = jnp.all(jnp.isfinite(q_BxE), axis=1)
  q_BxE = jnp.where(q_ok_B[:, None], q_BxE, 0)
  ok_N = jnp.all(jnp.isfinite(c_NxE), axis=1)
  if valid_N is not None:
    ok_N &= valid_N
  all_ok = jnp.all(ok_N)
  num_t = min(q_tile, round_up(num_b, 8))
  b_pad = round_up(num_b, num_t) - num_b
  pad_b = lambda x, v: None if x is None else jnp.pad(
      x, ((0, b_pad),) + ((0, 0),) * (x.ndim - 1), constant_values=v)
  q_BxE, excl_BxM, mask_BxN = pad_b(q_BxE, 0), pad_b(excl_BxM, -1), pad_b(mask_BxN, True)
  supers = [(s, min(s + super_rows, num_n)) for s in range(0, num_n, super_rows)]

  def per_query_tile(args):
    q_TxE, excl_TxM, mask_TxN = args
    vals_TxK = jnp.full((num_t, k), NEG_INF, jnp.float32)
    idx_TxK = jnp.full((num_t, k), -1, jnp.int32)
    for s0, s1 in supers:
      v, i = _super_block_topk(q_TxE, c_NxE, ok_N, all_ok, excl_TxM, mask_TxN, s0=s0, s1=s1,
                               k=k, tile=tile, refine_rows=refine_rows, chunk=chunk,
                               group=group)
      vals_TxK, idx_TxK = _merge_topk(vals_TxK, idx_TxK, v, i, k) if len(supers) > 1 else (v, i)
    return vals_TxK, idx_TxK

  tiles = lambda x: None if x is None else x.reshape(-1, num_t, *x.shape[1:])
  vals, idx = jax.lax.map(per_query_tile, (tiles(q_BxE), tiles(excl_BxM), tiles(mask_BxN)))
  vals_BxK = vals.reshape(-1, k)[:num_b]
  idx_BxK = idx.reshape(-1, k)[:num_b]
  return jnp.where(q_ok_B[:, None], vals_BxK, NEG_INF), idx_BxK


def _plan(num_b, num_n, block_size, k, dim):
  """Static tiling: corpus rows per fused tile, queries per tile, rows per super-block, chunk."""
  on_cpu = jax.default_backend() == "cpu"
  # CPU: a [4096, 512] tile keeps the fused matmul near its best rate with the maxima in cache.
  # Accelerators want large matmuls and have the memory for them.
  tile = round_up(block_size, ALIGN) if block_size else (4096 if on_cpu else 32768)
  tile = min(tile, round_up(num_n, ALIGN))
  q_tile = 512 if on_cpu else 8192
  num_t = min(q_tile, round_up(num_b, 8))
  # The re-scoring gathers k * chunk rows of E floats per query; at k = 100, E = 384 that is
  # 2.4 MB per query with 16-row chunks, which cost as much as a third of the matmul on CPU.
  # 8-row chunks halve it for twice the chunk maxima (still a small fraction of the scores).
  chunk = 8 if k * dim >= 8192 else 16
  # Chunk maxima of one super-block ([rows / chunk, T] float32) stay within the budget.
  budget = (128 << 20) if on_cpu else (2 << 30)
  super_rows = max(tile, (budget * chunk // (4 * num_t)) // tile * tile)
  # Gathered rows of one re-scoring step stay near 16 MiB: 100 MB steps measured slower at
  # E = 384, and much smaller steps pay a loop iteration each.
  refine_rows = max(1024, (16 << 20) // (4 * dim))
  return dict(tile=tile, q_tile=q_tile, super_rows=super_rows, refine_rows=refine_rows,
              chunk=chunk, group=GROUP)


def _finalize(vals_BxK, idx_BxK):
  return vals_BxK, jnp.where(vals_BxK == NEG_INF, -1, idx_BxK).astype(jnp.int32)


def _local_topk(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, *, k, block):
  """Top-k of one device's corpus rows (local indices)."""
  return _exact_topk(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, k=k,
                     **_plan(q_BxE.shape[0], c_NxE.shape[0], block, k, q_BxE.shape[1]))


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _topk_single(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, *, k, block):
  vals_BxK, idx_BxK = _local_topk(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, k=k, block=block)
  return _finalize(vals_BxK, idx_BxK)


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh", "items_axes"))
def _topk_sharded(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, *, k, block, mesh, items_axes):
  """Local top-k per corpus shard in shard_map, then one merge of the S*K candidates."""
  num_n_local = c_NxE.shape[0] // math.prod(mesh.shape[a] for a in items_axes)

  def local(q_BxE, c_nxE, valid_n, excl_BxM, mask_Bxn):
    shard = jax.lax.axis_index(items_axes)
    offset = shard * num_n_local
    # Exclusion ids are global; shift them into this shard's row range.
    excl_local = None if excl_BxM is None else jnp.where(excl_BxM >= 0, excl_BxM - offset, -1)
    vals_BxK, idx_BxK = _local_topk(q_BxE, c_nxE, valid_n, excl_local, mask_Bxn, k=k,
                                    block=block)
    idx_BxK = jnp.where(idx_BxK >= 0, idx_BxK + offset, -1)
    # Gathered in shard order = ascending index ranges, so the position tie-break of the final
    # top_k is the index tie-break.
    all_vals_SxBxK = jax.lax.all_gather(vals_BxK, items_axes, axis=0)
    all_idx_SxBxK = jax.lax.all_gather(idx_BxK, items_axes, axis=0)
    num_s, num_b = all_vals_SxBxK.shape[:2]
    cat_vals = jnp.moveaxis(all_vals_SxBxK, 0, 1).reshape(num_b, num_s * k)
    cat_idx = jnp.moveaxis(all_idx_SxBxK, 0, 1).reshape(num_b, num_s * k)
    top_vals_BxK, pos_BxK = jax.lax.top_k(cat_vals, k)
    return _finalize(top_vals_BxK, jnp.take_along_axis(cat_idx, pos_BxK, axis=1))

  items = P(items_axes)
  in_specs = (P(), items, None if valid_N is None else items, None if excl_BxM is None else P(),
              None if mask_BxN is None else P(None, items_axes))
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()), check_vma=False)
  return fn(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN)


# ----------------------------------------------------------------------------------------------
# Public entry point


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _host_exclude(exclude, num_b):
  """`topk`'s exclude as an array: arrays pass through; a list of per-query id lists of
  different lengths is padded with -1 here, on the host, so the jitted kernel sees one shape."""
  if not isinstance(exclude, (list, tuple)):
    return exclude if isinstance(exclude, (np.ndarray, jax.Array)) else jnp.asarray(exclude)
  rows = [np.asarray(r) for r in exclude]
  if not rows or all(r.shape == rows[0].shape for r in rows):
    ex = np.asarray(exclude) if rows else np.zeros((0, 0), np.int32)
    # Empty rows carry no ids, so numpy's float default for `[]` says nothing about them.
    return ex.astype(np.int32) if ex.ndim == 2 and ex.size == 0 else ex
  if len(rows) != num_b:
    raise ValueError(f"exclude needs one row per query: {num_b} queries, got {len(rows)} rows")
  width = max(r.size for r in rows)
  padded_BxM = np.full((num_b, width), -1, np.int64)
  for b, r in enumerate(rows):
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
      raise ValueError(f"exclude[{b}] must be a list of int corpus rows, got {r.dtype} {r.shape}")
    padded_BxM[b, :r.size] = r
  return padded_BxM


def topk(queries, corpus, k: int, *, exclude=None, valid=None, block_size: int | None = None,
         mesh=None, items_axes: Sequence[str] | str | None = None):
  """Exact top-k of `queries @ corpus.T` -> (scores_BxK float32, indices_BxK int32).

  Args:
    queries: [B, E] float32 or bfloat16 (scores always accumulate in float32).
    corpus: [N, E], same embedding width.
    k: results per query (> 0), clamped to N: k > N returns N columns, so a huge k costs
      memory for the corpus, never for k.
    exclude: per-query ids never returned: an int array [B, M] of corpus rows padded with -1,
      a list of B per-query id lists of any lengths (padded with -1 on the host), or a bool
      mask [B, N] (True = excluded).
    valid: bool [N]; False rows (padding) are never returned.
    block_size: corpus rows per fused score tile, rounded up to a multiple of 256
      (default 4096 on CPU, 32768 on accelerators).
    mesh: a `jax.sharding.Mesh`; the corpus rows are split over `items_axes` (default: all mesh
      axes), each device selects its local top-k, one merge gives the global result. Results
      equal the unsharded kernel's.

  Scores sort descending; equal scores sort by ascending index. Corpus rows holding NaN/inf
  and -inf scores are never returned; a query holding NaN/inf returns (-inf, -1) throughout.
  Zero queries give empty [0, min(k, N)] results.
  """
  q_BxE = jnp.asarray(queries)
  c_NxE = jnp.asarray(corpus)
  if q_BxE.ndim != 2 or c_NxE.ndim != 2:
    raise ValueError(f"queries and corpus must be 2-D, got shapes {q_BxE.shape} and {c_NxE.shape}")
  if q_BxE.shape[1] != c_NxE.shape[1]:
    raise ValueError(f"embedding dims differ: queries {q_BxE.shape} vs corpus {c_NxE.shape}")
  for name, x in (("queries", q_BxE), ("corpus", c_NxE)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
    raise ValueError(f"k must be a positive int, got {k!r}")
  num_b, num_n = q_BxE.shape[0], c_NxE.shape[0]
  if num_n == 0:
    raise ValueError("corpus is empty")
  # No query can hold more than N distinct rows; the clamp keeps k = 10**9 from sizing buffers.
  k = min(int(k), num_n)
  dtype = jnp.promote_types(q_BxE.dtype, c_NxE.dtype)
  q_BxE, c_NxE = q_BxE.astype(dtype), c_NxE.astype(dtype)

  valid_N = None
  if valid is not None:
    valid_N = jnp.asarray(valid)
    if valid_N.shape != (num_n,) or valid_N.dtype != jnp.bool_:
      raise ValueError(f"valid must be bool [{num_n}], got {valid_N.dtype} {valid_N.shape}")

  excl_BxM = mask_BxN = None
  if exclude is not None:
    ex = _host_exclude(exclude, num_b)
    if ex.ndim == 2 and ex.shape[0] != num_b:
      raise ValueError(f"exclude needs one row per query: {num_b} queries, got {ex.shape[0]} rows")
    if ex.dtype == np.bool_:
      if ex.shape != (num_b, num_n):
        raise ValueError(f"exclude mask must be bool [{num_b}, {num_n}], got {ex.shape}")
      mask_BxN = jnp.asarray(ex)
    elif jnp.issubdtype(ex.dtype, jnp.integer):
      if ex.ndim != 2:
        raise ValueError(f"exclude ids must be int [{num_b}, M] padded with -1, got {ex.shape}")
      if _is_concrete(ex) and ex.size:
        ex_np = np.asarray(ex)
        bad = (ex_np < -1) | (ex_np >= num_n)
        if bad.any():
          r, c = np.argwhere(bad)[0]
          raise ValueError(f"exclude ids must be in [0, {num_n}) or -1 padding; "
                           f"exclude[{r}, {c}] = {ex_np[r, c]}")
      excl_BxM = jnp.asarray(ex, jnp.int32) if ex.shape[1] else None
      if excl_BxM is not None and excl_BxM.shape[1] & (excl_BxM.shape[1] - 1):
        # Round M up to a power of two: callers whose per-batch M varies (seen items) then
        # reuse a handful of compiled kernels instead of compiling one per batch.
        width = 1 << (excl_BxM.shape[1] - 1).bit_length()
        excl_BxM = jnp.pad(excl_BxM, ((0, 0), (0, width - excl_BxM.shape[1])), constant_values=-1)
    else:
      raise ValueError(f"exclude must be int ids [B, M] or a bool mask [B, N], got {ex.dtype}")

  block = 0 if block_size is None else int(block_size)  # 0: the kernel's own choice
  if block_size is not None and block <= 0:
    raise ValueError(f"block_size must be positive, got {block_size}")
  static = dict(k=k, block=block)

  if num_b == 0:
    # The kernel tiles queries; with none there is nothing to tile (and no shape to compile).
    return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
  if mesh is None:
    return _topk_single(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, **static)

  if items_axes is None:
    items_axes = tuple(mesh.axis_names)
  elif isinstance(items_axes, str):
    items_axes = (items_axes,)
  items_axes = tuple(items_axes)
  unknown = [a for a in items_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"items_axes {unknown} not in mesh axes {mesh.axis_names}")
  num_s = math.prod(mesh.shape[a] for a in items_axes)
  # Pad rows to a multiple of the shard count; padding rows are masked, never returned.
  pad = (-num_n) % num_s
  if pad:
    valid_N = jnp.ones((num_n,), jnp.bool_) if valid_N is None else valid_N
    valid_N = jnp.pad(valid_N, (0, pad), constant_values=False)
    c_NxE = jnp.pad(c_NxE, ((0, pad), (0, 0)))
    if mask_BxN is not None:
      mask_BxN = jnp.pad(mask_BxN, ((0, 0), (0, pad)), constant_values=True)
  if block:
    static["block"] = min(block, (num_n + pad) // num_s)
  return _topk_sharded(q_BxE, c_NxE, valid_N, excl_BxM, mask_BxN, mesh=mesh,
                       items_axes=items_axes, **static)


def topk_memory_analysis(queries, corpus, k: int, *, block_size: int | None = None):
  """XLA's compiled memory statistics of the unsharded kernel for these (abstract) shapes.

  Accepts `jax.ShapeDtypeStruct`s, so the footprint of a large case can be checked without
  allocating it.
  """
  block = int(block_size) if block_size else 0
  lowered = _topk_single.lower(queries, corpus, None, None, None, k=int(k), block=block)
  return lowered.compile().memory_analysis()


# ----------------------------------------------------------------------------------------------
# ItemIndex: the serving artifact

FORMAT_NAME = "jaxrec.ItemIndex"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class IndexFormatError(ValueError):
  """An ItemIndex directory is missing, truncated, corrupted or of another format version."""


class IndexExistsError(FileExistsError):
  """`ItemIndex.save` was pointed at something other than an ItemIndex; it is left untouched."""


class IndexWriteError(OSError):
  """Writing an ItemIndex failed (full disk, permissions); what was at the path is unchanged."""


# Every file the format holds. Loading refuses any other name, so a manifest cannot make `load`
# open a path of its choosing.
_INDEX_FILES = ("vectors.npy", "item_ids.npy", "titles.json", "user_vectors.npy", "user_ids.npy",
                "user_seen_indptr.npy", "user_seen_indices.npy", *serving.FILES)
_ID_KINDS = "iuUS"  # raw ids: ints or strings, as `load` can trust them


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _non_finite_rows(x_NxE) -> int:
  return int(np.count_nonzero(~np.isfinite(x_NxE).all(axis=1)))


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _write_npy(path, arr) -> None:
  """np.save's format through plain file writes: a full disk then raises OSError(ENOSPC) (numpy's
  tofile reports only "N requested and M written", without errno or file name)."""
  import os
  arr = np.ascontiguousarray(arr)
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
    f.write(arr.reshape(-1).view(np.uint8))
    f.flush()
    # Delayed-allocation file systems report ENOSPC at writeback; fsync brings it here.
    os.fsync(f.fileno())


def _read_json(path):
  import json
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def check_save_target(path) -> str | None:
  """What `save` finds at `path`: None (nothing), "empty" (an empty directory) or "index" (an
  ItemIndex holding only its own files); anything else raises IndexExistsError."""
  import os
  refuse = "refusing to replace it with an ItemIndex; save to a new or empty directory"
  if os.path.islink(path):
    raise IndexExistsError(f"{path} is a symbolic link; {refuse}")
  if not os.path.exists(path):
    return None
  if not os.path.isdir(path):
    raise IndexExistsError(f"{path} exists and is not a directory; {refuse}")
  entries = sorted(os.listdir(path))
  if not entries:
    return "empty"
  try:
    manifest = _read_json(os.path.join(path, MANIFEST))
  except (OSError, ValueError):
    manifest = None
  if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME
          and isinstance(manifest.get("files"), dict)):
    raise IndexExistsError(f"{path} is a non-empty directory without an ItemIndex manifest; {refuse}")
  own = set(manifest["files"]) | {MANIFEST}
  foreign = [e for e in entries
             if e not in own or os.path.islink(os.path.join(path, e))
             or not os.path.isfile(os.path.join(path, e))]
  if foreign:
    raise IndexExistsError(f"{path} holds an ItemIndex and {len(foreign)} other entries "
                           f"({', '.join(foreign[:3])}); {refuse}")
  return "index"


def _write_error(e: OSError, path: str, needed: int) -> IndexWriteError:
  """One line naming the index path (and for a full disk, how many bytes its arrays need)."""
  import errno
  import os
  import shutil
  if e.errno == errno.ENOSPC:
    try:
      free = f", {shutil.disk_usage(os.path.dirname(path)).free:,} free"
    except OSError:
      free = ""
    message = (f"cannot write ItemIndex {path}: no space left on device (its arrays need "
               f"{needed:,} bytes{free})")
  else:
    where = f" ({e.filename})" if e.filename else ""
    message = f"cannot write ItemIndex {path}: {_one_line(e.strerror or e)}{where}"
  error = IndexWriteError(message)
  error.errno = e.errno
  return error


def _check_manifest(manifest, mpath) -> dict:
  """The manifest's `files` table once every key, type and file name is what `save` writes."""
  import os
  if not isinstance(manifest, dict):
    raise IndexFormatError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
  if manifest.get("format") != FORMAT_NAME:
    raise IndexFormatError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
  version = manifest.get("version")
  if not _is_count(version) or version != FORMAT_VERSION:
    raise IndexFormatError(f"{mpath}: format version {version!r}; this jaxrec reads "
                           f"version {FORMAT_VERSION} (re-export the index with `jaxrec export`)")
  for key in ("num_items", "dim"):
    if not _is_count(manifest.get(key)):
      raise IndexFormatError(f"{mpath}: {key} must be a non-negative int, got {manifest.get(key)!r}")
  if not isinstance(manifest.get("metadata", {}), dict):
    raise IndexFormatError(f"{mpath}: metadata must be an object, got "
                           f"{type(manifest['metadata']).__name__}")
  files = manifest.get("files")
  if not isinstance(files, dict):
    raise IndexFormatError(f"{mpath}: files must be an object of file name -> entry, got "
                           f"{type(files).__name__}")
  for fname, entry in files.items():
    if os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/"):
      raise IndexFormatError(f"{mpath}: file {fname!r} lies outside the index directory")
    if fname not in _INDEX_FILES:
      raise IndexFormatError(f"{mpath}: unknown file {fname!r} (an ItemIndex holds "
                             f"{', '.join(_INDEX_FILES)})")
    if not isinstance(entry, dict):
      raise IndexFormatError(f"{mpath}: files[{fname!r}] must be an object, got "
                             f"{type(entry).__name__}")
    shape, dtype, size, digest = (entry.get(key) for key in ("shape", "dtype", "bytes", "sha256"))
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
      raise IndexFormatError(f"{mpath}: files[{fname!r}].shape must be a list of non-negative "
                             f"ints, got {shape!r}")
    if not isinstance(dtype, str) or not _is_count(size) or not isinstance(digest, str):
      raise IndexFormatError(f"{mpath}: files[{fname!r}] needs dtype (string), bytes (int) and "
                             f"sha256 (string); got {dtype!r}, {size!r}, {digest!r}")
  for required in ("vectors.npy", "item_ids.npy", "titles.json"):
    if required not in files:
      raise IndexFormatError(f"{mpath} lists no {required}")
  tower_files = [f for f in serving.FILES if f in files]
  if tower_files and len(tower_files) != len(serving.FILES):
    raise IndexFormatError(f"{mpath} lists {', '.join(tower_files)} without "
                           f"{', '.join(f for f in serving.FILES if f not in files)}")
  for needs, what in (("user_ids.npy", "user_vectors.npy"), ("user_vectors.npy", "user_ids.npy"),
                      ("user_seen_indices.npy", "user_seen_indptr.npy"),
                      ("user_seen_indptr.npy", "user_seen_indices.npy"),
                      ("user_vectors.npy", "user_seen_indptr.npy")):
    if what in files and needs not in files:
      raise IndexFormatError(f"{mpath} lists {what} without {needs}")
  return files


def _sha256(path):
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _id_key(value):
  """Dictionary key of a raw id: numpy scalars and Python values of the same id compare equal."""
  return value.item() if isinstance(value, np.generic) else value


class ItemIndex:
  """Item vectors with their raw ids, titles and provenance; optionally users for `recommend`.

  Args:
    vectors: float32 [N, E] item vectors (L2-normalised for cosine scores).
    item_ids: [N] raw item ids (ints or strings), row i describes item_ids[i].
    titles: N strings.
    metadata: JSON-serialisable provenance (config hash, step, model name, ...).
    user_vectors: float32 [U, E] query vectors, one per user, computed at export time.
    user_ids: [U] raw user ids.
    user_seen: (indptr [U+1], indices [T]) CSR rows of the items each user already knows.
    query_tower: the exported query tower (``serving.QueryTower``) that turns a history of item
      rows (and the user's row and features) into a query vector: new users and new histories.
  """

  def __init__(self, vectors, item_ids, titles: Sequence[str], metadata: dict | None = None, *,
               user_vectors=None, user_ids=None, user_seen=None, query_tower: "serving.QueryTower | None" = None):
    self.vectors = np.ascontiguousarray(np.asarray(vectors, np.float32))
    if self.vectors.ndim != 2:
      raise ValueError(f"vectors must be [N, E], got shape {self.vectors.shape}")
    num_n = self.vectors.shape[0]
    self.item_ids = np.asarray(item_ids)
    self.titles = [str(t) for t in titles]
    if self.item_ids.shape != (num_n,) or len(self.titles) != num_n:
      raise ValueError(f"{num_n} vectors need {num_n} item ids and titles; got "
                       f"{self.item_ids.shape[0] if self.item_ids.ndim else 0} ids, {len(self.titles)} titles")
    self.metadata = dict(metadata or {})
    self.user_vectors = self.user_ids = self.user_seen = None
    if (user_vectors is None) != (user_ids is None):
      raise ValueError("user_vectors and user_ids come together")
    if user_vectors is not None:
      self.user_vectors = np.ascontiguousarray(np.asarray(user_vectors, np.float32))
      self.user_ids = np.asarray(user_ids)
      num_u = self.user_ids.shape[0]
      if self.user_vectors.shape != (num_u, self.vectors.shape[1]):
        raise ValueError(f"user_vectors must be [{num_u}, {self.vectors.shape[1]}], "
                         f"got {self.user_vectors.shape}")
      if user_seen is not None:
        indptr, indices = (np.asarray(a, np.int64) for a in user_seen)
        if indptr.shape != (num_u + 1,) or indptr[0] != 0 or indptr[-1] != len(indices):
          raise ValueError(f"user_seen indptr must be [{num_u + 1}] from 0 to len(indices)")
        if len(indices) and (indices.min() < 0 or indices.max() >= num_n):
          raise ValueError(f"user_seen indices must be item rows in [0, {num_n})")
        self.user_seen = (indptr, indices)
    self.query_tower = query_tower
    if query_tower is not None and query_tower.width != self.vectors.shape[1]:
      raise ValueError(f"the query tower gives [B, {query_tower.width}] vectors for [N, {self.vectors.shape[1]}] items")
    self._item_row = {_id_key(v): i for i, v in enumerate(self.item_ids.tolist())}
    self._user_row = ({} if self.user_ids is None else
                      {_id_key(v): i for i, v in enumerate(self.user_ids.tolist())})

  def __len__(self) -> int:
    return self.vectors.shape[0]

  # -- lookups ---------------------------------------------------------------------------------

  def item_rows(self, ids) -> np.ndarray:
    """Rows of raw item ids; an unknown id raises KeyError naming it."""
    rows = []
    for v in ids:
      row = self._item_row.get(_id_key(v))
      if row is None:
        raise KeyError(f"unknown item id {v!r} (index has {len(self)} items)")
      rows.append(row)
    return np.asarray(rows, np.int32)

  def user_row(self, user_id) -> int:
    if self.user_vectors is None:
      raise KeyError(f"this index holds no user vectors, so user {user_id!r} cannot be looked up")
    row = self._user_row.get(_id_key(user_id))
    if row is None:
      raise KeyError(f"unknown user id {user_id!r} (index has {len(self._user_row)} users)")
    return row

  def seen_items(self, user_id) -> list[tuple[Any, str]]:
    """(item_id, title) of the items the user already knows, in stored (time) order."""
    row = self.user_row(user_id)
    if self.user_seen is None:
      return []
    indptr, indices = self.user_seen
    return [(self.item_ids[i].item(), self.titles[i]) for i in indices[indptr[row]:indptr[row + 1]]]

  # -- search ----------------------------------------------------------------------------------

  def _per_query_rows(self, spec, num_b, name):
    """A list of ids for all queries, or one list per query -> list of row arrays (len B)."""
    spec = list(spec)
    per_query = len(spec) > 0 and all(isinstance(s, (list, tuple, np.ndarray)) for s in spec)
    if per_query:
      if len(spec) != num_b:
        raise ValueError(f"per-query {name} needs {num_b} lists, got {len(spec)}")
      return [self.item_rows(s) for s in spec]
    rows = self.item_rows(spec)
    return [rows] * num_b

  def search(self, query_vectors, k: int, exclude=None, include=None):
    """Top-k items per query -> (scores [B, K] float32, raw item ids [B, K]).

    `exclude` / `include` are raw item ids: one list for every query or one list per query.
    `include` restricts the candidates. k is clamped to the most candidates any query has (the
    catalog less its exclusions), so K <= k; slots no item fills have score -inf and id -1 (or
    "" for string ids). A 1-D query gives 1-D results.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
      raise ValueError(f"k must be a positive int, got {k!r}")
    q = np.asarray(query_vectors, np.float32)
    single = q.ndim == 1
    q_BxE = q[None] if single else q
    if q_BxE.ndim != 2 or q_BxE.shape[1] != self.vectors.shape[1]:
      raise ValueError(f"query vectors must be [B, {self.vectors.shape[1]}], got {q.shape}")
    num_b, num_n = q_BxE.shape[0], len(self)
    mask_BxN = None
    if exclude is not None or include is not None:
      mask_BxN = np.zeros((num_b, num_n), bool)
      if include is not None:
        mask_BxN[:] = True
        for b, rows in enumerate(self._per_query_rows(include, num_b, "include")):
          mask_BxN[b, rows] = False
      if exclude is not None:
        for b, rows in enumerate(self._per_query_rows(exclude, num_b, "exclude")):
          mask_BxN[b, rows] = True
    k = min(int(k), num_n)
    if mask_BxN is not None and num_b:
      k = min(k, int(num_n - mask_BxN.sum(axis=1).min()))
    if k == 0:  # every item excluded: nothing to search
      scores_BxK = np.zeros((num_b, 0), np.float32)
      rows_BxK = np.zeros((num_b, 0), np.int32)
    else:
      scores_BxK, rows_BxK = (np.asarray(x) for x in topk(q_BxE, self.vectors, k,
                                                          exclude=mask_BxN))
    fill = "" if self.item_ids.dtype.kind in "US" else -1
    ids_BxK = np.where(rows_BxK >= 0, self.item_ids[np.maximum(rows_BxK, 0)], fill)
    return (scores_BxK[0], ids_BxK[0]) if single else (scores_BxK, ids_BxK)

  def recommend(self, user_raw_id, k: int = 10, exclude_seen: bool = True):
    """[(item_id, title, score)] for a stored user, best first, known items left out; at most
    k, fewer when the catalog less the known items is smaller."""
    row = self.user_row(user_raw_id)
    if not np.isfinite(self.user_vectors[row]).all():
      raise ValueError(f"user {user_raw_id!r} has a NaN or inf query vector (row {row} of "
                       f"user_vectors); re-export the index from a healthy checkpoint")
    exclude = None
    if exclude_seen and self.user_seen is not None:
      indptr, indices = self.user_seen
      exclude = [self.item_ids[indices[indptr[row]:indptr[row + 1]]]]
    scores, ids = self.search(self.user_vectors[row][None], k, exclude=exclude)
    return [(i.item() if isinstance(i, np.generic) else i, self.titles[self._item_row[_id_key(i)]],
             float(s)) for i, s in zip(ids[0], scores[0]) if s > NEG_INF]

  def history_query(self, history) -> np.ndarray:
    """The query vector [E] of a user unknown at training whose history is ``history`` (raw item
    ids, oldest first), through the exported query tower; an unknown id raises KeyError naming it."""
    if self.query_tower is None:
      raise ValueError("this index holds no query tower (re-export it with `jaxrec export`), so a history "
                       "cannot be scored")
    inputs = self.query_tower.new_user_inputs([self.item_rows(history)])
    return self.query_tower(**inputs)[0]

  def recommend_history(self, history, k: int = 10, exclude_seen: bool = True):
    """[(item_id, title, score)] for an ad-hoc history (raw item ids, oldest first; the query tower
    reads its most recent items), best first, the history's items left out."""
    q_E = self.history_query(history)
    if not np.isfinite(q_E).all():
      raise ValueError("the query tower gave a NaN or inf query vector for this history")
    exclude = [list(history)] if exclude_seen and len(history) else None
    scores, ids = self.search(q_E[None], k, exclude=exclude)
    return [(i.item() if isinstance(i, np.generic) else i, self.titles[self._item_row[_id_key(i)]],
             float(s)) for i, s in zip(ids[0], scores[0]) if s > NEG_INF]

  def to_faiss(self):
    """An exact faiss.IndexFlatIP holding the item vectors (row i = item_ids[i])."""
    try:
      import faiss
    except ImportError as e:
      raise ImportError("to_faiss() needs faiss: pip install faiss-cpu") from e
    index = faiss.IndexFlatIP(self.vectors.shape[1])
    index.add(self.vectors)
    return index

  # -- persistence -----------------------------------------------------------------------------

  def _arrays(self) -> dict[str, np.ndarray]:
    arrays = {"vectors": self.vectors, "item_ids": self.item_ids}
    if self.user_vectors is not None:
      arrays.update(user_vectors=self.user_vectors, user_ids=self.user_ids)
      if self.user_seen is not None:
        arrays.update(user_seen_indptr=self.user_seen[0], user_seen_indices=self.user_seen[1])
    return arrays

  def save(self, path: str) -> None:
    """Write the index as one directory; a failed save leaves whatever was at `path` as it was.

    `path` may be absent, an empty directory or an ItemIndex (replaced whole: the new index is
    written into a temporary sibling and renamed in, then the old one, and nothing else, is
    removed). Anything else there (a file, a directory holding other things) raises
    IndexExistsError. Non-finite vectors raise ValueError; an OSError while writing (a full disk)
    raises IndexWriteError naming `path`.
    """
    import json
    import os
    import shutil
    import uuid
    path = os.path.abspath(path)
    arrays = self._arrays()
    for name in ("vectors", "user_vectors"):
      if name in arrays and (bad := _non_finite_rows(arrays[name])):
        raise ValueError(f"{bad} of {len(arrays[name])} rows of {name} hold NaN or inf; refusing to "
                         f"write {os.path.join(path, name + '.npy')}")
    for name in ("item_ids", "user_ids"):
      if name in arrays and arrays[name].dtype.kind not in _ID_KINDS:
        raise ValueError(f"{name} has dtype {arrays[name].dtype}; use int or str ids")
    check_save_target(path)  # refuse before the (possibly long) write
    needed = sum(arr.nbytes for arr in arrays.values()) + (0 if self.query_tower is None else
                                                          len(self.query_tower.serialized))
    parent = os.path.dirname(path)
    tmp = None
    try:
      os.makedirs(parent, exist_ok=True)
      tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
      os.makedirs(tmp)
      files = {}
      for name, arr in arrays.items():
        fname = f"{name}.npy"
        _write_npy(os.path.join(tmp, fname), arr)
        files[fname] = {"shape": list(arr.shape), "dtype": arr.dtype.str}
      with open(os.path.join(tmp, "titles.json"), "w", encoding="utf-8") as f:
        json.dump(self.titles, f, ensure_ascii=False)
      files["titles.json"] = {"shape": [len(self.titles)], "dtype": "json"}
      for fname, blob in ({} if self.query_tower is None else self.query_tower.files()).items():
        with open(os.path.join(tmp, fname), "wb") as f:
          f.write(blob)
          f.flush()
          os.fsync(f.fileno())
        files[fname] = {"shape": [len(blob)], "dtype": "bytes"}
      for fname, entry in files.items():
        full = os.path.join(tmp, fname)
        entry.update(bytes=os.path.getsize(full), sha256=_sha256(full))
      manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_items": len(self),
                  "dim": int(self.vectors.shape[1]), "metadata": self.metadata, "files": files}
      with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
      # Checked again: the write may have taken a while.
      if check_save_target(path) == "index":
        # rename(2) cannot replace a non-empty directory: move the old index aside first.
        old = f"{tmp}.old"
        os.rename(path, old)
        try:
          os.rename(tmp, path)
        except OSError:
          os.rename(old, path)
          raise
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.rename(tmp, path)  # replaces an empty directory; fails on anything else
      tmp = None
    except IndexExistsError:
      raise
    except OSError as e:
      raise _write_error(e, path, needed) from e
    finally:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)

  @classmethod
  def load(cls, path: str, *, verify_checksums: bool = True) -> "ItemIndex":
    """Read an index saved by `save`. A missing, truncated, corrupted or foreign file, a manifest
    off the schema or naming a path outside `path`, and non-finite vectors raise
    IndexFormatError naming the file."""
    import json
    import os
    if not os.path.exists(path):
      raise IndexFormatError(f"no ItemIndex directory at {path}")
    if not os.path.isdir(path):
      raise IndexFormatError(f"{path} is a file, not an ItemIndex directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.lexists(mpath):
      raise IndexFormatError(f"{mpath} is missing: not an ItemIndex directory (or an interrupted save)")
    if not os.path.isfile(mpath):
      raise IndexFormatError(f"{mpath} is not a regular file")
    try:
      manifest = _read_json(mpath)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise IndexFormatError(f"{mpath} is not valid JSON: {_one_line(e)}") from e
    files = _check_manifest(manifest, mpath)
    root = os.path.realpath(path)
    loaded = {}
    for fname, entry in files.items():
      full = os.path.join(path, fname)
      if os.path.commonpath([root, os.path.realpath(full)]) != root:
        raise IndexFormatError(f"{full} is a link to {os.path.realpath(full)}, outside the index "
                               f"directory")
      if not os.path.lexists(full):
        raise IndexFormatError(f"{full} is missing (listed in {MANIFEST})")
      if not os.path.isfile(full):
        raise IndexFormatError(f"{full} is not a regular file (listed in {MANIFEST})")
      size = os.path.getsize(full)
      if size != entry["bytes"]:
        raise IndexFormatError(f"{full} has {size} bytes, manifest says {entry['bytes']} (truncated?)")
      if verify_checksums and _sha256(full) != entry["sha256"]:
        raise IndexFormatError(f"{full} fails its sha256 checksum (corrupted)")
      try:
        if fname in serving.FILES:  # read whole; the query tower parses them together below
          with open(full, "rb") as f:
            value = f.read()
          shape = [len(value)]
        elif fname.endswith(".json"):
          value = _read_json(full)
          if not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise IndexFormatError(f"{full}: expected a JSON list of strings")
          shape = [len(value)]
        else:
          value = np.load(full, allow_pickle=False)
          if not isinstance(value, np.ndarray):
            raise IndexFormatError(f"{full}: not a .npy array")
          shape = list(value.shape)
          if value.dtype.str != entry["dtype"]:
            raise IndexFormatError(f"{full}: dtype {value.dtype.str}, manifest says {entry['dtype']}")
      except IndexFormatError:
        raise
      except Exception as e:  # numpy/json parse errors of a damaged file
        raise IndexFormatError(f"{full} cannot be read: {_one_line(e)}") from e
      if shape != entry["shape"]:
        raise IndexFormatError(f"{full}: shape {shape}, manifest says {entry['shape']}")
      loaded[fname] = value
    cls._check_arrays(loaded, manifest, path)
    seen = None
    if "user_seen_indptr.npy" in loaded:
      seen = (loaded["user_seen_indptr.npy"], loaded["user_seen_indices.npy"])
    query_tower = None
    if serving.EXPORT_FILE in loaded:
      try:
        query_tower = serving.QueryTower.from_files({f: loaded.pop(f) for f in serving.FILES},
                                                    os.path.join(path, serving.SPEC_FILE))
      except Exception as e:  # a spec or examples file that checksummed but does not parse
        raise IndexFormatError(f"{path}: the query tower's files cannot be read: {_one_line(e)}") from e
    try:
      return cls(loaded["vectors.npy"], loaded["item_ids.npy"], loaded["titles.json"],
                 manifest.get("metadata"), user_vectors=loaded.get("user_vectors.npy"),
                 user_ids=loaded.get("user_ids.npy"), user_seen=seen, query_tower=query_tower)
    except ValueError as e:
      raise IndexFormatError(f"{path}: inconsistent contents: {_one_line(e)}") from e

  @staticmethod
  def _check_arrays(loaded, manifest, path) -> None:
    """Shapes, dtypes and finiteness across files, each failure naming its file."""
    import os
    num_n, dim = manifest["num_items"], manifest["dim"]
    rows = lambda fname: loaded[fname].shape[0] if fname in loaded and loaded[fname].ndim else 0
    num_u, num_t = rows("user_ids.npy"), rows("user_seen_indices.npy")
    expected = {"vectors.npy": ((num_n, dim), "f"), "item_ids.npy": ((num_n,), _ID_KINDS),
                "titles.json": ((num_n,), None), "user_vectors.npy": ((num_u, dim), "f"),
                "user_ids.npy": ((num_u,), _ID_KINDS), "user_seen_indptr.npy": ((num_u + 1,), "iu"),
                "user_seen_indices.npy": ((num_t,), "iu")}
    for fname, value in loaded.items():
      if fname in serving.FILES:  # bytes, checked when the query tower reads them
        continue
      shape, kinds = expected[fname]
      full = os.path.join(path, fname)
      got = (len(value),) if fname.endswith(".json") else value.shape
      if got != shape:
        raise IndexFormatError(f"{full}: shape {list(got)}, expected {list(shape)} for "
                               f"num_items={num_n}, dim={dim}, {num_u} users")
      if kinds == "f" and value.dtype != np.float32:
        raise IndexFormatError(f"{full}: dtype {value.dtype}, expected float32")
      if kinds and kinds != "f" and value.dtype.kind not in kinds:
        expect = "integer or string ids" if kinds == _ID_KINDS else "integer"
        raise IndexFormatError(f"{full}: dtype {value.dtype}, expected {expect}")
      if kinds == "f" and (bad := _non_finite_rows(value)):
        raise IndexFormatError(f"{full}: {bad} of {len(value)} rows hold NaN or inf")
