"""Argument checks shared by every attack: one message per problem, naming the argument and the fix.

Host-side (numpy) checks of what a caller passes to the attack runners (`exact`, `optimize`,
`hybrid`, `exact_activations`, the label-only and baseline attacks). The pure per-user functions
(`exact_user`) check shapes at trace time only; NaN and inf are checked here, by the runners.
Every failure raises `AttackError`, a `ValueError`.
"""

import math
import numbers
from collections.abc import Sequence

import jax
import numpy as np


class AttackError(ValueError):
  """An attack argument is invalid: the message names the argument, its value or shape, the fix."""


def cardinalities(values, device_apply=None) -> tuple[int, ...]:
  """The cardinalities as ints, each >= 1.

  Checked against `device_apply.priv_cardinalities` when the callable carries them
  (`models.device_logit_fn` does): a wrong feature count or cardinality would otherwise give
  silently wrong answers (JAX clamps out-of-range embedding indices).
  """
  if isinstance(values, numbers.Integral):
    raise AttackError(
      f'cardinalities must be a sequence of ints (one per private feature), got the '
      f'int {values!r}; pass e.g. ({values},).'
    )
  try:
    cards = tuple(values)
  except TypeError:
    raise AttackError(f'cardinalities must be a sequence of ints, got {values!r}.') from None
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


def positive_int(value, name: str, *, allow_none: bool = True) -> int | None:
  """`value` as an int >= 1 (None stays None when `allow_none`)."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise AttackError(
      f'{name} must be a positive int{" or None" if allow_none else ""}, got {value!r}.'
    )
  return int(value)


def count(value, name: str, minimum: int = 0) -> int:
  """`value` as an int >= `minimum` (bools refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise AttackError(f'{name} must be an int >= {minimum}, got {value!r}.')
  return int(value)


def name_in(value, registry, what: str) -> None:
  """`value` is a key of `registry` (e.g. a distance name)."""
  if value not in registry:
    raise AttackError(f'unknown {what} {value!r}; valid names: {sorted(registry)}.')


def scalar(value, name: str) -> float | None:
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


def clip_norm(value) -> float | None:
  """`l2_clip_norm`: None / inf (no clipping) or a number > 0."""
  clip = scalar(value, 'l2_clip_norm')
  if clip == 0:
    raise AttackError('l2_clip_norm must be > 0 (or None / inf for no clipping), got 0.')
  return clip


def noise_stddev(noise_stddev, noise_multiplier, l2_clip_norm):
  """The noise standard deviation per coordinate from either way of giving it.

  Attacks accept `noise_stddev` (per coordinate) or `noise_multiplier` (sigma, in units of the
  clip norm: stddev = sigma * C, as in `privacy.cut_layer_dp`), not both.
  """
  if noise_multiplier is None:
    return noise_stddev
  if noise_stddev is not None:
    raise AttackError(
      'pass noise_stddev or noise_multiplier, not both (noise_stddev = noise_multiplier * '
      'l2_clip_norm).'
    )
  sigma = scalar(noise_multiplier, 'noise_multiplier')
  assert sigma is not None
  if sigma == 0:
    return None
  clip = clip_norm(l2_clip_norm)
  if clip is None or math.isinf(clip) or math.isinf(sigma):
    raise AttackError(
      f'noise_multiplier={sigma} needs a finite l2_clip_norm (the noise stddev is '
      'noise_multiplier * l2_clip_norm); pass l2_clip_norm or noise_stddev.'
    )
  return sigma * clip


def noise(noise_stddev, distance: str, log_prior) -> tuple[float | None, bool]:
  """Validates the Bayes-scoring arguments every enumeration attack shares.

  Returns (noise_stddev as a float or None, whether Bayes scoring is on: noise_stddev > 0).
  """
  value = scalar(noise_stddev, 'noise_stddev')
  bayes = value is not None and value > 0
  if value is not None and bayes and math.isinf(value):
    raise AttackError('noise_stddev must be finite, got inf.')
  if bayes and distance != 'l2':
    raise AttackError(
      f'the Bayes variant (noise_stddev={value}) scores by Gaussian likelihood; '
      f'distance must be "l2", got {distance!r}.'
    )
  if log_prior is not None and not bayes:
    raise AttackError(
      'log_prior is used only with noise_stddev > 0 (Bayes scoring); pass '
      'noise_stddev or drop log_prior.'
    )
  return value, bayes


def finite_matrix(x: np.ndarray, name: str) -> None:
  """Every entry of `x` is finite (the message names the first bad row)."""
  bad = ~np.isfinite(x)
  if bad.any():
    rows = np.unique(np.nonzero(bad)[0])
    raise AttackError(
      f'{name} {x.shape} has {int(bad.sum())} NaN/inf entries (first in row '
      f'{int(rows[0])}); drop or repair those rows before attacking.'
    )


def float_dtype(x: np.ndarray):
  """The dtype an attack computes in: `x`'s float dtype (canonicalised), else float32."""
  return jax.dtypes.canonicalize_dtype(
    x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
  )


def observations(h, g_obs, name_h: str = 'h', name_g: str = 'g_obs', *, dtype_from: str = 'g'):
  """`h` and `g_obs` as finite [N, *] matrices of one float dtype with the same N.

  Returns (h, g, dtype); the dtype is that of `g_obs` (`dtype_from='g'`) or of `h` ('h').
  """
  h_np = np.asarray(h)
  g_np = np.asarray(g_obs)
  if h_np.ndim != 2 or g_np.ndim != 2:
    raise AttackError(
      f'{name_h} and {name_g} must be [N, d] matrices, got {name_h} {h_np.shape} '
      f'and {name_g} {g_np.shape}.'
    )
  if h_np.shape[0] != g_np.shape[0]:
    raise AttackError(
      f'{name_h} {h_np.shape} and {name_g} {g_np.shape} must have the same number of rows N.'
    )
  dtype = float_dtype(g_np if dtype_from == 'g' else h_np)
  h_np, g_np = h_np.astype(dtype), g_np.astype(dtype)
  finite_matrix(h_np, name_h)
  finite_matrix(g_np, name_g)
  return h_np, g_np, dtype


def same_shape(h, g_obs) -> None:
  """`h` and `g_obs` have one shape [N, d] (gradient attacks: g = dl/dh)."""
  if np.shape(h) != np.shape(g_obs):
    raise AttackError(
      f'h {np.shape(h)} and g_obs {np.shape(g_obs)} must have the same shape [N, d].'
    )


def log_prior(value, num_users: int, num_cand: int, num_labels: int):
  """Returns (prior [1 or N, C, L] float32 numpy, per_user bool)."""
  prior = np.asarray(value, dtype=np.float32)
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


def param_index(index, device_params, num_users: int):
  """`param_index` ([N] ints into the leading version axis of every leaf) as int32 numpy."""
  index_np = np.asarray(index)
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
  return index_np.astype(np.int32)


def devices(value: Sequence[jax.Device] | None) -> tuple:
  """The devices to shard users over (None: all of `jax.devices()`)."""
  out = tuple(jax.devices() if value is None else value)
  if not out:
    raise AttackError('devices is empty; pass None (all devices) or at least one device.')
  return out


def dense_box(num_dense, dense_bounds, dtype):
  """(num_dense as an int >= 0, lo [Pd], hi [Pd]) of the private dense features' box."""
  if isinstance(num_dense, bool) or not isinstance(num_dense, (int, np.integer)) or num_dense < 0:
    raise AttackError(f'num_dense must be an int >= 0, got {num_dense!r}.')
  try:
    lo, hi = dense_bounds
  except (TypeError, ValueError):
    raise AttackError(
      f'dense_bounds must be a pair (lo, hi) of scalars or [Pd] arrays, got {dense_bounds!r}.'
    ) from None
  lo = np.broadcast_to(np.asarray(lo, dtype), (int(num_dense),)).copy()
  hi = np.broadcast_to(np.asarray(hi, dtype), (int(num_dense),)).copy()
  if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
    raise AttackError(f'dense_bounds must be finite with lo <= hi, got lo={lo}, hi={hi}.')
  return int(num_dense), lo, hi
