"""Host <-> device transfers that also work under `jax.distributed` (several processes).

With one process these are `jax.device_put` and `np.asarray`. With several (multi-host GPU/TPU
pods, or `jax.distributed` on CPU), an array sharded over every process's devices can neither be
built with `jax.device_put` from a host value on every topology nor read back with `np.asarray`;
`put_global` builds it from a host value that every process holds identically (each process
supplies the shards its own devices hold), and `to_host` gathers the full value on every process.
"""

import jax
import numpy as np


def put_global(tree, sharding):
  """Places host values (identical on every process) as global arrays with ``sharding``.

  Works with one process (like ``jax.device_put``) and under ``jax.distributed``
  with several, where each process supplies the shards its own devices hold.
  Typed PRNG keys travel as their key data.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      data = put(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=impl)
    arr = np.asarray(to_host(x))
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

  return jax.tree.map(put, tree)


def to_host(x):
  """The full value of a (possibly multi-process, sharded) array as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
