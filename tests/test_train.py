import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrec.config import load_config
from jaxrec.step import loss_fn
from jaxrec.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _trainer(*overrides):
  return Trainer(load_config(TINY, list(overrides)))


def test_train_step_decreases_the_loss_on_a_fixed_batch():
  trainer = _trainer("mesh.num_devices=1", "train.warmup_steps=0", "train.learning_rate=0.01")
  state = trainer.init_state()
  batch = trainer.layout.put(trainer.batch_builder().map(0))
  losses = []
  for _ in range(5):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state["step"]) == 5


def _losses(trainer, steps):
  state = trainer.init_state()
  builder = trainer.batch_builder()
  b = trainer.cfg.train.batch_size
  candidates = trainer.dataset.num_items if trainer.cfg.train.negatives == "catalog" else b + trainer.layout.mixed_negatives
  out = []
  for i in range(steps):
    state, metrics = trainer.train_step(state, trainer.layout.put(builder.map(i)))
    out.append(float(metrics["loss"]))
    assert tuple(np.asarray(metrics["logits_shape"])) == (b, candidates)
  return np.array(out), state


@pytest.mark.slow
def test_same_losses_on_every_mesh_shape():
  steps = 20
  reference, ref_state = _losses(_trainer("mesh.num_devices=1"), steps)
  for mesh in (["mesh.data=8"], ["mesh.data=4", "mesh.fsdp=2"], ["mesh.data=2", "mesh.tensor=4"]):
    losses, state = _losses(_trainer(*mesh), steps)
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(mesh))
    # Id tables are padded to a multiple of the device count; the real rows must agree.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[:b.shape[0]], np.asarray(b), rtol=1e-4, atol=1e-6),
                 state["params"], ref_state["params"])


@pytest.mark.slow
def test_parameter_shardings_follow_the_rules_table():
  trainer = _trainer("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  state = trainer.init_state()
  specs = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.sharding.spec)
           for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  golden = {
      # id tables: rows over fsdp x tensor, embed has no axis left
      "item_tower/ids/embedding": (("fsdp", "tensor"),),
      "query_tower/ids/embedding": (("fsdp", "tensor"),),
      # fusion MLP: [in, F] kernels embed->fsdp, mlp->tensor; [F, E] mlp->tensor
      "item_tower/mlp/hidden/0/kernel": ("fsdp", "tensor"),
      "item_tower/mlp/hidden/0/bias": ("tensor",),
      "item_tower/mlp/out/kernel": ("tensor",),
      "query_tower/mlp/hidden/0/kernel": ("fsdp", "tensor"),
      # categorical feature tables [vocab, F]: embed->fsdp when it divides
      "item_tower/features/category/embed/embedding": (None, "fsdp"),
      "query_tower/features/age/embed/embedding": (None, "fsdp"),
  }
  for name, spec in golden.items():
    assert specs[name] == spec, (name, specs[name])
  # Every parameter is covered by the table (no silently replicated large weight).
  assert all(n in specs for n in golden)
  batch = trainer.layout.put(trainer.batch_builder().map(0))
  in_shardings = jax.tree.map(lambda x: x.sharding, state)
  new_state, _ = trainer.train_step(state, batch)
  jax.tree.map(lambda s, x: (s == x.sharding) or pytest.fail(f"sharding changed: {s} -> {x.sharding}"),
               in_shardings, new_state)


def test_batch_not_divisible_by_data_parallel_size_fails_before_compute():
  from jaxrec.mesh import MeshError
  with pytest.raises(MeshError, match="train.batch_size=36 is not divisible by the data-parallel size 8"):
    _trainer("mesh.data=8", "train.batch_size=36")
  with pytest.raises(MeshError, match="5 x fsdp=1 x tensor=1 = 5 devices, but 8 are available"):
    _trainer("mesh.data=5")


@pytest.mark.slow
def test_bfloat16_towers_track_float32_on_a_fixed_batch():
  """Mixed precision policy: towers may compute in bf16; logits/softmax stay float32.
  Documented tolerance: 2% relative on the loss of a fixed batch and init."""
  f32 = _trainer("mesh.num_devices=1")
  bf16 = _trainer("mesh.num_devices=1", "model.dtype=bfloat16")
  state32, state16 = f32.init_state(), bf16.init_state()
  batch = f32.batch_builder().map(0)
  key = jax.random.key(0)
  loss32, _ = loss_fn(state32["params"], state32["tables"], f32.layout.put(batch), key, f32.spec)
  loss16, _ = loss_fn(state16["params"], state16["tables"], bf16.layout.put(batch), key, bf16.spec)
  assert loss16.dtype == np.float32
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)
  _, metrics = bf16.train_step(state16, bf16.layout.put(batch))
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_train_step_compiles_once_across_varying_batches():
  trainer = _trainer("mesh.data=8")
  state = trainer.init_state()
  builder = trainer.batch_builder()
  for b in range(6):
    state, _ = trainer.train_step(state, trainer.layout.put(builder.map(b)))
  assert trainer.train_step._cache_size() == 1


@pytest.mark.slow
def test_nonfinite_loss_stops_with_its_exit_code_or_is_skipped(tmp_path):
  from jaxrec.trainer import EXIT_NONFINITE, TrainingStopped
  cfg = load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path}", "train.steps=20", "checkpoint.every=5",
                           "checkpoint.async_save=false", "model.temperature=1e-30"])
  with pytest.raises(TrainingStopped) as e:
    Trainer(cfg).run()
  assert e.value.exit_code == EXIT_NONFINITE and "train.nan_policy=stop" in str(e.value)
  assert "at step 1;" in str(e.value) and "no checkpoint was saved before it" in str(e.value)  # none to cite
  skip = load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path / 'skip'}", "train.steps=3",
                            "model.temperature=1e-30", "train.nan_policy=skip"])
  result = Trainer(skip).run()
  assert result["steps"] == 3


@pytest.mark.slow
def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_bitwise_unchanged(tmp_path):
  cfg = load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path}", "model.temperature=1e-30"])
  trainer = Trainer(cfg)
  state = trainer.init_state()
  before = jax.device_get({"params": state["params"], "opt": state["opt"]})
  batch = trainer.layout.put(trainer.batch_builder().map(0))
  state, metrics = trainer.train_step(state, batch)
  assert not bool(metrics["finite"]) and int(state["step"]) == 1
  after = jax.device_get({"params": state["params"], "opt": state["opt"]})
  for leaf_before, leaf_after in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(leaf_before, leaf_after)
  # and finite steps do move them (the first step's learning rate is 0 in warmup: two steps)
  ok = Trainer(load_config(TINY, ["mesh.num_devices=1", f"workdir={tmp_path / 'ok'}"]))
  state = ok.init_state()
  before = jax.device_get({"params": state["params"], "opt": state["opt"]})
  for b in range(2):
    state, metrics = ok.train_step(state, ok.layout.put(ok.batch_builder().map(b)))
    assert bool(metrics["finite"])
  after = jax.device_get({"params": state["params"], "opt": state["opt"]})
  for part in ("params", "opt"):
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))


def test_rules_table_overrides_and_divisibility_fallback():
  from jaxrec import sharding
  from jaxrec.mesh import make_mesh
  from jaxrec.config import MeshConfig
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert sharding.resolve(("embed", "mlp"), (64, 256), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
  # 3 rows do not split over fsdp x tensor: that dimension stays whole instead of failing
  assert sharding.resolve(("id_rows", "embed"), (3, 64), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
  rules = sharding.rules_from_config(["embed:tensor", "mlp:"])
  assert sharding.resolve(("embed", "mlp"), (64, 256), mesh, rules) == jax.sharding.PartitionSpec("tensor")
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config(["embed:model"])
  trainer = _trainer("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=embed:tensor,mlp:")
  spec = trainer.state_shardings["params"]["item_tower"]["mlp"]["hidden"][0]["kernel"].spec
  assert spec == jax.sharding.PartitionSpec("tensor")


@pytest.mark.slow
def test_several_steps_per_call_train_exactly_like_one(tmp_path):
  # Ten steps in calls of four: 4 + 4 + a last call of the 2 left over.
  base = ["mesh.num_devices=1", "train.steps=10", "checkpoint.async_save=false"]
  one = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'one'}"])).run()
  four = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'four'}", "train.steps_per_call=4"])).run()
  assert len(four["train/losses"]) == 10
  np.testing.assert_allclose(four["train/losses"], one["train/losses"], rtol=1e-6)
  assert four["recall@10"] == pytest.approx(one["recall@10"], abs=1e-6)
  # FLOPs per step are a property of the step, not of how many steps one call scans.
  assert one["train/step_tflops"] > 0
  assert four["train/step_tflops"] == pytest.approx(one["train/step_tflops"], rel=1e-12)
  from jaxrec.config import ConfigError
  with pytest.raises(ConfigError, match="'checkpoint.every'=6 must be a multiple of train.steps_per_call=4"):
    load_config(TINY, base + ["train.steps_per_call=4", "checkpoint.every=6"])


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
  from fixtures import tiny_bert
  return tiny_bert.write(tmp_path_factory.mktemp("encoder") / "tiny_bert")


def _live(encoder_dir, *overrides):
  return ["model.use_text=true", "encoder.mode=full", f"encoder.path={encoder_dir}", *overrides]


@pytest.mark.slow
def test_live_encoder_shape_buckets_leave_the_losses_unchanged(tmp_path, tiny_bert_dir):
  base = _live(tiny_bert_dir, "mesh.num_devices=1", "train.steps=8", "checkpoint.async_save=false",
               "train.batch_size=16", "data.history=recent",  # batches of 29-41 distinct items of 90
               "encoder.token_stream=false")
  fixed = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'fixed'}", "encoder.shape_buckets=1"]))
  assert fixed.layout.row_buckets == (fixed.layout.unique_capacity,) and fixed.layout.length_buckets == (32,)
  reference = fixed.run()["train/losses"]
  # Two steps per call: each call pads its two batches to the larger of their buckets.
  bucketed = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'bucketed'}", "encoder.shape_buckets=8",
                                               "train.steps_per_call=2"]))
  # The tiny world's texts are 21-24 tokens, all in one of the encoder's length buckets; a
  # 24-token bucket makes every batch cut its tokens (32 -> 24) as well as its rows.
  bucketed.layout = dataclasses.replace(bucketed.layout, length_buckets=(24, 32))
  builder = bucketed.batch_builder()
  shapes = {bucketed.layout.shape_of(builder.map(b)) for b in range(8)}
  assert len(shapes) > 1 and all(rows < bucketed.layout.unique_capacity and length == 24 for rows, length in shapes), shapes
  np.testing.assert_allclose(bucketed.run()["train/losses"], reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_token_stream_trains_the_padded_rows_model_on_fewer_tokens(tmp_path, tiny_bert_dir):
  base = _live(tiny_bert_dir, "mesh.num_devices=1", "train.steps=8", "checkpoint.async_save=false",
               "train.batch_size=16", "data.history=recent", "encoder.pooling=cls")
  padded = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'padded'}", "encoder.token_stream=false",
                                             "encoder.shape_buckets=1"]))
  reference = padded.run()
  streamed = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'stream'}", "train.steps_per_call=2"]))
  builder = streamed.batch_builder()
  shapes = {streamed.layout.shape_of(builder.map(b)) for b in range(8)}
  # The tiny world's texts are 21-24 tokens, padded rows hold 32: the stream is 21-24 per item,
  # plus at most one bucket step (worst case / 64) of padding.
  step = streamed.layout.stream_buckets[0]
  for b in range(8):
    batch, unique = builder.parts(b)
    rows, tokens, length = streamed.layout.shape_of(builder.map(b))
    assert length == 32  # the tiny texts' length bucket, for attention
    real = int(streamed.recommender.text.tokens["attention_mask"][unique].sum())
    assert real <= tokens < real + step and tokens < 0.8 * len(unique) * 32
  assert len(shapes) > 1, shapes
  result = streamed.run()
  np.testing.assert_allclose(result["train/losses"], reference["train/losses"], rtol=0, atol=1e-5)
  assert result["recall@10"] == pytest.approx(reference["recall@10"], abs=1e-6)
  # The FLOP count follows the tokens computed: fewer than the padded rows'.
  assert 0 < result["train/step_tflops"] < 0.95 * reference["train/step_tflops"]


# On CPU bf16 means bf16 matmul operands with float32 results and gradients (a custom vjp); the
# sharded case runs it with the batch and the weights split across devices.
@pytest.mark.parametrize("mesh", [("mesh.num_devices=1",), ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")])
@pytest.mark.slow
def test_encoder_dtype_reaches_the_live_encoder_and_bf16_tracks_float32(tmp_path, tiny_bert_dir, mesh):
  base = _live(tiny_bert_dir, *mesh, "train.steps=6", "checkpoint.async_save=false",
               "train.batch_size=16", "encoder.shape_buckets=1")
  exact = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'f32'}"]))
  fast = Trainer(load_config(TINY, base + [f"workdir={tmp_path / 'bf16'}", "encoder.dtype=bfloat16",
                                           "data.num_threads=2"]))
  assert exact.recommender.text.encoder_config.dtype == "float32" and fast.recommender.text.encoder_config.dtype == "bfloat16"
  reference, losses = exact.run()["train/losses"], fast.run()["train/losses"]
  assert not np.array_equal(losses, reference)  # the encoder did compute in bf16...
  np.testing.assert_allclose(losses, reference, rtol=0.02)  # ...and trains the same model
  from jaxrec.config import ConfigError
  with pytest.raises(ConfigError, match="encoder.dtype"):
    load_config(TINY, ["encoder.dtype=float16"])
  with pytest.raises(ConfigError, match="data.num_threads"):
    load_config(TINY, ["data.num_threads=0"])
  with pytest.raises(ConfigError, match="data.history_dropout"):
    load_config(TINY, ["data.history_dropout=1.0"])


@pytest.mark.parametrize("token_stream", [True, False])
@pytest.mark.slow
def test_train_step_compiles_once_per_bucket_pair_met_and_once_without_a_live_encoder(tmp_path, tiny_bert_dir,
                                                                                       token_stream):
  live = _trainer(*_live(tiny_bert_dir, "mesh.data=8", "encoder.shape_buckets=8", "data.history=sampled",
                         f"encoder.token_stream={str(token_stream).lower()}"))
  state = live.init_state()
  builder = live.batch_builder()
  shapes = set()
  for b in range(10):
    batch = builder.map(b)
    shapes.add(live.layout.shape_of(batch))
    state, _ = live.train_step(state, live.layout.put(batch))
  assert len(shapes) > 1, shapes  # varying inputs met several buckets...
  if token_stream:
    assert shapes <= {(r, t, l) for r in live.layout.row_buckets for t in live.layout.stream_buckets for l in live.layout.length_buckets}
  else:
    assert not live.layout.stream_buckets and shapes <= {(r, l) for r in live.layout.row_buckets for l in live.layout.length_buckets}
  # ...each split evenly over the 8 data-parallel devices (a token stream's tokens too)
  assert all(shape[0] % 8 == 0 and (shape[1] % 8 == 0 or not token_stream) for shape in shapes)
  assert live.train_step._cache_size() == len(shapes)  # ...and each compiled once
  frozen = _trainer("mesh.data=8", "model.use_text=true", "encoder.mode=frozen", f"encoder.path={tiny_bert_dir}",
                    f"encoder.cache_dir={tmp_path}", "encoder.shape_buckets=8")
  assert frozen.layout.row_buckets == (frozen.layout.unique_capacity,)
  state = frozen.init_state()
  builder = frozen.batch_builder()
  for b in range(6):
    state, _ = frozen.train_step(state, frozen.layout.put(builder.map(b)))
  assert frozen.train_step._cache_size() == 1


@pytest.mark.slow
def test_catalog_softmax_step_scores_every_trained_item_and_agrees_across_meshes():
  from jaxrec.losses import catalog_softmax
  trainer = _trainer("mesh.num_devices=1", "train.negatives=catalog", "model.id_dropout=0")
  assert not trainer.recommender.item_trained.all()  # the tiny world holds cold items out: they must not compete
  state = trainer.init_state()
  batch = trainer.batch_builder().map(0)
  loss, aux = loss_fn(state["params"], state["tables"], trainer.layout.put(batch), jax.random.key(0), trainer.spec)
  assert tuple(np.asarray(aux["logits_shape"])) == (trainer.cfg.train.batch_size, trainer.dataset.num_items)
  # The same loss from the inference paths: every item's vector, the batch's query vectors.
  items = trainer.recommender.item_vectors(state["params"], state["tables"])
  queries = trainer.recommender._query_vectors(state["params"], state["tables"], batch["user"], batch["history"],
                                   batch["history_mask"], None)
  ref, _ = catalog_softmax(queries, items, batch["item"], trainer.cfg.model.temperature,
                           candidate_mask_N=trainer.recommender.item_trained)
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  reference, _ = _losses(trainer, 8)
  losses, _ = _losses(_trainer("mesh.data=4", "mesh.fsdp=2", "train.negatives=catalog", "model.id_dropout=0"), 8)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  assert losses[-1] < losses[0]



def test_clip_norm_zero_turns_clipping_off():
  import jax.numpy as jnp
  import optax
  from jaxrec.config import EncoderConfig, TrainConfig
  from jaxrec.optim import make_optimizer
  params = {"w": jnp.ones((3, 3))}
  grads = {"w": jnp.full((3, 3), 100.0)}

  def first_update(cfg):
    tx = make_optimizer(cfg, EncoderConfig())
    return tx.update(grads, tx.init(params), params)[0]["w"]

  base = TrainConfig(warmup_steps=0, steps=10, weight_decay=0.0)
  unclipped = first_update(dataclasses.replace(base, clip_norm=0.0))
  reference = optax.adamw(base.learning_rate, weight_decay=0.0).update(grads, optax.adamw(base.learning_rate).init(params), params)[0]["w"]
  np.testing.assert_allclose(unclipped, reference, rtol=1e-6)
  assert float(jnp.abs(unclipped).max()) > 0


def test_clipping_with_the_steps_grad_norm_equals_optax_and_keeps_its_state():
  import jax.numpy as jnp
  import optax
  from jaxrec.config import EncoderConfig, TrainConfig
  from jaxrec.optim import _adamw, clip_by_global_norm, make_optimizer, schedule
  from jaxrec.step import global_norm as optax_global_norm
  params = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
  for scale in (100.0, 0.01):  # clipped, and left alone
    grads = {"w": jnp.full((3, 3), scale), "b": jnp.arange(3.0) * scale}
    expected = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]
    for given in (None, optax_global_norm(grads)):
      clipped = clip_by_global_norm(1.0).update(grads, optax.EmptyState(), grad_norm=given)[0]
      for name in grads:
        np.testing.assert_allclose(clipped[name], expected[name], rtol=1e-6)
    if scale > 1:
      assert float(optax_global_norm(expected)) == pytest.approx(1.0, rel=1e-5)
    else:
      np.testing.assert_array_equal(expected["w"], grads["w"])
  # the optimizer state has optax's tree, so checkpoints from before load unchanged
  cfg = TrainConfig(clip_norm=1.0)
  ours = make_optimizer(cfg, EncoderConfig()).init(params)
  theirs = optax.chain(optax.clip_by_global_norm(1.0), _adamw(schedule(cfg), cfg)).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)


@pytest.mark.slow
def test_query_tower_without_history_trains_on_user_ids_alone():
  # data.history_len=0 is the TFRS tutorial's query tower: the user's id (and features) only.
  trainer = _trainer("mesh.num_devices=1", "data.history_len=0", "train.warmup_steps=0", "train.learning_rate=0.01")
  batch = trainer.batch_builder().map(0)
  assert batch["history"].shape == (trainer.cfg.train.batch_size, 0)
  state = trainer.init_state()
  losses = []
  for _ in range(5):
    state, metrics = trainer.train_step(state, trainer.layout.put(batch))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  result = trainer.evaluate(state)
  assert 0.0 <= result["recall@10"] <= 1.0


@pytest.mark.slow
def test_no_history_also_runs_with_a_live_encoder(tmp_path, tiny_bert_dir):
  trainer = Trainer(load_config(TINY, _live(tiny_bert_dir, "mesh.num_devices=1", "data.history_len=0", "train.steps=2",
                                            "train.batch_size=8", "checkpoint.async_save=false",
                                            f"workdir={tmp_path / 'live'}")))
  result = trainer.run()
  assert np.all(np.isfinite(result["train/losses"])) and 0.0 <= result["recall@10"] <= 1.0


def test_sum_fusion_is_the_normalised_sum_of_the_towers_inputs_and_checks_widths():
  trainer = _trainer("mesh.num_devices=1", "model.fusion=sum", "model.use_item_features=false",
                     "model.feature_dim=16")  # the tiny world's user features need embed_dim wide rows too
  state = trainer.init_state()
  items = np.asarray(trainer.recommender.item_vectors(state["params"], state["tables"]))
  table = np.asarray(state["params"]["item_tower"]["ids"]["embedding"])
  rows = table[trainer.recommender.model(state["params"], state["tables"]).item_tower.id_row[...]]
  np.testing.assert_allclose(items, rows / np.linalg.norm(rows, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
  assert "mlp" not in state["params"]["item_tower"]
  with pytest.raises(ValueError, match="model.fusion=sum adds the item tower's inputs.*model.feature_dim is 8"):
    _trainer("mesh.num_devices=1", "model.fusion=sum")


def test_user_weighted_loss_is_the_weighted_mean_of_the_unweighted_rows():
  import jax.numpy as jnp
  from jaxrec import losses
  plain = _trainer("mesh.num_devices=1", "model.id_dropout=0")
  weighted = _trainer("mesh.num_devices=1", "model.id_dropout=0", "train.user_weight_power=1")
  state = plain.init_state()
  batch = weighted.batch_builder().map(0)
  assert "weight" in batch and not np.allclose(batch["weight"], batch["weight"][0])
  key = jax.random.key(0)
  got, _ = loss_fn(state["params"], state["tables"], weighted.layout.put(batch), key, weighted.spec)
  # Row losses from the unweighted trainer's towers, then the weighted mean by hand.
  items = plain.recommender.item_vectors(state["params"], state["tables"])
  queries = plain.recommender._query_vectors(state["params"], state["tables"], batch["user"], batch["history"],
                                 batch["history_mask"], None)
  unweighted, _ = losses.in_batch_softmax(queries, items[batch["item"]], jnp.asarray(batch["item"]),
                                          plain.cfg.model.temperature, log_q_B=jnp.asarray(batch["log_q"]))
  rows = [float(losses.in_batch_softmax(queries, items[batch["item"]], jnp.asarray(batch["item"]),
                                        plain.cfg.model.temperature, log_q_B=jnp.asarray(batch["log_q"]),
                                        weights_B=jnp.asarray(np.eye(len(batch["item"]))[i]))[0])
          for i in range(len(batch["item"]))]
  want = np.sum(np.array(rows) * batch["weight"]) / np.sum(batch["weight"])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert abs(float(got) - float(unweighted)) > 1e-4  # the weights change the loss


@pytest.mark.slow
def test_history_id_table_feeds_the_query_and_trains():
  trainer = _trainer("mesh.num_devices=1", "model.history_ids=true", "train.warmup_steps=0", "train.learning_rate=0.01")
  state = trainer.init_state()
  table = state["params"]["query_tower"]["history_ids"]["embedding"]
  table_before = np.asarray(table)  # the train step donates the state
  assert table.shape[1] == trainer.cfg.model.id_dim
  batch = trainer.batch_builder().map(0)
  args = (batch["user"], batch["history"], batch["history_mask"], None)
  before = np.asarray(trainer.recommender._query_vectors(state["params"], state["tables"], *args))
  # Zeroing the table row of one item moves exactly the queries whose history holds it.
  model = trainer.recommender.model(state["params"], state["tables"])
  item = int(batch["history"][0][batch["history_mask"][0]][0])
  row = int(model.query_tower.history_row[...][item])
  assert row > 0  # a trained item has a row of its own
  params = jax.tree.map(lambda x: x, state["params"])
  params["query_tower"]["history_ids"]["embedding"] = table.at[row].set(0.0)
  after = np.asarray(trainer.recommender._query_vectors(params, state["tables"], *args))
  holds = np.any((batch["history"] == item) & batch["history_mask"], axis=1)
  moved = np.any(np.abs(after - before) > 1e-6, axis=1)
  np.testing.assert_array_equal(moved, holds)
  losses = []
  for _ in range(5):
    state, metrics = trainer.train_step(state, trainer.layout.put(batch))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  assert not np.allclose(np.asarray(state["params"]["query_tower"]["history_ids"]["embedding"]), table_before)
  losses, _ = _losses(_trainer("mesh.data=4", "mesh.fsdp=2", "model.history_ids=true"), 6)
  reference, _ = _losses(_trainer("mesh.num_devices=1", "model.history_ids=true"), 6)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


@pytest.mark.slow
def test_item_bias_adds_a_learnt_per_item_term_to_the_cosine_score():
  import jax.numpy as jnp
  from jaxrec import losses
  from jaxrec.config import ConfigError
  from jaxrec.retrieval import topk
  trainer = _trainer("mesh.num_devices=1", "model.item_bias=true", "model.id_dropout=0", "train.warmup_steps=0",
                     "train.learning_rate=0.01")
  e, temperature = trainer.cfg.model.embed_dim, trainer.cfg.model.temperature
  state = trainer.init_state()
  items = np.asarray(trainer.recommender.item_vectors(state["params"], state["tables"]))
  assert items.shape[1] == e + 1 and np.all(items[:, e] == 0.0)  # the bias head starts at zero
  batch = trainer.batch_builder().map(0)
  put = trainer.layout.put(batch)
  losses_seen = []
  for _ in range(5):
    state, metrics = trainer.train_step(state, put)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[-1] < losses_seen[0] - 0.05, losses_seen
  items = np.asarray(trainer.recommender.item_vectors(state["params"], state["tables"]))
  queries = np.asarray(trainer.recommender._query_vectors(state["params"], state["tables"], batch["user"], batch["history"],
                                              batch["history_mask"], None))
  np.testing.assert_allclose(np.linalg.norm(items[:, :e], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(queries[:, :e], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(queries[:, e], 1.0)
  bias = items[:, e] / temperature
  assert np.abs(bias).max() > 1e-4  # learnt
  # Logits are cos(q, v) / temperature + b, in the loss as in retrieval.
  scores = queries @ items.T / temperature
  np.testing.assert_allclose(scores, queries[:, :e] @ items[:, :e].T / temperature + bias[None, :], rtol=1e-4, atol=1e-4)
  loss, _ = loss_fn(state["params"], state["tables"], put, jax.random.key(0), trainer.spec)
  cands = items[batch["item"]]
  want, _ = losses.in_batch_softmax(jnp.asarray(queries), jnp.asarray(cands), jnp.asarray(batch["item"]), temperature,
                                    log_q_B=jnp.asarray(batch["log_q"]))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  _, ids = topk(queries, items, 5)
  np.testing.assert_array_equal(np.asarray(ids), np.argsort(-scores, axis=1, kind="stable")[:, :5])
  with pytest.raises(ConfigError, match="model.item_bias"):
    _trainer("model.item_bias=true", "model.fusion=sum")
  # The extra column is one more than the tower width the rules table shards: same losses on a mesh.
  reference, _ = _losses(_trainer("mesh.num_devices=1", "model.item_bias=true"), 4)
  losses_mesh, _ = _losses(_trainer("mesh.data=2", "mesh.tensor=4", "model.item_bias=true"), 4)
  np.testing.assert_allclose(losses_mesh, reference, rtol=1e-5)


def _mixed_reference(trainer, state, batch):
  """The mixed-negative loss of ``batch`` in float64 numpy, from the inference paths' vectors."""
  items = np.asarray(trainer.recommender.item_vectors(state["params"], state["tables"]), np.float64)
  queries = np.asarray(trainer.recommender._query_vectors(state["params"], state["tables"], batch["user"],
                                                          batch["history"], batch["history_mask"], None), np.float64)
  ids = np.concatenate([batch["item"], batch["negative"]])
  logits = queries @ items[ids].T / trainer.cfg.model.temperature - np.concatenate([batch["log_q"], batch["negative_log_q"]])
  b = len(batch["item"])
  hits = (ids[None, :] == batch["item"][:, None]) & ~np.eye(b, len(ids), dtype=bool)
  logits = np.where(hits, -1e9, logits)
  top = logits.max(axis=1)
  rows = top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[np.arange(b), np.arange(b)]
  return rows.mean(), hits


def test_mixed_negatives_loss_equals_a_numpy_softmax_over_positives_and_samples_with_the_mixture_logq():
  from jaxrec.data.pipeline import item_log_q
  trainer = _trainer("mesh.num_devices=1", "model.id_dropout=0", "train.mixed_negatives=24")
  state = trainer.init_state()
  batch = trainer.batch_builder().map(0)
  b, m = trainer.cfg.train.batch_size, 24
  assert batch["negative"].shape == (m,) and trainer.layout.unique_capacity == trainer.dataset.num_items
  loss, aux = loss_fn(state["params"], state["tables"], trainer.layout.put(batch), jax.random.key(0), trainer.spec)
  assert tuple(np.asarray(aux["logits_shape"])) == (b, b + m)
  want, hits = _mixed_reference(trainer, state, batch)
  assert hits[:, b:].any()  # some sampled negative is a row's positive: the masking is exercised
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Every column is corrected by the mixture (B p_data + M / trained) / (B + M), not the unigram.
  train_items = trainer.dataset.items[trainer.split.train]
  counts = np.bincount(train_items, minlength=trainer.dataset.num_items)
  mixture = (b * counts / counts.sum() + m * (counts > 0) / np.count_nonzero(counts)) / (b + m)
  np.testing.assert_allclose(batch["negative_log_q"], np.log(mixture[batch["negative"]]), rtol=1e-5)
  np.testing.assert_allclose(batch["log_q"], np.log(mixture[batch["item"]]), rtol=1e-5)
  assert not np.allclose(batch["log_q"], item_log_q(train_items, trainer.dataset.num_items)[batch["item"]])
  # The samples change the loss: the same towers without them give the plain in-batch loss.
  plain = _trainer("mesh.num_devices=1", "model.id_dropout=0")
  plain_batch = plain.batch_builder().map(0)
  plain_loss, _ = loss_fn(state["params"], state["tables"], plain.layout.put(plain_batch), jax.random.key(0), plain.spec)
  assert abs(float(plain_loss) - float(loss)) > 1e-3


def test_no_mixed_negatives_leaves_the_batch_and_the_losses_as_before():
  plain = _trainer("mesh.num_devices=1")
  zero = _trainer("mesh.num_devices=1", "train.mixed_negatives=0", "train.mixed_sampler=popularity")
  assert set(zero.layout.fields()) == {"user", "item", "log_q", "history", "history_mask", "unique_items",
                                       "item_slot", "history_slot"}
  assert zero.layout == plain.layout
  np.testing.assert_array_equal(zero.log_q, plain.log_q)
  for b in range(3):
    x, y = plain.batch_builder().map(b), zero.batch_builder().map(b)
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  np.testing.assert_array_equal(_losses(zero, 3)[0], _losses(plain, 3)[0])


def test_mixed_negatives_must_split_evenly_over_the_data_parallel_devices():
  from jaxrec.mesh import MeshError
  with pytest.raises(MeshError, match=r"train.mixed_negatives=12 must be a multiple of 8 \(data-parallel size 8 x 1 "):
    _trainer("mesh.data=8", "train.mixed_negatives=12")


@pytest.mark.slow
def test_mixed_negatives_train_alike_on_every_mesh_shape():
  overrides = ("model.id_dropout=0", "train.mixed_negatives=16", "train.mixed_sampler=popularity")
  reference, _ = _losses(_trainer("mesh.num_devices=1", *overrides), 6)
  losses, _ = _losses(_trainer("mesh.data=4", "mesh.fsdp=2", *overrides), 6)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  assert losses[-1] < losses[0]
