"""EXACT: score every candidate of the private features and label against an observed cut gradient.

The device sends `g = l'(z, y) * dz/dh` for its own example (DESIGN.md §1). For binary cross-entropy
`l'(z, y) = sigmoid(z) - y`, so `dz/dh` depends on the private features `x_priv` but not on the
label: one reverse-mode pass per private candidate serves every candidate label. `exact` enumerates
all `prod(cardinalities)` private candidates once (a `[C, P]` int32 table in `itertools.product`
order), computes `z` and `dz/dh` for all of them and for many users in one jitted computation
(`vmap` over candidates inside `vmap` over users, so the parts of the model that depend on `h` only,
e.g. `W_h h`, are computed once per user), simulates what the device would have sent for every
`(candidate, label)` pair — clipped with the public clip norm when the attack is clip-aware — and
returns the nearest pair, a per-feature top-k vote, or the Bayes-optimal per-feature answer under
Gaussian noise.

Users are processed in fixed-size chunks (the last one padded, so any number of users beyond a
small power-of-two bucket reuses one compiled function), several chunks per jitted call through
`lax.map`, and sharded across devices (`shard_map` over a 1-D mesh 'users') when there are several.
Users may come from different parameter versions (`param_index`, e.g. training users of a
transcript). With `screen_dtype='bfloat16'` every pair is first screened with bf16 matrix products
(`low_precision_matmuls`), each user's best pairs are rescored in float32, and users the screen
cannot decide are redone in float32 (about 1.3-1.4x faster on this bf16-capable CPU for
noise-free observations). The compiled function is cached per (device_apply, cardinalities,
options, devices):
calling `exact` again with the same model and shapes does not retrace or recompile.

References:
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv:2305.12997 (EXACT).
"""

import functools
import itertools
import math
import numbers
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from splitjax import multihost

# Tie tolerance: a (candidate, label) pair is tied with the best when its score is within
# TIE_RTOL * scale + TIE_ATOL of the best score, where `scale` is the score the zero gradient would
# get (l2: ||g_obs||; cosine: 1; Bayes: ||g_obs||^2 / (2 noise_stddev^2) nats). Float32 rounding of
# the simulated gradient is ~1e-7 relative, so 1e-6 covers the recomputation error with margin.
TIE_RTOL = 1e-6
TIE_ATOL = 1e-7

# Peak working memory targeted per compiled chunk, and the preferred number of (user, candidate)
# rows vmapped together per device: on CPU ~4k rows keep the activations cache-resident (from
# benchmarks/exact_throughput.py's chunk-size sweep on 2 cores); accelerators want larger batches
# (the memory budget still caps them).
MEMORY_BUDGET_BYTES = 2 * 1024**3
TARGET_ROWS_PER_CHUNK = {'cpu': 2**12}
TARGET_ROWS_PER_CHUNK_DEFAULT = 2**17
# Users per jitted call per device (several chunks run in sequence through lax.map), amortising
# dispatch and host transfers.
TARGET_USERS_PER_CALL = {'cpu': 256}
TARGET_USERS_PER_CALL_DEFAULT = 2**14
# Safety factor applied to the traced per-candidate intermediate sizes.
_MEMORY_FACTOR = 1.5

# Low-precision screening (`screen_dtype`): dtypes the matmuls may be screened in and the pairs per
# user rescored in the input precision. A user's screen is conclusive when a rescored pair
# reproduces the observation to SCREEN_MATCH_RTOL (distance / scale; any other pair could then
# only be a near-tie), or else when every unrescored pair would still lose with its screened
# gradient off by DEFAULT_SCREEN_RTOL times its norm; other users are redone in full precision.
# Relative errors of bf16-screened pair gradients, measured (BUILD_NOTES.md, "EXACT throughput"):
# median ~1e-3, 99th percentile 3-5e-2, worst 0.12-0.15 on random models; on a trained adult model
# the logit is off by up to 0.18, i.e. the loss-gradient factor sigmoid(z) - y by up to ~18 %, which
# the screening scores absorb (SCREEN_LOGIT_SLACK); dz/dh's direction by up to 0.12 rad.
SCREEN_DTYPES = {'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
DEFAULT_SCREEN_TOP = 8
SCREEN_MATCH_RTOL = {'l2': 1e-5, 'cosine': 1e-7}
DEFAULT_SCREEN_RTOL = 0.25
# Screening scores allow each pair's loss factor sigmoid(z) - y to be off by a factor e^+-this
# (the logit error of the screen; measured up to 0.18 on a trained adult model).
SCREEN_LOGIT_SLACK = 1.0


class AttackError(ValueError):
  """An attack argument is invalid: the message names the argument, its value or shape, the fix."""


class ExactResult(NamedTuple):
  """What `exact` recovers for each of N users (numpy arrays on the host).

  Attributes:
    features: [N, P] int32, the answer per private feature: the nearest pair's features (top_k=1),
      the per-feature majority of the top_k nearest pairs, or, with noise, the argmax of each
      feature's marginal posterior.
    labels: [N] int32, the answer for the label, chosen the same way.
    distances: [N] float32, distance (under `distance`; l2 in the Bayes variant) from the observed
      gradient to the simulated gradient of the best pair (`map_features`, `map_labels`).
    num_ties: [N] int32, number of (candidate, label) pairs whose score is within the tie tolerance
      of the best score, the best included (1 = unique; see TIE_RTOL, TIE_ATOL).
    gap: [N] float32, second-best minus best score (distance units; nats of negative log
      posterior in the Bayes variant); inf when there is a single pair.
    map_features: [N, P] int32, the features of the single best pair (nearest / joint MAP).
    map_labels: [N] int32, the label of the single best pair.
    feature_posteriors: None, or a tuple of P arrays [N, K_j] float32: marginal posteriors with
      noise, vote fractions of the top_k pairs when top_k > 1.
    label_posterior: None, or [N, num_labels] float32, likewise.
    screen_fallback: None without `screen_dtype`; else [N] bool, True for the users whose
      low-precision screen was not conclusive and who were attacked again in full precision.
  """

  features: np.ndarray
  labels: np.ndarray
  distances: np.ndarray
  num_ties: np.ndarray
  gap: np.ndarray
  map_features: np.ndarray
  map_labels: np.ndarray
  feature_posteriors: tuple[np.ndarray, ...] | None = None
  label_posterior: np.ndarray | None = None
  screen_fallback: np.ndarray | None = None


def l2_distance(g_obs: jax.Array, g_cand: jax.Array) -> jax.Array:
  """Euclidean distance over the last axis (broadcasting): `||g_cand - g_obs||`."""
  return jnp.sqrt(jnp.sum(jnp.square(g_cand - g_obs), axis=-1))


def cosine_distance(g_obs: jax.Array, g_cand: jax.Array) -> jax.Array:
  """`1 - cos(g_obs, g_cand)` over the last axis (broadcasting); a zero vector has cosine 0."""
  dot = jnp.sum(g_obs * g_cand, axis=-1)
  norms = jnp.linalg.norm(g_obs, axis=-1) * jnp.linalg.norm(g_cand, axis=-1)
  tiny = jnp.finfo(dot.dtype).tiny
  return 1.0 - jnp.where(norms > tiny, dot / jnp.maximum(norms, tiny), 0.0)


# Name -> pure function `(g_obs [..., d], g_cand [..., d]) -> [...]` (broadcasting).
DISTANCES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
  'l2': l2_distance,
  'cosine': cosine_distance,
}


def candidate_table(cardinalities: Sequence[int]) -> np.ndarray:
  """All private candidates, [prod(cardinalities), P] int32, in `itertools.product` order.

  The first feature varies slowest, so a flat candidate index reshapes to `cardinalities`.

  Example:
    >>> candidate_table((2, 3)).tolist()
    [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
  """
  cards = _check_cardinalities(cardinalities)
  num = math.prod(cards)
  table = np.fromiter(
    itertools.chain.from_iterable(itertools.product(*map(range, cards))),
    dtype=np.int32,
    count=num * len(cards),
  )
  return table.reshape(num, len(cards))


# ----------------------------------------------------------------------------------------------
# Validation.


def _check_cardinalities(cardinalities, device_apply=None) -> tuple[int, ...]:
  """The cardinalities as ints; checked against `device_apply.priv_cardinalities` when the
  callable carries them (`models.device_logit_fn`): a wrong feature count or cardinality would
  otherwise give silently wrong answers (JAX clamps out-of-range embedding indices)."""
  if isinstance(cardinalities, numbers.Integral):
    raise AttackError(
      f'cardinalities must be a sequence of ints (one per private feature), got the '
      f'int {cardinalities!r}; pass e.g. ({cardinalities},).'
    )
  try:
    cards = tuple(cardinalities)
  except TypeError:
    raise AttackError(f'cardinalities must be a sequence of ints, got {cardinalities!r}.') from None
  for j, k in enumerate(cards):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
      raise AttackError(f'cardinalities[{j}] must be an int, got {k!r} in {cards}.')
    if k < 1:
      raise AttackError(
        f'cardinalities[{j}] must be >= 1, got {k} in {cards}; every private feature '
        'needs at least one value.'
      )
  cards = tuple(int(k) for k in cards)
  known = getattr(device_apply, 'priv_cardinalities', None)
  if known is not None and tuple(known) != cards:
    raise AttackError(
      f'cardinalities {cards} do not match the model behind device_apply, whose '
      f'private features have cardinalities {tuple(known)}: pass '
      'model.spec.priv_cardinalities (or the dataset\'s priv_cardinalities).'
    )
  return cards


def _check_positive_int(value, name: str, *, allow_none: bool = True) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise AttackError(
      f'{name} must be a positive int{" or None" if allow_none else ""}, got {value!r}.'
    )
  return int(value)


def _check_distance(distance) -> None:
  if distance not in DISTANCES:
    raise AttackError(f'unknown distance {distance!r}; valid names: {sorted(DISTANCES)}.')


def _check_scalar(value, name: str) -> float | None:
  """None stays None; otherwise a float >= 0 (inf allowed), not NaN."""
  if value is None:
    return None
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise AttackError(f'{name} must be a number or None, got {value!r}.') from None
  if arr.ndim != 0:
    raise AttackError(f'{name} must be a scalar, got an array of shape {arr.shape}.')
  v = float(arr)
  if math.isnan(v) or v < 0:
    raise AttackError(f'{name} must be >= 0 (not NaN), got {v}.')
  return v


def check_noise(noise_stddev, distance: str, log_prior) -> tuple[float | None, bool]:
  """Validates the Bayes-scoring arguments every enumeration attack shares.

  Returns (noise_stddev as a float or None, whether Bayes scoring is on: noise_stddev > 0).
  """
  noise = _check_scalar(noise_stddev, 'noise_stddev')
  bayes = noise is not None and noise > 0
  if noise is not None and bayes and math.isinf(noise):
    raise AttackError('noise_stddev must be finite, got inf.')
  if bayes and distance != 'l2':
    raise AttackError(
      f'the Bayes variant (noise_stddev={noise}) scores by Gaussian likelihood; '
      f'distance must be "l2", got {distance!r}.'
    )
  if log_prior is not None and not bayes:
    raise AttackError(
      'log_prior is used only with noise_stddev > 0 (Bayes scoring); pass '
      'noise_stddev or drop log_prior.'
    )
  return noise, bayes


def _check_finite_matrix(x: np.ndarray, name: str) -> None:
  bad = ~np.isfinite(x)
  if bad.any():
    rows = np.unique(np.nonzero(bad)[0])
    raise AttackError(
      f'{name} {x.shape} has {int(bad.sum())} NaN/inf entries (first in row '
      f'{int(rows[0])}); drop or repair those rows before attacking.'
    )


def _check_log_prior(log_prior, num_users: int, num_cand: int, num_labels: int):
  """Returns (prior [1 or N, C, L] float32 numpy, per_user bool)."""
  prior = np.asarray(log_prior, dtype=np.float32)
  c, nl = num_cand, num_labels
  if prior.shape in ((c * nl,), (c, nl)):
    prior, per_user = prior.reshape(1, c, nl), False
  elif prior.shape in ((num_users, c * nl), (num_users, c, nl)):
    prior, per_user = prior.reshape(num_users, c, nl), True
  else:
    raise AttackError(
      f'log_prior has shape {prior.shape}; expected [C*L]=({c * nl},), [C, L]=({c}, '
      f'{nl}) or the same with a leading users axis of {num_users} (C candidates in '
      'candidate_table order, label fastest).'
    )
  if np.isnan(prior).any() or np.isposinf(prior).any():
    raise AttackError('log_prior contains NaN or +inf; use -inf only for impossible candidates.')
  if not np.isfinite(prior.reshape(prior.shape[0], -1)).any(axis=1).all():
    raise AttackError(
      'log_prior gives every (candidate, label) pair -inf for some user; at least '
      'one pair must be possible.'
    )
  return prior, per_user


# ----------------------------------------------------------------------------------------------
# The jitted chunk computation.


class _Options(NamedTuple):
  """Static options; part of the compilation cache key."""

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
  screen_top: int = DEFAULT_SCREEN_TOP


# ----------------------------------------------------------------------------------------------
# Low-precision matmuls for the screening pass.

# Call-like primitives whose body is interpreted (so the matmuls inside are rewritten too), and the
# parameter holding the body.
_CALL_BODIES = {
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'custom_jvp_call': 'call_jaxpr',
  'custom_vjp_call': 'call_jaxpr',
  'remat2': 'jaxpr',
  'checkpoint': 'jaxpr',
}


def _eval_low_precision(jaxpr, consts, args, dtype):
  """Evaluates `jaxpr` with every float32 x float32 `dot_general` on `dtype` inputs (f32 sums)."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=False))
  env.update(zip(jaxpr.invars, args, strict=False))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    body = eqn.params.get(_CALL_BODIES.get(name, ''), None)
    if name == 'dot_general' and all(jnp.result_type(x) == jnp.float32 for x in invals):
      outs = [
        jax.lax.dot_general(
          invals[0].astype(dtype),
          invals[1].astype(dtype),
          eqn.params['dimension_numbers'],
          preferred_element_type=jnp.float32,
        )
      ]
    elif body is not None and hasattr(body, 'jaxpr'):  # a ClosedJaxpr: inline it
      outs = _eval_low_precision(body.jaxpr, body.consts, invals, dtype)
    elif isinstance(body, jex_core.Jaxpr) and not body.constvars:  # an open one (remat2)
      outs = _eval_low_precision(body, (), invals, dtype)
    else:  # everything else (control flow included) runs as traced
      outs = eqn.primitive.bind(*invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs, strict=False))
  return [read(v) for v in jaxpr.outvars]


def low_precision_matmuls(fn: Callable[..., Any], dtype=jnp.bfloat16) -> Callable[..., Any]:
  """`fn` with its float32 matrix products computed from `dtype`-rounded inputs, summed in f32.

  Traces `fn` to a jaxpr (at the shapes of each call, under any transformation) and re-evaluates
  it with every float32 `dot_general` replaced by one on `dtype` inputs with
  `preferred_element_type=float32` (on CPUs with AVX512-BF16, and on GPUs/TPUs, about twice the
  float32 matmul rate). Elementwise work stays float32. Apply it to an already differentiated
  function (e.g. `jax.value_and_grad(f)`), so the backward matmuls are rewritten as well.
  """

  def wrapped(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(
      lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True
    )(*flat)
    outs = _eval_low_precision(closed.jaxpr, closed.consts, flat, dtype)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def loss_factors(z: jax.Array) -> jax.Array:
  """`l'(z, y) = sigmoid(z) - y` of binary cross-entropy for y = 0, 1: [...] -> [..., 2].

  The cut gradient of label y is `l'(z, y) dz/dh`. `sigmoid(z) - 1` is computed as
  `-sigmoid(-z)`, which keeps its precision when sigmoid(z) is close to 1.
  """
  return jnp.stack([jax.nn.sigmoid(z), -jax.nn.sigmoid(-z)], axis=-1)


def _pair_scores(opts: _Options, z, v, g, clip_norm):
  """Scores of every label of B candidates: z [U, B], v [U, B, d] -> [U, B, L] (see below)."""
  a = loss_factors(z)  # [U, B, 2]
  if opts.clip and opts.clip_aware:
    # The device clips g to norm C: factor min(1, C / ||a v||) = min(1, C / (|a| ||v||)).
    cand_norm = jnp.abs(a) * jnp.linalg.norm(v, axis=-1)[..., None]
    tiny = jnp.finfo(cand_norm.dtype).tiny
    a = a * jnp.where(cand_norm > clip_norm, clip_norm / jnp.maximum(cand_norm, tiny), 1.0)
  g_cand = a[..., None] * v[:, :, None, :]  # [U, B, 2, d] (fused into the reduction by XLA)
  if opts.bayes:
    return jnp.sum(jnp.square(g_cand - g[:, None, None, :]), axis=-1)
  return DISTANCES[opts.distance](g[:, None, None, :], g_cand)


def _screen_scores(opts: _Options, z, v, g, clip_norm):
  """Screening scores, robust to the screen's logit error: z [U, B], v [U, B, d] -> [U, B, L].

  Low-precision matmuls move the logit z by up to ~0.2 on trained models, which scales
  `l'(z, y) = sigmoid(z) - y` by up to e^|dz| (|d log l'/dz| <= 1), far more than they turn the
  direction of v = dz/dh. So each pair is scored by its distance to the nearest point of the set
  of gradients `clip(s v)` with s between l' e^-SCREEN_LOGIT_SLACK and l' e^+SCREEN_LOGIT_SLACK:
  a segment along v (radially clipped: the part beyond norm C collapses to C v/||v||). The
  distance to a segment is closed-form from <v, g> and ||v||^2, so no [U, B, L, d] tensor is
  formed. Cosine scores ignore scale already and are scored as usual.
  """
  if opts.distance != 'l2':
    return _pair_scores(opts, z, v, g, clip_norm)
  a = loss_factors(z)  # [U, B, 2]
  slack = math.exp(SCREEN_LOGIT_SLACK)
  lo = jnp.minimum(a / slack, a * slack)
  hi = jnp.maximum(a / slack, a * slack)
  vv = jnp.sum(jnp.square(v), axis=-1)[..., None]  # [U, B, 1]
  vg = jnp.einsum('ubd,ud->ub', v, g)[..., None]
  tiny = jnp.finfo(vv.dtype).tiny
  if opts.clip and opts.clip_aware:
    cap = clip_norm / jnp.sqrt(jnp.maximum(vv, tiny))  # |s| ||v|| <= C after the clip
    lo, hi = jnp.clip(lo, -cap, cap), jnp.clip(hi, -cap, cap)
  s = jnp.clip(vg / jnp.maximum(vv, tiny), lo, hi)
  gg = jnp.sum(jnp.square(g), axis=-1)[:, None, None]
  return jnp.sqrt(jnp.maximum(gg - 2.0 * s * vg + jnp.square(s) * vv, 0.0))


def _candidate_gradients(device_apply, opts: _Options, params, h, table, low_precision: bool):
  """z [U, B] and dz/dh [U, B, d] of candidates `table` ([B, P], or [U, B, P] per user)."""
  val_grad = jax.value_and_grad(device_apply, argnums=1)
  if low_precision:
    assert opts.screen_dtype is not None  # low precision only with a screen
    val_grad = low_precision_matmuls(val_grad, SCREEN_DTYPES[opts.screen_dtype])
  # Inner vmap: candidates, with h unbatched (h-only work is shared); outer vmap: users.
  per_user = jax.vmap(val_grad, in_axes=(None, None, 0))
  params_axis = 0 if opts.per_user_params else None
  table_axis = 0 if table.ndim == 3 else None
  return jax.vmap(per_user, in_axes=(params_axis, 0, table_axis))(params, h, table)


def _simulate_block(device_apply, opts: _Options, params, h, g, table, clip_norm):
  """Scores one block of candidates for a chunk of users.

  Args:
    params: the device parameters (leaves with a leading [U] axis when opts.per_user_params).
    h, g: [U, d]; table: [B, P] int32; clip_norm: scalar.

  Returns:
    [U, B, L] distance under `opts.distance` (squared l2 in the Bayes variant); with
    `opts.screen_dtype` computed with low-precision matmuls (a screen, rescored by the caller).
  """
  if opts.screen_dtype is not None:
    z, v = _candidate_gradients(device_apply, opts, params, h, table, low_precision=True)
    return _screen_scores(opts, z, v, g, clip_norm)
  z, v = _candidate_gradients(device_apply, opts, params, h, table, low_precision=False)
  return _pair_scores(opts, z, v, g, clip_norm)


def _screen_top(opts: _Options, screen):
  """The `screen_top` best pairs of a low-precision screen.

  Returns ([U, m] indices in ascending screening score, [U] the cutoff: the screening score of the
  best pair left out, +inf when every pair is kept; [U] bool, True where some screening score is
  not finite, e.g. a float16 overflow, which voids the screen's error bound). Selected by m + 1
  masked argmins:
  `lax.top_k` is a sort on CPU and cost ~40 % of the whole screen in the adult benchmark.
  """
  num_users, num_pairs = screen.shape
  m = min(opts.screen_top, num_pairs)
  iota = jnp.arange(num_pairs)[None, :]

  def pick(i, carry):
    masked, idx = carry
    best = jnp.argmin(masked, axis=1).astype(jnp.int32)
    return jnp.where(iota == best[:, None], jnp.inf, masked), idx.at[:, i].set(best)

  rounds = m + 1 if num_pairs > m else m
  masked, idx = jax.lax.fori_loop(
    0, rounds, pick, (screen, jnp.zeros((num_users, rounds), jnp.int32))
  )
  del masked
  if num_pairs > m:
    cutoff = jnp.take_along_axis(screen, idx[:, m : m + 1], axis=1)[:, 0]
  else:
    cutoff = jnp.full((num_users,), jnp.inf, screen.dtype)
  return idx[:, :m], cutoff, ~jnp.isfinite(screen).all(axis=1)


def _rescore(device_apply, opts: _Options, params, h, g, table, clip_norm, top, num_pairs):
  """Full-precision scores of the screen's best pairs `top` [U, m].

  Returns ([U, num_pairs] scores: the rescored pairs at their full-precision scores, +inf
  elsewhere; [U, m] the rescored scores).
  """
  num_users = h.shape[0]
  num_labels = opts.num_labels
  z, v = _candidate_gradients(
    device_apply, opts, params, h, table[top // num_labels], low_precision=False
  )  # [U, m], [U, m, d]
  pair = _pair_scores(opts, z, v, g, clip_norm)  # [U, m, L]
  exact_scores = jnp.take_along_axis(pair, (top % num_labels)[..., None], axis=2)[..., 0]
  rows = jnp.arange(num_users)[:, None]
  scores = jnp.full((num_users, num_pairs), jnp.inf, exact_scores.dtype)
  return scores.at[rows, top].set(exact_scores), exact_scores


def _chunk_fn(
  device_apply,
  opts: _Options,
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
):
  """Attacks one chunk of U users. table: [num_blocks * B, P]. Returns a dict of [U, ...] arrays.

  With `return_scores` (`exact_user`) the dict also holds `scores` [U, C*L], the score every pair
  is ranked by (the distance, or the negative unnormalised log posterior in the Bayes variant).

  With `opts.screen_dtype`: called first without `screen` (returns {'screen': [U, C*L]}
  low-precision scores), then with `screen=(top, cutoff, non_finite)` from `_screen_top`
  (rescores and answers among the rescored pairs).
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
      _simulate_block, device_apply, opts, params, h, g, clip_norm=clip_norm
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

  if opts.bayes:
    inv_var = 1.0 / (2.0 * jnp.square(noise_stddev))
    log_post = log_prior.reshape(log_prior.shape[0], -1) - dist * inv_var  # unnormalised
    score = -log_post
    scale = jnp.sum(jnp.square(g), axis=-1) * inv_var
  else:
    score = dist
    scale = DISTANCES[opts.distance](g, jnp.zeros_like(g))

  # argmin (ties -> lower index) and a masked second minimum; a full top_k (a sort on CPU) only for
  # the vote.
  best_idx = jnp.argmin(score, axis=-1)
  best = jnp.take_along_axis(score, best_idx[:, None], axis=1)[:, 0]
  is_best = jnp.arange(score.shape[1])[None, :] == best_idx[:, None]
  gap = jnp.min(jnp.where(is_best, jnp.inf, score), axis=-1) - best
  tol = TIE_RTOL * scale + TIE_ATOL
  num_ties = jnp.sum(score <= (best + tol)[:, None], axis=-1).astype(jnp.int32)
  map_features = table[best_idx // num_labels]
  map_labels = (best_idx % num_labels).astype(jnp.int32)
  out = dict(
    map_features=map_features,
    map_labels=map_labels,
    num_ties=num_ties,
    gap=gap,
    distances=jnp.take_along_axis(dist, best_idx[:, None], axis=1)[:, 0],
  )
  if screen is not None:
    # The best pair left out enters the gap at its screening score.
    out['gap'] = jnp.minimum(gap, cutoff - best)
    # Conclusive (1) when a rescored pair reproduces the observation: its full-precision distance
    # is within SCREEN_MATCH_RTOL of zero, so no pair can beat it by more than that (a near-tie),
    # whatever the screen's errors; or (2) when no unrescored pair can beat the rescored best (the
    # top_k-th best for a vote) under the assumed error bound: a screened pair gradient within
    # eps * ||g_c|| of its full-precision value g_c (eps = screen_rtol; the device's clip, a radial
    # projection, keeps the relative error within eps / (1 - eps)). An unrescored pair (screen
    # score >= cutoff) then has, for l2, true distance d >= cutoff - eps (||g_obs|| + d), i.e.
    # d >= (cutoff - eps ||g_obs||) / (1 + eps); for cosine its angle moves by <= asin(eps).
    # Non-finite screening scores (overflow) void the bound: always redone.
    eps = screen_rtol
    if opts.clip and opts.clip_aware:
      eps = jnp.where(eps < 1.0, eps / jnp.maximum(1.0 - eps, 1e-6), jnp.inf)
    if opts.distance == 'l2':
      lowest = (cutoff - eps * scale) / (1.0 + eps)
    else:
      lowest = cutoff - jnp.arcsin(jnp.minimum(eps, 1.0))
    if opts.top_k == 1:
      match = best <= SCREEN_MATCH_RTOL[opts.distance] * scale + tol
      conclusive = match | (lowest > best + tol)
    else:  # every one of the top_k voters must be certain to be among the rescored pairs
      kth = -jax.lax.top_k(-rescored, opts.top_k)[0][:, -1]
      conclusive = lowest > kth + tol
    out['screen_fallback'] = ~conclusive | non_finite
  if opts.bayes:
    out['distances'] = jnp.sqrt(out['distances'])
    lp = log_post.reshape((num_users,) + opts.cardinalities + (num_labels,))
    total = jax.scipy.special.logsumexp(lp.reshape(num_users, -1), axis=-1)
    all_axes = set(range(1, lp.ndim))
    posts = []
    for j in range(lp.ndim - 1):  # features, then the label
      other = tuple(sorted(all_axes - {j + 1}))
      posts.append(jnp.exp(jax.scipy.special.logsumexp(lp, axis=other) - total[:, None]))
    out['feature_posteriors'] = tuple(posts[:-1])
    out['label_posterior'] = posts[-1]
  elif opts.top_k > 1:
    _, top = jax.lax.top_k(-score, opts.top_k)  # ascending score; ties -> lower index first
    votes_feat = table[top // num_labels]  # [U, k, P]
    posts = [
      jnp.mean(jax.nn.one_hot(votes_feat[..., j], kj), axis=1)
      for j, kj in enumerate(opts.cardinalities)
    ]
    posts.append(jnp.mean(jax.nn.one_hot(top % num_labels, num_labels), axis=1))
    out['feature_posteriors'] = tuple(posts[:-1])
    out['label_posterior'] = posts[-1]
  if 'label_posterior' in out:  # argmax: ties -> the lower value index
    out['features'] = jnp.stack(
      [jnp.argmax(p, axis=-1).astype(jnp.int32) for p in out['feature_posteriors']]
      + [jnp.zeros((num_users,), jnp.int32)],
      axis=-1,
    )[:, :-1]
    out['labels'] = jnp.argmax(out['label_posterior'], axis=-1).astype(jnp.int32)
  else:
    out['features'], out['labels'] = map_features, map_labels
  if return_scores:
    out['scores'] = score
  return out


# ----------------------------------------------------------------------------------------------
# Memory estimate and the compilation cache.

_CACHE: dict[Any, Any] = {}


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(item, 'jaxpr') and hasattr(item.jaxpr, 'eqns'):
        yield item.jaxpr


def _dependent_eqns(jaxpr, dependent_invars):
  """Every equation of `jaxpr` (and of its sub-jaxprs) that depends on the given input variables."""
  dep = set(v for v, d in zip(jaxpr.invars, dependent_invars, strict=False) if d)
  for eqn in jaxpr.eqns:
    if not any((not hasattr(v, 'val')) and v in dep for v in eqn.invars):
      continue
    for sub in _subjaxprs(eqn):
      yield from _dependent_eqns(sub, [True] * len(sub.invars))
    dep.update(eqn.outvars)
    yield eqn


def _dependent_bytes(jaxpr, dependent_invars) -> int:
  """Bytes of all intermediates in `jaxpr` that depend on the given input variables."""
  total = 0
  for eqn in _dependent_eqns(jaxpr, dependent_invars):
    for v in eqn.outvars:
      aval = v.aval
      if hasattr(aval, 'shape') and hasattr(aval, 'dtype'):
        total += int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
  return total


def _bytes_per_candidate(
  device_apply, params, d: int, dtype, num_features: int, num_labels: int
) -> int:
  """Traces one candidate's value_and_grad and sums the sizes of its candidate-dependent values."""
  closed = jax.make_jaxpr(jax.value_and_grad(device_apply, argnums=1))(
    params, jax.ShapeDtypeStruct((d,), dtype), jax.ShapeDtypeStruct((num_features,), jnp.int32)
  )
  num_param_leaves = len(jax.tree.leaves(params))
  flags = [False] * num_param_leaves + [True, True]
  traced = _dependent_bytes(closed.jaxpr, flags)
  itemsize = np.dtype(dtype).itemsize
  scoring = (d * (num_labels + 2) + 8 * num_labels) * itemsize
  return int(_MEMORY_FACTOR * (traced + scoring)) + 1


def _dependent_flops(jaxpr, dependent_invars) -> int:
  """FLOPs (2 per multiply-add) of the dot products in `jaxpr` that depend on the given inputs."""
  total = 0
  for eqn in _dependent_eqns(jaxpr, dependent_invars):
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      contracted = int(np.prod([lhs_shape[i] for i in lhs_contract], dtype=np.int64))
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) * contracted
  return total


class Estimate(NamedTuple):
  """The size and expected duration of an EXACT enumeration (see `estimate`).

  Attributes:
    num_users: users attacked.
    num_candidates: private candidates per user (one gradient serves every label).
    num_pairs: (candidate, label) pairs per user.
    flops_per_candidate: FLOPs of one candidate's gradient that depend on the candidate
      (dot products, 2 per multiply-add, counted on the traced computation).
    bytes_per_candidate: memory of one candidate's intermediates (what the chunk planner uses).
    matmul_flops_per_second: float32 matmul rate measured on the default device just now.
    seconds: estimated wall time, `num_users * num_candidates * flops_per_candidate /
      (efficiency * matmul_flops_per_second)`, compilation not included.
    min_peak_bytes: a lower bound on the run's peak memory: the `[C, P]` candidate table (host
      and device copies) plus one user's chunk (its candidates' intermediates, up to the
      memory budget, and its `C * num_labels` pair scores, which no chunking divides). A run
      whose `min_peak_bytes` exceeds the free memory cannot fit.
  """

  num_users: int
  num_candidates: int
  num_pairs: int
  flops_per_candidate: int
  bytes_per_candidate: int
  matmul_flops_per_second: float
  seconds: float
  min_peak_bytes: int = 0


@functools.lru_cache(maxsize=4)
def matmul_flops_per_second(platform: str, n: int = 512, budget_seconds: float = 0.2) -> float:
  """The float32 matmul rate of the default device, measured in about `budget_seconds`."""
  del platform  # the cache key: one measurement per backend and process
  a = jnp.ones((n, n), jnp.float32)
  fn = jax.jit(lambda x: x @ x)
  fn(a).block_until_ready()  # compile
  reps, start = 0, time.perf_counter()
  while True:
    fn(a).block_until_ready()
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= budget_seconds or reps >= 1000:
      return 2.0 * n**3 * reps / max(elapsed, 1e-9)


def estimate(
  device_apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  device_params: Any,
  d: int,
  cardinalities: Sequence[int],
  num_users: int,
  *,
  num_labels: int = 2,
  dtype=jnp.float32,
  efficiency: float = 0.5,
) -> Estimate:
  """Sizes an EXACT run and estimates its duration before it starts (in well under a second).

  FLOPs per candidate are counted on the traced gradient of `device_apply` (dot products that
  depend on the candidate); the rate is a float32 matmul measured on the default device (about
  0.2 s, once per process); `efficiency` is the fraction of that rate EXACT reaches (0.7-0.8
  measured for DeepFM heads on CPUs, BUILD_NOTES.md "EXACT throughput"; 0.5 leaves a margin).

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit`, as for `exact`.
    device_params: one version of the device parameters.
    d: the width of `h`.
    cardinalities: the private features' cardinalities.
    num_users: users to attack.
    num_labels: labels per candidate (2).
    dtype: the dtype of `h`.
    efficiency: fraction of the matmul rate assumed, in (0, 1].

  Returns:
    An `Estimate`.
  """
  if not 0 < efficiency <= 1:
    raise AttackError(f'efficiency must be in (0, 1], got {efficiency}')
  cards = tuple(int(c) for c in cardinalities)
  closed = jax.make_jaxpr(jax.value_and_grad(device_apply, argnums=1))(
    device_params, jax.ShapeDtypeStruct((d,), dtype), jax.ShapeDtypeStruct((len(cards),), jnp.int32)
  )
  flags = [False] * len(jax.tree.leaves(device_params)) + [True, True]
  flops = _dependent_flops(closed.jaxpr, flags)
  per_cand = _bytes_per_candidate(device_apply, device_params, d, dtype, len(cards), num_labels)
  rate = matmul_flops_per_second(jax.default_backend())
  num_cand = math.prod(cards)
  seconds = num_users * num_cand * max(flops, 1) / (efficiency * rate)
  table_bytes = 2 * num_cand * len(cards) * 4
  one_user = min(num_cand, max(1, MEMORY_BUDGET_BYTES // per_cand)) * per_cand + (
    num_cand * num_labels * 4 * 4
  )
  return Estimate(
    int(num_users),
    num_cand,
    num_cand * num_labels,
    int(flops),
    int(per_cand),
    float(rate),
    float(seconds),
    int(table_bytes + one_user),
  )


def _params_signature(params):
  leaves, treedef = jax.tree.flatten(params)
  return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def _call_fn(
  device_apply,
  opts: _Options,
  params,
  h,
  g,
  param_index,
  log_prior,
  table,
  clip_norm,
  noise_stddev,
  screen_rtol,
):
  """One device's share of a call: `chunks_per_call` chunks of users, one after another (lax.map).

  With `opts.screen_dtype` two passes over the chunks: the low-precision screen, then (after one
  selection of every user's best screened pairs over the whole call, see `_screen_top`) the
  full-precision rescoring and the answers.
  """
  m = opts.chunks_per_call
  chunk = functools.partial(
    _chunk_fn,
    device_apply,
    opts,
    params,
    table=table,
    clip_norm=clip_norm,
    noise_stddev=noise_stddev,
    screen_rtol=screen_rtol,
  )
  split = lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:])
  merge = lambda tree: jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)

  def run(screen=None):
    if m == 1:
      return chunk(h=h, g=g, param_index=param_index, log_prior=log_prior, screen=screen)
    per_user = (h, g, param_index, log_prior if opts.per_user_prior else None, screen)
    return merge(
      jax.lax.map(
        lambda a: chunk(
          h=a[0],
          g=a[1],
          param_index=a[2],
          log_prior=a[3] if opts.per_user_prior else log_prior,
          screen=a[4],
        ),
        jax.tree.map(split, per_user),
      )
    )

  if opts.screen_dtype is None:
    return run()
  return run(_screen_top(opts, run()['screen']))


def _get_compiled(device_apply, opts: _Options, devices: tuple):
  """The jitted call for these options, sharded over `devices` (cached: no retrace on reuse)."""
  key = ('fn', device_apply, opts, devices)
  entry = _CACHE.get(key)
  if entry is None:
    spec = jax.sharding.PartitionSpec
    mesh = jax.sharding.Mesh(np.asarray(devices), ('users',))
    body = functools.partial(_call_fn, device_apply, opts)
    if len(devices) > 1:  # each device attacks its own block of users; no communication
      prior_spec = spec('users') if opts.per_user_prior else spec()
      body = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
          spec(),
          spec('users'),
          spec('users'),
          spec('users'),
          prior_spec,
          spec(),
          spec(),
          spec(),
          spec(),
        ),
        out_specs=spec('users'),
        check_vma=False,
      )
    users = jax.sharding.NamedSharding(mesh, spec('users'))
    replicated = jax.sharding.NamedSharding(mesh, spec())
    prior_sharding = users if opts.per_user_prior else replicated
    fn = jax.jit(
      body,
      in_shardings=(
        replicated,
        users,
        users,
        users,
        prior_sharding,
        replicated,
        replicated,
        replicated,
        replicated,
      ),
      out_shardings=users,
    )
    entry = _CACHE[key] = (fn, users, replicated, prior_sharding)
  return entry


def _next_pow2(x: int) -> int:
  return 1 << max(0, x - 1).bit_length()


class _Plan(NamedTuple):
  users_per_chunk: int  # users vmapped together on one device
  chunks_per_call: int  # chunks per device per jitted call (lax.map)
  candidates_per_block: int
  num_blocks: int


def _plan(
  device_apply,
  params,
  d,
  dtype,
  cards,
  num_labels,
  num_users,
  num_devices,
  platform,
  chunk_size,
  users_per_chunk,
  per_user_params=False,
  screen=False,
) -> _Plan:
  """Chooses chunk sizes: memory per chunk under the budget, few distinct compiled shapes."""
  num_cand = math.prod(cards)
  key = ('bytes', device_apply, _params_signature(params), d, str(dtype), len(cards), num_labels)
  per_cand = _CACHE.get(key)
  if per_cand is None:
    per_cand = _CACHE[key] = _bytes_per_candidate(
      device_apply, params, d, dtype, len(cards), num_labels
    )
  if chunk_size is None:
    # All candidates at once unless one user's candidates would exceed the budget.
    cand_block = min(num_cand, max(1, MEMORY_BUDGET_BYTES // per_cand))
  else:
    cand_block = min(num_cand, chunk_size)
  num_blocks = -(-num_cand // cand_block)
  cand_block = -(-num_cand // num_blocks)  # balance the blocks (less padding)
  per_user_bytes = cand_block * per_cand + num_cand * num_labels * 4 * 4
  if per_user_params:  # each user carries a gathered copy of its parameter version
    per_user_bytes += sum(
      np.size(x) * np.dtype(jnp.result_type(x)).itemsize for x in jax.tree.leaves(params)
    )
  users_per_device = -(-num_users // num_devices)
  if users_per_chunk is None:
    by_memory = max(1, MEMORY_BUDGET_BYTES // max(per_user_bytes, 1))
    target_rows = TARGET_ROWS_PER_CHUNK.get(platform, TARGET_ROWS_PER_CHUNK_DEFAULT)
    by_speed = max(1, target_rows // cand_block)
    # Small problems: the next power of two (bucketed, so few distinct compilations).
    users = min(by_memory, by_speed, _next_pow2(users_per_device))
  else:
    users = users_per_chunk
  # Several chunks per call amortise dispatch; a power of two (few distinct compilations).
  chunks_needed = -(-users_per_device // users)
  target_users = TARGET_USERS_PER_CALL.get(platform, TARGET_USERS_PER_CALL_DEFAULT)
  per_call = 1 << (max(1, target_users // users).bit_length() - 1)
  if screen:  # the whole call's screening scores are held at once (plus the selection's copy)
    call_bytes = 3 * num_cand * num_labels * np.dtype(dtype).itemsize
    max_users = max(1, (MEMORY_BUDGET_BYTES // 2) // call_bytes)
    per_call = min(per_call, 1 << (max(1, max_users // users).bit_length() - 1))
  chunks = min(per_call, _next_pow2(chunks_needed))
  return _Plan(users, chunks, cand_block, num_blocks)


# ----------------------------------------------------------------------------------------------
# Public API.


def exact(
  device_apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  device_params: Any,
  h: jax.typing.ArrayLike,
  g_obs: jax.typing.ArrayLike,
  cardinalities: Sequence[int],
  *,
  num_labels: int = 2,
  top_k: int = 1,
  chunk_size: int | None = None,
  distance: str = 'l2',
  l2_clip_norm: float | None = None,
  noise_stddev: float | None = None,
  log_prior: jax.typing.ArrayLike | None = None,
  clip_aware: bool = True,
  users_per_chunk: int | None = None,
  param_index: jax.typing.ArrayLike | None = None,
  devices: Sequence[jax.Device] | None = None,
  screen_dtype: str | None = None,
  screen_top: int = DEFAULT_SCREEN_TOP,
  screen_rtol: float = DEFAULT_SCREEN_RTOL,
) -> ExactResult:
  """Recovers each user's private features and label from its cut-layer gradient (EXACT).

  For every user and every (candidate, label) pair the attack simulates the gradient the device
  would have sent, `(sigmoid(z) - y) * dz/dh` with `z = device_apply(device_params, h, x)`, clipped
  to `l2_clip_norm` first when the attack is clip-aware, and scores it against `g_obs`:

  - no noise: the distance named by `distance`; the answer is the nearest pair (`top_k=1`) or the
    per-feature / label majority vote over the `top_k` nearest pairs (vote ties -> lower index);
  - `noise_stddev > 0`: the Gaussian log-likelihood `-||g_obs - g_c||^2 / (2 noise_stddev^2)` plus
    `log_prior`; the answer for each feature and for the label is the argmax of its marginal
    posterior (logsumexp over the pairs that share the value — the Bayes-optimal per-feature guess),
    and `map_features`/`map_labels` hold the joint MAP pair.

  One `jax.value_and_grad` of the logit with respect to `h` per private candidate serves both
  labels. Users are processed `users_per_chunk` at a time (the last chunk padded; no recompilation
  for a new number of users), sharded over `devices` along a 1-D mesh axis 'users'. The compiled
  function is cached per (device_apply, cardinalities, options, devices): pass the same
  `device_apply` object (not a fresh lambda) to reuse it.

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit`, pure and jit-compatible.
    device_params: the device model's parameters (the version that produced `g_obs`); with
      `param_index`, several versions stacked along a leading axis of every leaf.
    h: [N, d] cut activations the server computed.
    g_obs: [N, d] gradients the server received (after any DP transform).
    cardinalities: P ints >= 1, the number of values of each private feature (P = 0: no private
      categorical feature, the label alone is enumerated). Checked against the model when
      `device_apply` carries `priv_cardinalities` (`models.device_logit_fn` does). For a bare
      `device_apply` they are not: JAX clamps out-of-range embedding indices instead of raising,
      so a wrong feature count or cardinality gives silently wrong answers.
    num_labels: 2 (binary cross-entropy); other values are not supported.
    top_k: >= 1; with top_k > 1 and no noise, per-feature majority vote over the top_k nearest
      pairs.
    chunk_size: private candidates scored at once per user (None: all of them, unless one user's
      candidates exceed the ~2 GiB memory budget); smaller values trade speed for memory.
    distance: a name in DISTANCES ('l2' or 'cosine'); the Bayes variant requires 'l2'.
    l2_clip_norm: the public clip norm C of the device's DP transform, or None (no clipping).
    noise_stddev: the public standard deviation of the Gaussian noise per coordinate
      (noise_multiplier * C), or None / 0 for no noise.
    log_prior: optional log prior over pairs for the Bayes variant: [C*L] or [C, L] (shared) or
      [N, C*L] / [N, C, L] (per user), candidates in `candidate_table` order, label fastest; None is
      uniform. Unnormalised values are fine; -inf marks impossible pairs.
    clip_aware: True (default) clips each candidate's gradient like the device before scoring; False
      is the paper's clip-unaware scoring (unclipped candidates against the clipped observation).
    users_per_chunk: users vmapped together on each device (None: automatic, ~4k (user, candidate)
      rows on CPU, bounded by the memory budget everywhere). Several chunks run per jitted call.
    param_index: optional [N] int, the parameter version (index into the leading axis of
      `device_params`) that produced each row, e.g. `Transcript.param_index`; each user is then
      attacked with its own version in the same batched computation.
    devices: devices to shard users across (default: all of `jax.devices()`); pass one device to
      force a single-device run.
    screen_dtype: None (default: every score in the input precision), or 'bfloat16' / 'float16':
      a faster two-stage attack for noise-free observations. Every pair is first scored with the
      model's matrix products on `screen_dtype`-rounded inputs (float32 sums; see
      `low_precision_matmuls`; about 1.7x the float32 matmul rate on this project's bf16-capable
      CPU, more on GPUs/TPUs), then the `screen_top` best pairs of each user are rescored in full
      precision and the answer is taken among them. The l2 screening score of a pair is its
      distance to the segment of gradients its loss factor sigmoid(z) - y would give for logits
      within SCREEN_LOGIT_SLACK of the screened one (the screen's largest error is in the logit;
      see `_screen_scores`). A user is attacked again without screening (`screen_fallback`)
      unless (1) a rescored pair reproduces `g_obs` (distance <= SCREEN_MATCH_RTOL x ||g_obs||
      for l2; 1 - cos <= 1e-7): then the answer equals the full-precision one up to near-ties,
      guaranteed; or (2) every unrescored pair would still lose to the rescored best if its
      screened gradient direction were off by `screen_rtol` times its norm (an assumed bound).
      Without noise and with the clip-aware variant the true pair reproduces
      `g_obs`, so (1) decides almost every user; with noise, or the clip-unaware variant under
      clipping, most users fall back and the screen costs more than it saves. With top_k > 1
      only (2) applies, to the top_k-th best rescored pair (every voter must be rescored), so
      most voting users are redone. `gap` counts the best unrescored pair at its screening
      score, `num_ties` only rescored pairs; a screening score that is not finite (float16
      overflow) always sends the user to the redo. Not for the Bayes variant (its posteriors need
      every pair in full precision).
    screen_top: pairs per user rescored in full precision (>= top_k).
    screen_rtol: the error bound assumed by (2) (>= 0; default 0.25, above the worst errors of
      bf16 dz/dh measured on trained and random models: direction 0.12 rad, norm 5 %).

  Returns:
    An `ExactResult` of numpy arrays (see its docstring), rows in the order of `h`.

  Raises:
    AttackError (a ValueError): bad cardinalities (e.g. 0), h/g_obs rank or shape mismatch, NaN or
      inf in h or g_obs, an unknown distance, a bad top_k / clip / noise / log_prior argument.
    NotImplementedError: num_labels > 2 (a scalar logit only supports binary labels).

  Example:
    >>> import jax.numpy as jnp
    >>> apply = lambda p, h, x: jnp.dot(p[x[0]], h)
    >>> params = jnp.array([[1., 0.], [0., 2.]])
    >>> h = jnp.array([[1., 1.]])
    >>> z = apply(params, h[0], jnp.array([1]))
    >>> g = (jax.nn.sigmoid(z) - 1) * params[1][None]  # x = 1, y = 1
    >>> r = exact(apply, params, h, g, (2,))
    >>> r.features.tolist(), r.labels.tolist()
    ([[1]], [1])

  References:
    Qiu et al., Evaluating Privacy Leakage in Split Learning, arXiv:2305.12997 (EXACT; clip-unaware
    scoring is theirs, clip-aware and Bayes scoring are splitjax's).
  """
  cards = _check_cardinalities(cardinalities, device_apply)
  if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 2:
    raise AttackError(f'num_labels must be an int >= 2, got {num_labels!r}.')
  if num_labels != 2:
    raise NotImplementedError(
      f'num_labels={num_labels}: exact supports binary labels (a scalar '
      'logit with binary cross-entropy) only.'
    )
  _check_distance(distance)
  top_k = _check_positive_int(top_k, 'top_k', allow_none=False)
  chunk_size = _check_positive_int(chunk_size, 'chunk_size')
  users_per_chunk = _check_positive_int(users_per_chunk, 'users_per_chunk')
  clip_value = _check_scalar(l2_clip_norm, 'l2_clip_norm')
  if clip_value == 0:
    raise AttackError('l2_clip_norm must be > 0 (or None / inf for no clipping), got 0.')
  noise_value, bayes = check_noise(noise_stddev, distance, log_prior)
  if bayes and top_k > 1:
    raise AttackError(
      f'top_k={top_k} is for distance scoring; with noise_stddev the answer is the '
      'marginal-posterior argmax. Pass top_k=1.'
    )
  clip = clip_value is not None and not math.isinf(clip_value)
  if screen_dtype is not None:
    if screen_dtype not in SCREEN_DTYPES:
      raise AttackError(
        f'unknown screen_dtype {screen_dtype!r}; valid: None or {sorted(SCREEN_DTYPES)}.'
      )
    if bayes:
      raise AttackError(
        f'screen_dtype={screen_dtype!r} cannot be combined with noise_stddev: the '
        'Bayes posteriors need every pair in full precision. Pass screen_dtype=None.'
      )
  screen_top = _check_positive_int(screen_top, 'screen_top', allow_none=False)
  if screen_dtype is not None and top_k > screen_top:
    raise AttackError(
      f'top_k={top_k} exceeds screen_top={screen_top}: the vote needs its top_k '
      'pairs rescored. Raise screen_top.'
    )
  screen_rtol_value = _check_scalar(screen_rtol, 'screen_rtol')
  if screen_rtol_value is None or math.isinf(screen_rtol_value):
    raise AttackError(f'screen_rtol must be a finite number >= 0, got {screen_rtol!r}.')

  h_np = np.asarray(h)
  g_np = np.asarray(g_obs)
  if h_np.ndim != 2 or g_np.ndim != 2:
    raise AttackError(
      f'h and g_obs must be [N, d] matrices, got h {h_np.shape} and g_obs {g_np.shape}.'
    )
  if h_np.shape != g_np.shape:
    raise AttackError(f'h {h_np.shape} and g_obs {g_np.shape} must have the same shape [N, d].')
  dtype = jax.dtypes.canonicalize_dtype(
    h_np.dtype if np.issubdtype(h_np.dtype, np.floating) else np.float32
  )
  h_np = h_np.astype(dtype)
  g_np = g_np.astype(dtype)
  _check_finite_matrix(h_np, 'h')
  _check_finite_matrix(g_np, 'g_obs')
  num_users, d = h_np.shape
  num_cand = math.prod(cards)
  num_pairs = num_cand * num_labels
  if top_k > num_pairs:
    raise AttackError(
      f'top_k={top_k} exceeds the {num_pairs} (candidate, label) pairs of cardinalities {cards}.'
    )
  prior, per_user = (np.zeros((1, num_cand, num_labels), dtype), False)
  if log_prior is not None:
    prior, per_user = _check_log_prior(log_prior, num_users, num_cand, num_labels)
    prior = prior.astype(dtype)

  per_user_params = param_index is not None
  if per_user_params:
    index_np = np.asarray(param_index)
    leaves = jax.tree.leaves(device_params)
    versions = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(versions) != 1 or None in versions:
      raise AttackError(
        'with param_index every leaf of device_params needs the same leading '
        f'version axis, got leading sizes {sorted(map(str, versions))}.'
      )
    num_versions = versions.pop()
    if index_np.shape != (num_users,) or not np.issubdtype(index_np.dtype, np.integer):
      raise AttackError(
        f'param_index must be [N] = ({num_users},) ints, got shape '
        f'{index_np.shape} dtype {index_np.dtype}.'
      )
    if num_users and (index_np.min() < 0 or index_np.max() >= num_versions):
      raise AttackError(
        f'param_index values must lie in [0, {num_versions}) (the versions in '
        f'device_params), got [{index_np.min()}, {index_np.max()}].'
      )
    index_np = index_np.astype(np.int32)
    one_version = jax.tree.map(lambda leaf: leaf[0], device_params)
  else:
    index_np = np.zeros((num_users,), np.int32)
    one_version = device_params

  devices = tuple(jax.devices() if devices is None else devices)
  if not devices:
    raise AttackError('devices is empty; pass None (all devices) or at least one device.')
  num_devices = len(devices)

  if num_users == 0:
    empty_f = np.zeros((0, len(cards)), np.int32)
    empty_i = np.zeros((0,), np.int32)
    empty_x = np.zeros((0,), dtype)
    posts = labpost = None
    if bayes or top_k > 1:
      posts = tuple(np.zeros((0, k), dtype) for k in cards)
      labpost = np.zeros((0, num_labels), dtype)
    return ExactResult(
      empty_f,
      empty_i,
      empty_x,
      empty_i,
      empty_x,
      empty_f,
      empty_i,
      posts,
      labpost,
      None if screen_dtype is None else np.zeros((0,), bool),
    )

  plan = _plan(
    device_apply,
    one_version,
    d,
    dtype,
    cards,
    num_labels,
    num_users,
    num_devices,
    devices[0].platform,
    chunk_size,
    users_per_chunk,
    per_user_params,
    screen=screen_dtype is not None,
  )
  opts = _Options(
    cardinalities=cards,
    num_labels=num_labels,
    top_k=top_k,
    distance=distance,
    clip=clip,
    clip_aware=bool(clip_aware),
    bayes=bayes,
    per_user_prior=per_user,
    per_user_params=per_user_params,
    candidates_per_block=plan.candidates_per_block,
    num_blocks=plan.num_blocks,
    chunks_per_call=plan.chunks_per_call,
    screen_dtype=screen_dtype,
    screen_top=screen_top,
  )
  fn, user_sharding, replicated, prior_sharding = _get_compiled(device_apply, opts, devices)

  table = candidate_table(cards)
  padded_cand = plan.candidates_per_block * plan.num_blocks
  if padded_cand > num_cand:  # pad with copies of the last candidate; sliced off after scoring
    table = np.concatenate([table, np.repeat(table[-1:], padded_cand - num_cand, axis=0)])
  params = multihost.put_global(device_params, replicated)
  table_dev = multihost.put_global(table, replicated)
  clip_arg = multihost.put_global(np.asarray(clip_value if clip else np.inf, dtype), replicated)
  noise_arg = multihost.put_global(np.asarray(noise_value if bayes else 1.0, dtype), replicated)
  margin_arg = multihost.put_global(np.asarray(screen_rtol_value, dtype), replicated)
  if not per_user:
    prior_dev = multihost.put_global(prior, replicated)

  # Pad users to a whole number of calls with copies of the first row (finite; dropped at the end).
  users_per_call = plan.users_per_chunk * plan.chunks_per_call * num_devices
  num_calls = -(-num_users // users_per_call)
  pad = num_calls * users_per_call - num_users
  if pad:
    h_np = np.concatenate([h_np, np.repeat(h_np[:1], pad, axis=0)])
    g_np = np.concatenate([g_np, np.repeat(g_np[:1], pad, axis=0)])
    index_np = np.concatenate([index_np, np.repeat(index_np[:1], pad, axis=0)])
    if per_user:
      prior = np.concatenate([prior, np.repeat(prior[:1], pad, axis=0)])

  outs = []
  for i in range(num_calls):  # dispatch is asynchronous: all calls are queued before any wait
    sl = slice(i * users_per_call, (i + 1) * users_per_call)
    hc = multihost.put_global(h_np[sl], user_sharding)
    gc = multihost.put_global(g_np[sl], user_sharding)
    ic = multihost.put_global(index_np[sl], user_sharding)
    pc = multihost.put_global(prior[sl], prior_sharding) if per_user else prior_dev
    outs.append(fn(params, hc, gc, ic, pc, table_dev, clip_arg, noise_arg, margin_arg))

  def gather(*parts):
    return np.concatenate([multihost.to_host(p) for p in parts])[:num_users]

  merged = jax.tree.map(gather, *outs)
  fallback = merged.pop('screen_fallback', None)
  if fallback is not None and fallback.any():
    # Inconclusive screens: attack those users again in full precision.
    rows = np.nonzero(fallback)[0]
    redo = exact(
      device_apply,
      device_params,
      h_np[rows],
      g_np[rows],
      cards,
      num_labels=num_labels,
      top_k=top_k,
      chunk_size=chunk_size,
      distance=distance,
      l2_clip_norm=l2_clip_norm,
      clip_aware=clip_aware,
      users_per_chunk=users_per_chunk,
      param_index=index_np[rows] if per_user_params else None,
      devices=devices,
    )
    for name, value in redo._asdict().items():
      if name == 'screen_fallback' or value is None:
        continue
      if isinstance(value, tuple):
        for part, new in zip(merged[name], value, strict=False):
          part[rows] = new
      else:
        merged[name][rows] = value
  return ExactResult(
    features=merged['features'],
    labels=merged['labels'],
    distances=merged['distances'],
    num_ties=merged['num_ties'],
    gap=merged['gap'],
    map_features=merged['map_features'],
    map_labels=merged['map_labels'],
    feature_posteriors=merged.get('feature_posteriors'),
    label_posterior=merged.get('label_posterior'),
    screen_fallback=fallback,
  )


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
  cards = _check_cardinalities(cardinalities, device_apply)
  if isinstance(num_labels, bool) or num_labels != 2:
    raise AttackError(f'num_labels must be 2 (binary cross-entropy), got {num_labels!r}.')
  k = _check_positive_int(top_k, 'top_k', allow_none=False)
  assert k is not None  # allow_none=False
  _check_distance(distance)
  bayes = noise_stddev is not None
  if bayes and distance != 'l2':
    raise AttackError(
      f'the Bayes variant scores by Gaussian likelihood: distance must be "l2", got {distance!r}.'
    )
  if log_prior is not None and not bayes:
    raise AttackError('log_prior is used only with noise_stddev (Bayes scoring).')
  h, g_obs = jnp.asarray(h), jnp.asarray(g_obs)
  if not jnp.issubdtype(h.dtype, jnp.floating):
    h = h.astype(jnp.float32)
  g_obs = g_obs.astype(h.dtype)
  if h.ndim != 1 or g_obs.shape != h.shape:
    raise AttackError(
      f'h and g_obs must be [d] vectors of one user with the same shape, got '
      f'{h.shape} and {g_obs.shape}; vmap exact_user over users.'
    )
  num_cand = math.prod(cards)
  if bayes:
    prior = (
      jnp.zeros((1, num_cand * num_labels), h.dtype)
      if log_prior is None
      else jnp.asarray(log_prior, h.dtype)
    )
    if prior.shape not in (
      (1, num_cand * num_labels),
      (num_cand * num_labels,),
      (num_cand, num_labels),
    ):
      raise AttackError(
        f'log_prior must be [C*L] = ({num_cand * num_labels},) or [C, L] = '
        f'({num_cand}, {num_labels}), got {prior.shape}.'
      )
    prior = prior.reshape(1, num_cand * num_labels)
  else:
    prior = jnp.zeros((1, 1), h.dtype)
  opts = _Options(
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
  table = jnp.asarray(candidate_table(cards))
  clip = jnp.asarray(jnp.inf if l2_clip_norm is None else l2_clip_norm, h.dtype)
  noise = jnp.asarray(1.0 if noise_stddev is None else noise_stddev, h.dtype)
  out = _chunk_fn(
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


def clear_cache() -> None:
  """Forgets every cached compiled function and memory estimate (e.g. to free memory)."""
  _CACHE.clear()
