"""Likelihoods of what a randomized defence sends, for the adaptive EXACT (pure jnp).

A randomized defence (`splitjax.defenses`: ``max_norm``, ``marvell``, ``quantize_stochastic``)
turns the gradient ``g_c`` a candidate pair ``c`` would give into a random observation ``o``. The
adaptive attack scores every pair by the negative log-likelihood ``-log p(o | c)`` of what the
server saw (and adds the log prior), so the defence's noise model is used, not ignored:

- ``max_norm`` (no clip): ``o = g_c + N(0, v_c I)``, ``v_c = max(G^2 - ||g_c||^2, 0) / d``, with
  ``G^2`` the batch's largest squared row norm. The variance depends on the candidate, so the
  log-determinant ``(d / 2) log v_c`` enters: a candidate whose norm is near ``G`` must explain
  ``o`` with little noise.
- ``marvell`` (no clip): ``o = g_c + N(0, Sigma_y)``, ``Sigma_y = (l1_y - l2_y) u u^T + l2_y I``
  with ``u = Delta / ||Delta||`` and the four scalars of the batch; ``-log p`` is
  ``((||r||^2 - (r.u)^2) / l2_y + (r.u)^2 / l1_y + log l1_y + (d - 1) log l2_y) / 2``,
  ``r = o - g_c``.
- ``quantize_stochastic:BITS`` (after the clip, no noise): each coordinate is rounded to one of
  its two neighbouring grid levels over ``[-C, C]`` with probability one minus its distance to it
  (in grid steps), independently: ``-log p = -sum_i log(1 - |q_i - u_i|)``.

What the batch-dependent ones need besides ``o`` comes per user in ``info [U, k]``
(`info_size`): ``G^2`` for max_norm; ``u`` and ``(l1_0, l2_0, l1_1, l2_1)`` for Marvell. The
attack binary fills it either with what the device computed (white-box: the attacker's most
knowledge, though not always its best score: an exact ``lambda2 = 0`` meets float32 recomputation
error under the floor) or with estimates from what the server saw (`experiments.defending`,
`splitjax.defenses.marvell_estimate`).

Variances are floored at ``VAR_FLOOR`` times the observation's mean squared coordinate (a row at
the batch maximum gets no max_norm noise, and Marvell gives a one-class batch none), and each
rounding probability at ``PROB_FLOOR``, so the float32 recomputation of the true pair never
scores -inf.
"""

import jax.numpy as jnp

# The smallest variance per coordinate, relative to mean(o^2): far below any defence's noise,
# far above float32 recomputation error.
VAR_FLOOR = 1e-8
PROB_FLOOR = 1e-6

NAMES = ("max_norm", "marvell", "quantize_stochastic")


def info_size(name: str, dim: int) -> int:
  """Columns of the per-user side information a defence's likelihood reads (>= 1)."""
  if name == "max_norm":
    return 1
  if name == "marvell":
    return dim + 4
  return 1  # quantize_stochastic needs none (one unused column keeps the shapes uniform)


def _floor(o):
  return VAR_FLOOR * jnp.mean(jnp.square(o), axis=-1) + jnp.finfo(o.dtype).tiny


def max_norm_nll(o, g_cand, g_max_sq):
  """``-log p(o | c) - (d/2) log(2 pi)`` under max_norm: o [U, d], g_cand [U, B, L, d],
  g_max_sq [U] -> [U, B, L]."""
  dim = o.shape[-1]
  sq = jnp.sum(jnp.square(g_cand), axis=-1)
  floor = _floor(o)[:, None, None]
  var = jnp.maximum(g_max_sq[:, None, None] - sq, 0.0) / dim + floor
  r2 = jnp.sum(jnp.square(o[:, None, None, :] - g_cand), axis=-1)
  return 0.5 * r2 / var + 0.5 * dim * jnp.log(var)


def marvell_nll(o, g_cand, info):
  """``-log p(o | c) - (d/2) log(2 pi)`` under Marvell: o [U, d], g_cand [U, B, 2, d], info
  [U, d + 4] (``u``, then ``l1_0, l2_0, l1_1, l2_1``) -> [U, B, 2]; label ``y`` is the pair's
  last axis (the label the device trained on, which chose the covariance)."""
  dim = o.shape[-1]
  unit, lams = info[:, :dim], info[:, dim:]
  floor = _floor(o)[:, None]
  l1 = jnp.stack([lams[:, 0], lams[:, 2]], axis=-1) + floor  # [U, 2]
  l2 = jnp.stack([lams[:, 1], lams[:, 3]], axis=-1) + floor
  r = o[:, None, None, :] - g_cand
  along = jnp.einsum("ubld,ud->ubl", r, unit)
  r2 = jnp.sum(jnp.square(r), axis=-1)
  l1, l2 = l1[:, None, :], l2[:, None, :]
  quad = (r2 - jnp.square(along)) / l2 + jnp.square(along) / l1
  return 0.5 * (quad + jnp.log(l1) + (dim - 1) * jnp.log(l2))


def quantize_stochastic_nll(o, g_cand, l2_clip_norm, bits: int):
  """``-log P(o | c)`` under stochastic rounding to ``2^bits`` levels over ``[-C, C]``: o [U, d]
  (the levels sent), g_cand [U, B, L, d] (the candidates' clipped gradients) -> [U, B, L]."""
  levels = 2**bits - 1
  c = jnp.asarray(l2_clip_norm, o.dtype)
  to_grid = lambda x: (jnp.clip(x, -c, c) + c) / (2 * c) * levels
  q = jnp.round(to_grid(o))[:, None, None, :]
  u = to_grid(g_cand)
  p = jnp.clip(1.0 - jnp.abs(q - u), PROB_FLOOR, 1.0)
  return -jnp.sum(jnp.log(p), axis=-1)


def nll(defense, o, g_cand, info, l2_clip_norm):
  """The negative log-likelihood [U, B, L] of `o` [U, d] under the randomized `defense` (a
  `splitjax.defenses.Defense`) for the candidates' gradients `g_cand` [U, B, L, d]."""
  if defense.name == "max_norm":
    return max_norm_nll(o, g_cand, info[:, 0])
  if defense.name == "marvell":
    return marvell_nll(o, g_cand, info)
  if defense.name == "quantize_stochastic":
    return quantize_stochastic_nll(o, g_cand, l2_clip_norm, int(defense.param))
  raise ValueError(f"no likelihood for {defense.text()}")
