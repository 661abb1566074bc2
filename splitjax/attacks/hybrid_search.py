"""`hybrid`: EXACT over the categorical features and the label, optimisation over the dense ones.

Every (candidate, label) pair is scored at `num_restarts` stratified starting points of the dense
box; the `num_refine` most promising pairs (all of them by default) then optimise their dense
features from their best start; the best pair wins (or, with noise, the argmax of each feature's
marginal posterior, as in EXACT's Bayes variant, with the dense features profiled out), selected by
the same `scoring.select` as EXACT. Without private dense features it reduces to EXACT.
`hybrid_core` takes any simulator (`activations.exact_activations` uses it for activations).

References:
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv:2305.12997 (EXACT; the hybrid is splitjax's extension).
"""

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitjax.attacks import checks
from splitjax.attacks import matching
from splitjax.attacks import runner
from splitjax.attacks import scoring

AttackError = checks.AttackError

DEFAULT_NUM_STARTS = 64  # stratified starts of the dense box per pair


# What `hybrid` returns: the one result type of the matching attacks, with `dense`.
HybridResult = scoring.MatchResult


class _HybridOptions(NamedTuple):
  cardinalities: tuple[int, ...]
  num_dense: int
  num_restarts: int
  num_steps: int
  num_refine: int
  refine_starts: int
  distance: str
  bayes: bool
  per_user_prior: bool


def _hybrid_user(
  simulate,
  opts: _HybridOptions,
  tx,
  params,
  h,
  g,
  key,
  log_prior,
  table,
  clip,
  noise_stddev,
  lo,
  hi,
):
  """One user: score every (candidate, label) pair at the starts, refine the best, answer."""
  objective = matching.OBJECTIVES['l2' if opts.bayes else opts.distance]
  num_labels = simulate.num_labels
  k_starts, k_refine = jax.random.split(key)
  starts = matching.stratified_starts(k_starts, opts.num_restarts, lo, hi)  # [R, Pd]

  def pair_losses(x, d):  # -> [L]
    return objective(g, scoring.clip_rows(simulate(params, h, x, d), clip))

  # Inner vmap: starts (h and x unbatched), outer: candidates -> [C, R, L].
  coarse = jax.vmap(lambda x: jax.vmap(lambda d: pair_losses(x, d))(starts))(table)
  best_start = jnp.argmin(coarse, axis=1)  # [C, L]
  obj = jnp.take_along_axis(coarse, best_start[:, None, :], axis=1)[:, 0]  # [C, L]
  obj = obj.reshape(-1)  # [C*L], label fastest
  dense = starts[best_start.reshape(-1)]  # [C*L, Pd]

  def score_of(o):
    if opts.bayes:
      return o / (2.0 * jnp.square(noise_stddev)) - log_prior
    return matching.to_distance(opts.distance, o)

  if opts.num_dense and opts.num_refine:
    _, idx = jax.lax.top_k(-score_of(obj), opts.num_refine)
    x_ref, l_ref, d_ref = table[idx // num_labels], (idx % num_labels).astype(jnp.int32), dense[idx]
    if opts.refine_starts:
      # Second stage: the short-listed pairs try a finer set of fresh stratified starts (the loss
      # jumps at ReLU kinks, so a pair's basin can be narrower than the first stage's spacing).
      more = matching.stratified_starts(k_refine, opts.refine_starts, lo, hi)  # [R2, Pd]

      def best_of(x, li, d0):
        cands = jnp.concatenate([d0[None], more])
        o = jax.vmap(lambda d: pair_losses(x, d)[li])(cands)
        return cands[jnp.argmin(o)]

      d_ref = jax.vmap(best_of)(x_ref, l_ref, d_ref)
    d_ref, o_ref = matching.refine_pairs(
      simulate, objective, tx, opts.num_steps, params, h, g, x_ref, l_ref, d_ref, clip, lo, hi
    )
    obj = obj.at[idx].set(o_ref)
    dense = dense.at[idx].set(d_ref)

  score = score_of(obj)
  if opts.bayes:
    scale = jnp.sum(jnp.square(g)) / (2.0 * jnp.square(noise_stddev))
  else:
    scale = scoring.DISTANCES[opts.distance](g, jnp.zeros_like(g))
  out, _, _ = scoring.select(
    score[None],
    (obj if opts.bayes else score)[None],
    scale[None],
    table,
    opts.cardinalities,
    num_labels,
    log_post=-score[None] if opts.bayes else None,
  )
  out = {k: jax.tree.map(lambda x: x[0], v) for k, v in out.items()}
  out['dense'] = dense[jnp.argmin(score)]
  return out


def _hybrid_users(simulate, opts, tx, batch, shared, per_user):
  """The runner's body: `_hybrid_user` mapped over a block of users, `batch` at a time."""
  params, table, clip, noise_stddev, lo, hi, shared_prior = shared

  def one(args):
    hh, gg, kk, pp = args
    lp = pp if opts.per_user_prior else shared_prior[0]
    return _hybrid_user(
      simulate,
      opts,
      tx,
      params,
      hh,
      gg,
      jax.random.wrap_key_data(kk),
      lp,
      table,
      clip,
      noise_stddev,
      lo,
      hi,
    )

  return runner.map_users(one, per_user, batch)


def hybrid_core(
  simulate,
  device_params,
  h,
  obs,
  cardinalities,
  num_dense,
  *,
  optimizer=None,
  num_steps: int = matching.DEFAULT_NUM_STEPS,
  num_restarts: int = DEFAULT_NUM_STARTS,
  num_refine: int | None = None,
  refine_starts: int = 256,
  key=None,
  l2_clip_norm=None,
  noise_stddev=None,
  log_prior=None,
  dense_bounds=(0.0, 1.0),
  distance='l2',
  users_per_batch=None,
  devices=None,
) -> HybridResult:
  """`hybrid` for any simulator `(params, h, x [P] int32, dense [Pd]) -> [L, d]` (see `hybrid`).

  `simulate.num_labels` is L (2 for gradients, 1 for activations, which carry no label; then the
  labels returned are all 0). `h` may have zero columns when the simulator ignores it.
  """
  cards = checks.cardinalities(cardinalities)
  devices = checks.devices(devices)
  h_np, g_np, dtype = checks.observations(h, obs, 'h', 'observations')
  num_dense, lo, hi, clip = matching.check_fit(
    num_dense, dense_bounds, l2_clip_norm, distance, num_steps, num_restarts, dtype
  )
  noise, bayes = checks.noise(noise_stddev, distance, log_prior)
  num_labels = simulate.num_labels
  num_cand = math.prod(cards)
  num_pairs = num_cand * num_labels
  num_users = h_np.shape[0]
  if num_dense == 0:
    num_restarts = 1
  refine = num_pairs if num_refine is None else int(num_refine)
  if refine < 0:
    raise AttackError(f'num_refine must be >= 0 or None (all pairs), got {num_refine!r}.')
  refine = min(refine, num_pairs)
  prior, per_user = np.zeros((1, num_pairs), dtype), False
  if log_prior is not None:
    p3, per_user = checks.log_prior(log_prior, num_users, num_cand, num_labels)
    prior = p3.reshape(p3.shape[0], num_pairs).astype(dtype)
  tx = (
    optimizer
    if optimizer is not None
    else matching.default_optimizer(matching.DEFAULT_LEARNING_RATE, max(int(num_steps), 1))
  )
  checks.count(refine_starts, 'refine_starts')
  opts = _HybridOptions(
    cards,
    num_dense,
    int(num_restarts),
    int(num_steps),
    refine,
    int(refine_starts) if num_dense else 0,
    distance,
    bayes,
    per_user,
  )
  if num_users == 0:
    return HybridResult.empty(cards, num_labels, dtype, posteriors=bayes, num_dense=num_dense)
  table = scoring.candidate_table(cards)
  noise_arg = np.asarray(noise if bayes else 1.0, dtype)

  batch, users_per_call = runner.call_size(
    num_users, len(devices), runner.users_per_batch(num_pairs * opts.num_restarts, users_per_batch)
  )
  per_user_prior = prior if per_user else np.zeros((num_users, 0), dtype)
  out = runner.run_users(
    runner.Static(_hybrid_users, (simulate, opts, tx, batch)),
    (device_params, table, clip, noise_arg, lo, hi, prior),
    (h_np, g_np, runner.user_keys(key, num_users), per_user_prior),
    num_users=num_users,
    users_per_call=users_per_call,
    devices=devices,
  )
  return HybridResult.from_outputs(out)


def hybrid(
  device_apply: Callable[..., jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  num_dense: int,
  *,
  optimizer: optax.GradientTransformation | None = None,
  num_steps: int = matching.DEFAULT_NUM_STEPS,
  num_restarts: int = DEFAULT_NUM_STARTS,
  num_refine: int | None = None,
  refine_starts: int = 256,
  key: jax.Array | None = None,
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  noise_multiplier: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  dense_bounds=(0.0, 1.0),
  distance: str = 'l2',
  users_per_batch: int | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> HybridResult:
  """EXACT over the categorical features and the label, optimisation over the dense features.

  For every user, every candidate `x` of `candidate_table(cardinalities)` and every label `y`, the
  pair's dense features are fitted: the simulated gradient `clip((sigmoid(z) - y) dz/dh)` with
  `z = device_apply(params, h, x, dense)` is scored against `g_obs` at `num_restarts` stratified
  starting points of the box (one reverse pass per (candidate, start) serves both labels); the
  `num_refine` best pairs (None: all) then run `num_steps` steps of `optimizer` on their dense
  features from their best start (vmapped, best-so-far kept). The answer is the best pair, or with
  `noise_stddev` the argmax of each marginal posterior of `-||g_obs - g_pair||^2 / (2 s^2) +
  log_prior` (dense features profiled out, i.e. set to their fitted values). With `num_dense = 0`
  this is EXACT (same candidates, same clip-aware scoring).

  Args:
    device_apply: `(params, h [d], x_priv [P] int32, dense [Pd]) -> scalar logit` (for splitjax
      models: `model.head_apply`). Pass the same object across calls to reuse compilations.
    device_params: the device parameters that produced `g_obs`.
    h: [N, d]; g_obs: [N, d].
    cardinalities: P ints >= 1.
    num_dense: Pd >= 0.
    optimizer: optax chain of the dense refinement (default Adam, cosine-decayed from 0.05).
    num_steps: refinement steps (0: keep the best start).
    num_restarts: starting points per pair (Latin hypercube of the box; 1 when num_dense = 0).
    num_refine: pairs refined per user (None: all; a few dozen is usually enough, since the
      starts already rank the pairs).
    refine_starts: fresh stratified starts tried by each refined pair before its descent (a
      finer second stage; 0 off).
    key: PRNG key of the starts (default `jax.random.key(0)`); user i uses `fold_in(key, i)`.
    l2_clip_norm: the public clip norm C (clip-aware scoring), or None.
    noise_stddev: public noise std per coordinate (sigma C): Bayes scoring; None / 0 off.
    noise_multiplier: the noise as sigma (noise_stddev = sigma * l2_clip_norm); not with
      noise_stddev.
    log_prior: optional log prior over pairs (exact's layout: [C*L], [C, L] or per user).
    dense_bounds: `(lo, hi)` box of the dense features (scalars or [Pd]).
    distance: 'l2' or 'cosine' (without noise).
    users_per_batch: users vmapped together on each device (None: about 4k (pair, start) rows on
      CPU).
    devices: devices to shard users across (default: all; see `optimize`).

  Returns:
    A `HybridResult` of numpy arrays.

  Raises:
    AttackError (a ValueError): as `exact` and `optimize`.

  References:
    Qiu et al., Evaluating Privacy Leakage in Split Learning, arXiv:2305.12997 (EXACT).
  """
  checks.same_shape(h, g_obs)
  noise_stddev = checks.noise_stddev(noise_stddev, noise_multiplier, l2_clip_norm)
  return hybrid_core(
    matching.GradientSimulator(device_apply),
    device_params,
    h,
    g_obs,
    cardinalities,
    num_dense,
    optimizer=optimizer,
    num_steps=num_steps,
    num_restarts=num_restarts,
    num_refine=num_refine,
    refine_starts=refine_starts,
    key=key,
    l2_clip_norm=l2_clip_norm,
    noise_stddev=noise_stddev,
    log_prior=log_prior,
    dense_bounds=dense_bounds,
    distance=distance,
    users_per_batch=users_per_batch,
    devices=devices,
  )
