"""AdaLoRA (encoder.mode=adalora): the budget schedule, the importance scores and the penalty
against their definitions in numpy, the masked training of a tiny BERT, exact resume, and the
other modes' state left without an allocator."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec import adalora
from jaxrec.config import ConfigError, load_config
from jaxrec.models.encoder import AdaLoRAParam, BertConfig, BertEncoder, LoRAParam
from jaxrec.step import jit_step
from jaxrec.trainer import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _budget_numpy(t, init, target, tinit, tfinal, total):
  if t <= tinit:
    return init
  if t >= total - tfinal:
    return target
  return int(np.floor((init - target) * (1.0 - (t - tinit) / (total - tfinal - tinit)) ** 3 + target))


def _allocator(**kw):
  base = dict(groups=(("a",), ("b", 0)), ranks=(6, 6), target_rank=2, tinit=5, tfinal=7, total_steps=40, delta_t=3,
              beta1=0.85, beta2=0.85, orth_reg=0.1)
  return adalora.Allocator(**{**base, **kw})


def test_budget_schedule_holds_the_initial_rank_then_falls_cubically_to_the_target():
  alloc = _allocator()
  budget, update, remask = alloc.tables
  assert alloc.init_total == 12 and alloc.target_total == 4
  want = [_budget_numpy(t, 12, 4, 5, 7, 40) for t in range(41)]
  np.testing.assert_array_equal(budget, want)
  assert (budget[:6] == 12).all() and (budget[33:] == 4).all()
  assert budget[6] == 11 and budget[19] == 5 and budget[32] == 4  # 8 * (1 - 14/28)^3 + 4 = 5, at t=32: 4.0004
  assert list(np.flatnonzero(remask)) == [6, 9, 12, 15, 18, 21, 24, 27, 30, 33]  # every delta_t, then t = 33 once
  assert update[:33].all() and not update[33:].any()
  for t in (0, 5, 6, 17, 32, 33, 40):
    assert alloc.budget(t) == adalora.budget_schedule(t, 12, 4, 5, 7, 40) == want[t]


def _random_adapters(rng, groups, rank=4, i=5, o=3):
  return {g: {"q": rng.normal(size=(i, rank)).astype(np.float32), "e": rng.normal(size=(rank,)).astype(np.float32),
              "p": rng.normal(size=(rank, o)).astype(np.float32)} for g in groups}


def test_importance_scores_and_allocation_follow_the_ema_formulas():
  rng = np.random.default_rng(0)
  alloc = adalora.Allocator(groups=(("x",), ("y",)), ranks=(4, 4), target_rank=1, tinit=0, tfinal=0, total_steps=10,
                            delta_t=1, beta1=0.7, beta2=0.6, orth_reg=0.1)
  weights = _random_adapters(rng, ("x", "y"))
  state = alloc.init(weights)
  ipt_np = {g: {k: np.zeros_like(v) for k, v in d.items()} for g, d in weights.items()}
  unc_np = {g: {k: np.zeros_like(v) for k, v in d.items()} for g, d in weights.items()}
  for _ in range(3):
    w = _random_adapters(rng, ("x", "y"))
    g = _random_adapters(rng, ("x", "y"))
    ipt, unc = adalora.update_importance(state["ipt"], state["unc"], w, g, 0.7, 0.6)
    state = dict(state, ipt=ipt, unc=unc)
    for name in ("x", "y"):
      for k in ("q", "e", "p"):
        s = np.abs(w[name][k] * g[name][k])
        ipt_np[name][k] = 0.7 * ipt_np[name][k] + 0.3 * s
        unc_np[name][k] = 0.6 * unc_np[name][k] + 0.4 * np.abs(s - ipt_np[name][k])
  for name in ("x", "y"):
    for k in ("q", "e", "p"):
      np.testing.assert_allclose(state["ipt"][name][k], ipt_np[name][k], rtol=1e-6)
      np.testing.assert_allclose(state["unc"][name][k], unc_np[name][k], rtol=1e-6)
  scores = adalora.triplet_scores(state["ipt"], state["unc"], alloc.groups)
  want = []
  for name in ("x", "y"):
    s = {k: ipt_np[name][k] * unc_np[name][k] for k in ("q", "e", "p")}
    want.append(s["e"] + s["q"].mean(axis=0) + s["p"].mean(axis=1))  # lambda_i, Q's column i, P's row i
    np.testing.assert_allclose(scores[len(want) - 1], want[-1], rtol=1e-5)
  # A budget of 3 keeps the 3 best of the 8 triplets over both adapters together.
  mask = adalora.mask_to_budget(scores, jnp.int32(3), alloc.groups)
  best = set(np.argsort(np.concatenate(want))[-3:].tolist())
  np.testing.assert_array_equal(np.concatenate([mask["x"]["e"], mask["y"]["e"]]), [i in best for i in range(8)])
  masked = adalora.apply_mask(weights, mask)
  np.testing.assert_array_equal(masked["x"]["e"], np.where(mask["x"]["e"], weights["x"]["e"], 0))
  np.testing.assert_array_equal(masked["y"]["q"], weights["y"]["q"])


def test_orthogonality_penalty_is_the_mean_frobenius_distance_of_the_gram_matrices_from_identity():
  rng = np.random.default_rng(1)
  weights = _random_adapters(rng, ("x", "y"))
  norms = [np.linalg.norm(m - np.eye(4)) for g in weights.values() for m in (g["p"] @ g["p"].T, g["q"].T @ g["q"])]
  np.testing.assert_allclose(adalora.orthogonality(weights, (("x",), ("y",))), np.mean(norms), rtol=1e-5)
  # Orthonormal P rows and Q columns cost nothing.
  eye = {"x": {"q": np.eye(5, 4, dtype=np.float32), "e": np.ones(4, np.float32), "p": np.eye(4, dtype=np.float32)}}
  assert float(adalora.orthogonality(eye, (("x",),))) == 0.0


def test_a_fresh_adalora_adapter_changes_nothing_and_is_a_lora_param_with_logical_axes():
  tiny = dict(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
              max_position_embeddings=16)
  base = BertEncoder(BertConfig(**tiny), rngs=nnx.Rngs(0))
  adapted = BertEncoder(BertConfig(**tiny, lora_rank=3, lora_ffn=True, adapter="adalora"), rngs=nnx.Rngs(0))
  nnx.update(adapted, nnx.state(base))
  ids = jnp.array([[2, 7, 9, 3, 0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(adapted(ids, mask), base(ids, mask))  # lambda starts at zero
  flat = dict(nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam)))
  assert all(isinstance(v, AdaLoRAParam) and isinstance(v, LoRAParam) for v in flat.values()) and len(flat) == 12
  axes = {path: v.get_metadata()["out_sharding"] for path, v in flat.items()}
  assert axes[("layers", 0, "attention", "query_lora", "q")] == ("embed", None)
  assert axes[("layers", 0, "attention", "query_lora", "e")] == (None,)
  assert axes[("layers", 0, "mlp", "ffn_in_lora", "p")] == (None, "mlp")
  assert flat[("layers", 0, "mlp", "ffn_out_lora", "q")].shape == (12, 3)
  assert float(jnp.abs(flat[("layers", 0, "attention", "value_lora", "e")][...]).max()) == 0.0
  assert float(jnp.abs(flat[("layers", 0, "attention", "value_lora", "p")][...]).std()) > 0.01  # normal(0.02)


@pytest.mark.parametrize("override, message", [
    ("encoder.adalora_target_rank=13", "'encoder.adalora_target_rank' must be in [0, encoder.adalora_init_rank=12]"),
    ("encoder.adalora_init_rank=0", "'encoder.adalora_init_rank' must be >= 1"),
    ("encoder.adalora_tinit=15", "'encoder.adalora_tinit'=15 + 'encoder.adalora_tfinal'=0 must be below train.steps=10"),
    ("encoder.adalora_delta_t=0", "'encoder.adalora_delta_t' must be >= 1"),
    ("encoder.adalora_beta1=1.0", "'encoder.adalora_beta1' must be in (0, 1)"),
    ("encoder.adalora_orth_reg=-1", "'encoder.adalora_orth_reg' must be >= 0"),
])
def test_adalora_config_errors_name_the_key(override, message):
  with pytest.raises(ConfigError) as e:
    load_config(TINY, ["encoder.mode=adalora", "train.steps=10", override])
  assert message in str(e.value)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
  from fixtures import tiny_bert
  return tiny_bert.write(tmp_path_factory.mktemp("encoder") / "tiny_bert")


STEPS = 16


def _adalora(encoder_dir, *overrides):
  # 8 adapters of rank 4 on the tiny BERT (width 8): 32 triplets falling to 16 between steps 2 and 10.
  return ["model.use_text=true", "encoder.mode=adalora", f"encoder.path={encoder_dir}", "encoder.lora_ffn=true",
          "encoder.adalora_init_rank=4", "encoder.adalora_target_rank=2", "encoder.adalora_tinit=2",
          "encoder.adalora_tfinal=6", "encoder.adalora_delta_t=2", "encoder.adalora_orth_reg=1.0",
          f"train.steps={STEPS}", "train.warmup_steps=0", "train.learning_rate=0.05", "train.end_lr_fraction=1.0",
          "checkpoint.async_save=false", *overrides]


def _lambdas(state):
  return {tuple(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]
          if path[-1].key == "e"}


@pytest.mark.slow
def test_adalora_training_prunes_to_the_budget_keeps_pruned_lambdas_zero_and_orthogonalises(tmp_path, tiny_bert_dir):
  trainer = Trainer(load_config(TINY, _adalora(tiny_bert_dir, "mesh.num_devices=1", f"workdir={tmp_path}")))
  alloc = trainer.spec.allocator
  assert len(alloc.groups) == 8 and alloc.init_total == 32 and alloc.target_total == 16
  budget_T, _, remask_T = alloc.tables
  state = trainer.init_state()
  assert set(state) == {"params", "tables", "opt", "step", "adalora"}
  orth0 = float(adalora.orthogonality(alloc.adapters(state["params"]), alloc.groups))
  # The same model with the penalty off, for comparison (a second jit of the same step).
  off_spec = dataclasses.replace(trainer.spec, allocator=dataclasses.replace(alloc, orth_reg=0.0))
  off_step = jit_step(off_spec, trainer.state_shardings)
  off_state = jax.tree.map(jnp.copy, state)
  builder = trainer.batch_builder()
  losses, pruned_since = [], {}
  first_mask = int(np.flatnonzero(remask_T)[0])
  for i in range(STEPS):
    batch = trainer.layout.put(builder.map(i))
    state, metrics = trainer.train_step(state, batch)
    off_state, _ = off_step(off_state, batch)
    t = i + 1
    losses.append(float(metrics["loss"]))
    lambdas = _lambdas(state)
    nonzero = sum(int((e != 0).sum()) for e in lambdas.values())
    assert int(metrics["adalora/budget"]) == budget_T[t]
    if t >= first_mask:
      # The last allocation's budget: each pruned lambda is exactly zero, each kept one is not.
      last = int(np.flatnonzero(remask_T[:t + 1])[-1])
      assert nonzero == int(metrics["adalora/rank"]) == budget_T[last], (t, nonzero)
      mask = {tuple(k.key for k in path[:-1]): np.asarray(m)
              for path, m in jax.tree_util.tree_flatten_with_path(state["adalora"]["mask"])[0]}
      for path, e in lambdas.items():
        np.testing.assert_array_equal(e[~mask[path[:-1]]], 0.0)
      if not remask_T[t]:  # between allocations the same triplets stay pruned
        for path, e in lambdas.items():
          np.testing.assert_array_equal(e == 0, pruned_since[path])
      pruned_since = {path: e == 0 for path, e in lambdas.items()}
  assert budget_T[STEPS] == 16 and nonzero == 16
  assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
  orth_on = float(adalora.orthogonality(alloc.adapters(state["params"]), alloc.groups))
  orth_off = float(adalora.orthogonality(alloc.adapters(off_state["params"]), alloc.groups))
  assert orth0 > 1.9  # rows and columns of norm ~0.02 * sqrt(width): far from orthonormal
  # 16 steps take the penalty from 2.0 to about 0.4 with it on; without, to about 1.6.
  assert orth_on < 0.25 * orth0 and orth_on < 0.3 * orth_off, (orth0, orth_on, orth_off)


@pytest.mark.slow
def test_adalora_resume_equals_uninterrupted(tmp_path, tiny_bert_dir):
  common = _adalora(tiny_bert_dir, "mesh.num_devices=1", "checkpoint.every=8", "checkpoint.keep=5")
  straight = Trainer(load_config(TINY, common + [f"workdir={tmp_path / 'straight'}"]))
  want = straight.run()["train/losses"]
  # The resumed run starts from the straight run's step-8 checkpoint (mask and EMAs included).
  shutil.copytree(tmp_path / "straight" / "checkpoints" / "8", tmp_path / "resumed" / "checkpoints" / "8")
  resumed = Trainer(load_config(TINY, common + [f"workdir={tmp_path / 'resumed'}"]))
  step, restored = resumed.restore()
  assert step == 8 and set(restored) == {"params", "tables", "opt", "step", "adalora"}
  got = resumed.run()["train/losses"]
  assert got[8:] == want[8:]
  _, a = straight.restore(STEPS)
  _, b = resumed.restore(STEPS)
  for part in ("params", "opt", "adalora"):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a[part]), jax.tree.map(np.asarray, b[part]))
  saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
  assert saved["steps"] == STEPS
  # TensorBoard gets the allocator's rank and budget beside the loss: the rank (the last
  # allocation's) falls with the budget's schedule to its target.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(tmp_path / "straight" / "tb"))
  events.Reload()
  rank = {e.step: e.value for e in events.Scalars("train/adalora/rank")}
  budget = {e.step: e.value for e in events.Scalars("train/adalora/budget")}
  steps = sorted(rank)
  assert steps == sorted(budget) and len(steps) >= 3
  assert all(rank[a] >= rank[b] for a, b in zip(steps, steps[1:])) and rank[steps[0]] > 16
  assert rank[STEPS] == budget[STEPS] == 16


@pytest.mark.slow
def test_other_modes_carry_no_allocator_state(tiny_bert_dir):
  for overrides in ([], ["model.use_text=true", "encoder.mode=lora", f"encoder.path={tiny_bert_dir}"],
                    ["model.use_text=true", "encoder.mode=frozen", f"encoder.path={tiny_bert_dir}"]):
    trainer = Trainer(load_config(TINY, ["mesh.num_devices=1", *overrides]))
    assert trainer.spec.allocator is None
    assert set(trainer.init_state()) == set(trainer.abstract_state()) == {"params", "tables", "opt", "step"}


@pytest.mark.slow
def test_adalora_prunes_the_same_triplets_on_every_mesh_shape(tiny_bert_dir):
  """The allocation is global over adapters whose EMAs are sharded like their weights (Q over fsdp,
  P over tensor): every mesh keeps the same triplets and trains to the same losses."""
  runs = []
  for mesh in (["mesh.num_devices=1"], ["mesh.data=2", "mesh.tensor=4"]):
    trainer = Trainer(load_config(TINY, _adalora(tiny_bert_dir, "train.steps=6", "encoder.adalora_tinit=1",
                                                 "encoder.adalora_tfinal=2", "encoder.adalora_delta_t=1", *mesh)))
    state, builder, losses = trainer.init_state(), trainer.batch_builder(), []
    for i in range(6):
      state, metrics = trainer.train_step(state, trainer.layout.put(builder.map(i)))
      losses.append(float(metrics["loss"]))
    runs.append((losses, np.concatenate([np.asarray(m) for m in jax.tree.leaves(state["adalora"]["mask"])])))
  (ref_losses, ref_mask), (losses, mask) = runs
  assert ref_mask.sum() == 16
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
