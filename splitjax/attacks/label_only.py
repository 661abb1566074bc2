"""Label-only attacks from the cut gradient alone: its norm and its direction (Li et al. 2021).

For binary cross-entropy the device sends `g_i = (sigmoid(z_i) - y_i) dz_i/dh_i` (DESIGN.md §1):
the label sets the sign of the scalar factor, and its size `|sigmoid(z_i) - y_i|` is large for
examples the model gets wrong. Two attacks use only `g` (no model, no features):

* `label_norm`: score `||g_i||`. When positives are rare the model leans to predicting negatives, so
  positives get the larger `|sigmoid(z) - 1|` and the larger gradients (Li et al.'s norm attack).
* `label_direction`: score `cos(g_i, r)` for a reference direction `r` of the positive class.
  Gradients of the same class point the same way (`dz/dh` varies slowly across examples, the label
  flips the sign), so the sign of the cosine separates the labels (Li et al.'s cosine attack).
  The reference is an example whose label the attacker knows (Li et al.), or by default the first
  principal direction of all gradients, oriented towards the largest-norm gradient (presumed
  positive, as in the norm attack) or, given the prior P(y = 1), so that the predicted positive
  fraction matches it best.

Both return per-example scores (higher = more likely positive) scored by AUC
(`splitjax.metrics.roc_auc`) and hard predictions.

References:
  Li, Sun, Wang, Xie, Wang, Yin, Zhang, Wang, Chen, Chen, Wang. Label Leakage and Protection in
  Two-party Split Learning. ICLR 2022, arXiv:2102.08504.
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks

AttackError = checks.AttackError


class LabelResult(NamedTuple):
  """A label-only attack's answer for N examples (numpy arrays on the host).

  Attributes:
    scores: [N] float32, larger = more likely label 1 (feed to `metrics.roc_auc`).
    labels: [N] int32 hard predictions (see each attack for its threshold).
  """

  scores: np.ndarray
  labels: np.ndarray


def _check_g(g_obs) -> np.ndarray:
  g = np.asarray(g_obs)
  if g.ndim != 2:
    raise AttackError(f'g_obs must be an [N, d] matrix, got shape {g.shape}.')
  g = g.astype(
    jax.dtypes.canonicalize_dtype(g.dtype if np.issubdtype(g.dtype, np.floating) else np.float32)
  )
  checks.finite_matrix(g, 'g_obs')
  return g


@jax.jit
def _norms(g):
  return jnp.linalg.norm(g, axis=-1)


@jax.jit
def _cosines(g, r):
  dot = g @ r
  norms = jnp.linalg.norm(g, axis=-1) * jnp.linalg.norm(r)
  tiny = jnp.finfo(g.dtype).tiny
  return jnp.where(norms > tiny, dot / jnp.maximum(norms, tiny), 0.0)


def label_norm(
  g_obs: jax.typing.ArrayLike, *, positive_fraction: float | None = None
) -> LabelResult:
  """Norm attack: score each example by `||g_i||` (larger -> label 1).

  Args:
    g_obs: [N, d] the gradients the server received (after any DP transform).
    positive_fraction: the attacker's prior P(y = 1) (e.g. the public train marginal); the
      `round(positive_fraction * N)` largest norms are predicted 1. None: threshold at the midpoint
      between the smallest and largest norm.

  Returns:
    A `LabelResult`.

  Raises:
    AttackError (a ValueError): g_obs not [N, d], NaN/inf, positive_fraction outside [0, 1].

  Example:
    >>> r = label_norm([[0.1, 0.0], [0.0, -0.9], [0.2, 0.1]])
    >>> r.labels.tolist()
    [0, 1, 0]

  References:
    Li et al., Label Leakage and Protection in Two-party Split Learning, arXiv:2102.08504 (norm
    scoring attack).
  """
  g = _check_g(g_obs)
  scores = np.asarray(_norms(g)) if g.shape[0] else np.zeros(0, g.dtype)
  labels = np.zeros(g.shape[0], np.int32)
  if not g.shape[0]:
    return LabelResult(scores, labels)
  if positive_fraction is None:
    labels = (scores > 0.5 * (scores.min() + scores.max())).astype(np.int32)
  else:
    if not isinstance(positive_fraction, numbers.Real) or not 0 <= positive_fraction <= 1:
      raise AttackError(f'positive_fraction must be in [0, 1], got {positive_fraction!r}.')
    k = int(round(positive_fraction * g.shape[0]))
    if k:
      labels[np.argsort(-scores, kind='stable')[:k]] = 1
  return LabelResult(scores, labels)


def principal_direction(g_obs: jax.typing.ArrayLike) -> np.ndarray:
  """The top right singular vector of `g` (uncentred), oriented towards its largest-norm row.

  Returns [d] float32 with unit norm (zeros when every row is zero).
  """
  g = _check_g(g_obs)
  if not g.shape[0] or not np.any(g):
    return np.zeros(g.shape[1], g.dtype)
  _, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
  r = vt[0]
  big = g[int(np.argmax(np.linalg.norm(g, axis=1)))]
  if np.dot(r, big) < 0:
    r = -r
  return r.astype(g.dtype)


def label_direction(
  g_obs: jax.typing.ArrayLike,
  *,
  reference=None,
  reference_label: int = 1,
  positive_fraction: float | None = None,
) -> LabelResult:
  """Direction (cosine) attack: score each example by its cosine with a positive reference.

  Args:
    g_obs: [N, d] the gradients the server received.
    reference: the attacker's reference gradient: an int (row of `g_obs` whose label the attacker
      knows, Li et al.'s setting), a [d] vector, or None (default: `principal_direction(g_obs)`,
      which assumes the largest gradient is a positive, unless `positive_fraction` is given).
    reference_label: the label (0 or 1) of the reference; with 0 the cosine's sign is flipped.
    positive_fraction: only with `reference=None`: the attacker's prior P(y = 1); the principal
      direction is then oriented so that the fraction of examples predicted 1 is the closer to it
      (instead of towards the largest gradient). Orientation is the one thing the gradients alone
      cannot tell; the cosines separate the two classes either way.

  Returns:
    A `LabelResult`: scores `cos(g_i, r) * (+1 if reference_label else -1)` in [-1, 1], labels
    `score > 0`.

  Raises:
    AttackError (a ValueError): bad shapes, NaN/inf, a reference row out of range, a bad label.

  Example:
    >>> g = [[0.5, 0.1], [-0.2, -0.1], [0.3, 0.0]]
    >>> label_direction(g, reference=0).labels.tolist()
    [1, 0, 1]

  References:
    Li et al., Label Leakage and Protection in Two-party Split Learning, arXiv:2102.08504 (cosine
    similarity attack).
  """
  g = _check_g(g_obs)
  if reference_label not in (0, 1):
    raise AttackError(f'reference_label must be 0 or 1, got {reference_label!r}.')
  if positive_fraction is not None and reference is not None:
    raise AttackError(
      'positive_fraction orients the default reference; drop it when passing reference.'
    )
  if positive_fraction is not None and (
    not isinstance(positive_fraction, numbers.Real) or not 0 <= positive_fraction <= 1
  ):
    raise AttackError(f'positive_fraction must be in [0, 1], got {positive_fraction!r}.')
  if reference is None:
    r = principal_direction(g)
    if positive_fraction is not None and g.shape[0]:
      frac = float(np.mean(np.asarray(_cosines(g, jnp.asarray(r))) > 0))
      if abs((1.0 - frac) - positive_fraction) < abs(frac - positive_fraction):
        r = -r
  elif isinstance(reference, numbers.Integral) and not isinstance(reference, bool):
    if not 0 <= int(reference) < g.shape[0]:
      raise AttackError(f'reference row {reference} is outside [0, {g.shape[0]}).')
    r = g[int(reference)]
  else:
    r = np.asarray(reference, g.dtype)
    if r.shape != (g.shape[1],) or not np.all(np.isfinite(r)):
      raise AttackError(
        f'reference must be a row index or a finite [d] = ({g.shape[1]},) vector, '
        f'got shape {r.shape}.'
      )
  if not g.shape[0]:
    return LabelResult(np.zeros(0, g.dtype), np.zeros(0, np.int32))
  sign = 1.0 if reference_label == 1 else -1.0
  scores = sign * np.asarray(_cosines(g, jnp.asarray(r)))
  return LabelResult(scores, (scores > 0).astype(np.int32))
