"""Typed, frozen configuration and the ``key=value`` override language.

A config file is a Python file under ``configs/`` that defines ``get_config() -> Config``.
``load_config(path, overrides)`` runs it and applies dotted overrides such as
``train.steps=200`` or ``model.mlp_dims=512,256``; each value is parsed according to the
field's declared type, so a typo or a wrong type fails before any compute.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import io
import json
import os
import pathlib
import shutil
import textwrap
import tokenize
import types
import typing
from typing import Any, Sequence


class ConfigError(ValueError):
  """A config file or override is wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_users: int = 1500
  num_items: int = 800
  num_topics: int = 16
  interactions_per_user: int = 24  # mean; each user's count is drawn around it
  cold_item_fraction: float = 0.1  # items that never appear in training
  seed: int = 0
  # Before each interaction a user's topic moves on to the next topic ((t + 1) mod num_topics) with
  # this chance: a successor pattern that only a model reading the history in order can learn (users
  # also keep a topic for a while, which a bag of recent items already shows). 0.5 for sequence studies.
  topic_drift: float = 0.0


@dataclasses.dataclass(frozen=True)
class TableConfig:
  """``data.source=table``: column roles of your own files in ``data.path`` (CSV, TSV, JSON lines or
  Parquet, by extension; jaxrec/data/table.py). Column lists are comma-separated in overrides."""
  interactions: str = "interactions.csv"  # file names inside data.path; items/users "" = none
  items: str = ""
  users: str = ""
  user: str = "user"  # column names
  item: str = "item"
  time: str = ""  # "" = file order (no timestamps)
  label: str = ""  # optional numeric rating/label/weight column: the dataset's ratings (data.min_rating reads it)
  item_text: tuple[str, ...] = ()  # item table columns joined, in this order, into the item text
  item_title: str = ""  # item table column shown as the title ("" = the first item_text column, else the id)
  item_categorical: tuple[str, ...] = ()
  item_numeric: tuple[str, ...] = ()
  user_categorical: tuple[str, ...] = ()
  user_numeric: tuple[str, ...] = ()
  context_categorical: tuple[str, ...] = ()  # interaction columns (device, hour): the query's context
  context_numeric: tuple[str, ...] = ()
  multi_value_sep: str = ""  # e.g. "|": categorical cells hold several values (genres)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"  # synthetic | ml100k | ml1m | amazon | tfds | files | union | table
  # source=union: its parts, each "source[:item_text][=path]" (e.g. ml1m:title+genres,amazon:summaries),
  # one catalog of all their items with users kept apart, each part split alone (data/union.py)
  union: tuple[str, ...] = ()
  path: str = ""  # directory (or TFDS name for source=tfds)
  item_text: str = "default"  # which text fields describe an item; source-specific choices
  split: str = "random"  # random | loo | temporal | predefined
  split_ratios: tuple[float, ...] = (0.8, 0.1, 0.1)
  cold_item_fraction: float = 0.0  # extra cold items held out by the split (synthetic has its own)
  split_seed: int = 0
  min_rating: float = 0.0
  kcore: int = 0
  duplicates: str = "drop"  # keep | drop (earliest stays) | error: a test pair repeated in train can never be hit
  train_fraction: float = 1.0  # keep this share of training interactions (data-efficiency study)
  history_len: int = 10  # L: items of the user's training history fed to the query tower; 0 = none (user id
  # and features only, the TFRS tutorial's query tower)
  # Which L items: recent (the L before the target in time; eval: the last L) | sampled (L drawn
  # from the user's other training items; eval: L drawn from the known ones) | auto (recent for
  # temporal splits, sampled for random splits and for data without time).
  history: str = "auto"
  # Training only: each history slot is masked with this chance (at least one item kept), so the
  # query learns from partial profiles (Mult-DAE's input dropout); evaluation sees whole histories.
  history_dropout: float = 0.0
  # Threads building training batches (grain's read threads; batch i is a pure function of i, so the
  # order and a resumed run are the same for any count). One keeps up on CPU hosts; an accelerator
  # whose step is faster than one thread's batch wants more.
  num_threads: int = 1
  synthetic: SyntheticConfig = SyntheticConfig()
  table: TableConfig = TableConfig()  # data.source=table: your own files' column roles


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  # A local Hugging Face model directory (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet, ModernBERT)
  # or a hub id org/name[@revision] (downloaded once into the HF cache); "" = packaged all-MiniLM-L6-v2
  path: str = ""
  mode: str = "frozen"  # frozen | lora | full | adalora | none (ID-only model)
  max_length: int = 0  # 0 = the model's own max_seq_length (256 for MiniLM)
  # "" = the model's own (sentence-transformers' 1_Pooling/config.json, else mean) | mean | cls | max |
  # weightedmean | lasttoken | mean_sqrt_len_tokens: overrides the model's, in training and encoding alike
  pooling: str = ""
  # Text put before every item text (item_prefix) and, with model.query=text, before each history
  # text (query_prefix), as E5's "passage: "/"query: " or BGE's query instruction. None = the
  # model's own sentence-transformers prompts (config_sentence_transformers.json: "document" or
  # "passage" for items, "query" for queries), else none; "" = no prefix.
  item_prefix: str | None = None
  query_prefix: str | None = None
  batch_size: int = 64  # catalog encoding batch
  # Encoder compute dtype (weights stay float32): float32 (exact; HIGHEST precision on
  # accelerators) | bfloat16 (the accelerators' fast path; on CPU bf16 operands for every matmul,
  # attention's too, with float32 results and activations, ~1.5x faster fine-tuning where the
  # CPU has AVX512-BF16; frozen vectors cached per dtype).
  dtype: str = "float32"
  cache_dir: str = ""  # "" = $JAXREC_CACHE or ~/.cache/jaxrec
  lora_rank: int = 8  # lora: every adapter's rank (adalora's start at adalora_init_rank)
  lora_alpha: float = 16.0  # lora and adalora: adapters scale by alpha / rank (adalora: its initial rank)
  lora_ffn: bool = False  # lora and adalora: adapters on the MLP too, not only attention query/value
  adalora_init_rank: int = 12  # adalora (Zhang et al. 2023; defaults peft's): every SVD adapter's rank at the start
  adalora_target_rank: int = 8  # average rank per adapter after the budget has shrunk (total = this x adapters)
  adalora_tinit: int = 0  # steps at the full initial rank before pruning starts
  adalora_tfinal: int = 0  # last steps that train with the final mask fixed
  adalora_delta_t: int = 1  # steps between re-allocations while the budget shrinks
  adalora_beta1: float = 0.85  # EMA of the sensitivity |w * grad| (smoothed importance)
  adalora_beta2: float = 0.85  # EMA of its uncertainty |sensitivity - its EMA|
  adalora_orth_reg: float = 0.1  # weight of the orthogonality penalty on P and Q in the loss (the paper's code's)
  lr_multiplier: float = 0.1  # full mode: encoder lr = train.learning_rate * this
  # lora/full: the live encoder runs on each batch's distinct items, padded to the smallest of this
  # many capacities (worst case * i / n) and cut to the length bucket of the batch's longest text,
  # so a step encodes about what the batch holds; the step compiles once per (rows, tokens) pair a
  # run meets. 1 = one fixed shape (worst-case capacity x the catalog's longest bucket).
  shape_buckets: int = 8
  # lora/full: the encoder takes the batch's texts as one stream of their tokens, end to end, padded
  # only to a bucket of the total: everything but attention (which runs per text) computes on the
  # texts' tokens, not on each text's padding to the batch's longest. false = one padded row per text.
  token_stream: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  embed_dim: int = 64  # E: tower output
  id_dim: int = 64
  feature_dim: int = 16
  mlp_dims: tuple[int, ...] = (256,)
  # How a tower joins its inputs (text vector, id and feature embeddings, pooled history):
  # mlp concatenates them into the fusion MLP (hidden layers of mlp_dims, then a Linear to
  # embed_dim); sum adds them, no weights (every input used must be embed_dim wide: id_dim,
  # feature_dim, the text width), the matrix-factorisation towers of TFRS's tutorial
  fusion: str = "mlp"
  use_item_ids: bool = True
  use_text: bool = True
  use_user_ids: bool = True
  use_user_features: bool = True  # categorical user features (age, gender, ...) in the query tower
  # The query tower also pools a history-item id table of its own (YouTube's watch-history
  # embeddings): the items a user came from are embedded apart from the items it is matched to,
  # so "who watched A goes on to B" need not equal "who watched B goes on to A".
  history_ids: bool = False
  use_item_features: bool = True  # categorical item features (genres, decade, ...) in the item tower;
  # false gives the classic pure-id model, which cannot tell cold items apart
  id_row_multiple: int = 128  # id tables are padded to a multiple of this so they shard evenly (and
  # checkpoints restore across meshes); use a multiple of the fsdp*tensor size on big meshes
  id_dropout: float = 0.1  # chance an item id row is replaced by the shared cold row in training
  # Id rows of items with no training interaction: shared (they all use the shared cold row, the
  # one id_dropout trains, so an ids-only model ranks them alike) | own (every catalog item gets a
  # row, never trained for a cold item, which then scores by its random initial vector: the
  # full-vocabulary table of TFRS's and TorchRec's examples).
  cold_item_rows: str = "shared"
  # true: every item also gets an additive score bias b_i (a scalar head on the item tower's fusion
  # MLP, so cold items get one from their text and features), score = cos(q, v) / temperature + b_i:
  # the softmax output bias of YouTube's and Mult-VAE's models. It travels as one extra vector
  # column (items [v, temperature * b], queries [q, 1]) so retrieval stays one dot-product kernel.
  item_bias: bool = False
  temperature: float = 0.05
  learn_temperature: bool = False
  dtype: str = "float32"  # compute dtype in towers: float32 | bfloat16
  param_dtype: str = "float32"
  # The query tower's reading of the history: pool (a masked mean of the history items' vectors;
  # order-blind) | transformer (causal self-attention over the last data.history_len items with
  # learned positions, SASRec's architecture; trained on every position's next item) | text (the
  # pretrained text encoder reads the history's item titles as one text, most recent last, and its
  # pooled vector enters the fusion MLP; the item tower's encoder weights in lora/full)
  query: str = "pool"
  # text: what joins the history's titles (tokenized on its own, so it must split from the titles
  # around it as it does alone: whitespace around punctuation for BERT's wordpiece; checked)
  query_separator: str = " ; "
  query_layers: int = 2  # transformer: pre-LayerNorm blocks
  query_heads: int = 2  # transformer: attention heads (model.embed_dim must divide by it)
  query_dropout: float = 0.2  # transformer: dropout on its inputs, attention weights and block outputs
  query_positions: int = 200  # transformer: rows of the learned position table (>= data.history_len)
  # transformer: the fusion MLP also reads the mean of the item vectors up to each slot, the
  # long-term profile beside the attention's short-term reading (NARM's and STAMP's global + local)
  query_profile: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 256
  seed: int = 0
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  end_lr_fraction: float = 0.05
  weight_decay: float = 1e-4
  clip_norm: float = 1.0  # global-norm clipping; 0 = off
  # in_batch: the other positives of the global batch are the negatives (sampled softmax, logQ
  # corrected); catalog: a full softmax over every item with training interactions, exact and
  # unbiased but [batch, items] logits and the item tower over the whole catalog each step, so for
  # catalogs up to about 1e5 items and the cached-text/ID modes only
  negatives: str = "in_batch"
  logq_correction: bool = True  # in_batch only
  # Mixed negative sampling (Yang et al. 2020), in_batch only: M extra negatives per global batch,
  # shared by every query, drawn with replacement from the items with training interactions,
  # uniformly (they reach the long tail that in-batch positives rarely hold) or by popularity
  # (proportional to training counts). Every candidate's logQ is then that of the mixture of
  # in-batch and sampled slots. M must be a multiple of the data-parallel devices x processes.
  mixed_negatives: int = 0
  mixed_sampler: str = "uniform"  # uniform | popularity
  remove_accidental_hits: bool = True
  # Each example's loss is weighted by n_u ** -user_weight_power (n_u: its user's training
  # interactions). 0 weighs every interaction alike; 1 every user alike, as YouTube's candidate
  # generator does with a fixed number of examples per user, which matches the per-user averaged
  # Recall/NDCG the evaluation reports (heavy users otherwise dominate the gradient).
  user_weight_power: float = 0.0
  steps_per_call: int = 1  # K: train steps run inside one jitted call (lax.scan over K batches); K > 1
  # removes per-step dispatch and transfer overhead for small models
  log_every: int = 10  # steps between the loss in the progress bar and the writers' train/ scalars (loss, learning rate)
  # Where metrics go (jaxrec/writers.py): tensorboard (WORKDIR/tb), jsonl (WORKDIR/metrics.jsonl),
  # wandb, mlflow (each needs its package installed); e.g. train.writers=tensorboard,jsonl,wandb
  writers: tuple[str, ...] = ("tensorboard",)
  eval_every: int = 0  # 0 = evaluate at the end only
  progress: bool = True
  nan_policy: str = "stop"  # stop | skip
  profile: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1 absorbs the remaining devices
  fsdp: int = 1
  tensor: int = 1
  num_devices: int = 0  # use the first N devices; 0 = all
  rules: tuple[str, ...] = ()  # overrides of the rules table, "logical:mesh_axis[+axis]" or "logical:"
  coordinator_address: str = ""  # multi-process: host:port of process 0
  num_processes: int = 1
  process_id: int = -1
  # Seconds without a heartbeat before a process counts as dead and every other process stops. JAX's
  # own 100 s leaves survivors hanging in collectives for minutes; 10 s still outlasts a busy host.
  heartbeat_timeout_s: int = 10
  # Seconds for all processes to join the coordinator at start-up (JAXREC_INIT_TIMEOUT overrides);
  # pods that pull containers or schedule hosts one by one need minutes.
  init_timeout_s: int = 300


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # steps between saves; 0 = only at the end
  keep: int = 3
  resume_from: str = ""
  async_save: bool = True
  best_metric: str = ""  # e.g. "recall@10": also keep the best step by this validation metric
  # (evaluated every train.eval_every steps) in checkpoints/best
  # A trained workdir (or a checkpoints directory) whose parameters start this run, on this run's
  # data: every parameter of the same name and shape is loaded (text encoder, adapters, fusion
  # MLPs, sequence tower, feature tables of shared vocabularies); id tables of another catalog or
  # user set, and anything else that does not fit, start fresh. The log lists loaded, new and
  # dropped parameters. Used only when the workdir has no checkpoint of its own to resume.
  init_from: str = ""
  # With init_from, which parameters train: all | new (only those init_from did not load, plus the
  # text encoder's adapters: parameter-efficient transfer)
  init_trainable: str = "all"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  ks: tuple[int, ...] = (10, 20, 50)
  batch_size: int = 512
  split: str = "test"  # test | valid
  max_users: int = 0  # 0 = all users with test items
  # beta: rank by cos(q, v) / model.temperature + beta * log(1 + the item's training interactions
  # in this split): the split's popularity as a prior, for a model that never saw this catalog's
  # popularity (zero-shot on another dataset, a text-only item tower); 0 = the model's scores alone
  popularity_prior: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
  workdir: str = "runs/default"
  data: DataConfig = DataConfig()
  encoder: EncoderConfig = EncoderConfig()
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  eval: EvalConfig = EvalConfig()


def _is_config(value: Any) -> bool:
  return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _type_name(tp: Any) -> str:
  if typing.get_origin(tp) is not None:  # tuple[int, ...]'s __name__ is just "tuple"
    return str(tp).replace("typing.", "")
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


BOOL_WORDS = "true, false, 1 or 0"


def _expected(tp: Any) -> str:
  """What an override of type ``tp`` accepts, for error messages."""
  return f"bool ({BOOL_WORDS})" if tp is bool else _type_name(tp)


def _parse_bool(text: str) -> bool:
  # Only these: a looser reading ("yes", "on", "y") lets a typo such as "flase" or "off " mean
  # something nobody checked.
  lowered = text.strip().lower()
  if lowered in ("1", "true"):
    return True
  if lowered in ("0", "false"):
    return False
  raise ValueError(text)


def _parse(text: str, tp: Any) -> Any:
  """Parses an override's text as the field type ``tp``; raises ValueError if it doesn't fit."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for option in typing.get_args(tp):
      if option is type(None):
        if text.strip().lower() in ("none", "null"):
          return None
        continue
      try:
        return _parse(text, option)
      except ValueError as e:
        errors.append(e)
    raise ValueError(text)
  if origin is tuple:
    args = typing.get_args(tp)
    stripped = text.strip()
    if stripped.startswith(("(", "[")):
      stripped = stripped[1:-1]
    parts = [p.strip() for p in stripped.split(",") if p.strip()]
    elem = args[0] if args else str
    return tuple(_parse(p, elem) for p in parts)
  if tp is bool:
    return _parse_bool(text)
  if tp is int:
    return int(text.replace("_", ""))
  if tp is float:
    return float(text)
  if tp is str:
    return text
  raise ValueError(f"unsupported field type {tp}")


def _check_type(value: Any, tp: Any) -> bool:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    return any(_check_type(value, t) for t in typing.get_args(tp))
  if tp is type(None):
    return value is None
  if origin is tuple:
    args = typing.get_args(tp)
    return isinstance(value, tuple) and all(_check_type(v, args[0]) for v in value) if args else isinstance(value, tuple)
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if dataclasses.is_dataclass(tp):
    return isinstance(value, tp)
  return isinstance(value, tp)


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def all_keys(config: Any, prefix: str = "") -> list[str]:
  """Every dotted leaf key of a config, e.g. ``train.steps``."""
  keys = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    dotted = f"{prefix}{field.name}"
    if _is_config(value):
      keys.extend(all_keys(value, dotted + "."))
    else:
      keys.append(dotted)
  return keys


def _unknown_key_error(key: str, config: Any) -> ConfigError:
  valid = all_keys(config)
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not close:  # try the last component alone: "steps" -> "train.steps"
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
  hint = f"; did you mean '{close[0]}'?" if close else ""
  return ConfigError(f"unknown config key '{key}'{hint}")


def override(config: Any, key: str, value: Any, _root: Any = None, _full_key: str = "") -> Any:
  """Returns a copy of ``config`` with dotted ``key`` set; ``value`` may be text (parsed) or typed."""
  root, full_key = (_root, _full_key) if _root is not None else (config, key)
  head, _, rest = key.partition(".")
  names = {f.name for f in dataclasses.fields(config)}
  if head not in names:
    raise _unknown_key_error(full_key, root)
  current = getattr(config, head)
  hints = _field_types(type(config))
  if rest:
    if not _is_config(current):
      raise _unknown_key_error(full_key, root)
    return dataclasses.replace(config, **{head: override(current, rest, value, root, full_key)})
  key = full_key
  if _is_config(current):
    raise ConfigError(f"config key '{key}' is a group; set one of its fields, e.g. '{key}.{dataclasses.fields(current)[0].name}=...'")
  tp = hints[head]
  if isinstance(value, str) and tp is not str:
    try:
      value = _parse(value, tp)
    except ValueError:
      raise ConfigError(f"config key '{key}' expects {_expected(tp)}, got {value!r}") from None
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, int) and tp is float and not isinstance(value, bool):
    value = float(value)
  if not _check_type(value, tp):
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
  return dataclasses.replace(config, **{head: value})


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
  if isinstance(overrides, (str, bytes)):  # a bare string would be read one character at a time
    text = overrides.decode(errors="replace") if isinstance(overrides, bytes) else overrides
    raise ConfigError("overrides must be a list of 'key=value' strings, e.g. ['train.steps=5']; "
                      f"got the string {text!r}")
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    config = override(config, key.strip(), value)
  return config


def _validate_adalora(config: Config) -> None:
  enc, steps = config.encoder, config.train.steps
  if enc.adalora_init_rank < 1:
    raise ConfigError(f"config key 'encoder.adalora_init_rank' must be >= 1; got {enc.adalora_init_rank}")
  if not 0 <= enc.adalora_target_rank <= enc.adalora_init_rank:
    raise ConfigError(f"config key 'encoder.adalora_target_rank' must be in [0, encoder.adalora_init_rank="
                      f"{enc.adalora_init_rank}]; got {enc.adalora_target_rank}")
  for key in ("adalora_tinit", "adalora_tfinal"):
    if getattr(enc, key) < 0:
      raise ConfigError(f"config key 'encoder.{key}' must be >= 0; got {getattr(enc, key)}")
  if enc.adalora_tinit + enc.adalora_tfinal >= steps:
    # peft refuses the same: the budget must have steps in which to shrink.
    raise ConfigError(f"config keys 'encoder.adalora_tinit'={enc.adalora_tinit} + 'encoder.adalora_tfinal'="
                      f"{enc.adalora_tfinal} must be below train.steps={steps}, so the budget has steps to shrink in")
  if enc.adalora_delta_t < 1:
    raise ConfigError(f"config key 'encoder.adalora_delta_t' must be >= 1; got {enc.adalora_delta_t}")
  for key in ("adalora_beta1", "adalora_beta2"):
    if not 0.0 < getattr(enc, key) < 1.0:
      raise ConfigError(f"config key 'encoder.{key}' must be in (0, 1); got {getattr(enc, key)}")
  if enc.adalora_orth_reg < 0:
    raise ConfigError(f"config key 'encoder.adalora_orth_reg' must be >= 0; got {enc.adalora_orth_reg}")


def validate(config: Config) -> Config:
  """Cross-field checks that types alone cannot express."""
  choices = {
      "data.source": (config.data.source, ("synthetic", "ml100k", "ml1m", "amazon", "tfds", "files", "union", "table")),
      "data.split": (config.data.split, ("random", "loo", "temporal", "predefined")),
      "data.history": (config.data.history, ("auto", "recent", "sampled")),
      "data.duplicates": (config.data.duplicates, ("keep", "drop", "error")),
      "encoder.mode": (config.encoder.mode, ("frozen", "lora", "full", "none", "adalora")),
      "encoder.pooling": (config.encoder.pooling, ("", "mean", "cls", "max", "weightedmean", "lasttoken",
                                                   "mean_sqrt_len_tokens")),
      "model.dtype": (config.model.dtype, ("float32", "bfloat16")),
      "encoder.dtype": (config.encoder.dtype, ("float32", "bfloat16")),
      "model.fusion": (config.model.fusion, ("mlp", "sum")),
      "model.cold_item_rows": (config.model.cold_item_rows, ("shared", "own")),
      "model.param_dtype": (config.model.param_dtype, ("float32", "bfloat16")),
      "model.query": (config.model.query, ("pool", "transformer", "text")),
      "train.nan_policy": (config.train.nan_policy, ("stop", "skip")),
      "train.negatives": (config.train.negatives, ("in_batch", "catalog")),
      "train.mixed_sampler": (config.train.mixed_sampler, ("uniform", "popularity")),
      "eval.split": (config.eval.split, ("test", "valid")),
      "checkpoint.init_trainable": (config.checkpoint.init_trainable, ("all", "new")),
  }
  from jaxrec import writers
  for name in config.train.writers:
    if name not in writers.WRITERS:
      raise ConfigError(f"config key 'train.writers' names {name!r}; writers are {', '.join(writers.WRITERS)}")
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
  if (config.data.source == "union") != bool(config.data.union) or config.data.source == "union" and len(config.data.union) < 2:
    raise ConfigError(f"config key 'data.union' lists two or more parts (source[:item_text][=path]) exactly when "
                      f"data.source=union; got data.source={config.data.source!r}, data.union={list(config.data.union)}")
  if config.data.history_len < 0:
    raise ConfigError(f"config key 'data.history_len' must be >= 0 (0 = no history in the query tower); "
                      f"got {config.data.history_len}")
  positive = {"train.steps": config.train.steps, "train.batch_size": config.train.batch_size,
              "model.embed_dim": config.model.embed_dim, "eval.batch_size": config.eval.batch_size}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"config key '{key}' must be positive; got {value}")
  table_features = config.data.source == "table" and (config.data.table.item_categorical or config.data.table.item_numeric)
  if not config.model.use_text and not config.model.use_item_ids and not table_features:
    raise ConfigError("config: model.use_text and model.use_item_ids are both false; the item tower needs one "
                      "(or, with data.source=table, item features: data.table.item_categorical/item_numeric)")
  if config.model.query == "text" and (not config.model.use_text or config.encoder.mode == "none"):
    raise ConfigError(f"config key 'model.query'=text needs model.use_text=true and encoder.mode "
                      f"frozen|lora|full|adalora "
                      f"(the pretrained text encoder reads the history); got model.use_text="
                      f"{str(config.model.use_text).lower()}, encoder.mode={config.encoder.mode}")
  if config.model.query == "text" and config.data.history_len < 1:
    raise ConfigError("config key 'data.history_len' must be >= 1 with model.query=text (it reads the history's titles)")
  if config.model.use_text and config.encoder.mode == "none":
    raise ConfigError("config: model.use_text=true needs encoder.mode frozen|lora|full|adalora (got none)")
  if not 0.0 < config.data.train_fraction <= 1.0:
    raise ConfigError(f"config key 'data.train_fraction' must be in (0, 1]; got {config.data.train_fraction}")
  if config.data.split in ("random", "temporal") and (len(config.data.split_ratios) != 3 or abs(sum(config.data.split_ratios) - 1) > 1e-6):
    raise ConfigError(f"config key 'data.split_ratios' must be three numbers summing to 1; got {config.data.split_ratios}")
  k = config.train.steps_per_call
  if k < 1:
    raise ConfigError(f"config key 'train.steps_per_call' must be >= 1; got {k}")
  # train.steps need not be a multiple of K (the last call runs the remainder); saves and
  # validations happen between calls, so their periods must be.
  for key, value in (("checkpoint.every", config.checkpoint.every), ("train.eval_every", config.train.eval_every)):
    if value % k:
      raise ConfigError(f"config key '{key}'={value} must be a multiple of train.steps_per_call={k}")
  if config.encoder.mode == "adalora":
    _validate_adalora(config)
  if config.train.negatives == "catalog" and config.model.use_text and config.encoder.mode in ("lora", "full", "adalora"):
    raise ConfigError(f"config key 'train.negatives'=catalog needs the cached text of encoder.mode=frozen (or no "
                      f"text): a {config.encoder.mode} encoder would re-encode the whole catalog every step")
  if config.train.mixed_negatives < 0:
    raise ConfigError(f"config key 'train.mixed_negatives' must be >= 0 (0 = in-batch negatives only); "
                      f"got {config.train.mixed_negatives}")
  if config.train.mixed_negatives and config.train.negatives == "catalog":
    raise ConfigError(f"config key 'train.mixed_negatives'={config.train.mixed_negatives} needs "
                      "train.negatives=in_batch: the catalog softmax already scores every item")
  if config.model.item_bias and config.model.fusion != "mlp":
    raise ConfigError("config key 'model.item_bias'=true needs model.fusion=mlp: the bias is a head on the item "
                      "tower's fusion MLP")
  if config.train.user_weight_power < 0:
    raise ConfigError(f"config key 'train.user_weight_power' must be >= 0; got {config.train.user_weight_power}")
  if not 0.0 <= config.data.history_dropout < 1.0:
    raise ConfigError(f"config key 'data.history_dropout' must be in [0, 1); got {config.data.history_dropout}")
  if config.data.num_threads < 1:
    raise ConfigError(f"config key 'data.num_threads' must be >= 1; got {config.data.num_threads}")
  if not 0.0 <= config.data.synthetic.topic_drift <= 1.0:
    raise ConfigError(f"config key 'data.synthetic.topic_drift' must be in [0, 1]; got {config.data.synthetic.topic_drift}")
  if config.model.query_profile and config.model.query != "transformer":
    raise ConfigError(f"config key 'model.query_profile'=true adds the pooled profile to the transformer's reading; "
                      f"model.query={config.model.query!r} has no transformer (pool already is the profile)")
  if config.model.query == "transformer":
    m = config.model
    if config.data.history_len > m.query_positions:
      raise ConfigError(f"config key 'data.history_len'={config.data.history_len} exceeds the transformer query "
                        f"tower's position table (model.query_positions={m.query_positions})")
    if config.data.history_len < 1:
      raise ConfigError("config key 'data.history_len' must be >= 1 with model.query=transformer (it reads the history)")
    if m.query_layers < 1 or m.query_heads < 1 or m.embed_dim % m.query_heads:
      raise ConfigError(f"config keys 'model.query_layers'={m.query_layers} and 'model.query_heads'={m.query_heads} "
                        f"must be >= 1 with model.embed_dim={m.embed_dim} divisible by the heads")
    if not 0.0 <= m.query_dropout < 1.0:
      raise ConfigError(f"config key 'model.query_dropout' must be in [0, 1); got {m.query_dropout}")
    if m.fusion != "mlp":
      raise ConfigError("config key 'model.query'=transformer needs model.fusion=mlp")
    if config.data.history == "sampled":
      raise ConfigError("config key 'data.history'=sampled gives the transformer query tower items in no order; "
                        "use recent (or auto)")
    if m.history_ids:
      raise ConfigError("config key 'model.history_ids'=true pools a history-id table: it belongs to "
                        "model.query=pool (the transformer reads the history items' own vectors)")
    if config.train.mixed_negatives:
      raise ConfigError("config key 'train.mixed_negatives' is not supported with model.query=transformer "
                        "(its next-item loss uses the batch's targets, or the catalog)")
  if config.encoder.shape_buckets < 1:
    raise ConfigError("config key 'encoder.shape_buckets' must be >= 1 (1 = one fixed shape); "
                      f"got {config.encoder.shape_buckets}")
  if config.checkpoint.best_metric and config.train.eval_every <= 0:
    raise ConfigError("config key 'checkpoint.best_metric' needs train.eval_every > 0 (validation runs then)")
  if any(k <= 0 for k in config.eval.ks):
    raise ConfigError(f"config key 'eval.ks' must be positive; got {config.eval.ks}")
  return config


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def configs_dir() -> str:
  """The config files that ship with jaxrec: the package's ``configs/`` in an installed wheel
  (pyproject.toml maps the repository's ``configs/`` there), the repository's in a checkout."""
  shipped = os.path.join(_PACKAGE_DIR, "configs")
  return shipped if os.path.isdir(shipped) else os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")


def shipped_config_path(path: str | os.PathLike) -> str | None:
  """The shipped config file that a relative ``path`` names, written as from the repository root
  (``configs/study/tiny.py``) or from the configs folder (``study/tiny.py``); None if there is none."""
  parts = pathlib.PurePath(os.fspath(path)).parts
  if not parts or os.path.isabs(os.fspath(path)):
    return None
  if parts[0] == "configs" and len(parts) > 1:
    parts = parts[1:]
  candidate = os.path.join(configs_dir(), *parts)
  return candidate if os.path.isfile(candidate) else None


def resolve_config_path(path: str | os.PathLike) -> str | None:
  """``path`` where that file exists, else the shipped config it names (so ``--config
  configs/tiny.py`` works from any directory and from an installed wheel), else None."""
  path = os.fspath(path)
  return path if os.path.isfile(path) else shipped_config_path(path)


def data_root() -> str:
  """Where the real-data configs look for their dataset folders: ``$JAXREC_DATA`` when set (as the
  tests read it), else ``../shared/data`` beside the repository."""
  beside_repository = os.path.join(os.path.dirname(_PACKAGE_DIR), "..", "shared", "data")
  return os.environ.get("JAXREC_DATA") or os.path.normpath(beside_repository)


def call_python_file(path: str | os.PathLike, function: str, kind: str, error: type[Exception] = ConfigError) -> Any:
  """Runs a user's Python file (a config or study file) and returns ``function()``'s result.

  Any failure is one ``error`` naming the file: missing, failing to run, or lacking ``function``."""
  path = os.fspath(path)
  found = resolve_config_path(path)
  if found is None:
    where = "" if os.path.isabs(path) else f" (nor among the shipped configs in {configs_dir()})"
    raise error(f"{kind} file not found: {path}{where}")
  path = found
  spec = importlib.util.spec_from_file_location(f"jaxrec_{kind}_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report where, not our stack
    raise error(f"{kind} file {path} failed to run: {type(e).__name__}: {e}") from e
  if not hasattr(module, function):
    raise error(f"{kind} file {path} defines no {function}()")
  try:
    return getattr(module, function)()
  except error:
    raise
  except Exception as e:
    raise error(f"{kind} file {path} failed to run: {type(e).__name__}: {e}") from e


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
  """Runs a config file's ``get_config()`` (default: ``configs/default.py``'s, built in) and applies overrides."""
  if path is None:
    config = Config()
  else:
    config = call_python_file(path, "get_config", "config")
    if not isinstance(config, Config):
      raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}, expected jaxrec.config.Config")
  return validate(apply_overrides(config, overrides))


def to_dict(config: Any) -> dict:
  return dataclasses.asdict(config)


def from_dict(data: dict, cls: type = Config) -> Any:
  """Inverse of ``to_dict`` (used to read a workdir's saved config); unknown keys raise."""
  hints = _field_types(cls)
  kwargs = {}
  for key, value in data.items():
    if key not in hints:
      raise ConfigError(f"unknown config key '{key}' in saved config for {cls.__name__}")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      kwargs[key] = from_dict(value, tp)
    elif typing.get_origin(tp) is tuple:
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return cls(**kwargs)


def to_json(config: Config) -> str:
  return json.dumps(to_dict(config), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------ describing


WRAPPED_AT = 90  # a comment line this long was wrapped, so a lower-case line after it continues it


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
  """The ``# ...`` comments of a config dataclass's fields, read from its source so they never drift.

  A field owns the comment block right above it, the comment after it on its line, and the comment
  lines that continue that one: the next lines, while the line before was wrapped (it reaches
  ``WRAPPED_AT`` columns) and they go on with the same sentence (they do not start with a capital).
  Fields without a comment are absent; so is everything where the source cannot be read."""
  try:
    source = textwrap.dedent(inspect.getsource(cls))
  except (OSError, TypeError):
    return {}
  field_rows: dict[int, str] = {}
  first_row: dict[str, int] = {}
  for node in ast.parse(source).body[0].body:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      first_row[node.target.id] = node.lineno
      for row in range(node.lineno, node.end_lineno + 1):
        field_rows[row] = node.target.id
  lines = source.splitlines()
  comment_at = {}  # row -> (text, alone on its line)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      row, col = token.start
      comment_at[row] = (token.string[1:].strip(), not lines[row - 1][:col].strip())
  owned: dict[str, list[str]] = {}
  above: list[str] = []
  last, continuing = None, False
  for row in range(1, len(lines) + 1):
    name = field_rows.get(row)
    if name is not None and first_row[name] == row:
      owned[name], above, last, continuing = above, [], name, False
    if row in comment_at:
      text, alone = comment_at[row]
      if not alone and name is not None:
        owned[name].append(text)
        continuing = True
      elif alone and continuing and len(lines[row - 2]) >= WRAPPED_AT and not text[:1].isupper():
        owned[last].append(text)
      else:
        above.append(text)
        continuing = False
    elif name is None:  # a blank line or other code ends both kinds of block
      above, continuing = [], False
  return {name: " ".join(texts) for name, texts in owned.items() if texts}


@dataclasses.dataclass(frozen=True)
class KeyDescription:
  """One row of ``jaxrec config show``: a dotted key, its type, its value and default (both as an
  override would write them) and its comment."""

  key: str
  type: str
  value: str
  default: str
  comment: str


def _show(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, tuple):
    return ",".join(_show(v) for v in value) if value else "()"
  if isinstance(value, str):  # quoted as a shell would need it when empty or with spaces at its ends
    return value if value and value == value.strip() else f'"{value}"'
  return repr(value)


def describe(config: Any, default: Any = None, prefix: str = "") -> list[KeyDescription]:
  """Every leaf key of ``config`` in declaration order, with its type, value, default and comment."""
  default = type(config)() if default is None else default
  hints = _field_types(type(config))
  comments = field_comments(type(config))
  rows = []
  for field in dataclasses.fields(config):
    value, default_value = getattr(config, field.name), getattr(default, field.name)
    if _is_config(value):
      rows.extend(describe(value, default_value, f"{prefix}{field.name}."))
    else:
      rows.append(KeyDescription(f"{prefix}{field.name}", _type_name(hints[field.name]), _show(value),
                                 _show(default_value), comments.get(field.name, "")))
  return rows


def format_description(rows: Sequence[KeyDescription], width: int | None = None) -> str:
  """``describe``'s rows as an aligned table; a value that differs from its default is marked with
  ``*``, and comments wrap to ``width`` (the terminal's by default) under their own column."""
  header = KeyDescription("key", "type", "value", "default", "comment")
  table = [header, *rows]
  marks = ["  ", *("* " if row.value != row.default else "  " for row in rows)]
  widths = [max(len(getattr(row, name)) for row in table) for name in ("key", "type", "value", "default")]
  indent = 2 + sum(widths) + 2 * len(widths)
  width = width or shutil.get_terminal_size((160, 24)).columns
  comment_width = max(width - indent, 40)
  out = []
  for mark, row in zip(marks, table):
    cells = [row.key, row.type, row.value, row.default]
    start = mark + "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + "  "
    wrapped = textwrap.wrap(row.comment, comment_width) or [""]
    out.append((start + wrapped[0]).rstrip())
    out.extend(" " * indent + more for more in wrapped[1:])
  return "\n".join(out)
