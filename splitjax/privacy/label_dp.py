"""Label DP by randomized response on binary labels (drawn once, before training)."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from splitjax.privacy import _checks


def flip_probability(epsilon: float) -> float:
  """The probability 1 / (1 + e^eps) that randomized response flips a binary label.

  Args:
    epsilon: > 0 (inf gives 0: no flip).

  Returns:
    The flip probability in [0, 1/2).

  Raises:
    PrivacyError: epsilon <= 0, NaN, or traced.

  Formal guarantees:
    P(report = y) / P(report = 1 - y) = e^eps, so the reported label is eps-DP with respect
    to the true label.

  References:
    Warner, "Randomized response", JASA 1965; Ghazi et al., "Deep Learning with Label
    Differential Privacy", arXiv 2102.06062.

  Example:
    >>> round(flip_probability(np.log(3.0)), 6)
    0.25
  """
  eps = _checks.epsilon_positive(epsilon)
  if eps is None:
    raise _checks.PrivacyError('epsilon must be concrete here; use randomized_response_jax.')
  return float(special.expit(-eps))


def _check_binary(labels: np.ndarray) -> None:
  if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
    raise _checks.PrivacyError(f'labels must be an integer array of 0/1, got dtype {labels.dtype}.')
  if labels.size and not np.isin(labels, (0, 1)).all():
    raise _checks.PrivacyError(
      f'labels must be binary 0/1, got values {np.unique(labels)[:10].tolist()}.'
    )


def randomized_response(
  labels: np.ndarray, epsilon: float, *, rng: np.random.Generator
) -> np.ndarray:
  """Flips each binary label independently with probability 1 / (1 + e^eps), on the host.

  Draw once before training and reuse the noisy labels every epoch: a fresh draw per epoch
  would compose to k * eps.

  Args:
    labels: `[...]` integer array of 0/1.
    epsilon: > 0 (inf: labels returned unchanged).
    rng: the explicit numpy generator.

  Returns:
    Noisy labels, same shape and dtype.

  Raises:
    PrivacyError: epsilon <= 0 or NaN, or labels not a 0/1 integer array.

  Formal guarantees:
    Each example's reported label is eps-DP with respect to its true label and depends on no
    other example's label.

  Example:
    >>> randomized_response(np.array([0, 1, 1]), np.inf, rng=np.random.default_rng(0))
    array([0, 1, 1])
  """
  q = flip_probability(epsilon)
  labels = np.asarray(labels)
  _check_binary(labels)
  if not isinstance(rng, np.random.Generator):
    raise _checks.PrivacyError(f'rng must be a np.random.Generator, got {type(rng).__name__}.')
  flips = rng.random(labels.shape) < q
  return np.where(flips, 1 - labels, labels).astype(labels.dtype)


def randomized_response_jax(
  key: jax.Array, labels: jax.Array, epsilon: jax.typing.ArrayLike
) -> jax.Array:
  """Randomized response in JAX: flips each 0/1 label with probability 1 / (1 + e^eps).

  Args:
    key: a PRNG key.
    labels: `[...]` integer 0/1 array.
    epsilon: > 0, a float or traced scalar (inf: no flip); checked when concrete.

  Returns:
    Noisy labels, same shape and dtype.

  Raises:
    PrivacyError: concrete epsilon <= 0 or NaN; non-integer labels.

  Formal guarantees:
    As `randomized_response`: each reported label is eps-DP with respect to its true label.
  """
  _checks.epsilon_positive(epsilon)
  labels = jnp.asarray(labels)
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
    raise _checks.PrivacyError(f'labels must be an integer array of 0/1, got dtype {labels.dtype}.')
  q = jax.nn.sigmoid(-jnp.asarray(epsilon, jnp.float32))
  flips = jax.random.bernoulli(key, q, labels.shape)
  return jnp.where(flips, 1 - labels, labels).astype(labels.dtype)
