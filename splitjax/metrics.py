"""Host-side leakage and utility metrics: accuracy with intervals, macro F1, AUC, log-loss.

Everything here runs in numpy/scipy in float64 on the host. Inputs may be numpy or JAX arrays (they
are copied to the host with `np.asarray`). Ground truth of an attack reaches only these functions.
"""

import math

import numpy as np
from scipy import stats


def _as_labels(x, name: str) -> np.ndarray:
  """Returns `x` as a flat int64 array, checking that every value is a finite integer."""
  a = np.asarray(x)
  if a.dtype.kind == 'b':
    return a.astype(np.int64).ravel()
  if a.dtype.kind in 'iu':
    return a.astype(np.int64).ravel()
  if a.dtype.kind == 'f':
    if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
      raise ValueError(
        f'{name} must hold integer class codes, got non-integer or non-finite values '
        f'(dtype {a.dtype}, shape {a.shape})'
      )
    return a.astype(np.int64).ravel()
  raise ValueError(f'{name} must hold integer class codes, got dtype {a.dtype} (shape {a.shape})')


def _check_pair(pred: np.ndarray, true: np.ndarray, pred_name='pred', true_name='true'):
  if pred.shape != true.shape:
    raise ValueError(
      f'{pred_name} and {true_name} must have the same number of examples, got shapes '
      f'{pred.shape} and {true.shape}'
    )
  if pred.size == 0:
    raise ValueError(f'{pred_name} and {true_name} are empty: metrics need at least one example')


def _check_range(a: np.ndarray, num_classes: int, name: str):
  if a.size and (a.min() < 0 or a.max() >= num_classes):
    raise ValueError(
      f'{name} has class codes in [{a.min()}, {a.max()}], outside [0, {num_classes}); '
      f'check num_classes'
    )


def _check_num_classes(num_classes) -> int:
  if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  return int(num_classes)


def clopper_pearson(successes, trials, confidence: float = 0.95) -> tuple[float, float]:
  """Exact (Clopper-Pearson) two-sided confidence interval for a binomial proportion.

  The interval is `[B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)]` with `B(q; a, b)` the Beta quantile and
  `a = 1 - confidence`; the lower end is 0 when `k = 0` and the upper end 1 when `k = n`. Its
  coverage
  is at least `confidence` for every true proportion (it is conservative).

  Args:
    successes: number of successes `k`, an integer in `[0, trials]`.
    trials: number of trials `n >= 0`. With `n = 0` the interval is `(0.0, 1.0)`.
    confidence: two-sided confidence level in (0, 1).

  Returns:
    `(lo, hi)` as Python floats.

  Raises:
    ValueError: if the counts are not integers with `0 <= successes <= trials`, or `confidence` is
      outside (0, 1).

  References:
    Clopper, Pearson, "The use of confidence or fiducial limits illustrated in the case of the
    binomial", Biometrika 26(4), 1934.

  Example:
    >>> lo, hi = clopper_pearson(0, 10)
    >>> (lo, round(hi, 4))
    (0.0, 0.3085)
  """
  k, n = np.asarray(successes), np.asarray(trials)
  if k.ndim or n.ndim or k != np.round(k) or n != np.round(n) or not 0 <= k <= n:
    raise ValueError(
      f'clopper_pearson needs integer counts with 0 <= successes <= trials, got '
      f'successes={successes!r}, trials={trials!r}'
    )
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence!r}')
  k, n = int(k), int(n)  # type: ignore[assignment]  # the checked counts as Python ints
  if n == 0:
    return 0.0, 1.0
  alpha = 1.0 - confidence
  lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
  hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
  return lo, hi


def accuracy(pred, true, *, confidence: float = 0.95) -> dict:
  """Fraction of exact matches, with a Clopper-Pearson interval.

  Args:
    pred: predicted class codes, `[N]` (any shape; flattened).
    true: true class codes, same shape as `pred`.
    confidence: level of the interval.

  Returns:
    `{'accuracy': float, 'ci': [lo, hi], 'n': N, 'correct': int}`.

  Raises:
    ValueError: if the shapes differ, the inputs are empty or not integer codes.
  """
  p, t = _as_labels(pred, 'pred'), _as_labels(true, 'true')
  _check_pair(p, t)
  correct = int(np.sum(p == t))
  n = int(p.size)
  lo, hi = clopper_pearson(correct, n, confidence)
  return {'accuracy': correct / n, 'ci': [lo, hi], 'n': n, 'correct': correct}


def _f1_per_class(p: np.ndarray, t: np.ndarray, num_classes: int):
  """Returns (f1 [C], present [C] bool): per-class F1 = 2TP / (2TP + FP + FN)."""
  tp = np.bincount(t[p == t], minlength=num_classes).astype(np.float64)
  pred_count = np.bincount(p, minlength=num_classes).astype(np.float64)
  true_count = np.bincount(t, minlength=num_classes).astype(np.float64)
  denom = pred_count + true_count  # = 2TP + FP + FN
  present = denom > 0
  f1 = np.divide(2 * tp, denom, out=np.full(num_classes, np.nan), where=present)
  return f1, present


def macro_f1(pred, true, num_classes: int) -> float:
  """Macro-averaged F1; for `num_classes == 2`, the binary F1 of the positive class 1.

  With two classes this is the usual binary F1 of class 1 (not the mean over both classes), as is
  conventional for binary secrets such as the label or `sex`. It is NaN when class 1 appears in
  neither `pred` nor `true` (F1 is undefined there). With more classes it is the unweighted mean of
  the per-class F1 `2TP / (2TP + FP + FN)` over the classes that appear in `true` or in `pred`; a
  class absent from both is excluded rather than counted as 0 or 1.

  Args:
    pred: predicted class codes in `[0, num_classes)`, `[N]`.
    true: true class codes in `[0, num_classes)`, same shape.
    num_classes: number of classes `C >= 1`.

  Returns:
    The F1 score as a Python float in [0, 1] (or NaN in the binary case above).

  Raises:
    ValueError: on shape mismatch, empty inputs, or codes outside `[0, num_classes)`.

  Example:
    >>> macro_f1([1, 1, 0, 0], [1, 0, 0, 0], 2)  # TP=1, FP=1, FN=0
    0.6666666666666666
  """
  num_classes = _check_num_classes(num_classes)
  p, t = _as_labels(pred, 'pred'), _as_labels(true, 'true')
  _check_pair(p, t)
  _check_range(p, num_classes, 'pred')
  _check_range(t, num_classes, 'true')
  f1, present = _f1_per_class(p, t, num_classes)
  if num_classes == 2:
    return float(f1[1])
  return float(np.mean(f1[present]))


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve, from the Mann-Whitney rank statistic.

  AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie), computed from
  average ranks (ties get the mean rank), in O(N log N).

  Args:
    scores: real scores or logits, `[N]`; larger means "more likely 1".
    labels: binary labels in {0, 1} (or bool), same shape.

  Returns:
    The AUC as a Python float; NaN when `labels` contains only one class (AUC is undefined).

  Raises:
    ValueError: on shape mismatch, empty inputs, non-finite scores or labels outside {0, 1}.

  Example:
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
  """
  s = np.asarray(scores, dtype=np.float64).ravel()
  y = _as_labels(labels, 'labels')
  _check_pair(s, y, 'scores', 'labels')
  if not np.all(np.isfinite(s)):
    raise ValueError(
      f'scores must be finite, got {int(np.sum(~np.isfinite(s)))} NaN/inf of {s.size}'
    )
  _check_range(y, 2, 'labels')
  n_pos = int(np.sum(y == 1))
  n_neg = int(y.size - n_pos)
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  ranks = stats.rankdata(s, method='average')
  u = np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def log_loss(logits, labels) -> float:
  """Mean binary cross-entropy computed stably from logits.

  `l(z, y) = softplus(z) - y z = max(z, 0) - y z + log1p(exp(-|z|))`, which stays finite for any
  finite logit (no `log(sigmoid(z))`).

  Args:
    logits: real logits `z`, `[N]`.
    labels: targets in [0, 1] (hard or soft), same shape.

  Returns:
    The mean loss as a Python float (natural log).

  Raises:
    ValueError: on shape mismatch, empty inputs, non-finite logits or labels outside [0, 1].
  """
  z = np.asarray(logits, dtype=np.float64).ravel()
  y = np.asarray(labels, dtype=np.float64).ravel()
  _check_pair(z, y, 'logits', 'labels')
  if not np.all(np.isfinite(z)):
    raise ValueError(
      f'logits must be finite, got {int(np.sum(~np.isfinite(z)))} NaN/inf of {z.size}'
    )
  if not np.all((y >= 0) & (y <= 1)):
    raise ValueError('labels must lie in [0, 1] for log_loss')
  return float(np.mean(np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))))


def binary_accuracy(logits, labels) -> float:
  """Accuracy of the rule `predict 1 iff logit > 0` (i.e. sigmoid(logit) > 1/2).

  Args:
    logits: real logits, `[N]`.
    labels: binary labels in {0, 1}, same shape.

  Returns:
    The accuracy as a Python float.

  Raises:
    ValueError: on shape mismatch, empty inputs or labels outside {0, 1}.
  """
  z = np.asarray(logits, dtype=np.float64).ravel()
  y = _as_labels(labels, 'labels')
  _check_pair(z, y, 'logits', 'labels')
  _check_range(y, 2, 'labels')
  return float(np.mean((z > 0).astype(np.int64) == y))


def majority_prior(train_values, num_classes: int) -> tuple[int, np.ndarray]:
  """Empirical marginal distribution of a categorical value and its most frequent class.

  This is the "majority prior" baseline: an attacker with no gradient guesses the most frequent
  training value for everyone.

  Args:
    train_values: class codes seen in training, `[N]`, in `[0, num_classes)`.
    num_classes: number of classes.

  Returns:
    `(majority_class, probabilities)`: the argmax class (the smallest code on ties) as an int and
    the
    float64 frequencies `[num_classes]`, summing to 1.

  Raises:
    ValueError: on empty input or codes outside `[0, num_classes)`.

  Example:
    >>> majority_prior([0, 2, 2, 1], 3)
    (2, array([0.25, 0.25, 0.5 ]))
  """
  num_classes = _check_num_classes(num_classes)
  v = _as_labels(train_values, 'train_values')
  if v.size == 0:
    raise ValueError('train_values is empty: the majority prior needs at least one training value')
  _check_range(v, num_classes, 'train_values')
  probs = np.bincount(v, minlength=num_classes).astype(np.float64) / v.size
  return int(np.argmax(probs)), probs


def feature_report(
  pred, true, num_classes: int, *, prior_pred=None, knn_pred=None, confidence: float = 0.95
) -> dict:
  """The per-feature record of an attack report (one private feature or the label).

  Args:
    pred: the attack's guesses, `[N]` class codes.
    true: the true values, `[N]`.
    num_classes: the feature's cardinality.
    prior_pred: optional guesses of the majority-prior baseline: `[N]` codes, or a single class code
      (the prior guesses the same class for everyone).
    knn_pred: optional guesses of the k-NN baseline, `[N]` codes (or a single code).
    confidence: level of the Clopper-Pearson interval.

  Returns:
    `{'accuracy', 'ci': [lo, hi], 'macro_f1', 'prior_accuracy', 'knn_accuracy', 'n'}`; the baseline
    accuracies are None when their predictions are not given. `macro_f1` follows `macro_f1`
    (binary F1
    of class 1 for two classes).

  Raises:
    ValueError: on shape mismatch, empty inputs or codes outside `[0, num_classes)`.
  """
  acc = accuracy(pred, true, confidence=confidence)
  t = _as_labels(true, 'true')

  def _baseline(b, name):
    if b is None:
      return None
    b = _as_labels(b, name)
    if b.size == 1 and t.size != 1:
      b = np.full_like(t, b[0])
    _check_pair(b, t, name, 'true')
    _check_range(b, num_classes, name)
    return float(np.mean(b == t))

  return {
    'accuracy': acc['accuracy'],
    'ci': acc['ci'],
    'macro_f1': macro_f1(pred, true, num_classes),
    'prior_accuracy': _baseline(prior_pred, 'prior_pred'),
    'knn_accuracy': _baseline(knn_pred, 'knn_pred'),
    'n': acc['n'],
  }


def paired_difference(correct_a, correct_b, *, confidence: float = 0.95) -> dict:
  """Accuracy of A minus accuracy of B on the same users, with a McNemar-type interval.

  Only the discordant users carry information: `b` where A is right and B wrong, `c` the reverse.
  The difference is `(b - c) / n` and its interval the Wald interval of a paired difference,
  `+- z sqrt((b + c) - (b - c)^2 / n) / n` (clipped to [-1, 1]); `p_value` is the exact two-sided
  McNemar (binomial) test of b = c.

  Args:
    correct_a: `[N]` bool, A's answer is right.
    correct_b: `[N]` bool, B's answer is right (same users, same order).
    confidence: level of the interval.

  Returns:
    `{'difference', 'ci': [lo, hi], 'p_value', 'discordant': [b, c], 'n'}`.

  Raises:
    ValueError: shapes differ or no users.

  References:
    McNemar, "Note on the sampling error of the difference between correlated proportions or
    percentages", Psychometrika 12 (1947).
  """
  a = np.asarray(correct_a, bool).reshape(-1)
  b_ = np.asarray(correct_b, bool).reshape(-1)
  if a.shape != b_.shape or a.size == 0:
    raise ValueError(
      f'correct_a and correct_b must be non-empty [N] arrays of the same shape, got '
      f'{a.shape} and {b_.shape}'
    )
  n = a.size
  b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
  diff = (b - c) / n
  z = float(stats.norm.ppf(0.5 + confidence / 2))
  half = z * math.sqrt(max((b + c) - (b - c) ** 2 / n, 0.0)) / n
  p_value = float(stats.binomtest(b, b + c).pvalue) if b + c else 1.0
  return {
    'difference': diff,
    'ci': [max(-1.0, diff - half), min(1.0, diff + half)],
    'p_value': p_value,
    'discordant': [b, c],
    'n': n,
  }
