"""DP-implied upper bounds on attack success (mu-GDP trade-off, reconstruction, binary, RR).

Host-side numpy/scipy float64. Every function broadcasts over arrays and returns a Python float
for scalar inputs. mu = inf gives a bound of 1; mu = 0 gives the prior (the best guess without
observing anything).

A bound holds only for the attacker's prior given everything it knows (for a cut-layer attacker:
`h` included). Marginal-prior bounds are therefore not valid against an attacker that knows `h`
when private features correlate with the server's; the k-NN version is an estimate.
"""

import math

import numpy as np
from scipy import optimize
from scipy import special

from splitjax.privacy import _checks


def _as_float(x):
  return float(x) if np.ndim(x) == 0 else x


def _array(x, name: str, lo: float, hi: float) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if np.isnan(arr).any() or (arr < lo).any() or (arr > hi).any():
    raise _checks.PrivacyError(f'{name} must lie in [{lo}, {hi}] (not NaN), got {x!r}.')
  return arr


def _mu(mu) -> np.ndarray:
  return _array(mu, 'mu', 0.0, math.inf)


def gaussian_tradeoff(alpha, mu):
  """The mu-GDP trade-off function G_mu(alpha) = Phi(Phi^-1(1 - alpha) - mu).

  The smallest type-II error of any test between N(0, 1) and N(mu, 1) at type-I error alpha.

  Args:
    alpha: type-I error(s) in [0, 1].
    mu: GDP parameter(s) >= 0 (inf: G = 0).

  Returns:
    beta = G_mu(alpha), broadcast over the inputs.

  Raises:
    PrivacyError: arguments out of range or NaN.

  Formal guarantees:
    A mu-GDP mechanism has trade-off >= G_mu for every pair of neighbouring datasets.

  References:
    Dong, Roth, Su, "Gaussian Differential Privacy", arXiv 1905.02383.

  Example:
    >>> round(gaussian_tradeoff(0.5, 0.0), 6)
    0.5
  """
  alpha = _array(alpha, 'alpha', 0.0, 1.0)
  mu = _mu(mu)
  with np.errstate(invalid='ignore'):
    beta = special.ndtr(-special.ndtri(alpha) - mu)
  beta = np.where(np.isinf(mu), 0.0, beta)
  return _as_float(beta)


def reconstruction_bound(kappa, mu):
  """The most any attacker recovers a secret with largest prior probability kappa: 1 - G_mu(kappa).

  Args:
    kappa: baseline success (largest prior probability of the secret), in [0, 1].
    mu: GDP parameter(s) of the mechanism with respect to this secret, >= 0.

  Returns:
    The upper bound in [kappa, 1]; kappa at mu = 0, 1 at mu = inf.

  Raises:
    PrivacyError: arguments out of range or NaN.

  Formal guarantees:
    Reconstruction robustness of f-DP (Hayes, Mahloujifar, Balle 2023, for trade-off f = G_mu):
    for any prior with largest atom kappa, P(attack recovers the secret) <= 1 - G_mu(kappa).

  References:
    Hayes, Mahloujifar, Balle, "Bounding Training Data Reconstruction in DP-SGD",
    arXiv 2302.07225.

  Example:
    >>> round(reconstruction_bound(0.25, 0.0), 6)
    0.25
  """
  kappa = _array(kappa, 'kappa', 0.0, 1.0)
  mu = _mu(mu)
  with np.errstate(invalid='ignore'):
    bound = special.ndtr(mu + special.ndtri(kappa))  # = 1 - G_mu(kappa)
  bound = np.where(np.isinf(mu) & (kappa > 0), 1.0, bound)
  bound = np.where(mu == 0, kappa, bound)
  return _as_float(np.clip(bound, kappa, 1.0))


def binary_bound(p, mu):
  """The most any attacker guesses a binary secret with prior P(1) = p: Bayes under mu-GDP.

  max over alpha of (1 - p)(1 - alpha) + p (1 - G_mu(alpha)). The optimum is the Neyman-Pearson
  likelihood-ratio test with threshold z = mu/2 + log((1-p)/p)/mu, giving
  (1 - p) Phi(z) + p Phi(mu - z): exactly Phi(mu/2) at p = 1/2, and >= max(p, 1 - p).

  Args:
    p: prior probability(ies) of the secret being 1, in [0, 1] (arrays: one per user).
    mu: GDP parameter(s) >= 0.

  Returns:
    The Bayes-optimal success bound, broadcast over the inputs.

  Raises:
    PrivacyError: arguments out of range or NaN.

  Formal guarantees:
    For a mu-GDP mechanism, any test between the secret's two values has type-II error
    >= G_mu(type-I error), so no attacker with prior p exceeds this accuracy; the bound is
    attained by the Gaussian mechanism whose two outputs are mu apart (in noise units).

  References:
    Dong, Roth, Su, arXiv 1905.02383; Hayes, Mahloujifar, Balle, arXiv 2302.07225.

  Example:
    >>> round(binary_bound(0.5, 2.0), 6)
    0.841345
  """
  p = _array(p, 'p', 0.0, 1.0)
  mu = _mu(mu)
  p, mu = np.broadcast_arrays(p, mu)
  base = np.maximum(p, 1.0 - p)
  with np.errstate(divide='ignore', invalid='ignore'):
    z = mu / 2.0 + np.log1p(-p) / mu - np.log(p) / mu
    bound = (1.0 - p) * special.ndtr(z) + p * special.ndtr(mu - z)
  bound = np.where(np.isinf(mu) | (base == 1.0), 1.0, bound)
  bound = np.where(mu == 0, base, bound)
  return _as_float(np.clip(bound, base, 1.0))


def randomized_response_bound(p, epsilon):
  """The most any attacker guesses a binary label released by randomized response.

  max(p, 1 - p, e^eps / (1 + e^eps)): the Bayes accuracy of the better of "guess the prior's
  mode" and "trust the report".

  Args:
    p: prior probability(ies) of label 1, in [0, 1].
    epsilon: RR epsilon(s) > 0 (inf: 1).

  Returns:
    The bound, broadcast over the inputs.

  Raises:
    PrivacyError: arguments out of range or NaN.

  Formal guarantees:
    Exact Bayes accuracy for a single eps-RR report of a binary label with prior p.

  References:
    Warner, JASA 1965.

  Example:
    >>> round(randomized_response_bound(0.5, math.log(3.0)), 6)
    0.75
  """
  p = _array(p, 'p', 0.0, 1.0)
  eps = _array(epsilon, 'epsilon', 0.0, math.inf)
  if (eps <= 0).any():
    raise _checks.PrivacyError(f'epsilon must be > 0, got {epsilon!r}.')
  return _as_float(np.maximum(np.maximum(p, 1.0 - p), special.expit(eps)))


def _mu_hat_scalar(acc_lo: float, p: float) -> float:
  base = max(p, 1.0 - p)
  if acc_lo <= base:
    return 0.0
  if acc_lo >= 1.0:
    return math.inf
  if p == 0.5:
    return float(2.0 * special.ndtri(acc_lo))
  f = lambda m: binary_bound(p, m) - acc_lo
  hi = 1.0
  while f(hi) < 0.0:
    hi *= 2.0
    if hi > 1e4:
      return math.inf
  return float(optimize.brentq(f, 0.0, hi, xtol=1e-12, rtol=1e-12))


def mu_hat(acc_lo, p=0.5):
  """Empirical mu: the smallest mu whose `binary_bound(p, mu)` reaches `acc_lo`.

  Use the lower end of a Clopper-Pearson interval on a measured binary-attack accuracy: any
  mechanism that lets an attacker reach it must be at least mu_hat-GDP (if p is the
  attacker's true prior).

  Args:
    acc_lo: measured accuracy lower bound(s), in [0, 1].
    p: prior probability(ies) of 1, in [0, 1].

  Returns:
    mu_hat >= 0: 0 when acc_lo <= max(p, 1 - p); 2 Phi^-1(acc_lo) when p = 1/2; inf at 1.

  Raises:
    PrivacyError: arguments out of range or NaN.

  Formal guarantees:
    binary_bound(p, mu) < acc_lo for every mu < mu_hat, so a mechanism that is mu-GDP with
    mu < mu_hat cannot produce that accuracy (at the interval's confidence).

  Example:
    >>> round(mu_hat(0.841345, 0.5), 4)
    2.0
  """
  acc_lo = _array(acc_lo, 'acc_lo', 0.0, 1.0)
  p = _array(p, 'p', 0.0, 1.0)
  out = np.vectorize(_mu_hat_scalar, otypes=[np.float64])(acc_lo, p)
  return _as_float(out)


def prior_bound(prior, mu):
  """Bound for a categorical secret from its prior over K values.

  K = 2 uses `binary_bound(prior[..., 1], mu)`; K > 2 uses
  `reconstruction_bound(max(prior), mu)`.

  Args:
    prior: `[..., K]` probabilities (rows summing to 1).
    mu: GDP parameter(s) >= 0, broadcast against `prior[..., 0]`.

  Returns:
    `[...]` bounds (a float for a single prior vector).

  Raises:
    PrivacyError: K < 2, negative entries, or rows not summing to 1.

  Formal guarantees:
    Valid for an attacker whose prior (given all it knows) is `prior`; see the module doc.
  """
  prior = np.asarray(prior, dtype=np.float64)
  if prior.ndim < 1 or prior.shape[-1] < 2:
    raise _checks.PrivacyError(f'prior must be [..., K] with K >= 2, got shape {prior.shape}.')
  if np.isnan(prior).any() or (prior < 0).any() or not np.allclose(prior.sum(-1), 1.0, atol=1e-6):
    raise _checks.PrivacyError('prior rows must be non-negative and sum to 1; normalize them.')
  if prior.shape[-1] == 2:
    return binary_bound(np.clip(prior[..., 1], 0.0, 1.0), mu)
  return reconstruction_bound(np.clip(prior.max(-1), 0.0, 1.0), mu)


def knn_bound(posteriors, mu) -> float:
  """ESTIMATE of the bound from per-user k-NN posteriors, averaged over users.

  Each user's posterior (e.g. k-NN with k = 30 on the server's features or `h`) stands in for
  the attacker's prior given what it knows; the per-user `prior_bound` is averaged. It is an
  estimate, not a guarantee: the k-NN posterior is only an approximation of the true one.

  Args:
    posteriors: `[N, K]` per-user probabilities (rows summing to 1).
    mu: GDP parameter >= 0 (scalar or `[N]`).

  Returns:
    The mean over users of `prior_bound(posteriors[u], mu)`.

  Raises:
    PrivacyError: a posterior array that is not `[N, K]` with N >= 1, K >= 2, or bad rows.

  Formal guarantees:
    None (an estimate); it equals the true average bound when the posteriors are exact.
  """
  posteriors = np.asarray(posteriors, dtype=np.float64)
  if posteriors.ndim != 2 or posteriors.shape[0] == 0:
    raise _checks.PrivacyError(
      f'posteriors must be [N, K] with N >= 1, got shape {posteriors.shape}.'
    )
  return float(np.mean(prior_bound(posteriors, mu)))


BOUND_KINDS = (
  'guarantee:true_prior',
  'estimate:knn_prior',
  'estimate:marginal_prior',
  'none:channel_unprotected',
)


def reference_mu(
  *,
  noise_multiplier: float,
  releases: int = 1,
  device_noise_multiplier: float | None = None,
  device_releases: int = 0,
) -> float:
  """`mu_ref = sqrt(k_cut / sigma^2 + k_dev / sigma_dev^2)`: 1/sigma per release, composed.

  The reference for reconstructing a secret with K > 2 values: every released row lies in the
  ball of radius C around 0, so each Gaussian release of std sigma C moves the attacker by at most
  1/sigma (the binary bound uses the replace-one mu = 2 mu_ref). Valid only when the clip comes
  immediately before the noise and the parameters at each release depend on the example only
  through earlier released outputs: test users (k_cut = 1, k_dev = 0), training users only with
  device DP-SGD.

  Args:
    noise_multiplier: sigma of the cut layer (0 or inf allowed: mu_ref inf or 0).
    releases: k_cut, the example's cut-layer releases.
    device_noise_multiplier: sigma_dev of device DP-SGD, or None (no device releases).
    device_releases: k_dev.

  Returns:
    mu_ref >= 0 (inf when any channel is noise-free).
  """
  total = 0.0
  for sigma, k in ((noise_multiplier, releases), (device_noise_multiplier, device_releases)):
    if not k:
      continue
    if sigma is None or sigma == 0:
      return math.inf
    total += k / float(sigma) ** 2
  return math.sqrt(total)


def per_user_bound(prior, mu_ref: float) -> np.ndarray:
  """Per-user bound `[N]` for a secret with per-user prior `[N, K]` (what the attacker knows).

  K = 2: `binary_bound(p_u, 2 mu_ref)`; K > 2: `1 - G_{mu_ref}(kappa_u)` with kappa_u the user's
  largest prior probability (the binary bound is never above the reference bound).

  Formal guarantees:
    A guarantee when `prior` is the attacker's true prior given everything it knows (synthetic
    data with the generator's prior); an estimate otherwise.
  """
  prior = np.asarray(prior, dtype=np.float64)
  if prior.ndim != 2 or prior.shape[-1] < 2:
    raise _checks.PrivacyError(f'prior must be [N, K] with K >= 2, got shape {prior.shape}.')
  if math.isinf(mu_ref):
    return np.ones(len(prior))
  if prior.shape[-1] == 2:
    return np.asarray(binary_bound(np.clip(prior[:, 1], 0.0, 1.0), 2.0 * mu_ref), np.float64)
  return np.asarray(reconstruction_bound(np.clip(prior.max(-1), 0.0, 1.0), mu_ref), np.float64)
