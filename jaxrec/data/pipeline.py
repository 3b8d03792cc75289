"""Training batches on grain, built lazily from compact arrays.

An example is one training interaction: (user, positive item, L of the user's other training
items as history). The history is either the L items just before it in time ("recent", for
temporal protocols) or L drawn at random from all of the user's other training items ("sampled",
for random splits, whose held-out items are not the next in time: a "recent" history there trains
the query tower on an order the evaluation never shows). Batch ``b`` is a pure function of ``(seed, b)``: the example stream is the
concatenation of per-epoch permutations drawn from ``(seed, epoch)``, and batch ``b`` is
positions ``[b*B, (b+1)*B)`` of it. Each process builds only its own rows of the global batch,
so a restart (or a different process count) reproduces exactly the same global batches.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from jaxrec.batch import BatchLayout
from jaxrec.config import DataConfig
from jaxrec.data.dataset import Dataset


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Per-user, time-ordered item sequences in CSR form."""

  items: np.ndarray  # int32 [T] item per position, grouped by user
  start: np.ndarray  # int64 [U+1] first position of each user
  user: np.ndarray  # int32 [T] user of each position

  @classmethod
  def from_interactions(cls, dataset: Dataset, indices: np.ndarray) -> "Sequences":
    users, stamps = dataset.users[indices], dataset.timestamps[indices]
    order = indices[np.lexsort((indices, stamps, users))]
    users = dataset.users[order]
    start = np.searchsorted(users, np.arange(dataset.num_users + 1)).astype(np.int64)
    return cls(items=dataset.items[order].astype(np.int32), start=start, user=users.astype(np.int32))

  def __len__(self) -> int:
    return len(self.items)

  def history_before(self, positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Items at the ``length`` positions before each position within its user (-1 padded).

    Returns ``(history [P, L] int32, mask [P, L] bool)``, most recent last.
    """
    user_start = self.start[self.user[positions]]
    offsets = positions[:, None] - length + np.arange(length)[None, :]
    mask = offsets >= user_start[:, None]
    history = np.where(mask, self.items[np.clip(offsets, 0, max(len(self.items) - 1, 0))], -1)
    return history.astype(np.int32), mask

  def sampled_history(self, positions: np.ndarray, length: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``length`` distinct items drawn from the rest of each position's user (-1 padded).

    Users with at most ``length`` other items give all of them. Returns ``(history [P, L] int32,
    mask [P, L] bool)``; the target position itself is never drawn.
    """
    user = self.user[positions]
    first, others = self.start[user], self.start[user + 1] - self.start[user] - 1
    draws = _distinct_draws(others, length, rng)
    mask = draws >= 0
    skip_target = draws >= (positions - first)[:, None]  # offsets past the target shift by one
    offsets = np.where(mask, first[:, None] + draws + skip_target, 0)
    return np.where(mask, self.items[offsets], -1).astype(np.int32), mask

  def sampled_items(self, users: np.ndarray, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``length`` distinct known items per user (eval queries), -1 padded: ``([P, L], [P, L])``.

    A user's draw depends only on ``seed``, the user and their items, never on which users share
    the call, so ``evaluate`` and ``build_index`` (different batchings) give a user the same query.
    Users with more than ``length`` items keep the ``length`` with the smallest keyed hash of
    (seed, user, item): a uniform random subset.
    """
    users = np.asarray(users, np.int64)
    first, counts = self.start[users], self.start[users + 1] - self.start[users]
    slots = np.arange(length)[None, :]
    offsets = np.where(slots < counts[:, None], slots, -1)  # users with at most L items: all of them
    many = np.flatnonzero(counts > length)
    if many.size:
      c = counts[many]
      row = np.repeat(np.arange(many.size), c)
      offset = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
      keys = _keyed_hash(seed, users[many][row], self.items[first[many][row] + offset])
      order = np.lexsort((keys, row))  # rows stay grouped in order; within a row, by key
      rank = offset  # after the sort, position within the row is the key's rank
      keep = rank < length
      offsets[many[row[order][keep]], rank[keep]] = offset[order][keep]
    mask = offsets >= 0
    history = np.where(mask, self.items[np.where(mask, first[:, None] + offsets, 0)], -1)
    return history.astype(np.int32), mask

  def query_history(self, users: np.ndarray, length: int, mode: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The history an eval/serving query pools, by resolved ``data.history`` mode: ``sampled``
    draws ``length`` known items per user, ``recent`` takes the last ``length``. The training-time
    counterpart (per target position) is ``BatchBuilder.parts``."""
    if mode == "sampled":
      return self.sampled_items(users, length, seed)
    return self.last_items(users, length)

  def last_items(self, users: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's ``length`` most recent items (-1 padded), for building eval queries."""
    ends = self.start[users + 1]
    offsets = ends[:, None] - length + np.arange(length)[None, :]
    mask = offsets >= self.start[users][:, None]
    history = np.where(mask, self.items[np.clip(offsets, 0, max(len(self.items) - 1, 0))], -1)
    return history.astype(np.int32), mask


def _keyed_hash(seed: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """A splitmix64 finaliser of (seed, user, item): uint64 keys, uniform and independent per pair."""
  with np.errstate(over="ignore"):
    x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + users.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
         + items.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _distinct_draws(counts: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
  """Per row, ``min(count, length)`` distinct offsets in ``[0, count)``, -1 padded: ``[P, length]``.

  Small rows are exact random subsets (argsort of random keys over at most ``4 * length``
  columns); rows with more than ``4 * length`` items draw with replacement and mask repeats,
  which keeps the cost at ``O(P * length)`` for users with thousands of items.
  """
  counts = np.asarray(counts, np.int64)
  out = np.full((len(counts), length), -1, np.int64)
  few = counts <= length
  out[few] = np.where(np.arange(length)[None, :] < counts[few, None], np.arange(length)[None, :], -1)
  width = 4 * length
  mid = ~few & (counts <= width)
  if mid.any():
    keys = rng.random((int(mid.sum()), width))
    keys[np.arange(width)[None, :] >= counts[mid, None]] = np.inf
    out[mid] = np.argsort(keys, axis=1)[:, :length]
  many = counts > width
  if many.any():
    draws = np.sort(rng.integers(0, counts[many, None], size=(int(many.sum()), length)), axis=1)
    repeat = np.concatenate([np.zeros((len(draws), 1), bool), draws[:, 1:] == draws[:, :-1]], axis=1)
    out[many] = np.where(repeat, -1, draws)
  return out


def history_mode(data: DataConfig, has_time: bool, query: str = "pool") -> str:
  """Resolves ``data.history=auto``: the recent items where the protocol is temporal, and always
  for an order-aware query tower (which reads the history in order: the transformer, and the text
  query's titles, most recent last)."""
  if data.history != "auto":
    return data.history
  temporal = data.split in ("loo", "temporal") or (data.split == "predefined" and has_time)
  return "recent" if temporal or query in ("transformer", "text") else "sampled"


MIXED_SAMPLERS = ("uniform", "popularity")


def item_log_q(train_items: np.ndarray, num_items: int, *, batch_size: int = 0, mixed_negatives: int = 0,
               mixed_sampler: str = "uniform") -> np.ndarray:
  """log P(a candidate slot of a batch holds the item); unseen items get the floor.

  Without mixed negatives the B candidates are the batch's positives, drawn by uniform example
  sampling: the training unigram p_data. With M mixed negatives (``BatchBuilder``'s sampler) a
  slot is one of the B positives or one of the M samples, so the probability is the mixture
  ``(B * p_data + M * p_sampler) / (B + M)``, p_sampler uniform over the trained items or, for
  ``popularity``, p_data itself.
  """
  counts = np.bincount(train_items, minlength=num_items).astype(np.float64)
  if not mixed_negatives:
    return np.log(np.maximum(counts, 0.5) / max(len(train_items), 1)).astype(np.float32)
  if mixed_sampler not in MIXED_SAMPLERS:
    raise ValueError(f"unknown mixed negative sampler {mixed_sampler!r}: use {' or '.join(MIXED_SAMPLERS)}")
  if batch_size <= 0:
    raise ValueError("the mixture of in-batch and mixed negatives needs the batch size")
  p_data = np.maximum(counts, 0.5) / max(len(train_items), 1)
  trained = counts > 0
  p_sampler = p_data * trained if mixed_sampler == "popularity" else trained / max(int(trained.sum()), 1)
  q = (batch_size * p_data + mixed_negatives * p_sampler) / (batch_size + mixed_negatives)
  return np.log(q).astype(np.float32)


class BatchBuilder(grain.transforms.Map):
  """Maps a global batch index to this process's rows of that batch (numpy arrays), in ``layout``'s fields."""

  def __init__(self, layout: BatchLayout, seqs: Sequences, log_q: np.ndarray, seed: int, *,
               history: str = "recent", tokens: dict[str, np.ndarray] | None = None,
               user_weight_power: float = 0.0, history_dropout: float = 0.0, mixed_sampler: str = "uniform",
               process_index: int = 0, process_count: int = 1):
    batch_size = layout.batch_size
    if batch_size % process_count:
      raise ValueError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes")
    if len(seqs) == 0:
      raise ValueError("no training interactions to build batches from")
    self.layout, self.seqs, self.log_q = layout, seqs, log_q
    if history not in ("recent", "sampled"):
      raise ValueError(f"unknown history mode {history!r}: use recent or sampled")
    self.batch_size, self.history_len, self.seed, self.history = batch_size, layout.history_len, seed, history
    if not 0.0 <= history_dropout < 1.0:
      raise ValueError(f"history_dropout must be in [0, 1); got {history_dropout}")
    self.history_dropout = history_dropout
    per_process = batch_size // process_count
    self.rows = slice(process_index * per_process, (process_index + 1) * per_process)
    # With a unique capacity, the batch also carries its distinct items (global, padded to the
    # smallest row bucket that holds them; this process holds its share) and each row's slot in
    # that list, so the item tower runs once per distinct item. With ``tokens`` (a live encoder's
    # catalog table, [N, T] each) it also carries those items' tokens cut to the smallest length
    # bucket that holds the longest: the step's shape is then a pure function of the batch, so
    # resumed and multi-process runs agree on it.
    self.unique_capacity = layout.unique_capacity
    # Per-example loss weights n_u ** -power, scaled to mean 1 over the training examples so the
    # loss stays on the unweighted scale; None (no weight array in the batch) at power 0.
    if bool(user_weight_power) != layout.weighted:
      raise ValueError(f"user_weight_power={user_weight_power} disagrees with the layout (weighted={layout.weighted})")
    self.weight_T = None
    if user_weight_power:
      counts_U = np.diff(seqs.start).astype(np.float64)
      weight_T = np.maximum(counts_U[seqs.user], 1.0) ** -user_weight_power
      self.weight_T = (weight_T / weight_T.mean()).astype(np.float32)
    self.process_index, self.process_count = process_index, process_count
    # Mixed negatives: M draws with replacement per global batch, from the trained items uniformly
    # or from the training interactions uniformly (= items by popularity); ``log_q`` must be the
    # mixture's (``item_log_q`` with the same M and sampler).
    self.mixed_negatives = layout.mixed_negatives
    if mixed_sampler not in MIXED_SAMPLERS:
      raise ValueError(f"unknown mixed negative sampler {mixed_sampler!r}: use {' or '.join(MIXED_SAMPLERS)}")
    if self.mixed_negatives % process_count:
      raise ValueError(f"{self.mixed_negatives} mixed negatives are not divisible by {process_count} processes")
    self.mixed_sampler = mixed_sampler
    self.sampler_pool = seqs.items if mixed_sampler == "popularity" else np.unique(seqs.items)
    self.row_buckets = layout.row_buckets
    if self.unique_capacity:
      for rows in self.row_buckets:
        if rows % process_count:
          raise ValueError(f"unique item capacity {rows} is not divisible by {process_count} processes")
    if (tokens is not None) != (layout.text != "none"):
      raise ValueError(f"the layout's text={layout.text!r} needs the catalog's tokens exactly when a live encoder runs")
    self.tokens = tokens
    if tokens is not None:
      self.length_buckets = layout.length_buckets
      self.token_count_N = tokens["attention_mask"].sum(axis=1)
    # With a token stream the distinct items' texts instead travel as one stream of their tokens,
    # end to end (``stream``), padded to the smallest stream bucket that holds every process's share.
    self.stream_buckets = layout.stream_buckets
    if self.stream_buckets and any(b % process_count for b in self.stream_buckets):
      raise ValueError(f"token stream buckets {self.stream_buckets} must be multiples of {process_count} processes")

  @functools.lru_cache(maxsize=4)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))

  def positions(self, batch_index: int) -> np.ndarray:
    """Sequence positions of the whole global batch ``batch_index``."""
    stream = np.arange(batch_index * self.batch_size, (batch_index + 1) * self.batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(stream, len(self.seqs))
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._epoch_order(int(epoch))[offsets[sel]]
    return out

  def map(self, batch_index: int, shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """This process's rows of batch ``batch_index``; ``shape`` (``shape_of``'s) pads its distinct
    items past their own buckets (to share one shape with other batches of a call)."""
    batch, unique = self.parts(int(batch_index))
    if unique is None:
      return batch
    return self.pad(batch, unique, shape or self.shape_of(unique))

  def parts(self, batch_index: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """This process's rows of the batch without the distinct-item arrays, and the global batch's
    sorted distinct items (None without a unique capacity)."""
    all_pos = self.positions(int(batch_index))
    pos = all_pos[self.rows]
    if self.history == "sampled":
      # Drawn for the whole global batch from (seed, batch), so every process agrees on it.
      rng = np.random.default_rng([self.seed, int(batch_index), 0x6869])
      all_history, all_mask = self.seqs.sampled_history(all_pos, self.history_len, rng)
    else:
      all_history, all_mask = self.seqs.history_before(all_pos, self.history_len)
    if self.history_dropout:
      all_mask = self._drop_history(all_mask, batch_index)
    history, mask = all_history[self.rows], all_mask[self.rows]
    items = self.seqs.items[pos]
    batch = {"user": self.seqs.user[pos], "item": items, "history": history, "history_mask": mask,
             "log_q": self.log_q[items]}
    if self.weight_T is not None:
      batch["weight"] = self.weight_T[pos]
    if not self.unique_capacity:
      return batch, None
    # The text query reads the history's titles in the step, so its items skip the item tower.
    named = [self.seqs.items[all_pos]] + ([all_history[all_mask]] if self.layout.query != "text" else [])
    if self.mixed_negatives:
      all_negative = self.negatives(batch_index)
      share = self.mixed_negatives // self.process_count
      negative = all_negative[self.process_index * share:(self.process_index + 1) * share]
      batch.update(negative=negative, negative_log_q=self.log_q[negative])
      named.append(all_negative)
    unique = np.unique(np.concatenate(named))
    if len(unique) > self.unique_capacity:
      raise ValueError(f"batch {batch_index} has {len(unique)} distinct items, over the capacity {self.unique_capacity}")
    return batch, unique

  def negatives(self, batch_index: int) -> np.ndarray:
    """The global batch's M mixed negatives (int32 [M]), drawn with replacement from (seed, batch),
    so every process agrees on them."""
    rng = np.random.default_rng([self.seed, int(batch_index), 0x6d6e])
    return self.sampler_pool[rng.integers(0, len(self.sampler_pool), self.mixed_negatives)].astype(np.int32)

  def _drop_history(self, mask_BxL: np.ndarray, batch_index: int) -> np.ndarray:
    """Each history slot masked with chance ``history_dropout`` (a denoising profile, as in
    Mult-DAE); a row keeps at least its first item, so no query loses its whole history."""
    rng = np.random.default_rng([self.seed, int(batch_index), 0x6470])
    kept_BxL = mask_BxL & (rng.random(mask_BxL.shape) >= self.history_dropout)
    emptied_B = mask_BxL.any(axis=1) & ~kept_BxL.any(axis=1)
    first_B = np.argmax(mask_BxL, axis=1)
    kept_BxL[emptied_B, first_B[emptied_B]] = True
    return kept_BxL

  def shape_of(self, unique: np.ndarray) -> tuple[int, ...]:
    """(rows, tokens): the smallest buckets holding these distinct items and their longest text
    (tokens 0 without a token table); with a token stream, (rows, stream tokens, longest text)."""
    rows = next(b for b in self.row_buckets if b >= len(unique))
    if self.tokens is None:
      return rows, 0
    if self.stream_buckets:
      needed = self.process_count * max(int(self.token_count_N[self._share(unique, rows, p)[1]].sum())
                                        for p in range(self.process_count))
      tokens = next((b for b in self.stream_buckets if b >= needed), None)
      if tokens is None:
        raise ValueError(f"{len(unique)} distinct items hold {needed} tokens, over the largest token stream "
                         f"bucket {self.stream_buckets[-1]}")
    longest = int(self.token_count_N[unique].max(initial=1))
    length = next((b for b in self.length_buckets if b >= longest), self.length_buckets[-1])
    return (rows, tokens, length) if self.stream_buckets else (rows, length)

  def pad(self, batch: dict[str, np.ndarray], unique: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """``parts``' batch with its distinct items padded to ``shape`` and each row's slot in them."""
    rows, length = shape[0], shape[-1]
    share = rows // self.process_count
    # Padding repeats item 0: rows no slot points at, so they reach neither the loss nor a gradient.
    unique_R = np.pad(unique, (0, rows - len(unique))).astype(np.int32)
    mine_R = unique_R[self.process_index * share:(self.process_index + 1) * share]
    batch = dict(batch, unique_items=mine_R)
    if self.layout.query == "transformer":  # every history item is a target: the step needs their logQ
      batch["unique_log_q"] = self.log_q[mine_R]
    batch["item_slot"] = np.searchsorted(unique, batch["item"]).astype(np.int32)
    if "negative" in batch:
      batch["negative_slot"] = np.searchsorted(unique, batch["negative"]).astype(np.int32)
    if self.layout.query != "text":
      history, mask = batch["history"], batch["history_mask"]
      batch["history_slot"] = np.where(mask, np.searchsorted(unique, np.maximum(history, 0)), 0).astype(np.int32)
    if self.tokens is not None and self.stream_buckets:
      batch.update(self.stream(unique, rows, shape[1], length))
    elif self.tokens is not None:
      for name, table_NxT in self.tokens.items():
        batch["unique_" + name] = np.ascontiguousarray(table_NxT[mine_R, :length], np.int32)
    return batch

  def _share(self, unique: np.ndarray, rows: int, process: int) -> tuple[int, np.ndarray]:
    """The global slot of ``process``'s first distinct item when ``rows`` are split evenly, and
    its real (unpadded) items."""
    first = process * (rows // self.process_count)
    return first, unique[first:first + rows // self.process_count]

  def stream(self, unique: np.ndarray, rows: int, tokens: int, width: int) -> dict[str, np.ndarray]:
    """This process's share of a ``tokens``-long global stream holding its distinct items' texts
    end to end: ids, token types, each token's position in its text and its item's global slot
    (-1 on padding), and ``unique_stream_index`` [rows share, width]: the global stream index of
    each item's token j (``tokens`` past the text's end, and for padding items)."""
    first, items_S = self._share(unique, rows, self.process_index)
    share = rows // self.process_count
    length_S = self.token_count_N[items_S]
    starts_S = np.cumsum(length_S) - length_S
    within_N = np.arange(length_S.sum()) - np.repeat(starts_S, length_S)  # each token's position in its text
    source_N = np.repeat(items_S, length_S)
    mine = tokens // self.process_count
    out = {}
    for name, values_N in (("input_ids", self.tokens["input_ids"][source_N, within_N]),
                           ("token_type_ids", self.tokens["token_type_ids"][source_N, within_N]),
                           ("position_ids", within_N),
                           ("segment_ids", np.repeat(first + np.arange(len(items_S)), length_S))):
      out["unique_" + name] = np.full(mine, -1 if name == "segment_ids" else 0, np.int32)
      out["unique_" + name][:len(values_N)] = values_N
    index_RxT = np.full((share, width), tokens, np.int32)
    index_RxT[:len(items_S)] = np.where(np.arange(width)[None, :] < length_S[:, None],
                                        self.process_index * mine + starts_S[:, None] + np.arange(width)[None, :], tokens)
    out["unique_stream_index"] = index_RxT
    return out


class StackedBatches(grain.transforms.Map):
  """Call index c -> batches ``c*K .. c*K+K-1`` stacked on a leading axis (for K steps per call);
  with ``stop``, the last call stacks only the batches before ``stop``."""

  def __init__(self, builder: BatchBuilder, steps_per_call: int, stop: int | None = None):
    self.builder, self.steps_per_call, self.stop = builder, steps_per_call, stop

  def map(self, call_index: int) -> dict[str, np.ndarray]:
    first = int(call_index) * self.steps_per_call
    count = self.steps_per_call if self.stop is None else min(self.steps_per_call, self.stop - first)
    parts = [self.builder.parts(first + i) for i in range(count)]
    if parts[0][1] is None:
      batches = [batch for batch, _ in parts]
    else:
      # One call runs one compiled shape: the largest buckets any of its K batches needs.
      shapes = [self.builder.shape_of(unique) for _, unique in parts]
      shape = tuple(max(sizes) for sizes in zip(*shapes))
      batches = [self.builder.pad(batch, unique, shape) for batch, unique in parts]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def train_batches(builder: BatchBuilder, start: int, stop: int, prefetch: int = 4,
                  to_device=None, steps_per_call: int | None = None, num_threads: int = 1) -> grain.IterDataset:
  """Batches ``start..stop-1`` built on a background thread. With ``steps_per_call=K`` each
  element stacks K consecutive batches (one jitted call's worth; ``start`` counts steps and must
  be a multiple of K; the last element stacks the ``stop % K`` left over, if any). With
  ``to_device`` (host arrays -> device arrays) the transfer runs on a second thread, so the train
  loop finds batches already on the device. ``num_threads`` threads build elements ahead, in order.
  The iterator's checkpointed position counts only elements the loop has taken."""
  k = steps_per_call or 1
  transform = builder if steps_per_call is None else StackedBatches(builder, k, stop)
  ds = (grain.MapDataset.range(start // k, -(-stop // k)).map(transform)
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads))))
  if to_device is not None:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds.map(to_device), prefetch_buffer_size=2)
  return ds
