"""Baselines without gradients: the majority prior and k-nearest-neighbours on server-side features.

They measure what the server could guess about each private value (and the label) without the cut
gradient: from the marginal distribution alone (majority prior), or from what it already knows about
the user — its own features or the cut activation `h` (k-NN). On real data k-NN beats the prior
because server features correlate with private ones; that is the paper's "without gradients" column.

References:
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv:2305.12997.
"""

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks

AttackError = checks.AttackError

# Bytes of the [test chunk, N_train] distance block k-NN materialises at once.
KNN_MEMORY_BUDGET_BYTES = 256 * 1024**2


class PriorResult(NamedTuple):
  """The majority prior, per private column.

  Attributes:
    predictions: [P] int32 (or [num_test, P] when `num_test` is given): the most frequent training
      value of each column (ties -> the lower value).
    posteriors: tuple of P float32 arrays [K_j] (or [num_test, K_j]): training frequencies.
  """

  predictions: np.ndarray
  posteriors: tuple[np.ndarray, ...]


class KnnResult(NamedTuple):
  """k-NN predictions for each test row.

  Attributes:
    predictions: [N_te, P] int32, the majority value among the k nearest training rows (vote ties ->
      the lower value).
    posteriors: tuple of P float32 arrays [N_te, K_j], the vote fractions.
  """

  predictions: np.ndarray
  posteriors: tuple[np.ndarray, ...]


def _check_targets(values, cardinalities, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
  cards = checks.cardinalities(cardinalities)
  arr = np.asarray(values)
  if arr.ndim == 1 and len(cards) == 1:
    arr = arr[:, None]
  if arr.ndim != 2 or arr.shape[1] != len(cards):
    raise AttackError(
      f'{name} must be [N, P] with P = len(cardinalities) = {len(cards)}, got shape {arr.shape}.'
    )
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.equal(np.mod(arr, 1), 0)):
      raise AttackError(f'{name} must hold integer codes, got dtype {arr.dtype} with fractions.')
  arr = arr.astype(np.int64)
  for j, k in enumerate(cards):
    col = arr[:, j]
    if col.size and (col.min() < 0 or col.max() >= k):
      raise AttackError(
        f'{name}[:, {j}] must lie in [0, {k}) (cardinalities {cards}), got values '
        f'in [{col.min()}, {col.max()}].'
      )
  return arr.astype(np.int32), cards


def majority_prior(
  train_values: np.ndarray, cardinalities: Sequence[int], *, num_test: int | None = None
) -> PriorResult:
  """Predicts each private column's most frequent training value, for every test user.

  Args:
    train_values: [N_tr, P] int codes of the private columns (append the label as a column of
      cardinality 2 to get the label's prior too).
    cardinalities: P ints >= 1.
    num_test: when given, predictions and posteriors are tiled to [num_test, ...].

  Returns:
    A `PriorResult`; ties between equally frequent values go to the lower value.

  Raises:
    AttackError (a ValueError): bad shapes, codes out of range, or no training rows.

  Example:
    >>> majority_prior([[0, 2], [1, 2], [1, 0]], (2, 3)).predictions.tolist()
    [1, 2]
  """
  values, cards = _check_targets(train_values, cardinalities, 'train_values')
  if values.shape[0] == 0:
    raise AttackError('train_values has no rows; the prior needs at least one training example.')
  posts = tuple(
    (np.bincount(values[:, j], minlength=k) / values.shape[0]).astype(np.float32)
    for j, k in enumerate(cards)
  )
  preds = np.array([int(np.argmax(p)) for p in posts], dtype=np.int32)
  if num_test is not None:
    preds = np.tile(preds, (num_test, 1))
    posts = tuple(np.tile(p, (num_test, 1)) for p in posts)
  return PriorResult(preds, posts)


def server_feature_matrix(
  pub_cat: np.ndarray, pub_dense: np.ndarray, pub_cardinalities: Sequence[int]
) -> np.ndarray:
  """The server's own view of each user for k-NN: one-hot categoricals, then dense features.

  Args:
    pub_cat: [N, Sc] int codes of the server's categorical features.
    pub_dense: [N, Sd] float dense features (already scaled, e.g. min-max on train stats).
    pub_cardinalities: Sc ints, the number of values of each categorical column.

  Returns:
    [N, sum(pub_cardinalities) + Sd] float32.

  Raises:
    AttackError (a ValueError): shapes disagree or codes are out of range.
  """
  cat, cards = _check_targets(pub_cat, pub_cardinalities, 'pub_cat')
  dense = np.asarray(pub_dense, dtype=np.float32)
  if dense.ndim == 1:
    dense = dense[:, None]
  if dense.ndim != 2 or dense.shape[0] != cat.shape[0]:
    raise AttackError(
      f'pub_dense must be [N, Sd] with N = {cat.shape[0]} rows like pub_cat '
      f'{cat.shape}, got shape {dense.shape}.'
    )
  blocks = [np.eye(k, dtype=np.float32)[cat[:, j]] for j, k in enumerate(cards)]
  return np.concatenate(blocks + [dense], axis=1)


@functools.partial(jax.jit, static_argnames=('k', 'cardinalities'))
def _knn_chunk(train_x, train_sq, train_y, test_x, *, k: int, cardinalities: tuple[int, ...]):
  """Votes of the k nearest training rows for a chunk of test rows."""
  # Squared euclidean distances, ||a||^2 - 2 a.b + ||b||^2, as one matrix product.
  d2 = (
    jnp.sum(jnp.square(test_x), axis=1, keepdims=True)
    - 2.0 * test_x @ train_x.T
    + train_sq[None, :]
  )
  _, idx = jax.lax.top_k(-d2, k)  # [n, k]; equal distances -> lower training index first
  neighbours = train_y[idx]  # [n, k, P]
  posts = tuple(
    jnp.mean(jax.nn.one_hot(neighbours[..., j], kj), axis=1) for j, kj in enumerate(cardinalities)
  )
  preds = jnp.stack([jnp.argmax(p, axis=-1) for p in posts], axis=-1).astype(jnp.int32)
  return preds, posts


def knn(
  train_features: np.ndarray,
  train_targets: np.ndarray,
  test_features: np.ndarray,
  cardinalities: Sequence[int],
  *,
  k: int = 30,
  chunk_size: int | None = None,
) -> KnnResult:
  """k-nearest-neighbour guess of each test user's private values from server-side features.

  Distances are euclidean on the given features (e.g. `server_feature_matrix(...)` or the cut
  activations `h`), computed in chunks of test rows with one matrix product each; the k nearest
  training rows vote per column.

  Args:
    train_features: [N_tr, F] float features of the training users.
    train_targets: [N_tr, P] int codes of their private values (and label, as a column).
    test_features: [N_te, F] float features of the attacked users.
    cardinalities: P ints >= 1.
    k: neighbours per vote, 1 <= k <= N_tr (paper: 30).
    chunk_size: test rows per chunk (None: keeps the [chunk, N_tr] distance block under 256 MiB).

  Returns:
    A `KnnResult`: majority vote per column (vote ties -> the lower value) and the vote fractions.
    Among training rows at exactly equal distance the lower training index is preferred, up to
    float32 rounding of the distances.

  Raises:
    AttackError (a ValueError): bad shapes, codes out of range, NaN features, or k out of range.
  """
  targets, cards = _check_targets(train_targets, cardinalities, 'train_targets')
  train_x = np.asarray(train_features, dtype=np.float32)
  test_x = np.asarray(test_features, dtype=np.float32)
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise AttackError(
      f'train_features and test_features must be [N, F] with the same F, got '
      f'{train_x.shape} and {test_x.shape}.'
    )
  if train_x.shape[0] != targets.shape[0]:
    raise AttackError(
      f'train_features {train_x.shape} and train_targets {targets.shape} must have '
      'the same number of rows.'
    )
  for name, x in (('train_features', train_x), ('test_features', test_x)):
    if not np.all(np.isfinite(x)):
      raise AttackError(f'{name} {x.shape} contains NaN or inf.')
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= train_x.shape[0]:
    raise AttackError(f'k must be an int in [1, N_tr = {train_x.shape[0]}], got {k!r}.')
  num_test = test_x.shape[0]
  if num_test == 0:
    return KnnResult(
      np.zeros((0, len(cards)), np.int32), tuple(np.zeros((0, kj), np.float32) for kj in cards)
    )
  if chunk_size is None:
    chunk_size = max(1, KNN_MEMORY_BUDGET_BYTES // (4 * 3 * max(1, train_x.shape[0])))
    chunk_size = min(1 << (chunk_size.bit_length() - 1), 1 << max(0, num_test - 1).bit_length())
  elif (
    isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
  ):
    raise AttackError(f'chunk_size must be a positive int or None, got {chunk_size!r}.')
  train_dev = jnp.asarray(train_x)
  train_sq = jnp.sum(jnp.square(train_dev), axis=1)
  targets_dev = jnp.asarray(targets)
  num_chunks = math.ceil(num_test / chunk_size)
  padded = np.concatenate([test_x, np.repeat(test_x[:1], num_chunks * chunk_size - num_test, 0)])
  outs = [
    _knn_chunk(
      train_dev,
      train_sq,
      targets_dev,
      jnp.asarray(padded[i * chunk_size : (i + 1) * chunk_size]),
      k=int(k),
      cardinalities=cards,
    )
    for i in range(num_chunks)
  ]
  preds = np.concatenate([np.asarray(o[0]) for o in outs])[:num_test]
  posts = tuple(
    np.concatenate([np.asarray(o[1][j]) for o in outs])[:num_test] for j in range(len(cards))
  )
  return KnnResult(preds, posts)
