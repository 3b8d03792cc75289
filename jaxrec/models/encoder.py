"""BERT-family text encoders in Flax NNX, LoRA and AdaLoRA adapters, and sentence pooling.

One forward serves texts as padded rows [B, L] and as a token stream [N] (``TokenStream``);
``sentence_vectors`` is the pooled sentence vector of either layout.

Dimension legend:
  B batch, L tokens, D encoder width (hidden_size), H attention heads, K head width (D // H),
  F MLP width (intermediate_size), V vocab, P max positions, T token types, R adapter rank,
  S texts and N tokens of a token stream; I and O an adapted matrix's input and output widths.

The layout follows Hugging Face's ``BertModel`` (post-LayerNorm blocks, exact-erf GELU, learned
absolute positions, token types) so that a checkpoint maps onto it one tensor at a time
(see ``jaxrec/weights.py``). The other post-LayerNorm families are the same blocks with a few
switches in ``BertConfig``: RoBERTa and XLM-RoBERTa number positions from ``pad_token_id + 1``
(``position_offset``); DistilBERT has no token types (``type_vocab_size=0``); MPNet has neither
and adds a relative position bias, shared by every layer, to the attention scores
(``relative_attention_num_buckets``). ModernBERT is its own stack (``ModernBertEncoder``): pre-LayerNorm
blocks without biases, rotary positions (another base on its local layers), GeGLU MLPs, and
attention that alternates between global and a sliding window; ``encoder_module`` builds the one
a config names. Both take the same inputs and share the attention, adapters and token stream. Parameters carry logical axis names; ``jaxrec/sharding.py`` maps
them to mesh axes. Eager sharding is off per parameter so a module never needs a mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ConfigFileError(ValueError):
  """A model's config.json is missing, unreadable or describes an unsupported architecture."""


# model_type values of config.json this module runs: BertModel's blocks, with the switches above.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert")
# Families whose positions start after the padding index (fairseq's make_positions).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "mpnet")
# DistilBERT's config.json names -> BertConfig's.
_DISTILBERT_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                     "hidden_dim": "intermediate_size", "activation": "hidden_act"}
_MODERNBERT_NAMES = {"hidden_activation": "hidden_act", "norm_eps": "layer_norm_eps"}
ATTENTION_TYPES = ("full_attention", "sliding_attention")  # ModernBERT's layer_types

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

ADAPTERS = ("lora", "adalora")  # BertConfig.adapter: the module in each adapted matrix's slot


def _precision(cfg: "BertConfig") -> jax.lax.Precision | None:
  # float32 must mean float32 on accelerators: GPUs otherwise run f32 matmuls as TF32 (~1e-3 error)
  # and the frozen vectors must equal sentence-transformers' (torch keeps TF32 off for matmuls).
  # CPUs compute f32 dots exactly at default precision, and asking for HIGHEST there turns off
  # XLA's fast CPU matmul fusion, so the default stays on CPU. bfloat16 compute is a speed choice.
  if cfg.dtype == "float32" and jax.default_backend() != "cpu":
    return jax.lax.Precision.HIGHEST
  return None


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2  # 0: no token-type embedding (DistilBERT, MPNet)
  layer_norm_eps: float = 1e-12
  position_offset: int = 0  # position j of a text reads row j + offset (RoBERTa, XLM-R, MPNet: pad_token_id + 1)
  relative_attention_num_buckets: int = 0  # MPNet: T5-style relative position buckets (0 = none)
  # ModernBERT: rotary bases of the full-attention and the sliding-window layers, the window's reach
  # each way (a token attends to those within it), and each layer's attention type.
  rope_theta: float = 0.0
  local_rope_theta: float = 0.0
  sliding_window: int = 0
  layer_types: tuple[str, ...] = ()
  # sentence-transformers' Dense stages after pooling, in order: (stage directory, in_features,
  # out_features, bias, activation in DENSE_ACTIVATIONS); read from modules.json by jaxrec.weights.
  dense: tuple[tuple[str, int, int, bool, str], ...] = ()
  hidden_act: str = "gelu"
  model_type: str = "bert"
  dtype: str = "float32"  # compute dtype of matmuls; softmax, LayerNorm statistics and pooling stay float32
  lora_rank: int = 0  # 0 = no adapters; adalora: the initial rank of each adapter
  lora_alpha: float = 16.0
  lora_ffn: bool = False  # adapters on the MLP too, not only attention query/value
  adapter: str = "lora"  # lora (x A B) | adalora (SVD form x Q diag(lambda) P, ranks pruned in training)

  def __post_init__(self):
    if self.hidden_act != "gelu":
      raise ConfigFileError(f"hidden_act {self.hidden_act!r} is not supported; only 'gelu' (exact erf) is")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigFileError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigFileError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
    if self.dtype not in _DTYPES:
      raise ConfigFileError(f"dtype {self.dtype!r} must be one of {', '.join(_DTYPES)}")
    if self.lora_rank < 0:
      raise ConfigFileError(f"lora_rank must be >= 0; got {self.lora_rank}")
    if self.adapter not in ADAPTERS:
      raise ConfigFileError(f"adapter {self.adapter!r} must be one of {', '.join(ADAPTERS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def output_size(self) -> int:
    """The sentence vector's width: the last Dense stage's out_features, else hidden_size."""
    return self.dense[-1][2] if self.dense else self.hidden_size

  @property
  def max_positions(self) -> int:
    """The most tokens a text may hold: the position table's rows past the offset."""
    return self.max_position_embeddings - self.position_offset

  @classmethod
  def from_hf_json(cls, path: str | os.PathLike, **overrides: Any) -> "BertConfig":
    """Reads a Hugging Face ``config.json`` (or the directory holding it); ``overrides`` set LoRA/dtype fields."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise ConfigFileError(f"{file}: no config.json; a Hugging Face model directory needs one")
    try:
      with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigFileError(f"{file}: cannot read config.json: {e}") from e
    if not isinstance(raw, dict):
      raise ConfigFileError(f"{file}: config.json is not a JSON object")
    model_type = raw.get("model_type")
    family: dict[str, Any] = {}
    if model_type == "distilbert":
      raw = {_DISTILBERT_NAMES.get(k, k): v for k, v in raw.items()}
      family = dict(type_vocab_size=0, layer_norm_eps=1e-12)  # DistilBERT's LayerNorms are 1e-12, not configurable
    elif model_type == "mpnet":
      family = dict(type_vocab_size=0, relative_attention_num_buckets=int(raw.get("relative_attention_num_buckets", 32)))
    elif model_type == "modernbert":
      raw = {_MODERNBERT_NAMES.get(k, k): v for k, v in raw.items()}
      family = _modernbert_fields(raw, file)
    if model_type in _OFFSET_POSITIONS:
      family["position_offset"] = int(raw.get("pad_token_id", 1)) + 1
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = raw.get("architectures") or []
      raise ConfigFileError(
          f"{file}: model_type {model_type!r} (architectures {archs}) is not a supported BERT-family model; "
          f"supported model_type: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = raw.get("hidden_act", "gelu")
    if act != "gelu":
      raise ConfigFileError(f"{file}: hidden_act {act!r} is not supported; only 'gelu' (exact erf GELU) is")
    pos_type = raw.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ConfigFileError(f"{file}: position_embedding_type {pos_type!r} is not supported; only 'absolute' is")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in raw]
    if missing:
      raise ConfigFileError(f"{file}: config.json lacks {', '.join(missing)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: raw[k] for k in (*required, "max_position_embeddings", "type_vocab_size", "layer_norm_eps") if k in raw}
    kwargs.setdefault("max_position_embeddings", 8192 if model_type == "modernbert" else 512)
    kwargs.update(family, hidden_act=act, model_type=model_type)
    unknown = set(overrides) - fields
    if unknown:
      raise TypeError(f"BertConfig has no field(s) {', '.join(sorted(unknown))}")
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except ConfigFileError as e:
      raise ConfigFileError(f"{file}: {e}") from None


def _modernbert_fields(raw: dict, file: str) -> dict[str, Any]:
  """ModernBERT's config.json (either the released checkpoints' keys or transformers 5's
  ``layer_types``/``rope_parameters``) as ``BertConfig`` fields; biases are refused, none of the
  released models has them."""
  biased = [k for k in ("attention_bias", "mlp_bias", "norm_bias") if raw.get(k)]
  if biased:
    raise ConfigFileError(f"{file}: ModernBERT with {', '.join(biased)}=true is not supported (jaxrec's has no biases)")
  layers = int(raw["num_hidden_layers"]) if "num_hidden_layers" in raw else 0
  every = int(raw.get("global_attn_every_n_layers", 3))
  types = tuple(raw.get("layer_types") or
                ("sliding_attention" if i % every else "full_attention" for i in range(layers)))
  if any(t not in ATTENTION_TYPES for t in types) or len(types) != layers:
    raise ConfigFileError(f"{file}: layer_types {list(types)} must name one of {', '.join(ATTENTION_TYPES)} per layer")
  rope = raw.get("rope_parameters") or {}
  if any(p.get("rope_type", "default") != "default" for p in rope.values() if isinstance(p, dict)):
    raise ConfigFileError(f"{file}: rope_parameters {rope} are not supported; only rope_type 'default' is")
  theta = lambda kind, key, default: float((rope.get(kind) or {}).get("rope_theta", raw.get(key, default)))  # noqa: E731
  return dict(type_vocab_size=0, layer_types=types, sliding_window=int(raw.get("local_attention", 128)) // 2,
              rope_theta=theta("full_attention", "global_rope_theta", 160000.0),
              local_rope_theta=theta("sliding_attention", "local_rope_theta", 10000.0))


def _partitioned(init, names: tuple[str | None, ...]):
  # eager_sharding=False: the logical names stay metadata, so building a module needs no mesh.
  return nnx.with_partitioning(init, names, eager_sharding=False)


_normal = nnx.initializers.normal(0.02)  # BERT's initializer_range
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


class LoRAParam(nnx.LoRAParam):
  """Low-rank adapter weights: their own Variable type so an optimizer selects them by type.

  Subclasses Flax's ``nnx.LoRAParam`` (itself an ``nnx.Param``), so ``wrt=LoRAParam``,
  ``wrt=nnx.LoRAParam`` and ``nnx.All(nnx.Param, nnx.Not(LoRAParam))`` all mean what they say.
  """


class LoRA(nnx.Module):
  """delta(x) = x @ A @ B * alpha / R, with A random and B zero so a fresh adapter changes nothing."""

  def __init__(self, in_features: int, out_features: int, in_axis: str, out_axis: str, cfg: BertConfig, *, rngs: nnx.Rngs):
    rank = cfg.lora_rank
    # A ~ kaiming-uniform-like scale as in the LoRA paper's reference code; B = 0.
    a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    self.a = LoRAParam(_partitioned(a_init, (in_axis, None))(rngs.params(), (in_features, rank), jnp.float32))
    self.b = LoRAParam(_partitioned(_zeros, (None, out_axis))(rngs.params(), (rank, out_features), jnp.float32))
    self.scaling = cfg.lora_alpha / rank
    self.dtype, self.precision = _DTYPES[cfg.dtype], _precision(cfg)

  def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
    a, b = self.a[...].astype(self.dtype), self.b[...].astype(self.dtype)
    x_BxLxR = jnp.matmul(x_BxLxI.astype(self.dtype), a, precision=self.precision)
    return jnp.matmul(x_BxLxR, b, precision=self.precision) * self.scaling


class AdaLoRAParam(LoRAParam):
  """AdaLoRA's adapter weights (a ``LoRAParam``, so LoRA's filters train them); their own type so the
  rank allocator (``jaxrec/adalora.py``) finds them."""


class AdaLoRA(nnx.Module):
  """AdaLoRA's SVD-form adapter (Zhang et al., ICLR 2023): delta(x) = x @ Q @ diag(lambda) @ P * alpha / R.

  In the kernel layout [I, O] of ``nnx.Linear``: ``q`` [I, R] holds the right singular vectors
  (peft's ``lora_A`` [R, I], transposed), ``e`` [R] the singular values lambda (``lora_E``) and
  ``p`` [R, O] the left singular vectors (``lora_B`` [O, R], transposed). lambda starts at zero, so
  a fresh adapter changes nothing, while P and Q start random (normal 0.02, as peft) so every
  triplet has a gradient. The rank allocator prunes triplets by zeroing their lambda; R and the
  scaling alpha / R stay those of the initial rank (peft divides by the initial rank too).
  """

  def __init__(self, in_features: int, out_features: int, in_axis: str, out_axis: str, cfg: BertConfig, *, rngs: nnx.Rngs):
    rank = cfg.lora_rank
    self.q = AdaLoRAParam(_partitioned(_normal, (in_axis, None))(rngs.params(), (in_features, rank), jnp.float32))
    self.e = AdaLoRAParam(_partitioned(_zeros, (None,))(rngs.params(), (rank,), jnp.float32))
    self.p = AdaLoRAParam(_partitioned(_normal, (None, out_axis))(rngs.params(), (rank, out_features), jnp.float32))
    self.scaling = cfg.lora_alpha / rank
    self.dtype, self.precision = _DTYPES[cfg.dtype], _precision(cfg)

  def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
    # diag(lambda) folds into Q's columns: an [I, R] scale, not a third matmul.
    q = (self.q[...] * self.e[...][None, :]).astype(self.dtype)
    x_BxLxR = jnp.matmul(x_BxLxI.astype(self.dtype), q, precision=self.precision)
    return jnp.matmul(x_BxLxR, self.p[...].astype(self.dtype), precision=self.precision) * self.scaling


def _adapter(in_features: int, out_features: int, in_axis: str, out_axis: str, cfg: BertConfig, *,
             rngs: nnx.Rngs) -> LoRA | AdaLoRA:
  cls = AdaLoRA if cfg.adapter == "adalora" else LoRA
  return cls(in_features, out_features, in_axis, out_axis, cfg, rngs=rngs)


def _transposed_copy(x_MxK: jax.Array) -> jax.Array:
  """x.T [K, M] laid out as such in memory. A bare transpose feeding a dot is folded into the dot's
  dimension numbers, and XLA:CPU then runs a bf16 dot that contracts the lhs's major axis through
  float32 converts at float32 speed; the unit axis hides the transpose from that rewrite."""
  m, k = x_MxK.shape
  return x_MxK.reshape(m, 1, k).transpose(2, 0, 1).reshape(k, m)


@jax.custom_vjp
def _bf16_matmul(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
  """x @ w [M, N] in float32 from bfloat16 operands, float32 accumulation and float32 gradients.

  XLA:CPU runs a bf16 x bf16 -> f32 dot with AVX512-BF16 at about twice its f32 rate (bf16 outputs
  get no speed-up) when the lhs contracts its minor axis. The vjp keeps every dot in that form:
  dx = g @ w.T, and dw = (x.T) @ g or ((g.T) @ x).T with the transposed operand materialised.
  """
  return jax.lax.dot_general(x_MxK.astype(jnp.bfloat16), w_KxN.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x_MxK, w_KxN):
  x_MxK, w_KxN = x_MxK.astype(jnp.bfloat16), w_KxN.astype(jnp.bfloat16)
  return _bf16_matmul(x_MxK, w_KxN), (x_MxK, w_KxN)


def _bf16_matmul_bwd(residuals, grad_MxN):
  x_MxK, w_KxN = residuals
  grad_MxN = grad_MxN.astype(jnp.bfloat16)
  grad_x_MxK = jax.lax.dot_general(grad_MxN, w_KxN, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  # One operand of the weight gradient must be transposed across M; XLA:CPU's transpose costs
  # about as much as the dot at [M, 1536], so the narrower of x and grad is the one moved.
  if x_MxK.shape[1] <= grad_MxN.shape[1]:
    grad_w_KxN = jax.lax.dot_general(_transposed_copy(x_MxK), grad_MxN, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  else:
    grad_w_NxK = jax.lax.dot_general(_transposed_copy(grad_MxN), x_MxK, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
    grad_w_KxN = _transposed_copy(grad_w_NxK)
  return grad_x_MxK, grad_w_KxN


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


class _CpuBf16Linear(nnx.Linear):
  """nnx.Linear (same parameters, so checkpoints map unchanged) whose matmul is ``_bf16_matmul``:
  float32 in and out, bfloat16 only inside the dot, bias added in float32."""

  def __call__(self, x_BxLxI: jax.Array, out_sharding=None) -> jax.Array:
    lead = x_BxLxI.shape[:-1]
    x_MxI = x_BxLxI.reshape(-1, x_BxLxI.shape[-1]).astype(jnp.float32)
    y_MxO = _bf16_matmul(x_MxI, self.kernel[...])
    if self.bias is not None:
      y_MxO = y_MxO + self.bias[...].astype(jnp.float32)
    return y_MxO.reshape(*lead, -1)


def uses_cpu_bf16_matmul(cfg: BertConfig) -> bool:
  """Whether this encoder's Linears compute as ``_bf16_matmul`` (bfloat16 on a CPU backend)."""
  return cfg.dtype == "bfloat16" and jax.default_backend() == "cpu"


def _activation_dtype(cfg: BertConfig) -> Any:
  # On CPU bfloat16 lives only inside the matmuls: bf16 activations buy XLA:CPU no speed, and
  # embedding gradients summed over every token in bf16 lose digits.
  return jnp.float32 if uses_cpu_bf16_matmul(cfg) else _DTYPES[cfg.dtype]


def _biased(cfg: BertConfig) -> bool:
  return cfg.model_type != "modernbert"  # ModernBERT's Linears and LayerNorms have no biases


def _linear(cfg: BertConfig, n_in: int, n_out: int, in_axis: str, out_axis: str, *, rngs: nnx.Rngs) -> nnx.Linear:
  # On CPU, bfloat16 means bf16 operands with float32 results: that is the form XLA:CPU speeds up.
  cls = _CpuBf16Linear if uses_cpu_bf16_matmul(cfg) else nnx.Linear
  return cls(n_in, n_out, dtype=_DTYPES[cfg.dtype], precision=_precision(cfg), use_bias=_biased(cfg),
             kernel_init=_partitioned(_normal, (in_axis, out_axis)), bias_init=_partitioned(_zeros, (out_axis,)),
             rngs=rngs)


def _layer_norm(cfg: BertConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # LayerNorm computes in float32 whatever the matmul dtype: its statistics are where bf16 hurts.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, use_bias=_biased(cfg),
                       scale_init=_partitioned(_ones, ("embed",)), bias_init=_partitioned(_zeros, ("embed",)),
                       rngs=rngs)


class BertEmbeddings(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    dt = _activation_dtype(cfg)
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt,
                          embedding_init=_partitioned(_normal, ("vocab", "embed")), rngs=rngs)
    self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt,
                              embedding_init=_partitioned(_normal, (None, "embed")), rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dt,
                                embedding_init=_partitioned(_normal, (None, "embed")), rngs=rngs) if cfg.type_vocab_size else None
    self.norm = _layer_norm(cfg, rngs=rngs)
    self.position_offset = cfg.position_offset

  def __call__(self, input_ids_BxL: jax.Array, token_type_ids_BxL: jax.Array,
               position_ids_BxL: jax.Array | None = None, num_positions: int | None = None) -> jax.Array:
    """Embeddings [B, L, D] of padded rows, token j of a row at position j; or, with ``position_ids``,
    of tokens in any layout (a token stream [N] gives [N, D]) at those positions, all below
    ``num_positions`` (default the table's size). Position j reads the table's row j + offset."""
    x_BxLxD = self.word(input_ids_BxL)
    if self.token_type is not None:
      x_BxLxD = x_BxLxD + _one_hot_rows(self.token_type, token_type_ids_BxL)
    offset = self.position_offset
    if position_ids_BxL is None:  # every row holds positions 0..L-1: one slice, broadcast over rows
      x_BxLxD = x_BxLxD + self.position(offset + jnp.arange(input_ids_BxL.shape[1]))[None]
    else:
      rows = self.position.num_embeddings if num_positions is None else min(num_positions + offset,
                                                                            self.position.num_embeddings)
      x_BxLxD = x_BxLxD + _one_hot_rows(self.position, position_ids_BxL + offset, rows)
    return self.norm(x_BxLxD)


def _one_hot_rows(table: nnx.Embed, ids: jax.Array, rows: int | None = None) -> jax.Array:
  """``table(ids)`` for ids below ``rows`` (default all) as a one-hot matmul, not a gather: the
  gather's gradient is a scatter-add of every token into a few rows, which serialises (atomics on
  GPUs, a scalar loop on XLA:CPU); the matmul's is a matmul. HIGHEST keeps the selected row exact
  on accelerators (TF32 would round it)."""
  table_RxD = table.embedding[...][:rows].astype(table.dtype)
  one_hot = jax.nn.one_hot(ids, table_RxD.shape[0], dtype=table_RxD.dtype)
  return jnp.matmul(one_hot, table_RxD, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _take_rows(x_NxD: jax.Array, index_M: jax.Array, inverse_N: jax.Array) -> jax.Array:
  """``x[index]`` [M, D], zero rows where ``index`` is N. ``inverse_N`` is its inverse map (the
  position of each row of x in the output, M where none): the gradient gathers through it instead
  of scatter-adding, so neither pass scatters (valid because ``index`` repeats no row)."""
  return jnp.take(x_NxD, index_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_NxD, index_M, inverse_N):
  return _take_rows(x_NxD, index_M, inverse_N), (index_M, inverse_N)


def _take_rows_bwd(residuals, grad_MxD):
  index_M, inverse_N = residuals
  return _take_rows(grad_MxD, inverse_N, index_M), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """S texts laid end to end as one stream of N tokens, each token's position in its text, and the
  maps between the stream and the text layout [S, L] (text s, its token j), both ways; ``N`` /
  ``S * L`` mark padding.

  Everything in BERT but attention is per token, so it runs on the stream and computes on the
  texts' tokens only; attention runs in the text layout, where each text attends to itself.
  """

  to_texts_SxL: jax.Array  # stream index of each text token, N where the text is shorter
  to_stream_N: jax.Array  # s * L + j of each stream token, S * L on padding
  position_ids_N: jax.Array  # j of each stream token (anything below L on padding)

  @classmethod
  def build(cls, stream_index_SxL: jax.Array, segment_ids_N: jax.Array, position_ids_N: jax.Array) -> "TokenStream":
    """From ``stream_index_SxL`` and the stream's text slot (-1 on padding) and position per token."""
    texts, length = stream_index_SxL.shape
    to_stream_N = jnp.where(segment_ids_N >= 0, segment_ids_N * length + position_ids_N, texts * length)
    return cls(stream_index_SxL, to_stream_N.astype(jnp.int32), position_ids_N)

  @property
  def length(self) -> int:
    """L, the text layout's width: every position in the stream is below it."""
    return self.to_texts_SxL.shape[1]

  @property
  def mask_SxL(self) -> jax.Array:
    return self.to_texts_SxL < self.to_stream_N.shape[0]

  def texts(self, x_NxD: jax.Array) -> jax.Array:
    texts, length = self.to_texts_SxL.shape
    return _take_rows(x_NxD, self.to_texts_SxL.reshape(-1), self.to_stream_N).reshape(texts, length, -1)

  def stream(self, x_SxLxD: jax.Array) -> jax.Array:
    flat = x_SxLxD.reshape(-1, x_SxLxD.shape[-1])
    return _take_rows(flat, self.to_stream_N, self.to_texts_SxL.reshape(-1))


class SelfAttention(nnx.Module):
  """Multi-head self-attention's projections, adapters and attention, without residual or norm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim, self.precision = cfg.num_attention_heads, cfg.head_dim, _precision(cfg)
    # Attention's dots take operands in the compute dtype and give the activation dtype: on CPU
    # bfloat16 that is bf16 in, float32 out (as on accelerators, where activations are bf16
    # already), so the layout gathers and head transposes move half the bytes.
    self.operand_dtype, self.context_dtype = _DTYPES[cfg.dtype], _activation_dtype(cfg)
    self.query = _linear(cfg, d, d, "embed", "heads", rngs=rngs)
    self.key = _linear(cfg, d, d, "embed", "heads", rngs=rngs)
    self.value = _linear(cfg, d, d, "embed", "heads", rngs=rngs)
    self.out = _linear(cfg, d, d, "heads", "embed", rngs=rngs)
    if cfg.lora_rank:
      self.query_lora = _adapter(d, d, "embed", "heads", cfg, rngs=rngs)
      self.value_lora = _adapter(d, d, "embed", "heads", cfg, rngs=rngs)
    else:
      self.query_lora = self.value_lora = None

  def _heads(self, x_BxLxD: jax.Array) -> jax.Array:
    b, l, _ = x_BxLxD.shape
    return x_BxLxD.reshape(b, l, self.num_heads, self.head_dim)

  def __call__(self, x_BxLxD: jax.Array, mask_bias_Bx1x1xL: jax.Array, stream: TokenStream | None = None,
               rotary_LxK: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """out(attention) of x [B, L, D], or of a token stream [N, D] with ``stream`` (attention then
    runs per text). The additive bias broadcasts to the scores [B, H, L, L]: the padding mask
    [B, 1, 1, L], plus MPNet's relative position bias [1, H, L, L] or ModernBERT's sliding window
    [1, 1, L, L] where the model has one. ``rotary_LxK`` (cos, sin) rotates queries and keys."""
    q_BxLxD, k_BxLxD, v_BxLxD = self.query(x_BxLxD), self.key(x_BxLxD), self.value(x_BxLxD)
    if self.query_lora is not None:
      q_BxLxD = q_BxLxD + self.query_lora(x_BxLxD).astype(q_BxLxD.dtype)
      v_BxLxD = v_BxLxD + self.value_lora(x_BxLxD).astype(v_BxLxD.dtype)
    q_BxLxD, k_BxLxD, v_BxLxD = (t.astype(self.operand_dtype) for t in (q_BxLxD, k_BxLxD, v_BxLxD))
    if stream is not None:  # [N, D] -> [S, L, D]
      q_BxLxD, k_BxLxD, v_BxLxD = stream.texts(q_BxLxD), stream.texts(k_BxLxD), stream.texts(v_BxLxD)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._heads(q_BxLxD), self._heads(k_BxLxD), self._heads(v_BxLxD)
    if rotary_LxK is not None:
      q_BxLxHxK, k_BxLxHxK = _rotate(q_BxLxHxK, *rotary_LxK), _rotate(k_BxLxHxK, *rotary_LxK)
    scores_BxHxLxL = jnp.einsum("blhk,bmhk->bhlm", q_BxLxHxK, k_BxLxHxK, precision=self.precision,
                                preferred_element_type=jnp.float32)
    scores_BxHxLxL = scores_BxHxLxL * (1.0 / math.sqrt(self.head_dim)) + mask_bias_Bx1x1xL
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(v_BxLxHxK.dtype)
    ctx_BxLxHxK = jnp.einsum("bhlm,bmhk->blhk", probs_BxHxLxL, v_BxLxHxK, precision=self.precision,
                             preferred_element_type=self.context_dtype)
    ctx_BxLxD = ctx_BxLxHxK.reshape(q_BxLxD.shape)
    if stream is not None:
      ctx_BxLxD = stream.stream(ctx_BxLxD)
    return self.out(ctx_BxLxD)


class BertAttention(SelfAttention):
  """BERT's post-LayerNorm attention block: norm(x + attention(x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.norm = _layer_norm(cfg, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, mask_bias_Bx1x1xL: jax.Array, stream: TokenStream | None = None) -> jax.Array:
    return self.norm(x_BxLxD + super().__call__(x_BxLxD, mask_bias_Bx1x1xL, stream))


def _rotate(x_BxLxHxK: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
  """Rotary position embedding as Hugging Face applies it (the halves rotated, in float32)."""
  x = x_BxLxHxK.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos_LxK[None, :, None, :] + rotated * sin_LxK[None, :, None, :]).astype(x_BxLxHxK.dtype)


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin) float32 [L, K] of positions 0..L-1, computed on the host in float32 as torch does."""
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)))
  freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
  angles = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as Hugging Face's BERT and PyTorch write it, x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's
  erfc form is the same function, but XLA:CPU evaluates erfc with two polynomials and an exp where
  erf needs one polynomial; at [tokens, 1536] per layer that is about 3% of a fine-tuning step."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class BertMLP(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.ffn_in = _linear(cfg, d, f, "embed", "mlp", rngs=rngs)
    self.ffn_out = _linear(cfg, f, d, "mlp", "embed", rngs=rngs)
    self.norm = _layer_norm(cfg, rngs=rngs)
    if cfg.lora_rank and cfg.lora_ffn:
      self.ffn_in_lora = _adapter(d, f, "embed", "mlp", cfg, rngs=rngs)
      self.ffn_out_lora = _adapter(f, d, "mlp", "embed", cfg, rngs=rngs)
    else:
      self.ffn_in_lora = self.ffn_out_lora = None

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    h_BxLxF = self.ffn_in(x_BxLxD)
    if self.ffn_in_lora is not None:
      h_BxLxF = h_BxLxF + self.ffn_in_lora(x_BxLxD).astype(h_BxLxF.dtype)
    h_BxLxF = _gelu(h_BxLxF)
    y_BxLxD = self.ffn_out(h_BxLxF)
    if self.ffn_out_lora is not None:
      y_BxLxD = y_BxLxD + self.ffn_out_lora(h_BxLxF).astype(y_BxLxD.dtype)
    return self.norm(x_BxLxD + y_BxLxD)


class BertLayer(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = BertAttention(cfg, rngs=rngs)
    self.mlp = BertMLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, mask_bias_Bx1x1xL: jax.Array, stream: TokenStream | None = None) -> jax.Array:
    return self.mlp(self.attention(x_BxLxD, mask_bias_Bx1x1xL, stream))


def relative_position_buckets(length: int, num_buckets: int, max_distance: int = 128) -> np.ndarray:
  """int32 [L, L]: the bucket of key j's offset from query i, as Hugging Face's MPNet (T5's bidirectional
  scheme): half the buckets per direction, exact offsets below a quarter of them, logarithmic bins up
  to ``max_distance``. Computed on the host in float32 as torch does, so every bin edge falls alike."""
  n_LxL = -(np.arange(length)[None, :] - np.arange(length)[:, None])  # query - key
  half = num_buckets // 2
  bucket = (n_LxL < 0).astype(np.int64) * half
  n_LxL = np.abs(n_LxL)
  max_exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) where the exact branch is taken anyway
    scaled = (np.log(n_LxL.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
              * np.float32(half - max_exact))
  large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (bucket + np.where(n_LxL < max_exact, n_LxL, large)).astype(np.int32)


def _mask_bias(keep_BxL: jax.Array) -> jax.Array:
  """Additive float32 attention bias [B, 1, 1, L]: the most negative finite float, as BERT does, so
  a padded key gets exactly zero weight and a row can never turn into NaN."""
  keep_Bx1x1xL = keep_BxL[:, None, None, :].astype(bool)
  return jnp.where(keep_Bx1x1xL, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertEncoder(nnx.Module):
  """Token ids -> last hidden states; no pooler (sentence embeddings come from ``pool``)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = BertEmbeddings(cfg, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.dense = _dense_stages(cfg, rngs)  # sentence-transformers' Dense stages, after pooling
    # MPNet: one table of per-head biases by relative-position bucket, shared by every layer.
    self.relative_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_attention_heads, dtype=jnp.float32,
                                   embedding_init=_partitioned(_normal, (None, None)), rngs=rngs
                                   ) if cfg.relative_attention_num_buckets else None

  def _position_bias(self, length: int) -> jax.Array:
    """MPNet's relative position bias [1, H, L, L] of texts of L tokens."""
    # Hugging Face's MPNet buckets into 32 whatever its config says (compute_position_bias's default);
    # the table has relative_attention_num_buckets rows.
    bucket_LxL = jnp.asarray(relative_position_buckets(length, 32))
    return jnp.transpose(self.relative_bias(bucket_LxL), (2, 0, 1))[None].astype(jnp.float32)

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None,
               token_type_ids_BxL: jax.Array | None = None, *, stream: TokenStream | None = None) -> jax.Array:
    """Last hidden states [B, L, D] of texts in either layout, through one embedding and layer loop:

    - padded rows: ``input_ids`` [B, L] with ``attention_mask`` [B, L];
    - a token stream: ``input_ids`` [N] with ``stream`` (which holds the positions); the result is
      in the stream's text layout [S, L, D], zeros past each text's end (``stream.mask_SxL``
      marks its tokens). Equal to padded rows of the same texts, while the per-token work runs
      on N tokens, not S * L.

    ``token_type_ids`` (same layout as ``input_ids``) default to zeros.
    """
    if (attention_mask_BxL is None) == (stream is None):
      raise ValueError("BertEncoder takes padded rows (attention_mask) or a token stream (stream), exactly one")
    if token_type_ids_BxL is None:
      token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
    if stream is None:
      mask_bias_Bx1x1xL = _mask_bias(attention_mask_BxL)
      x_BxLxD = self.embeddings(input_ids_BxL, token_type_ids_BxL)
    else:  # x is [N, D] until the end; attention alone visits the text layout
      mask_bias_Bx1x1xL = _mask_bias(stream.mask_SxL)
      x_BxLxD = self.embeddings(input_ids_BxL, token_type_ids_BxL, stream.position_ids_N, stream.length)
    if self.relative_bias is not None:  # [B, 1, 1, L] + [1, H, L, L]: computed once for every layer
      mask_bias_Bx1x1xL = mask_bias_Bx1x1xL + self._position_bias(mask_bias_Bx1x1xL.shape[-1])
    for layer in self.layers:
      x_BxLxD = layer(x_BxLxD, mask_bias_Bx1x1xL, stream)
    return x_BxLxD if stream is None else stream.texts(x_BxLxD)


# The activations of sentence-transformers' Dense stages that jaxrec runs.
DENSE_ACTIVATIONS = {"tanh": jnp.tanh, "identity": lambda x: x, "relu": jax.nn.relu, "gelu": lambda x: _gelu(x),
                     "sigmoid": jax.nn.sigmoid}


class Dense(nnx.Module):
  """A sentence-transformers Dense stage on the pooled vector [B, D] -> [B, O]: activation(x W + b), in
  float32 (one small matmul per text)."""

  def __init__(self, in_features: int, out_features: int, bias: bool, activation: str, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, use_bias=bias, dtype=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST,
                             kernel_init=_partitioned(_normal, (None, None)), bias_init=_partitioned(_zeros, (None,)),
                             rngs=rngs)
    self.activation = activation

  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    return DENSE_ACTIVATIONS[self.activation](self.linear(x_BxD.astype(jnp.float32)))


def _dense_stages(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.List | None:
  if not cfg.dense:
    return None
  return nnx.List([Dense(i, o, bias, act, rngs=rngs) for _, i, o, bias, act in cfg.dense])


class GatedMLP(nnx.Module):
  """ModernBERT's GeGLU MLP: ffn_out(gelu(a) * b) with [a, b] = ffn_in(x) [B, L, 2F]; no residual, no norm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.ffn_in = _linear(cfg, d, 2 * f, "embed", "mlp", rngs=rngs)
    self.ffn_out = _linear(cfg, f, d, "mlp", "embed", rngs=rngs)
    if cfg.lora_rank and cfg.lora_ffn:
      self.ffn_in_lora = _adapter(d, 2 * f, "embed", "mlp", cfg, rngs=rngs)
      self.ffn_out_lora = _adapter(f, d, "mlp", "embed", cfg, rngs=rngs)
    else:
      self.ffn_in_lora = self.ffn_out_lora = None

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    h_BxLx2F = self.ffn_in(x_BxLxD)
    if self.ffn_in_lora is not None:
      h_BxLx2F = h_BxLx2F + self.ffn_in_lora(x_BxLxD).astype(h_BxLx2F.dtype)
    a_BxLxF, b_BxLxF = jnp.split(h_BxLx2F, 2, axis=-1)
    h_BxLxF = _gelu(a_BxLxF) * b_BxLxF
    y_BxLxD = self.ffn_out(h_BxLxF)
    if self.ffn_out_lora is not None:
      y_BxLxD = y_BxLxD + self.ffn_out_lora(h_BxLxF).astype(y_BxLxD.dtype)
    return y_BxLxD


class ModernBertLayer(nnx.Module):
  """Pre-LayerNorm block: x + attention(norm(x)), then x + mlp(norm(x)); layer 0 reads the
  embeddings' norm, so it has no attention norm of its own (as Hugging Face's)."""

  def __init__(self, cfg: BertConfig, index: int, *, rngs: nnx.Rngs):
    self.attention_norm = _layer_norm(cfg, rngs=rngs) if index else None
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.mlp_norm = _layer_norm(cfg, rngs=rngs)
    self.mlp = GatedMLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, bias_BxHxLxL: jax.Array, stream: TokenStream | None,
               rotary_LxK: tuple[jax.Array, jax.Array]) -> jax.Array:
    h_BxLxD = x_BxLxD if self.attention_norm is None else self.attention_norm(x_BxLxD)
    x_BxLxD = x_BxLxD + self.attention(h_BxLxD, bias_BxHxLxL, stream, rotary_LxK)
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


class ModernBertEmbeddings(nnx.Module):
  """Token embeddings and their norm: ModernBERT's positions are rotary, inside attention."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=_activation_dtype(cfg),
                          embedding_init=_partitioned(_normal, ("vocab", "embed")), rngs=rngs)
    self.norm = _layer_norm(cfg, rngs=rngs)

  def __call__(self, input_ids_BxL: jax.Array) -> jax.Array:
    return self.norm(self.word(input_ids_BxL))


class ModernBertEncoder(nnx.Module):
  """ModernBERT: token ids -> last hidden states (after the final norm), in either layout of ``BertEncoder``."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = ModernBertEmbeddings(cfg, rngs=rngs)
    self.layers = nnx.List([ModernBertLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
    self.final_norm = _layer_norm(cfg, rngs=rngs)
    self.dense = _dense_stages(cfg, rngs)  # sentence-transformers' Dense stages, after pooling

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None,
               token_type_ids_BxL: jax.Array | None = None, *, stream: TokenStream | None = None) -> jax.Array:
    """As ``BertEncoder.__call__``; token types are ignored (ModernBERT has none)."""
    if (attention_mask_BxL is None) == (stream is None):
      raise ValueError("ModernBertEncoder takes padded rows (attention_mask) or a token stream (stream), exactly one")
    keep_BxL = attention_mask_BxL if stream is None else stream.mask_SxL
    length = keep_BxL.shape[1]
    full_Bx1x1xL = _mask_bias(keep_BxL)
    # Sliding layers also drop keys farther than the window: where(), not a second bias added, so a
    # masked score stays the finite minimum (two of them would sum to -inf, and a row of -inf to NaN).
    distance_LxL = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
    near_1x1xLxL = jnp.asarray(distance_LxL <= self.cfg.sliding_window)[None, None]
    bias = {"full_attention": full_Bx1x1xL,
            "sliding_attention": jnp.where(near_1x1xLxL, full_Bx1x1xL, jnp.finfo(jnp.float32).min)}
    head_dim = self.cfg.head_dim
    rotary = {"full_attention": tuple(map(jnp.asarray, rotary_tables(length, head_dim, self.cfg.rope_theta))),
              "sliding_attention": tuple(map(jnp.asarray, rotary_tables(length, head_dim, self.cfg.local_rope_theta)))}
    x_BxLxD = self.embeddings(input_ids_BxL)  # per token: the stream stays [N, D]
    for layer, kind in zip(self.layers, self.cfg.layer_types):
      x_BxLxD = layer(x_BxLxD, bias[kind], stream, rotary[kind])
    x_BxLxD = self.final_norm(x_BxLxD)
    return x_BxLxD if stream is None else stream.texts(x_BxLxD)


def encoder_module(cfg: BertConfig, *, rngs: nnx.Rngs) -> "BertEncoder | ModernBertEncoder":
  """The encoder ``cfg.model_type`` names: ``ModernBertEncoder`` for ModernBERT, else ``BertEncoder``."""
  return (ModernBertEncoder if cfg.model_type == "modernbert" else BertEncoder)(cfg, rngs=rngs)


# sentence-transformers' pooling modes (its Pooling module's names), each a reading of the last
# hidden states [B, L, D] over a text's tokens (the mask): their mean; [CLS]'s state; the per-feature
# max; the mean weighted by position 1..L (SGPT); the last token's state (decoder-style
# embedders); the sum over sqrt of the token count.
POOLING_MODES = ("mean", "cls", "max", "weightedmean", "lasttoken", "mean_sqrt_len_tokens")


def pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, mode: str = "mean", normalize: bool = True) -> jax.Array:
  """Sentence embeddings [B, D] in float32 by one of ``POOLING_MODES``, as sentence-transformers'
  ``Pooling`` computes them for right-padded rows; a row with no tokens pools to zeros."""
  hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
  mask_BxLx1 = mask_BxL.astype(jnp.float32)[..., None]
  count_Bx1 = mask_BxLx1.sum(axis=1)
  if mode in ("mean", "mean_sqrt_len_tokens"):
    sum_BxD = (hidden_BxLxD * mask_BxLx1).sum(axis=1)
    clamped_Bx1 = jnp.maximum(count_Bx1, 1e-9)  # sentence-transformers' clamp
    out_BxD = sum_BxD / (clamped_Bx1 if mode == "mean" else jnp.sqrt(clamped_Bx1))
  elif mode == "weightedmean":
    weight_BxLx1 = mask_BxLx1 * jnp.arange(1, hidden_BxLxD.shape[1] + 1, dtype=jnp.float32)[None, :, None]
    out_BxD = (hidden_BxLxD * weight_BxLx1).sum(axis=1) / jnp.maximum(weight_BxLx1.sum(axis=1), 1e-9)
  elif mode == "cls":
    out_BxD = hidden_BxLxD[:, 0]
  elif mode == "max":
    # sentence-transformers sets padding to -1e9 before the max; a row without tokens gives zeros here.
    out_BxD = jnp.where(mask_BxLx1 > 0, hidden_BxLxD, -1e9).max(axis=1)
    out_BxD = jnp.where(count_Bx1 > 0, out_BxD, 0.0)
  elif mode == "lasttoken":
    # Right padding: the last real token sits at count - 1 (a row without tokens reads row 0, then zeros).
    last_B = jnp.maximum(count_Bx1[:, 0].astype(jnp.int32) - 1, 0)
    out_BxD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    out_BxD = jnp.where(count_Bx1 > 0, out_BxD, 0.0)
  else:
    raise ValueError(f"pooling mode {mode!r} must be one of {', '.join(POOLING_MODES)}")
  return l2_normalize(out_BxD) if normalize else out_BxD


def l2_normalize(x_BxD: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) per row (torch.nn.functional.normalize's eps): a zero row stays zero."""
  return x_BxD / jnp.maximum(jnp.linalg.norm(x_BxD, axis=-1, keepdims=True), 1e-12)


# The two layouts of ``sentence_vectors``' inputs, by key.
PADDED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # each [S, L]
STREAM_INPUTS = ("input_ids", "token_type_ids", "position_ids", "segment_ids", "stream_index")  # [N] x 4, [S, L]


def sentence_vectors(module: "BertEncoder | ModernBertEncoder", inputs: Mapping[str, jax.Array], pooling: str = "mean",
                     normalize: bool = True) -> jax.Array:
  """Pooled sentence embeddings [S, D] float32 of S texts in either layout, through the module's
  Dense stages if it has any ([S, O] then); pure, so a train step can jit and differentiate it.

  ``inputs`` holds exactly the keys of one layout:

  - padded rows ``PADDED_INPUTS``: ``input_ids``, ``attention_mask``, ``token_type_ids``, each [S, L];
  - a token stream ``STREAM_INPUTS``: ``input_ids``, ``token_type_ids``, ``position_ids`` (j of each
    token in its text) and ``segment_ids`` (its text s, -1 on padding), each [N], and
    ``stream_index`` [S, L] (the stream index of text s's token j, N past its end). A text with no
    tokens pools to zeros.
  """
  keys = set(inputs)
  if keys == set(STREAM_INPUTS):
    stream = TokenStream.build(inputs["stream_index"], inputs["segment_ids"], inputs["position_ids"])
    hidden_SxLxD = module(inputs["input_ids"], token_type_ids_BxL=inputs["token_type_ids"], stream=stream)
    mask_SxL = stream.mask_SxL
  elif keys == set(PADDED_INPUTS):
    mask_SxL = inputs["attention_mask"]
    hidden_SxLxD = module(inputs["input_ids"], mask_SxL, inputs["token_type_ids"])
  else:
    raise ValueError(f"sentence_vectors takes padded rows ({', '.join(PADDED_INPUTS)}) or a token stream "
                     f"({', '.join(STREAM_INPUTS)}); got {', '.join(sorted(keys)) or 'no inputs'}")
  if module.dense is None:
    return pool(hidden_SxLxD, mask_SxL, pooling, normalize)
  vectors_SxO = pool(hidden_SxLxD, mask_SxL, pooling, normalize=False)
  for stage in module.dense:  # sentence-transformers' Dense stages: between pooling and Normalize
    vectors_SxO = stage(vectors_SxO)
  return l2_normalize(vectors_SxO) if normalize else vectors_SxO
