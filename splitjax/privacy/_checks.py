"""Argument checks shared by the privacy modules (concrete values only; tracers pass through)."""

import math
import numbers

import jax
import numpy as np


class PrivacyError(ValueError):
  """A privacy parameter or input is invalid; the message names it and the fix."""


def static_scalar(value, name: str) -> float | None:
  """Returns `value` as a Python float when it is concrete, None when it is traced.

  Args:
    value: a Python/numpy number, a concrete 0-d array, or a traced jax scalar.
    name: the argument name, for the error message.

  Returns:
    The float value, or None when `value` is a `jax.core.Tracer` (checked later, if ever).

  Raises:
    PrivacyError: `value` is not a scalar, or not a number.
  """
  if isinstance(value, jax.core.Tracer):
    if value.ndim != 0:
      raise PrivacyError(
        f'{name} must be a scalar, got a traced array of shape {value.shape}; '
        'pass one value per transform.'
      )
    return None
  if isinstance(value, bool):
    raise PrivacyError(f'{name} must be a number, got the bool {value!r}.')
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise PrivacyError(f'{name} must be a number, got {value!r}.') from None
  if arr.ndim != 0:
    raise PrivacyError(
      f'{name} must be a scalar, got an array of shape {arr.shape}; pass one value per call.'
    )
  return float(arr)


def nonnegative(value, name: str, *, allow_inf: bool = True) -> float | None:
  """Checks a concrete `value` is >= 0 and not NaN (inf allowed unless `allow_inf=False`)."""
  v = static_scalar(value, name)
  if v is None:
    return None
  if math.isnan(v) or v < 0:
    raise PrivacyError(f'{name} must be >= 0 (not NaN), got {v}.')
  if not allow_inf and math.isinf(v):
    raise PrivacyError(f'{name} must be finite, got {v}.')
  return v


def host(value: float | None, name: str) -> float:
  """A checked value that host-side accounting needs concrete (not traced)."""
  if value is None:
    raise PrivacyError(f'{name} must be a concrete number (host-side accounting), got a tracer.')
  return value


def releases_count(releases, name: str = 'releases') -> int:
  """Checks `releases` is a non-negative integer (Python or numpy) and returns it as int."""
  if isinstance(releases, bool) or not isinstance(releases, numbers.Integral):
    if isinstance(releases, float) and releases.is_integer():
      releases = int(releases)
    else:
      raise PrivacyError(f'{name} must be a non-negative integer, got {releases!r}.')
  if releases < 0:
    raise PrivacyError(f'{name} must be a non-negative integer, got {releases}.')
  return int(releases)


def probability_open(delta, name: str) -> float:
  """Checks a concrete `delta` lies in the open interval (0, 1)."""
  v = static_scalar(delta, name)
  if v is None:
    raise PrivacyError(f'{name} must be a concrete number (host-side accounting), got a tracer.')
  if not 0.0 < v < 1.0:
    raise PrivacyError(f'{name} must lie in (0, 1), got {v}.')
  return v


def epsilon_positive(epsilon, name: str = 'epsilon') -> float | None:
  """Checks a concrete `epsilon` is > 0 and not NaN (inf allowed: no privacy)."""
  v = static_scalar(epsilon, name)
  if v is None:
    return None
  if math.isnan(v) or v <= 0:
    raise PrivacyError(f'{name} must be > 0 (inf for no privacy), got {v}.')
  return v
