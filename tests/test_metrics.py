"""Tests of splitjax.metrics: intervals, F1, AUC, log-loss, baselines."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from splitjax import metrics


@pytest.mark.parametrize(
  'k, n, lo, hi',
  [
    (50, 100, 0.3983, 0.6017),
    (0, 10, 0.0, 0.3085),
    (10, 10, 0.6915, 1.0),
    (1, 1, 0.025, 1.0),
    (3, 20, 0.0321, 0.3789),
  ],
)
def test_clopper_pearson_known_values(k, n, lo, hi):
  got = metrics.clopper_pearson(k, n)
  np.testing.assert_allclose(got, (lo, hi), atol=1e-4)
  assert isinstance(got[0], float) and isinstance(got[1], float)


def test_clopper_pearson_edges_are_exact():
  assert metrics.clopper_pearson(0, 7)[0] == 0.0
  assert metrics.clopper_pearson(7, 7)[1] == 1.0
  assert metrics.clopper_pearson(0, 0) == (0.0, 1.0)


def test_clopper_pearson_matches_scipy_exact_interval():
  for k, n in [(0, 5), (2, 5), (5, 5), (17, 40), (399, 400)]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method='exact')
    np.testing.assert_allclose(metrics.clopper_pearson(k, n, 0.9), (ci.low, ci.high), atol=1e-10)


def test_clopper_pearson_coverage_is_at_least_nominal():
  # Exact coverage: sum of Binomial(n, p) probabilities of the k whose interval contains p.
  n = 25
  intervals = np.array([metrics.clopper_pearson(k, n) for k in range(n + 1)])
  for p in np.linspace(0.001, 0.999, 101):
    covered = (intervals[:, 0] <= p) & (p <= intervals[:, 1])
    coverage = stats.binom.pmf(np.arange(n + 1), n, p)[covered].sum()
    assert coverage >= 0.95 - 1e-12, (p, coverage)


@pytest.mark.parametrize('k, n', [(-1, 5), (6, 5), (1.5, 5), (1, -2)])
def test_clopper_pearson_bad_counts(k, n):
  with pytest.raises(ValueError, match='successes'):
    metrics.clopper_pearson(k, n)


def test_accuracy_record():
  out = metrics.accuracy(jnp.array([1, 0, 2, 2]), np.array([1, 0, 1, 2]))
  assert out['accuracy'] == 0.75 and out['n'] == 4 and out['correct'] == 3
  assert out['ci'] == list(metrics.clopper_pearson(3, 4))
  with pytest.raises(ValueError, match='shapes'):
    metrics.accuracy([1, 0], [1, 0, 1])
  with pytest.raises(ValueError, match='empty'):
    metrics.accuracy([], [])


def test_macro_f1_hand_computed_multiclass():
  true = [0, 0, 1, 1, 2, 2]
  pred = [0, 1, 1, 1, 2, 0]
  # class 0: TP1 FP1 FN1 -> 1/2; class 1: TP2 FP1 FN0 -> 4/5; class 2: TP1 FP0 FN1 -> 2/3;
  # class 3 appears in neither -> excluded.
  want = (0.5 + 0.8 + 2 / 3) / 3
  assert metrics.macro_f1(pred, true, 4) == pytest.approx(want)


def test_macro_f1_binary_is_f1_of_class_one():
  true = [1, 0, 0, 1, 1]
  pred = [1, 1, 0, 0, 1]  # TP2 FP1 FN1
  assert metrics.macro_f1(pred, true, 2) == pytest.approx(2 / 3)
  assert metrics.macro_f1(true, true, 2) == 1.0
  assert np.isnan(metrics.macro_f1([0, 0], [0, 0], 2))  # class 1 absent: undefined


def test_macro_f1_class_only_in_pred_counts_as_zero():
  # class 2 only predicted: F1 = 0 and included; class 1 perfect.
  assert metrics.macro_f1([1, 2], [1, 1], 3) == pytest.approx((2 / 3 + 0.0) / 2)


def test_macro_f1_rejects_out_of_range():
  with pytest.raises(ValueError, match='num_classes'):
    metrics.macro_f1([0, 3], [0, 1], 3)


def _pairwise_auc(scores, labels):
  pos, neg = scores[labels == 1], scores[labels == 0]
  wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


def test_roc_auc_equals_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(5):
    labels = rng.integers(0, 2, size=60)
    scores = rng.integers(0, 6, size=60).astype(np.float32)  # many ties
    assert metrics.roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))


def test_roc_auc_limits():
  labels = np.array([0, 0, 0, 1, 1])
  assert metrics.roc_auc(jnp.array([0.1, 0.2, 0.3, 0.7, 0.9]), labels) == 1.0
  assert metrics.roc_auc(-np.array([0.1, 0.2, 0.3, 0.7, 0.9]), labels) == 0.0
  assert metrics.roc_auc(np.zeros(5), labels) == 0.5
  assert np.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))
  with pytest.raises(ValueError, match='finite'):
    metrics.roc_auc([np.nan, 0.2], [0, 1])


def test_log_loss_stable_at_extreme_logits():
  z = np.array([1e4, -1e4, 1e4, -1e4])
  y = np.array([1, 0, 0, 1])
  out = metrics.log_loss(z, y)
  assert np.isfinite(out)
  assert out == pytest.approx(1e4 / 2)  # two correct (loss 0) and two wrong (loss 1e4)
  assert metrics.log_loss(jnp.array([30.0, -30.0], jnp.float32), [1, 0]) == pytest.approx(
    np.log1p(np.exp(-30.0))
  )


def test_log_loss_equals_naive_formula():
  rng = np.random.default_rng(1)
  z = rng.normal(scale=3.0, size=100)
  y = rng.integers(0, 2, size=100)
  p = 1 / (1 + np.exp(-z))
  naive = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert metrics.log_loss(z, y) == pytest.approx(naive, rel=1e-12)


def test_binary_accuracy():
  assert metrics.binary_accuracy([2.0, -1.0, 0.0, 0.5], [1, 0, 1, 0]) == 0.5


def test_majority_prior():
  cls, probs = metrics.majority_prior(jnp.array([0, 2, 2, 1, 2]), 4)
  assert cls == 2
  np.testing.assert_allclose(probs, [0.2, 0.2, 0.6, 0.0])
  assert probs.dtype == np.float64
  assert metrics.majority_prior([1, 0], 2)[0] == 0  # ties -> smallest code


def test_feature_report():
  true = np.array([0, 1, 2, 2, 1, 0])
  pred = np.array([0, 1, 2, 1, 1, 0])
  rep = metrics.feature_report(pred, true, 3, prior_pred=2, knn_pred=[0, 0, 2, 2, 0, 0])
  assert set(rep) == {'accuracy', 'ci', 'macro_f1', 'prior_accuracy', 'knn_accuracy', 'n'}
  assert rep['accuracy'] == pytest.approx(5 / 6)
  assert rep['prior_accuracy'] == pytest.approx(2 / 6)
  assert rep['knn_accuracy'] == pytest.approx(4 / 6)
  assert rep['n'] == 6
  assert rep['macro_f1'] == pytest.approx(metrics.macro_f1(pred, true, 3))
  bare = metrics.feature_report(pred, true, 3)
  assert bare['prior_accuracy'] is None and bare['knn_accuracy'] is None
