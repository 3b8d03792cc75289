"""How item text reaches the item tower, per ``encoder.mode``.

``frozen``: the pretrained encoder's catalog vectors, computed once and cached on disk, become a
constant table of the model. ``lora``/``full``: the encoder runs inside the train step, so the
model carries the catalog's tokens and the encoder's architecture; its pretrained weights are read
once, when the train state is initialised (``step.init_state``). ``none``: no text.

A model restored from a checkpoint carries these tables in its saved state, so restoring needs
only their shapes (``abstract=True``): no vectors are encoded and no weights are read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from jaxrec.config import Config
from jaxrec.data.dataset import Dataset

log = logging.getLogger("jaxrec")


@dataclasses.dataclass(frozen=True)
class CatalogText:
  dim: int = 0  # text vector width D (0: the model reads no text)
  vectors: Any = None  # frozen: the catalog's vectors, float32 [N, D] (a ShapeDtypeStruct when abstract)
  tokens: dict | None = None  # lora/full: the catalog's tokens, int32 [N, T] each
  encoder_config: Any = None  # lora/full: the encoder's BertConfig (with adapters and dtype)
  encoder_path: str = ""  # lora/full: the model directory its pretrained weights come from
  length_buckets: tuple[int, ...] = ()  # lora/full: the encoder's token length buckets

  @property
  def live(self) -> bool:
    """Whether the encoder runs inside the model (LoRA or full fine-tuning)."""
    return self.encoder_config is not None


def cache_dir(cfg: Config) -> str:
  return cfg.encoder.cache_dir or os.environ.get("JAXREC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxrec")


def _encoder_options(cfg: Config) -> dict[str, Any]:
  adapters = {"lora_rank": cfg.encoder.lora_rank, "lora_alpha": cfg.encoder.lora_alpha,
              "lora_ffn": cfg.encoder.lora_ffn} if cfg.encoder.mode == "lora" else {}
  return dict(max_length=cfg.encoder.max_length or None, pooling=cfg.encoder.pooling, dtype=cfg.encoder.dtype,
              **adapters)


def catalog_text(cfg: Config, dataset: Dataset, *, abstract: bool = False) -> CatalogText:
  """The text inputs of ``dataset``'s catalog for ``cfg``'s encoder mode; ``abstract``: shapes only
  where the model's saved state holds the values (frozen vectors)."""
  if not cfg.model.use_text:
    return CatalogText()
  from jaxrec.text_encoder import TextEncoder, TextTokenizer, encode_cached
  path = cfg.encoder.path or None
  if cfg.encoder.mode in ("lora", "full"):
    tokenizer = TextTokenizer.from_pretrained(path, **_encoder_options(cfg))
    return CatalogText(dim=tokenizer.hidden_size, tokens=tokenizer.tokenize(list(dataset.item_text)),
                       encoder_config=tokenizer.config, encoder_path=tokenizer.path,
                       length_buckets=tokenizer.length_buckets)
  if abstract:  # the width is all a restore needs: config.json says it
    from jaxrec.text_encoder import default_model_dir
    from jaxrec.weights import read_config
    dim = read_config(path or default_model_dir()).hidden_size
    return CatalogText(dim=dim, vectors=jax.ShapeDtypeStruct((dataset.num_items, dim), np.float32))
  log.info("loading the text encoder %s (encoder.mode=%s)", cfg.encoder.path or "all-MiniLM-L6-v2 (packaged)",
           cfg.encoder.mode)
  encoder = TextEncoder.from_pretrained(path, **_encoder_options(cfg))
  vectors = encode_cached(encoder, list(dataset.item_text), cache_dir(cfg), batch_size=cfg.encoder.batch_size,
                          progress=cfg.train.progress and jax.process_index() == 0)
  return CatalogText(dim=int(vectors.shape[1]), vectors=np.asarray(vectors, np.float32))
