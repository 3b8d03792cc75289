"""TensorFlow Recommenders peer: the tutorial's two-tower retrieval model on the benchmark's batches.

Runs in its own interpreter (a virtualenv with tensorflow-cpu, tf-keras and
tensorflow-recommenders; see benchmarks/README.md) and never imports jaxrec. Input: an .npz
written by benchmarks/train_throughput.py. Output: PREFIX.npz with item vectors [N, E] and query
vectors [U, E] for the benchmark to score, and PREFIX.json with the timing.

The model is the "Recommending movies: retrieval" tutorial's: a user-id embedding and an item-id
embedding (the ids here are already dense, so the tutorial's StringLookup layers have nothing to
do and are left out), scored by a dot product in ``tfrs.tasks.Retrieval`` with no metrics during
training. Three changes make the loss the one jaxrec optimises, and each is an argument of the
same TFRS API: both vectors are L2-normalised (so ``temperature`` means what it means in jaxrec),
``candidate_sampling_probability`` applies the logQ correction, ``remove_accidental_hits`` masks
duplicates of the positive, and the cross-entropy is averaged over the batch (TFRS sums by
default, which with global-norm clipping would clip every step). The optimiser is Keras AdamW
with jaxrec's schedule (linear warmup from 0, cosine decay) and global-norm clipping.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS is built on Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

import peer_io  # noqa: E402  (this directory: the peers' shared command line and outputs)


class RetrievalModel(tfrs.Model):

  def __init__(self, num_users: int, num_items: int, dim: int, temperature: float, seed: int):
    super().__init__()
    # One initializer per table: a Keras initializer instance returns the same values on every
    # call, which would start user i and item i on the same vector.
    user_init = tf.keras.initializers.RandomNormal(stddev=0.05, seed=2 * seed)
    item_init = tf.keras.initializers.RandomNormal(stddev=0.05, seed=2 * seed + 1)
    self.user_model = tf.keras.Sequential([tf.keras.layers.Embedding(num_users, dim, embeddings_initializer=user_init)])
    self.item_model = tf.keras.Sequential([tf.keras.layers.Embedding(num_items, dim, embeddings_initializer=item_init)])
    loss = tf.keras.losses.CategoricalCrossentropy(from_logits=True,
                                                   reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE)
    self.task = tfrs.tasks.Retrieval(loss=loss, temperature=temperature, remove_accidental_hits=True)

  def queries(self, users):
    return tf.math.l2_normalize(self.user_model(users), axis=-1)

  def items(self, items):
    return tf.math.l2_normalize(self.item_model(items), axis=-1)

  def compute_loss(self, features, training=False):
    return self.task(self.queries(features["user"]), self.items(features["item"]),
                     candidate_sampling_probability=tf.exp(features["log_q"]),
                     candidate_ids=features["item"], compute_metrics=False)


def main() -> None:
  args, data, cfg, started = peer_io.parse(__doc__.splitlines()[0], lambda parser: parser.add_argument(
      "--jit-compile", action="store_true", help="compile the train step with XLA (not the tutorial's default)"))
  tf.config.threading.set_intra_op_parallelism_threads(cfg["threads"])
  tf.config.threading.set_inter_op_parallelism_threads(cfg["threads"])
  tf.keras.utils.set_random_seed(cfg["seed"])

  model = RetrievalModel(int(data["num_users"]), int(data["num_items"]), cfg["embed_dim"], cfg["temperature"],
                         cfg["seed"])
  steps = cfg["total_steps"]
  warmup = min(cfg["warmup_steps"], max(steps - 1, 0))
  schedule = tf.keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=0.0, decay_steps=max(steps, warmup + 1) - warmup, alpha=cfg["end_lr_fraction"],
      warmup_target=cfg["learning_rate"], warmup_steps=warmup)
  model.compile(optimizer=tf.keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg["weight_decay"],
                                                    beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                                                    global_clipnorm=cfg["clip_norm"]))
  train_step = tf.function(model.train_step, jit_compile=args.jit_compile)

  keys = ("user", "item", "log_q")
  batches = {k: data["batch_" + k] for k in keys}
  losses = []
  t0 = None
  for step in range(cfg["steps"]):
    if step == cfg["timing_warmup"]:
      t0 = time.perf_counter()
    logs = train_step({k: tf.convert_to_tensor(batches[k][step]) for k in keys})
    losses.append(logs["loss"])
  elapsed = time.perf_counter() - t0
  losses = [float(x) for x in losses]

  items_NxE = model.items(tf.range(int(data["num_items"]))).numpy()
  queries_UxE = model.queries(tf.convert_to_tensor(data["eval_users"])).numpy()
  peer_io.write(args.out, items_NxE, queries_UxE, peer="tfrs" + ("+xla" if args.jit_compile else ""),
                version=f"tf {tf.__version__}, tfrs {tfrs.__version__}", threads=cfg["threads"],
                timed_steps=cfg["steps"] - cfg["timing_warmup"], elapsed=elapsed, batch_size=cfg["batch_size"],
                losses=losses, started=started, params=int(sum(np.prod(v.shape) for v in model.trainable_variables)))

if __name__ == "__main__":
  main()
