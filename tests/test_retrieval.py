"""Exactness of jaxrec.retrieval against a numpy brute-force reference.

Exact equality is meaningful because test data are dyadic: every entry is a multiple of 1/8 in
[-1, 1] and E <= 64, so each dot product is exactly representable in float32 (and bfloat16 holds
the inputs exactly) and no summation order can change a score. Small value ranges also make
exact ties common, which exercises the lower-index tie-break.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxrec import retrieval
from jaxrec.retrieval import topk


def dyadic(rng, shape, levels=8):
  return (rng.integers(-levels, levels + 1, size=shape) / levels).astype(np.float32)


def reference(q_BxE, c_NxE, k, *, exclude=None, valid=None):
  """Brute force: float64 scores (exact for dyadic data), sort by (-score, index)."""
  s_BxN = q_BxE.astype(np.float64) @ c_NxE.astype(np.float64).T
  num_b, num_n = s_BxN.shape
  k = min(k, num_n)  # topk's contract: never more columns than corpus rows
  keep_BxN = ~np.isnan(s_BxN)
  if valid is not None:
    keep_BxN &= valid[None, :]
  if exclude is not None:
    if exclude.dtype == np.bool_:
      keep_BxN &= ~exclude
    else:
      for b in range(num_b):
        ids = exclude[b][exclude[b] >= 0]
        keep_BxN[b, ids] = False
  vals = np.full((num_b, k), -np.inf, np.float32)
  idx = np.full((num_b, k), -1, np.int32)
  for b in range(num_b):
    rows = np.nonzero(keep_BxN[b] & (s_BxN[b] > -np.inf))[0]
    order = np.lexsort((rows, -s_BxN[b, rows]))[:k]
    vals[b, :len(order)] = s_BxN[b, rows[order]]
    idx[b, :len(order)] = rows[order]
  return vals, idx


def assert_exact(got, want):
  gv, gi = (np.asarray(x) for x in got)
  wv, wi = want
  assert gv.dtype == np.float32 and gi.dtype == np.int32
  np.testing.assert_array_equal(gi, wi)
  np.testing.assert_array_equal(gv, wv)


@pytest.mark.parametrize("num_b,num_n,dim,k,block", [
    (5, 1000, 16, 10, 128),     # N not a multiple of the block
    (7, 257, 64, 33, 64),
    (3, 50, 8, 50, None),       # k = N
    (3, 50, 8, 64, 16),         # k > N: clamped to N columns
    (4, 1, 8, 3, None),         # N = 1
    (1, 300, 4, 7, 300),        # one block exactly
])
def test_random_dyadic_matches_reference(num_b, num_n, dim, k, block):
  rng = np.random.default_rng(num_n * 31 + k)
  q, c = dyadic(rng, (num_b, dim)), dyadic(rng, (num_n, dim))
  assert_exact(topk(q, c, k, block_size=block), reference(q, c, k))


def test_many_ties_break_by_lower_index():
  rng = np.random.default_rng(1)
  # Entries in {-1, 0, 1} and E = 3: only 7 distinct scores over 600 rows.
  q = rng.integers(-1, 2, size=(6, 3)).astype(np.float32)
  c = rng.integers(-1, 2, size=(600, 3)).astype(np.float32)
  got = topk(q, c, 40, block_size=64)
  assert_exact(got, reference(q, c, 40))
  # Every row of the result is sorted by (-score, index).
  v, i = (np.asarray(x) for x in got)
  for b in range(6):
    assert np.all(np.diff(v[b]) <= 0)
    same = np.diff(v[b]) == 0
    assert np.all(np.diff(i[b])[same] > 0)


def test_duplicate_rows_all_returned_in_index_order():
  rng = np.random.default_rng(2)
  base = dyadic(rng, (20, 16))
  c = np.concatenate([base, base, base], axis=0)  # every row appears 3 times
  q = dyadic(rng, (4, 16))
  got = topk(q, c, 9, block_size=7)
  assert_exact(got, reference(q, c, 9))
  v, i = (np.asarray(x) for x in got)
  assert np.all(v[:, 0] == v[:, 1]) and np.all(v[:, 1] == v[:, 2])
  np.testing.assert_array_equal(i[:, 1] - i[:, 0], 20)


def test_exclude_ids_that_would_otherwise_win():
  rng = np.random.default_rng(3)
  q, c = dyadic(rng, (6, 16)), dyadic(rng, (333, 16))
  best = reference(q, c, 5)[1]
  exclude = np.full((6, 8), -1, np.int32)
  exclude[:, :5] = best  # knock out each query's whole top-5
  exclude[0, 5] = 332  # and an id in the last (partial) block
  got = topk(q, c, 5, exclude=exclude, block_size=50)
  assert_exact(got, reference(q, c, 5, exclude=exclude))
  assert not np.isin(np.asarray(got[1]), best).all(axis=1).any()


def test_exclude_bool_mask_and_valid():
  rng = np.random.default_rng(4)
  q, c = dyadic(rng, (5, 8)), dyadic(rng, (130, 8))
  mask = rng.random((5, 130)) < 0.3
  valid = rng.random(130) < 0.8
  got = topk(q, c, 12, exclude=mask, valid=valid, block_size=32)
  assert_exact(got, reference(q, c, 12, exclude=mask, valid=valid))


def test_all_items_excluded_gives_neg_inf_and_minus_one():
  rng = np.random.default_rng(5)
  q, c = dyadic(rng, (3, 8)), dyadic(rng, (10, 8))
  exclude = np.full((3, 12), -1, np.int32)
  exclude[1, :10] = np.arange(10)  # query 1 has nothing left
  exclude[2, :7] = np.arange(7)  # query 2 has 3 items left for k = 4
  v, i = (np.asarray(x) for x in topk(q, c, 4, exclude=exclude, block_size=4))
  assert np.all(v[1] == -np.inf) and np.all(i[1] == -1)
  assert np.all(i[2, :3] >= 7) and i[2, 3] == -1 and v[2, 3] == -np.inf
  assert_exact((v, i), reference(q, c, 4, exclude=exclude))


def test_nan_rows_are_never_returned():
  rng = np.random.default_rng(6)
  q, c = dyadic(rng, (4, 8)), dyadic(rng, (40, 8))
  c[[3, 17, 39], 2] = np.nan
  v, i = (np.asarray(x) for x in topk(q, c, 40, block_size=16))
  assert not np.isin(i, [3, 17, 39]).any()
  assert np.all(i[:, -3:] == -1) and np.all(v[:, -3:] == -np.inf)
  assert_exact((v, i), reference(q, c, 40))


def test_bf16_inputs_accumulate_in_f32():
  rng = np.random.default_rng(7)
  q, c = dyadic(rng, (4, 64)), dyadic(rng, (500, 64))
  got = topk(jnp.asarray(q, jnp.bfloat16), jnp.asarray(c, jnp.bfloat16), 10, block_size=128)
  assert got[0].dtype == jnp.float32
  # Scores up to 64 with 1/64 steps need 13 significant bits: more than bf16 holds.
  assert_exact(got, reference(q, c, 10))


def test_gaussian_data_matches_f32_scores():
  rng = np.random.default_rng(8)
  q = rng.standard_normal((16, 32)).astype(np.float32)
  c = rng.standard_normal((2000, 32)).astype(np.float32)
  v, i = (np.asarray(x) for x in topk(q, c, 20, block_size=300))
  s = q.astype(np.float64) @ c.astype(np.float64).T
  want = np.argsort(-s, axis=1, kind="stable")[:, :20]
  # Gaussian scores have no near-ties at this size, so indices must match exactly and scores
  # to float32 rounding of a 32-term dot product.
  np.testing.assert_array_equal(i, want)
  np.testing.assert_allclose(v, np.take_along_axis(s, want, 1), rtol=0, atol=2e-5)


def test_works_inside_jit():
  rng = np.random.default_rng(10)
  q, c = dyadic(rng, (4, 16)), dyadic(rng, (100, 16))
  ex = np.full((4, 2), -1, np.int32)
  ex[0, 0] = 5
  f = jax.jit(lambda q, c, ex: topk(q, c, 6, exclude=ex, block_size=32))
  assert_exact(f(q, c, ex), reference(q, c, 6, exclude=ex))


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be a positive"),
    (dict(k=-3), "k must be a positive"),
    (dict(k=2.5), "k must be a positive"),
    (dict(k=2, corpus=np.zeros((10, 7), np.float32)), "embedding dims differ"),
    (dict(k=2, queries=np.zeros((8,), np.float32)), "2-D"),
    (dict(k=2, exclude=np.array([[0, 10]] * 3)), r"exclude\[0, 1\] = 10"),
    (dict(k=2, exclude=np.array([[-2]] * 3)), r"exclude\[0, 0\] = -2"),
    (dict(k=2, exclude=np.array([[0]] * 2)), "exclude needs one row per query: 3 queries, got 2"),
    (dict(k=2, exclude=np.zeros((3, 9), bool)), "exclude mask must be bool"),
    (dict(k=2, valid=np.ones(9, bool)), "valid must be bool"),
])
def test_bad_input_raises(kwargs, match):
  args = dict(queries=np.zeros((3, 8), np.float32), corpus=np.zeros((10, 8), np.float32))
  args.update(kwargs)
  k = args.pop("k")
  with pytest.raises(ValueError, match=match):
    topk(args.pop("queries"), args.pop("corpus"), k, **args)


# -- sharded corpus ----------------------------------------------------------------------------


def mesh_of(shape, names):
  return jax.sharding.Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


@pytest.mark.parametrize("shape,names,items_axes", [
    ((8,), ("items",), None),
    ((4, 2), ("data", "model"), None),
    ((4, 2), ("data", "model"), ("model",)),
])
@pytest.mark.parametrize("num_n", [1003, 5])  # not a multiple of 8; fewer rows than shards
def test_sharded_equals_unsharded(shape, names, items_axes, num_n):
  rng = np.random.default_rng(num_n)
  q, c = dyadic(rng, (6, 16), levels=2), dyadic(rng, (num_n, 16), levels=2)  # many ties
  exclude = np.full((6, 4), -1, np.int32)
  exclude[:, 0] = reference(q, c, 1)[1][:, 0]
  exclude[2, 1] = num_n - 1
  mesh = mesh_of(shape, names)
  for k in (1, 7, num_n + 3):
    want = reference(q, c, k, exclude=exclude)
    single = topk(q, c, k, exclude=exclude, block_size=64)
    sharded = topk(q, c, k, exclude=exclude, block_size=64, mesh=mesh, items_axes=items_axes)
    assert_exact(single, want)
    assert_exact(sharded, want)


def test_sharded_with_mask_and_valid():
  rng = np.random.default_rng(11)
  q, c = dyadic(rng, (5, 8)), dyadic(rng, (301, 8))
  mask = rng.random((5, 301)) < 0.2
  valid = rng.random(301) < 0.9
  c[100, 0] = np.nan
  mesh = mesh_of((4, 2), ("data", "model"))
  got = topk(q, c, 15, exclude=mask, valid=valid, mesh=mesh, block_size=16)
  assert_exact(got, reference(q, c, 15, exclude=mask, valid=valid))


# -- memory ------------------------------------------------------------------------------------


def test_peak_memory_is_far_below_the_full_score_matrix():
  """B=4096, N=1M, E=64, K=100 compiled (not run): temporaries stay O(B * (K + C))."""
  num_b, num_n, k = 4096, 1_000_000, 100
  q = jax.ShapeDtypeStruct((num_b, 64), jnp.float32)
  c = jax.ShapeDtypeStruct((num_n, 64), jnp.float32)
  stats = retrieval.topk_memory_analysis(q, c, k)
  full_scores = num_b * num_n * 4  # 16.4 GB for a naive q @ c.T
  assert stats.temp_size_in_bytes < full_scores / 50
  assert stats.temp_size_in_bytes < 512 << 20


# -- ItemIndex ---------------------------------------------------------------------------------


def make_index(rng, num_n=60, dim=8, num_u=5, str_ids=False):
  vecs = dyadic(rng, (num_n, dim))
  ids = np.array([f"i{i}" for i in range(num_n)]) if str_ids else np.arange(1000, 1000 + num_n)
  titles = [f"title {i}" for i in range(num_n)]
  users = dyadic(rng, (num_u, dim))
  seen_rows = [rng.choice(num_n, size=u + 1, replace=False) for u in range(num_u)]
  indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen_rows])])
  return retrieval.ItemIndex(vecs, ids, titles, metadata={"config_hash": "abc", "step": 7},
                             user_vectors=users, user_ids=np.arange(10, 10 + num_u),
                             user_seen=(indptr, np.concatenate(seen_rows)))


@pytest.mark.parametrize("str_ids", [False, True])
def test_index_round_trip_same_results(tmp_path, str_ids):
  rng = np.random.default_rng(12)
  index = make_index(rng, str_ids=str_ids)
  q = dyadic(rng, (3, 8))
  index.save(str(tmp_path / "idx"))
  loaded = retrieval.ItemIndex.load(str(tmp_path / "idx"))
  assert loaded.metadata == {"config_hash": "abc", "step": 7}
  np.testing.assert_array_equal(loaded.item_ids, index.item_ids)
  ex = [index.item_ids[[0, 5]].tolist()] * 3
  for a, b in zip(index.search(q, 12, exclude=ex), loaded.search(q, 12, exclude=ex)):
    np.testing.assert_array_equal(a, b)
  # Same as the kernel on rows, mapped to raw ids.
  s, rows = reference(q, index.vectors, 12, exclude=np.tile([[0, 5]], (3, 1)).astype(np.int32))
  got_s, got_ids = loaded.search(q, 12, exclude=ex)
  np.testing.assert_array_equal(got_s, s)
  np.testing.assert_array_equal(got_ids, index.item_ids[rows])
  assert loaded.recommend(12, k=4) == index.recommend(12, k=4)


def test_index_save_replaces_existing_directory(tmp_path):
  rng = np.random.default_rng(13)
  make_index(rng, num_n=10).save(str(tmp_path / "idx"))
  make_index(rng, num_n=20).save(str(tmp_path / "idx"))
  assert len(retrieval.ItemIndex.load(str(tmp_path / "idx"))) == 20
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dirs left behind


def test_index_search_include_exclude_per_query():
  rng = np.random.default_rng(14)
  index = make_index(rng)
  q = dyadic(rng, (2, 8))
  include = [[1001, 1002, 1003], [1010, 1011, 1012]]
  # k = 4 is clamped to 3, the most candidates a query has; query 0 fills only 2 slots.
  s, ids = index.search(q, 4, include=include, exclude=[[1002], []])
  assert ids.shape == s.shape == (2, 3)
  assert set(ids[0][:2]) == {1001, 1003} and ids[0][2] == -1 and s[0][2] == -np.inf
  assert set(ids[1]) == {1010, 1011, 1012}
  s1, ids1 = index.search(q[0], 3)  # a single query gives 1-D results
  assert ids1.shape == (3,) and s1.shape == (3,)
  with pytest.raises(KeyError, match="unknown item id 99"):
    index.search(q, 3, exclude=[99])


def test_index_recommend_uses_user_vector_and_skips_seen():
  rng = np.random.default_rng(15)
  index = make_index(rng)
  recs = index.recommend(13, k=5)
  row = 3
  indptr, indices = index.user_seen
  seen = indices[indptr[row]:indptr[row + 1]]
  _, want_rows = reference(index.user_vectors[row:row + 1], index.vectors, 5,
                           exclude=seen[None].astype(np.int32))
  assert [r[0] for r in recs] == index.item_ids[want_rows[0]].tolist()
  assert [r[1] for r in recs] == [index.titles[i] for i in want_rows[0]]
  assert all(isinstance(r[2], float) for r in recs)
  assert not set(index.item_ids[seen]) & {r[0] for r in recs}
  all_recs = index.recommend(13, k=5, exclude_seen=False)
  assert all_recs[0][2] >= recs[0][2]
  with pytest.raises(KeyError, match="unknown user id 999"):
    index.recommend(999)


def test_index_to_faiss_matches_search():
  faiss = pytest.importorskip("faiss")  # optional dependency (pip install faiss-cpu)
  rng = np.random.default_rng(16)
  index = make_index(rng)
  q = rng.standard_normal((3, 8)).astype(np.float32)
  fi = index.to_faiss()
  assert isinstance(fi, faiss.IndexFlatIP) and fi.ntotal == len(index)
  _, rows = fi.search(q, 5)
  np.testing.assert_array_equal(index.item_ids[rows], index.search(q, 5)[1])


def _corrupt(path, fname, how):
  full = path / fname
  data = full.read_bytes()
  if how == "truncate":
    full.write_bytes(data[:len(data) // 2])
  elif how == "flip":
    full.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  elif how == "delete":
    full.unlink()


@pytest.mark.parametrize("fname,how,match", [
    ("vectors.npy", "truncate", "vectors.npy has .* bytes"),
    ("vectors.npy", "flip", "vectors.npy fails its sha256"),
    ("titles.json", "delete", "titles.json is missing"),
    ("user_vectors.npy", "truncate", "user_vectors.npy has"),
    ("manifest.json", "delete", "manifest.json is missing"),
    ("manifest.json", "truncate", "manifest.json is not valid JSON"),
])
def test_index_load_rejects_damaged_files(tmp_path, fname, how, match):
  make_index(np.random.default_rng(17)).save(str(tmp_path / "idx"))
  _corrupt(tmp_path / "idx", fname, how)
  with pytest.raises(retrieval.IndexFormatError, match=match):
    retrieval.ItemIndex.load(str(tmp_path / "idx"))


def test_index_load_rejects_other_versions_and_shapes(tmp_path):
  import json
  make_index(np.random.default_rng(18)).save(str(tmp_path / "idx"))
  mpath = tmp_path / "idx" / "manifest.json"
  manifest = json.loads(mpath.read_text())
  mpath.write_text(json.dumps(dict(manifest, version=99)))
  with pytest.raises(retrieval.IndexFormatError, match="format version 99"):
    retrieval.ItemIndex.load(str(tmp_path / "idx"))
  manifest["files"]["vectors.npy"]["shape"] = [61, 8]
  mpath.write_text(json.dumps(manifest))
  with pytest.raises(retrieval.IndexFormatError, match=r"vectors.npy: shape \[60, 8\], manifest says \[61, 8\]"):
    retrieval.ItemIndex.load(str(tmp_path / "idx"))
  with pytest.raises(retrieval.IndexFormatError, match="no ItemIndex directory"):
    retrieval.ItemIndex.load(str(tmp_path / "nowhere"))


# -- the kernel's tiling, forced small -----------------------------------------------------------


@pytest.mark.parametrize("chunk", [16, 8])
@pytest.mark.parametrize("with_valid", [False, True])
def test_kernel_tiling_query_tiles_super_blocks_and_ties(with_valid, chunk):
  """Several query tiles, super-blocks, full tiles and a tail, exact ties across chunk, group
  and super-block boundaries, and exclusions that inflate chunk maxima."""
  rng = np.random.default_rng(19)
  num_b, num_n, k = 21, 1700, 37
  q = dyadic(rng, (num_b, 4), levels=1)  # few distinct scores: ties everywhere
  c = dyadic(rng, (num_n, 4), levels=1)
  exclude = np.full((num_b, 16), -1, np.int32)
  exclude[:, :12] = reference(q, c, 12)[1]
  valid = rng.random(num_n) < 0.7 if with_valid else None
  plan = dict(tile=256, q_tile=8, super_rows=768, refine_rows=64, chunk=chunk,
              group=retrieval.GROUP)
  f = jax.jit(lambda q, c, v, e: retrieval._exact_topk(q, c, v, e, None, k=k, **plan))
  got = retrieval._finalize(*f(q, c, None if valid is None else jnp.asarray(valid), exclude))
  assert_exact(got, reference(q, c, k, exclude=exclude, valid=valid))


@pytest.mark.parametrize("chunk", [16, 8])
def test_kernel_tiling_with_bool_mask(chunk):
  rng = np.random.default_rng(20)
  q, c = dyadic(rng, (10, 8), levels=2), dyadic(rng, (1300, 8), levels=2)
  mask = rng.random((10, 1300)) < 0.5
  plan = dict(tile=512, q_tile=8, super_rows=1024, refine_rows=256, chunk=chunk,
              group=retrieval.GROUP)
  f = jax.jit(lambda q, c, m: retrieval._exact_topk(q, c, None, None, m, k=30, **plan))
  assert_exact(retrieval._finalize(*f(q, c, mask)), reference(q, c, 30, exclude=mask))


@pytest.mark.parametrize("k,dim,chunk", [(10, 64, 16), (100, 64, 16), (100, 384, 8), (10, 384, 16)])
def test_plan_picks_small_chunks_for_large_k_times_dim(k, dim, chunk):
  assert retrieval._plan(4096, 100_000, 0, k, dim)["chunk"] == chunk


def test_large_k_wide_rows_use_8_row_chunks_exactly():
  """k * E >= 8192 takes the 8-row-chunk path through the public entry point."""
  rng = np.random.default_rng(22)
  q, c = dyadic(rng, (9, 128), levels=1), dyadic(rng, (3000, 128), levels=1)
  exclude = np.full((9, 4), -1, np.int32)
  exclude[:, :3] = reference(q, c, 3)[1]
  assert_exact(topk(q, c, 70, exclude=exclude, block_size=512),
               reference(q, c, 70, exclude=exclude))


def test_non_finite_queries_return_nothing():
  rng = np.random.default_rng(21)
  q, c = dyadic(rng, (3, 8)), dyadic(rng, (300, 8))
  q[1, 0] = np.nan
  q[2, 3] = np.inf
  v, i = (np.asarray(x) for x in topk(q, c, 5))
  assert np.all(i[1:] == -1) and np.all(v[1:] == -np.inf)
  assert_exact((v[:1], i[:1]), reference(q[:1], c, 5))


# -- odd input the kernel meets ------------------------------------------------------------------


def test_zero_queries_give_empty_results():
  c = dyadic(np.random.default_rng(23), (30, 8))
  q = np.zeros((0, 8), np.float32)
  for kwargs in (dict(), dict(exclude=np.zeros((0, 3), np.int32)),
                 dict(exclude=np.zeros((0, 30), bool)), dict(exclude=[]),
                 dict(mesh=mesh_of((8,), ("items",)))):
    v, i = topk(q, c, 5, **kwargs)
    assert v.shape == i.shape == (0, 5) and v.dtype == jnp.float32 and i.dtype == jnp.int32
  assert topk(q, c, 99)[0].shape == (0, 30)


def test_k_beyond_the_corpus_is_clamped_not_allocated():
  rng = np.random.default_rng(24)
  q, c = dyadic(rng, (3, 8)), dyadic(rng, (40, 8))
  for mesh in (None, mesh_of((8,), ("items",))):
    got = topk(q, c, 10**9, mesh=mesh)  # a [3, 10**9] buffer would need 12 GB
    assert got[0].shape == (3, 40)
    assert_exact(got, reference(q, c, 40))


def test_exclude_accepts_ragged_per_query_lists():
  rng = np.random.default_rng(25)
  q, c = dyadic(rng, (3, 8)), dyadic(rng, (200, 8))
  best = reference(q, c, 3)[1]
  ragged = [best[0, :1].tolist(), [], np.asarray(best[2])]
  padded = np.full((3, 3), -1, np.int32)
  padded[0, :1], padded[2] = best[0, :1], best[2]
  assert_exact(topk(q, c, 6, exclude=ragged), reference(q, c, 6, exclude=padded))
  # Another ragged list of the same widest row reuses the compiled kernel.
  compiled = retrieval._topk_single._cache_size()
  topk(q, c, 6, exclude=[[1, 2, 3], [4], []])
  assert retrieval._topk_single._cache_size() == compiled
  assert_exact(topk(q, c, 6, exclude=[[], [], []]), reference(q, c, 6))
  # Today's rectangular forms still work.
  assert_exact(topk(q, c, 6, exclude=padded.tolist()), reference(q, c, 6, exclude=padded))
  mask = np.zeros((3, 200), bool)
  mask[1, best[1]] = True
  assert_exact(topk(q, c, 6, exclude=mask.tolist()), reference(q, c, 6, exclude=mask))


@pytest.mark.parametrize("exclude,match", [
    ([[0], []], "exclude needs one row per query: 3 queries, got 2 rows"),
    ([[0], [], [1], [2, 3]], "exclude needs one row per query: 3 queries, got 4 rows"),
    ([[0], [], [0.5, 1.5]], r"exclude\[2\] must be a list of int corpus rows"),
    ([[0], [], [99]], r"exclude ids must be in \[0, 10\)"),
])
def test_bad_ragged_exclude_raises_one_line(exclude, match):
  with pytest.raises(ValueError, match=match) as e:
    topk(np.zeros((3, 8), np.float32), np.zeros((10, 8), np.float32), 2, exclude=exclude)
  assert "\n" not in str(e.value)


# -- ItemIndex: never losing work, never trusting the manifest ---------------------------------


def _one_line_naming(excinfo, path):
  message = str(excinfo.value)
  assert "\n" not in message and str(path) in message, message


def test_index_save_refuses_an_existing_file(tmp_path):
  target = tmp_path / "notes.txt"
  target.write_text("mine")
  with pytest.raises(retrieval.IndexExistsError, match="exists and is not a directory") as e:
    make_index(np.random.default_rng(26)).save(str(target))
  _one_line_naming(e, target)
  assert target.read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_index_save_refuses_a_directory_that_is_not_an_index(tmp_path):
  work = tmp_path / "run"
  (work / "checkpoints" / "20").mkdir(parents=True)
  (work / "checkpoints" / "20" / "state").write_bytes(b"weights")
  (work / "metrics.json").write_text("{}")
  with pytest.raises(retrieval.IndexExistsError, match="without an ItemIndex manifest") as e:
    make_index(np.random.default_rng(27)).save(str(work))
  _one_line_naming(e, work)
  assert (work / "checkpoints" / "20" / "state").read_bytes() == b"weights"
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "metrics.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left behind


def test_index_save_refuses_an_index_holding_other_files(tmp_path):
  make_index(np.random.default_rng(28), num_n=10).save(str(tmp_path / "idx"))
  (tmp_path / "idx" / "notes.txt").write_text("mine")
  with pytest.raises(retrieval.IndexExistsError, match=r"1 other entries \(notes.txt\)"):
    make_index(np.random.default_rng(28), num_n=20).save(str(tmp_path / "idx"))
  assert len(retrieval.ItemIndex.load(str(tmp_path / "idx"))) == 10
  assert (tmp_path / "idx" / "notes.txt").read_text() == "mine"


def test_index_save_into_an_empty_directory_and_over_an_index_touches_nothing_else(tmp_path):
  (tmp_path / "idx").mkdir()
  (tmp_path / "neighbour.txt").write_text("mine")
  make_index(np.random.default_rng(29), num_n=10).save(str(tmp_path / "idx"))
  assert len(retrieval.ItemIndex.load(str(tmp_path / "idx"))) == 10
  make_index(np.random.default_rng(29), num_n=20).save(str(tmp_path / "idx"))
  assert len(retrieval.ItemIndex.load(str(tmp_path / "idx"))) == 20
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "neighbour.txt"]


def test_index_save_on_a_full_disk_names_the_path_and_keeps_the_old_index(tmp_path, monkeypatch):
  import errno
  path = tmp_path / "idx"
  make_index(np.random.default_rng(30), num_n=10).save(str(path))
  before = {p.name: p.read_bytes() for p in path.iterdir()}
  new = make_index(np.random.default_rng(31), num_n=20)
  written = []
  real_write = retrieval._write_npy

  def write_until_full(file, arr):
    if len(written) == 2:  # the third array hits a full disk halfway
      with open(file, "wb") as f:
        f.write(b"\0" * (arr.nbytes // 2))
      raise OSError(errno.ENOSPC, "No space left on device")
    written.append(file)
    real_write(file, arr)

  monkeypatch.setattr(retrieval, "_write_npy", write_until_full)
  with pytest.raises(retrieval.IndexWriteError, match="no space left on device") as e:
    new.save(str(path))
  _one_line_naming(e, path)
  needed = sum(a.nbytes for a in new._arrays().values())
  assert f"need {needed:,} bytes" in str(e.value) and e.value.errno == errno.ENOSPC
  assert {p.name: p.read_bytes() for p in path.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # the temporary is gone
  assert len(retrieval.ItemIndex.load(str(path))) == 10


def test_index_save_other_os_errors_name_the_path(tmp_path, monkeypatch):
  import errno

  def denied(file, arr):
    raise PermissionError(errno.EACCES, "Permission denied", file)

  monkeypatch.setattr(retrieval, "_write_npy", denied)
  with pytest.raises(retrieval.IndexWriteError, match="Permission denied") as e:
    make_index(np.random.default_rng(32)).save(str(tmp_path / "idx"))
  _one_line_naming(e, tmp_path / "idx")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["vectors", "user_vectors"])
def test_index_save_refuses_non_finite_vectors(tmp_path, which):
  index = make_index(np.random.default_rng(33))
  getattr(index, which)[[1, 3], 0] = np.nan
  getattr(index, which)[3, 1] = np.inf
  with pytest.raises(ValueError, match=f"2 of .* rows of {which} hold NaN or inf") as e:
    index.save(str(tmp_path / "idx"))
  _one_line_naming(e, tmp_path / "idx" / f"{which}.npy")
  assert list(tmp_path.iterdir()) == []


def test_recommend_refuses_a_non_finite_user_vector():
  index = make_index(np.random.default_rng(34))
  index.user_vectors[2, 0] = np.nan
  with pytest.raises(ValueError, match="user 12 has a NaN or inf query vector"):
    index.recommend(12)


def test_index_search_and_recommend_clamp_k_to_the_candidates():
  index = make_index(np.random.default_rng(35), num_n=60)
  q = dyadic(np.random.default_rng(36), (2, 8))
  s, ids = index.search(q, 10**9)  # a [2, 10**9] result would need 8 GB
  assert s.shape == ids.shape == (2, 60) and np.all(ids >= 1000)
  assert index.search(q, 10**9, exclude=[[1000, 1001], [1002]])[1].shape == (2, 59)
  assert index.search(q, 5, exclude=index.item_ids.tolist())[1].shape == (2, 0)
  recs = index.recommend(13, k=10**9)
  assert len(recs) == 60 - 4  # user 13 knows 4 items
  with pytest.raises(ValueError, match="k must be a positive int"):
    index.search(q, 0)


def _rewrite(idx, fname, value, *, fix_manifest=True):
  """Replace one file of a saved index, and make the manifest agree with it (size, checksum)."""
  import json
  full = idx / fname
  if fname.endswith(".json"):
    full.write_text(json.dumps(value))
  else:
    np.save(full, value)
  if fix_manifest:
    mpath = idx / "manifest.json"
    manifest = json.loads(mpath.read_text())
    entry = manifest["files"][fname]
    entry.update(bytes=full.stat().st_size, sha256=retrieval._sha256(full))
    if not fname.endswith(".json"):
      entry.update(shape=list(value.shape), dtype=value.dtype.str)
    else:
      entry.update(shape=[len(value)])
    mpath.write_text(json.dumps(manifest))


def _edit_manifest(manifest, how):
  files = manifest["files"]
  if how == "not an object":
    return [manifest]
  if how == "num_items a string":
    manifest["num_items"] = "60"
  elif how == "version true":
    manifest["version"] = True
  elif how == "no files":
    del manifest["files"]
  elif how == "entry a string":
    files["vectors.npy"] = "vectors"
  elif how == "shape a string":
    files["vectors.npy"]["shape"] = "60x8"
  elif how == "bytes a string":
    files["vectors.npy"]["bytes"] = "many"
  elif how == "unknown file":
    files["extra.npy"] = dict(files["vectors.npy"])
  elif how == "parent path":
    files["../outside.npy"] = dict(files["vectors.npy"])
  elif how == "absolute path":
    files["/etc/passwd"] = dict(files["vectors.npy"])
  elif how == "users without ids":
    del files["user_ids.npy"]
  elif how == "no titles":
    del files["titles.json"]
  return manifest


@pytest.mark.parametrize("how,match", [
    ("not an object", "expected a JSON object, got list"),
    ("num_items a string", "num_items must be a non-negative int, got '60'"),
    ("version true", "format version True"),
    ("no files", "files must be an object"),
    ("entry a string", r"files\['vectors.npy'\] must be an object"),
    ("shape a string", r"files\['vectors.npy'\].shape must be a list"),
    ("bytes a string", r"files\['vectors.npy'\] needs dtype \(string\), bytes \(int\)"),
    ("unknown file", "unknown file 'extra.npy'"),
    ("parent path", "'../outside.npy' lies outside the index directory"),
    ("absolute path", "'/etc/passwd' lies outside the index directory"),
    ("users without ids", "lists user_vectors.npy without user_ids.npy"),
    ("no titles", "lists no titles.json"),
])
def test_index_load_validates_the_manifest_schema(tmp_path, how, match):
  import json
  idx = tmp_path / "idx"
  make_index(np.random.default_rng(37)).save(str(idx))
  # A file outside the index that a traversing manifest could point at, checksum and all.
  np.save(tmp_path / "outside.npy", np.zeros((60, 8), np.float32))
  mpath = idx / "manifest.json"
  mpath.write_text(json.dumps(_edit_manifest(json.loads(mpath.read_text()), how)))
  with pytest.raises(retrieval.IndexFormatError, match=match) as e:
    retrieval.ItemIndex.load(str(idx))
  _one_line_naming(e, mpath)


def test_index_load_refuses_a_symlink_out_of_the_index(tmp_path):
  idx = tmp_path / "idx"
  make_index(np.random.default_rng(38)).save(str(idx))
  outside = tmp_path / "elsewhere.npy"
  (idx / "vectors.npy").rename(outside)
  (idx / "vectors.npy").symlink_to(outside)
  with pytest.raises(retrieval.IndexFormatError, match="outside the index directory") as e:
    retrieval.ItemIndex.load(str(idx))
  _one_line_naming(e, idx / "vectors.npy")


@pytest.mark.parametrize("fname", ["titles.json", "vectors.npy", "manifest.json"])
def test_index_load_refuses_a_directory_where_a_file_belongs(tmp_path, fname):
  idx = tmp_path / "idx"
  make_index(np.random.default_rng(39)).save(str(idx))
  (idx / fname).unlink()
  (idx / fname).mkdir()
  with pytest.raises(retrieval.IndexFormatError, match="is not a regular file") as e:
    retrieval.ItemIndex.load(str(idx))
  _one_line_naming(e, idx / fname)


def test_index_load_refuses_a_file_for_a_directory(tmp_path):
  (tmp_path / "idx").write_text("not an index")
  with pytest.raises(retrieval.IndexFormatError, match="is a file, not an ItemIndex directory"):
    retrieval.ItemIndex.load(str(tmp_path / "idx"))


@pytest.mark.parametrize("fname,value,match", [
    ("item_ids.npy", np.arange(59), r"item_ids.npy: shape \[59\], expected \[60\]"),
    ("vectors.npy", np.zeros((60, 8)), "vectors.npy: dtype float64, expected float32"),
    ("vectors.npy", np.zeros((60, 7), np.float32), r"vectors.npy: shape \[60, 7\], expected \[60, 8\]"),
    ("user_ids.npy", np.linspace(0, 1, 5), "user_ids.npy: dtype float64, expected integer or string"),
    ("user_seen_indptr.npy", np.zeros(3, np.int64), r"user_seen_indptr.npy: shape \[3\], expected \[6\]"),
    ("titles.json", {"a": "b"}, "titles.json: expected a JSON list of strings"),
    ("titles.json", ["t"] * 59, r"titles.json: shape \[59\], expected \[60\]"),
])
def test_index_load_checks_arrays_against_each_other(tmp_path, fname, value, match):
  idx = tmp_path / "idx"
  make_index(np.random.default_rng(40)).save(str(idx))
  _rewrite(idx, fname, value)
  with pytest.raises(retrieval.IndexFormatError, match=match) as e:
    retrieval.ItemIndex.load(str(idx))
  _one_line_naming(e, idx / fname)


@pytest.mark.parametrize("fname", ["vectors.npy", "user_vectors.npy"])
def test_index_load_refuses_non_finite_vectors(tmp_path, fname):
  idx = tmp_path / "idx"
  index = make_index(np.random.default_rng(41))
  index.save(str(idx))
  bad = np.load(idx / fname)
  bad[[0, 2, 4], 1] = [np.nan, np.inf, -np.inf]
  _rewrite(idx, fname, bad)
  with pytest.raises(retrieval.IndexFormatError, match=f"3 of {len(bad)} rows hold NaN or inf") as e:
    retrieval.ItemIndex.load(str(idx))
  _one_line_naming(e, idx / fname)


def test_index_format_error_is_public():
  import jaxrec
  assert jaxrec.IndexFormatError is retrieval.IndexFormatError
  assert issubclass(jaxrec.IndexFormatError, ValueError)
