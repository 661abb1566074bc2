"""Auditing the guarantee: empirical lower bounds on mu (GDP) and epsilon, beside the accounted.

An audit runs the mechanism many times on two neighbouring inputs (hypothesis H0 and H1: a
canary's secret bit is 0 or 1), applies a test statistic to each output, and counts how often it
exceeds each threshold of a grid fixed before sampling. From those counts alone:

- `mu_lower`: max over thresholds of Phi^-1(TPR_lo) - Phi^-1(FPR_hi). A mu-GDP mechanism has
  TPR <= Phi(Phi^-1(FPR) + mu) for every test, so this is a lower bound on mu that assumes nothing
  about the mechanism's trade-off curve. It is never converted to epsilon.
- `epsilon_lower` at delta: max over thresholds of the two DP inequalities
  TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta, solved for eps at the confidence bounds.

Every Clopper-Pearson bound is one-sided at level (1 - confidence) / (2 T) for T thresholds, so
all 2 T bounds (TPR_lo and FPR_hi at each threshold) hold together with probability at least
``confidence`` and the maximum over thresholds is a valid ``confidence``-level bound. The best
threshold is never chosen on the data the bound comes from.

Channels (the mechanisms behind the counts; the releases come from the library's own code paths,
so a key reused across steps or noise applied to something other than what is sent shows up):

- the cut layer, one release through the test replay (`training.replay_chunks`) and k releases
  through the training loop (`training.fit`, ``record='all'``): the canary is a row whose two
  labels (private features known) give clipped gradients of norm C pointing in opposite
  directions, 2C apart, the worst case of the accountant's sensitivity;
- label DP (randomized response, pure epsilon-DP): the label the device trained on is read off the
  cut gradients of each of k epochs and the bit is tested from all of them jointly, so a fresh
  draw per epoch (an effective k x epsilon) is caught.

The statistics are numpy/scipy float64 on the host; the release generators run the jitted steps.
"""

import math
from collections.abc import Iterable
from typing import NamedTuple

import jax
import numpy as np
from scipy import special
from scipy import stats

from splitjax import training
from splitjax.data.base import Split
from splitjax.privacy import accounting
from splitjax.privacy import transforms as dp_transforms

# The pre-registered thresholds of the cut-channel statistic, in noise units (H0 ~ N(0, 1)).
THRESHOLDS = np.linspace(0.0, 6.0, 20)
CONFIDENCE = 0.95
DELTA = 1e-5
DEFAULT_TRIALS = {"cut": 1_000_000, "cut_training": 100_000, "label": 200_000}
# Rows at which the canary is sought and the margin kept below its smaller gradient norm.
CANARY_SEARCH_ROWS = 4096
CANARY_CLIP_FRACTION = 0.5


class AuditError(ValueError):
  """An audit that cannot be run as asked (the message names the problem and the fix)."""


class Counts(NamedTuple):
  """Exceedance counts of a test statistic at fixed thresholds.

  Attributes:
    thresholds: ``[T]`` float64, fixed before sampling.
    positives: ``[T]`` int64, trials under H1 (secret bit 1) whose statistic exceeds each threshold.
    negatives: ``[T]`` int64, the same under H0 (secret bit 0).
    trials_h1, trials_h0: numbers of trials under each hypothesis.
  """

  thresholds: np.ndarray
  positives: np.ndarray
  negatives: np.ndarray
  trials_h1: int
  trials_h0: int

  def __add__(self, other: "Counts") -> "Counts":  # type: ignore[override]
    if not np.array_equal(self.thresholds, other.thresholds):
      raise AuditError("counts at different thresholds cannot be added")
    return Counts(
      self.thresholds,
      self.positives + other.positives,
      self.negatives + other.negatives,
      self.trials_h1 + other.trials_h1,
      self.trials_h0 + other.trials_h0,
    )


def count(statistic: np.ndarray, bits: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> Counts:
  """Counts ``statistic [N] > t`` for each threshold, split by the true ``bits [N]`` (0/1)."""
  statistic, bits = np.asarray(statistic, np.float64), np.asarray(bits)
  thresholds = np.asarray(thresholds, np.float64)
  above = statistic[:, None] > thresholds[None, :]
  one = bits == 1
  return Counts(
    thresholds,
    above[one].sum(0).astype(np.int64),
    above[~one].sum(0).astype(np.int64),
    int(one.sum()),
    int((~one).sum()),
  )


def clopper_pearson(k, n, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """One-sided Clopper-Pearson bounds at level ``alpha`` each: ``(lower, upper)`` of k / n.

  ``k`` may be fractional (expected counts). lower = 0 at k = 0, upper = 1 at k = n.
  """
  k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
  with np.errstate(invalid="ignore"):
    lo = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-300)), 1.0)
  return lo, hi


def _rates(counts: Counts, confidence: float, num_bounds: int | None = None):
  """``(TPR_lo, FPR_hi)`` per threshold, Bonferroni over ``2 x num_bounds`` one-sided bounds."""
  if not 0.0 < confidence < 1.0:
    raise AuditError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
  if counts.trials_h1 <= 0 or counts.trials_h0 <= 0:
    raise AuditError("an audit needs trials under both hypotheses; raise --trials")
  num = len(counts.thresholds) if num_bounds is None else num_bounds
  alpha = (1.0 - confidence) / (2 * num)
  tpr_lo, _ = clopper_pearson(counts.positives, counts.trials_h1, alpha)
  _, fpr_hi = clopper_pearson(counts.negatives, counts.trials_h0, alpha)
  return tpr_lo, fpr_hi


def mu_lower(counts: Counts, confidence: float = CONFIDENCE) -> float:
  """The ``confidence``-level lower bound on the mechanism's GDP mu (>= 0; never an epsilon)."""
  tpr_lo, fpr_hi = _rates(counts, confidence)
  with np.errstate(divide="ignore", invalid="ignore"):
    gaps = special.ndtri(tpr_lo) - special.ndtri(fpr_hi)
  gaps = np.where(np.isnan(gaps), -np.inf, gaps)
  return float(max(0.0, np.max(gaps)))


def epsilon_lower(counts: Counts, delta: float = DELTA, confidence: float = CONFIDENCE) -> float:
  """The ``confidence``-level lower bound on epsilon at ``delta`` (>= 0; delta = 0: pure DP).

  At each threshold both inequalities of (eps, delta)-DP are solved for eps at the bounds:
  ``log((TPR_lo - delta) / FPR_hi)`` and ``log((TNR_lo - delta) / FNR_hi)`` with
  ``TNR_lo = 1 - FPR_hi`` and ``FNR_hi = 1 - TPR_lo``.
  """
  if not 0.0 <= delta < 1.0:
    raise AuditError(f"delta={delta} must be in [0, 1)")
  tpr_lo, fpr_hi = _rates(counts, confidence)
  with np.errstate(divide="ignore", invalid="ignore"):
    first = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
    second = np.log(np.maximum((1.0 - fpr_hi) - delta, 0.0) / (1.0 - tpr_lo))
  cand = np.concatenate([first, second])
  cand = cand[~np.isnan(cand)]  # FPR_hi > 0 and TPR_lo < 1 for finite trials: no +inf
  return float(max(0.0, np.max(cand))) if cand.size else 0.0


def mu_interval(
  counts: Counts, threshold: float, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
  """``(estimate, lo, hi)`` of mu at one pre-registered threshold (the two-sided check).

  The estimate is Phi^-1(TPR) - Phi^-1(FPR); the interval combines two-sided Clopper-Pearson
  intervals of TPR and FPR, each at level (1 - confidence) / 2. Under Gaussian releases with the
  accounted noise the interval contains the accounted mu; too little noise and too much noise
  (or noise shared between releases) both move it away.
  """
  i = int(np.argmin(np.abs(counts.thresholds - threshold)))
  if not np.isclose(counts.thresholds[i], threshold):
    raise AuditError(f"threshold {threshold} is not on the counts' grid")
  alpha = (1.0 - confidence) / 4  # two two-sided intervals
  tpr = counts.positives[i] / counts.trials_h1
  fpr = counts.negatives[i] / counts.trials_h0
  tlo, thi = clopper_pearson(counts.positives[i], counts.trials_h1, alpha)
  flo, fhi = clopper_pearson(counts.negatives[i], counts.trials_h0, alpha)
  q = special.ndtri
  return float(q(tpr) - q(fpr)), float(q(tlo) - q(fhi)), float(q(thi) - q(flo))


def check_thresholds(mu: float) -> np.ndarray:
  """The grid with the two-sided check's threshold mu / 2 added (fixed before sampling)."""
  return np.unique(np.concatenate([THRESHOLDS, [round(mu / 2, 12)]]))


def two_sided(counts: Counts, mu_accounted: float, confidence: float = CONFIDENCE) -> dict:
  """The two-sided check at the pre-registered threshold ``mu_accounted / 2`` (`mu_interval`).

  ``passed`` is whether the interval contains the accounted mu: False when the releases carry
  more information than accounted (too little noise) or less (too much noise, or one noise
  draw shared by several releases).
  """
  t = round(mu_accounted / 2, 12)
  est, lo, hi = mu_interval(counts, t, confidence)
  return {
    "threshold": t,
    "mu_estimate": est,
    "mu_interval": [lo, hi],
    "passed": bool(lo <= mu_accounted <= hi),
  }


def saturation(
  trials: int,
  thresholds: np.ndarray = THRESHOLDS,
  delta: float = DELTA,
  confidence: float = CONFIDENCE,
) -> dict:
  """What the audit reports when every trial is separated perfectly: the most ``trials`` allow."""
  t = np.asarray(thresholds, np.float64)
  perfect = Counts(
    t, np.full(t.shape, trials, np.int64), np.zeros(t.shape, np.int64), trials, trials
  )
  return {
    "epsilon_lower": epsilon_lower(perfect, delta, confidence),
    "mu_lower": mu_lower(perfect, confidence),
  }


def gaussian_counts(mu: float, trials: int, thresholds: np.ndarray = THRESHOLDS) -> Counts:
  """Expected (fractional) counts of an exact mu-GDP Gaussian test: H0 ~ N(0,1), H1 ~ N(mu,1)."""
  t = np.asarray(thresholds, np.float64)
  return Counts(t, trials * special.ndtr(mu - t), trials * special.ndtr(-t), trials, trials)


def summary(
  counts: Counts,
  *,
  mu_accounted: float | None,
  epsilon_accounted: float | None,
  delta: float = DELTA,
  confidence: float = CONFIDENCE,
  pure: bool = False,
) -> dict:
  """The audit's numbers: accounted and audited mu and epsilon, and whether the audit is valid.

  ``pure`` (randomized response): ``epsilon_lower_pure`` at delta = 0 is added and mu is null.
  ``consistent`` is False when an audited lower bound exceeds its accounted value (the mechanism
  leaks more than the accountant says: a bug, or the 1 - confidence chance).
  """
  out = {
    "delta": delta,
    "confidence": confidence,
    "trials": int(min(counts.trials_h1, counts.trials_h0)),
    "epsilon_accounted": _finite(epsilon_accounted),
    "epsilon_lower": epsilon_lower(counts, delta, confidence),
    "mu_accounted": None if pure else _finite(mu_accounted),
    "mu_lower": None if pure else mu_lower(counts, confidence),
  }
  if epsilon_accounted is None or math.isinf(epsilon_accounted):
    out["epsilon_accounted_note"] = "infinite: nothing bounds this channel"
  if pure:
    out["epsilon_lower_pure"] = epsilon_lower(counts, 0.0, confidence)
  bad = []
  if out["mu_lower"] is not None and mu_accounted is not None:
    bad.append(out["mu_lower"] > mu_accounted)
  if epsilon_accounted is not None:
    bad.append(out["epsilon_lower"] > epsilon_accounted)
    if pure:
      bad.append(out["epsilon_lower_pure"] > epsilon_accounted)
  out["consistent"] = not any(bad)
  return out


def _finite(x):
  return None if x is None or not math.isfinite(x) else float(x)


# --- the cut channel -------------------------------------------------------------------------


class CutCanary(NamedTuple):
  """A worst-case pair for the cut layer: one row, its two labels' clipped gradients.

  Attributes:
    row: index of the canary in the split it was sought in.
    clip0, clip1: ``[d]`` float64, the clipped cut gradients for label 0 and label 1 (norm C).
    l2_clip_norm: C.
    margin: the smaller unclipped norm (C must not exceed it for the pair to be 2C apart).
  """

  row: int
  clip0: np.ndarray
  clip1: np.ndarray
  l2_clip_norm: float
  margin: float


def repeat_row(split: Split, row: int, labels: np.ndarray) -> Split:
  """A split of ``len(labels)`` copies of one row with the given labels (views, no copies)."""
  labels = np.asarray(labels, np.int32)
  n = labels.shape[0]
  rep = lambda a: np.broadcast_to(a[row : row + 1], (n,) + a.shape[1:])
  return Split(
    rep(split.priv_cat), rep(split.priv_dense), rep(split.pub_cat), rep(split.pub_dense), labels
  )


def _clean_gradients(model, state, split: Split, rows: np.ndarray, label: int) -> np.ndarray:
  """The unnoised, unclipped cut gradients of ``rows`` under ``label`` (the replay, no DP)."""
  take = split.take(rows)
  one = Split(
    take.priv_cat,
    take.priv_dense,
    take.pub_cat,
    take.pub_dense,
    np.full(len(rows), label, np.int32),
  )
  gs = [g for _, _, g in training.replay_chunks(model, state, one, batch_size=len(rows))]
  return np.concatenate(gs).astype(np.float64)


def find_cut_canary(
  model,
  state,
  split: Split,
  l2_clip_norm: float | None = None,
  search_rows: int = CANARY_SEARCH_ROWS,
) -> CutCanary:
  """The row of ``split[:search_rows]`` whose two labels' gradients are largest, clipped to C.

  With label 0 the gradient is ``s v`` and with label 1 ``(s - 1) v`` (``s = sigmoid(z)``,
  ``v = dz/dh``): both clip to norm C in opposite directions iff C <= min(s, 1 - s) ||v||, the
  row's margin. ``l2_clip_norm`` None takes C = `CANARY_CLIP_FRACTION` x the best margin.
  AuditError if C exceeds the best margin or the pair is not 2C apart.
  """
  rows = np.arange(min(search_rows, len(split)), dtype=np.int64)
  g0 = _clean_gradients(model, state, split, rows, 0)
  g1 = _clean_gradients(model, state, split, rows, 1)
  margin = np.minimum(np.linalg.norm(g0, axis=1), np.linalg.norm(g1, axis=1))
  best = int(np.argmax(margin))
  if not margin[best] > 0:
    raise AuditError("no row has a nonzero cut gradient under both labels; check the model")
  clip = CANARY_CLIP_FRACTION * float(margin[best]) if l2_clip_norm is None else float(l2_clip_norm)
  if not 0 < clip <= margin[best]:
    raise AuditError(
      f"--dp_clip={clip:g} is above the largest canary margin {margin[best]:.4g} of these "
      f"rows: both labels' gradients must reach the clip; pass --dp_clip <= {margin[best]:.4g} "
      "(the audited mu does not depend on C)"
    )
  clipped = np.asarray(
    dp_transforms.clip_rows(np.stack([g0[best], g1[best]]).astype(np.float32), clip), np.float64
  )
  dist = float(np.linalg.norm(clipped[1] - clipped[0]))
  if abs(dist - 2 * clip) > 1e-4 * clip:
    raise AuditError(f"the canary's clipped pair is {dist:.6g} apart, not 2C = {2 * clip:.6g}")
  return CutCanary(best, clipped[0], clipped[1], clip, float(margin[best]))


def cut_statistic(g_sent: np.ndarray, canary: CutCanary, noise_multiplier: float) -> np.ndarray:
  """The likelihood-ratio statistic of each release ``g_sent [N, d]``, in noise units.

  The projection on the direction from the label-0 row to the label-1 row, measured from the
  label-0 row: N(0, 1) under H0 and N(2 / sigma, 1) under H1 when the noise is as accounted.
  """
  diff = canary.clip1 - canary.clip0
  u = diff / np.linalg.norm(diff)
  std = noise_multiplier * canary.l2_clip_norm
  return (np.asarray(g_sent, np.float64) - canary.clip0) @ u / std


def audit_replay(
  model,
  state,
  split: Split,
  canary: CutCanary,
  dp: training.DPConfig,
  *,
  noise_multiplier: float,
  trials: int,
  seed: int = 0,
  batch_size: int = 8192,
  thresholds: np.ndarray = THRESHOLDS,
) -> Counts:
  """One release per trial through the test replay: ``trials`` under each label, alternating.

  ``dp`` is what the mechanism runs; ``noise_multiplier`` what the statistic assumes (the
  accounted sigma), so a mechanism with less noise than accounted shows up in the bounds.
  """
  bits = np.arange(2 * trials, dtype=np.int32) % 2
  canaries = repeat_row(split, canary.row, bits)
  total = None
  for part, _, g in training.replay_chunks(
    model, state, canaries, dp=dp, seed=seed, batch_size=batch_size
  ):
    c = count(cut_statistic(g, canary, noise_multiplier), bits[part], thresholds)
    total = c if total is None else total + c
  assert total is not None
  return total


def release_statistics(
  transcripts: Iterable, canary: CutCanary, noise_multiplier: float, num_examples: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per canary example: ``(sum of the k releases' statistics / sqrt(k) [N], k [N])``.

  ``transcripts``: the training loop's per-epoch transcripts (rows located by ``example_index``).
  With independent noise the sum is N(0, 1) under H0 and N(sqrt(k) 2 / sigma, 1) under H1.
  """
  total = np.zeros(num_examples, np.float64)
  k = np.zeros(num_examples, np.int64)
  for tr in transcripts:
    idx = np.asarray(tr.example_index)
    np.add.at(total, idx, cut_statistic(tr.g, canary, noise_multiplier))
    np.add.at(k, idx, 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return total / np.sqrt(np.maximum(k, 1)), k


def training_transcripts(
  model,
  split: Split,
  dp: training.DPConfig,
  *,
  epochs: int,
  seed: int,
  batch_size: int = 4096,
  labels: np.ndarray | None = None,
) -> list:
  """The per-epoch transcripts of ``epochs`` epochs of `training.fit` (SL, ``record='all'``).

  Learning rate 0 (SGD), so every release of the canary is made under the same parameters, the
  ones `training.init_state(model, recipe, seed)` gives; the steps, the data order and the noise
  keys (``fold_in(key, step)``) are the training loop's own.
  """
  recipe = audit_recipe(batch_size, epochs)
  out: list = []
  training.fit(
    model,
    split,
    recipe=recipe,
    seed=seed,
    dp=dp,
    labels=labels,
    record="all",
    on_transcript=lambda epoch, tr: out.append(tr),
  )
  return out


def audit_recipe(batch_size: int, epochs: int) -> training.Recipe:
  """The recipe of the training-path audits: SGD at learning rate 0."""
  return training.Recipe(optimizer="sgd", learning_rate=0.0, batch_size=batch_size, epochs=epochs)


def audit_state(model, batch_size: int, epochs: int, seed: int):
  """The state the training-path audit trains from (what `training.fit` initialises)."""
  return training.init_state(model, audit_recipe(batch_size, epochs), seed)


def cut_accounting(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
  """``(mu, epsilon at delta)`` the accountant gives ``releases`` cut releases at sigma."""
  return (
    accounting.composed_mu(noise_multiplier, releases),
    accounting.epsilon(noise_multiplier, releases, delta),
  )


# --- the label channel (randomized response) -------------------------------------------------


def label_thresholds(epochs: int) -> np.ndarray:
  """The label audit's thresholds on the number of epochs whose label reads 1: 0.5 .. k - 0.5."""
  return np.arange(epochs, dtype=np.float64) + 0.5


def label_reads(transcripts: Iterable, reference: np.ndarray, num_examples: int) -> np.ndarray:
  """Per example, the number of epochs whose cut gradient says the trained label was 1.

  Without cut-layer DP ``g = (s - y) v``: label 0 gives a positive multiple of the label-0
  gradient ``reference [d]`` and label 1 a negative one (``s`` in (0, 1)).
  """
  ones = np.zeros(num_examples, np.int64)
  for tr in transcripts:
    idx = np.asarray(tr.example_index)
    np.add.at(ones, idx, (np.asarray(tr.g, np.float64) @ reference < 0).astype(np.int64))
  return ones


def label_accounting(epsilon: float, epochs: int, *, fresh_draw_per_epoch: bool = False) -> float:
  """The label channel's accounted epsilon: the draw is made once (``k x eps`` if redrawn)."""
  return epsilon * (epochs if fresh_draw_per_epoch else 1)


def canary_bits(seed: int, m: int) -> np.ndarray:
  """The pipeline audit's m secret bits: uniform from ``fold_in(key(seed), 20)`` (the audit's
  own key, independent of the data, the model and the DP noise)."""
  key = jax.random.fold_in(jax.random.key(seed), 20)
  return np.asarray(jax.random.bernoulli(key, 0.5, (m,)), np.int32)


def key_bits(seed: int, n: int) -> np.ndarray:
  """``n`` secret bits drawn uniformly from the audit's own key (not from any real label)."""
  return np.asarray(jax.random.bernoulli(jax.random.key(seed), 0.5, (n,)), np.int32)


# --- one training run (Steinke, Nasr, Jagielski 2023) ----------------------------------------


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
  """P[at least ``correct`` of ``guesses`` right] under (epsilon, delta)-DP, m canaries.

  The bound of Steinke, Nasr and Jagielski (2023, arXiv 2305.08846, Theorem 3.1 with the delta
  term of their Proposition 5.2): with q = e^eps / (1 + e^eps),
  ``P[Bin(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Bin(r, q) < v] / i``.
  """
  if not 0 <= correct <= guesses <= m:
    raise AuditError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= m ({m})")
  q = float(special.expit(epsilon))
  tail = float(stats.binom.sf(correct - 1, guesses, q))
  extra = 0.0
  if delta > 0 and correct > 0:
    pmf = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)  # v-1, v-2, ..., 0
    extra = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1)))
  return min(1.0, tail + 2 * m * delta * extra)


def one_run_epsilon_lower(
  m: int, guesses: int, correct: int, delta: float = DELTA, confidence: float = CONFIDENCE
) -> float:
  """The largest epsilon rejected at ``confidence`` by `one_run_p_value` (bisection, >= 0)."""
  level = 1.0 - confidence
  if one_run_p_value(m, guesses, correct, 0.0, delta) >= level:
    return 0.0
  lo, hi = 0.0, 1.0
  while one_run_p_value(m, guesses, correct, hi, delta) < level:
    lo, hi = hi, 2 * hi
    if hi > 1e3:
      return math.inf
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if one_run_p_value(m, guesses, correct, mid, delta) < level else (lo, mid)
  return lo


def one_run_saturation(m: int, delta: float = DELTA, confidence: float = CONFIDENCE) -> float:
  """The one-run bound when all m canaries are guessed right: the most m canaries can show."""
  return one_run_epsilon_lower(m, m, m, delta, confidence)
