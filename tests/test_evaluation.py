"""jaxrec.evaluation: the full-ranking protocol equals a brute force, sharded equals replicated."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrec import evaluation
from jaxrec.config import MeshConfig, load_config
from jaxrec.data import sources
from jaxrec.mesh import make_mesh

KS = (1, 5, 10, 20)


@pytest.fixture(scope="module")
def world():
  """configs/tiny.py's data (120 users, 90 items, 9 of them cold) and dyadic vectors, whose
  float32 dot products are exact, so the kernel's scores and ties equal numpy's."""
  dataset, split = sources.load(load_config("configs/tiny.py").data)
  rng = np.random.default_rng(0)
  items_NxE = (rng.integers(-4, 5, (dataset.num_items, 8)) / 4).astype(np.float32)
  users_UxE = (rng.integers(-4, 5, (dataset.num_users, 8)) / 4).astype(np.float32)
  return dataset, split, items_NxE, users_UxE


def brute_force(dataset, split, which, items_NxE, users_UxE, max_users=0):
  """The protocol written out user by user: rank every item by score (desc, then index asc)
  without the user's known items, and score the top against the held-out items."""
  held = split.test if which == "test" else split.valid
  known_idx = np.concatenate([split.train, split.valid]) if which == "test" else split.train
  users = np.unique(dataset.users[held])[:max_users or None]
  counts = np.bincount(dataset.items[split.train], minlength=dataset.num_items).astype(np.float64)
  cold = split.cold_items
  groups = {"": np.ones(dataset.num_items, bool), **({"warm/": ~cold, "cold/": cold} if cold.any() else {})}
  rankers = {"": lambda u: items_NxE.astype(np.float64) @ users_UxE[u].astype(np.float64),
             "popularity/": lambda u: counts}
  out = {}
  for name, score in rankers.items():
    per_metric = {}
    for u in users:
      known = set(dataset.items[known_idx][dataset.users[known_idx] == u].tolist())
      truth = set(dataset.items[held][dataset.users[held] == u].tolist())
      s = score(u)
      order = [i for i in np.lexsort((np.arange(len(s)), -s)) if i not in known][:max(KS)]
      for prefix, in_group in groups.items():
        t = {i for i in truth if in_group[i]}
        if not t:
          continue
        per_metric.setdefault(prefix + "users", []).append(1)
        for k in KS:
          hits = [i in t for i in order[:k]]
          dcg = sum(1 / np.log2(r + 2) for r, h in enumerate(hits) if h)
          idcg = sum(1 / np.log2(r + 2) for r in range(min(len(t), k)))
          first = hits.index(True) + 1 if any(hits) else 0
          for metric, value in (("recall", sum(hits) / len(t)), ("ndcg", dcg / idcg),
                                ("mrr", 1 / first if first else 0.0), ("hit", float(any(hits)))):
            per_metric.setdefault(f"{prefix}{metric}@{k}", []).append(value)
    out.update({name + key: (len(v) if key.endswith("users") else float(np.mean(v))) for key, v in per_metric.items()})
  return out


def check_against(got, want):
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
  # Nothing else but the chance level and coverage, which the brute force leaves out.
  assert {k for k in got if "chance_recall" not in k and "coverage" not in k} == set(want)


@pytest.mark.parametrize("which,batch_size,dense", [("test", 32, True), ("test", 512, False), ("valid", 7, True)])
def test_full_ranking_equals_brute_force(world, monkeypatch, which, batch_size, dense):
  dataset, split, items_NxE, users_UxE = world
  if not dense:  # the id-list exclusion the kernel takes for large catalogs
    monkeypatch.setattr(evaluation, "DENSE_MASK_CELLS", 0)
  protocol = evaluation.Protocol.of(dataset, split, which)
  got = evaluation.full_ranking(protocol, items_NxE, users_UxE[protocol.users], ks=KS, batch_size=batch_size)
  check_against(got, brute_force(dataset, split, which, items_NxE, users_UxE))
  assert got["users"] == len(protocol.users) == len(np.unique(dataset.users[split.test if which == "test" else split.valid]))
  # Chance level: K over the items left after excluding the user's known interactions.
  known_counts = np.diff(protocol.known.start)[protocol.users]
  assert got["chance_recall@10"] == pytest.approx(np.mean(10 / (dataset.num_items - known_counts)), rel=1e-12)


def test_max_users_keeps_the_first_users(world):
  dataset, split, items_NxE, users_UxE = world
  protocol = evaluation.Protocol.of(dataset, split, "test", max_users=50)
  np.testing.assert_array_equal(protocol.users, np.unique(dataset.users[split.test])[:50])
  got = evaluation.full_ranking(protocol, items_NxE, users_UxE[protocol.users], ks=KS, batch_size=16)
  check_against(got, brute_force(dataset, split, "test", items_NxE, users_UxE, max_users=50))


def test_known_rows_pads_with_minus_one(world):
  dataset, split, _, _ = world
  protocol = evaluation.Protocol.of(dataset, split, "valid")
  users = protocol.users[:4]
  rows = evaluation.known_rows(protocol.known, users)
  for u, row in zip(users, rows):
    want = dataset.items[split.train][dataset.users[split.train] == u]
    np.testing.assert_array_equal(np.sort(row[row >= 0]), np.sort(want))
    assert (row[len(want):] == -1).all()
  assert rows.dtype == np.int32 and rows.shape[1] == np.diff(protocol.known.start)[users].max()


@pytest.mark.parametrize("rules_items,spec", [(("data", "fsdp", "tensor"), P(("data", "fsdp", "tensor"))),
                                              (("tensor",), P("tensor"))])
def test_sharded_items_give_the_replicated_metrics(world, monkeypatch, rules_items, spec):
  dataset, split, items_NxE, users_UxE = world
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  rules = {**evaluation.sharding.RULES, "items": rules_items}
  protocol = evaluation.Protocol.of(dataset, split, "test")
  queries = users_UxE[protocol.users]
  replicated = evaluation.full_ranking(protocol, items_NxE, queries, ks=KS, batch_size=32)

  seen, placed = [], []
  real_topk, real_place = evaluation.topk, evaluation.place_items
  def spy_topk(q, corpus, k, **kwargs):
    seen.append((corpus, kwargs))
    ids = real_topk(q, corpus, k, **kwargs)[1]
    assert (np.asarray(ids) < dataset.num_items).all()  # padding rows never come back
    return None, ids
  def spy_place(*args, **kwargs):
    placed.append(real_place(*args, **kwargs))
    return placed[-1]
  monkeypatch.setattr(evaluation, "topk", spy_topk)
  monkeypatch.setattr(evaluation, "place_items", spy_place)
  sharded = evaluation.full_ranking(protocol, items_NxE, queries, ks=KS, batch_size=32, mesh=mesh, rules=rules)

  assert sharded == replicated
  shards = int(np.prod([mesh.shape[a] for a in rules_items]))
  padded_rows = -(-dataset.num_items // shards) * shards
  # Placed once per evaluation (items, popularity); every batch's kernel gets those arrays.
  assert len(placed) == 2 and len(seen) == 2 * 4  # 120 users in batches of 32
  for i, (corpus, kwargs) in enumerate(seen):
    assert corpus is placed[i % 2]
    assert corpus.sharding.spec == spec and corpus.shape[0] == padded_rows
    assert kwargs["mesh"] is mesh and kwargs["items_axes"] == tuple(rules_items)
    assert kwargs["exclude"].sharding.spec == P(None, tuple(rules_items) if len(rules_items) > 1 else rules_items)
  # The placed item rows are the given vectors, then zero padding.
  np.testing.assert_array_equal(np.asarray(placed[0])[:dataset.num_items], items_NxE)
  assert not np.asarray(placed[0])[dataset.num_items:].any()


def test_sharded_id_exclusion_gives_the_replicated_metrics(world, monkeypatch):
  dataset, split, items_NxE, users_UxE = world
  monkeypatch.setattr(evaluation, "DENSE_MASK_CELLS", 0)
  protocol = evaluation.Protocol.of(dataset, split, "test")
  queries = users_UxE[protocol.users]
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert (evaluation.full_ranking(protocol, items_NxE, queries, ks=KS, batch_size=32, mesh=mesh)
          == evaluation.full_ranking(protocol, items_NxE, queries, ks=KS, batch_size=32))


def test_place_items_splits_rows_over_the_items_axes():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  items = np.arange(90 * 3, dtype=np.float32).reshape(90, 3)
  placed = evaluation.place_items(items, mesh)
  assert placed.sharding.spec == P(("data", "fsdp", "tensor")) and placed.shape == (96, 3)
  assert {s.data.shape for s in placed.addressable_shards} == {(12, 3)}
  # Device vectors are resharded on the devices, with the same result.
  again = evaluation.place_items(evaluation.place_items(items), mesh)
  assert again.sharding.spec == placed.sharding.spec
  np.testing.assert_array_equal(np.asarray(again), np.asarray(placed))
  # A rules table that gives items no mesh axis keeps them replicated and unpadded.
  rules = {**evaluation.sharding.RULES, "items": ()}
  assert evaluation.place_items(items, mesh, rules).shape == (90, 3)


def test_query_function_equals_precomputed_queries(world):
  dataset, split, items_NxE, users_UxE = world
  protocol = evaluation.Protocol.of(dataset, split, "test")
  calls = []
  def queries(users, known):
    assert known is protocol.known
    calls.append(users.copy())
    return users_UxE[users]
  got = evaluation.full_ranking(protocol, items_NxE, queries, ks=KS, batch_size=50)
  assert got == evaluation.full_ranking(protocol, items_NxE, users_UxE[protocol.users], ks=KS, batch_size=50)
  # One batch shape throughout: the last batch repeats its last user.
  assert [len(c) for c in calls] == [50, 50, 50] and calls[0].dtype == np.int32
  np.testing.assert_array_equal(calls[-1][20:], protocol.users[-1])


def test_wrong_shapes_raise(world):
  dataset, split, items_NxE, users_UxE = world
  protocol = evaluation.Protocol.of(dataset, split, "test")
  with pytest.raises(ValueError, match="one row per protocol user"):
    evaluation.full_ranking(protocol, items_NxE, users_UxE[protocol.users[:-1]], ks=KS, batch_size=32)
  with pytest.raises(ValueError, match="90 items"):
    evaluation.full_ranking(protocol, items_NxE[:80], users_UxE[protocol.users], ks=KS, batch_size=32)
  with pytest.raises(ValueError, match="'test' or 'valid'"):
    evaluation.Protocol.of(dataset, split, "train")
