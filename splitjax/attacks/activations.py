"""EXACT for the classic orientation (`device_bottom`): match the activations the device sends.

In `device_bottom` the device encodes its private features, `a = f_phi(x_priv)`, and sends `a`
(after its DP chain: clip each row to L2 norm C_a, add N(0, (sigma C_a)^2 I); replace-one
sensitivity 2 C_a, so mu = 2 / sigma per release as for gradients, DESIGN.md §4). The server, which
knows `phi` (DESIGN.md §2), enumerates every candidate `x_priv`, computes the activation it would
give, clips it like the device (clip-aware; the paper's clip-unaware scoring is kept as
`clip_aware=False`) and returns the nearest candidate, or with noise the Bayes-optimal value of each
feature (marginal posterior argmax, a log prior optional), exactly as `exact` does for gradients.

Without private dense features the candidate activations do not depend on the user: they are
computed once, `[C, d]`, and every user costs one `[C, d]` distance computation. With private dense
features the candidates' dense values are fitted per user by `optimize.hybrid_core` (stratified
starts, then Adam), since the activation is continuous in them.

The label stays on the server in this orientation: there is no label to attack.

References:
  Qiu et al., Evaluating Privacy Leakage in Split Learning, arXiv:2305.12997 (EXACT).
"""

import functools
import importlib
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The modules, not the functions of the same names that the package re-exports.
exact_lib = importlib.import_module('splitjax.attacks.exact')
optimize_lib = importlib.import_module('splitjax.attacks.optimize')

AttackError = exact_lib.AttackError

# Bytes of the [users, candidates, d] block scored at once.
MEMORY_BUDGET_BYTES = 256 * 1024**2


class ActivationResult(NamedTuple):
  """What `exact_activations` recovers for each of N users (numpy arrays on the host).

  Attributes:
    features: [N, P] int32, the nearest candidate (with noise: each feature's marginal-posterior
      argmax).
    dense: [N, Pd] float32, the fitted dense features of the best candidate (empty when Pd = 0).
    distances: [N] float32, distance of the best candidate (l2 in the Bayes variant).
    num_ties: [N] int32, candidates within exact's tie tolerance of the best (1 = unique).
    gap: [N] float32, second-best minus best score (inf with a single candidate).
    map_features: [N, P] int32, the single best candidate.
    feature_posteriors: None, or a tuple of P arrays [N, K_j] (Bayes variant).
  """

  features: np.ndarray
  dense: np.ndarray
  distances: np.ndarray
  num_ties: np.ndarray
  gap: np.ndarray
  map_features: np.ndarray
  feature_posteriors: tuple[np.ndarray, ...] | None = None


class ActivationSimulator:
  """`(params, h, x [P] int32, dense [Pd]) -> [1, d]`: the activation the device would send.

  `h` is ignored (the device's encoder sees only its own features). Hashable by `encoder_apply`.
  """

  num_labels = 1

  def __init__(self, encoder_apply: Callable[..., jax.Array]):
    self.encoder_apply = encoder_apply

  def __call__(self, params, h, x, dense):
    del h
    return self.encoder_apply(params, x, dense)[None]

  def __hash__(self):
    return hash((ActivationSimulator, self.encoder_apply))

  def __eq__(self, other):
    return isinstance(other, ActivationSimulator) and other.encoder_apply is self.encoder_apply


class _Options(NamedTuple):
  cardinalities: tuple[int, ...]
  distance: str
  bayes: bool
  per_user_prior: bool


@functools.cache
def _table_fn(encoder_apply):
  """Jitted `(params, table [C, P], dense [C, Pd], clip) -> clipped activations [C, d]`."""

  def fn(params, table, dense, clip):
    a = jax.vmap(encoder_apply, in_axes=(None, 0, 0))(params, table, dense)
    return optimize_lib.clip_rows(a, clip)

  return jax.jit(fn)


@functools.cache
def _score_fn(opts: _Options):
  """Jitted scoring of a block of users against all candidates."""

  def fn(cand, a_obs, log_prior, noise_stddev):
    num_users = a_obs.shape[0]
    if opts.bayes:
      dist = jnp.sum(jnp.square(cand[None] - a_obs[:, None]), axis=-1)  # [U, C] squared
      inv_var = 1.0 / (2.0 * jnp.square(noise_stddev))
      score = dist * inv_var - log_prior
      scale = jnp.sum(jnp.square(a_obs), axis=-1) * inv_var
    else:
      dist = exact_lib.DISTANCES[opts.distance](a_obs[:, None], cand[None])
      score = dist
      scale = exact_lib.DISTANCES[opts.distance](a_obs, jnp.zeros_like(a_obs))
    best_idx = jnp.argmin(score, axis=-1)
    best = jnp.take_along_axis(score, best_idx[:, None], axis=1)[:, 0]
    is_best = jnp.arange(score.shape[1])[None] == best_idx[:, None]
    gap = jnp.min(jnp.where(is_best, jnp.inf, score), axis=-1) - best
    tol = exact_lib.TIE_RTOL * scale + exact_lib.TIE_ATOL
    d_best = jnp.take_along_axis(dist, best_idx[:, None], axis=1)[:, 0]
    out: dict[str, Any] = dict(
      best_idx=best_idx,
      gap=gap,
      num_ties=jnp.sum(score <= (best + tol)[:, None], axis=-1).astype(jnp.int32),
      distances=jnp.sqrt(d_best) if opts.bayes else d_best,
    )
    if opts.bayes:
      lp = (-score).reshape((num_users,) + opts.cardinalities)
      total = jax.scipy.special.logsumexp(lp.reshape(num_users, -1), axis=-1)
      axes = set(range(1, lp.ndim))
      out['feature_posteriors'] = tuple(
        jnp.exp(
          jax.scipy.special.logsumexp(lp, axis=tuple(sorted(axes - {j + 1}))) - total[:, None]
        )
        for j in range(lp.ndim - 1)
      )
    return out

  return jax.jit(fn)


def candidate_activations(
  encoder_apply: Callable[..., jax.Array],
  device_params: Any,
  cardinalities: Sequence[int],
  *,
  l2_clip_norm: float | None = None,
  dense: jax.typing.ArrayLike | None = None,
) -> np.ndarray:
  """Every candidate's activation, `[C, d]` in `candidate_table` order, clipped to `l2_clip_norm`.

  `dense` ([Pd], default empty) fixes the private dense inputs of every candidate.
  """
  cards = exact_lib._check_cardinalities(cardinalities)  # pylint: disable=protected-access
  table = exact_lib.candidate_table(cards)
  dense = np.zeros((0,), np.float32) if dense is None else np.asarray(dense, np.float32)
  dense_rows = np.broadcast_to(dense, (table.shape[0],) + dense.shape)
  clip = math.inf if l2_clip_norm is None else float(l2_clip_norm)
  return np.asarray(_table_fn(encoder_apply)(device_params, table, dense_rows, np.float32(clip)))


def exact_activations(
  encoder_apply: Callable[..., jax.Array],
  device_params: Any,
  a_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  *,
  num_dense: int = 0,
  dense_bounds=(0.0, 1.0),
  distance: str = 'l2',
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  clip_aware: bool = True,
  users_per_chunk: int | None = None,
  key: jax.Array | None = None,
  num_restarts: int = 64,
  num_steps: int = 100,
  num_refine: int | None = 16,
  refine_starts: int = 256,
  optimizer=None,
) -> ActivationResult:
  """Recovers each user's private features from the activation its device sent (device_bottom).

  Args:
    encoder_apply: `(params, x_priv [P] int32, dense [Pd]) -> a [d]` (`model.encoder_apply` of a
      device_bottom `SplitModel`). Pass the same object across calls to reuse compilations.
    device_params: the encoder parameters that produced `a_obs`.
    a_obs: [N, d] activations the server received (after the device's DP chain).
    cardinalities: P ints >= 1.
    num_dense: Pd, private dense inputs of the encoder (fitted per candidate when > 0).
    dense_bounds: `(lo, hi)` box of the dense inputs (scalars or [Pd]).
    distance: 'l2' or 'cosine' (without noise).
    l2_clip_norm: the public clip norm C_a, or None.
    noise_stddev: the public noise std per coordinate (sigma C_a): Bayes scoring; None / 0 off.
    log_prior: optional log prior over candidates, [C] or [N, C] (candidate_table order).
    clip_aware: clip candidate activations like the device (default); False is the paper's
      clip-unaware scoring.
    users_per_chunk: users scored together (None: a [users, C, d] block of about 256 MiB).
    key, num_restarts, num_steps, num_refine, refine_starts, optimizer: the dense fit (see
      `optimize.hybrid`); unused when num_dense = 0.

  Returns:
    An `ActivationResult` of numpy arrays.

  Raises:
    AttackError (a ValueError): bad cardinalities, shapes, NaN/inf, an unknown distance, bad DP
      arguments or log prior.

  Example:
    >>> import jax.numpy as jnp
    >>> table = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
    >>> enc = lambda p, x, d: p[x[0]]
    >>> exact_activations(enc, table, table[jnp.array([2, 0])], (3,)).features.tolist()
    [[2], [0]]

  References:
    Qiu et al., Evaluating Privacy Leakage in Split Learning, arXiv:2305.12997 (EXACT).
  """
  cards = exact_lib._check_cardinalities(cardinalities)  # pylint: disable=protected-access
  if distance not in exact_lib.DISTANCES:
    raise AttackError(f'unknown distance {distance!r}; valid names: {sorted(exact_lib.DISTANCES)}.')
  a = np.asarray(a_obs)
  if a.ndim != 2:
    raise AttackError(f'a_obs must be an [N, d] matrix, got shape {a.shape}.')
  dtype = jax.dtypes.canonicalize_dtype(
    a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32
  )
  a = a.astype(dtype)
  exact_lib._check_finite_matrix(a, 'a_obs')  # pylint: disable=protected-access
  clip = exact_lib._check_scalar(l2_clip_norm, 'l2_clip_norm')  # pylint: disable=protected-access
  if clip == 0:
    raise AttackError('l2_clip_norm must be > 0 (or None / inf for no clipping), got 0.')
  sim_clip = clip if clip_aware else None
  num_users = a.shape[0]

  if num_dense:
    res = optimize_lib.hybrid_core(
      ActivationSimulator(encoder_apply),
      device_params,
      np.zeros((num_users, 0), dtype),
      a,
      cards,
      num_dense,
      optimizer=optimizer,
      num_steps=num_steps,
      num_restarts=num_restarts,
      num_refine=num_refine,
      refine_starts=refine_starts,
      key=key,
      l2_clip_norm=sim_clip,
      noise_stddev=noise_stddev,
      log_prior=log_prior,
      dense_bounds=dense_bounds,
      distance=distance,
    )
    return ActivationResult(
      res.features,
      res.dense,
      res.distances,
      res.num_ties,
      res.gap,
      res.map_features,
      res.feature_posteriors,
    )

  noise, bayes = exact_lib.check_noise(noise_stddev, distance, log_prior)
  num_cand = math.prod(cards)
  prior, per_user = np.zeros((1, num_cand), dtype), False
  if log_prior is not None:
    p3, per_user = exact_lib._check_log_prior(  # pylint: disable=protected-access
      log_prior, num_users, num_cand, 1
    )
    prior = p3.reshape(p3.shape[0], num_cand).astype(dtype)
  table = exact_lib.candidate_table(cards)
  cand = candidate_activations(encoder_apply, device_params, cards, l2_clip_norm=sim_clip)
  if cand.shape[1] != a.shape[1]:
    raise AttackError(
      f'a_obs has d = {a.shape[1]} columns but the encoder gives d = {cand.shape[1]}.'
    )
  if num_users == 0:
    p = len(cards)
    posts = tuple(np.zeros((0, k), dtype) for k in cards) if bayes else None
    z_f = np.zeros(0, dtype)
    return ActivationResult(
      np.zeros((0, p), np.int32),
      np.zeros((0, 0), dtype),
      z_f,
      np.zeros(0, np.int32),
      z_f,
      np.zeros((0, p), np.int32),
      posts,
    )
  if users_per_chunk is None:
    per_user_bytes = num_cand * (a.shape[1] + 4) * 4 * 2
    users_per_chunk = max(1, MEMORY_BUDGET_BYTES // per_user_bytes)
  chunk = min(1 << (int(users_per_chunk).bit_length() - 1), optimize_lib._next_pow2(num_users))  # pylint: disable=protected-access
  fn = _score_fn(_Options(cards, distance, bayes, per_user))
  noise_arg = np.asarray(noise if bayes else 1.0, dtype)
  num_chunks = -(-num_users // chunk)
  pad = num_chunks * chunk - num_users
  a_pad = np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if pad else a
  if per_user and pad:
    prior = np.concatenate([prior, np.repeat(prior[:1], pad, axis=0)])
  outs = []
  for i in range(num_chunks):
    sl = slice(i * chunk, (i + 1) * chunk)
    outs.append(fn(cand, a_pad[sl], prior[sl] if per_user else prior, noise_arg))
  out = jax.tree.map(lambda *p: np.concatenate([np.asarray(x) for x in p])[:num_users], *outs)
  map_features = table[out['best_idx']]
  if bayes:
    posts = out['feature_posteriors']
    features = np.stack([np.argmax(p, axis=-1) for p in posts], axis=-1).astype(np.int32)
  else:
    posts, features = None, map_features
  return ActivationResult(
    features,
    np.zeros((num_users, 0), dtype),
    out['distances'],
    out['num_ties'],
    out['gap'],
    map_features,
    posts,
  )
