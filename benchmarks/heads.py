"""The benchmarks' DeepFM heads and machine rates (no flags: imported by several benchmarks).

`Shape` (adult- and bank-shaped cut widths and private domains), a random DeepFM device head
written factored or plain (`make_apply`), its BCE loss, and the dense matmul rate of the machine.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  num_users: int
  num_server_fields: int
  num_dense: int
  priv_cardinalities: tuple[int, ...]
  embed_dim: int = 8
  hidden: tuple[int, int] = (256, 128)

  @property
  def d(self) -> int:
    return self.num_server_fields * self.embed_dim + self.num_dense


SHAPES = {
  'adult': Shape('adult', 4885, 4, 4, (2, 5, 6, 7)),
  'bank': Shape('bank', 453, 3, 7, (3, 12, 4, 2, 2, 3)),
}


def init_deepfm(key, s: Shape):
  """Random DeepFM head: linear + FM over 8-dim fields + DNN (256, 128) on [h, e(x_priv)]."""
  keys = iter(jax.random.split(key, 64))
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape, jnp.float32)
  h1, h2 = s.hidden
  num_priv = len(s.priv_cardinalities)
  return dict(
    w_h=normal((s.d,), 1 / math.sqrt(s.d)),
    bias=normal((), 0.1),
    w_priv=tuple(normal((k,), 0.5) for k in s.priv_cardinalities),
    emb=tuple(normal((k, s.embed_dim), 0.3) for k in s.priv_cardinalities),
    W1_h=normal((s.d, h1), math.sqrt(2 / s.d)),
    W1_priv=tuple(
      normal((s.embed_dim, h1), math.sqrt(2 / (s.embed_dim * num_priv)))
      for _ in s.priv_cardinalities
    ),
    b1=normal((h1,), 0.1),
    W2=normal((h1, h2), math.sqrt(2 / h1)),
    b2=normal((h2,), 0.1),
    w3=normal((h2,), 1 / math.sqrt(h2)),
    b3=normal((), 0.1),
  )


def make_apply(s: Shape, plain: bool = False):
  """device_logit(params, h [d], x_priv [P] int32) -> scalar.

  The first DNN layer factored, `W1_h h + sum_j (E_j W1_j)[x_j]`, or with `plain` the same
  function written as a user would: concatenate [h, e(x)], then multiply by the stacked W1
  (same parameters, same logit up to float32 rounding).
  """
  sf = s.num_server_fields * s.embed_dim

  def apply(p, h, x):
    num_priv = len(p['emb'])
    e = [p['emb'][j][x[j]] for j in range(num_priv)]
    lin = h @ p['w_h'] + sum(p['w_priv'][j][x[j]] for j in range(num_priv)) + p['bias']
    fields = jnp.concatenate([h[:sf].reshape(s.num_server_fields, s.embed_dim), jnp.stack(e)])
    tot = fields.sum(0)
    fm = 0.5 * jnp.sum(tot * tot - jnp.sum(fields * fields, 0))
    if plain:
      w1 = jnp.concatenate([p['W1_h'], *p['W1_priv']], axis=0)  # [d + P * E, h1]
      a1 = jnp.concatenate([h, *e]) @ w1 + p['b1']
    else:
      a1 = (
        h @ p['W1_h']
        + sum((p['emb'][j] @ p['W1_priv'][j])[x[j]] for j in range(num_priv))
        + p['b1']
      )
    a2 = jax.nn.relu(jax.nn.relu(a1) @ p['W2'] + p['b2'])
    return lin + fm + a2 @ p['w3'] + p['b3']

  return apply


def bce(apply, p, h, x, y):
  z = apply(p, h, x)
  return jnp.logaddexp(0.0, z) - y * z


def median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_flops_per_second(repeats: int, n: int = 2048, dtype=jnp.float32) -> float:
  """Dense n^3 matmul rate; `dtype` inputs summed in float32."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(n, n)), dtype)
  b = jnp.asarray(rng.normal(size=(n, n)), dtype)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  return 2 * n**3 / median_time(lambda: dot(a, b), max(repeats, 10))
