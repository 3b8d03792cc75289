"""Matmul FLOPs of a traced program, counted from its jaxpr: the numerator of MFU.

XLA's cost analysis is no substitute across backends: it counts a loop's body once whatever its
trip count (a train call scans K steps), and on GPU the compiled program's dots become cuBLAS calls
it need not count (measured on an H200 with jax 0.11.2: a small fraction of the real work, and 0
for the lowered program). The jaxpr is the same on every backend, so the count is too.

Counted: every ``dot_general`` (2 x batch x M x N x K), inside any sub-program (jit, remat,
custom_vjp/jvp), ``scan`` bodies times their length, the costliest ``cond`` branch, and
``shard_map`` bodies (per-shard shapes) times the number of shards. A ``while`` body counts once,
its trip count being unknown at trace time. Elementwise work, softmax and normalisation are left
out, as MFU conventions (PaLM, MaxText) do: on accelerators the matmuls are what the peak measures.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.extend import core as jex_core


def _as_jaxpr(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    return value.jaxpr
  if isinstance(value, jex_core.Jaxpr):
    return value
  return None


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  # lhs holds batch x contracting x its free dims; each output element is K multiply-adds.
  return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _shards(eqn) -> int:
  mesh = eqn.params.get("mesh")
  if mesh is None:
    return 1
  manual = (eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes")
            or getattr(mesh, "axis_names", ()))
  return math.prod(dict(mesh.shape)[a] for a in manual) if manual else 1


def jaxpr_matmul_flops(jaxpr) -> float:
  """Matmul FLOPs of one run of ``jaxpr`` (a Jaxpr or ClosedJaxpr)."""
  jaxpr = _as_jaxpr(jaxpr) or jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
      continue
    if name == "cond":
      total += max((jaxpr_matmul_flops(b) for b in eqn.params["branches"]), default=0.0)
      continue
    inner = 0.0
    for value in eqn.params.values():
      values = value if isinstance(value, (tuple, list)) else (value,)
      for v in values:
        sub = _as_jaxpr(v)
        if sub is not None:
          inner += jaxpr_matmul_flops(sub)
    if name == "scan":
      inner *= eqn.params["length"]
    elif name == "shard_map":
      inner *= _shards(eqn)
    total += inner
  return total


def matmul_flops(fn, *args, **kwargs) -> float:
  """Matmul FLOPs of ``fn(*args, **kwargs)``; args may be ``jax.ShapeDtypeStruct``s (nothing runs)."""
  traced = fn.trace(*args, **kwargs) if hasattr(fn, "trace") else jax.jit(fn).trace(*args, **kwargs)
  return jaxpr_matmul_flops(traced.jaxpr)
