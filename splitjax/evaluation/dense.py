"""Scores of continuous (dense) private features: errors in original units and their baselines."""

import numpy as np

from splitjax import attacks
from splitjax import metrics

DENSE_KNN_BINS = 100  # the k-NN baseline of a dense feature votes over this many bins of [0, 1]


def dense_report(
  pred, true, value_range: tuple[float, float], tolerance: float, *, prior_pred=None, knn_pred=None
) -> dict:
  """Errors of a continuous feature in original units; inputs are min-max scaled values.

  Returns ``{'mae', 'rmse', 'median_abs_error', 'within_tolerance', 'ci', 'tolerance', 'n',
  'prior_mae', 'prior_within_tolerance', 'knn_mae', 'knn_within_tolerance'}`` (baselines None when
  not given); ``ci`` is the Clopper-Pearson interval of ``within_tolerance``.
  """
  lo, hi = value_range
  scale = hi - lo
  true_v = lo + scale * np.asarray(true, np.float64)

  def errors(p):
    return np.abs(lo + scale * np.asarray(p, np.float64) - true_v)

  err = errors(pred)
  within = err <= tolerance
  out = {
    "mae": float(err.mean()),
    "rmse": float(np.sqrt(np.mean(err**2))),
    "median_abs_error": float(np.median(err)),
    "within_tolerance": float(within.mean()),
    "ci": list(metrics.clopper_pearson(int(within.sum()), int(within.size))),
    "tolerance": float(tolerance),
    "n": int(err.size),
  }
  for name, p in (("prior", prior_pred), ("knn", knn_pred)):
    if p is None:
      out[f"{name}_mae"] = out[f"{name}_within_tolerance"] = None
      continue
    e = errors(np.broadcast_to(p, err.shape))
    out[f"{name}_mae"] = float(e.mean())
    out[f"{name}_within_tolerance"] = float(np.mean(e <= tolerance))
  return out


def dense_baselines(dataset, users: str, rows: np.ndarray, k: int):
  """Per private dense feature: (train median, k-NN posterior median on server features)."""
  ref = dataset.test if users == "train" else dataset.train
  query = dataset.train if users == "train" else dataset.test
  ref_x = attacks.server_feature_matrix(ref.pub_cat, ref.pub_dense, dataset.pub_cardinalities)
  query_x = attacks.server_feature_matrix(
    query.pub_cat[rows], query.pub_dense[rows], dataset.pub_cardinalities
  )
  bins = np.clip((ref.priv_dense * DENSE_KNN_BINS).astype(np.int64), 0, DENSE_KNN_BINS - 1)
  cards = (DENSE_KNN_BINS,) * bins.shape[1]
  knn = attacks.knn(ref_x, bins, query_x, cards, k=k) if bins.shape[1] else None
  out = []
  for j in range(bins.shape[1]):
    assert knn is not None  # there is a dense feature
    cdf = np.cumsum(knn.posteriors[j], axis=1)
    median_bin = np.argmax(cdf >= 0.5 - 1e-6, axis=1)
    out.append(
      (float(np.median(dataset.train.priv_dense[:, j])), (median_bin + 0.5) / DENSE_KNN_BINS)
    )
  return out
