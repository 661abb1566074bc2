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
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks
from splitjax.attacks import hybrid_search
from splitjax.attacks import runner
from splitjax.attacks import scoring
from splitjax.attacks import sizing

AttackError = checks.AttackError

# Bytes of the [users, candidates, d] block scored at once.
MEMORY_BUDGET_BYTES = 256 * 1024**2


# What `exact_activations` returns: the one result type of the matching attacks; `labels`,
# `map_labels` and `label_posterior` are None (the label stays on the server in this orientation)
# and `dense` is [N, Pd] (empty when the encoder has no private dense input).
ActivationResult = scoring.MatchResult


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


@functools.partial(jax.jit, static_argnames=('encoder_apply',))
def _table_activations(params, table, dense, clip, *, encoder_apply):
  """`(params, table [C, P], dense [C, Pd], clip) -> clipped activations [C, d]`."""
  a = jax.vmap(encoder_apply, in_axes=(None, 0, 0))(params, table, dense)
  return scoring.clip_rows(a, clip)


def _score_users(opts: _Options, shared, per_user):
  """The runner's body: every candidate against a block of users' activations."""
  cand, table, noise_stddev, shared_prior = shared
  a_obs, user_prior = per_user
  log_prior = user_prior if opts.per_user_prior else shared_prior
  log_post = None
  if opts.bayes:
    dist = jnp.sum(jnp.square(cand[None] - a_obs[:, None]), axis=-1)  # [U, C] squared
    inv_var = 1.0 / (2.0 * jnp.square(noise_stddev))
    score = dist * inv_var - log_prior
    scale = jnp.sum(jnp.square(a_obs), axis=-1) * inv_var
    log_post = -score
  else:
    dist = scoring.DISTANCES[opts.distance](a_obs[:, None], cand[None])
    score = dist
    scale = scoring.DISTANCES[opts.distance](a_obs, jnp.zeros_like(a_obs))
  out, _, _ = scoring.select(score, dist, scale, table, opts.cardinalities, 1, log_post=log_post)
  return out


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
  cards = checks.cardinalities(cardinalities)
  table = scoring.candidate_table(cards)
  dense = np.zeros((0,), np.float32) if dense is None else np.asarray(dense, np.float32)
  dense_rows = np.broadcast_to(dense, (table.shape[0],) + dense.shape)
  clip = math.inf if l2_clip_norm is None else float(l2_clip_norm)
  return np.asarray(
    _table_activations(
      device_params, table, dense_rows, np.float32(clip), encoder_apply=encoder_apply
    )
  )


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
  noise_multiplier: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  clip_aware: bool = True,
  users_per_chunk: int | None = None,
  key: jax.Array | None = None,
  num_restarts: int = 64,
  num_steps: int = 100,
  num_refine: int | None = 16,
  refine_starts: int = 256,
  optimizer=None,
  devices: Sequence[jax.Device] | None = None,
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
    noise_multiplier: the noise as sigma (noise_stddev = sigma * l2_clip_norm); not with
      noise_stddev.
    log_prior: optional log prior over candidates, [C] or [N, C] (candidate_table order).
    clip_aware: clip candidate activations like the device (default); False is the paper's
      clip-unaware scoring.
    users_per_chunk: users scored together per device (None: a [users, C, d] block of about
      256 MiB).
    key, num_restarts, num_steps, num_refine, refine_starts, optimizer: the dense fit (see
      `optimize.hybrid`); unused when num_dense = 0.
    devices: devices to shard users across (default: all of `jax.devices()`).

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
  noise_stddev = checks.noise_stddev(noise_stddev, noise_multiplier, l2_clip_norm)
  cards = checks.cardinalities(cardinalities)
  checks.name_in(distance, scoring.DISTANCES, 'distance')
  a = np.asarray(a_obs)
  if a.ndim != 2:
    raise AttackError(f'a_obs must be an [N, d] matrix, got shape {a.shape}.')
  dtype = checks.float_dtype(a)
  a = a.astype(dtype)
  checks.finite_matrix(a, 'a_obs')
  clip = checks.clip_norm(l2_clip_norm)
  devices = checks.devices(devices)
  sim_clip = clip if clip_aware else None
  num_users = a.shape[0]

  if num_dense:
    res = hybrid_search.hybrid_core(
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
      devices=devices,
    )
    return res._replace(labels=None, map_labels=None, label_posterior=None)

  noise, bayes = checks.noise(noise_stddev, distance, log_prior)
  num_cand = math.prod(cards)
  prior, per_user = np.zeros((1, num_cand), dtype), False
  if log_prior is not None:
    p3, per_user = checks.log_prior(log_prior, num_users, num_cand, 1)
    prior = p3.reshape(p3.shape[0], num_cand).astype(dtype)
  table = scoring.candidate_table(cards)
  cand = candidate_activations(encoder_apply, device_params, cards, l2_clip_norm=sim_clip)
  if cand.shape[1] != a.shape[1]:
    raise AttackError(
      f'a_obs has d = {a.shape[1]} columns but the encoder gives d = {cand.shape[1]}.'
    )
  if num_users == 0:
    return ActivationResult.empty(cards, 1, dtype, posteriors=bayes, num_dense=0)
  if users_per_chunk is None:
    per_user_bytes = num_cand * (a.shape[1] + 4) * 4 * 2
    users_per_chunk = max(1, MEMORY_BUDGET_BYTES // per_user_bytes)
  chunk = min(1 << (int(users_per_chunk).bit_length() - 1), sizing.next_pow2(num_users))
  noise_arg = np.asarray(noise if bayes else 1.0, dtype)
  out = runner.run_users(
    runner.Static(_score_users, (_Options(cards, distance, bayes, per_user),)),
    (cand, table, noise_arg, None if per_user else prior),
    (a, prior if per_user else np.zeros((num_users, 0), dtype)),
    num_users=num_users,
    users_per_call=chunk * len(devices),
    devices=devices,
  )
  return ActivationResult.from_outputs(
    out, labels=None, map_labels=None, label_posterior=None, dense=np.zeros((num_users, 0), dtype)
  )
