"""The exported query tower (jaxrec/serving.py): bit-equal to the trained model, served by jax and
numpy alone, and behind `jaxrec recommend --history`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxrec
from jaxrec import cli
from jaxrec.config import load_config
from jaxrec.data.pipeline import Sequences
from jaxrec.mesh import mesh_fitting_devices
from jaxrec.recommender import build
from jaxrec.retrieval import ItemIndex

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
QUERIES = {
    "pool": [],
    "transformer": ["model.query=transformer", "data.split=loo", "data.history_len=8"],
    "text": ["model.query=text", "model.use_text=true", "encoder.mode=frozen"],
}


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
  from fixtures import tiny_bert
  return tiny_bert.write(tmp_path_factory.mktemp("encoder") / "tiny_bert")


@pytest.fixture(scope="module")
def train(tmp_path_factory, tiny_bert_dir):
  """model.query -> the config of a workdir trained by `jaxrec.train` (which writes the index and
  its query tower), each trained once."""
  done = {}

  def trained_config(query):
    if query not in done:
      workdir = tmp_path_factory.mktemp(f"serving_{query}")
      extra = [f"encoder.path={tiny_bert_dir}", f"encoder.cache_dir={workdir / 'cache'}"] if query == "text" else []
      done[query] = load_config(TINY, [f"workdir={workdir}", "train.steps=10", "checkpoint.async_save=false",
                                       *QUERIES[query], *extra])
      jaxrec.train(done[query])
    return done[query]
  return trained_config


@pytest.fixture(scope="module", params=list(QUERIES))
def trained(request, train):
  return train(request.param)


@pytest.fixture(scope="module")
def pooled(train):
  return train("pool")


def _inputs(tower, rec, users):
  """The query tower's inputs for known users, with the history the index pooled for them."""
  ds, sp, cfg = rec.dataset, rec.split, rec.cfg
  known = Sequences.from_interactions(ds, np.concatenate([sp.train, sp.valid]))
  history, _ = known.query_history(users, cfg.data.history_len, rec.history_mode, cfg.train.seed)
  inputs = {"history_items": history, "user_rows": users}
  inputs.update({f"user_{name}": values[users] for name, values in tower.user_features.items()})
  return {name: inputs[name] for name in tower.input_names}, known


def test_the_exported_query_tower_gives_the_trained_models_query_vectors_bit_for_bit(trained):
  index = ItemIndex.load(os.path.join(trained.workdir, "index"))
  tower = index.query_tower
  rec = build(mesh_fitting_devices(trained), restore_only=True)
  _, params, tables = rec.restore()
  users = np.arange(rec.dataset.num_users, dtype=np.int32)
  inputs, known = _inputs(tower, rec, users)
  q_model = np.asarray(rec.query_vectors(params, tables, users, known))
  q_exported = tower(**inputs)
  assert q_exported.dtype == np.float32 and q_exported.shape == (120, 16)
  np.testing.assert_array_equal(q_exported, q_model)
  np.testing.assert_array_equal(q_exported, index.user_vectors)
  # query_tower_examples.npz: the first 16 users' inputs, and their rows of user_vectors.npy.
  examples = tower.examples
  assert set(examples) == {*tower.input_names, "query_vectors"}
  for name in tower.input_names:
    np.testing.assert_array_equal(examples[name], inputs[name][:16])
  np.testing.assert_array_equal(examples["query_vectors"], index.user_vectors[:16])
  # The batch is symbolic: any size runs; rows agree to float32 rounding (the matmul tiles by batch).
  for rows in (slice(0, 1), slice(5, 8)):
    np.testing.assert_allclose(tower(**{k: v[rows] for k, v in inputs.items()}), q_model[rows], atol=1e-6)


def test_query_tower_json_lists_the_ordered_inputs_with_a_symbolic_batch(trained):
  spec = json.loads((Path(trained.workdir) / "index" / "query_tower.json").read_text())
  length = trained.data.history_len
  assert [(i["name"], i["dtype"], i["shape"]) for i in spec["inputs"]] == [
      ("history_items", "int32", ["b", length]), ("user_rows", "int32", ["b"]), ("user_age", "int32", ["b", 1])]
  assert all(i["meaning"] for i in spec["inputs"])
  assert [i["range"] for i in spec["inputs"]] == [[-1, 89], [-1, 119], [0, 6]]
  assert spec["output"]["shape"] == ["b", 16] and spec["output"]["dtype"] == "float32"
  assert spec["query"] == trained.model.query and spec["platforms"][0] == "cpu"


# Imports jax and numpy, never jaxrec: what a server holding only the artifact runs.
SERVER = r'''
import json, sys
import jax
import numpy as np

index = sys.argv[1]
exported = jax.export.deserialize(bytearray(open(f"{index}/query_tower.jaxexport", "rb").read()))
spec = json.load(open(f"{index}/query_tower.json"))
examples = np.load(f"{index}/query_tower_examples.npz")
vectors = np.load(f"{index}/vectors.npy")
item_ids = np.load(f"{index}/item_ids.npy")
indptr, seen = np.load(f"{index}/user_seen_indptr.npy"), np.load(f"{index}/user_seen_indices.npy")

def top10(q, exclude_rows):
  scores = vectors @ q
  scores[exclude_rows] = -np.inf
  order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then row
  return [item_ids[r].item() for r in order[:10]]

# A user known at training: row 0 of the examples (row 0 of user_ids.npy).
inputs = [examples[i["name"]][:1] for i in spec["inputs"]]
known = top10(np.asarray(exported.call(*inputs))[0], seen[indptr[0]:indptr[1]])

# A user unknown at training: a history of three items, user row -1, features unknown (0).
history_ids = [int(v) for v in sys.argv[2].split(",")]
rows = [int(np.flatnonzero(item_ids == v)[0]) for v in history_ids]
length = spec["inputs"][0]["shape"][1]
new = {"history_items": np.asarray([[-1] * (length - len(rows)) + rows], np.int32),
       "user_rows": np.asarray([-1], np.int32)}
inputs = [new.get(i["name"], np.zeros([1, *i["shape"][1:]], np.int32)) for i in spec["inputs"]]
fresh = top10(np.asarray(exported.call(*inputs))[0], rows)
assert "jaxrec" not in sys.modules
print(json.dumps({"known": known, "new": fresh, "modules": sorted(m for m in sys.modules if m.startswith("jaxrec"))}))
'''


def _recommended(argv, capsys) -> list[int]:
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  return [int(m) for m in re.findall(r"^\s+\d+\. \[(\S+)\]", out, re.M)]


def test_jax_and_numpy_alone_serve_a_known_user_as_jaxrec_recommend_does_and_a_new_user(pooled, capsys):
  trained = pooled
  index_dir = os.path.join(trained.workdir, "index")
  index = ItemIndex.load(index_dir)
  history = [int(index.item_ids[r]) for r in (3, 7, 11)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SERVER, index_dir, ",".join(map(str, history))],
                        capture_output=True, text=True, env=env, cwd=trained.workdir, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  served = json.loads(proc.stdout.strip().splitlines()[-1])
  assert served["modules"] == []
  user = str(index.user_ids[0])
  assert served["known"] == _recommended(["recommend", "--workdir", str(trained.workdir), "--user", user], capsys)
  assert served["new"] == _recommended(["recommend", "--workdir", str(trained.workdir), "--history",
                                        ",".join(map(str, history))], capsys)
  assert len(served["new"]) == 10 and not set(served["new"]) & set(history)
  # The ItemIndex API gives the same list for the same history.
  assert [i for i, _, _ in index.recommend_history(history, 10)] == served["new"]


def test_recommend_history_names_an_unknown_item_in_one_line(pooled, capsys):
  trained = pooled
  assert cli.main(["recommend", "--workdir", str(trained.workdir), "--history", "3,no-such-item"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "unknown item id 'no-such-item' in --history" in err
  # The artifact itself refuses a row out of range (XLA's lookup would clamp it silently).
  tower = ItemIndex.load(os.path.join(trained.workdir, "index")).query_tower
  inputs = tower.new_user_inputs([np.array([1, 2])])
  with pytest.raises(ValueError, match=r"history_items holds 90, outside \[-1, 89\]"):
    tower(**{**inputs, "history_items": np.full_like(inputs["history_items"], 90)})
  with pytest.raises(ValueError, match=r"the query tower takes history_items, user_rows, user_age; missing user_age"):
    tower(history_items=inputs["history_items"], user_rows=inputs["user_rows"])
  assert cli.main(["recommend", "--workdir", str(trained.workdir), "--history", " , "]) == 2
  assert "at least one item id" in capsys.readouterr().err
