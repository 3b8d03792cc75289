"""Hugging Face BERT-family checkpoint -> ``BertEncoder``: declared key tables, strict checks, direct placement.

The module is built abstractly (``nnx.eval_shape``); every parameter is then filled from the
checkpoint through its family's table in ``FAMILY_KEY_TABLES`` (checkpoint key, module path,
transform): BERT's ``KEY_TABLE``/``LAYER_KEY_TABLE`` also serve RoBERTa and XLM-RoBERTa (same
tensor names); DistilBERT and MPNet have their own. ``read_encoder_weights``
stops before the module: host arrays keyed by module path, for a caller that places them itself
(the trainer, straight into its sharded state); ``load_encoder`` places them with ``place``. All problems (missing
keys, wrong shapes, non-float or non-finite tensors, unexpected encoder keys) are collected and
raised together in one ``WeightsError`` naming the directory. No parameter of the pretrained
encoder is ever left at a random initial value; LoRA adapters are the only freshly initialised
parameters, and the report says so.

``pytorch_model.bin`` is read without torch: a torch zip archive is a pickle of tensor
descriptions plus raw storage files, so a restricted unpickler that knows only the few torch
rebuild functions reconstructs the arrays with numpy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxrec import hub
from jaxrec.models.encoder import BertConfig, BertEncoder, ConfigFileError, LoRAParam, ModernBertEncoder, encoder_module

log = logging.getLogger("jaxrec")


class WeightsError(ValueError):
  """A checkpoint cannot be loaded into the encoder; the message names the path and every problem."""


_COPY, _TRANSPOSE = "copy", "transpose"
_QKV = ("query_of_qkv", "key_of_qkv", "value_of_qkv")
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    _COPY: lambda w: w,
    _TRANSPOSE: lambda w: w.T,  # torch Linear.weight is (out, in); nnx.Linear.kernel is (in, out)
    # ModernBERT's fused Wqkv [3D, D]: query, key and value rows one after another, each transposed.
    **{name: (lambda k: lambda w: w.reshape(3, -1, w.shape[-1])[k].T)(k) for k, name in enumerate(_QKV)},
}

# (checkpoint key without model prefix, module path, transform); "{i}" is the layer index.
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", _COPY),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", _COPY),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.embedding", _COPY),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", _COPY),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", _COPY),
)
LAYER_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("encoder.layer.{i}.attention.self.query.weight", "layers.{i}.attention.query.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.self.query.bias", "layers.{i}.attention.query.bias", _COPY),
    ("encoder.layer.{i}.attention.self.key.weight", "layers.{i}.attention.key.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.self.key.bias", "layers.{i}.attention.key.bias", _COPY),
    ("encoder.layer.{i}.attention.self.value.weight", "layers.{i}.attention.value.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.self.value.bias", "layers.{i}.attention.value.bias", _COPY),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers.{i}.attention.out.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers.{i}.attention.out.bias", _COPY),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers.{i}.attention.norm.scale", _COPY),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers.{i}.attention.norm.bias", _COPY),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers.{i}.mlp.ffn_in.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers.{i}.mlp.ffn_in.bias", _COPY),
    ("encoder.layer.{i}.output.dense.weight", "layers.{i}.mlp.ffn_out.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.output.dense.bias", "layers.{i}.mlp.ffn_out.bias", _COPY),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers.{i}.mlp.norm.scale", _COPY),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers.{i}.mlp.norm.bias", _COPY),
)
DISTILBERT_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", _COPY),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", _COPY),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", _COPY),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", _COPY),
)
DISTILBERT_LAYER_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("transformer.layer.{i}.attention.q_lin.weight", "layers.{i}.attention.query.kernel", _TRANSPOSE),
    ("transformer.layer.{i}.attention.q_lin.bias", "layers.{i}.attention.query.bias", _COPY),
    ("transformer.layer.{i}.attention.k_lin.weight", "layers.{i}.attention.key.kernel", _TRANSPOSE),
    ("transformer.layer.{i}.attention.k_lin.bias", "layers.{i}.attention.key.bias", _COPY),
    ("transformer.layer.{i}.attention.v_lin.weight", "layers.{i}.attention.value.kernel", _TRANSPOSE),
    ("transformer.layer.{i}.attention.v_lin.bias", "layers.{i}.attention.value.bias", _COPY),
    ("transformer.layer.{i}.attention.out_lin.weight", "layers.{i}.attention.out.kernel", _TRANSPOSE),
    ("transformer.layer.{i}.attention.out_lin.bias", "layers.{i}.attention.out.bias", _COPY),
    ("transformer.layer.{i}.sa_layer_norm.weight", "layers.{i}.attention.norm.scale", _COPY),
    ("transformer.layer.{i}.sa_layer_norm.bias", "layers.{i}.attention.norm.bias", _COPY),
    ("transformer.layer.{i}.ffn.lin1.weight", "layers.{i}.mlp.ffn_in.kernel", _TRANSPOSE),
    ("transformer.layer.{i}.ffn.lin1.bias", "layers.{i}.mlp.ffn_in.bias", _COPY),
    ("transformer.layer.{i}.ffn.lin2.weight", "layers.{i}.mlp.ffn_out.kernel", _TRANSPOSE),
    ("transformer.layer.{i}.ffn.lin2.bias", "layers.{i}.mlp.ffn_out.bias", _COPY),
    ("transformer.layer.{i}.output_layer_norm.weight", "layers.{i}.mlp.norm.scale", _COPY),
    ("transformer.layer.{i}.output_layer_norm.bias", "layers.{i}.mlp.norm.bias", _COPY),
)
MPNET_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    *DISTILBERT_KEY_TABLE,  # the same four embedding tensors (no token types)
    ("encoder.relative_attention_bias.weight", "relative_bias.embedding", _COPY),
)
MPNET_LAYER_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("encoder.layer.{i}.attention.attn.q.weight", "layers.{i}.attention.query.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.attn.q.bias", "layers.{i}.attention.query.bias", _COPY),
    ("encoder.layer.{i}.attention.attn.k.weight", "layers.{i}.attention.key.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.attn.k.bias", "layers.{i}.attention.key.bias", _COPY),
    ("encoder.layer.{i}.attention.attn.v.weight", "layers.{i}.attention.value.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.attn.v.bias", "layers.{i}.attention.value.bias", _COPY),
    ("encoder.layer.{i}.attention.attn.o.weight", "layers.{i}.attention.out.kernel", _TRANSPOSE),
    ("encoder.layer.{i}.attention.attn.o.bias", "layers.{i}.attention.out.bias", _COPY),
    ("encoder.layer.{i}.attention.LayerNorm.weight", "layers.{i}.attention.norm.scale", _COPY),
    ("encoder.layer.{i}.attention.LayerNorm.bias", "layers.{i}.attention.norm.bias", _COPY),
    *LAYER_KEY_TABLE[10:],  # intermediate.dense, output.dense, output.LayerNorm: BERT's names
)
MODERNBERT_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("embeddings.tok_embeddings.weight", "embeddings.word.embedding", _COPY),
    ("embeddings.norm.weight", "embeddings.norm.scale", _COPY),
    ("final_norm.weight", "final_norm.scale", _COPY),
)
MODERNBERT_LAYER_KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("layers.{i}.attn_norm.weight", "layers.{i}.attention_norm.scale", _COPY),  # not in layer 0
    ("layers.{i}.attn.Wqkv.weight", "layers.{i}.attention.query.kernel", _QKV[0]),
    ("layers.{i}.attn.Wqkv.weight", "layers.{i}.attention.key.kernel", _QKV[1]),
    ("layers.{i}.attn.Wqkv.weight", "layers.{i}.attention.value.kernel", _QKV[2]),
    ("layers.{i}.attn.Wo.weight", "layers.{i}.attention.out.kernel", _TRANSPOSE),
    ("layers.{i}.mlp_norm.weight", "layers.{i}.mlp_norm.scale", _COPY),
    ("layers.{i}.mlp.Wi.weight", "layers.{i}.mlp.ffn_in.kernel", _TRANSPOSE),
    ("layers.{i}.mlp.Wo.weight", "layers.{i}.mlp.ffn_out.kernel", _TRANSPOSE),
)
# model_type -> (embedding rows, per-layer rows).
FAMILY_KEY_TABLES: dict[str, tuple[tuple, tuple]] = {
    "bert": (KEY_TABLE, LAYER_KEY_TABLE),
    "roberta": (KEY_TABLE, LAYER_KEY_TABLE),
    "xlm-roberta": (KEY_TABLE, LAYER_KEY_TABLE),
    "distilbert": (DISTILBERT_KEY_TABLE, DISTILBERT_LAYER_KEY_TABLE),
    "mpnet": (MPNET_KEY_TABLE, MPNET_LAYER_KEY_TABLE),
    "modernbert": (MODERNBERT_KEY_TABLE, MODERNBERT_LAYER_KEY_TABLE),
}
# *For* task models nest the encoder under their base model's prefix (XLM-R's is "roberta.").
MODEL_PREFIXES = ("bert.", "roberta.", "distilbert.", "mpnet.", "model.")  # model.: ModernBert*
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")  # buffers, not weights
# Task heads and the pooler: present in many checkpoints, not part of a sentence encoder.
EXPECTED_UNUSED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.", "lm_head.", "pre_classifier.",
                            "vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "head.", "decoder.")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class LoadReport:
  path: str
  weights_file: str
  loaded: tuple[str, ...]  # checkpoint keys placed into the module
  unused: tuple[str, ...]  # checkpoint keys not used (pooler / task heads)
  initialised: tuple[str, ...]  # module params not from the checkpoint: LoRA adapters only


def key_table(num_layers: int, model_type: str = "bert", dense: tuple = ()) -> list[tuple[str, tuple[str | int, ...], str]]:
  """The full mapping of a ``model_type`` encoder of ``num_layers`` layers and the ``dense`` stages
  of ``BertConfig.dense`` (keyed ``<stage dir>/linear.*``): (checkpoint key, module path tuple, transform)."""
  embeddings, layer = FAMILY_KEY_TABLES[model_type]
  rows = list(embeddings)
  for i in range(num_layers):
    # ModernBERT's layer 0 has no attention norm (it reads the embeddings' norm).
    rows += [(k.format(i=i), p.format(i=i), t) for k, p, t in layer if i or "attention_norm" not in p]
  for k, (stage, _, _, bias, _) in enumerate(dense):
    rows.append((f"{stage}/linear.weight", f"dense.{k}.linear.kernel", _TRANSPOSE))
    if bias:
      rows.append((f"{stage}/linear.bias", f"dense.{k}.linear.bias", _COPY))
  return [(k, tuple(int(s) if s.isdigit() else s for s in p.split(".")), t) for k, p, t in rows]


def find_weights_file(path: str) -> str:
  """The weights file in a model directory (safetensors preferred); raises naming what is there."""
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: not a directory (expected a Hugging Face model directory)")
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  present = ", ".join(sorted(os.listdir(path))) or "nothing"
  raise WeightsError(f"{path}: no weights file ({' or '.join(WEIGHT_FILES)}); the directory holds: {present}")


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(file)
  except Exception as e:  # safetensors raises its own error types (and OSError) on a damaged file
    raise WeightsError(f"{file}: corrupted or not a safetensors file ({type(e).__name__}: {e})") from e


def _read_safetensors_index(file: str) -> dict[str, np.ndarray]:
  try:
    with open(file, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WeightsError(f"{file}: unreadable safetensors index ({type(e).__name__}: {e})") from e
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(_read_safetensors(os.path.join(os.path.dirname(file), shard)))
  return tensors


# torch storage class name -> numpy dtype; torch pickles the legacy typed-storage class as the dtype tag.
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
  """torch._utils._rebuild_tensor_v2: a strided view into a flat storage, copied out."""
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *_ignored):
  return data


class _StateDict(dict):
  """OrderedDict stand-in; torch attaches ``_metadata`` to a state_dict, so it needs a __dict__."""


class _TorchUnpickler(pickle.Unpickler):
  """Knows only what a state_dict needs; any other global is refused, so no code runs."""

  _ALLOWED = {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("collections", "OrderedDict"): _StateDict,
  }

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(_TORCH_STORAGE_DTYPES[name])
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only tensors are read)")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    raw = self._archive.read(f"{self._prefix}data/{key}")
    return np.frombuffer(raw, dtype=storage_type.dtype, count=numel)


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
  if not zipfile.is_zipfile(file):
    raise WeightsError(
        f"{file}: not a torch zip archive (corrupted, or the legacy pre-1.6 torch format); "
        "convert the checkpoint to model.safetensors, which jaxrec reads directly")
  try:
    with zipfile.ZipFile(file) as archive:
      pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
      if len(pkl) != 1:
        raise WeightsError(f"{file}: torch archive without a single data.pkl; provide model.safetensors instead")
      prefix = pkl[0][: -len("data.pkl")]
      with archive.open(pkl[0]) as f:
        state = _TorchUnpickler(f, archive, prefix).load()
  except WeightsError:
    raise
  except Exception as e:  # zip, pickle and numpy all raise their own types on damaged bytes
    raise WeightsError(f"{file}: cannot read torch checkpoint without torch ({type(e).__name__}: {e}); "
                       "a model.safetensors file is needed") from e
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise WeightsError(f"{file}: does not hold a plain state_dict of tensors; a model.safetensors file is needed")
  return dict(state)


def read_checkpoint(file: str) -> dict[str, np.ndarray]:
  """Every tensor of a weights file as numpy, keyed as in the file."""
  if file.endswith(".index.json"):
    return _read_safetensors_index(file)
  if file.endswith(".safetensors"):
    return _read_safetensors(file)
  return _read_torch_bin(file)


def _strip_prefixes(tensors: Mapping[str, np.ndarray], problems: list[str]) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    bare = key
    for prefix in MODEL_PREFIXES:
      if key.startswith(prefix):
        bare = key[len(prefix):]
        break
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    bare = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", bare))
    if bare in out:
      problems.append(f"key {bare!r} appears twice (with and without a model prefix)")
    out[bare] = value
  return out


def check_vocab(tokenizer_vocab_size: int, cfg: BertConfig, path: str) -> None:
  """A tokenizer that can emit ids past the embedding table would index garbage: refuse it."""
  if tokenizer_vocab_size > cfg.vocab_size:
    raise WeightsError(
        f"{path}: tokenizer/vocab mismatch: the tokenizer has {tokenizer_vocab_size} tokens but the model's "
        f"vocab_size is {cfg.vocab_size}; ids >= {cfg.vocab_size} would have no embedding row")


def abstract_encoder(cfg: BertConfig, seed: int = 0) -> BertEncoder | ModernBertEncoder:
  return nnx.eval_shape(lambda: encoder_module(cfg, rngs=nnx.Rngs(seed)))


def _init_adapters(cfg: BertConfig, seed: int) -> dict[tuple, jax.Array]:
  # Only the adapters come out of this jit, so XLA drops the base weights' random init.
  @jax.jit
  def init():
    return nnx.state(encoder_module(cfg, rngs=nnx.Rngs(seed)), LoRAParam)
  return {path: var[...] for path, var in nnx.to_flat_state(init())}


# One Sharding for every parameter, or (module path, logical axis names, shape) -> Sharding.
ShardingSpec = jax.sharding.Sharding | Callable[[tuple, tuple, tuple], jax.sharding.Sharding] | None


def place(value: np.ndarray | jax.Array, path: tuple, logical_names: tuple, sharding: ShardingSpec) -> jax.Array:
  """``value`` as a jax.Array placed by ``sharding`` (see ``ShardingSpec``; None = the default device);
  ``path`` and ``logical_names`` are the parameter's module path and axis names, which a sharding
  function maps to its target."""
  if sharding is None:
    return jnp.asarray(value)
  target = sharding(path, logical_names, tuple(value.shape)) if callable(sharding) else sharding
  value = np.asarray(value)
  # make_array_from_callback works when the mesh spans processes: each fills only its own shards.
  return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def read_config(path: str | os.PathLike, **overrides: Any) -> BertConfig:
  """The config of a model directory (or hub id, ``jaxrec.hub.resolve``), after checking the directory
  has config.json and weights."""
  path = hub.resolve(os.fspath(path)).path
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: not a directory (expected a Hugging Face model directory with config.json and weights)")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise WeightsError(f"{path}: no config.json; a Hugging Face model directory needs config.json and model.safetensors")
  find_weights_file(path)
  try:
    cfg = BertConfig.from_hf_json(path, **overrides)
  except ConfigFileError as e:
    raise WeightsError(str(e)) from None
  stages = dense_stages(path)
  width = cfg.hidden_size
  for stage in stages:  # each Dense reads the previous width
    if stage[1] != width:
      raise WeightsError(f"{os.path.join(path, stage[0], 'config.json')}: in_features {stage[1]} does not match the "
                         f"{width}-wide vector before it")
    width = stage[2]
  return dataclasses.replace(cfg, dense=stages) if stages else cfg


def read_modules(path: str) -> list[dict]:
  """sentence-transformers' modules.json (its pipeline of stages), [] when the directory has none."""
  file = os.path.join(path, "modules.json")
  if not os.path.isfile(file):
    return []
  try:
    with open(file, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"{file}: unreadable JSON ({e})") from e
  if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
    raise WeightsError(f"{file}: not a list of modules")
  return raw


# sentence-transformers' Dense activation_function (a torch module's path) -> DENSE_ACTIVATIONS' name.
_TORCH_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity",
                      "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.GELU": "gelu",
                      "torch.nn.modules.activation.Sigmoid": "sigmoid"}


def dense_stages(path: str) -> tuple[tuple[str, int, int, bool, str], ...]:
  """The Dense stages of a model's modules.json, in order, as ``BertConfig.dense`` rows (stage
  directory, in_features, out_features, bias, activation); a Dense jaxrec cannot run as
  sentence-transformers does is refused naming its file."""
  out = []
  for module in read_modules(path):
    if not str(module.get("type", "")).endswith(".Dense"):
      continue
    stage = module.get("path") or ""
    file = os.path.join(path, stage, "config.json")
    try:
      with open(file, encoding="utf-8") as f:
        raw = json.load(f)
      in_features, out_features = int(raw["in_features"]), int(raw["out_features"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WeightsError(f"{file}: cannot read the Dense stage's config ({type(e).__name__}: {e})") from e
    activation = raw.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _TORCH_ACTIVATIONS:
      raise WeightsError(f"{file}: Dense activation_function {activation!r} is not supported; jaxrec runs "
                         f"{', '.join(_TORCH_ACTIVATIONS)}")
    if raw.get("use_residual") or raw.get("module_input_name", "sentence_embedding") != "sentence_embedding":
      raise WeightsError(f"{file}: a Dense stage with a residual or on other inputs than the sentence embedding "
                         f"is not supported")
    out.append((stage, in_features, out_features, bool(raw.get("bias", True)), _TORCH_ACTIVATIONS[activation]))
  return tuple(out)


def _read_weights(path: str, cfg: BertConfig, variables: Mapping[tuple, Any]
                  ) -> tuple[dict[tuple, np.ndarray], LoadReport]:
  """``read_encoder_weights`` against the flat state ``variables`` of an abstract ``BertEncoder(cfg)``."""
  weights_file = find_weights_file(path)
  tensors = read_checkpoint(weights_file)

  problems: list[str] = []
  tensors = _strip_prefixes(tensors, problems)
  for stage, *_ in cfg.dense:  # each Dense stage's weights sit in its own directory, keyed "linear.*"
    tensors.update({f"{stage}/{k}": v for k, v in read_checkpoint(find_weights_file(os.path.join(path, stage))).items()})
  values: dict[tuple, np.ndarray] = {}
  used: set[str] = set()
  for key, module_path, transform in key_table(cfg.num_hidden_layers, cfg.model_type, cfg.dense):
    if key not in tensors:
      problems.append(f"missing key {key!r} (for {'.'.join(map(str, module_path))})")
      continue
    used.add(key)
    raw = tensors[key]
    expected = tuple(variables[module_path].shape)
    if not np.issubdtype(raw.dtype, np.floating) and raw.dtype != ml_dtypes.bfloat16:
      problems.append(f"{key}: dtype {raw.dtype} is not floating point")
      continue
    value = TRANSFORMS[transform](raw)
    if tuple(value.shape) != expected:
      how = f" ({transform} of {tuple(raw.shape)})" if transform != _COPY else ""
      problems.append(f"{key}: shape {tuple(value.shape)}{how} does not match the model's {expected}")
      continue
    value = value.astype(variables[module_path].dtype)
    if not np.isfinite(value).all():
      problems.append(f"{key}: contains NaN or Inf")
      continue
    values[module_path] = value

  unused, unexpected = [], []
  for key in sorted(tensors):
    if key in used or key in IGNORED_KEYS:
      continue
    (unused if key.startswith(EXPECTED_UNUSED_PREFIXES) else unexpected).append(key)
  for key in unexpected:
    # Encoder-looking keys the table does not consume mean config.json and the weights disagree
    # (e.g. more layers in the file than in the config); loading part of them would be silent damage.
    problems.append(f"unexpected key {key!r} (not used by a {cfg.num_hidden_layers}-layer {cfg.model_type} encoder)")

  initialised = [p for p, v in variables.items() if isinstance(v, LoRAParam)]
  not_filled = [p for p, v in variables.items() if p not in values and not isinstance(v, LoRAParam)]
  if problems:
    listing = "\n  - ".join(problems)
    raise WeightsError(f"{weights_file}: {len(problems)} problem(s) loading into {cfg.model_type} encoder "
                       f"(D={cfg.hidden_size}, layers={cfg.num_hidden_layers}):\n  - {listing}")
  if not_filled:  # a table/module disagreement, not a checkpoint problem; still never random-init
    raise WeightsError(f"{weights_file}: module parameters with no checkpoint key: "
                       + ", ".join(".".join(map(str, p)) for p in not_filled))
  report = LoadReport(path=path, weights_file=weights_file, loaded=tuple(sorted(used)), unused=tuple(unused),
                      initialised=tuple(".".join(map(str, p)) for p in initialised))
  log.info("loaded %d tensors from %s%s%s", len(used), weights_file,
           f"; unused: {', '.join(unused)}" if unused else "",
           f"; freshly initialised LoRA adapters: {len(initialised)}" if initialised else "")
  return values, report


def read_encoder_weights(path: str | os.PathLike, cfg: BertConfig) -> tuple[dict[tuple, np.ndarray], LoadReport]:
  """A model directory's base weights, checked against ``BertEncoder(cfg)`` without building one.

  Returns host numpy arrays keyed by module path exactly as ``nnx.to_flat_state(nnx.state(
  BertEncoder(cfg)))`` names them (e.g. ``("layers", 0, "attention", "query", "kernel")``), already
  transposed and cast to the parameter's dtype, and the ``LoadReport``. LoRA adapters are not in a
  checkpoint, so none is returned; ``report.initialised`` names those ``cfg`` asks for. Every
  problem is collected and raised once as a ``WeightsError``. ``cfg`` is usually
  ``read_config(path, **overrides)``.
  """
  path = hub.resolve(os.fspath(path)).path
  variables = dict(nnx.to_flat_state(nnx.state(abstract_encoder(cfg))))  # shapes and dtypes only
  return _read_weights(path, cfg, variables)


def load_encoder(path: str | os.PathLike, *, sharding: ShardingSpec = None, seed: int = 0,
                 **config_overrides: Any) -> tuple[BertEncoder, LoadReport]:
  """Loads a local HF BERT directory into a ``BertEncoder``; raises ``WeightsError`` listing every problem.

  ``config_overrides`` set ``BertConfig`` fields that config.json does not hold (``lora_rank``,
  ``lora_alpha``, ``lora_ffn``, ``dtype``); ``module.cfg`` is the resulting config. ``sharding`` is
  one ``jax.sharding.Sharding`` for every parameter or a function ``(module_path,
  logical_axis_names, shape) -> Sharding`` (e.g. built on ``jaxrec.sharding.resolve``); None puts
  them on the default device. ``seed`` initialises LoRA adapters, the only parameters not read
  from the checkpoint.
  """
  path = hub.resolve(os.fspath(path)).path
  cfg = read_config(path, **config_overrides)
  graphdef, abstract_state = nnx.split(abstract_encoder(cfg, seed))
  variables = dict(nnx.to_flat_state(abstract_state))
  values, report = _read_weights(path, cfg, variables)
  adapters = _init_adapters(cfg, seed) if report.initialised else {}
  flat = []
  for module_path, var in variables.items():
    value = values[module_path] if module_path in values else adapters[module_path]
    names = var.get_metadata().get("out_sharding") or ()
    flat.append((module_path, var.replace(place(value, module_path, names, sharding))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), report
