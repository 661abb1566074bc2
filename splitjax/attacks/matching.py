"""Pieces of the optimisation attacks (`optimize`, `hybrid`): objectives, simulators, refinement.

A simulator `(params, h [d], x [P] int32, dense [Pd]) -> [L, d]` gives what the device would have
sent for an integer candidate and dense values (`GradientSimulator`: the cut gradient of every
label; `activations.ActivationSimulator`: the activation); `refine_pairs` fits the dense features
of fixed (candidate, label) pairs by descent on an objective of `OBJECTIVES`.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax.attacks import checks
from splitjax.attacks import scoring

DEFAULT_LEARNING_RATE = 0.05
DEFAULT_NUM_STEPS = 200


def squared_l2(g_obs: jax.Array, g_sim: jax.Array) -> jax.Array:
  """`||g_sim - g_obs||^2` over the last axis (broadcasting): smooth, same ranking as l2."""
  return jnp.sum(jnp.square(g_sim - g_obs), axis=-1)


def cosine_objective(g_obs: jax.Array, g_sim: jax.Array) -> jax.Array:
  """`1 - cos(g_obs, g_sim)` over the last axis with a finite gradient at zero vectors."""
  dot = jnp.sum(g_obs * g_sim, axis=-1)
  norms = scoring.safe_norm(g_obs) * scoring.safe_norm(g_sim)
  tiny = jnp.finfo(dot.dtype).tiny
  return 1.0 - jnp.where(norms > tiny, dot / jnp.maximum(norms, tiny), 0.0)


# Name -> pure objective `(g_obs [..., d], g_sim [..., d]) -> [...]` that the optimiser minimises.
# 'l2' minimises the squared distance (the same minimiser, smoother); results report the distance.
OBJECTIVES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  'l2': squared_l2,
  'cosine': cosine_objective,
}


def to_distance(distance: str, objective_value: jax.Array) -> jax.Array:
  """Objective value -> the reported distance (`scoring.DISTANCES[distance]`)."""
  if distance == 'l2':
    return jnp.sqrt(jnp.maximum(objective_value, 0.0))
  return objective_value


def where_rows(mask: jax.Array, new, old):
  """Per-row select on pytrees whose leaves have `mask`'s leading axis."""

  def sel(a, b):
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b)

  return jax.tree.map(sel, new, old)


@functools.cache
def default_optimizer(
  learning_rate: float = DEFAULT_LEARNING_RATE, num_steps: int = DEFAULT_NUM_STEPS
) -> optax.GradientTransformation:
  """Adam whose step decays from `learning_rate` to 0 along a cosine over `num_steps` steps.

  Cached: the same arguments return the same object, so compiled attacks are reused.
  """
  return optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1)))


class GradientSimulator:
  """`(params, h [d], x [P] int32, dense [Pd]) -> [2, d]`: the cut gradient for labels 0 and 1.

  `(sigmoid(z) - y) dz/dh` with `z = device_apply(params, h, x, dense)` (binary cross-entropy), one
  reverse pass for both labels. Hashable by `device_apply`, so compiled attacks are cached.
  """

  num_labels = 2

  def __init__(self, device_apply: Callable[..., jax.Array]):
    self.device_apply = device_apply

  def __call__(self, params, h, x, dense):
    z, v = jax.value_and_grad(lambda hh: self.device_apply(params, hh, x, dense))(h)
    a = scoring.loss_factors(z)  # l'(z, 0), l'(z, 1)
    return a[:, None] * v[None, :]

  def __hash__(self):
    return hash((GradientSimulator, self.device_apply))

  def __eq__(self, other):
    return isinstance(other, GradientSimulator) and other.device_apply is self.device_apply


class OneHotApply:
  """`(params, h, x [P] int32, dense) -> logit` from a soft apply (one-hot probabilities)."""

  def __init__(self, soft_apply, cards):
    self.soft_apply, self.cards = soft_apply, cards

  def __call__(self, params, h, x, dense):
    probs = tuple(jax.nn.one_hot(x[j], k, dtype=h.dtype) for j, k in enumerate(self.cards))
    return self.soft_apply(params, h, probs, dense)

  def __hash__(self):
    return hash((OneHotApply, self.soft_apply, self.cards))

  def __eq__(self, other):
    return (
      isinstance(other, OneHotApply)
      and other.soft_apply is self.soft_apply
      and other.cards == self.cards
    )


def stratified_starts(key: jax.Array, num: int, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """`num` points of the box `[lo, hi]^Pd`, one per stratum of each axis (Latin hypercube).

  Returns [num, Pd]: along every axis the points fall in distinct slices `[i/num, (i+1)/num)`.
  """
  pd = lo.shape[0]
  k_perm, k_u = jax.random.split(key)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num))(jax.random.split(k_perm, max(pd, 1)))
  u = jax.random.uniform(k_u, (num, pd), lo.dtype)
  frac = (perms[:pd].T.astype(lo.dtype) + u) / num
  return lo + (hi - lo) * frac


def refine_pairs(
  simulate, objective, tx, num_steps: int, params, h, g, x, label, dense0, clip, lo, hi
):
  """Optimises the dense features of M fixed (candidate, label) pairs of one user.

  Args:
    x: [M, P] int32; label: [M] int32 (index into the simulator's labels); dense0: [M, Pd].

  Returns:
    (dense [M, Pd], objective [M]) at each pair's best-so-far point (the start included).
  """

  def loss(d, xi, li):
    obs = scoring.clip_rows(simulate(params, h, xi, d), clip)[li]
    return objective(g, obs)

  if num_steps == 0 or dense0.shape[-1] == 0:
    return dense0, jax.vmap(loss)(dense0, x, label)
  vg = jax.vmap(jax.value_and_grad(loss))
  state0 = jax.vmap(tx.init)(dense0)

  def step(carry, _):
    d, st, best_l, best_d = carry
    obj, grads = vg(d, x, label)
    better = obj < best_l
    best_d = where_rows(better, d, best_d)
    best_l = jnp.where(better, obj, best_l)
    upd, st = jax.vmap(tx.update)(grads, st, d)
    d = jnp.clip(optax.apply_updates(d, upd), lo, hi)
    return (d, st, best_l, best_d), None

  init = (dense0, state0, jnp.full(dense0.shape[:1], jnp.inf, g.dtype), dense0)
  (d, _, best_l, best_d), _ = jax.lax.scan(step, init, None, length=num_steps)
  last = jax.vmap(loss)(d, x, label)
  better = last < best_l
  return where_rows(better, d, best_d), jnp.where(better, last, best_l)


def check_fit(num_dense, dense_bounds, l2_clip_norm, distance, num_steps, num_restarts, dtype):
  """Checks the arguments `optimize` and `hybrid` share; returns (num_dense, lo, hi, clip)."""
  checks.count(num_dense, 'num_dense')
  checks.name_in(distance, OBJECTIVES, 'distance')
  checks.count(num_steps, 'num_steps', 0)
  checks.count(num_restarts, 'num_restarts', 1)
  num_dense, lo, hi = checks.dense_box(num_dense, dense_bounds, dtype)
  clip = checks.clip_norm(l2_clip_norm)
  return num_dense, lo, hi, np.asarray(math.inf if clip is None else clip, dtype)
