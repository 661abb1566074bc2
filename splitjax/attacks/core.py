"""EXACT's pure core: the pair scores of a block of users, and `exact_user` for one user.

For binary cross-entropy `l'(z, y) = sigmoid(z) - y`, so `dz/dh` depends on the private features
but not on the label: one reverse-mode pass per private candidate serves every candidate label.
`score_chunk` computes `z` and `dz/dh` for every candidate of a block of users (`vmap` over
candidates inside `vmap` over users, so the parts of the model that depend on `h` only, e.g.
`W_h h`, are computed once per user), simulates what the device would have sent for every
`(candidate, label)` pair — clipped with the public clip norm when the attack is clip-aware — and
selects the answer (`scoring.select`). `exact_user` is that computation for one user, jnp in and
out, for callers who jit, vmap or differentiate EXACT; `exact` (enumeration.py) is the host runner
over many users built on the same function.
"""

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from splitjax.attacks import checks
from splitjax.attacks import scoring
from splitjax.attacks import screen as screen_lib


class Options(NamedTuple):
  """Static options of an EXACT computation; part of its compilation key."""

  cardinalities: tuple[int, ...]
  num_labels: int
  top_k: int
  distance: str
  clip: bool  # l2_clip_norm given (its value is a traced argument)
  clip_aware: bool
  bayes: bool  # noise_stddev > 0 given (its value is a traced argument)
  per_user_prior: bool
  per_user_params: bool  # device_params has a leading version axis, picked by param_index
  candidates_per_block: int
  num_blocks: int
  chunks_per_call: int
  screen_dtype: str | None = None  # a SCREEN_DTYPES name: matmuls of the full scoring pass
  screen_top: int = screen_lib.DEFAULT_SCREEN_TOP
  # splitjax.defenses.AttackModel: the adaptive attack simulates the device's defences (None: none)
  defense: Any = None


def candidate_gradients(device_apply, opts: Options, params, h, table, low_precision: bool):
  """z [U, B] and dz/dh [U, B, d] of candidates `table` ([B, P], or [U, B, P] per user)."""
  val_grad = jax.value_and_grad(device_apply, argnums=1)
  if low_precision:
    assert opts.screen_dtype is not None  # low precision only with a screen
    val_grad = screen_lib.low_precision_matmuls(
      val_grad, screen_lib.SCREEN_DTYPES[opts.screen_dtype]
    )
  # Inner vmap: candidates, with h unbatched (h-only work is shared); outer vmap: users.
  per_user = jax.vmap(val_grad, in_axes=(None, None, 0))
  params_axis = 0 if opts.per_user_params else None
  table_axis = 0 if table.ndim == 3 else None
  return jax.vmap(per_user, in_axes=(params_axis, 0, table_axis))(params, h, table)


def likelihood_scoring(opts: Options) -> bool:
  """Whether the pairs are scored by a randomized defence's likelihood (`likelihoods`)."""
  return opts.defense is not None and opts.defense.likelihood is not None


def tie_posterior(opts: Options) -> bool:
  """Whether ties are answered by the prior-weighted choice among them: the adaptive attack of
  deterministic defences (a noise-free observation that several pairs reproduce exactly; the
  posterior is the prior restricted to the tied pairs, `scoring.tie_log_posterior`)."""
  return (
    opts.defense is not None
    and opts.defense.likelihood is None
    and not opts.bayes
    and opts.top_k == 1
    and opts.screen_dtype is None
  )


def _pair_scores(opts: Options, z, v, g, clip_norm, info=None):
  clip = opts.clip and opts.clip_aware
  return scoring.pair_scores(
    z,
    v,
    g,
    clip_norm,
    distance=opts.distance,
    clip=clip,
    bayes=opts.bayes,
    defense=opts.defense,
    info=info,
  )


def _simulate_block(device_apply, opts: Options, params, h, g, table, clip_norm, info=None):
  """[U, B, L] scores of one block of candidates `table` [B, P] (a screen with a screen dtype)."""
  if opts.screen_dtype is not None:
    z, v = candidate_gradients(device_apply, opts, params, h, table, low_precision=True)
    clip = opts.clip and opts.clip_aware
    return screen_lib.screen_scores(z, v, g, clip_norm, distance=opts.distance, clip=clip)
  z, v = candidate_gradients(device_apply, opts, params, h, table, low_precision=False)
  return _pair_scores(opts, z, v, g, clip_norm, info)


def _rescore(device_apply, opts: Options, params, h, g, table, clip_norm, top, num_pairs):
  """Full-precision scores of the screen's best pairs `top` [U, m].

  Returns ([U, num_pairs] scores: the rescored pairs at their full-precision scores, +inf
  elsewhere; [U, m] the rescored scores).
  """
  num_users = h.shape[0]
  num_labels = opts.num_labels
  z, v = candidate_gradients(
    device_apply, opts, params, h, table[top // num_labels], low_precision=False
  )  # [U, m], [U, m, d]
  pair = _pair_scores(opts, z, v, g, clip_norm)  # [U, m, L]
  exact_scores = jnp.take_along_axis(pair, (top % num_labels)[..., None], axis=2)[..., 0]
  rows = jnp.arange(num_users)[:, None]
  scores = jnp.full((num_users, num_pairs), jnp.inf, exact_scores.dtype)
  return scores.at[rows, top].set(exact_scores), exact_scores


def score_chunk(
  device_apply,
  opts: Options,
  params,
  h,
  g,
  param_index,
  log_prior,
  table,
  clip_norm,
  noise_stddev,
  screen_rtol,
  screen=None,
  return_scores: bool = False,
  info=None,
):
  """Attacks one chunk of U users. table: [num_blocks * B, P]. Returns a dict of [U, ...] arrays.

  Args:
    params: the device parameters ([V, ...] leaves picked by `param_index` [U] when
      `opts.per_user_params`); h, g: [U, d]; log_prior: [1 or U, C, L]; clip_norm, noise_stddev,
      screen_rtol: scalars.
    screen: with `opts.screen_dtype`, None on the first call (returns {'screen': [U, C*L]}
      low-precision scores), then `(top, cutoff, non_finite)` from `screen.screen_top` (rescores
      and answers among the rescored pairs, with a `screen_fallback` flag per user).
    return_scores: also return `scores` [U, C*L], the score every pair is ranked by (the
      distance, or the negative unnormalised log posterior in the Bayes variant).
    info: [U, k] the per-user side information of a randomized defence's likelihood
      (`opts.defense.likelihood`; `likelihoods.info_size`), else None. Then the pairs are
      scored by that likelihood plus `log_prior` (`opts.bayes` is on) and `distances` is NaN.
  """
  num_users = h.shape[0]
  if opts.per_user_params:  # each user's own parameter version: [V, ...] -> [U, ...]
    params = jax.tree.map(lambda leaf: leaf[param_index], params)
  num_cand = math.prod(opts.cardinalities)
  num_labels = opts.num_labels
  if screen is not None:
    top, cutoff, non_finite = screen
    dist, rescored = _rescore(
      device_apply, opts, params, h, g, table[:num_cand], clip_norm, top, num_cand * num_labels
    )
  else:
    simulate = functools.partial(
      _simulate_block, device_apply, opts, params, h, g, clip_norm=clip_norm, info=info
    )
    if opts.num_blocks == 1:
      dist = simulate(table)
    else:
      blocks = table.reshape(opts.num_blocks, opts.candidates_per_block, -1)
      dist = jax.lax.map(simulate, blocks)  # [nb, U, B, L]
      dist = jnp.moveaxis(dist, 0, 1).reshape(num_users, -1, num_labels)
    dist = dist[:, :num_cand].reshape(num_users, num_cand * num_labels)  # drop padded candidates
    if opts.screen_dtype is not None:
      return dict(screen=dist)

  log_post = None
  if likelihood_scoring(opts):
    log_post = log_prior.reshape(log_prior.shape[0], -1) - dist  # dist: -log p(g | pair)
    score = -log_post
    scale = jnp.ones((num_users,), dist.dtype)  # ties within ~1e-6 nats
    dist = jnp.full_like(dist, jnp.nan)  # no distance is scored
  elif opts.bayes:
    inv_var = 1.0 / (2.0 * jnp.square(noise_stddev))
    log_post = log_prior.reshape(log_prior.shape[0], -1) - dist * inv_var  # unnormalised
    score = -log_post
    scale = jnp.sum(jnp.square(g), axis=-1) * inv_var
  else:
    score = dist
    scale = scoring.DISTANCES[opts.distance](g, jnp.zeros_like(g))
    if tie_posterior(opts):
      log_post = scoring.tie_log_posterior(score, scale, log_prior.reshape(log_prior.shape[0], -1))
  out, best, tol = scoring.select(
    score,
    dist,
    scale,
    table,
    opts.cardinalities,
    num_labels,
    top_k=opts.top_k,
    log_post=log_post,
    squared=opts.bayes,
  )
  if screen is not None:
    # The best pair left out enters the gap at its screening score; non-finite screening scores
    # (overflow) void the error bound: always redone.
    out['gap'] = jnp.minimum(out['gap'], cutoff - best)
    ok = screen_lib.conclusive(
      best,
      tol,
      scale,
      cutoff,
      rescored,
      screen_rtol,
      distance=opts.distance,
      clip=opts.clip and opts.clip_aware,
      top_k=opts.top_k,
    )
    out['screen_fallback'] = ~ok | non_finite
  if return_scores:
    out['scores'] = score
  return out


class ExactUserResult(NamedTuple):
  """EXACT's answer for one user (`exact_user`); every field a jnp array.

  Attributes:
    features: [P] int32, the recovered private features (nearest pair, the top-k vote, or the
      marginal-posterior argmax with noise).
    label: int32 scalar, the recovered label.
    scores: [C, L], the score each (candidate, label) pair is ranked by, rows in
      `candidate_table(cardinalities)` order, label fastest: the distance under `distance`, or
      with noise the negative unnormalised log posterior. Differentiable in `g_obs`,
      `device_params` and the traced `l2_clip_norm`, `noise_stddev`, `log_prior`.
    distance: scalar, the distance of the best pair (l2 with noise).
    num_ties: int32 scalar, pairs within the tie tolerance of the best score (1 = unique).
    gap: scalar, second-best minus best score.
    map_features: [P] int32, the features of the single best pair.
    map_label: int32 scalar, its label.
    feature_posteriors: tuple of P arrays [K_j] (with noise, or the top-k vote shares), else
      None.
    label_posterior: [L] or None, likewise.
  """

  features: jax.Array
  label: jax.Array
  scores: jax.Array
  distance: jax.Array
  num_ties: jax.Array
  gap: jax.Array
  map_features: jax.Array
  map_label: jax.Array
  feature_posteriors: tuple[jax.Array, ...] | None
  label_posterior: jax.Array | None


def exact_user(
  device_apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  *,
  num_labels: int = 2,
  top_k: int = 1,
  l2_clip_norm: jax.typing.ArrayLike | None = None,
  noise_stddev: jax.typing.ArrayLike | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  clip_aware: bool = True,
  distance: str = 'l2',
) -> ExactUserResult:
  """EXACT for ONE user, as a pure function of jnp arrays: jit it, vmap it, differentiate it.

  The same pair scores and selection as `exact` (which stays the host runner: it chunks large
  candidate domains, pads, shards users over devices and checks values); here every candidate
  is scored at once, so the domain must fit in memory. `jax.jit(jax.vmap(exact_user-partial))`
  over users equals `exact(...)` (ties broken by the lowest candidate index in both).

  Static (Python values; a change retraces): `device_apply`, `cardinalities`, `num_labels`,
  `top_k`, `clip_aware`, `distance`, and whether `l2_clip_norm`, `noise_stddev` and `log_prior`
  are None. Traceable: `device_params`, `h`, `g_obs` and the values of `l2_clip_norm`,
  `noise_stddev` (given: Bayes scoring, which assumes it > 0) and `log_prior`, so a caller can
  vmap over clip norms or noise levels. Shapes are checked at trace time (`AttackError`, a
  ValueError); NaN or inf values are not (the runner checks them).

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit`, as for `exact`.
    device_params: the device model's parameters.
    h: [d] the user's cut activation.
    g_obs: [d] the gradient the server received.
    cardinalities: P ints >= 1 (checked against `device_apply.priv_cardinalities` when present).
    num_labels: 2.
    top_k: >= 1; with top_k > 1 and no noise, the per-feature majority vote of the top_k pairs.
    l2_clip_norm: the device's clip norm C, or None (no clipping).
    noise_stddev: the Gaussian noise's standard deviation per coordinate (noise_multiplier * C),
      or None (distance scoring).
    log_prior: [C*L] or [C, L] log prior over pairs (Bayes scoring only), or None (uniform).
    clip_aware: simulate the clip before scoring (False: the paper's clip-unaware scoring).
    distance: 'l2' or 'cosine' ('l2' with noise).

  Returns:
    An `ExactUserResult`.

  Raises:
    AttackError: bad shapes or static arguments.
  """
  cards = checks.cardinalities(cardinalities, device_apply)
  if isinstance(num_labels, bool) or num_labels != 2:
    raise checks.AttackError(f'num_labels must be 2 (binary cross-entropy), got {num_labels!r}.')
  k = checks.positive_int(top_k, 'top_k', allow_none=False)
  assert k is not None  # allow_none=False
  checks.name_in(distance, scoring.DISTANCES, 'distance')
  bayes = noise_stddev is not None
  if bayes and distance != 'l2':
    raise checks.AttackError(
      f'the Bayes variant scores by Gaussian likelihood: distance must be "l2", got {distance!r}.'
    )
  if log_prior is not None and not bayes:
    raise checks.AttackError('log_prior is used only with noise_stddev (Bayes scoring).')
  h, g_obs = jnp.asarray(h), jnp.asarray(g_obs)
  if not jnp.issubdtype(h.dtype, jnp.floating):
    h = h.astype(jnp.float32)
  g_obs = g_obs.astype(h.dtype)
  if h.ndim != 1 or g_obs.shape != h.shape:
    raise checks.AttackError(
      f'h and g_obs must be [d] vectors of one user with the same shape, got '
      f'{h.shape} and {g_obs.shape}; vmap exact_user over users.'
    )
  num_cand = math.prod(cards)
  num_pairs = num_cand * num_labels
  if bayes:
    prior = (
      jnp.zeros((1, num_pairs), h.dtype) if log_prior is None else jnp.asarray(log_prior, h.dtype)
    )
    if prior.shape not in ((1, num_pairs), (num_pairs,), (num_cand, num_labels)):
      raise checks.AttackError(
        f'log_prior must be [C*L] = ({num_pairs},) or [C, L] = '
        f'({num_cand}, {num_labels}), got {prior.shape}.'
      )
    prior = prior.reshape(1, num_pairs)
  else:
    prior = jnp.zeros((1, 1), h.dtype)
  opts = Options(
    cardinalities=cards,
    num_labels=num_labels,
    top_k=k,
    distance=distance,
    clip=l2_clip_norm is not None,
    clip_aware=bool(clip_aware),
    bayes=bayes,
    per_user_prior=False,
    per_user_params=False,
    candidates_per_block=num_cand,
    num_blocks=1,
    chunks_per_call=1,
  )
  table = jnp.asarray(scoring.candidate_table(cards))
  clip = jnp.asarray(jnp.inf if l2_clip_norm is None else l2_clip_norm, h.dtype)
  noise = jnp.asarray(1.0 if noise_stddev is None else noise_stddev, h.dtype)
  out = score_chunk(
    device_apply,
    opts,
    device_params,
    h[None],
    g_obs[None],
    None,
    prior,
    table,
    clip,
    noise,
    jnp.zeros((), h.dtype),
    return_scores=True,
  )
  posts = out.get('feature_posteriors')
  return ExactUserResult(
    features=out['features'][0],
    label=out['labels'][0],
    scores=out['scores'][0].reshape(num_cand, num_labels),
    distance=out['distances'][0],
    num_ties=out['num_ties'][0],
    gap=out['gap'][0],
    map_features=out['map_features'][0],
    map_label=out['map_labels'][0],
    feature_posteriors=None if posts is None else tuple(p[0] for p in posts),
    label_posterior=None if 'label_posterior' not in out else out['label_posterior'][0],
  )
