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
    (3, 50, 8, 64, 16),         # k > N: tail padded with -inf / -1
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


def test_approximate_on_cpu_is_exact():
  rng = np.random.default_rng(9)
  q, c = dyadic(rng, (4, 16)), dyadic(rng, (700, 16))
  assert_exact(topk(q, c, 10, approximate=True, block_size=256), reference(q, c, 10))


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
    (dict(k=2, exclude=np.array([[0]] * 2)), "exclude ids must be int"),
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
  include = [[1001, 1002, 1003], [1010, 1011]]
  s, ids = index.search(q, 4, include=include, exclude=[[1002], []])
  assert set(ids[0][:2]) == {1001, 1003} and ids[0][2] == -1 and s[0][2] == -np.inf
  assert set(ids[1][:2]) == {1010, 1011} and np.all(ids[1][2:] == -1)
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
