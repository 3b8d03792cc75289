"""The one table from logical axis names to mesh axes, and the shardings derived from it.

Parameters are annotated once, where they are created, with logical names
(``nnx.with_partitioning(init, ("embed", "mlp"))``); activations and batches are placed with
``batch_sharding``/``constrain``. Nothing else in jaxrec names a mesh axis.

Resolution of one array dimension: take the rule's mesh axes in order, skip an axis already
used by an earlier dimension of the same array, and keep only axes whose combined size divides
the dimension. So a table that does not split evenly stays replicated on that dimension
instead of failing, and ``embed`` can fall back gracefully when ``vocab`` took ``tensor``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it may be split over, in order of preference.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # examples: data parallel, and FSDP shards see different examples too
    "length": (),  # tokens stay whole: attention needs every position
    "vocab": ("tensor",),
    "embed": ("fsdp",),  # FSDP: weights are sliced along their model dimension
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "tower_out": (),
    "id_rows": ("fsdp", "tensor"),  # big id tables split by rows
    "items": ("data", "fsdp", "tensor"),  # the retrieval corpus splits over every device
}


def rules_from_config(overrides: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """The table with config overrides applied: each ``"name:axis1+axis2"`` (or ``"name:"`` = none)."""
  rules = dict(RULES)
  for entry in overrides:
    name, sep, axes_text = entry.partition(":")
    if not sep:
      raise ValueError(f"mesh.rules entry {entry!r} is not of the form logical:axis[+axis]")
    axes = tuple(a for a in axes_text.split("+") if a)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"mesh.rules entry {entry!r}: unknown mesh axis {unknown[0]!r} (mesh axes: {', '.join(MESH_AXES)})")
    rules[name.strip()] = axes
  return rules


def resolve(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
            rules: dict[str, tuple[str, ...]] = RULES) -> P:
  """Mesh PartitionSpec for an array of ``shape`` annotated with ``logical`` names."""
  if not logical:
    return P()
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule (known: {', '.join(sorted(rules))})")
    chosen = []
    for axis in rules[name]:
      if axis in used or axis not in mesh.shape:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _logical_names(variable: nnx.Variable) -> tuple | None:
  return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]] = RULES) -> Any:
  """NamedSharding for every Variable in an (abstract) nnx.State, from its logical annotation."""
  def one(variable):
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    names = _logical_names(variable) if isinstance(variable, nnx.Variable) else None
    return NamedSharding(mesh, resolve(names, value.shape, mesh, rules))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1, rules: dict[str, tuple[str, ...]] = RULES) -> NamedSharding:
  """Leading dimension split over the data-parallel axes, the rest whole."""
  axes = tuple(a for a in rules["batch"] if a in mesh.shape)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules: dict[str, tuple[str, ...]] = RULES) -> int:
  return math.prod(mesh.shape[a] for a in rules["batch"] if a in mesh.shape)


def constrain(x: jax.Array, mesh: Mesh, logical: Sequence[str | None], rules: dict[str, tuple[str, ...]] = RULES) -> jax.Array:
  """with_sharding_constraint by logical names (meshes here use Auto axes, so this reshards)."""
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, resolve(logical, x.shape, mesh, rules)))


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n`` (rows padded to a mesh axis, tiles)."""
  return -(-n // multiple) * multiple


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def like_params(tree: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose leaves mirror parameters (optimizer moments): a leaf whose path
  ends with a parameter's path and has its shape takes that parameter's sharding; anything else
  (step counts, scalars) is replicated."""
  by_path = {}
  for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[tuple(_key_name(p) for p in path)] = sharding

  def one(path, leaf):
    names = tuple(_key_name(p) for p in path)
    for start in range(len(names)):
      sharding = by_path.get(names[start:])
      if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
        return sharding
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree)
