"""The training loop (public entry: `jaxrec.train(cfg)`).

The loop owns the order of things around the pure step of ``step.py``: restore (this workdir's
latest checkpoint, then ``checkpoint.resume_from``, then a fresh state), ahead-of-time compiles
per batch shape, metrics read one step late (step n is dispatched before step n-1's metrics are
read, so the host never waits on the device in the hot loop), validation, checkpoints, signals,
the profiler and MFU; then the final evaluation, the item index and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import optim, recommender as recommender_lib, sharding, step as step_lib, transfer, writers
from jaxrec.batch import BatchLayout
from jaxrec.checkpoint import Checkpointer
from jaxrec.config import Config, to_json
from jaxrec.config_diff import ConfigDiff
from jaxrec.data import sources
from jaxrec.data.dataset import Dataset, Split
from jaxrec.data.pipeline import BatchBuilder, Sequences, item_log_q, train_batches
from jaxrec.files import write_atomically, write_json_atomically
from jaxrec.flops import jaxpr_matmul_flops
from jaxrec.mesh import MeshError, flags_of_all_processes, make_mesh, maybe_initialize_distributed
from jaxrec.workdir import holding_workdir_lock

log = logging.getLogger("jaxrec")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun to resume
EXIT_NONFINITE = 3  # loss became NaN/Inf with train.nan_policy=stop


class TrainingStopped(RuntimeError):
  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class Trainer:
  """One training run of ``cfg``: the model (``recommender``), its batches (``layout``, the
  builder) and the jitted step (``train_step``, ``train_call``); ``run()`` trains and evaluates."""

  def __init__(self, cfg: Config, devices: list | None = None, *, dataset: Dataset | None = None):
    self.cfg = cfg
    maybe_initialize_distributed(cfg.mesh)  # before anything touches the backend
    mesh = make_mesh(cfg.mesh, devices)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    dp = sharding.data_parallel_size(mesh, rules)
    if cfg.train.batch_size % dp:  # refused before the data loads
      raise MeshError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel size {dp} "
                      f"(mesh {dict(mesh.shape)})")
    if cfg.train.batch_size % jax.process_count():
      raise MeshError(f"train.batch_size={cfg.train.batch_size} is not divisible by {jax.process_count()} processes")
    mixed, multiple = cfg.train.mixed_negatives, dp * jax.process_count()
    if mixed % multiple:  # each device holds an equal share of the sampled negatives, like every batch field
      raise MeshError(f"train.mixed_negatives={mixed} must be a multiple of {multiple} (data-parallel size {dp} x "
                      f"{jax.process_count()} processes, mesh {dict(mesh.shape)})")
    self.recommender = rec = recommender_lib.build(cfg, mesh=mesh, rules=rules, dataset=dataset)
    self.mesh, self.dataset, self.split = mesh, rec.dataset, rec.split
    self.train_seqs = Sequences.from_interactions(rec.dataset, rec.split.train)
    self.log_q = item_log_q(rec.dataset.items[rec.split.train], rec.dataset.num_items,
                            batch_size=cfg.train.batch_size, mixed_negatives=cfg.train.mixed_negatives,
                            mixed_sampler=cfg.train.mixed_sampler)
    tokens = rec.text.tokens
    self.layout = BatchLayout.from_config(cfg, num_items=rec.dataset.num_items, mesh=mesh, rules=rules,
                                          token_width=tokens["input_ids"].shape[1] if tokens is not None else 0,
                                          encoder_length_buckets=rec.text.length_buckets)
    # What this run's indexed tables mean (written to the workdir), and where its parameters
    # start when checkpoint.init_from names a trained model.
    self.inputs = transfer.inputs_of(cfg, rec.dataset, rec.id_row)
    abstract_params = rec.abstract_params()["params"]
    self.init_plan = transfer.plan(cfg.checkpoint.init_from, abstract_params, self.inputs, cfg,
                                   zero_shot=False) if cfg.checkpoint.init_from else None
    self.tx = step_lib.make_optimizer(cfg)
    if self.init_plan is not None and cfg.checkpoint.init_trainable == "new":
      self.tx = transfer.train_only_new(self.tx, self.init_plan, abstract_params)
    self.spec = step_lib.StepSpec.of(rec, self.tx, self.layout)
    self.state_shardings = step_lib.state_shardings(rec, self.tx)
    self.train_step = step_lib.jit_step(self.spec, self.state_shardings)
    # The loop runs train.steps_per_call steps per call: the same step, scanned over stacked batches.
    self.train_call = step_lib.jit_step(self.spec, self.state_shardings, stacked=True)
    self.num_params = rec.num_params

  def init_state(self) -> dict:
    """A fresh train state: ``checkpoint.init_from``'s matching parameters where it names a
    trained model (``init_plan``), the others initialised as from scratch."""
    state = step_lib.init_state(self.recommender, self.tx, self.cfg.train.seed)
    if self.init_plan is not None:
      state["params"] = transfer.load(self.init_plan, state["params"], self.state_shardings["params"], self.cfg)
    return state

  def abstract_state(self) -> Any:
    return step_lib.abstract_state(self.recommender, self.tx)

  def batch_builder(self) -> BatchBuilder:
    cfg = self.cfg
    return BatchBuilder(self.layout, self.train_seqs, self.log_q, cfg.train.seed, history=self.recommender.history_mode,
                        tokens=self.recommender.text.tokens, user_weight_power=cfg.train.user_weight_power,
                        history_dropout=cfg.data.history_dropout, mixed_sampler=cfg.train.mixed_sampler,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())

  def evaluate(self, state: dict, split: str | None = None) -> dict[str, float]:
    """Full-ranking metrics of the train state's model on ``split`` (default ``eval.split``)."""
    return self.recommender.evaluate(state["params"], state["tables"], split)

  def restore(self, step: int | None = None) -> tuple[int, dict]:
    """The whole train state of a saved step of this workdir (default: the newest readable one)."""
    ckpt = Checkpointer(os.path.join(os.path.abspath(self.cfg.workdir), "checkpoints"), self.cfg.checkpoint)
    try:
      step, state, _ = ckpt.restore(self.abstract_state(), step=step)
    finally:
      ckpt.close()
    return step, state

  # ---------------------------------------------------------------- loop

  @holding_workdir_lock
  def run(self, resume: bool = True, resume_with_changes: bool = False) -> dict[str, Any]:
    """Trains (resuming this workdir's run when there is one), evaluates, exports the index and
    writes ``metrics.json``. ``resume_with_changes`` lets a resumed run go on with changed
    optimisation settings (``config_diff.ADJUSTABLE``); other changes are always refused."""
    cfg = self.cfg
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    transfer.write_inputs(workdir, self.inputs)
    state, start_step, data_iter, history = self._restore_or_init(ckpt, resume, resume_with_changes)
    log.info("model: %s parameters; mesh %s; %d training examples", f"{self.num_params:,}", dict(self.mesh.shape),
             len(self.train_seqs))
    # Compile ahead of time so the per-device memory is known before the first step runs: the
    # worst-case shape up front, any smaller bucket shape when a batch first needs it.
    k = cfg.train.steps_per_call
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    executables, shape_flops = {}, {}

    def executable(shape, steps=k):  # steps < K only for the last call of a run whose length K does not divide
      if (steps, shape) not in executables:
        started = time.perf_counter()
        traced = self.train_call.trace(abstract_state, self.layout.abstract(shape, steps))
        executables[steps, shape] = traced.lower().compile()
        shape_flops[steps, shape] = jaxpr_matmul_flops(traced.jaxpr) / steps
        if len(executables) > 1:
          log.info("train step compiled for %d steps of shape %s (%s) in %.1f s", steps, shape,
                   "distinct items, stream tokens, text length" if self.layout.text == "stream" else "distinct items, tokens",
                   time.perf_counter() - started)
      return executables[steps, shape]

    # From here a SIGTERM/SIGINT is a flag the loop answers at its first step boundary (saving that
    # step), not a kill: a preemption during compilation or setup loses nothing either.
    stop_signal = _SignalFlag()
    try:
      log.info("compiling the train step (%d step%s a call)", k, "s" if k > 1 else "")
      memory = executable(self.layout.worst_shape).memory_analysis()
      if memory is not None:
        log.info("train step compiled: %.1f MiB temporaries, %.1f MiB arguments per device",
                 memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20)
      if (cfg.train.steps - start_step) % k:  # the shorter last call, compiled before the clock starts too
        executable(self.layout.worst_shape, (cfg.train.steps - start_step) % k)

      writer = writers.open_writers(cfg.train.writers, workdir, json.loads(to_json(cfg))) if is_main else None
      self._learning_rates = _LearningRates(cfg.train)
      progress = _progress(cfg, start_step) if is_main else None
      best = Checkpointer(os.path.join(workdir, "checkpoints", "best"), cfg.checkpoint, cfg.checkpoint.best_metric) \
          if cfg.checkpoint.best_metric else None
    except BaseException:
      stop_signal.restore()
      raise
    pending = None  # (step, device metrics) of the step dispatched last, read one step late
    flops_done = 0.0
    profiler = _Profiler(os.path.join(workdir, "profile"), start_step + 3 * k, 5 * k) if cfg.train.profile and is_main else None
    timer_start, examples, data_wait = time.perf_counter(), 0, 0.0
    every = cfg.checkpoint.every
    if start_step < cfg.train.steps:
      log.info("training steps %d-%d, batch %d", start_step + 1, cfg.train.steps, cfg.train.batch_size)
    try:
      for step in range(start_step, cfg.train.steps, k):
        if profiler is not None:
          profiler.at(step)
        waited = time.perf_counter()
        batches = next(data_iter)
        data_wait += time.perf_counter() - waited
        shape, steps = self.layout.shape_of(batches), min(k, cfg.train.steps - step)
        state, call_metrics = executable(shape, steps)(state, batches)
        flops_done += steps * shape_flops[steps, shape]
        examples += steps * cfg.train.batch_size
        if pending is not None:
          self._record(*pending, history, writer, progress, ckpt)
        pending = (step, call_metrics)
        done = step + steps
        # Every process stops at the same step whichever received the signal: one stopping alone
        # would leave the others waiting in the next step's collective.
        stopped = stop_signal.agreed(f"step {done}")
        interrupted = stopped is not None
        validate = bool(cfg.train.eval_every) and done % cfg.train.eval_every == 0 and done < cfg.train.steps
        save = interrupted or (every and done % every == 0 and done < cfg.train.steps)
        if validate or save:  # both need the loss history up to ``done``
          self._record(*pending, history, writer, progress, ckpt)
          pending = None
        if validate:
          self._validate(done, state, data_iter, history, writer, best)
        if save:
          ckpt.save(done, state, data_iter, to_json(cfg), history, force=interrupted)
        if interrupted:
          ckpt.close()
          raise TrainingStopped(f"{stopped}; saved checkpoint at step {done} in "
                                f"{ckpt.directory}; rerun the same command to resume", EXIT_PREEMPTED)
      if pending is not None:
        self._record(*pending, history, writer, progress, ckpt)
      jax.block_until_ready(state)
      elapsed = time.perf_counter() - timer_start
      if profiler is not None:
        profiler.stop()
      if cfg.train.steps > start_step or ckpt.latest_step() is None:
        ckpt.save(cfg.train.steps, state, data_iter, to_json(cfg), history, force=True)
    except BaseException:
      stop_signal.restore()
      raise
    finally:
      if progress is not None:
        progress.close()
      ckpt.close()
      if best is not None:
        best.close()

    # SIGTERM/SIGINT stays a flag through evaluation and export: the final checkpoint is saved by
    # now, so a preempted run stops between phases with exit 75 and its rerun only evaluates.
    try:
      return self._finish(state, history, stop_signal, start_step, elapsed, examples, data_wait, flops_done, writer)
    finally:
      stop_signal.restore()

  def _finish(self, state, history, stop_signal, start_step, elapsed, examples, data_wait, flops_done,
              writer) -> dict[str, Any]:
    """After the last step: final evaluation, the item index, metrics.json and config.json."""
    cfg = self.cfg
    workdir = os.path.abspath(cfg.workdir)
    is_main = jax.process_index() == 0

    def stop_if_signalled(phase):
      stopped = stop_signal.agreed(phase)
      if stopped is not None:
        raise TrainingStopped(f"{stopped} {phase}; the final checkpoint (step {cfg.train.steps}) "
                              f"is saved; rerun the same command to evaluate and export", EXIT_PREEMPTED)

    stop_if_signalled("after training")
    # Bucketed shapes differ in work: the mean over the steps run, not the worst case's.
    flops_per_step = flops_done / max(cfg.train.steps - start_step, 1)
    ms_per_step = 0.0
    if elapsed > 0 and cfg.train.steps > start_step:
      steps_done = cfg.train.steps - start_step
      ms_per_step = 1e3 * elapsed / steps_done
      log.info("%.2f ms/step: %.1f%% waiting for data, the rest dispatching/computing; %.3f TFLOP/s achieved",
               ms_per_step, 100 * data_wait / elapsed, flops_per_step * steps_done / elapsed / 1e12)
    log.info("final parameter checksum %s", parameter_checksum(state["params"]))
    log.info("evaluating on the %s split", cfg.eval.split)
    result = self.evaluate(state)
    stop_if_signalled("during the final evaluation")
    result.update(sources_describe(self.dataset, self.split))
    result.update({
        "steps": cfg.train.steps,
        "train/final_loss": history[-1] if history else float("nan"),
        "train/losses": history,
        "train/examples_per_sec": examples / elapsed if elapsed > 0 and examples else 0.0,
        "train/data_wait_fraction": data_wait / elapsed if elapsed > 0 else 0.0,
        "train/ms_per_step": ms_per_step,
        **_utilisation(flops_per_step, (cfg.train.steps - start_step) / elapsed if elapsed > 0 else 0.0, self.mesh),
        "protocol": f"{self.split.protocol}; full ranking of {self.dataset.num_items} items, the user's known items "
                    f"excluded; evaluated on {cfg.eval.split}",
        "model/params": self.num_params,
    })
    log.info("building the item index")
    index = self.recommender.build_index(state["params"], state["tables"], cfg.train.steps)
    if is_main:
      index.save(os.path.join(workdir, "index"))
      log.info("wrote %s", os.path.join(workdir, "index"))
      write_json_atomically(os.path.join(workdir, "metrics.json"), result)
      write_atomically(os.path.join(workdir, "config.json"), to_json(cfg))
      if writer is not None:
        writer.write(cfg.train.steps, {"eval/" + key.replace("@", "_at_"): value for key, value in result.items()
                                       if isinstance(value, float)})
        writer.close()
    self.state = state
    return result

  def _validate(self, step: int, state: dict, data_iter, history, writer, best) -> None:
    """Validation metrics mid-training; with checkpoint.best_metric, keeps the best step's state."""
    metrics_ = self.evaluate(state, "valid")
    log.info("step %d validation: %s", step, ", ".join(f"{k}={metrics_[k]:.4f}" for k in ("recall@10", "ndcg@10")
                                                     if k in metrics_))
    if writer is not None:
      writer.write(step, {"valid/" + key.replace("@", "_at_"): value for key, value in metrics_.items()
                          if isinstance(value, float) and not key.startswith("popularity/")})
    if best is not None:
      if self.cfg.checkpoint.best_metric not in metrics_:
        raise ValueError(f"checkpoint.best_metric={self.cfg.checkpoint.best_metric!r} is not a validation metric "
                         f"(e.g. {', '.join(sorted(metrics_)[:4])})")
      best.save(step, state, data_iter, to_json(self.cfg), history, metrics={k: float(v) for k, v in metrics_.items()
                                                                              if isinstance(v, (int, float))})

  def _record(self, first_step, call_metrics, history, writer, progress, ckpt) -> None:
    """Host side of one finished call (``[K]`` metrics of K steps)."""
    keys = ("loss", "finite", "grad_norm", *(k for k in call_metrics if k.startswith("adalora/")))
    host = jax.device_get({k: call_metrics[k] for k in keys})
    for i in range(len(host["loss"])):
      self._record_step(first_step + i, {k: v[i] for k, v in host.items()}, history, writer, progress, ckpt)

  def _record_step(self, step, step_metrics, history, writer, progress, ckpt) -> None:
    """Host side of one finished step: NaN policy, loss history, progress bar, TensorBoard."""
    loss = float(step_metrics["loss"])
    done = step + 1
    if not bool(step_metrics["finite"]):
      if self.cfg.train.nan_policy == "stop":
        last = ckpt.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}" if last is not None else
                "no checkpoint was saved before it")
        raise TrainingStopped(f"loss is {loss} at step {done}; training stopped (train.nan_policy=stop); {kept}",
                              EXIT_NONFINITE)
      log.warning("non-finite loss at step %d: update skipped (train.nan_policy=skip)", done)
    history.append(loss)
    log_now = done % max(self.cfg.train.log_every, 1) == 0 or done == self.cfg.train.steps
    if progress is not None:
      progress.update(1)
      if log_now:
        rate = progress.format_dict.get("rate") or 0.0
        progress.set_postfix(loss=f"{loss:.4f}", examples_per_s=f"{rate * self.cfg.train.batch_size:,.0f}")
    if writer is not None and log_now:
      # The rate this step's update used (the schedule at its optimizer count, done - 1); with
      # encoder.mode=full the encoder's is this times encoder.lr_multiplier.
      writer.write(done, {"train/loss": loss, "train/learning_rate": float(self._learning_rates[done - 1]),
                          "train/grad_norm": float(step_metrics["grad_norm"]),
                          # AdaLoRA's rank, budget, orthogonality
                          **{f"train/{k}": float(v) for k, v in step_metrics.items() if k.startswith("adalora/")}})

  def _restore_or_init(self, ckpt: Checkpointer, resume: bool, resume_with_changes: bool = False):
    """Restore order: this workdir's latest checkpoint, then checkpoint.resume_from, then
    checkpoint.init_from's matching parameters on a fresh state, then scratch (with the pretrained
    text encoder's vectors when the model uses text)."""
    data_iter = iter(train_batches(self.batch_builder(), 0, self.cfg.train.steps, to_device=self.layout.put,
                                   steps_per_call=self.cfg.train.steps_per_call, num_threads=self.cfg.data.num_threads))
    if resume and ckpt.latest_step() is not None:
      check_resumable(self.cfg, ckpt, resume_with_changes)
      step, state, history = ckpt.restore(self.abstract_state(), data_iter, move_damaged_aside=True)
      log.info("resuming from checkpoint step %d in %s", step, ckpt.directory)
      return state, step, data_iter, history[:step]
    if self.cfg.checkpoint.resume_from:
      other = Checkpointer(self.cfg.checkpoint.resume_from, self.cfg.checkpoint)
      try:
        step, state, _ = other.restore(self.abstract_state())
      finally:
        other.close()
      log.info("initialised from %s (step %d); data and step counter start fresh", self.cfg.checkpoint.resume_from, step)
      state = dict(state, step=jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"]))
      return state, 0, data_iter, []
    if self.init_plan is not None:
      self.init_plan.log()
      return self.init_state(), 0, data_iter, []
    log.info("starting from scratch%s", " with the pretrained text encoder's catalog vectors" if self.cfg.model.use_text else "")
    return self.init_state(), 0, data_iter, []


# Dense peak FLOP/s per chip for the MFU estimate (bf16 for accelerators); CPUs have no fixed
# peak, so on CPU only the achieved FLOP/s is reported.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12}


def _utilisation(flops_per_step: float, steps_per_sec: float, mesh) -> dict[str, float]:
  achieved = flops_per_step * steps_per_sec
  out = {"train/step_tflops": flops_per_step / 1e12, "train/achieved_tflops_per_sec": achieved / 1e12}
  kind = mesh.devices.flat[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), 0.0)
  if peak:
    out["train/mfu"] = achieved / (peak * mesh.size)
  return out


class _Profiler:
  """A jax.profiler trace of ``num_steps`` steps starting at ``first`` (open it with TensorBoard or Perfetto)."""

  def __init__(self, directory: str, first: int, num_steps: int):
    self.directory, self.first, self.last, self.active = directory, first, first + num_steps, False

  def at(self, step: int) -> None:
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True
      log.info("profiling steps %d-%d into %s", self.first, self.last - 1, self.directory)
    elif step == self.last:
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def parameter_checksum(params: Any) -> str:
  """A digest of every parameter's full value as this process sees it (gathered across processes)."""
  import hashlib
  from jax.experimental import multihost_utils
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = multihost_utils.process_allgather(leaf, tiled=True) if jax.process_count() > 1 else np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]


def sources_describe(dataset: Dataset, split: Split) -> dict[str, Any]:
  describe = getattr(sources, "describe", None)
  if describe is not None:
    return describe(dataset, split)
  return {"data/users": dataset.num_users, "data/items": dataset.num_items,
          "data/interactions": dataset.num_interactions, "data/train": int(len(split.train)),
          "data/valid": int(len(split.valid)), "data/test": int(len(split.test)),
          "data/cold_items": int(split.cold_items.sum())}


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries.

  A signal often reaches one process of several (a preempted host), so the loop asks ``agreed``,
  which answers the same on every process: jax's preemption sync point
  (``multihost_utils.reached_preemption_sync_point``) cannot, as it hears only the SIGTERM its own C++
  handler catches (replaced by this one, which SIGINT and the phases after training need too)."""

  def __init__(self):
    self.raised = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass

  def _handle(self, signum, frame):
    self.raised = signal.Signals(signum).name

  def agreed(self, point: str) -> str | None:
    """Which process received which signal by ``point`` (every process calls it at the same points),
    e.g. "process 1 of 2 received SIGTERM", or "received SIGTERM" in a one-process run; None if none."""
    flags = flags_of_all_processes(point, self.raised)
    if not flags:
      return None
    if jax.process_count() == 1:
      return f"received {flags[jax.process_index()]}"
    by_signal: dict[str, list[int]] = {}
    for process, name in sorted(flags.items()):
      by_signal.setdefault(name, []).append(process)
    return " and ".join(f"process{'es' if len(ids) > 1 else ''} {', '.join(map(str, ids[:4]))}"
                        f"{f' and {len(ids) - 4} more' if len(ids) > 4 else ''} of {jax.process_count()} received {name}"
                        for name, ids in by_signal.items())

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _LearningRates:
  """The schedule's rate at an optimizer count, computed on the host a block of counts at a time when
  first asked: logging it costs no device work per step (which would wait behind the running step),
  and a run of a million steps does not compute them all up front."""

  BLOCK = 4096

  def __init__(self, train_cfg):
    self._schedule, self._block, self._rates = optim.schedule(train_cfg), -1, None

  def __getitem__(self, count: int) -> float:
    block = count // self.BLOCK
    if block != self._block:
      self._rates = np.asarray(self._schedule(np.arange(block * self.BLOCK, (block + 1) * self.BLOCK)), np.float64)
      self._block = block
    return float(self._rates[count % self.BLOCK])


def _progress(cfg: Config, start: int):
  if not cfg.train.progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: Config, *, dataset: Dataset | None = None, resume_with_changes: bool = False) -> dict[str, Any]:
  """Public API: trains ``cfg``, evaluates, writes ``cfg.workdir``; returns the final metrics.
  ``dataset`` (a ``jaxrec.Dataset``, e.g. ``Dataset.from_frames``) trains on it instead of
  ``cfg.data.source``; ``cfg.data`` then only says how to split and filter it.

  A workdir with checkpoints resumes them; a changed config is refused unless its changes are
  safe (``resume_with_changes=True`` for optimisation settings, see ``jaxrec.config_diff``)."""
  _show_progress_logs()
  writers.check(cfg.train.writers)  # a missing wandb/mlflow package before any data or compile
  cfg = pin_encoder_revision(cfg)
  # Before the checkpoint check below: orbax starts JAX's backends, after which a process can no
  # longer join a multi-process run (so a preempted multi-process run could not resume).
  maybe_initialize_distributed(cfg.mesh)
  checkpoints = os.path.join(os.path.abspath(cfg.workdir), "checkpoints")
  if os.path.isdir(checkpoints):  # refuse a different experiment before loading data and compiling
    ckpt = Checkpointer(checkpoints, cfg.checkpoint)
    try:
      check_resumable(cfg, ckpt, resume_with_changes, announce=False)
    finally:
      ckpt.close()
  return Trainer(cfg, dataset=dataset).run(resume_with_changes=resume_with_changes)


def pin_encoder_revision(cfg: Config) -> Config:
  """``encoder.path=org/name`` -> ``org/name@<commit>`` of the files it resolves to, so the run's saved
  config names the exact weights (the hub's branch may move; a rerun of this workdir reads the same
  commit from the cache, and a different one is a different experiment)."""
  reads_text = cfg.model.use_text or cfg.model.query == "text"
  if not reads_text or cfg.encoder.mode == "none" or not cfg.encoder.path:
    return cfg
  from jaxrec import hub
  resolved = hub.resolve(cfg.encoder.path)
  if not resolved.repo or resolved.revision == hub.revision_of(cfg.encoder.path):
    return cfg
  return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, path=f"{resolved.repo}@{resolved.revision}"))


def check_resumable(cfg: Config, ckpt: Checkpointer, resume_with_changes: bool, announce: bool = True) -> None:
  """Refuses to resume a different experiment (the newest step whose config reads is the reference)."""
  for step in sorted(ckpt.steps(), reverse=True):
    try:
      saved = ckpt.saved_config(step)
    except Exception:  # a damaged step: restore reports it and falls back
      continue
    diff = ConfigDiff.between(saved, cfg)
    changed = diff.check_resume(cfg.workdir, resume_with_changes)
    if changed and announce:
      log.info("resuming with changed settings: %s", diff.describe(changed, 20))
    return


def _show_progress_logs() -> None:
  """Python's default shows warnings only, so a ``jaxrec.train`` call would sit silent through loading,
  encoding and compiling; unless the program set jaxrec's (or the root) level itself, jaxrec's own
  logger passes its phase lines on, to a stderr handler of its own when no handler exists."""
  jaxrec_log = logging.getLogger("jaxrec")
  if jaxrec_log.getEffectiveLevel() <= logging.INFO:
    return
  jaxrec_log.setLevel(logging.INFO)
  if not logging.getLogger().handlers and not jaxrec_log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jaxrec %(message)s", datefmt="%H:%M:%S"))
    jaxrec_log.addHandler(handler)
