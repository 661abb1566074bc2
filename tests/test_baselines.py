"""Tests of the gradient-free baselines: majority prior and k-NN."""

import math

import numpy as np
import pytest

from splitjax.attacks import baselines

CARDS = (3, 4, 2)


def numpy_knn(train_x, train_y, test_x, cards, k):
  """Brute-force k-NN in float64: stable sort by distance, vote, ties -> lower value."""
  d2 = ((test_x[:, None, :].astype(np.float64) - train_x[None, :, :]) ** 2).sum(-1)
  idx = np.argsort(d2, axis=1, kind='stable')[:, :k]
  preds = np.zeros((len(test_x), len(cards)), np.int32)
  posts = []
  for j, kj in enumerate(cards):
    counts = np.stack([np.bincount(train_y[i, j], minlength=kj) for i in idx])
    posts.append(counts / k)
    preds[:, j] = counts.argmax(axis=1)
  return preds, posts


def independent_data(rng, n, cards, num_features=6, probs=None):
  """Server features and private values drawn independently (skewed marginals)."""
  x = rng.normal(size=(n, num_features)).astype(np.float32)
  cols = []
  for k in cards:
    p = np.arange(k, 0, -1, dtype=np.float64) ** 2 if probs is None else probs
    cols.append(rng.choice(k, size=n, p=p / p.sum()))
  return x, np.stack(cols, 1).astype(np.int32)


def test_knn_equals_numpy_brute_force():
  rng = np.random.default_rng(0)
  train_x, train_y = independent_data(rng, 300, CARDS)
  test_x, _ = independent_data(rng, 77, CARDS)
  for k, chunk in ((1, None), (7, 16), (30, None)):
    r = baselines.knn(train_x, train_y, test_x, CARDS, k=k, chunk_size=chunk)
    preds, posts = numpy_knn(train_x, train_y, test_x, CARDS, k)
    np.testing.assert_array_equal(r.predictions, preds)
    for a, b in zip(r.posteriors, posts, strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)
    assert r.predictions.shape == (77, 3) and r.predictions.dtype == np.int32


def test_knn_vote_ties_go_to_lower_value():
  train_x = np.array([[0.0], [1.0], [10.0]], np.float32)
  train_y = np.array([[1], [0], [1]], np.int32)
  r = baselines.knn(train_x, train_y, np.array([[0.4]], np.float32), (2,), k=2)
  assert r.predictions.tolist() == [[0]]  # one vote each: the lower value
  np.testing.assert_allclose(r.posteriors[0], [[0.5, 0.5]])


def test_majority_prior():
  values = np.array([[0, 1, 1], [2, 1, 0], [2, 3, 0], [1, 0, 1]], np.int32)
  r = baselines.majority_prior(values, CARDS)
  assert r.predictions.tolist() == [2, 1, 0]  # column 2: tie 0/1 -> 0
  np.testing.assert_allclose(r.posteriors[0], [0.25, 0.25, 0.5])
  tiled = baselines.majority_prior(values, CARDS, num_test=5)
  assert tiled.predictions.shape == (5, 3) and tiled.posteriors[1].shape == (5, 4)


def _accuracy(pred, truth):
  return np.mean(pred == truth, axis=0)


def test_knn_within_three_standard_errors_of_prior_on_independent_data():
  rng = np.random.default_rng(1)
  train_x, train_y = independent_data(rng, 3000, CARDS)
  test_x, test_y = independent_data(rng, 1500, CARDS)
  prior = baselines.majority_prior(train_y, CARDS, num_test=len(test_y))
  knn = baselines.knn(train_x, train_y, test_x, CARDS, k=30)
  acc_prior = _accuracy(prior.predictions, test_y)
  acc_knn = _accuracy(knn.predictions, test_y)
  se = np.sqrt(acc_prior * (1 - acc_prior) / len(test_y))
  assert np.all(np.abs(acc_knn - acc_prior) <= 3 * se), (acc_knn, acc_prior, se)


def test_knn_beats_prior_on_correlated_data():
  rng = np.random.default_rng(2)
  n_tr, n_te = 2000, 1000
  x = rng.normal(size=(n_tr + n_te, 4)).astype(np.float32)
  # Each private value is a noisy quantisation of one server feature.
  cols = []
  for j, k in enumerate(CARDS):
    latent = x[:, j] + 0.5 * rng.normal(size=len(x))
    cols.append(np.digitize(latent, np.quantile(latent, np.linspace(0, 1, k + 1)[1:-1])))
  y = np.stack(cols, 1).astype(np.int32)
  prior = baselines.majority_prior(y[:n_tr], CARDS, num_test=n_te)
  knn = baselines.knn(x[:n_tr], y[:n_tr], x[n_tr:], CARDS, k=30)
  acc_prior = _accuracy(prior.predictions, y[n_tr:])
  acc_knn = _accuracy(knn.predictions, y[n_tr:])
  se = np.sqrt(acc_prior * (1 - acc_prior) / n_te)
  assert np.all(acc_knn > acc_prior + 5 * se), (acc_knn, acc_prior)


def test_server_feature_matrix():
  cat = np.array([[0, 2], [1, 0]], np.int32)
  dense = np.array([[0.5], [0.25]], np.float32)
  m = baselines.server_feature_matrix(cat, dense, (2, 3))
  np.testing.assert_array_equal(m, [[1, 0, 0, 0, 1, 0.5], [0, 1, 1, 0, 0, 0.25]])
  assert m.dtype == np.float32


@pytest.mark.parametrize(
  'call, match',
  [
    (
      lambda: baselines.knn(np.zeros((5, 2)), np.zeros((5, 1), np.int32), np.zeros((3, 3)), (2,)),
      r'same F, got \(5, 2\) and \(3, 3\)',
    ),
    (
      lambda: baselines.knn(np.zeros((5, 2)), np.zeros((4, 1), np.int32), np.zeros((3, 2)), (2,)),
      r'train_features \(5, 2\) and train_targets \(4, 1\)',
    ),
    (
      lambda: baselines.knn(
        np.zeros((5, 2)), np.zeros((5, 1), np.int32), np.zeros((3, 2)), (2,), k=6
      ),
      r'k must be an int in \[1, N_tr = 5\], got 6',
    ),
    (
      lambda: baselines.knn(np.zeros((5, 2)), np.full((5, 1), 2), np.zeros((3, 2)), (2,), k=1),
      r'must lie in \[0, 2\)',
    ),
    (
      lambda: baselines.majority_prior(np.zeros((5, 2), np.int32), (2, 0)),
      r'cardinalities\[1\] must be >= 1, got 0',
    ),
    (
      lambda: baselines.server_feature_matrix(np.zeros((3, 1), np.int32), np.zeros((2, 1)), (2,)),
      r'pub_dense must be \[N, Sd\] with N = 3',
    ),
    (
      lambda: baselines.knn(
        np.full((5, 2), np.nan), np.zeros((5, 1), np.int32), np.zeros((3, 2)), (2,), k=1
      ),
      r'train_features \(5, 2\) contains NaN',
    ),
  ],
)
def test_bad_arguments_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_knn_no_test_rows():
  r = baselines.knn(np.zeros((5, 2)), np.zeros((5, 1), np.int32), np.zeros((0, 2)), (2,), k=3)
  assert r.predictions.shape == (0, 1) and r.posteriors[0].shape == (0, 2)
  assert math.isclose(
    float(baselines.majority_prior(np.zeros((5, 1), np.int32), (2,)).posteriors[0][0]), 1.0
  )
