"""EXACT over every release of a user: the per-release log-likelihoods summed (partial likelihood).

A training example sends its cut gradient once per epoch (FSL: once per local step), each time
under the device parameters of that step. `exact` scores one release; `exact_releases` scores a
user's (candidate, label) pair by the sum over the user's releases r of the Gaussian
log-likelihood of `g_r` given the pair, each under the parameters `theta_r` that produced it:

    log p(x, y | g_1..g_k) = log prior(x, y) - sum_r ||g_r - clip(g(x, y; h_r, theta_r))||^2
                             / (2 sigma^2 C^2) + const.

This is a *partial likelihood*: it treats `theta_r` as fixed, known inputs. It is the exact
likelihood of the cut releases only when the parameters at each release depend on the example
only through earlier released outputs (device DP-SGD on: the device's update is itself a
privatized release); without device DP-SGD the parameters also carry the example's unprotected
updates, and the sum ignores that channel, so its gain is then reported against the prior-only
attacker, not against a DP bound. With k releases of one fixed model the sum is the sufficient
statistic: for two hypotheses at distance d the accuracy is Phi(sqrt(k) d / (2 sigma C)).

Without noise (`noise_stddev` None) the pairs are ranked by the summed squared distance (the true
pair gives 0 on every release).
"""

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks
from splitjax.attacks import core
from splitjax.attacks import scoring

# (rows x candidates x d) floats simulated per jitted call (about 64 MiB of float32 dz/dh).
_CALL_BUDGET = 1 << 24
_USERS_PER_SELECT = 1024


class ReleasesResult(NamedTuple):
  """The answer for each of U users from all their releases (numpy arrays on the host).

  Attributes:
    users: [U] int, the distinct user ids of `user_index`, ascending (the rows of `result`).
    releases: [U] int, the number of releases combined for each user.
    result: a `scoring.MatchResult` per user (features, labels, posteriors with noise, the joint
      MAP pair, ties, gap); `distances` is the root of the summed squared distance of the best
      pair.
  """

  users: np.ndarray
  releases: np.ndarray
  result: scoring.MatchResult


def pair_options(
  cards: tuple[int, ...], *, clip: bool, clip_aware: bool, per_user_params: bool
) -> core.Options:
  """The `core.Options` of a full table of squared l2 distances to every (candidate, label) pair
  in one block (`squared_distances`; `tracking` uses it too)."""
  return core.Options(
    cardinalities=cards,
    num_labels=2,
    top_k=1,
    distance='l2',
    clip=clip,
    clip_aware=clip_aware,
    bayes=True,
    per_user_prior=False,
    per_user_params=per_user_params,
    candidates_per_block=math.prod(cards),
    num_blocks=1,
    chunks_per_call=1,
  )


@functools.partial(jax.jit, static_argnames=('device_apply', 'opts'))
def squared_distances(device_apply, opts: core.Options, params, h, g, index, table, clip_norm):
  """[R, C * L] squared l2 distance of each release to the (clipped) gradient of every pair."""
  if opts.per_user_params:
    params = jax.tree.map(lambda leaf: leaf[index], params)
  z, v = core.candidate_gradients(device_apply, opts, params, h, table, low_precision=False)
  clip = opts.clip and opts.clip_aware
  d2 = scoring.pair_scores(z, v, g, clip_norm, distance='l2', clip=clip, bayes=True)
  return d2.reshape(h.shape[0], -1)


@functools.partial(jax.jit, static_argnames=('cardinalities', 'bayes'))
def select_answers(summed, sum_g2, log_prior, table, noise_stddev, cardinalities, bayes):
  """The answer of each user from its summed squared distances [U, C * L]."""
  if bayes:
    inv_var = 1.0 / (2.0 * jnp.square(noise_stddev))
    log_post = log_prior - summed * inv_var
    score, scale = -log_post, sum_g2 * inv_var
  else:
    log_post, score, scale = None, summed, sum_g2
  out, _, _ = scoring.select(
    score, summed, scale, table, cardinalities, 2, top_k=1, log_post=log_post
  )
  if not bayes:  # the reported distance is the root of the summed squared distance
    out['distances'] = jnp.sqrt(out['distances'])
  return out


def _floor_pow2(n: int) -> int:
  return 1 << (int(n).bit_length() - 1)


def _ceil_pow2(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def _pad_rows(x: np.ndarray, pad: int) -> np.ndarray:
  """`x` with `pad` zero rows appended (padded users are dropped from the answers)."""
  return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x


def _add_rows(total: np.ndarray, position: np.ndarray, rows: np.ndarray) -> None:
  """`total[position[i]] += rows[i]` for every i (repeated positions summed; np.add.at's
  result, by sorting and `np.add.reduceat`)."""
  order = np.argsort(position, kind="stable")
  sorted_pos = position[order]
  starts = np.flatnonzero(np.r_[True, sorted_pos[1:] != sorted_pos[:-1]])
  total[sorted_pos[starts]] += np.add.reduceat(rows[order].astype(total.dtype), starts, axis=0)


def exact_releases(
  device_apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  *,
  user_index: jax.typing.ArrayLike,
  param_index: jax.typing.ArrayLike | None = None,
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  noise_multiplier: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  clip_aware: bool = True,
) -> ReleasesResult:
  """EXACT on every release of each user at once: the summed per-release log-likelihoods.

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit`, as for `exact` (hashable:
      a static argument of the jitted computation).
    device_params: the device parameters; with `param_index`, versions stacked along a leading
      axis of every leaf (`Transcript.device_params`).
    h: [R, d] the cut activation of each release.
    g_obs: [R, d] the gradient received in each release (after the DP transform).
    cardinalities: P ints, the private categorical domains.
    user_index: [R] ints, the user (e.g. `Transcript.example_index`) each release belongs to.
    param_index: optional [R] ints, the parameter version behind each release.
    l2_clip_norm: the public clip norm C, or None (no clipping).
    noise_stddev: the Gaussian noise's standard deviation per coordinate (sigma * C), or None
      (ranked by the summed squared distance).
    noise_multiplier: sigma instead of `noise_stddev` (not both).
    log_prior: [C*L] / [C, L] shared, or [U, C*L] / [U, C, L] per user in the order of
      `ReleasesResult.users` (noise only).
    clip_aware: clip each simulated gradient like the device (False: the paper's scoring).

  Returns:
    A `ReleasesResult`.

  Raises:
    AttackError: bad shapes or values.
  """
  cards = checks.cardinalities(cardinalities, device_apply)
  stddev = checks.noise_stddev(noise_stddev, noise_multiplier, l2_clip_norm)
  stddev, bayes = checks.noise(stddev, 'l2', log_prior)
  clip = checks.clip_norm(l2_clip_norm)
  h_np, g_np, dtype = checks.observations(h, g_obs)
  checks.same_shape(h_np, g_np)
  num_rows = h_np.shape[0]
  users_of = np.asarray(user_index)
  if users_of.shape != (num_rows,) or not np.issubdtype(users_of.dtype, np.integer):
    raise checks.AttackError(
      f'user_index must be [R] = ({num_rows},) ints, got shape {users_of.shape} '
      f'dtype {users_of.dtype}.'
    )
  users, position = np.unique(users_of, return_inverse=True)
  num_users, num_cand = len(users), math.prod(cards)
  num_pairs = num_cand * 2
  per_user_params = param_index is not None
  index = checks.param_index(param_index, device_params, num_rows) if per_user_params else None
  prior = np.zeros((1, num_pairs), np.float32)
  if log_prior is not None:
    prior_np, _ = checks.log_prior(log_prior, num_users, num_cand, 2)
    prior = prior_np.reshape(prior_np.shape[0], num_pairs)
  opts = pair_options(
    cards,
    clip=clip is not None and math.isfinite(clip),
    clip_aware=bool(clip_aware),
    per_user_params=per_user_params,
  )
  table = jnp.asarray(scoring.candidate_table(cards))
  clip_value = jnp.asarray(np.inf if clip is None else clip, dtype)
  params = jax.tree.map(jnp.asarray, device_params)

  # Sum each user's releases on the host, a block of rows per call (the last block padded). Block
  # sizes are powers of two, so inputs of other sizes reuse the compiled computation.
  cap = _floor_pow2(max(1, _CALL_BUDGET // max(1, num_cand * h_np.shape[1])))
  rows_per_call = min(cap, _ceil_pow2(num_rows))
  summed = np.zeros((num_users, num_pairs), np.float64)
  sum_g2 = np.zeros(num_users, np.float64)
  np.add.at(sum_g2, position, np.sum(np.square(g_np, dtype=np.float64), axis=1))
  for start in range(0, num_rows, rows_per_call):
    stop = min(start + rows_per_call, num_rows)
    pad = rows_per_call - (stop - start)
    hb, gb = h_np[start:stop], g_np[start:stop]
    ib = None if index is None else index[start:stop]
    if pad:
      hb = np.concatenate([hb, np.zeros((pad, hb.shape[1]), dtype)])
      gb = np.concatenate([gb, np.zeros((pad, gb.shape[1]), dtype)])
      ib = None if ib is None else np.concatenate([ib, np.zeros(pad, np.int32)])
    d2 = np.asarray(squared_distances(device_apply, opts, params, hb, gb, ib, table, clip_value))
    _add_rows(summed, position[start:stop], d2[: stop - start])

  outs = []
  users_per_call = min(_USERS_PER_SELECT, _ceil_pow2(num_users))
  for start in range(0, num_users, users_per_call):
    stop = min(start + users_per_call, num_users)
    pad = users_per_call - (stop - start)
    block_prior = prior if prior.shape[0] == 1 else _pad_rows(prior[start:stop], pad)
    out = select_answers(
      jnp.asarray(_pad_rows(summed[start:stop], pad), dtype),
      jnp.asarray(_pad_rows(sum_g2[start:stop], pad), dtype),
      jnp.asarray(block_prior, dtype),
      table,
      jnp.asarray(1.0 if stddev is None else stddev, dtype),
      cards,
      bayes,
    )
    outs.append(jax.tree.map(lambda x, n=stop - start: np.asarray(x)[:n], out))
  if not outs:
    result = scoring.MatchResult.empty(cards, 2, dtype, posteriors=bayes)
  else:
    merged = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
    result = scoring.MatchResult.from_outputs(merged)
  return ReleasesResult(users, np.bincount(position, minlength=num_users), result)
