"""EXACT's size before it runs: FLOPs and memory per candidate from the traced model, chunk sizes.

`estimate` tells a caller how long an enumeration will take and how much memory it needs at least
(the binaries print it and refuse a run that cannot fit); `plan` chooses the chunk sizes `exact`
compiles for. Both count on the jaxpr of one candidate's `value_and_grad`, keeping only the
equations that depend on the candidate (the `h`-only part of the head is computed once per user).
"""

import functools
import math
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks

# Peak working memory targeted per compiled chunk, and the preferred number of (user, candidate)
# rows vmapped together per device: on CPU ~4k rows keep the activations cache-resident (from
# benchmarks/exact_throughput.py's chunk-size sweep on 2 cores); accelerators want larger batches
# (the memory budget still caps them).
MEMORY_BUDGET_BYTES = 2 * 1024**3
TARGET_ROWS_PER_CHUNK = {'cpu': 2**12}
TARGET_ROWS_PER_CHUNK_DEFAULT = 2**17
# Users per jitted call per device (several chunks run in sequence through lax.map), amortising
# dispatch and host transfers.
TARGET_USERS_PER_CALL = {'cpu': 256}
TARGET_USERS_PER_CALL_DEFAULT = 2**14
# Safety factor applied to the traced per-candidate intermediate sizes.
_MEMORY_FACTOR = 1.5


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(item, 'jaxpr') and hasattr(item.jaxpr, 'eqns'):
        yield item.jaxpr


def _dependent_eqns(jaxpr, dependent_invars):
  """Every equation of `jaxpr` (and of its sub-jaxprs) that depends on the given input variables."""
  dep = set(v for v, d in zip(jaxpr.invars, dependent_invars, strict=False) if d)
  for eqn in jaxpr.eqns:
    if not any((not hasattr(v, 'val')) and v in dep for v in eqn.invars):
      continue
    for sub in _subjaxprs(eqn):
      yield from _dependent_eqns(sub, [True] * len(sub.invars))
    dep.update(eqn.outvars)
    yield eqn


def _dependent_bytes(jaxpr, dependent_invars) -> int:
  """Bytes of all intermediates in `jaxpr` that depend on the given input variables."""
  total = 0
  for eqn in _dependent_eqns(jaxpr, dependent_invars):
    for v in eqn.outvars:
      aval = v.aval
      if hasattr(aval, 'shape') and hasattr(aval, 'dtype'):
        total += int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
  return total


def _dependent_flops(jaxpr, dependent_invars) -> int:
  """FLOPs (2 per multiply-add) of the dot products in `jaxpr` that depend on the given inputs."""
  total = 0
  for eqn in _dependent_eqns(jaxpr, dependent_invars):
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      contracted = int(np.prod([lhs_shape[i] for i in lhs_contract], dtype=np.int64))
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) * contracted
  return total


def _candidate_jaxpr(device_apply, params, d: int, dtype, num_features: int):
  closed = jax.make_jaxpr(jax.value_and_grad(device_apply, argnums=1))(
    params, jax.ShapeDtypeStruct((d,), dtype), jax.ShapeDtypeStruct((num_features,), jnp.int32)
  )
  flags = [False] * len(jax.tree.leaves(params)) + [True, True]
  return closed.jaxpr, flags


def bytes_per_candidate(
  device_apply, params, d: int, dtype, num_features: int, num_labels: int
) -> int:
  """Traces one candidate's value_and_grad and sums the sizes of its candidate-dependent values."""
  jaxpr, flags = _candidate_jaxpr(device_apply, params, d, dtype, num_features)
  traced = _dependent_bytes(jaxpr, flags)
  itemsize = np.dtype(dtype).itemsize
  scoring = (d * (num_labels + 2) + 8 * num_labels) * itemsize
  return int(_MEMORY_FACTOR * (traced + scoring)) + 1


@functools.lru_cache(maxsize=32)
def _bytes_per_candidate_memo(device_apply, treedef, leaves, d, dtype, num_features, num_labels):
  """`bytes_per_candidate` at parameter shapes (memoised: tracing device_apply is not free)."""
  params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, t) for s, t in leaves])
  return bytes_per_candidate(device_apply, params, d, dtype, num_features, num_labels)


class Estimate(NamedTuple):
  """The size and expected duration of an EXACT enumeration (see `estimate`).

  Attributes:
    num_users: users attacked.
    num_candidates: private candidates per user (one gradient serves every label).
    num_pairs: (candidate, label) pairs per user.
    flops_per_candidate: FLOPs of one candidate's gradient that depend on the candidate
      (dot products, 2 per multiply-add, counted on the traced computation).
    bytes_per_candidate: memory of one candidate's intermediates (what the chunk planner uses).
    matmul_flops_per_second: float32 matmul rate measured on the default device just now.
    seconds: estimated wall time, `num_users * num_candidates * flops_per_candidate /
      (efficiency * matmul_flops_per_second)`, compilation not included.
    min_peak_bytes: a lower bound on the run's peak memory: the `[C, P]` candidate table (host
      and device copies) plus one user's chunk (its candidates' intermediates, up to the
      memory budget, and its `C * num_labels` pair scores, which no chunking divides). A run
      whose `min_peak_bytes` exceeds the free memory cannot fit.
  """

  num_users: int
  num_candidates: int
  num_pairs: int
  flops_per_candidate: int
  bytes_per_candidate: int
  matmul_flops_per_second: float
  seconds: float
  min_peak_bytes: int = 0


@functools.lru_cache(maxsize=4)
def matmul_flops_per_second(platform: str, n: int = 512, budget_seconds: float = 0.2) -> float:
  """The float32 matmul rate of the default device, measured in about `budget_seconds`."""
  del platform  # the cache key: one measurement per backend and process
  a = jnp.ones((n, n), jnp.float32)
  fn = jax.jit(lambda x: x @ x)
  fn(a).block_until_ready()  # compile
  reps, start = 0, time.perf_counter()
  while True:
    fn(a).block_until_ready()
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= budget_seconds or reps >= 1000:
      return 2.0 * n**3 * reps / max(elapsed, 1e-9)


def estimate(
  device_apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  device_params: Any,
  d: int,
  cardinalities: Sequence[int],
  num_users: int,
  *,
  num_labels: int = 2,
  dtype=jnp.float32,
  efficiency: float = 0.5,
) -> Estimate:
  """Sizes an EXACT run and estimates its duration before it starts (without running it).

  FLOPs per candidate are counted on the traced gradient of `device_apply` (dot products that
  depend on the candidate); the rate is a float32 matmul measured on the default device (within
  `matmul_flops_per_second`'s 0.2 s budget, once per process); `efficiency` is the fraction of
  that rate EXACT reaches (the measured fractions are in BUILD_NOTES.md, "EXACT throughput"; 0.5
  leaves a margin).

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit`, as for `exact`.
    device_params: one version of the device parameters.
    d: the width of `h`.
    cardinalities: the private features' cardinalities.
    num_users: users to attack.
    num_labels: labels per candidate (2).
    dtype: the dtype of `h`.
    efficiency: fraction of the matmul rate assumed, in (0, 1].

  Returns:
    An `Estimate`.
  """
  if not 0 < efficiency <= 1:
    raise checks.AttackError(f'efficiency must be in (0, 1], got {efficiency}')
  cards = tuple(int(c) for c in cardinalities)
  jaxpr, flags = _candidate_jaxpr(device_apply, device_params, d, dtype, len(cards))
  flops = _dependent_flops(jaxpr, flags)
  per_cand = bytes_per_candidate(device_apply, device_params, d, dtype, len(cards), num_labels)
  rate = matmul_flops_per_second(jax.default_backend())
  num_cand = math.prod(cards)
  seconds = num_users * num_cand * max(flops, 1) / (efficiency * rate)
  table_bytes = 2 * num_cand * len(cards) * 4
  one_user = min(num_cand, max(1, MEMORY_BUDGET_BYTES // per_cand)) * per_cand + (
    num_cand * num_labels * 4 * 4
  )
  return Estimate(
    int(num_users),
    num_cand,
    num_cand * num_labels,
    int(flops),
    int(per_cand),
    float(rate),
    float(seconds),
    int(table_bytes + one_user),
  )


def next_pow2(x: int) -> int:
  """The smallest power of two >= x (1 for x <= 1)."""
  return 1 << max(0, x - 1).bit_length()


class Plan(NamedTuple):
  users_per_chunk: int  # users vmapped together on one device
  chunks_per_call: int  # chunks per device per jitted call (lax.map)
  candidates_per_block: int
  num_blocks: int


def plan(
  device_apply,
  params,
  d,
  dtype,
  cards,
  num_labels,
  num_users,
  num_devices,
  platform,
  chunk_size,
  users_per_chunk,
  per_user_params=False,
  screen=False,
) -> Plan:
  """Chooses chunk sizes: memory per chunk under the budget, few distinct compiled shapes."""
  num_cand = math.prod(cards)
  leaves, treedef = jax.tree.flatten(params)
  signature = tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)
  per_cand = _bytes_per_candidate_memo(
    device_apply, treedef, signature, d, np.dtype(dtype).name, len(cards), num_labels
  )
  if chunk_size is None:
    # All candidates at once unless one user's candidates would exceed the budget.
    cand_block = min(num_cand, max(1, MEMORY_BUDGET_BYTES // per_cand))
  else:
    cand_block = min(num_cand, chunk_size)
  num_blocks = -(-num_cand // cand_block)
  cand_block = -(-num_cand // num_blocks)  # balance the blocks (less padding)
  per_user_bytes = cand_block * per_cand + num_cand * num_labels * 4 * 4
  if per_user_params:  # each user carries a gathered copy of its parameter version
    per_user_bytes += sum(np.size(x) * np.dtype(jnp.result_type(x)).itemsize for x in leaves)
  users_per_device = -(-num_users // num_devices)
  if users_per_chunk is None:
    by_memory = max(1, MEMORY_BUDGET_BYTES // max(per_user_bytes, 1))
    target_rows = TARGET_ROWS_PER_CHUNK.get(platform, TARGET_ROWS_PER_CHUNK_DEFAULT)
    by_speed = max(1, target_rows // cand_block)
    # Small problems: the next power of two (bucketed, so few distinct compilations).
    users = min(by_memory, by_speed, next_pow2(users_per_device))
  else:
    users = users_per_chunk
  # Several chunks per call amortise dispatch; a power of two (few distinct compilations).
  chunks_needed = -(-users_per_device // users)
  target_users = TARGET_USERS_PER_CALL.get(platform, TARGET_USERS_PER_CALL_DEFAULT)
  per_call = 1 << (max(1, target_users // users).bit_length() - 1)
  if screen:  # the whole call's screening scores are held at once (plus the selection's copy)
    call_bytes = 3 * num_cand * num_labels * np.dtype(dtype).itemsize
    max_users = max(1, (MEMORY_BUDGET_BYTES // 2) // call_bytes)
    per_call = min(per_call, 1 << (max(1, max_users // users).bit_length() - 1))
  chunks = min(per_call, next_pow2(chunks_needed))
  return Plan(users, chunks, cand_block, num_blocks)
