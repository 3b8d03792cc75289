"""How item text reaches the item tower, per ``encoder.mode``.

``frozen``: the pretrained encoder's catalog vectors, computed once and cached on disk, become a
constant table of the model. ``lora``/``adalora``/``full``: the encoder runs inside the train step, so the
model carries the catalog's tokens and the encoder's architecture; its pretrained weights are read
once, when the train state is initialised (``step.init_state``). ``none``: no text.

``model.query=text`` also gives the model the catalog's titles as tokens (``HistoryText``), from
which it builds each history's text, and the encoder that reads it: the item tower's own in
``lora``/``adalora``/``full``, in ``frozen`` the pretrained one as constants (never trained).

A model restored from a checkpoint carries these tables in its saved state, so restoring needs
only their shapes (``abstract=True``): no vectors are encoded and no weights are read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from jaxrec.config import Config
from jaxrec.data.dataset import Dataset

log = logging.getLogger("jaxrec")

# Encoder modes whose encoder runs inside the train step and trains (adapters or all of it).
LIVE_MODES = ("lora", "adalora", "full")


@dataclasses.dataclass(frozen=True)
class HistoryText:
  """``model.query=text``: the catalog's titles as tokens, from which a history's text is built.

  The text of a history is the prefix (``encoder.query_prefix``), then its items' titles, most
  recent last, joined by the separator: the newest titles that fit in the encoder's ``max_length``
  with ``[CLS]``, the prefix and ``[SEP]`` (whole titles; the newest alone is cut where the
  tokenizer cuts it). Its tokens are the prefix's and the titles' own tokens joined by the
  separator's (``models.two_tower.history_text_rows``), which equal the tokenizer's tokens of the
  joined string (checked when built).
  """

  titles_NxW: np.ndarray  # int32 [N, W]: each item's title tokens, no special tokens, pad-padded
  lengths_N: np.ndarray  # int32 [N]: each title's token count
  separator: str  # model.query_separator
  separator_ids: tuple[int, ...]  # its tokens
  cls_id: int
  sep_id: int
  pad_id: int
  max_length: int  # the encoder's: the most tokens a history text holds, [CLS] and [SEP] included
  prefix: str = ""  # encoder.query_prefix: before the titles
  prefix_ids: tuple[int, ...] = ()  # its tokens
  lead: str = ""  # before every title in the text: " " for space-marking tokenizers (see ``of``)

  def width(self, history_len: int) -> int:
    """Tokens per history text row: the encoder's max length, or less when L titles cannot fill it."""
    widest = history_len * (self.titles_NxW.shape[1] + len(self.separator_ids)) - len(self.separator_ids) + 2
    return max(2 + len(self.prefix_ids), min(self.max_length, widest + len(self.prefix_ids)))

  def kept(self, items: Sequence[int]) -> list[int]:
    """Of a history's items (most recent last), those whose titles its text holds: the newest
    titles that fit with the separators between them (the newest always, cut if it alone is too long)."""
    room, s = self.max_length - 2 - len(self.prefix_ids), len(self.separator_ids)
    out, used = [], -s
    for item in reversed(list(items)):
      need = used + s + int(self.lengths_N[item])
      if out and need > room:
        break
      out.append(int(item))
      used = need
    return out[::-1]

  def text(self, titles: Sequence[str], items: Sequence[int]) -> str:
    """The history text of ``items`` (most recent last) as a string: what the encoder reads."""
    return self.prefix + self.separator.join(self.lead + titles[i] for i in self.kept(items))

  @classmethod
  def of(cls, tokenizer, titles: Sequence[str], separator: str, *, prefix: str = "", probes: int = 64) -> "HistoryText":
    """The catalog's titles as tokens for ``model.query=text``, after checking on ``probes`` pairs of
    titles that joining the prefix's tokens and theirs with the separator's gives the tokenizer's
    tokens of the joined string (so the model reads exactly the text ``HistoryText.text`` names)."""
    titles = list(titles)
    # Byte-level BPE (RoBERTa, ModernBERT) spells a word after a space otherwise than at a text's
    # start ("Ġlove" and "love"), so a title's tokens alone are not its tokens after a separator.
    # With such a tokenizer every title is read after a space, the first one too: the space is the
    # title's, not the separator's or the prefix's (" Heat ; Alien", "query: Heat ; Alien").
    lead = " " if tokenizer.pieces([" a"]) != tokenizer.pieces(["a"]) else ""
    if lead:
      separator, prefix = separator.rstrip(), prefix.rstrip()
    pieces = tokenizer.pieces([lead + t for t in titles])
    (separator_ids,) = tokenizer.pieces([separator]) if separator else ([],)
    (prefix_ids,) = tokenizer.pieces([prefix]) if prefix else ([],)
    if len(prefix_ids) > tokenizer.max_length - 3:
      raise ValueError(f"encoder.query_prefix={prefix!r}: its {len(prefix_ids)} tokens leave no room for a title in "
                       f"the encoder's max_length {tokenizer.max_length}")
    cls_id, sep_id, pad_id = tokenizer.special_ids
    lengths_N = np.array([len(p) for p in pieces], np.int32)
    titles_NxW = np.full((len(titles), max(int(lengths_N.max(initial=0)), 1)), pad_id, np.int32)
    for row, piece in enumerate(pieces):
      titles_NxW[row, :len(piece)] = piece
    out = cls(titles_NxW=titles_NxW, lengths_N=lengths_N, separator=separator,
              separator_ids=tuple(int(t) for t in separator_ids), cls_id=cls_id, sep_id=sep_id, pad_id=pad_id,
              max_length=tokenizer.max_length, prefix=prefix, prefix_ids=tuple(int(t) for t in prefix_ids), lead=lead)
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(titles), (min(probes, len(titles)), 2)) if titles else np.zeros((0, 2), int)
    joined = tokenizer.tokenize([out.text(titles, pair) for pair in pairs])
    for pair, ids, mask in zip(pairs, joined["input_ids"], joined["attention_mask"]):
      kept = out.kept(pair)
      want = [cls_id, *prefix_ids] + [t for k, item in enumerate(kept) for t in (list(separator_ids) if k else []) + pieces[item]]
      want = want[:tokenizer.max_length - 1] + [sep_id]
      if ids[mask > 0].tolist() != want:
        raise ValueError(f"model.query_separator={separator!r}, encoder.query_prefix={prefix!r}: tokenizing "
                         f"{out.text(titles, pair)!r} gives other tokens than the prefix's, its titles' and the "
                         f"separator's tokens joined; use a separator that splits from the words around it (such "
                         f"as ' ; ') and a prefix that ends in a space or punctuation")
    return out


@dataclasses.dataclass(frozen=True)
class CatalogText:
  dim: int = 0  # text vector width D (0: the model reads no text)
  vectors: Any = None  # frozen: the catalog's vectors, float32 [N, D] (a ShapeDtypeStruct when abstract)
  tokens: dict | None = None  # lora/adalora/full: the catalog's tokens, int32 [N, T] each
  # lora/adalora/full, and frozen with model.query=text: the encoder's BertConfig (with adapters and dtype)
  encoder_config: Any = None
  encoder_path: str = ""  # with encoder_config: the model directory its pretrained weights come from
  length_buckets: tuple[int, ...] = ()  # lora/adalora/full: the encoder's token length buckets
  pooling: str = "mean"  # with encoder_config: the encoder's pooling (encoder.pooling, else the model's own)
  history: HistoryText | None = None  # model.query=text: the titles the history text is built from

  @property
  def live(self) -> bool:
    """Whether the encoder runs inside the model and trains (LoRA, AdaLoRA or full fine-tuning)."""
    return self.tokens is not None


def cache_dir(cfg: Config) -> str:
  return cfg.encoder.cache_dir or os.environ.get("JAXREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxrec")


def _encoder_options(cfg: Config) -> dict[str, Any]:
  enc = cfg.encoder
  adapters = {}
  if enc.mode == "lora":
    adapters = {"lora_rank": enc.lora_rank, "lora_alpha": enc.lora_alpha, "lora_ffn": enc.lora_ffn}
  elif enc.mode == "adalora":  # SVD-form adapters at their initial rank; the allocator prunes them
    adapters = {"lora_rank": enc.adalora_init_rank, "lora_alpha": enc.lora_alpha, "lora_ffn": enc.lora_ffn,
                "adapter": "adalora"}
  adapters.update(item_prefix=enc.item_prefix, query_prefix=enc.query_prefix)  # None: the model's own prompts
  # pooling None: the model directory's own (1_Pooling/config.json), so training pools as TextEncoder does.
  return dict(max_length=cfg.encoder.max_length or None, pooling=cfg.encoder.pooling or None, dtype=cfg.encoder.dtype,
              **adapters)


def _item_texts(tokenizer, dataset: Dataset) -> list[str]:
  """The catalog's texts as the encoder reads them: each after the item prefix (E5's "passage: ")."""
  if tokenizer.item_prefix:
    log.info("item texts read with the prefix %r", tokenizer.item_prefix)
  return [tokenizer.item_prefix + t for t in dataset.item_text]


def _history_text(tokenizer, cfg: Config, dataset: Dataset) -> HistoryText:
  return HistoryText.of(tokenizer, dataset.item_titles, cfg.model.query_separator, prefix=tokenizer.query_prefix)


def catalog_text(cfg: Config, dataset: Dataset, *, abstract: bool = False) -> CatalogText:
  """The text inputs of ``dataset``'s catalog for ``cfg``'s encoder mode; ``abstract``: shapes only
  where the model's saved state holds the values (frozen vectors)."""
  if not cfg.model.use_text:
    return CatalogText()
  from jaxrec.text_encoder import TextEncoder, TextTokenizer, encode_cached
  path = cfg.encoder.path or None
  query_text = cfg.model.query == "text"
  if cfg.encoder.mode in LIVE_MODES:
    tokenizer = TextTokenizer.from_pretrained(path, **_encoder_options(cfg))
    return CatalogText(dim=tokenizer.hidden_size, tokens=tokenizer.tokenize(_item_texts(tokenizer, dataset)),
                       encoder_config=tokenizer.config, encoder_path=tokenizer.path,
                       length_buckets=tokenizer.length_buckets, pooling=tokenizer.pooling,
                       history=_history_text(tokenizer, cfg, dataset) if query_text else None)
  # Frozen with the text query: the model also carries the encoder (its weights as constants).
  query_encoder = {}
  if query_text:
    tokenizer = TextTokenizer.from_pretrained(path, **_encoder_options(cfg))
    query_encoder = dict(encoder_config=tokenizer.config, encoder_path=tokenizer.path, pooling=tokenizer.pooling,
                   history=_history_text(tokenizer, cfg, dataset))
  if abstract:  # the width is all a restore needs: config.json says it
    from jaxrec.text_encoder import default_model_dir
    from jaxrec.weights import read_config
    dim = read_config(path or default_model_dir()).output_size
    return CatalogText(dim=dim, vectors=jax.ShapeDtypeStruct((dataset.num_items, dim), np.float32), **query_encoder)
  log.info("loading the text encoder %s (encoder.mode=%s)", cfg.encoder.path or "all-MiniLM-L6-v2 (packaged)",
           cfg.encoder.mode)
  encoder = TextEncoder.from_pretrained(path, **_encoder_options(cfg))
  vectors = encode_cached(encoder, _item_texts(encoder, dataset), cache_dir(cfg), batch_size=cfg.encoder.batch_size,
                          progress=cfg.train.progress and jax.process_index() == 0)
  return CatalogText(dim=int(vectors.shape[1]), vectors=np.asarray(vectors, np.float32), **query_encoder)
