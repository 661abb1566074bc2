"""The attacker's prior over a user's private tuple and label: uniform, marginal or informed.

An honest-but-curious server knows more than the train-set marginals: its own features `x_pub` of
the user, the cut activation `h`, and the device model. The *informed* prior uses all of it:

- over the private tuple, a joint k-NN prior fitted on an auxiliary sample of the population with
  private attributes (the reference rows: the split that is not attacked; never the attacked
  user's own row):
  `p(x) = (1 - lam) * (joint counts among the k nearest reference rows) / k + lam * p_ref(x)`,
  with `p_ref` the empirical joint distribution of tuples on the reference rows (one pseudo-count
  spread uniformly, so no tuple has mass 0); k, lam and the space the neighbours are found in
  (server features or `h`) chosen by cross-validated log-loss on the reference rows;
- over the label, the device model's own `P(y | h, x)` for every enumerated `x` (under label DP
  the model predicts the noisy label: `debias_label_probability` undoes the public flip rate).

Assumption (stated with every result that uses it): the attacker holds such an auxiliary sample.
Jayaraman & Evans (CCS 2022) show that attribute-inference results depend on it; the gain of the
gradient over this prior (`attacks.paired_gain`) is what the gradient itself leaks.

References:
  Jayaraman, Evans. Are Attribute Inference Attacks Just Imputation? CCS 2022, arXiv 2209.01292.
  Qiu, Leontiadis, Melis, Sablayrolles, Stock. Evaluating Privacy Leakage in Split Learning.
  arXiv 2305.12997.
"""

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitjax.attacks import checks
from splitjax.attacks import scoring

PRIORS = ("uniform", "marginal", "informed")
_MEMORY_BUDGET_BYTES = 256 * 1024**2
_LOG_FLOOR = 1e-12


class InformedPrior(NamedTuple):
  """The informed prior over private tuples for N attacked users.

  Attributes:
    probs: [N, C] float64, rows sum to 1; candidates in `candidate_table` order.
    k: neighbours used.
    lam: weight of the reference rows' joint distribution.
    space: the name of the feature space the neighbours were found in.
    cv_log_loss: {f'{space}/k={k}/lam={lam}': mean held-out log-loss of the true tuple}.
    ece: expected calibration error (15 bins) of each feature's marginal top-1 on the held-out
      reference rows, {feature index: ece}.
  """

  probs: np.ndarray
  k: int
  lam: float
  space: str
  cv_log_loss: dict
  ece: dict


def tuple_codes(values: np.ndarray, cardinalities: Sequence[int]) -> np.ndarray:
  """Flat candidate index of each row of private codes `[N, P]` -> `[N]` int64."""
  cards = tuple(int(c) for c in cardinalities)
  values = np.asarray(values, np.int64)
  if not cards:  # no private categorical features: one (empty) candidate
    return np.zeros(len(values) if values.ndim else 1, np.int64)
  values = values.reshape(-1, len(cards))
  return np.ravel_multi_index(tuple(values.T), cards)


@functools.partial(jax.jit, static_argnames=("k",))
def _neighbour_chunk(ref_x, ref_sq, query_x, exclude, *, k: int):
  d2 = jnp.sum(jnp.square(query_x), axis=1, keepdims=True) - 2.0 * query_x @ ref_x.T + ref_sq
  cols = jnp.arange(ref_x.shape[0])[None, :]
  d2 = jnp.where(cols == exclude[:, None], jnp.inf, d2)  # never the user's own row
  return jax.lax.top_k(-d2, k)[1]


def nearest_neighbours(
  ref_x: np.ndarray, query_x: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> np.ndarray:
  """Indices `[N, k]` of the k nearest reference rows (euclidean) of each query row.

  Args:
    ref_x: [R, F] reference features.
    query_x: [N, F] query features.
    k: 1 <= k <= R (R - 1 with `exclude`).
    exclude: optional [N] reference index to leave out per query (-1: none), for leave-one-out.

  Returns:
    [N, k] int32, nearest first (equal distances: lower index first, up to float32 rounding).
  """
  ref_x = np.asarray(ref_x, np.float32)
  query_x = np.asarray(query_x, np.float32)
  n, r = len(query_x), len(ref_x)
  exclude = np.full(n, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
  if not 1 <= k <= r - (1 if (exclude >= 0).any() else 0):
    raise checks.AttackError(f"k={k} must lie in [1, {r}] (the reference rows)")
  chunk = max(1, min(n, _MEMORY_BUDGET_BYTES // (4 * max(r, 1))))
  chunk = 1 << (chunk.bit_length() - 1)  # a power of two: few compilations
  ref_sq = np.sum(np.square(ref_x), axis=1)[None, :]
  out = np.empty((n, k), np.int32)
  for start in range(0, n, chunk):
    part = slice(start, min(start + chunk, n))
    q, ex = query_x[part], exclude[part]
    pad = chunk - len(q)
    if pad:
      q = np.concatenate([q, np.zeros((pad, q.shape[1]), np.float32)])
      ex = np.concatenate([ex, np.full(pad, -1, np.int32)])
    out[part] = np.asarray(_neighbour_chunk(ref_x, ref_sq, q, ex, k=k))[: len(q) - pad]
  return out


def reference_joint(ref_codes: np.ndarray, num_candidates: int) -> np.ndarray:
  """Empirical joint of tuples on the reference rows with one pseudo-count spread uniformly: [C]."""
  counts = np.bincount(np.asarray(ref_codes, np.int64), minlength=num_candidates).astype(np.float64)
  return (counts + 1.0 / num_candidates) / (counts.sum() + 1.0)


def joint_prior(
  neighbour_codes: np.ndarray, ref_joint: np.ndarray, *, k: int, lam: float
) -> np.ndarray:
  """`(1 - lam) * counts among the first k neighbours / k + lam * ref_joint`: `[N, C]`."""
  n, c = len(neighbour_codes), len(ref_joint)
  flat = (np.arange(n)[:, None] * c + np.asarray(neighbour_codes)[:, :k]).reshape(-1)
  counts = np.bincount(flat, minlength=n * c).reshape(n, c).astype(np.float64)
  return (1.0 - lam) * counts / k + lam * ref_joint[None, :]


def feature_marginals(probs: np.ndarray, cardinalities: Sequence[int]) -> list[np.ndarray]:
  """Per-feature marginals `[N, K_j]` of a prior over tuples `[N, C]`."""
  cube = np.asarray(probs).reshape((len(probs),) + tuple(cardinalities))
  axes = range(1, cube.ndim)
  return [cube.sum(axis=tuple(a for a in axes if a != j + 1)) for j in range(len(cardinalities))]


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
  """ECE of the top-1 prediction of `probs [N, K]` against `truth [N]` (equal-width bins)."""
  conf = probs.max(axis=1)
  hit = probs.argmax(axis=1) == truth
  which = np.minimum((conf * bins).astype(int), bins - 1)
  ece = 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      ece += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
  return float(ece)


def fit_informed_prior(
  spaces: dict,
  ref_values: np.ndarray,
  cardinalities: Sequence[int],
  *,
  query_spaces: dict,
  exclude: np.ndarray | None = None,
  ks: Sequence[int] = (10, 30, 100),
  lams: Sequence[float] = (0.05, 0.2, 0.5),
  holdout: float = 0.2,
  max_holdout: int = 2000,
  seed: int = 0,
) -> InformedPrior:
  """Fits and evaluates the informed prior over private tuples.

  The hyper-parameters (k, lam, space) minimise the mean log-loss of the true tuple on a random
  `holdout` fraction of the reference rows, predicted from the other reference rows; the chosen
  prior is then evaluated for the query rows from all reference rows.

  Args:
    spaces: {name: [R, F] reference features}, e.g. {'server': one-hot x_pub, 'h': h}.
    ref_values: [R, P] private codes of the reference rows (the auxiliary sample).
    cardinalities: P ints.
    query_spaces: {name: [N, F] query features}, the same names as `spaces`.
    exclude: optional [N] index of each query's own row among the reference rows (-1: none), so
      that leave-one-out priors of training users never use their own row.
    ks, lams: the grid.
    holdout: fraction of reference rows held out for the grid search (at most `max_holdout`
      rows: the neighbour search dominates the cost).
    seed: seeds the hold-out split (`np.random.default_rng(seed)`).

  Returns:
    An `InformedPrior` with `probs [N, C]`.

  Raises:
    AttackError: no reference rows, or spaces that disagree in rows.
  """
  cards = tuple(int(c) for c in cardinalities)
  num = math.prod(cards)
  codes = tuple_codes(ref_values, cards)
  r = len(codes)
  if r < 2:
    raise checks.AttackError(f"the informed prior needs at least 2 reference rows, got {r}")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(r)
  n_hold = max(1, min(int(round(holdout * r)), max_holdout))
  hold, fit = perm[:n_hold], perm[n_hold:]
  ks = sorted({min(int(k), len(fit)) for k in ks})
  fit_joint = reference_joint(codes[fit], num)
  table, best = {}, None
  for name, ref_x in spaces.items():
    ref_x = np.asarray(ref_x, np.float32)
    neigh = fit[nearest_neighbours(ref_x[fit], ref_x[hold], max(ks))]
    ncodes = codes[neigh]
    # The held-out log-loss needs only the prior of the true tuple: its count among the first k.
    true_counts = np.cumsum(ncodes == codes[hold][:, None], axis=1)
    for k in ks:
      for lam in lams:
        p_true = (1.0 - lam) * true_counts[:, k - 1] / k + lam * fit_joint[codes[hold]]
        loss = float(-np.mean(np.log(np.maximum(p_true, _LOG_FLOOR))))
        table[f"{name}/k={k}/lam={lam:g}"] = loss
        if best is None or loss < best[0]:
          best = (loss, name, k, lam, ncodes)
  assert best is not None  # ks and lams are non-empty
  _, space, k, lam, best_codes = best
  p_hold = joint_prior(best_codes, fit_joint, k=k, lam=lam)
  ece = {}
  truth = np.asarray(ref_values)[hold]
  for j, marg in enumerate(feature_marginals(p_hold, cards)):
    ece[j] = expected_calibration_error(marg, truth[:, j])
  ref_x = np.asarray(spaces[space], np.float32)
  k_all = min(k, r - (1 if exclude is not None and (np.asarray(exclude) >= 0).any() else 0))
  neigh = nearest_neighbours(ref_x, query_spaces[space], k_all, exclude=exclude)
  probs = joint_prior(codes[neigh], reference_joint(codes, num), k=k_all, lam=lam)
  return InformedPrior(probs, int(k_all), float(lam), space, table, ece)


def marginal_tuple_log_prior(ref_values: np.ndarray, cardinalities: Sequence[int]) -> np.ndarray:
  """Log of the product of the reference rows' per-feature marginals (one pseudo-count per
  value): `[C]` in `candidate_table` order (features independent: the `marginal` prior)."""
  table = scoring.candidate_table(cardinalities)
  logp = np.zeros(len(table))
  for j, card in enumerate(cardinalities):
    p = np.bincount(np.asarray(ref_values)[:, j], minlength=card) + 1.0
    logp += np.log(p / p.sum())[table[:, j]]
  return logp


def marginal_tuple_prior(ref_values: np.ndarray, cardinalities: Sequence[int]) -> np.ndarray:
  """`exp(marginal_tuple_log_prior(...))`: `[C]` probabilities."""
  return np.exp(marginal_tuple_log_prior(ref_values, cardinalities))


@functools.partial(jax.jit, static_argnames=("device_apply",))
def _label_probabilities(device_apply, params, table, h, index):
  """`sigmoid(device_apply(params, h_i, x))` for each row i of `h` and each tuple x of `table`."""

  def per_user(h_i, i):
    p = params if i is None else jax.tree.map(lambda leaf: leaf[i], params)
    return jax.vmap(lambda x: device_apply(p, h_i, x))(table)

  if index is None:
    return jax.nn.sigmoid(jax.vmap(lambda h_i: per_user(h_i, None))(h))
  return jax.nn.sigmoid(jax.vmap(per_user)(h, index))


def candidate_label_probability(
  device_apply: Callable,
  params,
  h: np.ndarray,
  cardinalities: Sequence[int],
  *,
  param_index: np.ndarray | None = None,
  block: int = 256,
) -> np.ndarray:
  """The device model's `P(y = 1 | h_i, x)` for every user i and enumerated tuple x: `[N, C]`.

  Args:
    device_apply: `(params, h [d], x_priv [P] int32) -> scalar logit` (hashable: it is a static
      argument of the jitted computation).
    params: the device parameters the users' releases were made with; with `param_index`,
      several versions stacked along a leading axis of every leaf (`Transcript.device_params`).
    h: [N, d] cut activations.
    cardinalities: P ints.
    param_index: optional [N] ints, the version of `params` behind each row (as in `exact`):
      every version in one computation.
    block: users per jitted call (the last block padded).

  Returns:
    [N, C] float32 probabilities, candidates in `candidate_table` order.
  """
  table = jnp.asarray(scoring.candidate_table(cardinalities))
  h = np.asarray(h, np.float32)
  index = None
  if param_index is not None:
    index = checks.param_index(param_index, params, len(h))
  params = jax.tree.map(jnp.asarray, params)

  out = np.empty((len(h), len(table)), np.float32)
  for start in range(0, len(h), block):
    part = h[start : start + block]
    pad = block - len(part)
    hb = np.concatenate([part, np.zeros((pad, h.shape[1]), np.float32)]) if pad else part
    ib = None
    if index is not None:
      ib = index[start : start + block]
      ib = np.concatenate([ib, np.zeros(pad, np.int32)]) if pad else ib
    out[start : start + len(part)] = np.asarray(
      _label_probabilities(device_apply, params, table, hb, ib)
    )[: len(part)]
  return out


def debias_label_probability(p_noisy: np.ndarray, flip_probability: float) -> np.ndarray:
  """`P(y = 1)` from a model calibrated to randomized-response labels flipped w.p. q.

  `P(y~ = 1) = q + (1 - 2q) P(y = 1)`, so `P(y = 1) = (P(y~ = 1) - q) / (1 - 2q)`, clipped to
  [1e-6, 1 - 1e-6].
  """
  q = float(flip_probability)
  if not 0 <= q < 0.5:
    raise checks.AttackError(f"flip probability must lie in [0, 1/2), got {q}")
  return np.clip((np.asarray(p_noisy, np.float64) - q) / (1 - 2 * q), 1e-6, 1 - 1e-6)


def pair_log_prior(tuple_probs: np.ndarray, label_p1: np.ndarray) -> np.ndarray:
  """Log prior over (tuple, label) pairs `[N, C, 2]` from `P(x) [N, C]` and `P(y=1 | x) [N, C]`."""
  px = np.log(np.maximum(np.asarray(tuple_probs, np.float64), _LOG_FLOOR))
  p1 = np.clip(np.asarray(label_p1, np.float64), _LOG_FLOOR, 1 - _LOG_FLOOR)
  return np.stack([px + np.log1p(-p1), px + np.log(p1)], axis=-1)


def prior_guess(tuple_probs: np.ndarray, label_p1: np.ndarray, cardinalities: Sequence[int]):
  """The prior's own answers, without a gradient: per-feature and label marginal argmax.

  Returns:
    (features [N, P] int32, labels [N] int32, feature marginals list of [N, K_j], label P(y=1) [N]).
  """
  probs = np.asarray(tuple_probs, np.float64)
  margs = feature_marginals(probs, cardinalities)
  py1 = np.sum(probs * np.asarray(label_p1, np.float64), axis=1) / np.sum(probs, axis=1)
  feats = np.stack([m.argmax(axis=1) for m in margs], axis=1).astype(np.int32)
  return feats, (py1 > 0.5).astype(np.int32), margs, py1
