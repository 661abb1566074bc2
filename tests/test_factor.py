"""The concat-matmul split (`splitjax.attacks.factor`): one function, h-only work out of vmap."""

import jax
import jax.numpy as jnp
import numpy as np

from splitjax import attacks
from splitjax.attacks import factor

D, E, CARDS, W = 12, 4, (3, 5, 2), 16
_rng = np.random.default_rng(0)
PARAMS = dict(
  emb=[jnp.asarray(_rng.normal(size=(k, E)), jnp.float32) for k in CARDS],
  W1=jnp.asarray(_rng.normal(size=(D + len(CARDS) * E, W)) / 4, jnp.float32),
  w2=jnp.asarray(_rng.normal(size=W), jnp.float32),
)


def plain_apply(p, h, x):
  """A head written the plain way: concatenate [h, e(x)], then one matmul."""
  e = [p["emb"][j][x[j]] for j in range(len(CARDS))]
  return jnp.tanh(jnp.concatenate([h, *e]) @ p["W1"]) @ p["w2"]


def stacked_apply(p, h, x):
  """A concatenation along an axis the matmul does not contract (left as it is)."""
  e = jnp.stack([p["emb"][j][x[j]] for j in range(len(CARDS))])  # [P, E]
  rows = jnp.concatenate([e, e[:1]], axis=0)  # [P + 1, E]: concatenated along rows
  return jnp.sum(rows @ p["W1"][:E]) + h @ p["W1"][:D, 0]


def _vmapped(fn):
  return jax.vmap(jax.value_and_grad(fn, argnums=1), in_axes=(None, None, 0))


def test_split_function_and_gradients_equal_the_original():
  h = jnp.asarray(_rng.normal(size=D), jnp.float32)
  table = jnp.asarray(attacks.candidate_table(CARDS))
  for fn in (plain_apply, stacked_apply):
    (z0, g0), (z1, g1) = (
      _vmapped(fn)(PARAMS, h, table),
      _vmapped(factor.split_concat_dots(fn))(PARAMS, h, table),
    )
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)


def _unbatched_dots(fn) -> int:
  """The h-sized matmuls left unbatched by the candidate vmap (one per user, not per candidate)."""
  h = jnp.zeros(D, jnp.float32)
  table = jnp.asarray(attacks.candidate_table(CARDS))
  jaxpr = jax.make_jaxpr(_vmapped(fn))(PARAMS, h, table).jaxpr
  return sum(
    1
    for eqn in jaxpr.eqns
    if eqn.primitive.name == "dot_general" and [v.aval.shape for v in eqn.invars] == [(D,), (D, W)]
  )


def test_the_h_part_of_a_concatenated_first_layer_runs_once_per_user():
  assert _unbatched_dots(plain_apply) == 0  # every candidate recomputes W_h h
  assert _unbatched_dots(factor.split_concat_dots(plain_apply)) == 1
  # and the backward pass transposes only the h block of W1 ([C, W] x [D, W]), not all of it
  jaxpr = jax.make_jaxpr(_vmapped(factor.split_concat_dots(plain_apply)))(
    PARAMS, jnp.zeros(D), jnp.asarray(attacks.candidate_table(CARDS))
  ).jaxpr
  widths = [e.invars[1].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert (D, W) in widths and (D + len(CARDS) * E, W) not in widths


def test_exact_through_the_split_recovers_the_truth_on_a_plain_head():
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(6, D)), jnp.float32)
  idx = rng.integers(0, np.prod(CARDS), 6)
  y = rng.integers(0, 2, 6)
  x = jnp.asarray(attacks.candidate_table(CARDS))[idx]

  def loss(hj, xj, yj):
    z = plain_apply(PARAMS, hj, xj)
    return -(yj * jax.nn.log_sigmoid(z) + (1 - yj) * jax.nn.log_sigmoid(-z))

  g = jax.vmap(jax.grad(loss))(h, x, jnp.asarray(y, jnp.float32))
  res = attacks.exact(factor.split_concat_dots(plain_apply), PARAMS, h, g, CARDS)
  np.testing.assert_array_equal(np.asarray(res.features), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(res.labels), y)
