"""The one runner over users that every matching attack goes through.

An attack writes a jnp body for a block of users, `body(shared, per_user) -> dict of [U, ...]
arrays` (shared: parameters, tables, scalars; per_user: arrays with a leading users axis), and
`run_users` does the host work once for all of them: pads the users to whole calls (copies of the
first user, dropped at the end), shards them over a 1-D mesh 'users' of the given devices
(`shard_map`; each device attacks its own block, no communication; also across processes under
`jax.distributed`), jits the body with its static configuration (`Static`: jit's own cache does
the caching, so the same model and options never recompile) and gathers the answers to numpy.
Per-user PRNG keys come from the global user index (`user_keys`), so answers do not depend on
chunking, padding or the number of devices.
"""

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax import multihost
from splitjax.attacks import sizing

# Users per jitted call per device for attacks without their own plan (a power of two; the last
# call is padded).
USERS_PER_CALL = 256


class Static(NamedTuple):
  """`fn` with its leading static arguments bound; hashable, so jit caches on it.

  `Static(f, (a, b))(x, y)` is `f(a, b, x, y)`. Every bound argument must be hashable (callables
  by identity, options as NamedTuples of Python values): two equal `Static`s share one
  compilation, where a `functools.partial` (hashed by identity) would recompile every call.
  """

  fn: Callable[..., Any]
  args: tuple

  def __call__(self, *args, **kwargs):
    return self.fn(*self.args, *args, **kwargs)


@functools.partial(jax.jit, static_argnames=('body', 'devices'))
def _call(shared, per_user, *, body, devices):
  if len(devices) > 1:  # each device attacks its own block of users; no communication
    spec = jax.sharding.PartitionSpec
    mesh = jax.sharding.Mesh(np.asarray(devices), ('users',))
    return jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(spec(), spec('users')),
      out_specs=spec('users'),
      check_vma=False,
    )(shared, per_user)
  return body(shared, per_user)


def run_users(
  body: Static,
  shared: tuple,
  per_user: tuple,
  *,
  num_users: int,
  users_per_call: int,
  devices: tuple,
) -> dict:
  """Runs `body` over every user, `users_per_call` at a time, and gathers the answers.

  Args:
    body: `(shared, per_user) -> dict` of [U, ...] arrays (a pytree of them), for U users.
    shared: host or device values every user needs (replicated on every device).
    per_user: host arrays with a leading axis of `num_users`.
    num_users: N > 0.
    users_per_call: users per jitted call, a multiple of `len(devices)` (and of any vmapped
      block size the body needs).
    devices: the devices of the 'users' mesh.

  Returns:
    The body's outputs as numpy arrays with a leading axis of N, in user order. All calls are
    queued before the first is waited for (dispatch is asynchronous).
  """
  spec = jax.sharding.PartitionSpec
  mesh = jax.sharding.Mesh(np.asarray(devices), ('users',))
  replicated = jax.sharding.NamedSharding(mesh, spec())
  users = jax.sharding.NamedSharding(mesh, spec('users'))
  num_calls = -(-num_users // users_per_call)
  pad = num_calls * users_per_call - num_users

  def padded(x):
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x

  shared = multihost.put_global(shared, replicated)
  per_user = tuple(padded(x) for x in per_user)
  outs = []
  for i in range(num_calls):
    sl = slice(i * users_per_call, (i + 1) * users_per_call)
    block = tuple(multihost.put_global(x[sl], users) for x in per_user)
    outs.append(_call(shared, block, body=body, devices=tuple(devices)))
  return jax.tree.map(
    lambda *parts: np.concatenate([multihost.to_host(p) for p in parts])[:num_users], *outs
  )


def call_size(num_users: int, num_devices: int, batch: int) -> tuple[int, int]:
  """(vmapped users per block, users per call) for attacks that vmap `batch` users at a time.

  Each call takes up to `USERS_PER_CALL` users per device (fewer for small problems), a multiple
  of the block.
  """
  per_device = min(USERS_PER_CALL, sizing.next_pow2(-(-num_users // num_devices)))
  batch = max(1, min(batch, per_device))
  per_device = max(per_device, batch) // batch * batch
  return batch, per_device * num_devices


def map_users(one, xs, batch: int):
  """`lax.map` of `vmap(one)` over blocks of `batch` users (the number of users a multiple of it).

  Written out instead of `lax.map(..., batch_size=)`, whose reshape fails on zero-size outputs
  (e.g. no categorical feature).
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  blocks = jax.tree.map(lambda x: x.reshape((n // batch, batch) + x.shape[1:]), xs)
  out = jax.lax.map(jax.vmap(one), blocks)
  return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def user_keys(key, num_users: int) -> np.ndarray:
  """One key per user, `fold_in(key, user)` (default key `jax.random.key(0)`), as raw key data.

  Raw `uint32` data so the host can pad and shard it like any per-user array; the body wraps it
  back with `jax.random.wrap_key_data`.
  """
  if key is None:
    key = jax.random.key(0)
  if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_users))
  return np.asarray(jax.random.key_data(keys))


# (user, candidate-or-restart) rows vmapped together per user block: about EXACT's CPU optimum.
TARGET_ROWS_PER_BATCH = {'cpu': 2**12}
TARGET_ROWS_PER_BATCH_DEFAULT = 2**16


def users_per_batch(rows_per_user: int, users_per_batch: int | None) -> int:
  """Users vmapped together: the caller's choice, else a power of two near the target rows."""
  if users_per_batch is not None:
    return users_per_batch
  target = TARGET_ROWS_PER_BATCH.get(jax.default_backend(), TARGET_ROWS_PER_BATCH_DEFAULT)
  return 1 << max(0, (max(1, target // max(rows_per_user, 1))).bit_length() - 1)
